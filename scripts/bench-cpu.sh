#!/usr/bin/env bash
# CPU throughput: farsight vs llama.cpp (through llama-cpp-python), same model,
# same text, same context sizes. Writes bench-out/farsight-cpu.json,
# bench-out/llamacpp-cpu.json and bench-out/cpu-vs-llamacpp.md, and prints the table.
#
# Usage: scripts/bench-cpu.sh [--llamacpp-only] [--repeats N] [--context 512,4096] [--new-tokens 64]
#   env: GGUF (default models/gguf/SmolLM2-135M-Instruct.Q4_1.gguf), THREADS (default 2),
#        TEXT (default /usr/share/common-licenses/GPL-3), PYTHON (python3 used to make the venv)
#
# On first use it builds llama-cpp-python 0.3.36 from source into .venv-bench
# (GGML_NATIVE=ON, 2 jobs; about 30-45 minutes on 2 cores). The venv is rebuilt
# when the CPU it was built for differs from this one (native code).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)

LLAMACPP_ONLY=0
REPEATS=3
CONTEXT=512,4096
NEW_TOKENS=64
while [ $# -gt 0 ]; do
  case "$1" in
    --llamacpp-only) LLAMACPP_ONLY=1 ;;
    --repeats) REPEATS=$2; shift ;;
    --context) CONTEXT=$2; shift ;;
    --new-tokens) NEW_TOKENS=$2; shift ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "bench-cpu.sh: unknown argument: $1" >&2; exit 2 ;;
  esac
  shift
done

GGUF=${GGUF:-models/gguf/SmolLM2-135M-Instruct.Q4_1.gguf}
TEXT=${TEXT:-/usr/share/common-licenses/GPL-3}
THREADS=${THREADS:-2}
PYTHON=${PYTHON:-python3}
VENV=$ROOT/.venv-bench
LLAMA_CPP_PYTHON_VERSION=0.3.36
OUT=$ROOT/bench-out
mkdir -p "$OUT"

log() { echo "== $*" >&2; }

# --- 1. llama-cpp-python venv (idempotent) ---------------------------------
cpu_key() {
  { grep -m1 '^model name' /proc/cpuinfo || true; grep -m1 '^flags' /proc/cpuinfo || true; } | sha256sum | cut -c1-16
}
want_key="$LLAMA_CPP_PYTHON_VERSION-$(cpu_key)"
if [ -x "$VENV/bin/python" ] && [ "$(cat "$VENV/.farsight-bench-key" 2>/dev/null)" = "$want_key" ] \
   && "$VENV/bin/python" -c 'import llama_cpp, numpy' 2>/dev/null; then
  log "llama-cpp-python venv ready ($VENV)"
else
  log "building llama-cpp-python $LLAMA_CPP_PYTHON_VERSION into $VENV (GGML_NATIVE=ON, 2 jobs; this takes a while)"
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --upgrade pip
  # --no-cache-dir: never reuse a -march=native wheel built on another CPU.
  CMAKE_ARGS="-DGGML_NATIVE=ON" CMAKE_BUILD_PARALLEL_LEVEL=2 MAKEFLAGS=-j2 \
    "$VENV/bin/pip" install --no-cache-dir "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" numpy
  "$VENV/bin/python" -c 'import llama_cpp; print("llama_cpp", llama_cpp.__version__)'
  echo "$want_key" > "$VENV/.farsight-bench-key"
fi

# --- 2. model ----------------------------------------------------------------
if [ ! -f "$GGUF" ]; then
  if [ -x scripts/fetch-model.sh ] || [ -f scripts/fetch-model.sh ]; then
    log "fetching the model (scripts/fetch-model.sh)"
    bash scripts/fetch-model.sh
  fi
  [ -f "$GGUF" ] || { echo "bench-cpu.sh: model not found: $GGUF (scripts/fetch-model.sh did not provide it)" >&2; exit 1; }
fi

# --- 3. farsight -----------------------------------------------------------
FARSIGHT_JSON=$OUT/farsight-cpu.json
if [ "$LLAMACPP_ONLY" = 1 ]; then
  log "--llamacpp-only: skipping farsight"
  rm -f "$FARSIGHT_JSON"
else
  command -v cargo >/dev/null || { echo "bench-cpu.sh: cargo not found (or use --llamacpp-only)" >&2; exit 1; }
  log "cargo build --release"
  cargo build --release
  [ -x target/release/farsight ] || { echo "bench-cpu.sh: target/release/farsight was not built" >&2; exit 1; }
  log "farsight bench cpu"
  rm -f "$FARSIGHT_JSON"
  if ! target/release/farsight bench cpu --text "$TEXT" --context "$CONTEXT" --new-tokens "$NEW_TOKENS" \
        --repeats "$REPEATS" --json "$FARSIGHT_JSON"; then
    echo "bench-cpu.sh: 'farsight bench cpu' failed (does this build have the bench subcommand? use --llamacpp-only to skip it)" >&2
    exit 1
  fi
  [ -s "$FARSIGHT_JSON" ] || { echo "bench-cpu.sh: farsight wrote no $FARSIGHT_JSON" >&2; exit 1; }
fi

# --- 4. llama.cpp ----------------------------------------------------------
LLAMA_JSON=$OUT/llamacpp-cpu.json
log "llama.cpp bench (Q4_1 and F16 requantisation)"
"$VENV/bin/python" scripts/bench-llamacpp.py --gguf "$GGUF" --text "$TEXT" --context "$CONTEXT" \
  --new-tokens "$NEW_TOKENS" --threads "$THREADS" --repeats "$REPEATS" --json "$LLAMA_JSON"

# --- 5. table ----------------------------------------------------------------
MD=$OUT/cpu-vs-llamacpp.md
"$VENV/bin/python" - "$FARSIGHT_JSON" "$LLAMA_JSON" "$MD" "$THREADS" <<'PY'
import json, os, sys, datetime, platform, subprocess
fs_path, ll_path, md_path, threads = sys.argv[1:5]
ll = json.load(open(ll_path))
fs = json.load(open(fs_path)) if os.path.exists(fs_path) else None

def cpu():
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()

def runs_by_ctx(runs):
    return {int(r["context"]): r for r in runs}

fsr = runs_by_ctx(fs["runs"]) if fs else {}
llm = {m["label"]: runs_by_ctx(m["runs"]) for m in ll["models"]}
contexts = sorted(set(fsr) | {c for m in llm.values() for c in m})

def cell(runs, ctx, key):
    r = runs.get(ctx)
    if not r or key not in r:
        return "n/a", None
    s = r[key]
    return f"{s['median']:.1f} ({s['min']:.1f}-{s['max']:.1f})", s["median"]

def ratio(a, b):
    return f"{a / b:.2f}x" if a is not None and b else "n/a"

lines = []
lines.append("# farsight vs llama.cpp, CPU")
lines.append("")
lines.append(f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC} (llama.cpp run started {ll['date']})")
lines.append(f"- machine: {cpu()}, nproc {os.cpu_count()}, {platform.platform()}")
lines.append(f"- threads: {threads}; text: {ll['settings']['text']} (no BOS), first N tokens; "
             f"{ll['settings']['new_tokens']} greedy new tokens; {ll['settings']['repeats']} repeats after 1 warm-up")
lines.append(f"- llama.cpp: {ll['tool']}; n_batch {ll['settings']['n_batch']}, flash_attn {ll['settings']['flash_attn']}")
la, lb = ll.get("loadavg_start"), ll.get("loadavg_end")
if la and lb:
    lines.append(f"- 1-min load average around the llama.cpp run: {la[0]:.2f} at start, {lb[0]:.2f} at end"
                 + ("  (**machine was busy: timings are unreliable**)" if max(la[0], lb[0]) > os.cpu_count() + 0.5 else ""))
if fs:
    extra = {k: v for k, v in fs.items() if k != "runs" and not isinstance(v, (dict, list))}
    lines.append(f"- farsight: {json.dumps(extra)}" if extra else "- farsight: target/release/farsight bench cpu")
else:
    lines.append("- farsight: not run (--llamacpp-only)")
lines.append("")
lines.append("tok/s, median (min-max)")
lines.append("")
hdr = "| figure | farsight | llama.cpp F16 | llama.cpp Q4_1 | farsight / llama.cpp F16 | farsight / llama.cpp Q4_1 |"
lines.append(hdr)
lines.append("|" + "---|" * 6)
for key, name in (("prefill_tok_s", "prefill"), ("decode_tok_s", "decode")):
    for ctx in contexts:
        f, fm = cell(fsr, ctx, key)
        a, am = cell(llm.get("F16", {}), ctx, key)
        q, qm = cell(llm.get("Q4_1", {}), ctx, key)
        lines.append(f"| {name} @ {ctx} | {f} | {a} | {q} | {ratio(fm, am)} | {ratio(fm, qm)} |")
md = "\n".join(lines) + "\n"
open(md_path, "w").write(md)
print()
print(md)
print(f"(saved to {md_path})")
PY
