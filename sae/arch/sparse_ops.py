"""Exact top-k selection and sparse decoding over latents sharded on the mesh's model axis.

Inside `jax.set_mesh(mesh)` with a model axis larger than one, each device selects among its
own slice of the latents and the candidates are gathered and selected again: the global top k
is always within the union of the per-shard top k, so the result is exact, not approximate.
Without a mesh (or with one model shard) the same functions are plain `lax.top_k` and gathers.

Decoding from (values, indices) reads only k decoder rows per token instead of multiplying by
the whole decoder: the forward pass and both backward products scale with k, not the width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from sae.sharding import DATA, MODEL


def _model_shards() -> int:
    mesh = jax.sharding.get_abstract_mesh()
    return int(mesh.shape.get(MODEL, 1)) if mesh.axis_names else 1


def _data_axis() -> str | None:
    mesh = jax.sharding.get_abstract_mesh()
    return DATA if DATA in mesh.axis_names else None


def top_k(pre: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """The k largest entries of each row of `pre` [tokens, latents] and their latent indices."""
    if _model_shards() == 1:
        return jax.lax.top_k(pre, k)

    def local(block: jax.Array) -> tuple[jax.Array, jax.Array]:
        offset = jax.lax.axis_index(MODEL) * block.shape[1]
        values, indices = jax.lax.top_k(block, min(k, block.shape[1]))
        values = jax.lax.all_gather(values, MODEL, axis=1, tiled=True)
        indices = jax.lax.all_gather(indices + offset, MODEL, axis=1, tiled=True)
        values, chosen = jax.lax.top_k(values, k)
        return values, jnp.take_along_axis(indices, chosen, axis=1)

    data = _data_axis()
    # Selection outputs are identical on every model shard; JAX cannot infer that for top_k.
    return jax.shard_map(
        local,
        in_specs=P(data, MODEL),
        out_specs=(P(data, None), P(data, None)),
        check_vma=False,
    )(pre)


def kth_largest(values: jax.Array, n: int) -> jax.Array:
    """The n-th largest entry of the whole non-negative array `values` [tokens, latents]
    (BatchTopK's cut-off), exact, without sorting.

    Non-negative floats order like their bit patterns read as integers, so a binary search
    over those integers, counting entries at or above the midpoint, lands on the n-th largest
    value in 31 passes. Sharded, each pass adds the devices' counts: scalars cross the mesh,
    never the activations.
    """
    mesh = jax.sharding.get_abstract_mesh()
    axes = tuple(mesh.axis_names) if mesh.axis_names and mesh.size > 1 else ()

    def search(block: jax.Array) -> jax.Array:
        bits = jax.lax.bitcast_convert_type(jnp.maximum(block, 0.0), jnp.int32)

        def halve(_: int, bounds: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
            low, high = bounds
            middle = low + (high - low + 1) // 2
            count = jnp.sum(bits >= middle, dtype=jnp.int32)
            if axes:
                count = jax.lax.psum(count, axes)
            enough = count >= n
            return jnp.where(enough, middle, low), jnp.where(enough, high, middle - 1)

        start = (jnp.int32(0), jnp.int32(0x7F800000))  # 0.0 .. +inf
        low, _ = jax.lax.fori_loop(0, 31, halve, start)
        return jax.lax.bitcast_convert_type(low, jnp.float32)

    if not axes:
        return search(values)
    return jax.shard_map(search, in_specs=P(DATA, MODEL), out_specs=P(), check_vma=False)(values)


def sparse_decode(values: jax.Array, indices: jax.Array, w_dec: jax.Array) -> jax.Array:
    """sum_j values[t, j] * w_dec[indices[t, j]]: [tokens, k] x [latents, d] -> [tokens, d],
    multiplied in w_dec's dtype and accumulated in float32."""
    values = values.astype(w_dec.dtype)
    if _model_shards() == 1:
        return jnp.einsum("tk,tkd->td", values, w_dec[indices], preferred_element_type=jnp.float32)

    def local(vals: jax.Array, idx: jax.Array, rows: jax.Array) -> jax.Array:
        # Each model shard holds a contiguous slice of decoder rows; it adds the terms whose
        # latent lives there, and the partial sums are added over the model axis.
        start = jax.lax.axis_index(MODEL) * rows.shape[0]
        local_idx = idx - start
        here = (local_idx >= 0) & (local_idx < rows.shape[0])
        gathered = rows[jnp.clip(local_idx, 0, rows.shape[0] - 1)]
        partial = jnp.einsum(
            "tk,tkd->td", jnp.where(here, vals, 0), gathered, preferred_element_type=jnp.float32
        )
        return jax.lax.psum(partial, MODEL)

    data = _data_axis()
    return jax.shard_map(
        local,
        in_specs=(P(data, None), P(data, None), P(MODEL, None)),
        out_specs=P(data, None),
        check_vma=False,
    )(values, indices, w_dec)


def dense_from_sparse(values: jax.Array, indices: jax.Array, width: int) -> jax.Array:
    """[tokens, width] latents with `values` at `indices` and zeros elsewhere."""
    rows = jnp.arange(values.shape[0])[:, None]
    return jnp.zeros((values.shape[0], width), values.dtype).at[rows, indices].set(values)


def fire_counts(indices: jax.Array, active: jax.Array, width: int) -> jax.Array:
    """Tokens on which each latent was active, from selected indices and their active mask."""
    return (
        jnp.zeros((width,), jnp.float32)
        .at[indices.reshape(-1)]
        .add(active.reshape(-1).astype(jnp.float32))
    )
