#!/usr/bin/env bash
# The test command: fetch the default model (scripts/fetch-model.sh, idempotent) and run every
# test of the workspace in release mode (the model tests run real forward passes).
# Extra arguments go to `cargo test` (e.g. `scripts/test.sh --test reference_parity`).
# The last line sums up every test binary's result: "N passed, N failed".
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/fetch-model.sh
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --release --workspace "$@" 2>&1 | tee "$log" || status=$?
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "%d passed, %d failed\n", p, f }' "$log"
exit "$status"
