"""The extract stage: the train split's residual-stream activations, once, into a store.

Every tapped layer comes from one forward pass of a model truncated after the deepest of
them; BOS and padding positions are dropped. With several hosts (jax.distributed), each host
takes every n-th token shard and writes its own part of the store; process 0 waits for all
parts and writes the manifest last. Training runs then read the store (train.source=store)
instead of running the model again.
"""

from __future__ import annotations

import dataclasses
import time

import jax
from jax.experimental import multihost_utils

from jobs.common import StageOutput, log, require_manifest, run_stage
from sae import activation_store, activations, lm, manifest, sharding, storage, token_shards
from sae.config import PipelineConfig
from sae.errors import ConfigError
from sae.progress import Progress


def run(config: PipelineConfig, force: bool = False) -> None:
    cfg = config.extract
    tokens_manifest = require_manifest(config.tokens_uri, "tokenize")
    layers = config.extract_layers
    lm.check_layers(config.preset_uri, layers)
    mesh = sharding.make_mesh(cfg.mesh_data, 1)
    if cfg.lm_batch_size % mesh.devices.shape[0]:
        raise ConfigError(
            f"extract.lm_batch_size={cfg.lm_batch_size} is not divisible by the mesh's "
            f"data axis ({mesh.devices.shape[0]} devices)"
        )
    inputs = {
        "tokens": manifest.fingerprint(config.tokens_uri),
        "model": storage.fingerprint_tree(config.preset_uri),
    }
    section = {**dataclasses.asdict(cfg), "layers": layers, "model_dtype": config.model.dtype}

    def body() -> StageOutput:
        return _extract(config, tokens_manifest, layers, mesh)

    run_stage(
        "extract",
        config.activations_uri,
        section,
        inputs,
        body,
        force,
        writes_manifest=jax.process_index() == 0,
    )


def _extract(config: PipelineConfig, tokens_manifest: dict, layers: list[int], mesh) -> StageOutput:
    cfg, output = config.extract, config.activations_uri
    process, processes = jax.process_index(), jax.process_count()
    if process == 0:
        storage.delete_tree(output)
    multihost_utils.sync_global_devices("extract: output cleared")
    shards = tokens_manifest["shards"]["train"][process::processes]
    # The shards' real tokens bound the rows (BOS positions are dropped from them).
    capacity = sum(token_shards.shard_counts(uri)[1] for uri in shards)
    limit = min(capacity, cfg.max_rows // processes) if cfg.max_rows else capacity
    backbone = lm.load_backbone(config.preset_uri, config.model.dtype)
    tap = lm.ActivationTap(backbone, layers, mesh)
    part = activation_store.part_uri(output, process)
    writer = activation_store.PartWriter(
        part, layers, tap.hidden_dim, limit, cfg.chunk_rows, cfg.dtype
    )
    log(
        "extract",
        f"layers {layers} of {config.preset_uri}: {len(shards)} shard(s) -> {part} "
        f"({cfg.dtype}, {cfg.chunk_rows}-row chunks)",
    )
    progress = Progress("extract", limit)
    started = time.perf_counter()
    sequences = token_shards.iter_sequences(shards)
    bos = tokens_manifest["tokenizer"]["bos_id"]
    for rows in activations.activation_chunks(sequences, tap, cfg.lm_batch_size, bos):
        rows = rows[: limit - writer.appended]
        writer.append(rows)
        progress.update(len(rows))
        if writer.appended >= limit:
            break
    record = writer.close()
    seconds = time.perf_counter() - started
    progress.close()
    multihost_utils.sync_global_devices("extract: parts written")
    records = [activation_store.read_part_record(output, p) for p in range(processes)]
    summary = activation_store.describe_parts(records)
    log("extract", f"{summary['rows']} rows stored; this host {record['rows'] / seconds:.0f} tok/s")
    outputs = [activation_store.part_uri(output, p) for p in range(processes)]
    extra = {
        "layers": layers,
        "d_model": tap.hidden_dim,
        "dtype": cfg.dtype,
        "chunk_rows": cfg.chunk_rows,
        "parts": records,
        "mean_norm": summary["mean_norm"],
        "sequence_length": tokens_manifest["sequence_length"],
        "tokenizer": tokens_manifest["tokenizer"],
        "model_preset": config.preset_uri,
    }
    return StageOutput({"tokens": summary["rows"], "parts": processes}, outputs, extra)
