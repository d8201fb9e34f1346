"""The jitted, mesh-sharded train step for one or several SAEs, and the loop around it.

Several SAEs (a sweep over widths, k, coefficients or layers) train in one step function on
the same batch of activation rows, each reading its own columns (its layer), so one pass of the
language model feeds all of them. Parameters and optimizer state are sharded by each
architecture's partition specs (latents over the model axis); batches split over the data axis.
The step is one pure function, jitted once, so it runs unchanged on 1 CPU, 8 emulated CPU
devices, a GPU, or a TPU slice.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from sae import sharding
from sae.arch import token_norm
from sae.arch.base import LossContext, Params, SparseAutoencoder
from sae.config import TrainConfig
from sae.errors import InputError
from sae.training.optimizer import learning_rate_schedule, make_optimizer
from sae.training.resampling import resample_dead

# A latent active on more than this fraction of tokens counts as dense.
DENSE_THRESHOLD = 0.1


@flax.struct.dataclass
class TrainState:
    params: Params
    buffers: Params
    opt_state: Any
    step: jax.Array
    rng: jax.Array  # raw uint32 key data, so it checkpoints like any array
    # Multiplier that brings raw activations to mean norm sqrt(d_model); fixed at init.
    input_scale: jax.Array
    # The same for a transcoder's targets (its input scale for an SAE).
    target_scale: jax.Array
    # Tokens seen since each latent last fired: dead-latent tracking over a token window.
    tokens_since_fired: jax.Array
    # Running firing frequency per latent over about one window: dense-latent tracking.
    fire_rate: jax.Array
    # Steps skipped for a non-finite batch, loss or gradient: in all, and in a row now.
    skipped_steps: jax.Array
    skip_streak: jax.Array
    # The first step at which the streak exceeded the limit (-1: never): sticky, so the host
    # sees it whenever it next reads the metrics.
    stopped_at: jax.Array


@dataclass(frozen=True)
class Member:
    """One SAE of the run and how it trains: its own settings are `sae.spec` (learning rate,
    resampling), the run's are `train` (schedule, Adam, sparsity warm-up)."""

    sae: SparseAutoencoder
    train: TrainConfig
    # Which columns of a batch row are this SAE's input (its layer's slice).
    columns: tuple[int, int] = (0, -1)
    # A transcoder's: which columns are its target (the MLP output's slice).
    target_columns: tuple[int, int] | None = None

    @property
    def optimizer(self) -> optax.GradientTransformation:
        return make_optimizer(self.sae.spec.learning_rate, self.train)

    @property
    def schedule(self) -> optax.Schedule:
        return learning_rate_schedule(self.sae.spec.learning_rate, self.train)

    def input_of(self, batch: Any) -> Any:
        """This SAE's columns of a batch, standardised per token if it trains so (before
        the input scale, which is then ~1)."""
        rows = _columns(batch, self.columns)
        if self.sae.normalize_tokens:
            return token_norm.standardize(rows.astype(jnp.float32))[0]
        return rows

    def target_of(self, batch: Any) -> Any:
        """What the SAE learns to output: a transcoder's target columns, else its input."""
        if self.target_columns is None:
            return self.input_of(batch)
        return _columns(batch, self.target_columns)


def _columns(batch: Any, columns: tuple[int, int]) -> Any:
    start, stop = columns
    return batch[:, start:] if stop == -1 else batch[:, start:stop]


def input_scale(sample: np.ndarray) -> float:
    """Factor that makes the mean activation norm sqrt(d_model) (SAELens' convention), so one
    coefficient means the same thing at every layer and model size."""
    mean_norm = float(np.mean(np.linalg.norm(sample, axis=-1)))
    return float(np.sqrt(sample.shape[-1]) / max(mean_norm, 1e-12))


def remove_parallel_component(grad: jax.Array, rows: jax.Array) -> jax.Array:
    """The gradient of unit-norm rows with the part that would change their norm removed."""
    return grad - jnp.sum(grad * rows, axis=1, keepdims=True) * rows


def normalize_rows(rows: jax.Array) -> jax.Array:
    return rows / jnp.maximum(jnp.linalg.norm(rows, axis=1, keepdims=True), 1e-12)


def _leaf_spec(path: tuple, leaf: Any, specs: dict[str, tuple]) -> tuple:
    # Optimizer moments mirror the parameter tree: shard them like the parameter they track.
    names = [p.key for p in path if isinstance(p, jax.tree_util.DictKey)]
    attrs = [p.name for p in path if isinstance(p, jax.tree_util.GetAttrKey)]
    ndim = getattr(leaf, "ndim", 0)
    if names and names[-1] in specs and len(specs[names[-1]]) == ndim:
        return specs[names[-1]]
    if attrs and attrs[-1] in ("tokens_since_fired", "fire_rate"):
        return (sharding.MODEL,)
    return ()


class StepTrainer:
    """Sharded states and the jitted step for the SAEs of one run, on one mesh."""

    def __init__(
        self,
        members: dict[str, Member],
        mesh: Mesh,
        dead_window_tokens: int = 10_000_000,
        max_skipped_steps: int = 20,
    ) -> None:
        self.members, self.mesh = members, mesh
        self.max_skipped_steps = max_skipped_steps
        # A float: token counts past int32 are ordinary over a long run.
        self.dead_window_tokens = float(dead_window_tokens)
        self.optimizers = {name: m.optimizer for name, m in members.items()}
        self.schedules = {name: m.schedule for name, m in members.items()}
        self.batch_sharding = sharding.batch_sharding(mesh)
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

    # --- state -------------------------------------------------------------------------

    def _fresh_state(
        self,
        name: str,
        key: jax.Array,
        sample: jax.Array,
        scale: jax.Array,
        target: jax.Array,
        target_scale: jax.Array,
    ):
        member = self.members[name]
        params = member.sae.init_params(key, sample * scale, target * target_scale)
        return TrainState(
            params=params,
            buffers=member.sae.init_buffers(),
            opt_state=self.optimizers[name].init(params),
            step=jnp.zeros((), jnp.int32),
            rng=jax.random.key_data(jax.random.fold_in(key, 1)),
            input_scale=jnp.asarray(scale, jnp.float32),
            target_scale=jnp.asarray(target_scale, jnp.float32),
            tokens_since_fired=jnp.zeros((member.sae.d_sae,), jnp.float32),
            fire_rate=jnp.zeros((member.sae.d_sae,), jnp.float32),
            skipped_steps=jnp.zeros((), jnp.int32),
            skip_streak=jnp.zeros((), jnp.int32),
            stopped_at=jnp.full((), -1, jnp.int32),
        )

    def _abstract_unsharded(self) -> dict[str, TrainState]:
        states = {}
        for index, (name, member) in enumerate(self.members.items()):
            sample = jax.ShapeDtypeStruct((1, member.sae.d_model), jnp.float32)
            scale = jax.ShapeDtypeStruct((), jnp.float32)
            states[name] = jax.eval_shape(
                lambda x, s, n=name, i=index: self._fresh_state(n, jax.random.key(i), x, s, x, s),
                sample,
                scale,
            )
        return states

    def _state_shardings(self) -> dict[str, TrainState]:
        shardings = {}
        for name, abstract in self._abstract_unsharded().items():
            specs = self.members[name].sae.partition_specs()
            shardings[name] = jax.tree_util.tree_map_with_path(
                lambda path, leaf, s=specs: sharding.named(self.mesh, *_leaf_spec(path, leaf, s)),
                abstract,
            )
        return shardings

    def abstract_state(self) -> dict[str, TrainState]:
        """Shapes, dtypes and shardings of the states (the restore target for checkpoints)."""
        return jax.tree.map(
            lambda leaf, sh: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sh),
            self._abstract_unsharded(),
            self.state_sharding,
        )

    def init_state(self, seed: int, sample: np.ndarray) -> dict[str, TrainState]:
        """Fresh states from a first batch of raw activation rows (all members' columns)."""
        if not np.isfinite(np.asarray(sample, np.float32)).all():
            # It sets the input scale and the decoder bias: it cannot be skipped.
            raise InputError(
                "the first batch, which initialises the SAEs, holds NaN or infinite values"
            )
        states = {}
        for index, (name, member) in enumerate(self.members.items()):
            rows = np.asarray(member.input_of(jnp.asarray(sample, jnp.float32)))
            targets = np.asarray(member.target_of(jnp.asarray(sample, jnp.float32)))
            key = jax.random.fold_in(jax.random.key(seed), index)
            with jax.set_mesh(self.mesh):
                init = jax.jit(
                    lambda k, x, s, t, ts, n=name: self._fresh_state(n, k, x, s, t, ts),
                    out_shardings=self.state_sharding[name],
                )
                states[name] = init(
                    key,
                    jnp.asarray(rows),
                    jnp.float32(input_scale(rows)),
                    jnp.asarray(targets),
                    jnp.float32(input_scale(targets)),
                )
        return states

    # --- step --------------------------------------------------------------------------

    def host_rows(self, batch_size: int) -> list[slice]:
        """The rows of a global batch that this host's devices hold, in order: all of them on
        one host; with several, this host's positions on the data axis (shared with the
        hosts that hold the other latents of the same rows, when the model axis spans hosts).
        """
        indices = self.batch_sharding.addressable_devices_indices_map((batch_size, 1))
        spans = sorted({index[0].indices(batch_size)[:2] for index in indices.values()})
        return [slice(start, stop) for start, stop in spans]

    def row_group(self, batch_size: int) -> tuple[int, int]:
        """(this host's group, number of groups), where a group is the hosts whose devices
        hold the same rows of each batch (several when the model axis spans hosts): such
        hosts must read the same data, and different groups different data."""
        spans: dict[int, set[tuple[int, int]]] = {}
        for device, index in self.batch_sharding.devices_indices_map((batch_size, 1)).items():
            spans.setdefault(device.process_index, set()).add(index[0].indices(batch_size)[:2])
        groups = sorted({frozenset(s) for s in spans.values()}, key=sorted)
        held = [row for group in groups for row in group]
        if len(held) != len(set(held)):
            raise ValueError("hosts hold overlapping but different rows of the batch")
        return groups.index(frozenset(spans[jax.process_index()])), len(groups)

    def put_batch(self, batch: np.ndarray, batch_size: int | None = None) -> jax.Array:
        """A global batch on the mesh. One host passes it whole; with several, each passes
        its own rows (`host_rows` of the `batch_size` rows, in that order)."""
        if jax.process_count() == 1:
            return jax.device_put(batch, self.batch_sharding)
        if batch_size is None:
            raise ValueError("several hosts: put_batch needs the global batch_size")
        shape = (batch_size, *batch.shape[1:])
        return jax.make_array_from_process_local_data(self.batch_sharding, batch, shape)

    def step(
        self, states: dict[str, TrainState], batch: np.ndarray | jax.Array
    ) -> tuple[dict[str, TrainState], dict[str, Any]]:
        """One optimizer step of every member on a batch of raw activation rows."""
        if not isinstance(batch, jax.Array):
            batch = self.put_batch(batch)
        # Tracing happens on the first call: the mesh must be current then (sparse_ops reads it).
        with jax.set_mesh(self.mesh):
            states, metrics = self.step_fn(states, batch)
        if self._synchronous:
            jax.block_until_ready(metrics)
        return states, metrics

    def _step(self, states: dict[str, TrainState], batch: jax.Array):
        new_states, metrics = {}, {}
        for name, member in self.members.items():
            x = member.input_of(batch) * states[name].input_scale
            target = x
            if member.target_columns is not None:
                target = member.target_of(batch) * states[name].target_scale
            new_states[name], member_metrics = self._member_step(name, states[name], x, target)
            metrics.update({f"{name}/{k}": v for k, v in member_metrics.items()})
        return new_states, metrics

    def _member_step(self, name: str, state: TrainState, x: jax.Array, target: jax.Array):
        member, sae = self.members[name], self.members[name].sae
        tokens = x.shape[0]
        # Linear ramp of the sparsity penalty (ReLU's L1, JumpReLU's L0) from 0.
        warmup = max(member.train.sparsity_warmup_steps, 1)
        ctx = LossContext(
            sparsity_scale=jnp.minimum((state.step + 1) / warmup, 1.0).astype(jnp.float32),
            dead=state.tokens_since_fired >= self.dead_window_tokens,
        )
        (loss, out), grads = jax.value_and_grad(sae.loss, has_aux=True)(
            state.params, state.buffers, x, ctx, target
        )
        if sae.unit_norm_decoder:
            grads = {
                **grads,
                "W_dec": remove_parallel_component(grads["W_dec"], state.params["W_dec"]),
            }
        updates, opt_state = self.optimizers[name].update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        if sae.unit_norm_decoder:
            params = {**params, "W_dec": normalize_rows(params["W_dec"])}
        buffers = sae.update_buffers(state.buffers, out, state.step)

        counts = out["fire_counts"]
        tokens_since_fired = jnp.where(counts > 0, 0.0, state.tokens_since_fired + tokens)
        rate_weight = min(1.0, tokens / self.dead_window_tokens)
        fire_rate = state.fire_rate + rate_weight * (counts / tokens - state.fire_rate)
        dead = tokens_since_fired >= self.dead_window_tokens
        key, resample_key = jax.random.split(jax.random.wrap_key_data(state.rng))
        if sae.spec.resample_every:
            due = ((state.step + 1) % sae.spec.resample_every == 0) & jnp.any(dead)
            params, opt_state = jax.lax.cond(
                due,
                lambda p, o: resample_dead(resample_key, p, o, dead, x, out["reconstruction"]),
                lambda p, o: (p, o),
                params,
                opt_state,
            )
            # A resampled latent gets a fresh window to prove itself.
            tokens_since_fired = jnp.where(due & dead, 0.0, tokens_since_fired)

        # A non-finite batch (an overflowing bf16 forward, a NaN in a file), loss or gradient
        # must never reach the weights: the whole update is dropped and counted.
        finite = jnp.isfinite(loss) & jnp.all(jnp.isfinite(x)) & jnp.all(jnp.isfinite(target))
        for leaf in jax.tree.leaves(grads):
            finite &= jnp.all(jnp.isfinite(leaf))

        def kept(new: Any, old: Any) -> Any:
            return jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)

        params, opt_state = kept(params, state.params), kept(opt_state, state.opt_state)
        buffers = kept(buffers, state.buffers)
        tokens_since_fired = kept(tokens_since_fired, state.tokens_since_fired)
        fire_rate = kept(fire_rate, state.fire_rate)
        streak = jnp.where(finite, 0, state.skip_streak + 1)
        over = (state.stopped_at < 0) & (streak > self.max_skipped_steps)
        stopped_at = jnp.where(over, state.step + 1, state.stopped_at)
        skipped_steps = state.skipped_steps + (~finite).astype(jnp.int32)

        metrics = {
            "loss": loss,
            **out["parts"],
            "l0": out["l0"],
            "fve": fraction_variance_explained(target, out["reconstruction"]),
            "dead_fraction": jnp.mean(dead),
            "dense_fraction": jnp.mean(fire_rate > DENSE_THRESHOLD),
            "grad_norm": optax.global_norm(grads),
            "learning_rate": self.schedules[name](state.step),
            "skipped_steps": skipped_steps,
            "skip_streak": streak,
            "stopped_at": stopped_at,
        }
        new_state = TrainState(
            params=params,
            buffers=buffers,
            opt_state=opt_state,
            step=state.step + 1,
            rng=jax.random.key_data(key),
            input_scale=state.input_scale,
            target_scale=state.target_scale,
            tokens_since_fired=tokens_since_fired,
            fire_rate=fire_rate,
            skipped_steps=skipped_steps,
            skip_streak=streak,
            stopped_at=stopped_at,
        )
        return new_state, metrics


def fraction_variance_explained(x: jax.Array, reconstruction: jax.Array) -> jax.Array:
    """On one training batch: a training-time signal, not an evaluation metric."""
    residual = jnp.sum((x - reconstruction) ** 2)
    variance = jnp.sum((x - jnp.mean(x, axis=0)) ** 2)
    return 1.0 - residual / jnp.maximum(variance, 1e-12)


def to_host(tree: Any) -> Any:
    """Numpy copies of (possibly sharded) arrays, on every host: with several hosts a
    collective (each holds only its shards), so every host must call it."""
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, tree)
    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


class NonFiniteSteps(InputError):
    """Too many consecutive steps had a non-finite batch, loss or gradient."""


def check_finite_steps(step: int, metrics: dict[str, float], limit: int) -> None:
    """Raises NonFiniteSteps when a member's skip streak went past `limit` (read from the
    logged metrics: the first such step is kept in the state, so no streak is missed)."""
    stopped = {
        key.rpartition("/")[0]: int(value)
        for key, value in metrics.items()
        if key.endswith("/stopped_at") and value >= 0
    }
    if stopped:
        first = min(stopped.values())
        names = ", ".join(sorted(n for n, at in stopped.items() if at == first))
        skipped = max(int(metrics[f"{n}/skipped_steps"]) for n in stopped)
        raise NonFiniteSteps(
            f"step {first}: {limit + 1} consecutive steps of {names} had a NaN or infinite "
            f"batch, loss or gradient (train.max_skipped_steps={limit}; {skipped} skipped "
            f"by step {step})"
        )


def agreed_stop(
    local: Callable[[], bool], host_max: Callable[[int], Any], lag: int = 2
) -> Callable[[], bool]:
    """`should_stop` for several hosts (`host_max`: a sharding.HostMax): a stop asked on any host
    (SIGTERM reaches them at different steps) is seen by all at the same step, `lag` steps
    later, so they checkpoint and leave together. Called once a step on every host; reading
    the vote of `lag` steps back waits only for the work queued before it, so the host still
    runs ahead of the device."""
    votes: deque[jax.Array] = deque()

    def should_stop() -> bool:
        votes.append(host_max(int(local())))
        return len(votes) > lag and bool(int(votes.popleft()))

    return should_stop


@dataclass
class LoopHooks:
    """Callbacks the loop calls; the job wires them to logging, checkpoints and progress."""

    on_metrics: Callable[[int, dict[str, float]], None] = lambda step, metrics: None
    on_checkpoint: Callable[[int, dict[str, TrainState]], None] = lambda step, state: None
    should_stop: Callable[[], bool] = lambda: False
    # After every step, before its checkpoint (SAE snapshots at chosen steps).
    after_step: Callable[[int, dict[str, TrainState]], None] = lambda step, states: None
    clock: Callable[[], float] = field(default=time.perf_counter)


def run_loop(
    trainer: StepTrainer,
    states: dict[str, TrainState],
    batches: Iterator[np.ndarray],
    steps: int,
    log_every: int,
    checkpoint_every: int,
    hooks: LoopHooks,
) -> dict[str, TrainState]:
    """Train from the states' step to `steps`; `batches` must already be positioned there.
    Logged metrics include `tokens_per_second` and `data_wait_fraction` (the share of the
    time spent waiting for the next batch) over the steps since the last log."""
    step = int(next(iter(states.values())).step)
    window_start, window_tokens, window_wait = hooks.clock(), 0, 0.0
    while step < steps:
        asked = hooks.clock()
        batch = next(batches, None)
        window_wait += hooks.clock() - asked
        if batch is None:
            raise RuntimeError("activation stream ended before training finished")
        states, metrics = trainer.step(states, batch)
        step += 1
        window_tokens += len(batch)
        if step % log_every == 0 or step == steps:
            values = {k: float(v) for k, v in jax.device_get(metrics).items()}
            now = hooks.clock()
            values["tokens_per_second"] = window_tokens / max(now - window_start, 1e-9)
            # The share of the loop's time spent getting batches (the step waiting on data).
            values["data_wait_fraction"] = window_wait / max(now - window_start, 1e-9)
            window_start, window_tokens, window_wait = now, 0, 0.0
            hooks.on_metrics(step, values)
            check_finite_steps(step, values, trainer.max_skipped_steps)
        hooks.after_step(step, states)
        saved = step % checkpoint_every == 0 or step == steps
        if saved:
            hooks.on_checkpoint(step, states)
        if hooks.should_stop():
            if not saved:  # a stop at a checkpoint step has its checkpoint already
                hooks.on_checkpoint(step, states)
            break
    return states
