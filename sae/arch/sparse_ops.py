"""Exact top-k selection and sparse decoding over latents sharded on the mesh's model axis.

Inside `jax.set_mesh(mesh)` with a model axis larger than one, each device selects among its
own slice of the latents and the candidates are gathered and selected again: the global top k
is always within the union of the per-shard top k, so the result is exact, not approximate.
Without a mesh (or with one model shard) the same functions are plain `lax.top_k` and gathers.

Decoding from (values, indices) reads only k decoder rows per token instead of multiplying by
the whole decoder: the forward pass and both backward products scale with k, not the width.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from sae.sharding import DATA, MODEL


def model_shards() -> int:
    mesh = jax.sharding.get_abstract_mesh()
    return int(mesh.shape.get(MODEL, 1)) if mesh.axis_names else 1


def _data_axis() -> str | None:
    mesh = jax.sharding.get_abstract_mesh()
    return DATA if DATA in mesh.axis_names else None


def top_k(pre: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """The k largest entries of each row of `pre` [tokens, latents] and their latent indices."""
    if model_shards() == 1:
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


# Bits of a non-negative float32's pattern that vary (the sign bit is always 0).
_VALUE_BITS = 31
# The radix select per backend: (digit bits, histogram). A histogram pass scatter-adds every
# entry into 2**bits counters; a comparison pass counts the entries at or above each of the
# 2**bits - 1 candidate prefixes (reductions only, no scatter, which TPUs serialise). Fewer,
# wider digits mean fewer reads of the activations. `bench/batch_cutoff.py` times them all. On
# the project's CPU (docs/PERFORMANCE.md) the 31-pass binary search wins while the array fits
# in cache (1024 x 2048: 2x faster) and the 2-pass 16-bit histogram once it does not (4096 x
# 16384: 1.6x faster); the accelerator entries are unmeasured guesses until a device run.
SELECT_METHOD = {"cpu": (16, True), "gpu": (16, True), "tpu": (4, False)}
# Below this many entries the CPU binary-searches (the array stays in cache across passes).
CPU_CACHED_ENTRIES = 1 << 23


def _default_method(entries: int) -> tuple[int, bool]:
    backend = jax.default_backend()
    if backend == "cpu" and entries < CPU_CACHED_ENTRIES:
        return 1, False
    return SELECT_METHOD.get(backend, (4, False))


def kth_largest(
    values: jax.Array, n: int, digit_bits: int | None = None, histogram: bool | None = None
) -> jax.Array:
    """The n-th largest entry of the whole non-negative array `values` [tokens, latents]
    (BatchTopK's cut-off), exact, without sorting.

    Non-negative floats order like their bit patterns read as integers. A radix select fixes
    those bits from the top, `digit_bits` at a time: each pass counts the entries under every
    value of the next digit and keeps the largest digit that still leaves n entries at or
    above it, so ceil(31 / digit_bits) passes read the array (31 with one bit: a binary
    search). Sharded, each pass adds the devices' counts: 2**digit_bits integers cross the
    mesh, never the activations.
    """
    default_bits, default_histogram = _default_method(values.size)
    digit_bits = digit_bits or default_bits
    histogram = default_histogram if histogram is None else histogram
    mesh = jax.sharding.get_abstract_mesh()
    axes = tuple(mesh.axis_names) if mesh.axis_names and mesh.size > 1 else ()

    def search(block: jax.Array) -> jax.Array:
        def total(counts: jax.Array) -> jax.Array:
            return jax.lax.psum(counts, axes) if axes else counts

        bits = _bit_patterns(block).reshape(-1)
        return _radix_select(bits, n, digit_bits, histogram, lambda c: total(jnp.sum(c, 0)))

    if not axes:
        return search(values)
    return jax.shard_map(search, in_specs=P(DATA, MODEL), out_specs=P(), check_vma=False)(values)


def row_kth_largest(values: jax.Array, k: int) -> jax.Array:
    """[tokens, 1]: the k-th largest entry of each row of the non-negative `values`, exact
    (the radix select by comparisons, one bit at a time, counting per row). Unlike `top_k`
    it returns no indices and sorts nothing: for a cut-off alone (AuxK's) it is several times
    cheaper. Rows may be sharded; the latents of a row must be on one device."""
    bits = _bit_patterns(values)
    return _radix_select(bits, k, 1, False, lambda c: jnp.sum(c, -1, keepdims=True))


def _bit_patterns(values: jax.Array) -> jax.Array:
    return jax.lax.bitcast_convert_type(jnp.maximum(values, 0.0), jnp.int32)


def _radix_select(
    bits: jax.Array,
    n: int,
    digit_bits: int,
    histogram: bool,
    count: Callable[[jax.Array], jax.Array],
) -> jax.Array:
    """The float whose pattern is the n-th largest of `bits` along what `count` sums over
    (`count` maps [entries..., x] indicators to totals and adds devices' counts)."""
    # Materialised once: fused into each pass, its producers (a gather, say) would rerun.
    bits = jax.lax.optimization_barrier(bits)
    prefix = jnp.zeros(jax.eval_shape(count, bits).shape, jnp.int32)  # the answer's bits so far
    above = prefix  # histogram only: entries whose fixed bits exceed the prefix
    fixed = 0
    while fixed < _VALUE_BITS:
        width = min(digit_bits, _VALUE_BITS - fixed)
        high = bits >> (_VALUE_BITS - fixed - width)
        base = prefix << width
        if histogram:
            under = ((high >> width) == prefix).astype(jnp.int32)
            counts = jnp.zeros((1, 2**width), jnp.int32).at[0, high & (2**width - 1)].add(under)
            counts = count(counts)
            # at_least[d]: entries at or above prefix:d
            at_least = above + jnp.cumsum(counts[::-1])[::-1]
        else:
            counts = [count((high >= base + d).astype(jnp.int32)) for d in range(1, 2**width)]
            at_least = jnp.stack([jnp.full_like(prefix, n)] + counts)
        # at_least falls as the digit grows and digit 0 always reaches n.
        digit = jnp.sum(at_least[1:] >= n, axis=0, dtype=jnp.int32)
        if histogram:
            above = at_least[digit] - counts[digit]
        prefix = base + digit
        fixed += width
    return jax.lax.bitcast_convert_type(prefix, jnp.float32)


def sparse_decode(values: jax.Array, indices: jax.Array, w_dec: jax.Array) -> jax.Array:
    """sum_j values[t, j] * w_dec[indices[t, j]]: [tokens, k] x [latents, d] -> [tokens, d],
    multiplied in w_dec's dtype and accumulated in float32."""
    values = values.astype(w_dec.dtype)
    if model_shards() == 1:
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


# TopK's decode: "sparse" gathers the k decoder rows of each token, "dense" scatters the
# latents into [tokens, latents] and multiplies by the whole decoder. `bench/topk_decode.py`
# times both, forward and backward. On the project's CPU (docs/PERFORMANCE.md) the gather wins
# from about 256 latents per selected one (0.16-0.44 of the dense time) and loses at 64 (1.35-
# 1.65): the CPU picks by that ratio. The accelerator entries are guesses until a device run:
# a TPU's matrix unit favours the matmul and serialises the gather's scatter-add backward.
DECODE_METHOD = {"gpu": "sparse", "tpu": "dense"}
CPU_SPARSE_FROM_RATIO = 128  # latents per selected latent


def _decode_method(width: int, k: int) -> str:
    backend = jax.default_backend()
    if backend == "cpu":
        return "sparse" if width >= CPU_SPARSE_FROM_RATIO * k else "dense"
    return DECODE_METHOD.get(backend, "sparse")


def decode(
    values: jax.Array, indices: jax.Array, w_dec: jax.Array, method: str | None = None
) -> jax.Array:
    """[tokens, d] from each token's (values, indices) of the latents, by `method` (default:
    the backend's choice for this shape). With latents sharded over the model axis the sparse
    form always runs."""
    method = method or _decode_method(w_dec.shape[0], values.shape[-1])
    if method == "sparse" or model_shards() > 1:
        return sparse_decode(values, indices, w_dec)
    latents = dense_from_sparse(values.astype(w_dec.dtype), indices, w_dec.shape[0])
    return jnp.matmul(latents, w_dec, preferred_element_type=jnp.float32)


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
