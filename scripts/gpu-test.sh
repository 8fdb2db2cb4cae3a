#!/usr/bin/env bash
# Builds the CUDA parity tests here (no CUDA needed to build) and stages them for the lent GPU.
#
#   scripts/gpu-test.sh [DEST]     DEST defaults to <repo root>/.gpu (ignored by git)
#
# The device tool copies the session's main checkout, so when working in another worktree pass
# the main checkout's .gpu (e.g. /work/main/.gpu) and name `.gpu` in the call's `carry`.
# On the GPU machine: `bash .gpu/run-tests.sh [TEST FILTER]` (CUDA's lib64 is put on
# LD_LIBRARY_PATH; the log also goes to $OUT/parity.log when $OUT is set), and
# `bash .gpu/run-tests.sh --timing` for the rough kernel timings (cuda_timing.rs). Also staged:
# the stripped release `farsight` (e.g. `.gpu/farsight bench dense --shape llama-3.1-8b --device
# cuda ...`) and scripts/gpu-parity.py (`python3 .gpu/gpu-parity.py --bin .gpu/farsight ...`);
# see BENCHMARKS.md for the exact commands behind each figure. `bash .gpu/run-row-cache.sh`: the
# row cache's and the page selection's tests and their 256K bench (issue 5); `bash
# .gpu/run-gemv.sh`: the batch-1 GEMV kernels.
set -euo pipefail
root=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
dest=${1:-$root/.gpu}
cd "$root"

log=$(cargo test -p farsight-kernels --release --no-run 2>&1) || { echo "$log"; exit 1; }
mkdir -p "$dest"
for t in cuda_parity cuda_attention cuda_sample cuda_forward cuda_timing cuda_sparse cuda_labels cuda_residency; do
    bin=$(echo "$log" | grep -o "target/release/deps/$t-[0-9a-f]*" | tail -1)
    [ -n "$bin" ] || { echo "$log"; echo "no $t test binary found" >&2; exit 1; }
    cp "$bin" "$dest/$t"
    strip --strip-debug "$dest/$t" 2>/dev/null || true
done
# The offloaded store's tests live in the root package (they need the engine).
log=$(cargo test --release --test cuda_offload --no-run 2>&1) || { echo "$log"; exit 1; }
bin=$(echo "$log" | grep -o "target/release/deps/cuda_offload-[0-9a-f]*" | tail -1)
[ -n "$bin" ] || { echo "$log"; echo "no cuda_offload test binary found" >&2; exit 1; }
cp "$bin" "$dest/cuda_offload"
strip --strip-debug "$dest/cuda_offload" 2>/dev/null || true
# The release binary (bench dense, eval logits) and the transformers parity script, when built.
if cargo build --release --bin farsight >/dev/null 2>&1; then
    cp target/release/farsight "$dest/farsight" && strip "$dest/farsight" 2>/dev/null || true
fi
cp scripts/gpu-parity.py "$dest/"
cat > "$dest/run-tests.sh" <<'RUN'
#!/usr/bin/env bash
# Runs the CUDA parity tests on the GPU machine. Arguments go to the test binary (a filter).
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
export LD_LIBRARY_PATH=/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export XDG_CACHE_HOME=${XDG_CACHE_HOME:-/tmp/farsight-cache}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
if [ "${1:-}" = "--timing" ]; then
    shift
    "$here/cuda_timing" --ignored --nocapture "$@" 2>&1 | tee ${OUT:+$OUT/timing.log}
    exit "${PIPESTATUS[0]}"
fi
logf=${OUT:+$OUT/parity.log}
logf=${logf:-/tmp/parity.log}
: > "$logf"
rc=0
# A filter argument applies to the three op-parity binaries.
for t in cuda_parity cuda_attention cuda_sample; do
    "$here/$t" --nocapture "$@" 2>&1 | tee -a "$logf"
    [ "${PIPESTATUS[0]}" = 0 ] || rc=1
done
"$here/cuda_forward" --nocapture 2>&1 | tee -a "$logf"
[ "${PIPESTATUS[0]}" = 0 ] || rc=1
"$here/cuda_sparse" --nocapture 2>&1 | tee -a "$logf"
[ "${PIPESTATUS[0]}" = 0 ] || rc=1
"$here/cuda_labels" --nocapture 2>&1 | tee -a "$logf"
[ "${PIPESTATUS[0]}" = 0 ] || rc=1
"$here/cuda_residency" --nocapture 2>&1 | tee -a "$logf"
[ "${PIPESTATUS[0]}" = 0 ] || rc=1
"$here/cuda_offload" --nocapture --test-threads 1 2>&1 | tee -a "$logf"
[ "${PIPESTATUS[0]}" = 0 ] || rc=1
echo "== summary: $(grep -c '^parity ' "$logf" 2>/dev/null) parity lines (full log: parity.log)"
grep -E '^test result|FAILED|panicked' "$logf" 2>/dev/null | head -40
ls "$XDG_CACHE_HOME/farsight/ptx" 2>/dev/null | sed 's/^/ptx cache: /'
exit $rc
RUN
chmod +x "$dest/run-tests.sh"
# The row-cache and page measurement (issue 5): their tests first (cuda_residency, cuda_offload
# with its pages.rs), then 256K at 1/64 with row caches of 1 and 4 times the top-k, token-level
# and with pages of 4, in one bench run (same machine).
cat > "$dest/run-row-cache.sh" <<'RUN'
#!/usr/bin/env bash
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
export LD_LIBRARY_PATH=/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export XDG_CACHE_HOME=${XDG_CACHE_HOME:-/tmp/farsight-cache}
out=${OUT:-/tmp}
rc=0
"$here/cuda_residency" --nocapture 2>&1 | tee "$out/row-cache-tests.log"
[ "${PIPESTATUS[0]}" = 0 ] || rc=1
"$here/cuda_offload" --nocapture --test-threads 1 2>&1 | tee -a "$out/row-cache-tests.log"
[ "${PIPESTATUS[0]}" = 0 ] || rc=1
[ $rc = 0 ] || echo "row-cache tests FAILED (benches still run, each under a time limit)"
# Token-level and page-granular selection (pages of 4: 2-KiB fetch units), each with the
# plain and the 4x row cache, in one run (two filled contexts).
timeout 330 "$here/farsight" bench offload --context 256k --token-budget 1/64 --query-bias 6 \
    --label-bits 4 --row-cache 1,4 --page-tokens 1,4 --gather-blocks 32 --steps 12 --warmup 4 \
    --recall-steps 2 --json "$out/row-cache.json" 2>&1 | tee "$out/row-cache.log"
[ "${PIPESTATUS[0]}" = 0 ] || rc=1
# The disk tier behind the GPU row cache (fewer rows read from the file per step).
timeout 120 "$here/farsight" bench offload --kv-store disk:/tmp --context 32k --token-budget 1/64 \
    --query-bias 6 --row-cache 1,4 --steps 8 --warmup 2 --no-reference \
    --json "$out/row-cache-disk.json" 2>&1 | tee "$out/row-cache-disk.log"
[ "${PIPESTATUS[0]}" = 0 ] || rc=1
exit $rc
RUN
chmod +x "$dest/run-row-cache.sh"
# The batch-1 GEMV kernels: bit-identity test, then the dense 8K step with each (same machine).
cat > "$dest/run-gemv.sh" <<'RUN'
#!/usr/bin/env bash
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
export LD_LIBRARY_PATH=/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export XDG_CACHE_HOME=${XDG_CACHE_HOME:-/tmp/farsight-cache}
"$here/cuda_parity" --nocapture batch1_gemv 2>&1 | grep -E "gemv1|test result|panicked|FAIL"
for g in l8 persist l8 persist; do
    echo "== FARSIGHT_GEMV=$g"
    FARSIGHT_GEMV=$g "$here/farsight" bench dense --shape llama-3.1-8b --device cuda \
        --kv-dtype bf16 --context 8k --steps 10 --prefill-context 0 2>&1 | tail -4
done
RUN
chmod +x "$dest/run-gemv.sh"
du -sh "$dest"
rel=$(realpath --relative-to="$(dirname "$dest")" "$dest")
echo
echo "staged $(du -h "$dest/cuda_parity" | cut -f1) test binary in $dest"
echo "device call: run(command=\"bash $rel/run-tests.sh\", carry=[\"$rel\"])"
