"""Per-token standardisation of SAE inputs: SAELens' `normalize_activations="layer_norm"`
(Bussmann et al.'s `input_unit_norm` for BatchTopK).

Each token is centred over the model dimension and divided by its standard deviation before
encoding; the reconstruction is mapped back with the same mean and deviation. Why: a latent's
interference from the other active directions grows with the token's norm, so architectures
that select by one cut-off shared across tokens (BatchTopK's batch threshold, JumpReLU's
per-latent thresholds) hand high-norm tokens spurious latents and starve low-norm ones; on
standardised tokens one cut-off means the same thing for every token. TopK, which ranks
within each token, does not need it.

The arithmetic is SAELens' exactly: unbiased deviation (torch's default), eps added to the
divisor only, so exported SAEs behave the same there.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sae.arch.base import Params, SparseAutoencoder

EPS = 1e-5


def standardize(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(standardised x, per-token mean, per-token deviation), each over the last axis."""
    mean = jnp.mean(x, axis=-1, keepdims=True)
    centred = x - mean
    deviation = jnp.std(centred, axis=-1, ddof=1, keepdims=True)
    return centred / (deviation + EPS), mean, deviation


def encode_decode(
    sae: SparseAutoencoder, weights: Params, x: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """(latents, output) of raw activations, the output (an SAE's reconstruction, a
    transcoder's prediction) in raw units."""
    if not sae.normalize_tokens:
        latents = sae.encode(weights, x)
        return latents, sae.output(weights, x, latents)
    standardized, mean, deviation = standardize(x)
    latents = sae.encode(weights, standardized)
    return latents, sae.decode(weights, latents) * deviation + mean
