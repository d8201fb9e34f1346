"""`gemma-sae steer`: continue a prompt with and without an SAE feature's steering vector.

    gemma-sae steer --sae runs/local/sae/topk-L2-x8-k32 --feature 12 --strength 40 \\
        --prompt "The quick brown fox"
    gemma-sae steer --sae DIR --feature 12 --sweep 10,40,160 --prompt "..." --max-new-tokens 48

The vector (the feature's unit decoder direction times the strength) is added to the output
of `decoder_block_<layer>` at every position. All strengths of a sweep run as rows of one
batch through one compiled generation loop, next to the unsteered row (strength 0).
Everything the user can get wrong is checked before the model is loaded, as a one-line error.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

import numpy as np

from sae.analysis import steering
from sae.config import load as load_config
from sae.errors import ConfigError, InputError
from sae.io import presets, saelens, storage
from sae.progress import log


@dataclass(frozen=True)
class SteerPlan:
    """A validated request: which direction goes where, on which model."""

    sae_dir: str
    feature: int
    d_sae: int
    layer: int
    sae_layer: int
    preset: str
    dtype: str
    direction: np.ndarray
    strengths: list[float]


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


def _choose_preset(explicit: str | None, configured: str, sae_cfg: dict, fallback: str) -> str:
    preset = explicit or configured or sae_cfg.get("model_preset") or fallback
    if not storage.exists(storage.join(preset, "config.json")):
        raise InputError(
            f"no keras-hub preset at {preset} (config.json not found); pass --model-preset"
        )
    return preset


def _check_feature(feature: int, d_sae: int, sae_dir: str) -> None:
    if not 0 <= feature < d_sae:
        raise InputError(
            f"--feature {feature} is out of range: the SAE at {sae_dir} has {d_sae} features "
            f"(0..{d_sae - 1})"
        )


def _check_layer(layer: int | None, sae_cfg: dict, allow_mismatch: bool, sae_dir: str) -> int:
    sae_layer = sae_cfg.get("layer")
    if sae_layer is None:
        if layer is None:
            raise InputError(f"the SAE at {sae_dir} does not name its layer; pass --layer")
        return layer
    if layer is None or layer == sae_layer:
        return int(sae_layer)
    if not allow_mismatch:
        raise ConfigError(
            f"--layer {layer} differs from the SAE's layer {sae_layer} (its features were "
            f"learned there); pass --allow-layer-mismatch to steer at layer {layer} anyway"
        )
    return layer


def _check_hook(sae_cfg: dict, sae_dir: str) -> None:
    # The vector is added to a block's output, the residual stream; an SAE on attention or
    # MLP outputs lives in another space even when the widths agree.
    hook = sae_cfg.get("hook_name", "")
    if hook and "resid_post" not in hook:
        raise InputError(
            f"the SAE at {sae_dir} reads {hook}; steering adds to a block's output "
            "(resid_post) and needs an SAE trained there"
        )


def plan(args: argparse.Namespace) -> SteerPlan:
    """Every check that needs no model weights, in the order a user would fix them."""
    config = load_config(args.config)
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    if args.top_k < 0:
        raise ConfigError(f"--top-k must not be negative, got {args.top_k}")
    sae, params, sae_cfg = saelens.load(args.sae)
    _check_feature(args.feature, sae.d_sae, args.sae)
    layer = _check_layer(args.layer, sae_cfg, args.allow_layer_mismatch, args.sae)
    _check_hook(sae_cfg, args.sae)
    preset = _choose_preset(args.model_preset, config.model.preset, sae_cfg, config.preset_uri)
    presets.check_layers(preset, [layer])
    saelens.check_model_dim(
        sae_cfg, presets.backbone_config(preset)["hidden_dim"], args.sae, preset
    )
    vocabulary = int(presets.backbone_config(preset)["vocabulary_size"])
    if args.top_k > vocabulary:
        raise ConfigError(f"--top-k {args.top_k} is larger than the vocabulary ({vocabulary})")
    directions, _ = steering.unit_directions(params["W_dec"], [args.feature])
    strengths = args.sweep if args.strength is None else [args.strength]
    return SteerPlan(
        sae_dir=args.sae,
        feature=args.feature,
        d_sae=sae.d_sae,
        layer=layer,
        sae_layer=int(sae_cfg.get("layer", layer)),
        preset=preset,
        dtype=config.model.dtype,
        direction=directions[0],
        strengths=[s for s in strengths if s != 0.0],
    )


def _indented(text: str) -> str:
    return "\n".join("  " + line for line in (text or "(nothing before EOS)").splitlines())


def render(plan: SteerPlan, prompt: str, generations: list, sampling: str) -> str:
    """One labelled block per strength, the unsteered continuation first."""
    where = f"decoder_block_{plan.layer}"
    if plan.layer != plan.sae_layer:
        where += f" (SAE trained on layer {plan.sae_layer})"
    lines = [
        f"model:   {plan.preset}",
        f"SAE:     {plan.sae_dir} (feature {plan.feature} of {plan.d_sae})",
        f"steered: {where}, {sampling}",
        f"prompt:  {prompt}",
    ]
    for generation in generations:
        label = "unsteered" if generation.strength == 0 else f"strength {generation.strength:g}"
        lines += ["", f"--- {label} ---", _indented(generation.text)]
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    args = _parser().parse_args(argv)
    steer = plan(args)
    from sae.model.generation import SteeredGenerator

    log("steer", f"loading {steer.preset}")
    generator = SteeredGenerator.from_preset(steer.preset, steer.dtype)
    generations = generator.generate(
        args.prompt,
        steer.direction,
        [0.0, *steer.strengths],
        steer.layer,
        max_new_tokens=args.max_new_tokens,
        top_k=args.top_k,
        seed=args.seed,
    )
    sampling = f"top-{args.top_k} sampling, seed {args.seed}" if args.top_k else "greedy"
    print(render(steer, args.prompt, generations, f"{sampling}, {args.max_new_tokens} tokens"))
