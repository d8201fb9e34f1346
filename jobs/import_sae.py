"""`gemma-sae import-gemma-scope`: a published Gemma Scope SAE (params.npz) as one of ours.

    gemma-sae import-gemma-scope --params gs://bucket/layer_12/width_16k/params.npz \\
        --layer 12 --model-preset gs://bucket/presets/gemma2_2b_en --out gs://bucket/run/sae

The SAE goes to <out>/<name> in the same format the train stage writes, and <out>/manifest.json
lists it the way a train manifest lists trained SAEs, so `gemma-sae report workdir=<run>`
(with `<out>` = `<run>/sae`) evaluates it and writes its steering vectors. Several imports into
one `<out>` accumulate; a directory holding a real training run is refused.
"""

from __future__ import annotations

import argparse
from typing import Any

from sae.errors import InputError
from sae.io import gemma_scope, manifest, storage
from sae.progress import log

STAGE = "train"  # what the report stage reads SAEs from


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gemma-sae import-gemma-scope",
        description="Import a Gemma Scope SAE (params.npz) for evaluation, reports and steering.",
    )
    parser.add_argument("--params", required=True, help="params.npz, a local path or gs:// URI")
    parser.add_argument("--layer", required=True, type=int, help="residual-stream layer it reads")
    parser.add_argument("--model-preset", required=True, help="keras-hub preset of the model")
    parser.add_argument("--out", required=True, help="SAE directory, e.g. <workdir>/sae")
    parser.add_argument("--name", default="", help="SAE name (default gemma-scope-L<n>-<width>)")
    parser.add_argument(
        "--model-name",
        default="",
        help="TransformerLens model name for SAELens metadata (default: from the preset's shape)",
    )
    return parser


def main(argv: list[str]) -> None:
    args = _parser().parse_args(argv)
    request = gemma_scope.ImportRequest(
        params_uri=args.params,
        layer=args.layer,
        model_preset=args.model_preset,
        name=args.name,
        model_name=args.model_name,
    )
    run(request, args.out)


def run(request: gemma_scope.ImportRequest, out: str) -> None:
    """Check everything first; then the SAE's files, then the manifest (written last)."""
    prepared = gemma_scope.prepare(request)
    previous = _previous_imports(out, request.model_preset)
    storage.check_writable(out)
    files = gemma_scope.write(prepared, out)
    saes = {**previous.get("saes", {}), prepared.name: prepared.cfg}
    sources = {
        **previous.get("inputs", {}),
        prepared.name: prepared.cfg["imported_from"]["fingerprint"],
    }
    outputs = sorted(set(previous.get("outputs", [])) | set(files))
    config = {"import": {name: cfg["imported_from"]["uri"] for name, cfg in saes.items()}}
    counts = {"saes": len(saes), "steps": 0, "tokens": 0}
    extra = {"saes": saes, "imported": True}
    manifest.write(out, STAGE, config, sources, counts, outputs, extra)
    log("import", f"{prepared.name}: {prepared.cfg['d_in']}->{prepared.cfg['d_sae']} at {out}")


def _previous_imports(out: str, model_preset: str) -> dict[str, Any]:
    """The manifest of earlier imports into `out` (empty if none); refuses a training run's
    output, and SAEs of another model (the report evaluates them all on one model)."""
    found = manifest.read(out)
    if found is None:
        return {}
    if not found.get("imported"):
        raise InputError(f"{out} holds a {found.get('stage', 'stage')} output; import elsewhere")
    others = sorted(
        {str(cfg.get("model_preset")) for cfg in found.get("saes", {}).values()} - {model_preset}
    )
    if others:
        raise InputError(
            f"{out} holds SAEs of the model at {others[0]}, not {model_preset}; import elsewhere"
        )
    return found
