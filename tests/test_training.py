"""The train step: every architecture gives the same numbers sharded as on one device, keeps
its decoder constraint, tracks dead latents, compiles once, and follows its schedules."""

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sae import arch, sharding
from sae.arch import SaeSpec, SparseAutoencoder
from sae.config import TrainConfig
from sae.training.optimizer import learning_rate_schedule
from sae.training.step import (
    LoopHooks,
    Member,
    NonFiniteSteps,
    StepTrainer,
    remove_parallel_component,
    run_loop,
)

D, WIDTH = 16, 64


def _data(n: int = 512, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    directions = rng.normal(size=(64, D))
    codes = rng.exponential(size=(n, 64)) * (rng.random((n, 64)) < 0.05)
    return (codes @ directions + 0.5).astype(np.float32)


def _sae(architecture: str, **spec: Any) -> SparseAutoencoder:
    return arch.build(
        SaeSpec(architecture=architecture, learning_rate=1e-3, **spec), D, d_sae=WIDTH
    )


def _members(steps: int = 10) -> dict[str, Member]:
    # Warm-up 2 steps, decay over the last 3.
    train = TrainConfig(steps=steps, lr_warmup_steps=2, lr_decay_fraction=0.3)
    columns = (0, D)
    return {
        "relu": Member(_sae("relu", sparsity_coefficient=1.0, resample_every=2), train, columns),
        "topk": Member(_sae("topk", k=4), train, columns),
        "batchtopk": Member(_sae("batchtopk", k=4), train, columns),
        # Level widths 8 and 24 do not divide over 4 model shards: slices cross devices.
        "matryoshka": Member(
            _sae(
                "matryoshka_batchtopk",
                k=4,
                matryoshka_widths=(8, 32, WIDTH),
                use_matryoshka_aux_loss=True,
            ),
            train,
            columns,
        ),
        "jumprelu": Member(
            _sae("jumprelu", sparsity_coefficient=0.1),
            dataclasses.replace(train, sparsity_warmup_steps=3),
            columns,
        ),
        "jumprelu_quadratic": Member(
            _sae(
                "jumprelu",
                sparsity_coefficient=0.1,
                jumprelu_sparsity_loss_mode="quadratic",
                target_l0=6.0,
                pre_act_loss_coefficient=1e-3,
                # High enough that some latents die within the test's few steps.
                jumprelu_init_threshold=2.0,
            ),
            train,
            columns,
        ),
        "jumprelu_tanh": Member(
            _sae("jumprelu", sparsity_coefficient=0.1, jumprelu_sparsity_loss_mode="tanh"),
            train,
            columns,
        ),
    }


def _run(mesh_shape, devices, steps: int = 5):
    x = _data()
    # A short dead window so AuxK and resampling are exercised within the few steps.
    trainer = StepTrainer(_members(), sharding.make_mesh(*mesh_shape, devices=devices), 128)
    states = trainer.init_state(seed=0, sample=x)
    metrics = []
    for i in range(steps):
        states, step_metrics = trainer.step(states, x[(i * 128) % 512 :][:128])
        metrics.append(jax.device_get(step_metrics))
    return (
        trainer,
        metrics,
        jax.tree.map(np.asarray, {k: (s.params, s.buffers) for k, s in states.items()}),
    )


@functools.cache
def _single_device():
    return _run((1, 1), jax.devices()[:1])


def test_eight_devices_are_available():
    assert len(jax.devices()) == 8, "tests expect XLA_FLAGS to emulate 8 CPU devices"


@pytest.mark.parametrize("mesh_shape", [(8, 1), (2, 4)])
def test_sharded_step_matches_single_device(mesh_shape):
    _, single_metrics, single = _single_device()
    _, sharded_metrics, sharded = _run(mesh_shape, jax.devices())
    for key, want in single_metrics[-1].items():
        np.testing.assert_allclose(
            sharded_metrics[-1][key], want, rtol=1e-4, atol=1e-5, err_msg=key
        )
    for got, want in zip(jax.tree.leaves(sharded), jax.tree.leaves(single), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_step_compiles_once_and_decoder_constraints_hold():
    trainer, metrics, states = _single_device()
    assert trainer.step_fn._cache_size() == 1
    for name, (params, _) in states.items():
        norms = np.linalg.norm(params["W_dec"], axis=1)
        if trainer.members[name].sae.unit_norm_decoder:
            np.testing.assert_allclose(norms, 1.0, rtol=1e-5)
        else:
            assert np.ptp(norms) > 1e-4, "ReLU's decoder rows are free"
    # AuxK ran once latents were dead; every loss part and metric is finite.
    assert max(m["topk/auxk"] for m in metrics) > 0
    assert max(m["matryoshka/auxk"] for m in metrics) > 0
    assert max(m["jumprelu_quadratic/pre_act_loss"] for m in metrics) > 0
    assert all(np.isfinite(v) for m in metrics for v in m.values())


def test_parameters_are_sharded_over_the_model_axis():
    trainer = StepTrainer(_members(), sharding.make_mesh(2, 4), 256)
    states = trainer.init_state(0, _data())
    w_enc = states["topk"].params["W_enc"]
    assert w_enc.sharding.spec == jax.sharding.PartitionSpec(None, "model")
    assert {s.data.shape for s in w_enc.addressable_shards} == {(D, WIDTH // 4)}
    assert states["jumprelu"].params["log_threshold"].sharding.spec == jax.sharding.PartitionSpec(
        "model"
    )


def test_parallel_gradient_component_is_removed():
    rows = np.random.default_rng(0).normal(size=(8, 5))
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    grad = np.random.default_rng(1).normal(size=(8, 5))
    tangent = remove_parallel_component(jnp.asarray(grad), jnp.asarray(rows))
    np.testing.assert_allclose(np.sum(np.asarray(tangent) * rows, axis=1), 0.0, atol=1e-6)


def test_learning_rate_schedule_warms_up_holds_and_decays():
    train = TrainConfig(steps=100, lr_warmup_steps=10, lr_decay_fraction=0.2)
    schedule = learning_rate_schedule(1.0, dataclasses.replace(train, lr_final_fraction=0.1))
    assert float(schedule(0)) == 0.0
    assert float(schedule(5)) == pytest.approx(0.5)
    assert float(schedule(50)) == pytest.approx(1.0)
    assert float(schedule(90)) == pytest.approx(0.55)
    assert float(schedule(100)) == pytest.approx(0.1)
    cosine = learning_rate_schedule(
        1.0, dataclasses.replace(train, lr_warmup_steps=0, lr_decay_shape="cosine")
    )
    assert float(cosine(90)) == pytest.approx(0.5, abs=1e-6)


def test_resampling_points_dead_latents_at_badly_reconstructed_inputs():
    from sae.training.resampling import resample_dead

    x = jnp.asarray(_data(64))
    sae = _sae("relu")
    params = sae.init_params(jax.random.key(0), x)
    opt_state = optax.adam(1e-3).init(params)
    opt_state = jax.tree.map(lambda a: a + 1.0 if a.dtype == jnp.float32 else a, opt_state)
    dead = jnp.arange(WIDTH) < 5
    reconstruction = x.at[3].add(100.0)  # only input 3 is badly reconstructed
    new, new_opt = resample_dead(jax.random.key(1), params, opt_state, dead, x, reconstruction)
    direction = (x[3] - params["b_dec"]) / jnp.linalg.norm(x[3] - params["b_dec"])
    np.testing.assert_allclose(new["W_dec"][:5], np.tile(direction, (5, 1)), rtol=1e-5)
    np.testing.assert_array_equal(new["W_dec"][5:], params["W_dec"][5:])
    assert float(jnp.abs(new["b_enc"][:5]).max()) == 0.0
    mu = new_opt[0].mu
    assert (
        float(jnp.abs(mu["W_enc"][:, :5]).max()) == 0.0 and float(mu["W_enc"][:, 5:].min()) == 1.0
    )


@pytest.mark.parametrize("architecture", ["batchtopk", "jumprelu"])
def test_token_standardisation_makes_training_blind_to_each_tokens_scale(architecture):
    """With normalize_tokens, rescaling every token by its own factor changes nothing: the
    first batch (input scale, decoder bias) and every step see standardised tokens."""
    x = _data()
    factors = np.random.default_rng(3).uniform(0.3, 3.0, size=(len(x), 1)).astype(np.float32)
    run = TrainConfig(steps=4, lr_warmup_steps=0, lr_decay_fraction=0.0)
    options = {"k": 4} if architecture == "batchtopk" else {}
    sae = _sae(architecture, normalize_tokens=True, **options)

    def train(data: np.ndarray):
        mesh = _single_device()[0].mesh
        trainer = StepTrainer({"sae": Member(sae, run, (0, D))}, mesh, 128)
        states = trainer.init_state(seed=0, sample=data)
        for i in range(4):
            states, _ = trainer.step(states, data[i * 128 : (i + 1) * 128])
        return jax.tree.map(np.asarray, states["sae"].params)

    plain, rescaled = train(x), train(x * factors)
    # Rounding can move a pre-activation across JumpReLU's kernel edge: a loose atol.
    for key in plain:
        np.testing.assert_allclose(rescaled[key], plain[key], rtol=1e-3, atol=5e-3, err_msg=key)
    raw = _sae(architecture, **options)  # without it, the scales matter
    with_scales = StepTrainer({"sae": Member(raw, run, (0, D))}, _single_device()[0].mesh, 128)
    assert not np.allclose(
        with_scales.init_state(0, x)["sae"].params["b_dec"],
        with_scales.init_state(0, x * factors)["sae"].params["b_dec"],
    )


def test_a_stop_at_a_checkpoint_step_saves_it_once():
    """SIGTERM noticed at a step that was just checkpointed: one save, one announcement."""
    trainer = StepTrainer(_members(), _single_device()[0].mesh, 128)
    x = _data()
    states = trainer.init_state(0, x[:128])
    saved: list[int] = []
    hooks = LoopHooks(
        on_checkpoint=lambda step, _: saved.append(step), should_stop=lambda: len(saved) > 0
    )
    batches = (x[i * 128 : (i + 1) * 128] for i in range(4))
    run_loop(trainer, states, batches, steps=10, log_every=5, checkpoint_every=2, hooks=hooks)
    assert saved == [2]


def test_a_non_finite_batch_is_skipped_and_counted():
    """One NaN row in one batch: that step leaves every SAE as it was (weights, optimizer
    state, buffers, dead-latent counts), the count says so, and training goes on."""
    x = _data()
    trainer = StepTrainer(_members(), _single_device()[0].mesh, 128, max_skipped_steps=2)
    states = trainer.init_state(0, x[:128])
    states, _ = trainer.step(states, x[:128])
    before = jax.tree.map(np.asarray, states)
    poisoned = x[128:256].copy()
    poisoned[7, 3] = np.nan
    states, metrics = trainer.step(states, poisoned)
    after = jax.tree.map(np.asarray, states)
    for name in before:
        for field_name in ("params", "opt_state", "buffers", "tokens_since_fired", "fire_rate"):
            for got, want in zip(
                jax.tree.leaves(getattr(after[name], field_name)),
                jax.tree.leaves(getattr(before[name], field_name)),
                strict=True,
            ):
                np.testing.assert_array_equal(got, want, err_msg=f"{name}.{field_name}")
        assert int(after[name].step) == 2 and int(after[name].skipped_steps) == 1
        assert float(metrics[f"{name}/skip_streak"]) == 1
    states, metrics = trainer.step(states, x[256:384])
    assert all(float(metrics[f"{n}/skip_streak"]) == 0 for n in states)
    assert all(np.isfinite(np.asarray(s.params["W_dec"])).all() for s in states.values())


def test_too_many_non_finite_steps_in_a_row_stop_the_loop():
    x = _data()
    trainer = StepTrainer(_members(), _single_device()[0].mesh, 128, max_skipped_steps=1)
    states = trainer.init_state(0, x[:128])
    bad = np.full((128, D), np.inf, np.float32)
    batches = iter([x[:128], bad, bad, x[:128]])
    with pytest.raises(
        NonFiniteSteps,
        match=r"^step 3: 2 consecutive steps of batchtopk, jumprelu, .*, topk had a NaN",
    ):
        run_loop(
            trainer, states, batches, steps=4, log_every=4, checkpoint_every=4, hooks=LoopHooks()
        )


def test_the_loop_logs_the_share_of_its_time_spent_waiting_for_data():
    """A clock the test drives: getting each batch costs 3 ticks, the rest of a step 1."""
    from sae.data.prefetch import Prefetched

    trainer = StepTrainer(_members(), _single_device()[0].mesh, 128)
    x = _data()
    states = trainer.init_state(0, x[:128])
    now = {"t": 0.0}

    def slow_batches():
        for i in range(4):
            now["t"] += 3.0
            yield x[i * 128 : (i + 1) * 128]

    def clock() -> float:
        now["t"] += 0.5  # read twice per step: around `next`, then by the window's end
        return now["t"]

    logged: list[dict[str, float]] = []
    hooks = LoopHooks(on_metrics=lambda step, m: logged.append(m), clock=clock)
    run_loop(
        trainer, states, slow_batches(), steps=4, log_every=4, checkpoint_every=10, hooks=hooks
    )
    # The window opens at 0.5 and closes at 17.0; each step waits 3.5 ticks (3 + one read).
    assert logged[-1]["data_wait_fraction"] == pytest.approx(4 * 3.5 / 16.5)
    # Prefetched on a thread, the same batches arrive in the same order.
    states = trainer.init_state(0, x[:128])
    feed = Prefetched(iter([x[i * 128 : (i + 1) * 128] for i in range(4)]), trainer.put_batch)
    with_thread = run_loop(trainer, states, feed, 4, 4, 10, LoopHooks())
    states = trainer.init_state(0, x[:128])
    in_line = run_loop(
        trainer, states, iter([x[i * 128 : (i + 1) * 128] for i in range(4)]), 4, 4, 10, LoopHooks()
    )
    for name in in_line:
        np.testing.assert_array_equal(
            with_thread[name].params["W_dec"], in_line[name].params["W_dec"]
        )
