"""The extract stage: the train split's activations (residual stream; MLP inputs and outputs
for transcoders), once, into a store.

Every tapped site comes from one forward pass of a model truncated after the deepest of
them; BOS and padding positions are dropped. With several hosts (jax.distributed), each host
takes every n-th token shard and writes its own part of the store, all hosts running the same
forwards in lockstep (a host out of data feeds empty batches); process 0 waits for all parts
and writes the manifest last. Training runs then read the store (train.source=store)
instead of running the model again. (A stage of the data path, kept in sae/model because it
runs the language model, which sae/data may not import.)
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from sae import sharding
from sae.arch.spec import Site
from sae.config import PipelineConfig
from sae.data import activation_store, activations, token_shards
from sae.errors import ConfigError
from sae.io import manifest, presets, storage
from sae.io.stages import StageOutput, run_stage
from sae.model import lm
from sae.progress import Progress, log


def extract(config: PipelineConfig, force: bool = False) -> bool:
    """Extract the train split's activations at `config.extract_sites` (the SAEs' layers and
    transcoders' MLPs, or `extract.layers`) into `<workdir>/activations`; returns whether the
    stage ran (False when its manifest already matches the config and inputs)."""
    config.require("model.preset")
    cfg = config.extract
    tokens_manifest = manifest.require(config.tokens_uri, "tokenize")
    sites = config.extract_sites
    presets.check_layers(config.preset_uri, sorted({site.layer for site in sites}))
    mesh = sharding.make_mesh(cfg.mesh_data, config.model.mesh_model)
    _check_mesh(mesh, cfg.lm_batch_size)
    inputs = {
        "tokens": manifest.fingerprint(config.tokens_uri),
        "model": storage.fingerprint_tree(config.preset_uri),
    }
    labels = [site.label for site in sites]
    section = {**dataclasses.asdict(cfg), "sites": labels, "model_dtype": config.model.dtype}

    def body() -> StageOutput:
        return _extract(config, tokens_manifest, sites, mesh)

    return run_stage(
        "extract",
        config.activations_uri,
        section,
        inputs,
        body,
        force,
        writes_manifest=jax.process_index() == 0,
    )


def _check_mesh(mesh: Mesh, lm_batch_size: int) -> None:
    """Each host feeds lm_batch_size sequences to its own devices of the mesh, so every host
    needs the same number of them, and they must divide the batch."""
    local = len(mesh.local_devices)
    if not local or local * jax.process_count() != mesh.devices.size:
        raise ConfigError(
            f"extract.mesh_data={mesh.devices.shape[0]} does not take the same number of "
            f"devices from each of the {jax.process_count()} hosts: use -1 (all devices)"
        )
    if lm_batch_size % local:
        raise ConfigError(
            f"extract.lm_batch_size={lm_batch_size} (sequences per host) is not divisible by "
            f"this host's {local} devices on the mesh's data axis"
        )


def _row_limit(max_rows: int, capacity: int, process: int, processes: int) -> int:
    """This host's share of max_rows (the shares sum to max_rows), within what its shards
    hold; all of them when max_rows is 0."""
    if not max_rows:
        return capacity
    share = max_rows // processes + (process < max_rows % processes)
    return min(capacity, share)


def _extract(config: PipelineConfig, tokens_manifest: dict, sites: list[Site], mesh) -> StageOutput:
    cfg, output = config.extract, config.activations_uri
    process, processes = jax.process_index(), jax.process_count()
    if process == 0:
        storage.delete_tree(output)
    multihost_utils.sync_global_devices("extract: output cleared")
    all_shards = tokens_manifest["shards"]["train"]
    shards = all_shards[process::processes]
    if not shards:
        log(
            "extract",
            f"warning: {len(all_shards)} train shard(s) for {processes} hosts leave host "
            f"{process} idle; tokenize into at least as many shards as hosts",
        )
    # The shards' real tokens bound the rows (BOS positions are dropped from them).
    capacity = sum(token_shards.shard_counts(uri)[1] for uri in shards)
    limit = _row_limit(cfg.max_rows, capacity, process, processes)
    backbone = lm.load_backbone(config.preset_uri, config.model.dtype)
    tap = lm.ActivationTap(backbone, sites, mesh)
    part = activation_store.part_uri(output, process)
    writer = activation_store.PartWriter(
        part, sites, tap.hidden_dim, limit, cfg.chunk_rows, cfg.dtype
    )
    log(
        "extract",
        f"{', '.join(s.label for s in sites)} of {config.preset_uri}: "
        f"{len(shards)} shard(s) -> {part} "
        f"({cfg.dtype}, {cfg.chunk_rows}-row chunks); {tap.describe_weights()}",
    )
    progress = Progress("extract", limit)
    started = time.perf_counter()
    # Sequences stop once the limit is reached (a batch already in flight may still come).
    sequences = itertools.takewhile(
        lambda _: writer.appended < limit, token_shards.iter_sequences(shards)
    )
    for rows in _chunks(sequences, tap, cfg.lm_batch_size, tokens_manifest):
        rows = rows[: limit - writer.appended]
        writer.append(rows)
        progress.update(len(rows))
    record = writer.close()
    seconds = time.perf_counter() - started
    progress.close()
    multihost_utils.sync_global_devices("extract: parts written")
    records = [activation_store.read_part_record(output, p) for p in range(processes)]
    summary = activation_store.describe_parts(records)
    log("extract", f"{summary['rows']} rows stored; this host {record['rows'] / seconds:.0f} tok/s")
    outputs = [activation_store.part_uri(output, p) for p in range(processes)]
    extra = {
        "sites": [site.label for site in sites],
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


def _chunks(
    sequences: Iterator[tuple[np.ndarray, int]],
    tap: lm.ActivationTap,
    lm_batch_size: int,
    tokens_manifest: dict,
) -> Iterator[np.ndarray]:
    """This host's rows; in lockstep with the other hosts when there are any (one host alone
    needs no empty forwards to wait for the others)."""
    bos = tokens_manifest["tokenizer"]["bos_id"]
    if jax.process_count() == 1:
        return activations.activation_chunks(sequences, tap, lm_batch_size, bos)
    length = tokens_manifest["sequence_length"]
    return activations.lockstep_chunks(sequences, tap, lm_batch_size, length, bos)
