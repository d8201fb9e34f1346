"""`gemma-sae report`: held-out evaluation, dashboards and steering vectors of the trained SAEs
(see sae.analysis.report)."""

from __future__ import annotations

from sae.analysis.report import report
from sae.config import PipelineConfig


def run(config: PipelineConfig, force: bool = False) -> None:
    report(config, force)
