"""A stage run: skipped when its output's manifest matches, else the body writes its outputs and
the manifest is written last, so an output without a manifest is, by definition, unfinished."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sae.io import manifest, storage
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
