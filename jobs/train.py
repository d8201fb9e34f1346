"""The train stage: stream activations from the language model into an SAE on the mesh.

Checkpoints every `train.checkpoint_every` steps; a re-run resumes from the latest one by
replaying the seeded activation stream to the checkpoint's position, so a resumed run sees
exactly the batches a straight run would. SIGTERM (a spot TPU's preemption notice) saves a
checkpoint and exits with code 75 so a supervisor knows to retry.
"""

from __future__ import annotations

import dataclasses
import itertools
import signal

import jax
import numpy as np

from jobs.common import Preempted, StageOutput, log, require_manifest, run_stage
from sae import activations, lm, manifest, sae_io, sharding, storage
from sae.arch import ReluSAE
from sae.checkpoint import Checkpointer
from sae.config import PipelineConfig, TrainConfig
from sae.errors import ConfigError, InputError
from sae.metrics_log import MetricsLog
from sae.progress import Progress
from sae.training import LoopHooks, Trainer, input_scale, run_loop

# Keys that change how a run is observed, not what it computes: a checkpoint written under
# other values of these can still be resumed.
_OBSERVATIONAL_KEYS = ("log_every", "checkpoint_every")


def _check_mesh(cfg: TrainConfig, mesh, d_sae: int) -> None:
    data, model = mesh.devices.shape
    for key in ("batch_size", "lm_batch_size"):
        if getattr(cfg, key) % data:
            raise ConfigError(
                f"train.{key}={getattr(cfg, key)} is not divisible by the mesh's "
                f"data axis ({data} devices)"
            )
    if d_sae % model:
        raise ConfigError(f"SAE width {d_sae} is not divisible by the mesh's model axis ({model})")


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


def run(config: PipelineConfig, force: bool = False) -> None:
    cfg = config.train
    tokens_manifest = require_manifest(config.tokens_uri, "tokenize")
    lm.check_layers(config.preset_uri, [cfg.layer])
    hidden = int(lm.backbone_config(config.preset_uri)["hidden_dim"])
    d_sae = hidden * cfg.expansion_factor
    mesh = sharding.make_mesh(cfg.mesh_data, cfg.mesh_model)
    _check_mesh(cfg, mesh, d_sae)
    inputs = {
        "tokens": manifest.fingerprint(config.tokens_uri),
        "model": storage.fingerprint_tree(config.preset_uri),
    }
    output = config.sae_uri

    def body() -> StageOutput:
        return _train(config, tokens_manifest, mesh, d_sae, inputs)

    run_stage("train", output, dataclasses.asdict(cfg), inputs, body, force)


def _train(
    config: PipelineConfig, tokens_manifest: dict, mesh, d_sae: int, inputs: dict[str, str]
) -> StageOutput:
    cfg, output = config.train, config.sae_uri
    resume_key = _resume_key(cfg, inputs)
    if manifest.read(output) is not None:
        # A finished run under another config or input: this is a re-run, start over.
        storage.delete_tree(output)
    checkpoints = Checkpointer(storage.join(output, "checkpoints"))
    start_step = _resume_step(checkpoints, resume_key)

    backbone = lm.load_backbone(config.preset_uri, config.model.dtype)
    tap = lm.ActivationTap(backbone, [cfg.layer], mesh)
    sae = ReluSAE(d_model=tap.hidden_dim, d_sae=d_sae, l1_coefficient=cfg.l1_coefficient)
    trainer = Trainer(sae, cfg.learning_rate, mesh, cfg.dead_window_tokens)
    batches = activations.training_batches(
        tokens_manifest["shards"]["train"],
        tap,
        tap.hidden_dim,
        cfg.lm_batch_size,
        cfg.batch_size,
        cfg.shuffle_buffer,
        tokens_manifest["tokenizer"]["bos_id"],
        cfg.seed,
    )

    if start_step is None:
        first = next(batches)
        scale = input_scale(first)
        state = trainer.init_state(cfg.seed, first * scale)
        batches = itertools.chain([first], batches)
        log(
            "train",
            f"fresh run: SAE {tap.hidden_dim}->{d_sae} at layer {cfg.layer}, "
            f"mesh {dict(mesh.shape)}, input scale {scale:.4g}",
        )
    else:
        state, record = checkpoints.restore(start_step, trainer.abstract_state())
        scale = float(record["input_scale"])
        log(
            "train",
            f"resuming from step {start_step}: replaying the activation stream to its position",
        )
        batches = itertools.islice(batches, start_step, None)

    progress = Progress("train", cfg.steps * cfg.batch_size)
    progress.done = (start_step or 0) * cfg.batch_size
    metrics_log = MetricsLog(output)
    last_metrics: dict[str, float] = {}
    stop_requested = {"flag": False}

    def on_metrics(step: int, metrics: dict[str, float]) -> None:
        last_metrics.update(metrics)
        metrics_log.write(step, metrics)
        progress.update(0, step=step, loss=metrics["loss"], l0=metrics["l0"], fve=metrics["fve"])

    def on_checkpoint(step: int, state) -> None:
        checkpoints.save(
            step,
            state,
            {
                "step": step,
                "input_scale": scale,
                "resume_key": resume_key,
                "tokens_seen": step * cfg.batch_size,
            },
        )
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
        state = run_loop(
            trainer,
            state,
            counting(batches),
            cfg.steps,
            scale,
            cfg.log_every,
            cfg.checkpoint_every,
            hooks,
        )
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        checkpoints.close()
        metrics_log.close()
    if int(state.step) < cfg.steps:
        raise Preempted(f"stopped at step {int(state.step)} on SIGTERM; checkpoint saved")
    progress.close(loss=last_metrics.get("loss", float("nan")))

    params = sae_io.fold_input_scale(jax.tree.map(np.asarray, state.params), scale)
    sae_cfg = {
        "architecture": "relu",
        "d_in": tap.hidden_dim,
        "d_sae": d_sae,
        "dtype": "float32",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "input_scale_folded": scale,
        "l1_coefficient": cfg.l1_coefficient,
        "layer": cfg.layer,
        "hook_name": f"blocks.{cfg.layer}.hook_resid_post",
        "keras_hub_layer": f"decoder_block_{cfg.layer}",
        "model_preset": config.preset_uri,
        "context_size": tokens_manifest["sequence_length"],
        "prepend_bos": True,
        "training_tokens": cfg.steps * cfg.batch_size,
    }
    outputs = sae_io.save(output, params, sae_cfg)
    counts = {
        "steps": cfg.steps,
        "tokens": cfg.steps * cfg.batch_size,
        **{f"final_{k}": v for k, v in last_metrics.items()},
    }
    return StageOutput(counts, outputs, {"sae": sae_cfg})
