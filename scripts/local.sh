#!/usr/bin/env bash
# Set everything up, then run the whole local pipeline on the tiny demo model.
# Extra arguments are config overrides, e.g. `bash scripts/local.sh train.steps=100`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec "${GEMMA_SAE_VENV:-.venv}/bin/gemma-sae" pipeline --config configs/local.yaml "$@"
