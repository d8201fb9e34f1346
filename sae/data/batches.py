"""Every training source behind one call: `open_source(config)` checks it before any work,
`batches(config, source, start_step)` yields its batches of activation rows from a step on.

- npy: `.npy` files (or an array in memory) in a seeded order computed per step;
- store: the extract stage's activation store, chunks and windows in a seeded order;
- stream: the language model over the token shards through a bounded shuffle buffer. The tap
  (sae.model.lm.ActivationTap) is passed in: data sits below the model in the layering.

Every host of a multi-host run calls `batches` with its `host_rows` (its devices' rows of each
global batch). From files every host reads the same seeded order and keeps its rows; from a
store each group of hosts holding the same rows reads its own chunks (its `row_group`, see
activation_store.ShuffledReader); streaming, host p runs the model over shards p::n into its
own shuffle buffer, and the hosts agree on the forwards before each step
(activations.LockstepBatches). Each host reads about 1/hosts of the data either way.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from sae.config import PipelineConfig
from sae.data import activation_files, activation_store, activations
from sae.errors import InputError
from sae.io import manifest, presets, storage
from sae.progress import log
from sae.sharding import HostMax


@dataclass
class Source:
    """Where rows come from: their d_model, the inputs that fingerprint them, and either the
    tokenize manifest (streaming through the model), the .npy rows or the store's rows."""

    d_model: int
    inputs: dict[str, str]
    tokens_manifest: dict[str, Any] | None
    npy: activation_files.NpyRows | None = None
    store: activation_store.StoreRows | None = None

    @property
    def streams(self) -> bool:
        return self.npy is None and self.store is None


def open_source(config: PipelineConfig) -> Source:
    """The configured source, checked: files exist and agree, the store is finished, the
    token shards and the model's layers are there."""
    cfg = config.train
    if cfg.source == "npy":
        rows = activation_files.NpyRows(activation_files.find_activation_files(cfg.activations))
        fingerprints = "".join(storage.fingerprint(uri) for uri in rows.uris)
        return Source(rows.dim, {"activations": manifest.digest(fingerprints)}, None, rows)
    if cfg.source == "store":
        rows, store_manifest = activation_store.open_store(config.activations_uri, cfg.sites)
        inputs = {"activations": manifest.fingerprint(config.activations_uri)}
        return Source(rows.d_model, inputs, store_manifest, store=rows)
    config.require("model.preset")
    tokens_manifest = manifest.require(config.tokens_uri, "tokenize")
    shards, processes = len(tokens_manifest["shards"]["train"]), jax.process_count()
    if shards < processes:
        raise InputError(
            f"{shards} train shard(s) for {processes} hosts: each host streams its own shards; "
            "tokenize into at least as many shards as hosts"
        )
    presets.check_layers(config.preset_uri, cfg.layers)
    hidden = int(presets.backbone_config(config.preset_uri)["hidden_dim"])
    inputs = {
        "tokens": manifest.fingerprint(config.tokens_uri),
        "model": storage.fingerprint_tree(config.preset_uri),
    }
    return Source(hidden, inputs, tokens_manifest)


def batches(
    config: PipelineConfig,
    source: Source,
    start_step: int = 0,
    host_rows: list[slice] | None = None,
    tap: activations.LockstepTap | None = None,
    resume: activations.StreamPosition | None = None,
    row_group: tuple[int, int] = (0, 1),
) -> Iterator[np.ndarray]:
    """This host's rows of each batch from `start_step` on (`host_rows` of each; all of them
    when None; from a store, `row_group` is (this host's group, groups)). Streaming needs the
    model's `tap`, and returns the LockstepBatches itself (its `position()` is what a
    checkpoint saves); from `resume`, the position saved at `start_step`, it continues without
    running the model over the steps before, else it replays the stream to `start_step`."""
    cfg = config.train
    if source.npy is not None:
        return _npy_batches(source.npy, cfg.batch_size, cfg.seed, start_step, host_rows)
    if source.store is not None:
        share = cfg.batch_size if host_rows is None else sum(r.stop - r.start for r in host_rows)
        reader = activation_store.ShuffledReader(
            source.store,
            share,
            # Shared out like the batch: together the groups hold shuffle_buffer rows.
            cfg.shuffle_buffer * share // cfg.batch_size,
            cfg.seed,
            *row_group,
        )
        return reader.batches(start_step)
    if tap is None:
        raise ValueError("train.source=stream: batches() needs the model's activation tap")
    stream = _stream(config, source, tap, host_rows, resume)
    if start_step and resume is None:
        log("train", f"replaying the activation stream to step {start_step}")
        for _ in itertools.islice(stream, start_step):
            pass
    return stream


def _npy_batches(
    rows: activation_files.NpyRows,
    batch_size: int,
    seed: int,
    start_step: int,
    host_rows: list[slice] | None,
) -> Iterator[np.ndarray]:
    if host_rows is None:
        return activation_files.random_batches(rows, batch_size, seed, start_step)
    return (
        rows.read(np.concatenate([indices[r] for r in host_rows]))
        for step in itertools.count(start_step)
        for indices in [activation_files.batch_rows(step, batch_size, rows.num_rows, seed)]
    )


def _stream(
    config: PipelineConfig,
    source: Source,
    tap: activations.LockstepTap,
    host_rows: list[slice] | None,
    resume: activations.StreamPosition | None,
) -> activations.LockstepBatches:
    """Shuffled batches of activations of the model over this host's train shards, in
    lockstep with the other hosts."""
    cfg, tokens = config.train, source.tokens_manifest or {}
    process, processes = jax.process_index(), jax.process_count()
    if host_rows is None:
        seed, host_max, batch_size = cfg.seed, int, cfg.batch_size
    else:
        # Each host its own shuffle (of its own shards); one host alone keeps train.seed.
        seed = int(np.random.SeedSequence([cfg.seed, process]).generate_state(1)[0])
        host_max, batch_size = HostMax(tap.mesh), sum(r.stop - r.start for r in host_rows)
    return activations.training_batches(
        tokens["shards"]["train"][process::processes],
        tap,
        source.d_model * len(cfg.sites),
        cfg.lm_batch_size,
        batch_size,
        # The buffer is shared out like the batch: together the hosts hold shuffle_buffer rows.
        cfg.shuffle_buffer * batch_size // cfg.batch_size,
        tokens["tokenizer"]["bos_id"],
        seed,
        host_max,
        resume,
    )
