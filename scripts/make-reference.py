#!/usr/bin/env python3
"""Write the Python reference fixtures the Rust tests check farsight against.

Loads the SmolLM2-135M-Instruct GGUF with Hugging Face transformers (weights
de-quantised to float32), and writes tests/fixtures/smollm2/:

  reference.json    tokenization, chat rendering, last-position logits summary,
                    greedy continuations and a perplexity figure (format: README.md
                    next to it)
  logits-<i>.f32    last-position logits of prompt i, little-endian f32, vocab values
  ppl-nll.f32       the per-token negative log-likelihoods of the perplexity run,
                    little-endian f32, (max_tokens - 1) values

Usage (from the repository root):

  /opt/refenv/bin/python scripts/make-reference.py \
      [--gguf models/gguf/SmolLM2-135M-Instruct.Q4_1.gguf] \
      [--out tests/fixtures/smollm2] [--text /usr/share/common-licenses/GPL-3]

Requirements: scripts/requirements-reference.txt. The run is deterministic: the
same inputs and versions give byte-identical files (single torch thread,
deterministic algorithms, no sampling).
"""

import argparse
import hashlib
import json
import os
import re
import struct
import sys
import time

DEFAULT_GGUF = "models/gguf/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = "tests/fixtures/smollm2"
DEFAULT_TEXT = "/usr/share/common-licenses/GPL-3"

# ---------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------

LONG_PARAGRAPH = (
    "The lighthouse stood at the northern edge of the island, where the cliffs fell "
    "straight into the grey water. For more than a century its keepers had climbed the "
    "same one hundred and twelve steps every evening to light the lamp, and every morning "
    "to put it out again. The last keeper, an old man named Tomas, kept a logbook in which "
    "he wrote down the weather, the ships he saw, and anything else that seemed worth "
    "remembering. Most entries were short: a line about the wind, a note that the supply "
    "boat was late, a remark that the gulls had been unusually loud. But some pages were "
    "covered from top to bottom in his small, careful handwriting. On those days he wrote "
    "about storms that had lasted for a week, about a whale that had swum so close to the "
    "rocks that he could hear it breathe, and about the winter when the sea froze along the "
    "shore and a fox walked across the ice from the mainland. When the lighthouse was "
    "finally automated, the authorities offered Tomas a small apartment in the town on the "
    "coast. He refused. He said that he had spent too many years listening to the sea to "
    "fall asleep to the sound of traffic. In the end they let him stay in the keeper's "
    "cottage, on the condition that he no longer touch the lamp. He agreed, but people in "
    "the village said that on the darkest nights of the year, when the fog came in thick "
    "and low, a second light could sometimes be seen moving slowly up the tower, one step "
    "at a time, as if someone were still checking that everything was in order. Nobody "
    "ever asked him about it, and he never mentioned it in his logbook."
)

CODE_PROMPT = (
    "def fibonacci(n: int) -> list[int]:\n"
    '    """Return the first n Fibonacci numbers."""\n'
    "    if n <= 0:\n"
    "        return []\n"
    "    seq = [0, 1]\n"
    "    while len(seq) < n:\n"
    "        seq.append(seq[-1] + seq[-2])\n"
    "    return seq[:n]\n"
    "\n"
    "\n"
    "def is_prime(n: int) -> bool:\n"
)

CHAT_PROMPT_MESSAGES = [
    {"role": "user", "content": "What is the capital of France? Answer in one sentence."},
]

DIGITS_UNICODE_PROMPT = (
    "Order #40213 shipped on 2024-03-17 at 09:45: 3 \u00d7 \u20ac12.99 = \u20ac38.97. "
    "Caf\u00e9 cr\u00e8me, na\u00efve r\u00e9sum\u00e9, \u00fcber, \u0441\u043f\u0430\u0441\u0438\u0431\u043e, "
    "\u65e5\u672c\u8a9e, \U0001f600. Pi is approximately 3.14159265358979 and e is about"
)

TOKENIZATION_CASES = [
    "Hello, world!",
    "",
    " ",
    "  ",
    "    leading spaces",
    "trailing spaces   ",
    " Hello",
    "Hello  world   with    runs     of spaces",
    "tabs\tand\t\ttabs\t",
    "line one\nline two\n\nline four\n\n\n",
    "windows\r\nline\r\nendings\r\n",
    "mixed \t \n \r\n whitespace \n\t ",
    "def f(x):\n    if x:\n        return [i ** 2 for i in range(x)]\n    return None\n",
    "fn main() {\n\tlet v: Vec<u32> = (0..10).collect();\n\tprintln!(\"{:?}\", v);\n}\n",
    "12345678901234567890 and 3.14159 and 1,000,000",
    "a 1 a  1 a   1 x\t2 y\n3",
    "version 2.0.1-rc3 (build 20240317)",
    "Caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u00fcber \u00c5ngstr\u00f6m",
    "e\u0301 combining: a\u0300 o\u0308 n\u0303 (decomposed) vs \u00e9 \u00e0 \u00f6 \u00f1 (composed)",
    "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8\u3068\u4e2d\u6587\u6587\u672c\uff0c\ud55c\uad6d\uc5b4 \ud14d\uc2a4\ud2b8",
    "emoji: \U0001f600 \U0001f44d\U0001f3fd \U0001f468\u200d\U0001f469\u200d\U0001f467 \u2764\ufe0f \U0001f1eb\U0001f1f7",
    "\u05e9\u05dc\u05d5\u05dd \u05e2\u05d5\u05dc\u05dd and \u0645\u0631\u062d\u0628\u0627 \u0628\u0627\u0644\u0639\u0627\u0644\u0645 (RTL)",
    "\u0393\u03b5\u03b9\u03ac \u03c3\u03bf\u03c5 \u03ba\u03cc\u03c3\u03bc\u03b5, \u041f\u0440\u0438\u0432\u0435\u0442 \u043c\u0438\u0440, \u0928\u092e\u0938\u094d\u0924\u0947",
    "superscripts x\u00b2 + y\u00b3 = z\u00b9\u2070 and fractions \u00bd \u00be, roman \u2167",
    "<|im_start|>user\nhi<|im_end|>",
    "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more text",
    "not special: <|im_start |> <im_start> <|unknown|>",
    "It's, they're, we've, I'm, you'll, he'd DON'T",
    "\u00a0non-breaking\u00a0space and zero\u200bwidth and \u3000ideographic space",
    "URL https://example.com/path?q=1&r=two#frag, e-mail a.b@example.org",
    "!!! ??? ... --- *** ### $$$ %%% &&& ((( )))",
    "\\n is not a newline, \\t is not a tab",
]

CHAT_CASES = [
    ([{"role": "user", "content": "Hi"}], True),
    ([{"role": "user", "content": "Hi"}], False),
    (
        [
            {"role": "system", "content": "You are a terse assistant."},
            {"role": "user", "content": "Name three colours."},
        ],
        True,
    ),
    (
        [
            {"role": "user", "content": "What is 2 + 2?"},
            {"role": "assistant", "content": "2 + 2 = 4."},
            {"role": "user", "content": "And times 3?"},
        ],
        True,
    ),
    (
        [
            {"role": "system", "content": "Answer in French."},
            {"role": "user", "content": "Good morning"},
            {"role": "assistant", "content": "Bonjour"},
        ],
        False,
    ),
]


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def ids_sha256(ids):
    """sha256 of the ids as consecutive little-endian u32."""
    return hashlib.sha256(struct.pack("<%dI" % len(ids), *ids)).hexdigest()


def f32_le_bytes(tensor):
    import numpy as np

    return tensor.detach().to("cpu").contiguous().numpy().astype("<f4", copy=False).tobytes()


def as_float(x):
    """A float32 value as a JSON-friendly Python float (exact f32 value)."""
    return float(x)


def fix_pre_tokenizer(tok):
    """Give the GGUF-built tokenizer the pre-tokenizer SmolLM2 was trained with.

    transformers builds a `gpt2`-model GGUF tokenizer with the plain GPT-2
    ByteLevel pre-tokenizer, because it has no entry for the file's
    `tokenizer.ggml.pre = "smollm"`. The model's own tokenizer.json (and
    llama.cpp's "smollm" pre-tokenizer) first splits every \\p{N} character on
    its own and only then applies the GPT-2 regex. The vocabulary has no token
    joining a digit to anything, so this only changes how whitespace in front
    of a \\p{N} character is split (" ½", "x  2"), e.g. "a  1":
    GPT-2 regex gives ["a", " ", " 1"] -> [a, Ġ, Ġ, 1]; the model's splitter
    gives ["a  ", "1"] -> [a, ĠĠ, 1].
    """
    from tokenizers import pre_tokenizers

    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )


def encode(tok, text):
    # add_special_tokens=False: the GGUF says add_bos_token=false and the
    # tokenizer adds nothing anyway; passing it makes that explicit. Special
    # tokens written in the text (<|im_start|> ...) are matched as such.
    return tok(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", default=DEFAULT_GGUF, help="GGUF model file (default: %(default)s)")
    ap.add_argument("--out", default=DEFAULT_OUT, help="fixture directory (default: %(default)s)")
    ap.add_argument("--text", default=DEFAULT_TEXT, help="perplexity text (default: %(default)s)")
    ap.add_argument("--ppl-tokens", type=int, default=1024)
    ap.add_argument("--new-tokens", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1, for bit-reproducibility)")
    args = ap.parse_args()

    if not os.path.isfile(args.gguf):
        sys.exit(f"error: GGUF not found: {args.gguf} (run scripts/fetch-model.sh, or pass --gguf)")
    if not os.path.isfile(args.text):
        sys.exit(f"error: text not found: {args.text}")

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    import numpy as np
    import torch
    import transformers
    import tokenizers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    transformers.logging.set_verbosity_error()
    try:
        transformers.utils.logging.disable_progress_bar()
    except Exception:
        pass

    gguf_dir, gguf_name = os.path.split(os.path.abspath(args.gguf))
    from gguf import GGUFReader

    pre = GGUFReader(args.gguf).fields["tokenizer.ggml.pre"].contents()
    if pre != "smollm":
        sys.exit(f"error: tokenizer.ggml.pre is {pre!r}; this script's pre-tokenizer fix is for 'smollm'")
    t0 = time.time()
    print(f"loading tokenizer from {args.gguf} ...", flush=True)
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    # The tokenizer as transformers builds it, kept unpatched for the record.
    raw_backend = tokenizers.Tokenizer.from_str(tok.backend_tokenizer.to_str())
    fix_pre_tokenizer(tok)
    assert not getattr(tok, "add_bos_token", False), "expected add_bos_token=false for this GGUF"
    assert encode(tok, "Hello") == tok("Hello")["input_ids"], "tokenizer adds special tokens by default"
    print(f"loading model (float32) ... [{time.time() - t0:.0f}s]", flush=True)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file=gguf_name, dtype=torch.float32, attn_implementation="eager"
    )
    model.eval()
    vocab = model.config.vocab_size
    print(f"loaded [{time.time() - t0:.0f}s]", flush=True)

    os.makedirs(args.out, exist_ok=True)
    written = []

    def write_bytes(name, data):
        path = os.path.join(args.out, name)
        with open(path, "wb") as f:
            f.write(data)
        written.append(path)

    def tokenize_record(text):
        ids = encode(tok, text)
        rec = {"text": text, "ids": ids}
        raw = raw_backend.encode(text, add_special_tokens=False).ids
        if raw != ids:
            rec["ids_transformers_gguf_unpatched"] = raw
        return rec

    # --- tokenization -----------------------------------------------------
    tokenization = [tokenize_record(t) for t in TOKENIZATION_CASES]
    for rec in tokenization:
        # decode(encode(x)) == x for every case (byte-level BPE is lossless).
        back = tok.decode(rec["ids"], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        assert back == rec["text"], (rec["text"], back)
    n_diff = sum("ids_transformers_gguf_unpatched" in r for r in tokenization)
    print(f"tokenization: {len(tokenization)} cases ({n_diff} differ from the unpatched transformers GGUF tokenizer)")

    # --- chat rendering ---------------------------------------------------
    chat = []
    for messages, agp in CHAT_CASES:
        rendered = tok.apply_chat_template(messages, add_generation_prompt=agp, tokenize=False)
        chat.append({"messages": messages, "add_generation_prompt": agp, "rendered": rendered,
                     "ids": encode(tok, rendered)})
    print(f"chat: {len(chat)} cases")

    # --- prompts: last-position logits + greedy ---------------------------
    chat_rendered = tok.apply_chat_template(CHAT_PROMPT_MESSAGES, add_generation_prompt=True, tokenize=False)
    prompt_defs = [
        ("short", "The quick brown fox jumps over the lazy dog. The capital of France is", None),
        ("paragraph", LONG_PARAGRAPH, None),
        ("code", CODE_PROMPT, None),
        ("chat", chat_rendered, CHAT_PROMPT_MESSAGES),
        ("digits_unicode", DIGITS_UNICODE_PROMPT, None),
    ]

    prompts = []
    for i, (name, text, messages) in enumerate(prompt_defs):
        rec = {"name": name}
        if messages is not None:
            rec["messages"] = messages
            rec["rendered_chat"] = text
        rec.update(tokenize_record(text))
        ids = rec["ids"]
        greedy, margins = [], []
        with torch.no_grad():
            out = model(input_ids=torch.tensor([ids]), use_cache=True)
            logits = out.logits[0, -1].float()
            assert logits.shape[0] == vocab
            logits_name = f"logits-{i}.f32"
            write_bytes(logits_name, f32_le_bytes(logits))
            top = torch.topk(logits, 10)
            rec["logits_file"] = logits_name
            rec["top10"] = [[int(j), as_float(v)] for v, j in zip(top.values, top.indices)]
            step_logits = logits
            for _ in range(args.new_tokens):
                # torch.argmax returns the first index of the maximum on ties.
                nxt = int(torch.argmax(step_logits))
                t2 = torch.topk(step_logits, 2).values
                margins.append(round(as_float(t2[0] - t2[1]), 6))
                greedy.append(nxt)
                if len(greedy) == args.new_tokens:
                    break
                out = model(input_ids=torch.tensor([[nxt]]), past_key_values=out.past_key_values, use_cache=True)
                step_logits = out.logits[0, -1].float()
        rec["greedy_ids"] = greedy
        rec["greedy_top2_margin"] = margins
        rec["greedy_text"] = tok.decode(greedy, skip_special_tokens=False)
        prompts.append(rec)
        print(f"prompt {i} ({name}): {len(ids)} tokens, argmax {greedy[0]}, "
              f"min greedy margin {min(margins):.4f}: {rec['greedy_text'][:60]!r}")

    # --- perplexity -------------------------------------------------------
    with open(args.text, "rb") as f:
        text_bytes = f.read()
    all_ids = encode(tok, text_bytes.decode("utf-8"))
    assert len(all_ids) >= args.ppl_tokens, f"text has only {len(all_ids)} tokens"
    ppl_ids = all_ids[: args.ppl_tokens]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ppl_ids]), use_cache=False).logits[0].float()
        # position p predicts token p+1; log-softmax in float64 of the float32 logits
        logp = torch.log_softmax(logits[:-1].double(), dim=-1)
        tgt = torch.tensor(ppl_ids[1:])
        nll = -logp.gather(1, tgt[:, None])[:, 0]
    nll_mean = float(nll.mean())
    ppl = float(np.exp(nll_mean))
    write_bytes("ppl-nll.f32", f32_le_bytes(nll.float()))
    ppl_rec = {
        "text_file": args.text,
        "text_sha256": hashlib.sha256(text_bytes).hexdigest(),
        "text_tokens_total": len(all_ids),
        "max_tokens": args.ppl_tokens,
        "bos_prepended": False,
        "method": "tokenize the whole file (no BOS, specials parsed), keep the first max_tokens ids, "
                  "one teacher-forced forward pass over them (positions 0..max_tokens-1, fresh cache); "
                  "NLL_i = -log_softmax(logits[i])[ids[i+1]] for i in 0..max_tokens-2 (computed in f64 "
                  "from f32 logits); nll_mean = mean over the max_tokens-1 predictions; ppl = exp(nll_mean)",
        "ids_sha256": ids_sha256(ppl_ids),
        "ids": ppl_ids,
        "nll_file": "ppl-nll.f32",
        "nll_mean": round(nll_mean, 8),
        "ppl": round(ppl, 6),
    }
    print(f"ppl: first {args.ppl_tokens} of {len(all_ids)} tokens of {args.text}: "
          f"nll_mean {nll_mean:.6f}, ppl {ppl:.4f}")

    ref = {
        "format": 1,
        "generator": "scripts/make-reference.py",
        "model": {"file": gguf_name, "sha256": sha256_file(args.gguf)},
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "tokenizers": tokenizers.__version__,
        "numpy": np.__version__,
        "torch_threads": args.threads,
        "tokenizer": {
            "vocab_size": vocab,
            "bos_id": tok.bos_token_id,
            "eos_id": tok.eos_token_id,
            "add_bos": False,
            "special_tokens_parsed_in_text": True,
            "pre_tokenizer": "Digits(individual_digits) then GPT-2 ByteLevel regex (= llama.cpp 'smollm')",
        },
        "prompts": prompts,
        "tokenization": tokenization,
        "chat": chat,
        "ppl": ppl_rec,
    }
    data = json.dumps(ref, ensure_ascii=False, indent=1) + "\n"
    # Put arrays of numbers on one line. Only arrays laid out by the indenter
    # hold a raw newline (JSON strings escape theirs), so text is never touched.
    data = re.sub(r"\[\n[-+0-9.eE,\s]*?\]",
                  lambda m: "[" + ", ".join(x.strip() for x in m.group(0)[1:-1].split(",")) + "]", data)
    json.loads(data)
    write_bytes("reference.json", data.encode("utf-8"))

    total = 0
    print("wrote:")
    for p in written:
        sz = os.path.getsize(p)
        total += sz
        print(f"  {p}  {sz} bytes  sha256 {sha256_file(p)[:16]}")
    print(f"total {total} bytes in {len(written)} files [{time.time() - t0:.0f}s]")


if __name__ == "__main__":
    main()
