"""Steering: continue a prompt with and without an SAE feature's steering vector.

The vector (the feature's unit decoder direction times a strength) is added to the output of
`decoder_block_<layer>` at every position. All strengths run as rows of one batch through one
compiled generation loop, next to the unsteered row (strength 0). Everything a caller can get
wrong is checked before the model is loaded, as a one-line error; the messages name the flags
of `gemma-sae steer`, which calls `steer`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from sae.analysis import steering, steering_eval
from sae.analysis.steering_eval import SteeringEvaluation, evaluate_steering
from sae.errors import ConfigError, InputError
from sae.io import manifest, model_sources, presets, saelens, storage
from sae.io.saelens import Sae
from sae.model.generation import Generation, SteeredGenerator
from sae.progress import log


@dataclass(frozen=True)
class SteerPlan:
    """A checked request: which direction goes where, on which model."""

    layer: int
    preset: str
    direction: np.ndarray
    strengths: list[float]  # the steered rows' strengths (none of them 0)


def steer(
    sae: Sae,
    feature: int,
    prompt: str,
    strengths: Sequence[float],
    *,
    model_preset: str | None = None,
    layer: int | None = None,
    max_new_tokens: int = 32,
    top_k: int = 0,
    seed: int = 0,
    allow_layer_mismatch: bool = False,
    dtype: str = "float32",
    sae_uri: str | None = None,
) -> list[Generation]:
    """Continuations of `prompt`: the unsteered one first, then one per non-zero strength.

    `model_preset` defaults to the model the SAE was trained on, `layer` to its layer (another
    layer needs `allow_layer_mismatch`). Greedy when `top_k` is 0, else sampled from the
    `top_k` most likely tokens with `seed`. `sae_uri`, where the SAE was loaded from, is named
    in error messages."""
    plan = plan_steering(
        sae,
        feature,
        strengths,
        model_preset=model_preset,
        layer=layer,
        max_new_tokens=max_new_tokens,
        top_k=top_k,
        allow_layer_mismatch=allow_layer_mismatch,
        sae_uri=sae_uri,
    )
    log("steer", f"loading {plan.preset}")
    generator = SteeredGenerator.from_preset(plan.preset, dtype)
    return generator.generate(
        prompt,
        plan.direction,
        [0.0, *plan.strengths],
        plan.layer,
        max_new_tokens=max_new_tokens,
        top_k=top_k,
        seed=seed,
    )


def render_generations(
    sae: Sae,
    feature: int,
    prompt: str,
    generations: list[Generation],
    *,
    model_preset: str,
    layer: int | None,
    max_new_tokens: int,
    top_k: int = 0,
    seed: int = 0,
    sae_uri: str | None = None,
    **_: object,
) -> str:
    """What `gemma-sae steer` prints: a header naming the model, SAE, block and sampling,
    then one labelled, indented block per strength, the unsteered continuation first."""
    # steer checked these: the layer given, else the SAE's.
    layer = layer if layer is not None else sae.layer
    where = f"decoder_block_{layer}"
    if sae.layer is not None and layer != sae.layer:
        where += f" (SAE trained on layer {sae.layer})"
    sampling = f"top-{top_k} sampling, seed {seed}" if top_k else "greedy"
    lines = [
        f"model:   {model_preset}",
        f"SAE:     {sae_uri} (feature {feature} of {sae.d_sae})",
        f"steered: {where}, {sampling}, {max_new_tokens} tokens",
        f"prompt:  {prompt}",
    ]
    for generation in generations:
        label = "unsteered" if generation.strength == 0 else f"strength {generation.strength:g}"
        text = generation.text or "(nothing before EOS)"
        lines += ["", f"--- {label} ---", *("  " + line for line in text.splitlines())]
    return "\n".join(lines)


def evaluate(
    sae: Sae,
    feature: int,
    strengths: Sequence[float],
    prompts: Sequence[str],
    tokens_uri: str,
    *,
    model_preset: str | None = None,
    layer: int | None = None,
    dtype: str = "float32",
    lm_batch_size: int = 8,
    max_new_tokens: int = 24,
    top_k: int = 0,
    cost_sequences: int = 16,
    diffmean_tokens: int = steering_eval.DIFFMEAN_TOKENS,
    max_ce_increase: float = 0.5,
    allow_layer_mismatch: bool = False,
    seed: int = 0,
    sae_uri: str | None = None,
) -> SteeringEvaluation:
    """The steering evaluation (sae.analysis.steering_eval) of `feature` at `strengths` on
    `prompts`, DiffMean and the cost taken from the held-out split of the tokenize output at
    `tokens_uri`; checked like `steer` first, then the evaluation's own settings."""
    plan = plan_steering(
        sae,
        feature,
        strengths,
        model_preset=model_preset,
        layer=layer,
        max_new_tokens=max_new_tokens,
        allow_layer_mismatch=allow_layer_mismatch,
        sae_uri=sae_uri,
    )
    if top_k:
        raise ConfigError("--evaluate generates greedily; leave out --top-k")
    counts = {"--cost-sequences": cost_sequences, "--diffmean-tokens": diffmean_tokens}
    for flag, value in counts.items():
        if value < 1:
            raise ConfigError(f"{flag} must be positive, got {value}")
    tokens = manifest.require(tokens_uri, "tokenize")
    if not tokens["shards"]["eval"]:
        raise InputError(f"--evaluate needs a held-out split; {tokens_uri} has none")
    held_out = steering_eval.held_out_sequences(tokens, cost_sequences, diffmean_tokens)
    log("steer", f"loading {plan.preset}")
    generator = SteeredGenerator.from_preset(plan.preset, dtype)
    return evaluate_steering(
        generator,
        sae,
        feature,
        plan.layer,
        plan.strengths,
        prompts,
        held_out,
        tokens["tokenizer"]["bos_id"],
        lm_batch_size=lm_batch_size,
        cost_sequences=cost_sequences,
        diffmean_tokens=diffmean_tokens,
        max_new_tokens=max_new_tokens,
        max_ce_increase=max_ce_increase,
        seed=seed,
    )


def plan_steering(
    sae: Sae,
    feature: int,
    strengths: Sequence[float],
    *,
    model_preset: str | None = None,
    layer: int | None = None,
    max_new_tokens: int = 32,
    top_k: int = 0,
    allow_layer_mismatch: bool = False,
    sae_uri: str | None = None,
) -> SteerPlan:
    """Every check that needs no model weights, in the order a user would fix them."""
    if max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be positive, got {max_new_tokens}")
    if top_k < 0:
        raise ConfigError(f"--top-k must not be negative, got {top_k}")
    if not all(math.isfinite(s) for s in strengths):
        raise ConfigError(f"steering strengths must be finite numbers, got {list(strengths)}")
    _check_feature(feature, sae.d_sae, sae_uri)
    layer = _check_layer(layer, sae.cfg, allow_layer_mismatch, sae_uri)
    _check_hook(sae.cfg, sae_uri)
    preset = _check_preset(model_preset or sae.cfg.get("model_preset"), sae_uri)
    presets.check_layers(preset, [layer])
    backbone = presets.backbone_config(preset)
    saelens.check_model_dim(sae.cfg, backbone["hidden_dim"], sae_uri or "(in memory)", preset)
    vocabulary = int(backbone["vocabulary_size"])
    if top_k > vocabulary:
        raise ConfigError(f"--top-k {top_k} is larger than the vocabulary ({vocabulary})")
    directions, _ = steering.unit_directions(sae.weights["W_dec"], [feature])
    return SteerPlan(layer, preset, directions[0], [float(s) for s in strengths if s != 0.0])


def _the_sae(sae_uri: str | None) -> str:
    return f"the SAE at {sae_uri}" if sae_uri else "the SAE"


def _check_preset(preset: str | None, sae_uri: str | None) -> str:
    """The keras-hub preset of `preset` (any model source, converted once)."""
    if not preset:
        raise InputError(f"{_the_sae(sae_uri)} does not name its model; pass --model-preset")
    preset = model_sources.resolve(preset)
    if not storage.exists(storage.join(preset, "config.json")):
        raise InputError(
            f"no keras-hub preset at {preset} (config.json not found); pass --model-preset"
        )
    return preset


def _check_feature(feature: int, d_sae: int, sae_uri: str | None) -> None:
    if not 0 <= feature < d_sae:
        raise InputError(
            f"--feature {feature} is out of range: {_the_sae(sae_uri)} has {d_sae} features "
            f"(0..{d_sae - 1})"
        )


def _check_layer(
    layer: int | None, sae_cfg: dict, allow_mismatch: bool, sae_uri: str | None
) -> int:
    sae_layer = sae_cfg.get("layer")
    if sae_layer is None:
        if layer is None:
            raise InputError(f"{_the_sae(sae_uri)} does not name its layer; pass --layer")
        return layer
    if layer is None or layer == sae_layer:
        return int(sae_layer)
    if not allow_mismatch:
        raise ConfigError(
            f"--layer {layer} differs from the SAE's layer {sae_layer} (its features were "
            f"learned there); pass --allow-layer-mismatch to steer at layer {layer} anyway"
        )
    return layer


def _check_hook(sae_cfg: dict, sae_uri: str | None) -> None:
    # The vector is added to a block's output, the residual stream; an SAE on attention or
    # MLP outputs lives in another space even when the widths agree.
    hook = sae_cfg.get("hook_name", "")
    if hook and "resid_post" not in hook:
        raise InputError(
            f"{_the_sae(sae_uri)} reads {hook}; steering adds to a block's output "
            "(resid_post) and needs an SAE trained there"
        )
