"""`gemma-sae steer`: continue a prompt with and without an SAE feature's steering vector.

    gemma-sae steer --sae runs/local/sae/topk-L2-x8-k32 --feature 12 --strength 40 \\
        --prompt "The quick brown fox"
    gemma-sae steer --sae DIR --feature 12 --sweep 10,40,160 --prompt "..." --max-new-tokens 48

Parses the flags, loads the SAE and the config, and prints what `sae.analysis.steer.steer`
generates: one labelled block per strength, the unsteered continuation first.
"""

from __future__ import annotations

import argparse
import math

from sae.analysis.steer import steer
from sae.config import load as load_config
from sae.io.saelens import Sae
from sae.model.generation import Generation


def _strength(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"need a finite number, got {text!r}")
    return value


def _strengths(text: str) -> list[float]:
    values = [_strength(part) for part in text.split(",") if part.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"need one or more numbers, got {text!r}")
    return values


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gemma-sae steer",
        description="Generate from a prompt with and without an SAE feature's steering vector.",
    )
    parser.add_argument("--sae", required=True, help="trained SAE directory (cfg.json)")
    parser.add_argument("--feature", type=int, required=True, help="feature (latent) index")
    amount = parser.add_mutually_exclusive_group(required=True)
    amount.add_argument("--strength", type=_strength, help="the vector's norm, e.g. 40")
    amount.add_argument(
        "--sweep",
        type=_strengths,
        help="several strengths, e.g. 10,40,160 (--sweep=-40,40 with negatives)",
    )
    parser.add_argument("--layer", type=int, help="block to steer (default: the SAE's layer)")
    parser.add_argument(
        "--allow-layer-mismatch",
        action="store_true",
        help="steer at --layer even though the SAE was trained on another layer",
    )
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--top-k", type=int, default=0, help="sample from the k most likely")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (with --top-k)")
    parser.add_argument(
        "--model-preset",
        help="keras-hub Gemma preset (default: the config's model.preset, else the SAE's model)",
    )
    parser.add_argument("--config", "-c", help="pipeline YAML config (model preset and dtype)")
    return parser


def render(header: list[str], generations: list[Generation]) -> str:
    """The header lines, then one labelled, indented block per strength."""
    lines = list(header)
    for generation in generations:
        label = "unsteered" if generation.strength == 0 else f"strength {generation.strength:g}"
        text = generation.text or "(nothing before EOS)"
        lines += ["", f"--- {label} ---", *("  " + line for line in text.splitlines())]
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    args = _parser().parse_args(argv)
    config = load_config(args.config)
    sae = Sae.load(args.sae)
    preset = (
        args.model_preset or config.model.preset or sae.cfg.get("model_preset") or config.preset_uri
    )
    generations = steer(
        sae,
        args.feature,
        args.prompt,
        args.sweep if args.strength is None else [args.strength],
        model_preset=preset,
        layer=args.layer,
        max_new_tokens=args.max_new_tokens,
        top_k=args.top_k,
        seed=args.seed,
        allow_layer_mismatch=args.allow_layer_mismatch,
        dtype=config.model.dtype,
        sae_uri=args.sae,
    )
    # steer checked these: the layer given, else the SAE's.
    layer = args.layer if args.layer is not None else sae.layer
    where = f"decoder_block_{layer}"
    if sae.layer is not None and layer != sae.layer:
        where += f" (SAE trained on layer {sae.layer})"
    sampling = f"top-{args.top_k} sampling, seed {args.seed}" if args.top_k else "greedy"
    header = [
        f"model:   {preset}",
        f"SAE:     {args.sae} (feature {args.feature} of {sae.d_sae})",
        f"steered: {where}, {sampling}, {args.max_new_tokens} tokens",
        f"prompt:  {args.prompt}",
    ]
    print(render(header, generations))
