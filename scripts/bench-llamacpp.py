#!/usr/bin/env python3
"""llama.cpp CPU throughput baseline for farsight, through llama-cpp-python's
low-level (ctypes) API, so no Python-side sampling or bookkeeping is timed.

For each model (the given GGUF and, unless --no-f16, an F16 requantisation of
it, made once with llama_model_quantize and cached next to the input as
<name>.F16.gguf) and each context size N:

  * tokenize --text with llama.cpp's tokenizer (no BOS, specials parsed) and
    keep the first N tokens;
  * one untimed warm-up run, then --repeats timed runs, each on a fresh
    context (n_ctx = N + new tokens rounded up to 256, n_batch = n_ubatch =
    512, n_threads = n_threads_batch = --threads):
      prefill: llama_decode of the N tokens in batches of n_batch, logits only
               for the last token; timed from the first llama_decode call to
               the return of the last;
      decode:  --new-tokens greedy steps, each one llama_decode of a single
               token followed by an argmax over the logits (the argmax of the
               prefill logits is the first token fed);
  * report median/min/max of prefill tok/s (N / prefill s) and decode tok/s
    (new tokens / decode s).

Usage:
  .venv-bench/bin/python scripts/bench-llamacpp.py --gguf PATH --text FILE \
      --context 512,4096 --new-tokens 64 --threads 2 --repeats 3 --json OUT

  --check-reference tests/fixtures/smollm2/reference.json also compares
  llama.cpp against the transformers fixture (tokenization, last-position
  logits, greedy ids, perplexity) for the given GGUF, and reports it.
"""

import argparse
import ctypes
import datetime
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

import llama_cpp as L

DEFAULT_GGUF = "models/gguf/SmolLM2-135M-Instruct.Q4_1.gguf"

# Measured earlier on the 2-core dev machine (AMD EPYC, 2 threads), tok/s.
ANCHOR = {
    "F16": {512: (374.0, 54.9), 4096: (237.0, 33.8)},
    "Q4_1": {512: (200.0, 70.1), 4096: (131.0, 29.0)},
}

_log_cb = None


def quiet_logs():
    global _log_cb
    _log_cb = L.llama_log_callback(lambda level, text, user: None)
    L.llama_log_set(_log_cb, ctypes.c_void_p())


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def f16_path_for(gguf):
    d, name = os.path.split(gguf)
    stem = name[:-5] if name.endswith(".gguf") else name
    for q in (".Q4_1", ".Q4_0", ".Q8_0", ".Q4_K_M", ".Q5_K_M", ".Q6_K"):
        if stem.endswith(q):
            stem = stem[: -len(q)]
            break
    return os.path.join(d, stem + ".F16.gguf")


def make_f16(src, dst, threads):
    if os.path.isfile(dst) and os.path.getsize(dst) > 0 and os.path.getmtime(dst) >= os.path.getmtime(src):
        return dst
    print(f"requantising {src} -> {dst} (MOSTLY_F16) ...", flush=True)
    p = L.llama_model_quantize_default_params()
    p.nthread = threads
    p.ftype = L.LLAMA_FTYPE_MOSTLY_F16
    p.allow_requantize = True
    tmp = dst + ".tmp"
    rc = L.llama_model_quantize(src.encode(), tmp.encode(), ctypes.byref(p))
    if rc != 0:
        sys.exit(f"error: llama_model_quantize failed ({rc})")
    os.replace(tmp, dst)
    return dst


class Model:
    def __init__(self, path):
        mp = L.llama_model_default_params()
        mp.n_gpu_layers = 0
        self.ptr = L.llama_model_load_from_file(path.encode(), mp)
        if not self.ptr:
            sys.exit(f"error: cannot load {path}")
        self.vocab = L.llama_model_get_vocab(self.ptr)
        self.n_vocab = L.llama_vocab_n_tokens(self.vocab)
        buf = ctypes.create_string_buffer(256)
        L.llama_model_desc(self.ptr, buf, 256)
        self.desc = buf.value.decode()

    def tokenize(self, text, parse_special=True):
        data = text.encode("utf-8")
        cap = len(data) + 16
        arr = (L.llama_token * cap)()
        n = L.llama_tokenize(self.vocab, data, len(data), arr, cap, False, parse_special)
        if n < 0:
            sys.exit("error: tokenize buffer too small")
        return list(arr[:n])

    def context(self, n_ctx, n_batch, threads, flash_attn, n_outputs=None):
        cp = L.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_batch = n_batch
        cp.n_ubatch = n_batch
        cp.n_seq_max = 1
        cp.n_threads = threads
        cp.n_threads_batch = threads
        cp.flash_attn_type = {"auto": L.LLAMA_FLASH_ATTN_TYPE_AUTO, "on": L.LLAMA_FLASH_ATTN_TYPE_ENABLED,
                              "off": L.LLAMA_FLASH_ATTN_TYPE_DISABLED}[flash_attn]
        cp.no_perf = False
        ctx = L.llama_init_from_model(self.ptr, cp)
        if not ctx:
            sys.exit("error: cannot create context")
        return ctx

    def free(self):
        L.llama_model_free(self.ptr)


def logits_row(ctx, i, n_vocab):
    ptr = L.llama_get_logits_ith(ctx, i)
    return np.ctypeslib.as_array(ptr, shape=(n_vocab,))


def decode_chunked(ctx, tokens, n_batch):
    """llama_decode the tokens in order, n_batch at a time (logits for the last token of each call)."""
    for s in range(0, len(tokens), n_batch):
        chunk = tokens[s : s + n_batch]
        arr = (L.llama_token * len(chunk))(*chunk)
        rc = L.llama_decode(ctx, L.llama_batch_get_one(arr, len(chunk)))
        if rc != 0:
            sys.exit(f"error: llama_decode returned {rc}")


def one_run(model, prompt, new_tokens, n_batch, threads, flash_attn):
    n_ctx = ((len(prompt) + new_tokens + 255) // 256) * 256
    ctx = model.context(n_ctx, n_batch, threads, flash_attn)
    try:
        t0 = time.perf_counter()
        decode_chunked(ctx, prompt, n_batch)
        t1 = time.perf_counter()
        nxt = int(np.argmax(logits_row(ctx, -1, model.n_vocab)))
        one = (L.llama_token * 1)()
        out = []
        t2 = time.perf_counter()
        for _ in range(new_tokens):
            out.append(nxt)
            one[0] = nxt
            rc = L.llama_decode(ctx, L.llama_batch_get_one(one, 1))
            if rc != 0:
                sys.exit(f"error: llama_decode returned {rc}")
            nxt = int(np.argmax(logits_row(ctx, -1, model.n_vocab)))
        t3 = time.perf_counter()
        perf = L.llama_perf_context(ctx)
        return {
            "prefill_s": t1 - t0,
            "decode_s": t3 - t2,
            "llama_perf": {"t_p_eval_ms": perf.t_p_eval_ms, "n_p_eval": perf.n_p_eval,
                           "t_eval_ms": perf.t_eval_ms, "n_eval": perf.n_eval},
            "generated": out,
        }
    finally:
        L.llama_free(ctx)


def stats(xs):
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def bench_model(label, path, text_ids_for, contexts, args):
    model = Model(path)
    print(f"\n== {label}: {path} ({model.desc})", flush=True)
    ids = text_ids_for(model)
    runs = []
    for n in contexts:
        if len(ids) < n:
            sys.exit(f"error: the text has only {len(ids)} tokens, fewer than --context {n}")
        prompt = ids[:n]
        one_run(model, prompt, args.new_tokens, args.batch, args.threads, args.flash_attn)  # warm-up
        pre, dec, raw = [], [], []
        for r in range(args.repeats):
            res = one_run(model, prompt, args.new_tokens, args.batch, args.threads, args.flash_attn)
            pre.append(n / res["prefill_s"])
            dec.append(args.new_tokens / res["decode_s"])
            raw.append({"prefill_s": res["prefill_s"], "decode_s": res["decode_s"], "llama_perf": res["llama_perf"]})
        run = {
            "context": n,
            "new_tokens": args.new_tokens,
            "prefill_tok_s": stats(pre),
            "decode_tok_s": stats(dec),
            "first_generated_ids": res["generated"][:16],
            "repeats": raw,
        }
        runs.append(run)
        msg = (f"  ctx {n:5d}: prefill {run['prefill_tok_s']['median']:8.1f} tok/s "
               f"[{min(pre):.1f}..{max(pre):.1f}]   decode {run['decode_tok_s']['median']:6.1f} tok/s "
               f"[{min(dec):.1f}..{max(dec):.1f}]")
        anchor = ANCHOR.get(label, {}).get(n)
        if anchor:
            rp = run["prefill_tok_s"]["median"] / anchor[0]
            rd = run["decode_tok_s"]["median"] / anchor[1]
            flag = "" if 0.7 <= rp <= 1.3 and 0.7 <= rd <= 1.3 else "   <-- differs >30% from the anchor"
            msg += f"   (anchor {anchor[0]:.0f}/{anchor[1]:.1f}: x{rp:.2f}/x{rd:.2f}){flag}"
        print(msg, flush=True)
    model.free()
    return {"label": label, "gguf": os.path.basename(path), "desc": model.desc, "runs": runs}


# ---------------------------------------------------------------------------
# --check-reference
# ---------------------------------------------------------------------------


def check_reference(path, ref_path, args):
    ref = json.load(open(ref_path, encoding="utf-8"))
    fixture_dir = os.path.dirname(ref_path)
    model = Model(path)
    report = {"gguf": os.path.basename(path), "reference": ref_path}

    cases = [(c["text"], c["ids"]) for c in ref["tokenization"]]
    cases += [(p["text"], p["ids"]) for p in ref["prompts"]]
    cases += [(c["rendered"], c["ids"]) for c in ref["chat"]]
    mism = []
    for text, ids in cases:
        got = model.tokenize(text)
        if got != ids:
            mism.append({"text": text, "transformers": ids, "llama.cpp": got})
    ppl_ids = model.tokenize(open(ref["ppl"]["text_file"], encoding="utf-8").read())[: ref["ppl"]["max_tokens"]]
    ppl_tok_ok = ppl_ids == ref["ppl"]["ids"]
    report["tokenization"] = {"cases": len(cases), "mismatches": mism, "ppl_ids_equal": ppl_tok_ok}
    print(f"tokenization: {len(cases) - len(mism)}/{len(cases)} cases equal to the fixture; "
          f"ppl ids equal: {ppl_tok_ok}")
    for m in mism:
        print(f"  MISMATCH {m['text'][:60]!r}\n    transformers {m['transformers']}\n    llama.cpp    {m['llama.cpp']}")

    # Last-position logits and greedy ids of each prompt (fixture ids, fresh context).
    prompts = []
    for p in ref["prompts"]:
        ids = p["ids"]
        ctx = model.context(((len(ids) + len(p["greedy_ids"]) + 255) // 256) * 256, 512, args.threads, args.flash_attn)
        decode_chunked(ctx, ids, 512)
        got = logits_row(ctx, -1, model.n_vocab).copy()
        want = np.fromfile(os.path.join(fixture_dir, p["logits_file"]), dtype="<f4")
        greedy = []
        nxt = int(np.argmax(got))
        one = (L.llama_token * 1)()
        for _ in range(len(p["greedy_ids"])):
            greedy.append(nxt)
            one[0] = nxt
            L.llama_decode(ctx, L.llama_batch_get_one(one, 1))
            nxt = int(np.argmax(logits_row(ctx, -1, model.n_vocab)))
        L.llama_free(ctx)
        agree = next((i for i, (a, b) in enumerate(zip(greedy, p["greedy_ids"])) if a != b), len(greedy))
        rec = {"name": p["name"], "max_abs_diff": float(np.max(np.abs(got - want))),
               "rms_diff": float(np.sqrt(np.mean((got - want) ** 2))),
               "argmax_equal": int(np.argmax(got)) == int(np.argmax(want)),
               "greedy_prefix_equal": agree, "greedy_len": len(greedy)}
        prompts.append(rec)
        print(f"prompt {p['name']:15s}: logits max|d| {rec['max_abs_diff']:.4f} rms {rec['rms_diff']:.4f}, "
              f"argmax equal {rec['argmax_equal']}, greedy equal for {agree}/{len(greedy)} tokens")
    report["prompts"] = prompts

    # Perplexity over the fixture's ids, teacher-forced, the fixture's method.
    ids = ref["ppl"]["ids"]
    n = len(ids)
    ctx = model.context(((n + 255) // 256) * 256, 512, args.threads, args.flash_attn)
    batch = L.llama_batch_init(512, 0, 1)
    nll = []
    for s in range(0, n, 512):
        chunk = ids[s : s + 512]
        batch.n_tokens = len(chunk)
        for j, t in enumerate(chunk):
            batch.token[j] = t
            batch.pos[j] = s + j
            batch.n_seq_id[j] = 1
            batch.seq_id[j][0] = 0
            batch.logits[j] = 1
        if L.llama_decode(ctx, batch) != 0:
            sys.exit("error: llama_decode failed (ppl)")
        for j in range(len(chunk)):
            i = s + j
            if i + 1 >= n:
                break
            row = logits_row(ctx, j, model.n_vocab).astype(np.float64)
            m = row.max()
            nll.append(-(row[ids[i + 1]] - m - np.log(np.exp(row - m).sum())))
    L.llama_batch_free(batch)
    L.llama_free(ctx)
    nll_mean = float(np.mean(nll))
    report["ppl"] = {"nll_mean": nll_mean, "ppl": float(np.exp(nll_mean)),
                     "fixture_ppl": ref["ppl"]["ppl"], "n_predictions": len(nll)}
    print(f"ppl over the fixture's {n} ids: llama.cpp {np.exp(nll_mean):.4f} (nll {nll_mean:.6f}), "
          f"transformers {ref['ppl']['ppl']:.4f} (nll {ref['ppl']['nll_mean']:.6f})")
    model.free()
    return report


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", default=DEFAULT_GGUF)
    ap.add_argument("--text", default="/usr/share/common-licenses/GPL-3")
    ap.add_argument("--context", default="512,4096", help="comma-separated prompt lengths in tokens")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=512, help="n_batch = n_ubatch (default 512)")
    ap.add_argument("--flash-attn", choices=["auto", "on", "off"], default="auto",
                    help="llama.cpp flash attention (default: auto, llama.cpp's own default)")
    ap.add_argument("--no-f16", action="store_true", help="bench only the given GGUF")
    ap.add_argument("--f16-gguf", help="F16 GGUF to use/create (default: <input stem>.F16.gguf next to the input)")
    ap.add_argument("--check-reference", metavar="REFERENCE_JSON",
                    help="also compare llama.cpp with the transformers fixture (tokenization, logits, greedy, ppl)")
    ap.add_argument("--no-bench", action="store_true", help="skip the timing runs (with --check-reference)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()

    if not os.path.isfile(args.gguf):
        sys.exit(f"error: GGUF not found: {args.gguf} (run scripts/fetch-model.sh, or pass --gguf)")
    contexts = [int(x) for x in args.context.split(",") if x.strip()]
    L.llama_backend_init()
    quiet_logs()

    result = {
        "tool": "llama.cpp via llama-cpp-python " + getattr(L, "__version__", "?"),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": {"nproc": os.cpu_count(), "cpu": cpu_model(), "platform": platform.platform()},
        "system_info": L.llama_print_system_info().decode(errors="replace").strip(),
        "settings": {"threads": args.threads, "n_batch": args.batch, "n_ubatch": args.batch,
                     "flash_attn": args.flash_attn, "new_tokens": args.new_tokens, "repeats": args.repeats,
                     "warmup_runs": 1, "text": args.text, "bos": False},
        "models": [],
    }
    load = os.getloadavg()
    result["loadavg_start"] = load
    print(f"{result['tool']}, {result['machine']['cpu']}, nproc {result['machine']['nproc']}, "
          f"threads {args.threads}, load average {load[0]:.2f}", flush=True)
    if load[0] > 0.5:
        print(f"warning: load average {load[0]:.2f}: other work is running, the timings will be low", flush=True)

    if args.check_reference:
        result["reference_check"] = check_reference(args.gguf, args.check_reference, args)

    if not args.no_bench:
        text = open(args.text, encoding="utf-8").read()
        cache = {}

        def ids_for(model):
            # same vocabulary for all the variants; tokenize once
            if "ids" not in cache:
                cache["ids"] = model.tokenize(text)
            return cache["ids"]

        models = []
        if not args.no_f16:
            f16 = make_f16(args.gguf, args.f16_gguf or f16_path_for(args.gguf), args.threads)
            models.append(("F16", f16))
        base = os.path.basename(args.gguf)
        label = next((q for q in ("Q4_1", "Q4_0", "Q8_0", "F16", "F32") if q in base), "input")
        models.append((label, args.gguf))
        for label, path in models:
            result["models"].append(bench_model(label, path, ids_for, contexts, args))
        result["text_tokens"] = len(cache["ids"])

    result["loadavg_end"] = os.getloadavg()
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
