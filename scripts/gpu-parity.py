#!/usr/bin/env python3
"""Model-level parity of farsight with Hugging Face transformers on random-weight
Llama-3.1-8B-shaped models, run on the GPU machine (PyTorch + transformers installed there).

For each layer count in --layers: builds a LlamaForCausalLM with the Llama-3.1-8B config (full
width: hidden 4096, 32/8 heads, D 128, ffn 14336, vocab 128256, llama3 rope) and that many
layers, random bf16 weights (transformers' own initialisation, seeded), saves it as a Hugging
Face directory (bf16 safetensors + config.json; farsight needs no tokenizer for token ids),
then:

  1. transformers (bf16, SDPA) logits of every position of a random prompt, its greedy
     continuation (--steps tokens, with its KV cache), and the same in f32 (the weights upcast)
     as the high-precision reference;
  2. farsight `eval logits` (--device cuda) on the prompt with --steps greedy tokens, and again
     teacher-forced on prompt + transformers' greedy tokens;
  3. relative L2 of the logits (farsight vs transformers bf16, both vs f32), argmax agreement,
     greedy tokens identical, and at any disagreement the top-2 margin of the f32 reference.

With --sdpa-prefill N it also times transformers' prefill of N tokens (SDPA, bf16, full
32-layer model held in GPU memory only) for the comparison with `farsight bench dense`.

    python3 scripts/gpu-parity.py --bin .gpu/cuda2/farsight --work /tmp/gp --layers 2,4 \
        --out $OUT/gpu-parity.json
"""
import argparse
import gc
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch

LLAMA31_8B = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    rms_norm_eps=1e-5,
    max_position_embeddings=131072,
    tie_word_embeddings=False,
    bos_token_id=128000,
    eos_token_id=[128001, 128008, 128009],
    hidden_act="silu",
)
ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
SMALL = dict(hidden_size=256, intermediate_size=512, num_attention_heads=8, num_key_value_heads=2,
             vocab_size=1024)


def log(*a):
    print(*a, flush=True)


def config(layers, small):
    from transformers import LlamaConfig
    kw = dict(LLAMA31_8B)
    if small:
        kw.update(SMALL)
    cfg = LlamaConfig(num_hidden_layers=layers, **kw)
    # transformers 5 keeps rope settings in rope_parameters; 4.x in rope_theta/rope_scaling.
    if hasattr(cfg, "rope_parameters") and cfg.rope_parameters is not None:
        cfg.rope_parameters = dict(ROPE)
    else:
        cfg.rope_theta = ROPE["rope_theta"]
        cfg.rope_scaling = {k: v for k, v in ROPE.items() if k != "rope_theta"}
    return cfg


def build(layers, small, seed, device):
    from transformers import LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = config(layers, small)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    model = model.to(dtype=torch.bfloat16).eval()
    return model


@torch.no_grad()
def hf_run(model, prompt, steps, device):
    """All-position logits of the prompt (f32 copy), and greedy tokens with the KV cache."""
    ids = torch.tensor([prompt], device=device)
    out = model(ids, use_cache=True)
    logits = out.logits[0].float().cpu().numpy()
    past = out.past_key_values
    nxt = out.logits[0, -1].argmax().item()
    greedy = [nxt]
    for _ in range(steps - 1):
        out = model(torch.tensor([[nxt]], device=device), past_key_values=past, use_cache=True)
        past = out.past_key_values
        nxt = out.logits[0, -1].argmax().item()
        greedy.append(nxt)
    return logits, greedy


@torch.no_grad()
def hf_logits(model, seq, device):
    return model(torch.tensor([seq], device=device)).logits[0].float().cpu().numpy()


def rel_l2(a, b):
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def ours(args, mdir, seq, greedy, tag):
    tok = os.path.join(args.work, f"{tag}.tokens")
    out = os.path.join(args.work, f"{tag}.json")
    with open(tok, "w") as f:
        f.write(" ".join(map(str, seq)))
    cmd = [args.bin, "eval", "logits", "--model", mdir, "--device", args.device, "--kv-dtype",
           args.kv_dtype, "--tokens", tok, "--out", out, "--greedy", str(greedy), "--chunk",
           str(args.chunk)]
    t = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        log(r.stdout, r.stderr)
        raise SystemExit(f"farsight failed: {' '.join(cmd)}")
    meta = json.load(open(out))
    lg = np.fromfile(meta["logits_file"], dtype="<f4").reshape(meta["logits_shape"])
    log(f"  farsight {tag}: {time.time() - t:.1f} s ({r.stderr.strip().splitlines()[-1]})")
    return lg, meta


def margin(row, tok):
    """Top-1 minus the logit of `tok` (0 when tok is the top), and top-1 minus top-2."""
    s = np.sort(row)[::-1]
    return float(s[0] - row[tok]), float(s[0] - s[1])


def one(args, layers):
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    mdir = os.path.join(args.work, f"llama31-8b-shape-{layers}l" + ("-small" if args.small else ""))
    t = time.time()
    model = build(layers, args.small, args.seed + layers, dev)
    model.save_pretrained(mdir, safe_serialization=True)
    nbytes = sum(os.path.getsize(os.path.join(mdir, f)) for f in os.listdir(mdir))
    log(f"{layers} layers: built and saved {nbytes / 1e9:.2f} GB in {time.time() - t:.1f} s -> {mdir}")
    rng = np.random.default_rng(args.seed)
    vocab = model.config.vocab_size
    prompt = [int(x) for x in rng.integers(0, vocab, args.prompt)]
    # The references load the saved directory, as users do: a model cast in memory with .to()
    # would also round its RoPE inv_freq buffer to bf16 (computed in f32 at load otherwise).
    del model
    from transformers import LlamaForCausalLM
    model = LlamaForCausalLM.from_pretrained(mdir, dtype=torch.bfloat16).to(dev).eval()
    hf_bf16, hf_greedy = hf_run(model, prompt, args.steps, dev)
    seq = prompt + hf_greedy
    hf_seq_bf16 = hf_logits(model, seq, dev)
    del model
    model = LlamaForCausalLM.from_pretrained(mdir, dtype=torch.float32).to(dev).eval()
    hf_f32, hf32_greedy = hf_run(model, prompt, args.steps, dev)
    hf_seq_f32 = hf_logits(model, seq, dev)
    del model
    gc.collect()
    if dev == "cuda":
        torch.cuda.empty_cache()

    our_p, meta_p = ours(args, mdir, prompt, args.steps, f"{layers}l-prompt")
    our_s, _ = ours(args, mdir, seq, 0, f"{layers}l-seq")
    our_greedy = meta_p["greedy"]
    P = len(prompt)
    def prefix(a, b):
        n = 0
        for x, y in zip(a, b):
            if x != y:
                break
            n += 1
        return n
    same = prefix(our_greedy, hf_greedy)
    # Teacher-forced on prompt + transformers' greedy tokens: does farsight pick each of them?
    picks = []
    for i in range(args.steps):
        pos = P - 1 + i  # the logits at pos predict seq[pos + 1] = hf_greedy[i]
        want = hf_greedy[i]
        got = int(np.argmax(our_s[pos]))
        if got != want:
            gap_ref, top2 = margin(hf_seq_f32[pos], want)
            picks.append({"step": i, "farsight": got, "transformers": want,
                          "f32_ref_top": int(np.argmax(hf_seq_f32[pos])),
                          "f32_ref_top1_minus_top2": top2,
                          "f32_ref_logit_gap_transformers_choice": gap_ref})
    arg_prompt = float(np.mean(np.argmax(our_p, 1) == np.argmax(hf_bf16, 1)))
    res = {
        "layers": layers,
        "small": args.small,
        "checkpoint_bytes": nbytes,
        "prompt_tokens": P,
        "steps": args.steps,
        "chunk": args.chunk,
        "kv_dtype": args.kv_dtype,
        "device": meta_p["device"],
        "rel_l2_prompt_farsight_vs_hf_bf16": rel_l2(our_p, hf_bf16),
        "rel_l2_prompt_farsight_vs_hf_f32": rel_l2(our_p, hf_f32),
        "rel_l2_prompt_hf_bf16_vs_hf_f32": rel_l2(hf_bf16, hf_f32),
        "rel_l2_seq_farsight_vs_hf_bf16": rel_l2(our_s, hf_seq_bf16),
        "rel_l2_seq_farsight_vs_hf_f32": rel_l2(our_s, hf_seq_f32),
        "rel_l2_seq_hf_bf16_vs_hf_f32": rel_l2(hf_seq_bf16, hf_seq_f32),
        "argmax_agreement_prompt": arg_prompt,
        "greedy_farsight": our_greedy,
        "greedy_hf_bf16": hf_greedy,
        "greedy_hf_f32": hf32_greedy,
        "greedy_identical_steps": same,
        "greedy_identical": same == args.steps,
        "greedy_identical_steps_vs_hf_f32": prefix(our_greedy, hf32_greedy),
        "greedy_identical_steps_hf_bf16_vs_hf_f32": prefix(hf_greedy, hf32_greedy),
        "greedy_hf_bf16_vs_f32_identical": hf_greedy == hf32_greedy,
        "teacher_forced_disagreements": picks,
    }
    log(f"  rel L2 prompt logits: farsight vs transformers bf16 {res['rel_l2_prompt_farsight_vs_hf_bf16']:.3e}, "
        f"farsight vs f32 {res['rel_l2_prompt_farsight_vs_hf_f32']:.3e}, transformers bf16 vs f32 "
        f"{res['rel_l2_prompt_hf_bf16_vs_hf_f32']:.3e}; argmax agreement {arg_prompt:.3f}")
    log(f"  greedy: {same}/{args.steps} identical to transformers bf16, "
        f"{res['greedy_identical_steps_vs_hf_f32']}/{args.steps} to transformers f32 "
        f"(transformers bf16 vs f32 identical: {res['greedy_hf_bf16_vs_f32_identical']}); "
        f"teacher-forced disagreements: {len(picks)}")
    if not args.keep:
        subprocess.run(["rm", "-rf", mdir])
    return res


@torch.no_grad()
def sdpa_prefill(args):
    dev = "cuda"
    t = time.time()
    model = build(32, False, args.seed, dev)
    model.config._attn_implementation = "sdpa"
    log(f"sdpa prefill: 32-layer model built in {time.time() - t:.1f} s, "
        f"attention {model.config._attn_implementation}")
    rng = np.random.default_rng(1)
    res = []
    for n in [4096] + [args.sdpa_prefill] * (1 + args.sdpa_repeats):
        ids = torch.tensor([rng.integers(0, model.config.vocab_size, n).tolist()], device=dev)
        torch.cuda.synchronize()
        t = time.time()
        model(ids, use_cache=True, logits_to_keep=1)
        torch.cuda.synchronize()
        s = time.time() - t
        log(f"  transformers prefill {n} tokens: {s:.3f} s, {n / s:.0f} tok/s")
        res.append({"tokens": n, "seconds": s, "tok_s": n / s})
    del model
    gc.collect()
    torch.cuda.empty_cache()
    # The first run of each length is a warm-up.
    timed = [r for r in res[2:]]
    return {"runs": res, "timed": timed,
            "median_tok_s": float(np.median([r["tok_s"] for r in timed])) if timed else None}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True, help="the farsight binary")
    ap.add_argument("--work", default="/tmp/gpu-parity")
    ap.add_argument("--layers", default="2,4")
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--kv-dtype", default="bf16")
    ap.add_argument("--small", action="store_true", help="narrow shapes (a CPU smoke test)")
    ap.add_argument("--keep", action="store_true", help="keep the model directories")
    ap.add_argument("--sdpa-prefill", type=int, default=0)
    ap.add_argument("--sdpa-repeats", type=int, default=2)
    ap.add_argument("--out")
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)
    import transformers
    info = {"torch": torch.__version__, "transformers": transformers.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    log(json.dumps(info))
    results = {"info": info, "models": []}
    for layers in [int(x) for x in args.layers.split(",") if x]:
        results["models"].append(one(args, layers))
        if args.out:
            json.dump(results, open(args.out, "w"), indent=1)
    if args.sdpa_prefill:
        results["sdpa_prefill"] = sdpa_prefill(args)
    if args.out:
        json.dump(results, open(args.out, "w"), indent=1)
    ok = all(m["greedy_identical"] for m in results["models"])
    log("greedy identical in every model" if ok else "greedy differs somewhere (see the margins)")


if __name__ == "__main__":
    sys.exit(main())
