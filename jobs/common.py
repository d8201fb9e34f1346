"""What every stage job shares: the up-to-date check around a stage body, and logging."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sae import manifest, storage

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: the job stopped cleanly and should be retried


class Preempted(Exception):
    """A stage stopped on SIGTERM after saving its progress."""


@dataclass
class StageOutput:
    """What a stage body returns: counts and files for its manifest."""

    counts: dict[str, Any]
    outputs: list[str]
    extra: dict[str, Any] = field(default_factory=dict)


def init_distributed() -> None:
    """Join the hosts of a multi-host slice into one JAX runtime, before any device is used.

    On a multi-host TPU VM slice (v5e-16 and up) JAX finds its peers from the TPU metadata;
    elsewhere JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID name them. A
    single host needs nothing. Several CPU processes (the multi-host test) talk over gloo,
    jax's default `jax_cpu_collectives_implementation`, so nothing is set for them either.
    """
    import jax

    coordinator = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if coordinator:
        jax.distributed.initialize(
            coordinator_address=coordinator,
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
        )
    elif "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):
        jax.distributed.initialize()


def log(stage: str, message: str) -> None:
    print(f"[{stage}] {message}", file=sys.stderr, flush=True)


def run_stage(
    stage: str,
    output_uri: str,
    config: dict[str, Any],
    inputs: dict[str, str],
    body: Callable[[], StageOutput],
    force: bool = False,
    writes_manifest: bool = True,
) -> bool:
    """Run `body` unless the output's manifest already matches; returns whether it ran.

    The body writes its outputs; the manifest is written after it returns, so an output
    without a manifest is, by definition, unfinished.
    """
    if not force and manifest.is_up_to_date(output_uri, stage, config, inputs):
        log(
            stage,
            f"up to date: {manifest.manifest_uri(output_uri)} matches the config and "
            "inputs; nothing to do",
        )
        return False
    storage.check_writable(output_uri)
    result = body()
    if writes_manifest:
        manifest.write(
            output_uri, stage, config, inputs, result.counts, result.outputs, result.extra
        )
        log(stage, f"done: {manifest.manifest_uri(output_uri)}")
    else:
        log(stage, f"done; {manifest.manifest_uri(output_uri)} is written by process 0")
    return True
