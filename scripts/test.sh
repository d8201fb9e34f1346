#!/usr/bin/env bash
# Set everything up, then run the linter and the whole test suite (the GCS emulator is
# started by the tests themselves). Extra arguments go to pytest, e.g. `-m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
bash scripts/ensure_checkov.sh
bash scripts/ensure_chromium.sh
bash scripts/ensure_podman.sh
bash scripts/ensure_gguf.sh
bash scripts/ensure_saelens.sh
VENV=${GEMMA_SAE_VENV:-.venv}
"$VENV/bin/ruff" check sae jobs tests bench scripts
"$VENV/bin/ruff" format --check sae jobs tests bench scripts
exec "$VENV/bin/pytest" "$@"
