#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv with the pinned dependencies.
# Re-running is cheap: nothing is installed again unless pyproject.toml or the lock file changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
"$PYTHON" -c 'import sys; assert sys.version_info[:2] in ((3, 11), (3, 12)), sys.version' \
  || { echo "error: Python 3.11 or 3.12 is required" >&2; exit 2; }

VENV=${GEMMA_SAE_VENV:-.venv}
STAMP="$VENV/.installed-$(cat pyproject.toml requirements-lock.txt | sha256sum | cut -c1-16)"
if [ ! -f "$STAMP" ]; then
  echo "[setup] installing dependencies into $VENV (first run takes a few minutes)" >&2
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet -c requirements-lock.txt -e ".[test]"
  rm -f "$VENV"/.installed-*
  touch "$STAMP"
fi
