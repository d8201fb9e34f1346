"""The AuxK loss (Gao et al. 2024): dead latents learn to reconstruct what the live ones miss.

Among the latents dead over the tracking window, the `k_aux` largest pre-activations of each
token reconstruct the main residual (a fixed target); the loss is normalised by the residual's
variance and scaled down while fewer than `k_aux` latents are dead. When none is dead the
branch is skipped entirely, which is the common case once training has settled.

The cost follows the dead count, not the width: the dead latents are gathered into the smallest
of a few fixed sizes (k_aux, 2 k_aux, 4 k_aux, ...) that holds them, and the top-k and decoder
read only those columns and rows; past half the width the plain masked form runs. Each size is
compiled once (a `lax.switch`), so shapes stay static.
"""

from __future__ import annotations

from collections.abc import Callable

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

    def cutoff() -> jax.Array:
        """[tokens, 1]: each token's k_aux-th largest dead pre-activation. Read from the
        full width (contiguous, unlike a gather of the dead columns)."""
        return _kth_largest(jnp.where(dead, pre, -jnp.inf), selected)

    def subset(size: int) -> Callable[[None], jax.Array]:
        def compute(_: None) -> jax.Array:
            # The first `size` dead latents (every one of them: size >= num_dead here).
            columns = jnp.nonzero(dead, size=size, fill_value=0)[0]
            valid = jnp.arange(size) < num_dead
            candidates_pre = pre[:, columns]
            # No more dead latents than k_aux: every one is chosen, no cut-off needed.
            chosen = valid if size <= selected else valid & (candidates_pre >= cutoff())
            latents = jnp.where(chosen, jax.nn.relu(candidates_pre), 0.0)
            return _loss(latents, params["W_dec"][columns])

        return compute

    def full(_: None) -> jax.Array:
        chosen = dead & (pre >= cutoff())
        return _loss(jnp.where(chosen, jax.nn.relu(pre), 0.0), params["W_dec"])

    def _loss(latents: jax.Array, rows: jax.Array) -> jax.Array:
        dtype = jnp.dtype(matmul_dtype)
        prediction = jnp.matmul(
            latents.astype(dtype), rows.astype(dtype), preferred_element_type=jnp.float32
        )
        residual = jax.lax.stop_gradient(x - reconstruction)
        scale = jnp.minimum(num_dead / k_aux, 1.0)
        return scale * common.normalized_residual_loss(residual, prediction)

    width = pre.shape[-1]
    # Gathering columns of latents sharded over the model axis would move them across the
    # mesh: sharded, the masked form runs.
    sizes = [] if sparse_ops.model_shards() > 1 else _subset_sizes(selected, width)
    branches = [lambda _: jnp.zeros((), jnp.float32)] + [subset(n) for n in sizes] + [full]
    # 0: none dead; i: the i-th size holds them all; last: more dead than the largest size.
    bounds = jnp.asarray([0] + sizes, jnp.int32)
    branch = jnp.sum(num_dead > bounds, dtype=jnp.int32)
    return jax.lax.switch(branch, branches, None)


def _subset_sizes(selected: int, width: int) -> list[int]:
    """k_aux, 2 k_aux, 4 k_aux, ... up to half the width."""
    sizes = []
    size = selected
    while size <= width // 2:
        sizes.append(size)
        size *= 2
    return sizes


def _kth_largest(values: jax.Array, k: int) -> jax.Array:
    """[tokens, 1]: each row's k-th largest entry, or a cut-off that keeps the same positive
    entries: AuxK uses only the positive parts, so below 0 where the cut-off falls does not
    matter, in value or gradient."""
    if k >= values.shape[-1]:
        return jnp.full((values.shape[0], 1), -jnp.inf, values.dtype)
    if sparse_ops.model_shards() > 1:
        return jax.lax.stop_gradient(sparse_ops.top_k(values, k)[0][:, -1:])
    return sparse_ops.row_kth_largest(jax.nn.relu(values), k)
