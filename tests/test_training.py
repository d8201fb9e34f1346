"""The sharded train step: same numbers on 8 emulated devices as on one, and it learns."""

import jax
import numpy as np
import pytest

from sae import sharding
from sae.arch import ReluSAE
from sae.training import Trainer, input_scale


def _data(n: int = 512, d: int = 16, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    directions = rng.normal(size=(64, d))
    codes = rng.exponential(size=(n, 64)) * (rng.random((n, 64)) < 0.05)
    return (codes @ directions + 0.5).astype(np.float32)


def _run(mesh_shape: tuple[int, int], devices, steps: int = 5) -> tuple[list[float], dict]:
    x = _data()
    sae = ReluSAE(d_model=16, d_sae=64, l1_coefficient=1.0)
    mesh = sharding.make_mesh(*mesh_shape, devices=devices)
    trainer = Trainer(sae, learning_rate=1e-3, mesh=mesh)
    state = trainer.init_state(seed=0, sample=x)
    losses = []
    for i in range(steps):
        batch = x[(i * 128) % 512 :][:128]
        state, metrics = trainer.step(state, batch)
        losses.append(float(metrics["loss"]))
    return losses, jax.tree.map(np.asarray, state.params)


def test_eight_devices_are_available():
    assert len(jax.devices()) == 8, "tests expect XLA_FLAGS to emulate 8 CPU devices"


@pytest.mark.parametrize("mesh_shape", [(8, 1), (4, 2), (2, 4)])
def test_sharded_step_matches_single_device(mesh_shape):
    single_losses, single_params = _run((1, 1), jax.devices()[:1])
    sharded_losses, sharded_params = _run(mesh_shape, jax.devices())
    np.testing.assert_allclose(sharded_losses, single_losses, rtol=1e-5)
    for name in single_params:
        np.testing.assert_allclose(sharded_params[name], single_params[name], rtol=1e-4, atol=1e-6)


def test_parameters_are_sharded_over_the_model_axis():
    mesh = sharding.make_mesh(2, 4)
    trainer = Trainer(ReluSAE(d_model=16, d_sae=64), learning_rate=1e-3, mesh=mesh)
    state = trainer.init_state(0, _data())
    w_enc = state.params["W_enc"]
    assert w_enc.sharding.spec == jax.sharding.PartitionSpec(None, "model")
    assert {s.data.shape for s in w_enc.addressable_shards} == {(16, 16)}


def test_training_reduces_loss_and_explains_variance():
    x = _data(n=2048)
    scale = input_scale(x)
    sae = ReluSAE(d_model=16, d_sae=64, l1_coefficient=0.5)
    trainer = Trainer(sae, learning_rate=3e-3, mesh=sharding.make_mesh())
    state = trainer.init_state(0, x * scale)
    first = None
    for i in range(300):
        batch = x[(i * 256) % 2048 :][:256] * scale
        state, metrics = trainer.step(state, batch)
        first = first if first is not None else float(metrics["loss"])
    assert float(metrics["loss"]) < 0.5 * first
    assert float(metrics["fve"]) > 0.8
    assert 0 < float(metrics["l0"]) < 64
