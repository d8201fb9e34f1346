"""Evaluation of an SAE on held-out activations, and the per-feature statistics reports use.

Metrics follow the field's definitions (see REFERENCE): L0, fraction of variance explained
over the whole evaluation set, normalised MSE, dead latents (never active on the evaluation
tokens) and dense latents (active on more than 10% of them). Top-activating examples are
kept per feature as (sequence, position) references into the evaluated sequences.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from sae.activations import content_mask, sequence_batches
from sae.arch.base import SparseAutoencoder

DENSE_THRESHOLD = 0.1


@dataclass
class EvalResult:
    metrics: dict[str, float]
    fire_counts: np.ndarray  # [d_sae] tokens on which each latent was active
    activation_sums: np.ndarray  # [d_sae] sum of activations where active
    max_activations: np.ndarray  # [d_sae]
    top_values: np.ndarray  # [d_sae, k] descending; 0 where fewer than k activations
    top_refs: np.ndarray  # [d_sae, k, 2] (sequence index, position)
    sequences: list[np.ndarray] = field(default_factory=list)  # evaluated token ids


def _batch_statistics(sae: SparseAutoencoder, top_k: int):
    def statistics(params, x, mask):
        latents = sae.encode(params, x)
        reconstruction = sae.decode(params, latents)
        weight = mask.astype(jnp.float32)
        latents = latents * weight[:, None]
        active = latents > 0
        top_values, top_rows = jax.lax.top_k(latents.T, top_k)
        return {
            "squared_error": jnp.sum(weight * jnp.sum((x - reconstruction) ** 2, axis=-1)),
            "squared_norm": jnp.sum(weight * jnp.sum(x**2, axis=-1)),
            "sum_x": jnp.sum(weight[:, None] * x, axis=0),
            "l0": jnp.sum(active),
            "fire_counts": jnp.sum(active, axis=0),
            "activation_sums": jnp.sum(latents, axis=0),
            "max_activations": jnp.max(latents, axis=0),
            "top_values": top_values,
            "top_rows": top_rows,
        }

    return jax.jit(statistics)


def evaluate(
    sae: SparseAutoencoder,
    params: dict[str, np.ndarray],
    sequences: Iterator[tuple[np.ndarray, int]],
    tap,
    lm_batch_size: int,
    bos_id: int,
    max_tokens: int,
    top_k: int,
    progress=None,
) -> EvalResult:
    """Stream held-out sequences through the model and the SAE until `max_tokens` are seen."""
    statistics = _batch_statistics(sae, top_k)
    device_params = jax.device_put({k: jnp.asarray(v) for k, v in params.items()})
    d_sae, d_model = sae.d_sae, sae.d_model
    sums = {"squared_error": 0.0, "squared_norm": 0.0, "l0": 0.0}
    sum_x = np.zeros(d_model)
    fire_counts = np.zeros(d_sae, np.int64)
    activation_sums = np.zeros(d_sae)
    max_activations = np.zeros(d_sae, np.float32)
    top_values = np.zeros((d_sae, top_k), np.float32)
    top_refs = np.zeros((d_sae, top_k, 2), np.int64)
    kept: list[np.ndarray] = []
    tokens = 0
    for token_ids, lengths in sequence_batches(sequences, lm_batch_size):
        mask = content_mask(token_ids, lengths, bos_id)
        activations = tap(token_ids, lengths)[0]
        batch, seq_len, _ = activations.shape
        out = jax.device_get(
            statistics(device_params, activations.reshape(-1, d_model), mask.reshape(-1))
        )
        for key in sums:
            sums[key] += float(out[key])
        sum_x += out["sum_x"]
        fire_counts += out["fire_counts"].astype(np.int64)
        activation_sums += out["activation_sums"]
        max_activations = np.maximum(max_activations, out["max_activations"])
        first_sequence = len(kept)
        kept.extend(token_ids[i, : lengths[i]] for i in range(batch) if lengths[i] > 0)
        rows = out["top_rows"]
        refs = np.stack([first_sequence + rows // seq_len, rows % seq_len], axis=-1)
        top_values, top_refs = _merge_top(top_values, top_refs, out["top_values"], refs, top_k)
        tokens += int(mask.sum())
        if progress is not None:
            progress.update(int(mask.sum()))
        if tokens >= max_tokens:
            break
    if tokens == 0:
        raise ValueError("no evaluation tokens")
    mean = sum_x / tokens
    variance = sums["squared_norm"] - tokens * float(mean @ mean)
    metrics = {
        "eval_tokens": tokens,
        "l0": sums["l0"] / tokens,
        "fraction_variance_explained": 1.0 - sums["squared_error"] / max(variance, 1e-12),
        "normalized_mse": sums["squared_error"] / max(sums["squared_norm"], 1e-12),
        "mse_per_token": sums["squared_error"] / tokens,
        "dead_latents": int(np.sum(fire_counts == 0)),
        "dead_fraction": float(np.mean(fire_counts == 0)),
        "dense_latents": int(np.sum(fire_counts > DENSE_THRESHOLD * tokens)),
        "d_sae": d_sae,
    }
    return EvalResult(
        metrics, fire_counts, activation_sums, max_activations, top_values, top_refs, kept
    )


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
