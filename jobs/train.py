"""The train stage: activation rows (streamed from the language model, or from .npy files) into
one or several SAEs on the mesh.

Checkpoints every `train.checkpoint_every` steps. A re-run resumes from the latest one: the
streaming source replays its seeded stream to the checkpoint's position, the .npy source
computes it directly, so a resumed run sees exactly the batches a straight run would. SIGTERM
(a spot TPU's preemption notice) saves a checkpoint and exits with code 75 so a supervisor
knows to retry.
"""

from __future__ import annotations

import dataclasses
import itertools
import signal
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np

from jobs.common import Preempted, StageOutput, log, require_manifest, run_stage
from sae import (
    activation_files,
    activation_store,
    activations,
    lm,
    manifest,
    sae_io,
    sharding,
    storage,
)
from sae.arch import ARCHITECTURES, SparseAutoencoder
from sae.checkpoint import Checkpointer
from sae.config import PipelineConfig, SaeConfig, TrainConfig
from sae.errors import ConfigError, InputError
from sae.metrics_log import MetricsLog
from sae.optimizer import OptimizerSettings
from sae.progress import Progress
from sae.training import LoopHooks, Member, Trainer, TrainState, run_loop

# Keys that change how a run is observed, not what it computes: a checkpoint written under
# other values of these can still be resumed.
_OBSERVATIONAL_KEYS = ("log_every", "checkpoint_every")


@dataclasses.dataclass
class Source:
    """Where rows come from: their d_model, the inputs that fingerprint them, and either the
    tokenize manifest (streaming through the model) or the .npy rows."""

    d_model: int
    inputs: dict[str, str]
    tokens_manifest: dict[str, Any] | None
    npy: activation_files.NpyRows | None = None
    store: activation_store.StoreRows | None = None


def _check_mesh(cfg: TrainConfig, mesh, d_model: int) -> None:
    data, model = mesh.devices.shape
    for key in ("batch_size", "lm_batch_size"):
        if getattr(cfg, key) % data:
            raise ConfigError(
                f"train.{key}={getattr(cfg, key)} is not divisible by the mesh's "
                f"data axis ({data} devices)"
            )
    for index, sae_cfg in enumerate(cfg.saes):
        sae_cfg.check_against_model(f"train.saes[{index}]", d_model, model)


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


def _open_source(config: PipelineConfig) -> Source:
    cfg = config.train
    if cfg.source == "npy":
        rows = activation_files.NpyRows(activation_files.find_activation_files(cfg.activations))
        fingerprints = "".join(storage.fingerprint(uri) for uri in rows.uris)
        return Source(rows.dim, {"activations": manifest.digest(fingerprints)}, None, rows)
    if cfg.source == "store":
        rows, store_manifest = activation_store.open_store(config.activations_uri, cfg.layers)
        inputs = {"activations": manifest.fingerprint(config.activations_uri)}
        return Source(rows.d_model, inputs, store_manifest, store=rows)
    tokens_manifest = require_manifest(config.tokens_uri, "tokenize")
    lm.check_layers(config.preset_uri, cfg.layers)
    hidden = int(lm.backbone_config(config.preset_uri)["hidden_dim"])
    inputs = {
        "tokens": manifest.fingerprint(config.tokens_uri),
        "model": storage.fingerprint_tree(config.preset_uri),
    }
    return Source(hidden, inputs, tokens_manifest)


def run(config: PipelineConfig, force: bool = False) -> None:
    cfg = config.train
    source = _open_source(config)
    mesh = sharding.make_mesh(cfg.mesh_data, cfg.mesh_model)
    _check_mesh(cfg, mesh, source.d_model)

    def body() -> StageOutput:
        return _train(config, source, mesh)

    run_stage("train", config.sae_uri, dataclasses.asdict(cfg), source.inputs, body, force)


def build_sae(sae_cfg: SaeConfig, cfg: TrainConfig, d_model: int) -> SparseAutoencoder:
    d_sae = d_model * sae_cfg.expansion_factor
    common = {
        "d_model": d_model,
        "d_sae": d_sae,
        "decoder_bias_init": cfg.decoder_bias_init,
        "matmul_dtype": cfg.matmul_dtype,
    }
    architecture = ARCHITECTURES[sae_cfg.architecture]
    if sae_cfg.architecture == "relu":
        return architecture(l1_coefficient=sae_cfg.sparsity_coefficient, **common)
    if sae_cfg.architecture == "jumprelu":
        return architecture(
            l0_coefficient=sae_cfg.sparsity_coefficient,
            bandwidth=sae_cfg.jumprelu_bandwidth,
            init_threshold=sae_cfg.jumprelu_init_threshold,
            **common,
        )
    return architecture(
        k=sae_cfg.k, k_aux=sae_cfg.k_aux, auxk_coefficient=sae_cfg.auxk_coefficient, **common
    )


def build_members(cfg: TrainConfig, d_model: int, by_layer: bool) -> dict[str, Member]:
    """The run's SAEs; with `by_layer`, each reads its layer's slice of a multi-layer row."""
    members = {}
    for sae_cfg in cfg.saes:
        optimizer = OptimizerSettings(
            learning_rate=sae_cfg.learning_rate,
            total_steps=cfg.steps,
            warmup_steps=cfg.lr_warmup_steps,
            decay_steps=cfg.lr_decay_steps,
            decay_shape=cfg.lr_decay_shape,
            final_fraction=cfg.lr_final_fraction,
            clip_norm=cfg.grad_clip_norm,
            beta1=cfg.adam_beta1,
            beta2=cfg.adam_beta2,
        )
        column = cfg.layers.index(sae_cfg.layer) if by_layer else 0
        members[sae_cfg.display_name()] = Member(
            sae=build_sae(sae_cfg, cfg, d_model),
            optimizer=optimizer,
            columns=(column * d_model, (column + 1) * d_model),
            sparsity_warmup_steps=cfg.sparsity_warmup_steps,
            resample_every=sae_cfg.resample_every,
        )
    return members


def _batches(config: PipelineConfig, source: Source, mesh, start_step: int) -> Iterator:
    cfg = config.train
    if source.npy is not None:
        return activation_files.random_batches(source.npy, cfg.batch_size, cfg.seed, start_step)
    if source.store is not None:
        reader = activation_store.ShuffledReader(
            source.store, cfg.batch_size, cfg.shuffle_buffer, cfg.seed
        )
        return reader.batches(start_step)
    backbone = lm.load_backbone(config.preset_uri, config.model.dtype)
    tap = lm.ActivationTap(backbone, cfg.layers, mesh)
    stream = activations.training_batches(
        source.tokens_manifest["shards"]["train"],
        tap,
        tap.hidden_dim * len(cfg.layers),
        cfg.lm_batch_size,
        cfg.batch_size,
        cfg.shuffle_buffer,
        source.tokens_manifest["tokenizer"]["bos_id"],
        cfg.seed,
    )
    if start_step:
        log("train", f"replaying the activation stream to step {start_step}")
    return itertools.islice(stream, start_step, None)


def _train(config: PipelineConfig, source: Source, mesh) -> StageOutput:
    cfg, output = config.train, config.sae_uri
    resume_key = _resume_key(cfg, source.inputs)
    if manifest.read(output) is not None:
        # A finished run under another config or input: this is a re-run, start over.
        storage.delete_tree(output)
    checkpoints = Checkpointer(storage.join(output, "checkpoints"))
    start_step = _resume_step(checkpoints, resume_key)
    members = build_members(cfg, source.d_model, by_layer=source.npy is None)
    trainer = Trainer(members, mesh, cfg.dead_window_tokens)
    batches = _batches(config, source, mesh, start_step or 0)

    if start_step is None:
        first = next(batches)
        states = trainer.init_state(cfg.seed, first)
        batches = itertools.chain([first], batches)
        summary = ", ".join(f"{n} ({m.sae.d_model}->{m.sae.d_sae})" for n, m in members.items())
        log("train", f"fresh run on mesh {dict(mesh.shape)}: {summary}")
    else:
        states, _ = checkpoints.restore(start_step, trainer.abstract_state())
        log("train", f"resumed from the checkpoint at step {start_step}")

    progress = Progress("train", cfg.steps * cfg.batch_size)
    progress.done = (start_step or 0) * cfg.batch_size
    metrics_log = MetricsLog(output)
    last_metrics: dict[str, float] = {}
    stop_requested = {"flag": False}
    headline = next(iter(members))

    def on_metrics(step: int, metrics: dict[str, float]) -> None:
        last_metrics.update(metrics)
        metrics_log.write(step, metrics)
        progress.update(
            0,
            step=step,
            loss=metrics[f"{headline}/loss"],
            l0=metrics[f"{headline}/l0"],
            fve=metrics[f"{headline}/fve"],
            dead=metrics[f"{headline}/dead_fraction"],
        )

    def on_checkpoint(step: int, states: dict[str, TrainState]) -> None:
        record = {"step": step, "resume_key": resume_key, "tokens_seen": step * cfg.batch_size}
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
    try:
        hooks = LoopHooks(on_metrics, on_checkpoint, lambda: stop_requested["flag"])
        states = run_loop(
            trainer,
            states,
            counting(batches),
            cfg.steps,
            cfg.log_every,
            cfg.checkpoint_every,
            hooks,
        )
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        checkpoints.close()
        metrics_log.close()
    final_step = int(next(iter(states.values())).step)
    if final_step < cfg.steps:
        raise Preempted(f"stopped at step {final_step} on SIGTERM; checkpoint saved")
    progress.close(loss=last_metrics.get(f"{headline}/loss", float("nan")))
    return _export(config, source, members, states, last_metrics)


def _export(
    config: PipelineConfig,
    source: Source,
    members: dict[str, Member],
    states: dict[str, TrainState],
    last_metrics: dict[str, float],
) -> StageOutput:
    """Each SAE in raw activation units (input scale folded in) under sae/<name>/."""
    cfg, output = config.train, config.sae_uri
    outputs, exported = [], {}
    for sae_cfg in cfg.saes:
        name = sae_cfg.display_name()
        sae, state = members[name].sae, states[name]
        weights = jax.tree.map(np.asarray, sae.export_weights({**state.params, **state.buffers}))
        scale = float(state.input_scale)
        sequence_length = (source.tokens_manifest or {}).get("sequence_length")
        exported[name] = {
            **sae.export_config(),
            "name": name,
            "d_in": sae.d_model,
            "d_sae": sae.d_sae,
            "dtype": "float32",
            "apply_b_dec_to_input": True,
            "normalize_activations": "none",
            "input_scale_folded": scale,
            "layer": sae_cfg.layer,
            "hook_name": f"blocks.{sae_cfg.layer}.hook_resid_post",
            "keras_hub_layer": f"decoder_block_{sae_cfg.layer}",
            "model_preset": config.preset_uri,
            "activation_source": cfg.source,
            "context_size": sequence_length,
            "prepend_bos": True,
            "training_tokens": cfg.steps * cfg.batch_size,
            "training_config": dataclasses.asdict(sae_cfg),
        }
        folded = sae_io.fold_input_scale(weights, scale)
        outputs += sae_io.save(storage.join(output, name), folded, exported[name])
    counts = {
        "steps": cfg.steps,
        "tokens": cfg.steps * cfg.batch_size,
        **{f"final_{k}": v for k, v in last_metrics.items()},
    }
    return StageOutput(counts, outputs, {"saes": exported})
