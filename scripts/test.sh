#!/usr/bin/env bash
# The test command: fetch the default model (scripts/fetch-model.sh, idempotent) and run every
# test of the workspace in release mode (the model tests run real forward passes).
# Extra arguments go to `cargo test` (e.g. `scripts/test.sh --test reference_parity`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/fetch-model.sh
cargo test --release --workspace "$@"
