"""`gemma-sae import-gemma-scope`: a published Gemma Scope SAE as one of ours, from Gemma
Scope 1 (Gemma 2: params.npz) or Gemma Scope 2 (Gemma 3: a folder of config.json and
params.safetensors).

    gemma-sae import-gemma-scope --params gs://bucket/layer_12/width_16k/params.npz \\
        --layer 12 --model-preset gs://bucket/presets/gemma2_2b_en --out gs://bucket/run/sae
    gemma-sae import-gemma-scope --params gs://bucket/resid_post/layer_9_width_16k_l0_small \\
        --layer 9 --model-preset data/gemma-3-270m-Q4_K_M.gguf --out runs/g3/sae

The SAE goes to <out>/<name> in the same format the train stage writes, and <out>/manifest.json
lists it the way a train manifest lists trained SAEs, so `gemma-sae report workdir=<run>`
(with `<out>` = `<run>/sae`) evaluates it and writes its steering vectors. Several imports into
one `<out>` accumulate; a directory holding a real training run is refused
(see sae.io.gemma_scope.import_sae).
"""

from __future__ import annotations

import argparse

from sae.io import gemma_scope


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gemma-sae import-gemma-scope",
        description="Import a Gemma Scope SAE (Gemma Scope 1 params.npz, or a Gemma Scope 2 "
        "folder of config.json and params.safetensors) for evaluation, reports and steering.",
    )
    parser.add_argument(
        "--params",
        required=True,
        help="params.npz, or a Gemma Scope 2 folder or its params.safetensors (local or gs://)",
    )
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
    gemma_scope.import_sae(
        args.params,
        args.layer,
        args.model_preset,
        args.out,
        name=args.name,
        model_name=args.model_name,
    )
