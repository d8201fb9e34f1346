"""`gemma-sae export-transformers`: a model preset in Hugging Face transformers' format, so the
tools that compute circuits from a model (circuit-tracer, Neuronpedia's graphs) run the model
our dictionaries were trained on (sae.model.hf_export).

    gemma-sae export-transformers --preset runs/local/model --out exports/tiny-gemma-hf

Gemma 2 settings (a GemmaBackbone with post-norms) become Gemma2ForCausalLM, Gemma 3
Gemma3ForCausalLM; the tokenizer gives the same ids as ours. The directory is local:
`AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")` reads it.
"""

from __future__ import annotations

import argparse

from sae.errors import InputError
from sae.io import model_sources, storage
from sae.model import hf_export
from sae.progress import log


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gemma-sae export-transformers",
        description="Write a model preset in Hugging Face transformers' format.",
    )
    parser.add_argument(
        "--preset", required=True, help="any model source model.preset accepts (a preset dir, ...)"
    )
    parser.add_argument("--out", required=True, help="a local directory to write")
    return parser


def main(argv: list[str]) -> None:
    args = _parser().parse_args(argv)
    if storage.is_gcs(args.out):
        raise InputError(f"--out must be a local directory, got {args.out}")
    preset = model_sources.resolve(args.preset)
    if not storage.exists(storage.join(preset, "config.json")):
        raise InputError(f"--preset: no keras-hub preset at {args.preset}")
    written = hf_export.export(preset, args.out)
    log("export-transformers", f"wrote {len(written)} files under {args.out}")
