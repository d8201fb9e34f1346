"""sae.training.checkpoint on the GCS emulator: async Orbax saves through tensorstore, for real."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sae.io import storage
from sae.training.checkpoint import Checkpointer

pytestmark = pytest.mark.gcs


def test_the_emulator_gives_tensorstore_object_generations(gcs_bucket_uri: str) -> None:
    """Orbax's OCDBT commits rewrite manifest.ocdbt conditioned on the generation tensorstore
    last saw; a read that loses it (generation 0) fails the next commit with "Malformed
    StorageGeneration". See _serve_emulator in conftest.py."""
    import tensorstore as ts

    bucket, _, prefix = gcs_bucket_uri.removeprefix("gs://").partition("/")
    kv = ts.KvStore.open({"driver": "gcs", "bucket": bucket, "path": f"{prefix}/"}).result()
    written = kv.write("manifest.ocdbt", b"one").result().generation
    read = kv.read("manifest.ocdbt").result()
    assert read.value == b"one"
    assert read.stamp.generation == written
    ranged = kv.read("manifest.ocdbt", byte_range=slice(1, 2)).result()
    assert (ranged.value, ranged.stamp.generation) == (b"n", written)
    kv.write("manifest.ocdbt", b"two", if_equal=read.stamp.generation).result()
    assert kv.read("manifest.ocdbt").result().value == b"two"


def _state(mesh: Mesh, k: int) -> dict:
    """A small training-state-like tree: sharded over the model axis, replicated, scalars."""

    def put(x: jax.Array, *spec: str | None) -> jax.Array:
        return jax.device_put(x, NamedSharding(mesh, P(*spec)))

    params = {
        "W_enc": put(jnp.full((16, 64), k, jnp.float32), None, "model"),
        "W_dec": put(jnp.full((64, 16), k, jnp.float32), "model", None),
        "b_enc": put(jnp.full((64,), k, jnp.float32), "model"),
        "b_dec": put(jnp.full((16,), k, jnp.float32)),
    }
    return {
        "params": params,
        "mu": jax.tree.map(lambda x: 2 * x, params),
        "nu": jax.tree.map(lambda x: 3 * x, params),
        "step": jnp.asarray(k, jnp.int32),
    }


def test_async_checkpoints_save_and_restore_on_gcs(gcs_bucket_uri: str) -> None:
    """Several async saves in a row (each waits for the previous), like a training run."""
    mesh = Mesh(np.array(jax.devices()).reshape(2, -1), ("data", "model"))
    directory = storage.join(gcs_bucket_uri, "sae", "checkpoints")
    checkpoints = Checkpointer(directory)
    for step in range(10, 70, 10):
        checkpoints.save(step, _state(mesh, step), {"step": step, "input_scale": 0.5})
    checkpoints.close()

    reopened = Checkpointer(directory)
    assert reopened.latest_step() == 60
    assert reopened.manager.all_steps() == [50, 60]  # max_to_keep=2 deleted the rest
    expected = _state(mesh, 60)
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), expected
    )
    state, record = reopened.restore(60, abstract)
    reopened.close()
    assert record == {"step": 60, "input_scale": 0.5}
    for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(expected), strict=True):
        assert got.sharding == want.sharding
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
