"""`gemma-sae tokenize`: corpus files into packed token shards (see sae.data.tokenize)."""

from __future__ import annotations

from sae.config import PipelineConfig
from sae.data.tokenize import tokenize


def run(config: PipelineConfig, force: bool = False) -> None:
    tokenize(config, force)
