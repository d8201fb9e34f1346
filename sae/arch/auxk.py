"""The AuxK loss (Gao et al. 2024): dead latents learn to reconstruct what the live ones miss.

Among the latents dead over the tracking window, the `k_aux` largest pre-activations of each
token reconstruct the main residual (a fixed target); the loss is normalised by the residual's
variance and scaled down while fewer than `k_aux` latents are dead. When none is dead the
branch is skipped entirely, which is the common case once training has settled.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sae.arch import common, sparse_ops
from sae.arch.base import Params


def aux_latents(k_aux: int, d_model: int, d_sae: int) -> int:
    """Latents per token AuxK uses: `k_aux`, or d_model / 2 (the paper's choice) when 0."""
    return min(k_aux or d_model // 2, d_sae)


def auxk_loss(
    params: Params,
    x: jax.Array,
    reconstruction: jax.Array,
    pre: jax.Array,
    dead: jax.Array,
    k_aux: int,
    matmul_dtype: str,
    candidates: int | None = None,
) -> jax.Array:
    """`candidates` bounds how many latents `dead` can mark (a Matryoshka level's width),
    when that is fewer than `k_aux`; the loss is still scaled by the dead count over k_aux."""
    num_dead = jnp.sum(dead)
    selected = min(k_aux, candidates or k_aux)

    def compute(_: None) -> jax.Array:
        masked = jnp.where(dead, pre, -jnp.inf)
        cutoff = sparse_ops.top_k(masked, selected)[0][:, -1:]
        # Dense form of the k_aux selection: k_aux is ~d_model/2, too many rows to gather.
        latents = jnp.where(dead & (masked >= cutoff), jax.nn.relu(pre), 0.0)
        weights = {"W_dec": params["W_dec"], "b_dec": jnp.zeros_like(params["b_dec"])}
        prediction = common.dense_decode(weights, latents, matmul_dtype)
        residual = jax.lax.stop_gradient(x - reconstruction)
        scale = jnp.minimum(num_dead / k_aux, 1.0)
        return scale * common.normalized_residual_loss(residual, prediction)

    return jax.lax.cond(num_dead > 0, compute, lambda _: jnp.zeros((), jnp.float32), None)
