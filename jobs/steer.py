"""`gemma-sae steer`: continue a prompt with and without an SAE feature's steering vector.

    gemma-sae steer --sae runs/local/sae/topk-L2-x8-k32 --feature 12 --strength 40 \\
        --prompt "The quick brown fox"
    gemma-sae steer --sae DIR --feature 12 --sweep 10,40,160 --prompt "..." --max-new-tokens 48
    gemma-sae steer --config RUN.yaml --sae DIR --feature 12 --sweep 10,40,160 --evaluate \
        --prompt "..." --prompt "..."

Parses the flags, loads the SAE and the config, and prints what `sae.analysis.steer.steer`
generates: one labelled block per strength, the unsteered continuation first. With
`--evaluate`, the steering evaluation instead (sae.analysis.steering_eval): the feature's
direction against DiffMean and a random direction at each strength, concept against cost on the
config's held-out split, as a table (and JSON with --json).
"""

from __future__ import annotations

import argparse
import itertools
import math

from sae.analysis.steer import plan_steering, steer
from sae.analysis.steering_eval import evaluate_steering
from sae.analysis.steering_eval import render as render_evaluation
from sae.config import load as load_config
from sae.data.token_shards import iter_sequences
from sae.errors import ConfigError, InputError
from sae.io import manifest, storage
from sae.io.saelens import Sae
from sae.model.generation import Generation, SteeredGenerator
from sae.progress import log


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
    parser.add_argument(
        "--prompt", required=True, action="append", help="a prompt (repeat for several)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--top-k", type=int, default=0, help="sample from the k most likely")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (with --top-k)")
    parser.add_argument(
        "--model-preset",
        help="keras-hub Gemma preset (default: the config's model.preset, else the SAE's model)",
    )
    parser.add_argument("--config", "-c", help="pipeline YAML config (model preset and dtype)")
    evaluation = parser.add_argument_group("steering evaluation (--evaluate)")
    evaluation.add_argument(
        "--evaluate",
        action="store_true",
        help="score concept against cost for the feature, DiffMean and a random direction",
    )
    evaluation.add_argument("--cost-sequences", type=int, default=16, help="held-out sequences")
    evaluation.add_argument("--diffmean-tokens", type=int, default=20_000)
    evaluation.add_argument("--max-ce-increase", type=float, default=0.5, help="nats per token")
    evaluation.add_argument("--json", help="also write the evaluation here (a local or gs:// URI)")
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
    strengths = args.sweep if args.strength is None else [args.strength]
    if args.evaluate:
        _evaluate(args, config, sae, preset, strengths)
        return
    for prompt in args.prompt:
        _steer(args, config, sae, preset, strengths, prompt)


def _evaluate(args, config, sae: Sae, preset: str, strengths: list[float]) -> None:
    plan = plan_steering(
        sae,
        args.feature,
        strengths,
        model_preset=preset,
        layer=args.layer,
        max_new_tokens=args.max_new_tokens,
        allow_layer_mismatch=args.allow_layer_mismatch,
        sae_uri=args.sae,
    )
    if args.top_k:
        raise ConfigError("--evaluate generates greedily; leave out --top-k")
    for flag, value in (
        ("--cost-sequences", args.cost_sequences),
        ("--diffmean-tokens", args.diffmean_tokens),
    ):
        if value < 1:
            raise ConfigError(f"{flag} must be positive, got {value}")
    tokens = manifest.require(config.tokens_uri, "tokenize")
    if not tokens["shards"]["eval"]:
        raise InputError(f"--evaluate needs a held-out split; {config.tokens_uri} has none")
    held_out = list(
        itertools.islice(
            iter_sequences(tokens["shards"]["eval"]),
            max(args.cost_sequences, args.diffmean_tokens // tokens["sequence_length"] + 1),
        )
    )
    log("steer", f"loading {plan.preset}")
    generator = SteeredGenerator.from_preset(plan.preset, config.model.dtype)
    evaluation = evaluate_steering(
        generator,
        sae,
        args.feature,
        plan.layer,
        plan.strengths,
        args.prompt,
        held_out,
        tokens["tokenizer"]["bos_id"],
        lm_batch_size=config.train.lm_batch_size,
        cost_sequences=args.cost_sequences,
        diffmean_tokens=args.diffmean_tokens,
        max_new_tokens=args.max_new_tokens,
        max_ce_increase=args.max_ce_increase,
        seed=args.seed,
    )
    if args.json:
        storage.write_json(
            args.json, {"sae": args.sae, "model": plan.preset, **evaluation.to_json()}
        )
    print(render_evaluation(evaluation))


def _steer(args, config, sae: Sae, preset: str, strengths: list[float], prompt: str) -> None:
    generations = steer(
        sae,
        args.feature,
        prompt,
        strengths,
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
        f"prompt:  {prompt}",
    ]
    print(render(header, generations))
