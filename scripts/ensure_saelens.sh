#!/usr/bin/env bash
# The real SAELens (and torch, CPU build) in its own environment, .venv-saelens, so that
# tests/test_interop.py checks our exports against the library users load them with, not
# against our reading of it. Kept out of .venv: sae-lens pins transformers and torch. torch
# is asked for by version first: 2.13.0's CPU build lies on this kind of machine's disk,
# where a bare `torch` requirement pulls a CUDA build of several GB. Re-running is cheap.
set -euo pipefail
cd "$(dirname "$0")/.."

SAELENS_VERSION=6.54.12
TORCH_VERSION=2.13.0

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
VENV=${GEMMA_SAE_SAELENS_VENV:-.venv-saelens}
STAMP="$VENV/.installed-sae-lens-$SAELENS_VERSION-torch-$TORCH_VERSION"
if [ ! -f "$STAMP" ]; then
  echo "[setup] installing sae-lens $SAELENS_VERSION into $VENV (first run takes a few minutes)" >&2
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet "torch==$TORCH_VERSION"
  "$VENV/bin/python" -m pip install --quiet "sae-lens==$SAELENS_VERSION" "torch==$TORCH_VERSION"
  rm -f "$VENV"/.installed-*
  touch "$STAMP"
fi
