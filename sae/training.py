"""The jitted, mesh-sharded SAE train step and the loop around it.

Parameters and optimizer state are sharded by the architecture's partition specs (latents over
the model axis); batches are split over the data axis. The step is one pure function, jitted
once, so it runs unchanged on 1 CPU, 8 emulated CPU devices, a GPU, or a TPU slice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from sae import sharding
from sae.arch.base import Params, SparseAutoencoder


@flax.struct.dataclass
class TrainState:
    params: Params
    opt_state: Any
    step: jax.Array
    # Tokens seen since each latent last fired: dead-latent tracking over a token window.
    tokens_since_fired: jax.Array


def make_optimizer(learning_rate: float) -> optax.GradientTransformation:
    return optax.adam(learning_rate)


def input_scale(sample: np.ndarray) -> float:
    """Factor that makes the mean activation norm sqrt(d_model) (SAELens' convention), so one
    L1 coefficient means the same thing at every layer and model size."""
    mean_norm = float(np.mean(np.linalg.norm(sample, axis=-1)))
    return float(np.sqrt(sample.shape[-1]) / max(mean_norm, 1e-12))


def _leaf_spec(path: tuple, leaf: Any, specs: dict[str, tuple]) -> tuple:
    # Optimizer moments mirror the parameter tree: shard them like the parameter they track.
    names = [p.key for p in path if isinstance(p, jax.tree_util.DictKey)]
    if names and names[-1] in specs and len(specs[names[-1]]) == getattr(leaf, "ndim", 0):
        return specs[names[-1]]
    if getattr(leaf, "ndim", 0) == 1 and names and names[-1] == "tokens_since_fired":
        return (sharding.MODEL,)
    return ()


class Trainer:
    """Builds the sharded state and the jitted step for one SAE on one mesh."""

    def __init__(
        self,
        sae: SparseAutoencoder,
        learning_rate: float,
        mesh: Mesh,
        dead_window_tokens: int = 10_000_000,
    ) -> None:
        self.sae, self.mesh = sae, mesh
        self.dead_window_tokens = dead_window_tokens
        self.optimizer = make_optimizer(learning_rate)
        self.batch_sharding = sharding.batch_sharding(mesh)
        self._specs = sae.partition_specs()
        # Emulated CPU devices share one small thread pool: with several sharded steps in
        # flight, their collectives can wait on each other forever. Run them one at a time.
        self._synchronous = jax.default_backend() == "cpu" and mesh.devices.size > 1
        self.state_sharding = self._state_shardings()
        self.step_fn = jax.jit(
            self._step,
            in_shardings=(self.state_sharding, self.batch_sharding),
            out_shardings=(self.state_sharding, sharding.replicated(mesh)),
            donate_argnums=0,
        )

    def _abstract_unsharded(self) -> TrainState:
        sample = jax.ShapeDtypeStruct((1, self.sae.d_model), jnp.float32)
        return jax.eval_shape(
            lambda x: self._state_from_params(self.sae.init_params(jax.random.key(0), x)), sample
        )

    def _state_shardings(self) -> TrainState:
        return jax.tree_util.tree_map_with_path(
            lambda path, leaf: sharding.named(self.mesh, *_leaf_spec(path, leaf, self._specs)),
            self._abstract_unsharded(),
        )

    def abstract_state(self) -> TrainState:
        """Shapes, dtypes and shardings of the state (the restore target for checkpoints)."""
        return jax.tree.map(
            lambda leaf, sh: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sh),
            self._abstract_unsharded(),
            self.state_sharding,
        )

    def _state_from_params(self, params: Params) -> TrainState:
        return TrainState(
            params=params,
            opt_state=self.optimizer.init(params),
            step=jnp.zeros((), jnp.int32),
            tokens_since_fired=jnp.zeros((self.sae.d_sae,), jnp.float32),
        )

    def init_state(self, seed: int, sample: np.ndarray) -> TrainState:
        init = jax.jit(
            lambda key, x: self._state_from_params(self.sae.init_params(key, x)),
            out_shardings=self.state_sharding,
        )
        return init(jax.random.key(seed), jnp.asarray(sample))

    def put_batch(self, batch: np.ndarray) -> jax.Array:
        return jax.device_put(batch, self.batch_sharding)

    def step(self, state: TrainState, batch: np.ndarray) -> tuple[TrainState, dict[str, Any]]:
        """One optimizer step on a host batch."""
        state, metrics = self.step_fn(state, self.put_batch(batch))
        if self._synchronous:
            jax.block_until_ready(metrics)
        return state, metrics

    def _step(self, state: TrainState, x: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]:
        (loss, aux), grads = jax.value_and_grad(self.sae.loss, has_aux=True)(state.params, x)
        updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        fired = jnp.any(aux["latents"] > 0, axis=0)
        tokens_since_fired = jnp.where(fired, 0.0, state.tokens_since_fired + x.shape[0])
        metrics = batch_metrics(x, aux["reconstruction"], aux["latents"])
        metrics.update(
            loss=loss,
            mse=aux["mse"],
            sparsity=aux["l1"],
            grad_norm=optax.global_norm(grads),
            dead_fraction=jnp.mean(tokens_since_fired >= self.dead_window_tokens),
        )
        new_state = TrainState(
            params=params,
            opt_state=opt_state,
            step=state.step + 1,
            tokens_since_fired=tokens_since_fired,
        )
        return new_state, metrics


def batch_metrics(
    x: jax.Array, reconstruction: jax.Array, latents: jax.Array
) -> dict[str, jax.Array]:
    """L0 and fraction of variance explained on one batch (training-time signals only)."""
    residual = jnp.sum((x - reconstruction) ** 2)
    variance = jnp.sum((x - jnp.mean(x, axis=0)) ** 2)
    return {
        "l0": jnp.mean(jnp.sum(latents > 0, axis=-1)),
        "fve": 1.0 - residual / jnp.maximum(variance, 1e-12),
    }


@dataclass
class LoopHooks:
    """Callbacks the loop calls; the job wires them to logging, checkpoints and progress."""

    on_metrics: Callable[[int, dict[str, float]], None] = lambda step, metrics: None
    on_checkpoint: Callable[[int, TrainState], None] = lambda step, state: None
    should_stop: Callable[[], bool] = lambda: False


def run_loop(
    trainer: Trainer,
    state: TrainState,
    batches: Iterator[np.ndarray],
    steps: int,
    scale: float,
    log_every: int,
    checkpoint_every: int,
    hooks: LoopHooks,
) -> TrainState:
    """Train from `state.step` to `steps`; `batches` must already be positioned at that step."""
    step = int(state.step)
    while step < steps:
        batch = next(batches, None)
        if batch is None:
            raise RuntimeError("activation stream ended before training finished")
        state, metrics = trainer.step(state, batch * scale)
        step += 1
        if step % log_every == 0 or step == steps:
            hooks.on_metrics(step, {k: float(v) for k, v in metrics.items()})
        if step % checkpoint_every == 0 or step == steps:
            hooks.on_checkpoint(step, state)
        if hooks.should_stop():
            hooks.on_checkpoint(step, state)
            break
    return state
