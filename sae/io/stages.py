"""A stage run: skipped when its output's manifest matches, else the body writes its outputs and
the manifest is written last, so an output without a manifest is, by definition, unfinished."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sae.io import manifest, storage
from sae.io.peak_memory import StageMemory
from sae.progress import log


@dataclass
class StageOutput:
    """What a stage body returns: counts and files for its manifest."""

    counts: dict[str, Any]
    outputs: list[str]
    extra: dict[str, Any] = field(default_factory=dict)


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
    without a manifest is, by definition, unfinished. The manifest's `resources` records the
    stage's wall time and peak memory (sae.io.peak_memory).
    """
    if not force and manifest.is_up_to_date(output_uri, stage, config, inputs):
        log(
            stage,
            f"up to date: {manifest.manifest_uri(output_uri)} matches the config and "
            "inputs; nothing to do",
        )
        return False
    storage.check_writable(output_uri)
    memory = StageMemory()
    result = body()
    resources = memory.summary()
    if "peak_host_memory_bytes" in resources:
        log(
            stage,
            f"{resources['wall_seconds']:.0f} s, peak host memory "
            f"{resources['peak_host_memory_bytes'] / 2**30:.2f} GiB",
        )
    if writes_manifest:
        extra = {**result.extra, "resources": resources}
        manifest.write(output_uri, stage, config, inputs, result.counts, result.outputs, extra)
        log(stage, f"done: {manifest.manifest_uri(output_uri)}")
    else:
        log(stage, f"done; {manifest.manifest_uri(output_uri)} is written by process 0")
    return True
