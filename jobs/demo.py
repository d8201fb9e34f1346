"""`gemma-sae demo`: the generated corpus and the tiny Gemma trained on it (see sae.demo.stage)."""

from __future__ import annotations

from sae.config import PipelineConfig
from sae.demo.stage import demo


def run(config: PipelineConfig, force: bool = False) -> None:
    demo(config, force)
