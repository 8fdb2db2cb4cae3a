#!/usr/bin/env python3
"""Write tiny random-weight models and their transformers reference outputs.

Each variant is built with transformers' own model class (eager attention, float32),
given deterministic random weights of a scale that keeps activations and logits
non-degenerate, saved with `save_pretrained` (safetensors) into
tests/fixtures/tiny/<name>/, then loaded back from disk in float32 (so a bf16/f16
variant's reference runs the same rounded weights, upcast) to compute:

  logits.f32       all-position logits of one forward pass over `ids`,
                   little-endian f32, len(ids) x vocab
  reference.json   ids, greedy continuation (manual argmax loop with a KV cache),
                   its per-step top-2 margins, versions; for `llama-dynamic` also
                   logits-chunk7.f32 / logits-step.f32 (see below)

Dynamic NTK rope (transformers 5): the rotary module recomputes its frequencies on a
forward call when max(position_ids)+1 exceeds the longest length seen so far (and
resets them when a call is back under max_position_embeddings), using
base * (factor * seq_len / max_position_embeddings - (factor - 1)) ** (dim / (dim - 2))
with seq_len = max(position_ids)+1 of *that call*. Keys already in the cache keep
the rotation they were given. So for a sequence longer than max_position_embeddings,
one 48-token forward, 7-token chunks and single tokens give different logits; the
fixture has transformers' own chunked (7) and token-by-token logits for that variant.

Usage (from the repository root; about a minute, most of it importing transformers):

  /opt/refenv/bin/python scripts/make-tiny-models.py [--out tests/fixtures/tiny]

Deterministic: one torch thread, fixed seeds; two runs give byte-identical files.
"""

import argparse
import json
import math
import os
import shutil
import struct
import sys

import numpy as np
import torch

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
import transformers  # noqa: E402
from transformers import (  # noqa: E402
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

DEFAULT_OUT = "tests/fixtures/tiny"
N_GREEDY = 16
CHUNK = 7

BASE = dict(
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    num_hidden_layers=2,
    intermediate_size=128,
    vocab_size=512,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    hidden_act="silu",
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)

# name: (model class, config class, config overrides, stored dtype, n_ids, save kwargs, notes)
VARIANTS = [
    ("llama", LlamaForCausalLM, LlamaConfig, {}, torch.float32, 40, {},
     "plain Llama, untied lm_head, GQA 4/2"),
    ("llama-tied-bf16", LlamaForCausalLM, LlamaConfig, {"tie_word_embeddings": True},
     torch.bfloat16, 40, {}, "tie_word_embeddings, weights stored in bfloat16"),
    ("llama3-rope-sharded", LlamaForCausalLM, LlamaConfig,
     {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                       "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
      "rope_theta": 10000.0},
     torch.bfloat16, 40, {"max_shard_size": "100KB"},
     "llama3 rope scaling, saved as shards with model.safetensors.index.json"),
    ("llama-yarn", LlamaForCausalLM, LlamaConfig,
     {"rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                       "original_max_position_embeddings": 64},
      "tie_word_embeddings": True},
     torch.bfloat16, 40, {}, "yarn rope scaling, factor 4 over 64"),
    ("llama-linear", LlamaForCausalLM, LlamaConfig,
     {"rope_scaling": {"rope_type": "linear", "factor": 2.0}, "tie_word_embeddings": True},
     torch.bfloat16, 40, {}, "linear rope scaling 2.0"),
    ("llama-dynamic", LlamaForCausalLM, LlamaConfig,
     {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}, "max_position_embeddings": 32,
      "tie_word_embeddings": True},
     torch.bfloat16, 48, {}, "dynamic NTK rope 2.0, max_position_embeddings 32, 48-token input"),
    ("llama-bias", LlamaForCausalLM, LlamaConfig, {"attention_bias": True},
     torch.bfloat16, 40, {}, "attention_bias: q/k/v/o projections carry biases"),
    ("llama-headdim", LlamaForCausalLM, LlamaConfig, {"head_dim": 32},
     torch.bfloat16, 40, {}, "head_dim 32 != hidden/heads (16)"),
    ("mistral-window", MistralForCausalLM, MistralConfig, {"sliding_window": 8},
     torch.bfloat16, 40, {}, "Mistral, sliding_window 8 over a 40-token input"),
    ("qwen2", Qwen2ForCausalLM, Qwen2Config, {"use_sliding_window": False},
     torch.float32, 40, {}, "Qwen2: q/k/v biases"),
    ("qwen2-f16", Qwen2ForCausalLM, Qwen2Config, {"use_sliding_window": False},
     torch.float16, 40, {}, "Qwen2 with weights stored in float16"),
]

DTYPE_NAMES = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}


def build_config(cfg_cls, overrides):
    kw = dict(BASE)
    kw.update(overrides)
    rope = kw.pop("rope_scaling", None)
    theta = kw.pop("rope_theta", 10000.0)
    params = {"rope_type": "default", "rope_theta": theta}
    if rope is not None:
        params = dict(rope)
        params["rope_theta"] = theta
    cfg = cfg_cls(rope_parameters=params, **kw)
    cfg._attn_implementation = "eager"
    return cfg


@torch.no_grad()
def randomize(model, seed):
    """Weights of a useful scale: unit-ish activations, logits with a spread of a few units."""
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters(), key=lambda x: x[0]):
        if "norm" in name:
            v = 1.0 + 0.2 * torch.randn(p.shape, generator=g)
            if name == "model.norm.weight" and model.config.tie_word_embeddings:
                v = 4.0 * v  # logits of a few units despite the small tied embedding
        elif name.endswith(".bias"):
            v = 0.5 * torch.randn(p.shape, generator=g)
        elif "embed_tokens" in name:
            # Tied: a small embedding keeps the residual stream from being mostly the input
            # token's own embedding (greedy would just repeat the last token).
            std = 0.1 if model.config.tie_word_embeddings else 1.0
            v = std * torch.randn(p.shape, generator=g)
        else:
            gain = 1.5 if ("q_proj" in name or "k_proj" in name) else 1.0
            if name.startswith("lm_head"):
                gain = 3.0
            v = gain * torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1])
        p.copy_(v.to(p.dtype))


def write_f32(path, t):
    a = t.detach().to(torch.float32).contiguous().numpy().astype("<f4")
    with open(path, "wb") as f:
        f.write(a.tobytes())


@torch.no_grad()
def full_logits(model, ids):
    out = model(input_ids=torch.tensor([ids]), use_cache=False)
    return out.logits[0]


@torch.no_grad()
def chunked_logits(model, ids, chunk):
    past = None
    rows = []
    for i in range(0, len(ids), chunk):
        out = model(input_ids=torch.tensor([ids[i:i + chunk]]), past_key_values=past, use_cache=True)
        past = out.past_key_values
        rows.append(out.logits[0])
    return torch.cat(rows, 0)


@torch.no_grad()
def greedy(model, ids, n):
    out = model(input_ids=torch.tensor([ids]), use_cache=True)
    past = out.past_key_values
    logits = out.logits[0, -1]
    toks, margins = [], []
    for _ in range(n):
        top = torch.topk(logits, 2)
        t = int(top.indices[0])
        toks.append(t)
        margins.append(float(top.values[0] - top.values[1]))
        out = model(input_ids=torch.tensor([[t]]), past_key_values=past, use_cache=True)
        past = out.past_key_values
        logits = out.logits[0, -1]
    return toks, margins


def rel_l2(a, b):
    return float(torch.linalg.norm((a - b).double()) / torch.linalg.norm(b.double()))


def load_back(model_cls, d):
    m = model_cls.from_pretrained(d, dtype=torch.float32, attn_implementation="eager")
    m.eval()
    return m


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=DEFAULT_OUT)
    args = ap.parse_args()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    os.makedirs(args.out, exist_ok=True)

    summary = []
    for vi, (name, model_cls, cfg_cls, overrides, dtype, n_ids, save_kw, notes) in enumerate(VARIANTS):
        d = os.path.join(args.out, name)
        if os.path.isdir(d):
            shutil.rmtree(d)
        seed = 1000 + vi
        torch.manual_seed(seed)
        cfg = build_config(cfg_cls, overrides)
        model = model_cls(cfg)
        randomize(model, seed)
        model = model.to(dtype)
        model.eval()
        model.save_pretrained(d, **save_kw)

        g = torch.Generator().manual_seed(seed + 7)
        ids = [int(x) for x in torch.randint(3, cfg.vocab_size, (n_ids,), generator=g)]

        ref = load_back(model_cls, d)
        logits = full_logits(ref, ids)
        write_f32(os.path.join(d, "logits.f32"), logits)
        # transformers' own cached paths, each on a fresh copy (dynamic rope keeps state).
        chunk = chunked_logits(load_back(model_cls, d), ids, CHUNK)
        step = chunked_logits(load_back(model_cls, d), ids, 1)
        toks, margins = greedy(load_back(model_cls, d), ids, N_GREEDY)

        sorted_row = torch.sort(logits, dim=-1, descending=True).values
        row_margins = (sorted_row[:, 0] - sorted_row[:, 1]).tolist()
        entry = {
            "name": name,
            "notes": notes,
            "architecture": model_cls.__name__,
            "weights_dtype": DTYPE_NAMES[dtype],
            "ids": ids,
            "vocab_size": cfg.vocab_size,
            "logits_file": "logits.f32",
            "logits_std": float(logits.std()),
            "min_top2_margin_all_positions": min(row_margins),
            "greedy_ids": toks,
            "greedy_top2_margin": margins,
            "hf_chunk7_vs_full_rel_l2": rel_l2(chunk, logits),
            "hf_step_vs_full_rel_l2": rel_l2(step, logits),
            "transformers_version": transformers.__version__,
            "torch_version": torch.__version__.split("+")[0],
        }
        if name == "llama-dynamic":
            write_f32(os.path.join(d, "logits-chunk7.f32"), chunk)
            write_f32(os.path.join(d, "logits-step.f32"), step)
            entry["chunk"] = CHUNK
            entry["chunk_logits_file"] = "logits-chunk7.f32"
            entry["step_logits_file"] = "logits-step.f32"
        with open(os.path.join(d, "reference.json"), "w") as f:
            json.dump(entry, f, indent=1, sort_keys=True)
            f.write("\n")
        files = sorted(os.listdir(d))
        size = sum(os.path.getsize(os.path.join(d, x)) for x in files)
        summary.append(name)
        print(f"{name:22s} {size/1024:7.1f} KiB  logits std {entry['logits_std']:.2f}  "
              f"min greedy margin {min(margins):.3f}  min pos margin {min(row_margins):.4f}  "
              f"hf chunk/full {entry['hf_chunk7_vs_full_rel_l2']:.1e} step/full "
              f"{entry['hf_step_vs_full_rel_l2']:.1e}  files {files}", file=sys.stderr)
    total = 0
    for root, _, fs in os.walk(args.out):
        total += sum(os.path.getsize(os.path.join(root, x)) for x in fs)
    print(f"total {total/1024:.1f} KiB in {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
