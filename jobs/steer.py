"""`gemma-sae steer`: continue a prompt with and without an SAE feature's steering vector.

    gemma-sae steer --sae runs/local/sae/topk-L2-x8-k32 --feature 12 --strength 40 \\
        --prompt "The quick brown fox"
    gemma-sae steer --sae DIR --feature 12 --sweep 10,40,160 --prompt "..." --max-new-tokens 48
    gemma-sae steer --config RUN.yaml --sae DIR --feature 12 --sweep 10,40,160 --evaluate \\
        --prompt "..." --prompt "..."

Parses the flags, loads the SAE and the config, and prints what `sae.analysis.steer.steer`
generates: one labelled block per strength, the unsteered continuation first. With
`--evaluate`, the steering evaluation instead (sae.analysis.steering_eval): the feature's
direction against DiffMean and a random direction at each strength, concept against cost on the
config's held-out split, as a table (and JSON with --json).
"""

from __future__ import annotations

import argparse
import math

from sae.analysis.steer import evaluate, render_generations, steer
from sae.analysis.steering_eval import render as render_evaluation
from sae.config import load as load_config
from sae.io import storage
from sae.io.saelens import Sae


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
    parser.add_argument("--prompt", required=True, action="append", help="repeat for several")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--top-k", type=int, default=0, help="sample from the k most likely")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (with --top-k)")
    parser.add_argument(
        "--model-preset",
        help="keras-hub Gemma preset (default: the config's model.preset, else the SAE's model)",
    )
    parser.add_argument("--config", "-c", help="pipeline YAML config (model preset and dtype)")
    evaluation = parser.add_argument_group("steering evaluation (--evaluate)")
    evaluation.add_argument("--evaluate", action="store_true", help="concept against cost")
    evaluation.add_argument("--cost-sequences", type=int, default=16, help="held-out sequences")
    evaluation.add_argument("--diffmean-tokens", type=int, default=20_000)
    evaluation.add_argument("--max-ce-increase", type=float, default=0.5, help="nats per token")
    evaluation.add_argument("--json", help="also write the evaluation here (a local or gs:// URI)")
    return parser


def main(argv: list[str]) -> None:
    args = _parser().parse_args(argv)
    config = load_config(args.config)
    sae = Sae.load(args.sae)
    preset = (
        args.model_preset or config.model.preset or sae.cfg.get("model_preset") or config.preset_uri
    )
    strengths = args.sweep if args.strength is None else [args.strength]
    common = {
        "model_preset": preset,
        "layer": args.layer,
        "dtype": config.model.dtype,
        "max_new_tokens": args.max_new_tokens,
        "top_k": args.top_k,
        "seed": args.seed,
        "allow_layer_mismatch": args.allow_layer_mismatch,
        "sae_uri": args.sae,
    }
    if not args.evaluate:
        for prompt in args.prompt:
            generations = steer(sae, args.feature, prompt, strengths, **common)
            print(render_generations(sae, args.feature, prompt, generations, **common))
        return
    evaluation = evaluate(
        sae,
        args.feature,
        strengths,
        args.prompt,
        config.tokens_uri,
        lm_batch_size=config.train.lm_batch_size,
        cost_sequences=args.cost_sequences,
        diffmean_tokens=args.diffmean_tokens,
        max_ce_increase=args.max_ce_increase,
        **common,
    )
    if args.json:
        storage.write_json(args.json, {"sae": args.sae, **evaluation.to_json()})
    print(render_evaluation(evaluation))
