"""`gemma-sae extract`: the train split's activations into a store (see sae.model.extract)."""

from __future__ import annotations

from sae.config import PipelineConfig
from sae.model.extract import extract


def run(config: PipelineConfig, force: bool = False) -> None:
    extract(config, force)
