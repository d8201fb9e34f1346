#!/usr/bin/env bash
# One command for an accelerator: the train-step, BatchTopK cut-off, TopK decode and extraction
# benchmarks at the issue's
# shapes on whatever device JAX sees, each JSON kept under $OUT (default bench-results/), then
# the markdown table docs/PERFORMANCE.md shows (bench/table.py). Every figure is also a ratio
# to a reference timed in the same run (five bare matmuls; the bare jitted forward).
#
#   bash bench/accelerator.sh                 # issue shapes, bf16 (an H100/H200 or a TPU)
#   SHAPES=small bash bench/accelerator.sh    # the same phases at CPU-sized shapes
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
OUT=${OUT:-bench-results}
SHAPES=${SHAPES:-issue}
DTYPE=${DTYPE:-bfloat16}
mkdir -p "$OUT"

# Dense bf16 peak of the device, for MFU (0: unknown, MFU left out).
PEAK=$("$PYTHON" - <<'PY'
import jax
kind = jax.devices()[0].device_kind.lower()
peaks = {"h100": 989, "h200": 989, "a100": 312, "v5 lite": 197, "v5e": 197, "v5p": 459, "v6": 918}
print(next((v for k, v in peaks.items() if k in kind), 0))
PY
)
if [ "$SHAPES" = "issue" ]; then
  TRAIN_SHAPES=issue EXTRACT_SHAPES=gemma2-2b
else
  TRAIN_SHAPES=small EXTRACT_SHAPES=small
fi
"$PYTHON" bench/train_step.py --shapes "$TRAIN_SHAPES" --dtype "$DTYPE" --peak-tflops "$PEAK" \
  > "$OUT/train_step.json"
"$PYTHON" bench/batch_cutoff.py --shapes "$TRAIN_SHAPES" > "$OUT/batch_cutoff.json"
"$PYTHON" bench/topk_decode.py --shapes "$TRAIN_SHAPES" --dtype "$DTYPE" > "$OUT/topk_decode.json"
"$PYTHON" bench/extract.py --shapes "$EXTRACT_SHAPES" --dtype "$DTYPE" > "$OUT/extract.json"
"$PYTHON" bench/table.py "$OUT/train_step.json" "$OUT/batch_cutoff.json" \
  "$OUT/topk_decode.json" "$OUT/extract.json" \
  | tee "$OUT/table.md"
