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
