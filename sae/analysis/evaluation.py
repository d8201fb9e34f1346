"""Evaluation of an SAE on held-out activations, and the per-feature statistics reports use.

Metrics follow the field's definitions (see REFERENCE): L0, fraction of variance explained
over the whole evaluation set, normalised MSE, dead latents (never active on the evaluation
tokens) and dense latents (active on more than 10% of them). Top-activating examples are
kept per feature as (sequence, position) references into the evaluated sequences. The metrics
that re-run the model with the SAE spliced in (CE loss recovered, delta LM loss) are in
`sae.model.spliced`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from sae.analysis import feature_stats
from sae.arch import token_norm
from sae.arch.base import SparseAutoencoder
from sae.data.activations import content_mask, sequence_batches
from sae.errors import InputError

DENSE_THRESHOLD = 0.1
# A dimension holding more than this many times the uniform share of the variance is dominant.
DOMINANT_SHARE = 10.0


@dataclass
class EvalResult:
    metrics: dict[str, float]
    fire_counts: np.ndarray  # [d_sae] tokens on which each latent was active
    activation_sums: np.ndarray  # [d_sae] sum of activations where active
    max_activations: np.ndarray  # [d_sae]
    top_values: np.ndarray  # [d_sae, k] descending; 0 where fewer than k activations
    top_refs: np.ndarray  # [d_sae, k, 2] (sequence index, position)
    sequences: list[np.ndarray] = field(default_factory=list)  # evaluated token ids
    # Histograms and random samples per latent (see sae.analysis.feature_stats).
    feature_stats: feature_stats.FeatureStats | None = None


def _batch_statistics(sae: SparseAutoencoder, top_k: int, details: bool = True):
    """The jitted per-batch sums; without `details`, only what the metrics need (no top
    activations, histograms or samples per latent: a snapshot on the training curve)."""

    def statistics(params, x, target, mask, stats, first_sequence, seq_len):
        x = x.astype(jnp.float32)  # a bf16 model's activations: sums need float32
        latents, reconstruction = token_norm.encode_decode(sae, params, x)
        # What the output is judged against: the input (an SAE) or a transcoder's target.
        x = x if target is None else target.astype(jnp.float32)
        weight = mask.astype(jnp.float32)
        latents = latents * weight[:, None]
        active = latents > 0
        squared_error = weight[:, None] * (x - reconstruction) ** 2
        squared = weight[:, None] * x**2
        sums = {
            "squared_error": jnp.sum(squared_error),
            "squared_norm": jnp.sum(squared),
            "sum_x": jnp.sum(weight[:, None] * x, axis=0),
            # Per dimension, for the FVE without the dominant dimensions.
            "squared_error_per_dim": jnp.sum(squared_error, axis=0),
            "squared_per_dim": jnp.sum(squared, axis=0),
            "l0": jnp.sum(active),
            "fire_counts": jnp.sum(active, axis=0),
        }
        if not details:
            return sums, stats
        top_values, top_rows = jax.lax.top_k(latents.T, top_k)
        return {
            **sums,
            "activation_sums": jnp.sum(latents, axis=0),
            "max_activations": jnp.max(latents, axis=0),
            "top_values": top_values,
            "top_rows": top_rows,
        }, feature_stats.update(stats, latents, first_sequence, seq_len)

    return jax.jit(statistics, static_argnums=6, donate_argnums=4)


def latent_encoder(
    sae: SparseAutoencoder, params: dict[str, np.ndarray]
) -> Callable[[np.ndarray], jax.Array]:
    """Raw activations [..., d_model] -> the SAE's latents [..., d_sae] (float32): jitted,
    the weights put on the device once (the report's extra passes: probing, absorption,
    context values)."""
    weights = jax.device_put({k: jnp.asarray(v) for k, v in params.items()})
    encode = jax.jit(lambda w, x: token_norm.encode_decode(sae, w, x.astype(jnp.float32))[0])

    def latents(rows: np.ndarray) -> jax.Array:
        flat = encode(weights, rows.reshape(-1, rows.shape[-1]))
        return flat.reshape(*rows.shape[:-1], flat.shape[-1])

    return latents


@dataclass
class EvalModel:
    """One SAE to evaluate, and which tapped output it reads (and, a transcoder, which one
    it predicts)."""

    sae: SparseAutoencoder
    params: dict[str, np.ndarray]
    layer_index: int = 0
    target_index: int | None = None
    # False: the metrics only, no per-feature statistics (EvalResult's arrays stay empty).
    details: bool = True


class _Accumulator:
    """Running sums for one SAE over the evaluation batches."""

    def __init__(self, model: EvalModel, top_k: int) -> None:
        self.model, self.top_k = model, top_k
        self.statistics = _batch_statistics(model.sae, top_k, model.details)
        self.params = jax.device_put({k: jnp.asarray(v) for k, v in model.params.items()})
        d_sae = model.sae.d_sae
        self.sums = {"squared_error": 0.0, "squared_norm": 0.0, "l0": 0.0}
        self.sum_x = np.zeros(model.sae.d_model)
        self.squared_error_per_dim = np.zeros(model.sae.d_model)
        self.squared_per_dim = np.zeros(model.sae.d_model)
        self.fire_counts = np.zeros(d_sae, np.int64)
        self.activation_sums = np.zeros(d_sae)
        self.max_activations = np.zeros(d_sae, np.float32)
        self.top_values = np.zeros((d_sae, top_k), np.float32)
        self.top_refs = np.zeros((d_sae, top_k, 2), np.int64)
        self.stats = feature_stats.init_state(d_sae)

    def add(
        self,
        activations: np.ndarray,
        mask: np.ndarray,
        first_sequence: int,
        targets: np.ndarray | None = None,
    ) -> None:
        """One batch [sequences, positions, d_model]; `targets` (same shape) for a
        transcoder."""
        _, seq_len, d_model = activations.shape
        out, self.stats = self.statistics(
            self.params,
            activations.reshape(-1, d_model),
            None if targets is None else targets.reshape(-1, d_model),
            mask.reshape(-1),
            self.stats,
            np.int32(first_sequence),
            seq_len,
        )
        out = jax.device_get(out)
        for key in self.sums:
            self.sums[key] += float(out[key])
        self.sum_x += out["sum_x"]
        self.squared_error_per_dim += out["squared_error_per_dim"]
        self.squared_per_dim += out["squared_per_dim"]
        self.fire_counts += out["fire_counts"].astype(np.int64)
        if not self.model.details:
            return
        self.activation_sums += out["activation_sums"]
        self.max_activations = np.maximum(self.max_activations, out["max_activations"])
        rows = out["top_rows"]
        refs = np.stack([first_sequence + rows // seq_len, rows % seq_len], axis=-1)
        self.top_values, self.top_refs = _merge_top(
            self.top_values, self.top_refs, out["top_values"], refs, self.top_k
        )

    def _without_dominant(self, tokens: int, mean: np.ndarray) -> dict[str, Any]:
        """FVE over the dimensions left when the dominant ones are set aside: a few residual
        dimensions can hold most of the variance (one holds ~90% in Gemma 3 270M's block 8),
        so plain FVE is high for an SAE that gets only them right. Dominant: a dimension
        with more than DOMINANT_SHARE times a uniform share (1/d_model) of the variance."""
        variance = self.squared_per_dim - tokens * mean**2
        share = variance / max(float(variance.sum()), 1e-12)
        dominant = share > DOMINANT_SHARE / len(share)
        rest = float(variance[~dominant].sum())
        error = float(self.squared_error_per_dim[~dominant].sum())
        return {
            "fraction_variance_explained_without_dominant": 1.0 - error / max(rest, 1e-12),
            "dominant_dimensions": [int(i) for i in np.flatnonzero(dominant)],
            "dominant_variance_share": float(share[dominant].sum()),
        }

    def result(self, tokens: int, sequences: list[np.ndarray]) -> EvalResult:
        sums = self.sums
        mean = self.sum_x / tokens
        variance = sums["squared_norm"] - tokens * float(mean @ mean)
        fire_counts = self.fire_counts
        metrics = {
            "eval_tokens": tokens,
            "l0": sums["l0"] / tokens,
            "fraction_variance_explained": 1.0 - sums["squared_error"] / max(variance, 1e-12),
            "normalized_mse": sums["squared_error"] / max(sums["squared_norm"], 1e-12),
            "mse_per_token": sums["squared_error"] / tokens,
            "dead_latents": int(np.sum(fire_counts == 0)),
            "dead_fraction": float(np.mean(fire_counts == 0)),
            "dense_latents": int(np.sum(fire_counts > DENSE_THRESHOLD * tokens)),
            "d_sae": self.model.sae.d_sae,
            **self._without_dominant(tokens, mean),
        }
        return EvalResult(
            metrics,
            fire_counts,
            self.activation_sums,
            self.max_activations,
            self.top_values,
            self.top_refs,
            sequences,
            feature_stats.FeatureStats.from_state(self.stats),
        )


class Observer(Protocol):
    """Something else computed from the evaluation pass's model batches."""

    def done(self) -> bool: ...

    def observe(self, token_ids: np.ndarray, lengths: np.ndarray, outputs: Sequence) -> None: ...


def evaluate(
    models: list[EvalModel],
    sequences: Iterator[tuple[np.ndarray, int]],
    tap,
    lm_batch_size: int,
    bos_id: int,
    max_tokens: int,
    top_k: int,
    progress=None,
    observers: Sequence[Observer] = (),
) -> list[EvalResult]:
    """Stream held-out sequences through the model once, and every SAE on its layer, until
    `max_tokens` are seen; `observers` (other evaluations of the same held-out text, such as
    sae.analysis.absorption's) are fed the same model batches, the pass going on for them
    alone until they are done."""
    accumulators = [_Accumulator(model, top_k) for model in models]
    kept: list[np.ndarray] = []
    tokens = 0
    for token_ids, lengths in sequence_batches(sequences, lm_batch_size):
        outputs = tap(token_ids, lengths)
        for observer in observers:
            if not observer.done():
                observer.observe(token_ids, lengths, outputs)
        if tokens >= max_tokens:
            if all(observer.done() for observer in observers):
                break
            continue
        mask = content_mask(token_ids, lengths, bos_id)
        first_sequence = len(kept)
        for accumulator in accumulators:
            model = accumulator.model
            targets = None if model.target_index is None else outputs[model.target_index]
            accumulator.add(outputs[model.layer_index], mask, first_sequence, targets)
        kept.extend(token_ids[i, : lengths[i]] for i in range(len(lengths)) if lengths[i] > 0)
        tokens += int(mask.sum())
        if progress is not None:
            progress.update(int(mask.sum()))
        if tokens >= max_tokens and all(observer.done() for observer in observers):
            break
    if tokens == 0:
        raise ValueError("no evaluation tokens")
    return [accumulator.result(tokens, kept) for accumulator in accumulators]


def _merge_top(
    values: np.ndarray, refs: np.ndarray, new_values: np.ndarray, new_refs: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    all_values = np.concatenate([values, new_values], axis=1)
    all_refs = np.concatenate([refs, new_refs], axis=1)
    order = np.argsort(-all_values, axis=1, kind="stable")[:, :k]
    return (
        np.take_along_axis(all_values, order, axis=1),
        np.take_along_axis(all_refs, order[..., None], axis=1),
    )


def evaluate_rows(
    models: list[EvalModel],
    batches: Iterable[np.ndarray | tuple[np.ndarray, np.ndarray]],
    top_k: int = 8,
) -> list[EvalResult]:
    """The same metrics and feature statistics on activation rows [tokens, d_model] in memory
    (no model, no text): each row is a sequence of one token, so top references are
    (row, 0). A batch may be a pair (inputs, targets): transcoders are judged on the
    targets, SAEs on the inputs."""
    accumulators = [_Accumulator(model, top_k) for model in models]
    tokens = 0
    for batch in batches:
        inputs, targets = batch if isinstance(batch, tuple) else (batch, None)
        rows = np.asarray(inputs, np.float32)[:, None, :]
        paired = None if targets is None else np.asarray(targets, np.float32)[:, None, :]
        mask = np.ones(rows.shape[:2], bool)
        for accumulator in accumulators:
            judged = paired if accumulator.model.sae.transcoder else None
            accumulator.add(rows, mask, tokens, judged)
        tokens += len(rows)
    if not tokens:
        raise InputError("no activations to evaluate")
    return [accumulator.result(tokens, []) for accumulator in accumulators]
