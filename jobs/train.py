"""The train stage: the library's whole training run (`sae.train`, sae/training/run.py) on the
config: sources, resume, SIGTERM, warm start and export live there."""

from __future__ import annotations

from sae.config import PipelineConfig
from sae.training.run import train


def run(config: PipelineConfig, force: bool = False) -> None:
    train(config, force)
