"""Top-k, BatchTopK's cut-off and sparse decoding: exact under every mesh, gradients included."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sae import sharding
from sae.arch import sparse_ops


def _objective(pre, w_dec):
    values, indices = sparse_ops.top_k(pre, 5)
    reconstruction = sparse_ops.sparse_decode(jax.nn.relu(values), indices, w_dec)
    cutoff = sparse_ops.kth_largest(jax.nn.relu(pre), 20)
    return jnp.sum(reconstruction**2) + cutoff, (values, indices, cutoff)


def _inputs():
    rng = np.random.default_rng(0)
    return rng.normal(size=(16, 64)).astype(np.float32), rng.normal(size=(64, 8)).astype(np.float32)


def test_unsharded_ops_match_numpy():
    pre, w_dec = _inputs()
    values, indices = sparse_ops.top_k(jnp.asarray(pre), 5)
    np.testing.assert_array_equal(indices, np.argsort(-pre, axis=1)[:, :5])
    dense = sparse_ops.dense_from_sparse(values, indices, 64)
    np.testing.assert_allclose(
        sparse_ops.sparse_decode(values, indices, jnp.asarray(w_dec)), dense @ w_dec, rtol=1e-5
    )
    positive = np.abs(pre)
    for n in (1, 20, positive.size):
        assert (
            float(sparse_ops.kth_largest(jnp.asarray(positive), n)) == np.sort(positive.ravel())[-n]
        )


@pytest.mark.parametrize("mesh_shape", [(2, 4), (1, 8), (8, 1)])
def test_sharded_ops_and_gradients_are_exact(mesh_shape):
    pre, w_dec = _inputs()
    grad_fn = jax.value_and_grad(_objective, argnums=(0, 1), has_aux=True)
    reference = grad_fn(pre, w_dec)
    mesh = sharding.make_mesh(*mesh_shape)
    with jax.set_mesh(mesh):
        sharded = jax.jit(grad_fn)(
            jax.device_put(pre, NamedSharding(mesh, P("data", "model"))),
            jax.device_put(w_dec, NamedSharding(mesh, P("model", None))),
        )
    for got, want in zip(jax.tree.leaves(sharded), jax.tree.leaves(reference), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("digit_bits", "histogram"), [(1, False), (3, False), (4, False), (5, True), (16, True)]
)
def test_radix_select_is_exact_for_every_method(digit_bits, histogram):
    """Ties, zeros (half the entries after a ReLU), a huge value and n past the positives."""
    rng = np.random.default_rng(digit_bits)
    values = np.maximum(rng.normal(size=(32, 96)), 0).astype(np.float32)
    values[0, :10] = 0.5  # ties straddling some cut-offs
    values[3, 7] = 6.5e4  # a massive activation, like Gemma's outlier dimensions
    ranked = np.sort(values.ravel())[::-1]
    ns = (1, 2, 11, 700, int((values > 0).sum()), values.size)
    for n in ns:
        got = sparse_ops.kth_largest(jnp.asarray(values), n, digit_bits, histogram)
        assert float(got) == ranked[n - 1], (n, digit_bits)
    with jax.set_mesh(sharding.make_mesh(2, 4)):
        sharded = jax.device_put(
            values, NamedSharding(sharding.make_mesh(2, 4), P("data", "model"))
        )
        for n in ns:
            got = jax.jit(lambda v, n=n: sparse_ops.kth_largest(v, n, digit_bits, histogram))(
                sharded
            )
            assert float(got) == ranked[n - 1], (n, digit_bits, "sharded")


def test_row_kth_largest_matches_top_k():
    rng = np.random.default_rng(3)
    values = np.maximum(rng.normal(size=(40, 70)), 0).astype(np.float32)
    values[5, :9] = 1.25  # ties
    for k in (1, 8, 30, 70):
        want = np.sort(values, axis=1)[:, -k][:, None]
        np.testing.assert_array_equal(sparse_ops.row_kth_largest(jnp.asarray(values), k), want)


def test_sparse_and_dense_decode_agree_in_value_and_gradient():
    """TopK's two decodes (the backend picks one by shape): the same output and gradients."""
    rng = np.random.default_rng(4)
    pre = jnp.asarray(rng.normal(size=(24, 96)), jnp.float32)
    values, indices = sparse_ops.top_k(pre, 6)
    w_dec = jnp.asarray(rng.normal(size=(96, 16)), jnp.float32)

    def loss(values, w_dec, method):
        return jnp.sum(sparse_ops.decode(jax.nn.relu(values), indices, w_dec, method) ** 2)

    results = {
        m: jax.value_and_grad(loss, argnums=(0, 1))(values, w_dec, m) for m in ("sparse", "dense")
    }
    for got, want in zip(
        jax.tree.leaves(results["dense"]), jax.tree.leaves(results["sparse"]), strict=True
    ):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert sparse_ops._decode_method(96, 6) == "dense"  # CPU: 16 latents per selected one
    assert sparse_ops._decode_method(16384, 64) == "sparse"
