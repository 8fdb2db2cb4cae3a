#!/usr/bin/env bash
# `farsight batch` throughput at several batch sizes on the default model: documents per minute
# and generated tokens per second, median (min-max) of N runs each, into bench-out/batch.md.
#
# Usage: scripts/bench-batch.sh [--sizes 1,4,8] [--repeats 3] [--docs 16] [--new-tokens 48]
#   env: TEXT (default /usr/share/common-licenses/GPL-3), THREADS (default 0: all cores)
#
# The documents are the first DOCS paragraphs of TEXT that have 300-1500 characters (fixed for a
# given text), summarised (--task summarize, greedy) with at most NEW_TOKENS new tokens each;
# every run starts from an empty output file. Figures come from the closing line of each run.
set -euo pipefail
cd "$(dirname "$0")/.."

SIZES=1,4,8
REPEATS=3
DOCS=16
NEW_TOKENS=48
TEXT=${TEXT:-/usr/share/common-licenses/GPL-3}
THREADS=${THREADS:-0}
while [ $# -gt 0 ]; do
  case "$1" in
    --sizes) SIZES=$2; shift ;;
    --repeats) REPEATS=$2; shift ;;
    --docs) DOCS=$2; shift ;;
    --new-tokens) NEW_TOKENS=$2; shift ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) echo "bench-batch.sh: unknown argument: $1" >&2; exit 2 ;;
  esac
  shift
done

bash scripts/fetch-model.sh >/dev/null
cargo build --release --quiet
mkdir -p bench-out
docs=bench-out/batch-docs.jsonl
python3 - "$TEXT" "$DOCS" "$docs" <<'PY'
import json, re, sys
text, n, out = open(sys.argv[1]).read(), int(sys.argv[2]), sys.argv[3]
paras = [re.sub(r"\s+", " ", p).strip() for p in re.split(r"\n\s*\n", text)]
paras = [p for p in paras if 300 <= len(p) <= 1500][:n]
with open(out, "w") as f:
    for i, p in enumerate(paras):
        f.write(json.dumps({"id": f"p{i}", "text": p}) + "\n")
print(f"{len(paras)} documents, {sum(map(len, paras))} characters -> {out}", file=sys.stderr)
PY

results=bench-out/batch-runs.txt
: > "$results"
for b in ${SIZES//,/ }; do
  for r in $(seq 1 "$REPEATS"); do
    out=bench-out/batch-out-b$b.jsonl
    rm -f "$out"
    cmd=(target/release/farsight batch --input "$docs" --output "$out" --task summarize
         --max-new-tokens "$NEW_TOKENS" --batch-size "$b" --threads "$THREADS")
    line=$("${cmd[@]}" 2>&1 >/dev/null | grep '^batch:' | tail -1)
    echo "b=$b run=$r $line" | tee -a "$results"
  done
done

python3 - "$results" "$SIZES" "$REPEATS" "$DOCS" "$NEW_TOKENS" <<'PY' | tee bench-out/batch.md
import re, statistics, sys
path, sizes, repeats, docs, new = sys.argv[1:]
runs = {}
for line in open(path):
    m = re.match(r"b=(\d+) run=\d+ batch: (\d+) written .* (\d+) new tokens in ([\d.]+) s: ([\d.]+) tok/s, ([\d.]+) docs/min", line)
    if m:
        runs.setdefault(int(m[1]), []).append((float(m[6]), float(m[5]), int(m[3]), float(m[4])))
fmt = lambda xs: f"{statistics.median(xs):.1f} ({min(xs):.1f}-{max(xs):.1f})"
print(f"farsight batch, {docs} documents, --task summarize --max-new-tokens {new}, {repeats} runs each")
print()
print("| batch size | docs/min | tok/s (generated) | new tokens | wall s |")
print("|---|---|---|---|---|")
for b in sorted(runs):
    r = runs[b]
    print(f"| {b} | {fmt([x[0] for x in r])} | {fmt([x[1] for x in r])} | {r[0][2]} | {fmt([x[3] for x in r])} |")
PY
