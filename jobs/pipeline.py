"""Every stage in order; each one skips itself when its manifest already matches."""

from __future__ import annotations

from jobs import train
from sae.analysis.report import report
from sae.config import PipelineConfig
from sae.data.tokenize import tokenize
from sae.demo.stage import demo
from sae.model.extract import extract


def run(config: PipelineConfig, force: bool = False) -> None:
    if config.demo.enabled:
        demo(config, force)
    tokenize(config, force)
    if config.train.source == "store":
        extract(config, force)
    train.run(config, force)
    report(config, force)
