"""Every stage in order; each one skips itself when its manifest already matches."""

from __future__ import annotations

from jobs import demo, extract, report, tokenize, train
from sae.config import PipelineConfig


def run(config: PipelineConfig, force: bool = False) -> None:
    if config.demo.enabled:
        demo.run(config, force)
    tokenize.run(config, force)
    if config.train.source == "store":
        extract.run(config, force)
    train.run(config, force)
    report.run(config, force)
