"""The training run (the train stage, `sae.train`): activation rows (streamed from the
language model, or read from a store or .npy files) into one or several SAEs on the mesh.

Checkpoints every `train.checkpoint_every` steps. A re-run resumes from the latest one: the
streaming source replays its seeded stream to the checkpoint's position, the .npy source
computes it directly, so a resumed run sees exactly the batches a straight run would. SIGTERM
(a spot TPU's preemption notice) saves a checkpoint and exits with code 75 so a supervisor
knows to retry.

`train.init_from` warm-starts a fresh run from another run's final checkpoint (weights,
buffers and input scale of the same SAEs); the optimizer and the learning-rate schedule start
afresh. Scheduled retraining (jobs/cloud/retrain.py) uses it to continue from the latest good run.

Several hosts (jax.distributed) train one set of SAEs on global batches that each host
contributes its devices' rows to. From .npy files every host reads the same seeded order and
keeps its rows of each batch. From a store each group of hosts holding the same rows reads its
own chunks of each epoch (about 1/hosts of the store; activation_store.ShuffledReader).
Streaming, host p runs the model over train shards p::n (train.lm_batch_size sequences per host
and forward) into its own shuffle buffer, epochs repeating as on one host; the hosts agree on
the forwards before each step (activations.LockstepBatches) and on when to stop after a
SIGTERM. All hosts save and restore the checkpoints (Orbax coordinates them); process 0 alone
writes the metrics, the SAEs and the manifest.
"""

from __future__ import annotations

import dataclasses
import itertools
import signal
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from sae import arch, sharding
from sae.config import PipelineConfig, TrainConfig
from sae.data import activations, batches, prefetch
from sae.errors import ConfigError, InputError, Preempted
from sae.io import manifest, saelens, storage
from sae.io.stages import StageOutput, run_stage
from sae.model import lm
from sae.progress import Progress, log
from sae.sharding import HostMax
from sae.training.checkpoint import Checkpointer
from sae.training.metrics_log import MetricsLog
from sae.training.step import (
    LoopHooks,
    Member,
    NonFiniteSteps,
    StepTrainer,
    TrainState,
    agreed_stop,
    run_loop,
    to_host,
)

# Under the train output: each checkpoint's stream position per host (streaming runs).
STREAM_POSITIONS = "stream-positions"
# Keys that change how a run is observed, not what it computes: a checkpoint written under
# other values of these can still be resumed.
_OBSERVATIONAL_KEYS = ("log_every", "checkpoint_every")


def _check_mesh(cfg: TrainConfig, mesh, d_model: int) -> None:
    data, model = mesh.devices.shape
    # With several hosts, each runs the model on lm_batch_size sequences of its own.
    lm_split = data if jax.process_count() == 1 else len(_host_data_positions(mesh))
    for key, split in (("batch_size", data), ("lm_batch_size", lm_split)):
        if getattr(cfg, key) % split:
            raise ConfigError(
                f"train.{key}={getattr(cfg, key)} is not divisible by the mesh's "
                f"data axis ({split} devices{' on this host' if split != data else ''})"
            )
    for index, sae_cfg in enumerate(cfg.saes):
        sae_cfg.check_against_model(f"train.saes[{index}]", d_model, model)
    if jax.process_count() > 1:
        _check_hosts(cfg, mesh)


def _host_data_positions(mesh) -> set[int]:
    local = set(mesh.local_devices)
    return {row for row, devices in enumerate(mesh.devices) if local & set(devices)}


def _check_hosts(cfg: TrainConfig, mesh) -> None:
    """Every host feeds the mesh its share of each batch: so each needs equally many of its
    devices on it; streaming, each host's rows are its own, so no position of the data axis
    may span two hosts (the model axis must stay within a host)."""
    processes = jax.process_count()
    if len(mesh.local_devices) * processes != mesh.devices.size:
        raise ConfigError(
            f"train mesh {mesh.devices.shape[0]}x{mesh.devices.shape[1]} does not take the same "
            f"number of devices from each of the {processes} hosts: use mesh_data=-1"
        )
    if cfg.source == "stream":
        for row in mesh.devices:
            if len({device.process_index for device in row}) > 1:
                raise ConfigError(
                    f"train.mesh_model={cfg.mesh_model} spans hosts; streaming needs the model "
                    "axis within one host (or train from an activation store)"
                )


def _resume_key(cfg: TrainConfig, inputs: dict[str, str]) -> str:
    semantic = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _OBSERVATIONAL_KEYS}
    return manifest.digest({"config": semantic, "inputs": inputs})


def _resume_step(checkpoints: Checkpointer, resume_key: str) -> int | None:
    """The step of an unfinished run to resume, None to start fresh; refuses a checkpoint
    that another config or input wrote (resuming it would silently mix two runs)."""
    step = checkpoints.latest_step()
    if step is None:
        return None
    record = checkpoints.read_record(step)
    if record.get("resume_key") != resume_key:
        raise InputError(
            f"the checkpoint at {checkpoints.directory_uri} (step {step}) was "
            "written by another config or input; delete it or use another workdir"
        )
    return step


@dataclasses.dataclass(frozen=True)
class WarmStart:
    """train.init_from, checked: a finished train output and the step of its last checkpoint."""

    uri: str
    step: int


def warm_start_source(config: PipelineConfig, d_model: int) -> WarmStart | None:
    """train.init_from checked before any work: a finished train output whose SAEs are the
    ones this run trains (names, architectures, layers, widths, d_model)."""
    cfg, uri = config.train, config.train.init_from
    if not uri:
        return None
    if uri.rstrip("/") == config.sae_uri.rstrip("/"):
        raise ConfigError(
            f"train.init_from names this run's own output ({uri}); name an earlier run's"
        )
    found = manifest.read(uri)
    if found is None or found.get("stage") != "train":
        raise InputError(f"train.init_from: no finished train output at {uri}")
    saved = found.get("saes", {})
    for sae_cfg in cfg.saes:
        name = sae_cfg.display_name()
        ours = {
            "trained_as": sae_cfg.architecture,
            "layer": sae_cfg.layer,
            "d_in": d_model,
            "d_sae": d_model * sae_cfg.expansion_factor,
        }
        theirs = saved.get(name)
        if theirs is None:
            problem = f"it has no SAE {name}"
        else:
            differences = [
                f"{k} {theirs.get(k)} there, {v} here"
                for k, v in ours.items()
                if theirs.get(k) != v
            ]
            problem = f"{name} has {', '.join(differences)}" if differences else ""
        if problem:
            raise InputError(f"train.init_from {uri}: checkpoint from another config ({problem})")
    checkpoints = Checkpointer(storage.join(uri, "checkpoints"), read_only=True)
    try:
        step = checkpoints.latest_step()
    finally:
        checkpoints.close()
    final = found.get("counts", {}).get("steps")
    if step is None or step != final:
        raise InputError(
            f"train.init_from {uri}: its last checkpoint (step {step}) is not its final step "
            f"({final})"
        )
    return WarmStart(uri, step)


def _warm_started(
    trainer: StepTrainer, states: dict[str, TrainState], warm: WarmStart
) -> dict[str, TrainState]:
    """Fresh states with the weights, buffers and input scale of `warm`'s final checkpoint.
    A fresh Adam state is zeros whatever the weights, so it needs no restoring."""
    subset = {
        name: {"params": a.params, "buffers": a.buffers, "input_scale": a.input_scale}
        for name, a in trainer.abstract_state().items()
    }
    checkpoints = Checkpointer(storage.join(warm.uri, "checkpoints"), read_only=True)
    try:
        restored = checkpoints.restore_subset(warm.step, subset)
    finally:
        checkpoints.close()
    return {name: state.replace(**restored[name]) for name, state in states.items()}


def train(config: PipelineConfig, force: bool = False) -> bool:
    cfg = config.train
    transcoders = [s.display_name() for s in cfg.saes if s.kind != "sae"]
    if transcoders and cfg.source == "npy":
        raise ConfigError(
            f"{transcoders[0]} is a transcoder: .npy rows hold one activation, not its input "
            "and target; use train.source=stream or store, or sae.Trainer.fit(x, targets=y)"
        )
    source = batches.open_source(config)
    mesh = sharding.make_mesh(cfg.mesh_data, cfg.mesh_model)
    _check_mesh(cfg, mesh, source.d_model)
    if source.streams and config.model.mesh_model not in (1, cfg.mesh_model):
        raise ConfigError(
            f"model.mesh_model={config.model.mesh_model}: streaming, the model runs on the "
            f"train mesh, so train.mesh_model ({cfg.mesh_model}) must equal it"
        )
    warm = warm_start_source(config, source.d_model)
    if warm is not None:
        # The starting weights are an input: a changed init source re-runs the stage.
        source.inputs["init"] = manifest.fingerprint(warm.uri)

    def body() -> StageOutput:
        return _train(config, source, mesh, warm)

    primary = jax.process_index() == 0
    section = dataclasses.asdict(cfg)
    return run_stage(
        "train", config.sae_uri, section, source.inputs, body, force, writes_manifest=primary
    )


def build_members(
    cfg: TrainConfig, d_model: int, by_site: bool, with_targets: bool = False
) -> dict[str, Member]:
    """The run's SAEs; with `by_site`, rows hold `cfg.sites` side by side and each SAE reads
    its site's slice (a transcoder its MLP input, learning its MLP output). Else rows are one
    activation, or with `with_targets` [inputs | targets] (transcoders learn the targets)."""

    def span(column: int) -> tuple[int, int]:
        return column * d_model, (column + 1) * d_model

    members = {}
    for sae_cfg in cfg.saes:
        column, targets = 0, None
        if by_site:
            column = cfg.sites.index(sae_cfg.input_site)
            if sae_cfg.target_site is not None:
                targets = span(cfg.sites.index(sae_cfg.target_site))
        elif with_targets and sae_cfg.kind != "sae":
            targets = span(1)
        members[sae_cfg.display_name()] = Member(
            sae=arch.build(
                sae_cfg,
                d_model,
                decoder_bias_init=cfg.decoder_bias_init,
                matmul_dtype=cfg.matmul_dtype,
            ),
            train=cfg,
            columns=span(column),
            target_columns=targets,
        )
    return members


def _global_batches(
    config: PipelineConfig,
    source: batches.Source,
    trainer: StepTrainer,
    start_step: int,
    resume: activations.StreamPosition | None,
) -> tuple[Iterator[np.ndarray | jax.Array], Iterator[np.ndarray]]:
    """The batches from `start_step` on (numpy on one host, global arrays on several), and
    this host's underlying iterator (a LockstepBatches when streaming)."""
    cfg = config.train
    tap = None
    if source.streams:
        backbone = lm.load_backbone(config.preset_uri, config.model.dtype)
        tap = lm.ActivationTap(backbone, cfg.sites, trainer.mesh)
        log("train", f"streaming: {tap.describe_weights()}")
    if jax.process_count() == 1:
        local = batches.batches(config, source, start_step, None, tap, resume)
        put = trainer.put_batch
    else:
        host_rows = trainer.host_rows(cfg.batch_size)
        group = trainer.row_group(cfg.batch_size)
        local = batches.batches(config, source, start_step, host_rows, tap, resume, group)

        def put(rows: np.ndarray) -> jax.Array:
            return trainer.put_batch(rows, cfg.batch_size)

    if source.streams:  # in-line: see sae.data.prefetch for why not on a thread
        return (map(put, local) if jax.process_count() > 1 else local), local
    # Read, gathered and on the device on a background thread, two batches ahead; no
    # further than the run's last step (past it a reader would fetch data for nothing).
    remaining = itertools.islice(local, max(cfg.steps - start_step, 0))
    return prefetch.Prefetched(remaining, put), local


def _position_uri(output: str, step: int) -> str:
    """Where this host's stream position at checkpoint `step` is saved."""
    name = f"host-{jax.process_index():05d}.npz"
    return storage.join(output, STREAM_POSITIONS, str(step), name)


def _saved_position(
    source: batches.Source, output: str, step: int | None
) -> activations.StreamPosition | None:
    if not source.streams or step is None:
        return None
    uri = _position_uri(output, step)
    if not storage.exists(uri):  # a checkpoint from before positions were saved: replay
        return None
    return activations.StreamPosition.from_bytes(storage.read_bytes(uri))


def _train(
    config: PipelineConfig, source: batches.Source, mesh, warm: WarmStart | None
) -> StageOutput:
    cfg, output = config.train, config.sae_uri
    resume_key = _resume_key(cfg, source.inputs)
    _clear_finished(output)
    checkpoints = Checkpointer(storage.join(output, "checkpoints"))
    start_step = _resume_step(checkpoints, resume_key)
    members = build_members(cfg, source.d_model, by_site=source.npy is None)
    trainer = StepTrainer(members, mesh, cfg.dead_window_tokens, cfg.max_skipped_steps)
    position = _saved_position(source, output, start_step)
    rows, local = _global_batches(config, source, trainer, start_step or 0, position)
    feed = rows
    resumed: dict[str, Any] = {}
    if start_step is not None and source.streams:
        # Forwards run to get back to the data position: none from a saved one; the whole
        # run so far when replaying (a checkpoint without one).
        replayed = 0 if position is not None else int(getattr(local, "forwards", 0))
        resumed = {"step": start_step, "replayed_lm_batches": replayed}
        how = "its saved position" if position is not None else "a replay"
        log(
            "train",
            f"activation stream at step {start_step} from {how}: {replayed} model batches re-run",
        )

    if start_step is None:
        first = next(rows)
        # Initialised from the whole first batch (every host the same), as on one host.
        states = trainer.init_state(cfg.seed, to_host(first))
        rows = itertools.chain([first], rows)
        summary = ", ".join(f"{n} ({m.sae.d_model}->{m.sae.d_sae})" for n, m in members.items())
        log("train", f"fresh run on mesh {dict(mesh.shape)}: {summary}")
        if warm is not None:
            states = _warm_started(trainer, states, warm)
            log(
                "train",
                f"warm start from {warm.uri} (step {warm.step}): weights and input scale "
                "restored; optimizer state, learning-rate schedule and dead-latent counts "
                "start afresh",
            )
    else:
        states, _ = checkpoints.restore(start_step, trainer.abstract_state())
        log("train", f"resumed from the checkpoint at step {start_step}")

    progress = Progress("train", cfg.steps * cfg.batch_size)
    progress.done = (start_step or 0) * cfg.batch_size
    metrics_log = MetricsLog(output) if jax.process_index() == 0 else _NoMetricsLog()
    last_metrics: dict[str, float] = {}
    stop_requested = {"flag": False}
    headline = next(iter(members))

    def on_metrics(step: int, metrics: dict[str, float]) -> None:
        last_metrics.update(metrics)
        metrics_log.write(step, metrics)
        skipped = max(v for k, v in metrics.items() if k.endswith("/skipped_steps"))
        progress.update(
            0,
            step=step,
            loss=metrics[f"{headline}/loss"],
            l0=metrics[f"{headline}/l0"],
            fve=metrics[f"{headline}/fve"],
            dead=metrics[f"{headline}/dead_fraction"],
            **({"skipped": int(skipped)} if skipped else {}),
        )

    # Positions kept: those of the checkpoints Orbax keeps (the newest max_to_keep).
    saved_positions = checkpoints.all_steps()

    def on_checkpoint(step: int, states: dict[str, TrainState]) -> None:
        record = {"step": step, "resume_key": resume_key, "tokens_seen": step * cfg.batch_size}
        if isinstance(local, activations.LockstepBatches):
            # Each host its own; written before the checkpoint that makes it findable.
            storage.write_bytes(_position_uri(output, step), local.position().to_bytes())
            saved_positions.append(step)
            for old in saved_positions[: -checkpoints.max_to_keep]:
                storage.delete(_position_uri(output, old))  # Orbax dropped that checkpoint
            del saved_positions[: -checkpoints.max_to_keep]
        checkpoints.save(step, states, record)
        metrics_log.flush()
        log("train", f"checkpoint saved at step {step}")

    def counting(stream):
        for batch in stream:
            progress.update(len(batch))
            yield batch

    previous_handler = signal.signal(
        signal.SIGTERM, lambda *_: stop_requested.__setitem__("flag", True)
    )

    def should_stop() -> bool:
        return stop_requested["flag"]

    if jax.process_count() > 1:
        should_stop = agreed_stop(should_stop, HostMax(mesh))
    try:
        snapshots = SnapshotWriter(config, source, members)
        hooks = LoopHooks(on_metrics, on_checkpoint, should_stop, snapshots.after_step)
        states = run_loop(
            trainer,
            states,
            counting(rows),
            cfg.steps,
            cfg.log_every,
            cfg.checkpoint_every,
            hooks,
        )
    except NonFiniteSteps as error:
        raise NonFiniteSteps(f"{error}; train.source={cfg.source}") from None
    finally:
        if isinstance(feed, prefetch.Prefetched):
            feed.close()
        signal.signal(signal.SIGTERM, previous_handler)
        checkpoints.close()
        metrics_log.close()
    final_step = int(next(iter(states.values())).step)
    if final_step < cfg.steps:
        raise Preempted(f"stopped at step {final_step} on SIGTERM; checkpoint saved")
    progress.close(loss=last_metrics.get(f"{headline}/loss", float("nan")))
    result = _export(config, source, members, states, last_metrics, snapshots)
    if warm is not None:
        result.extra["init_from"] = {"uri": warm.uri, "step": warm.step}
    if resumed:
        result.extra["resumed"] = resumed
    if source.store is not None:
        store = source.store
        log(
            "train",
            f"this host read {store.bytes_read / 2**20:.1f} MiB of the activation store's "
            f"{store.nbytes / 2**20:.1f} MiB ({store.bytes_read / store.nbytes:.1%})",
        )
        # Process 0's reads (it writes the manifest); every host logs its own.
        result.extra["store_reads"] = {"bytes_read": store.bytes_read, "store_bytes": store.nbytes}
    return result


class _NoMetricsLog:
    """The metrics of a host other than process 0: process 0 writes them (they are the same)."""

    def write(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def _clear_finished(output: str) -> None:
    """A finished run under another config or input: this is a re-run, start over. With
    several hosts, process 0 deletes once all have looked."""
    finished = manifest.read(output) is not None
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("train: output read")
    if finished and jax.process_index() == 0:
        storage.delete_tree(output)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("train: output cleared")


def exported(member: Member, state: TrainState, provenance: saelens.Provenance, **extra: Any):
    """(weights, cfg.json) of one trained SAE in raw activation units (input scale folded in),
    as saved in SAELens' format; `extra` adds keys to cfg.json. Every host must call it."""
    sae = member.sae
    weights = to_host(sae.export_weights({**state.params, **state.buffers}))
    scale, output_scale = float(state.input_scale), float(state.target_scale)
    if sae.transcoder:
        extra = {**extra, "output_scale_folded": output_scale}
    cfg = saelens.build_config(
        sae.export_config(),
        sae.d_model,
        sae.d_sae,
        provenance,
        normalize_activations="layer_norm" if sae.normalize_tokens else "none",
        input_scale_folded=scale,
        training_config=dataclasses.asdict(sae.spec),
        **extra,
    )
    return saelens.fold_input_scale(weights, scale, output_scale), cfg


def _exported_all(
    config: PipelineConfig,
    source: batches.Source,
    members: dict[str, Member],
    states: dict[str, TrainState],
    step: int,
) -> dict[str, tuple[dict[str, np.ndarray], dict[str, Any]]]:
    """(weights, cfg.json) of every SAE as of `step`, all checked finite before any is
    written (no half-written output). Every host must call it."""
    cfg = config.train
    # .npy rows come with neither a model nor a text corpus to name.
    from_text = source.npy is None
    model_name = saelens.model_name(config.preset_uri) if from_text else None
    ready = {}
    for sae_cfg in cfg.saes:
        name = sae_cfg.display_name()
        provenance = saelens.Provenance(
            layer=sae_cfg.layer,
            model_preset=config.preset_uri,
            model_name=model_name,
            context_size=(source.tokens_manifest or {}).get("sequence_length"),
            dataset_path=config.corpus_uri if from_text else None,
            training_tokens=step * cfg.batch_size,
        )
        weights, sae_json = exported(
            members[name], states[name], provenance, name=name, activation_source=cfg.source
        )
        bad = [key for key, value in weights.items() if not np.isfinite(value).all()]
        if bad:
            raise InputError(f"train: {name}'s {bad[0]} holds NaN or infinite values")
        ready[name] = weights, sae_json
    return ready


class SnapshotWriter:
    """train.n_checkpoints: every SAE saved in SAELens' format at the chosen steps."""

    def __init__(
        self, config: PipelineConfig, source: batches.Source, members: dict[str, Member]
    ) -> None:
        self.config, self.source, self.members = config, source, members
        self.steps = set(config.train.snapshot_steps)

    def after_step(self, step: int, states: dict[str, TrainState]) -> None:
        if step not in self.steps:
            return
        ready = _exported_all(self.config, self.source, self.members, states, step)
        tokens = step * self.config.train.batch_size
        if jax.process_index() == 0:
            for name, (weights, sae_json) in ready.items():
                saelens.save(
                    saelens.snapshot_uri(self.config.sae_uri, name, tokens), weights, sae_json
                )
        log("train", f"SAE snapshots saved at step {step} ({tokens} tokens)")

    def listing(self) -> tuple[dict[str, list[int]], list[str]]:
        """The snapshots' training tokens per SAE, and their files (all written by now,
        some perhaps before a resume)."""
        cfg = self.config.train
        tokens = [step * cfg.batch_size for step in cfg.snapshot_steps]
        names = list(self.members)
        files = [
            storage.join(saelens.snapshot_uri(self.config.sae_uri, name, t), file)
            for name in names
            for t in tokens
            for file in (saelens.WEIGHTS_NAME, saelens.CONFIG_NAME)
        ]
        return {name: tokens for name in names}, files


def _export(
    config: PipelineConfig,
    source: batches.Source,
    members: dict[str, Member],
    states: dict[str, TrainState],
    last_metrics: dict[str, float],
    snapshots: SnapshotWriter,
) -> StageOutput:
    """Each SAE under sae/<name>/ (its snapshots, if any, under sae/<name>/checkpoints/)."""
    cfg, output = config.train, config.sae_uri
    ready = _exported_all(config, source, members, states, cfg.steps)
    outputs: list[str] = []
    for name, (weights, sae_json) in ready.items():
        if jax.process_index() == 0:  # every host has the weights; one writes them
            outputs += saelens.save(storage.join(output, name), weights, sae_json)
    snapshot_tokens, snapshot_files = snapshots.listing()
    counts = {
        "steps": cfg.steps,
        "tokens": cfg.steps * cfg.batch_size,
        **{f"final_{k}": v for k, v in last_metrics.items()},
    }
    extra: dict[str, Any] = {"saes": {name: sae_json for name, (_, sae_json) in ready.items()}}
    if cfg.n_checkpoints:
        extra["checkpoints"] = snapshot_tokens
    return StageOutput(counts, snapshot_files + outputs, extra)
