"""`gemma-sae export-neuronpedia`: one SAE's report (features.json) in Neuronpedia's bulk
export format, so it can be browsed and shared there (sae.io.neuronpedia).

    gemma-sae export-neuronpedia --features runs/l12/report/topk-L12/features.json \\
        --out exports/ --model-id gemma-2-2b --source-set res-gemma-sae-16k \\
        --creator-id USER_ID --creator-name "My Lab"

Writes <out>/<model-id>/<layer>-<source-set>/ (features, activations and the model, release,
source set and source records). The report must have run with report.context_values (the
default): Neuronpedia shows every context token's activation.
"""

from __future__ import annotations

import argparse

from sae.errors import InputError
from sae.io import neuronpedia, presets, storage
from sae.progress import log


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gemma-sae export-neuronpedia",
        description="Write one SAE's report in Neuronpedia's bulk export format.",
    )
    parser.add_argument("--features", required=True, help="<workdir>/report/<sae>/features.json")
    parser.add_argument("--out", required=True, help="export directory (local or gs://)")
    parser.add_argument("--model-id", required=True, help="Neuronpedia model id, e.g. gemma-2-2b")
    parser.add_argument("--source-set", required=True, help="e.g. res-gemma-sae-16k")
    parser.add_argument("--creator-id", required=True, help="your Neuronpedia user id")
    parser.add_argument("--creator-name", required=True)
    parser.add_argument("--release", default="", help="release id (default: the source set)")
    parser.add_argument("--description", default="", help="source set description")
    parser.add_argument(
        "--model-layers", type=int, default=0, help="the model's layers (default: its preset's)"
    )
    return parser


def main(argv: list[str]) -> None:
    args = _parser().parse_args(argv)
    if not storage.exists(args.features):
        raise InputError(f"--features: no file at {args.features}")
    report = storage.read_json(args.features)
    run = report["run"]
    layers = args.model_layers or int(presets.backbone_config(run["model"])["num_layers"])
    names = neuronpedia.ExportNames(
        model_id=args.model_id,
        source_set=args.source_set,
        source_set_description=args.description
        or f"{run['architecture']} SAE, {run['d_sae']} latents, {run['layer']}",
        release=args.release or args.source_set,
        creator_id=args.creator_id,
        creator_name=args.creator_name,
        model_layers=layers,
    )
    written = neuronpedia.write_export(report, args.out, names)
    log("export-neuronpedia", f"wrote {len(written)} files under {args.out}")
