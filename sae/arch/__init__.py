"""SAE architectures. Each module defines one, behind the interface in `sae.arch.base`."""

from __future__ import annotations

from typing import Any

from sae.arch.base import LossContext, Params, SparseAutoencoder
from sae.arch.batchtopk import BatchTopKSAE
from sae.arch.jumprelu import JumpReluSAE
from sae.arch.relu import ReluSAE
from sae.arch.topk import TopKSAE

# What training can build.
ARCHITECTURES: dict[str, type] = {
    "relu": ReluSAE,
    "topk": TopKSAE,
    "batchtopk": BatchTopKSAE,
    "jumprelu": JumpReluSAE,
}
# What an exported cfg.json can name, in SAELens' terms (BatchTopK exports as a JumpReLU);
# "relu" is how files written before the SAELens name called a standard SAE.
INFERENCE_ARCHITECTURES: dict[str, type] = {
    "standard": ReluSAE,
    "relu": ReluSAE,
    "topk": TopKSAE,
    "jumprelu": JumpReluSAE,
}


def from_export_config(cfg: dict[str, Any]) -> SparseAutoencoder:
    """The inference model a saved cfg.json describes."""
    return INFERENCE_ARCHITECTURES[cfg["architecture"]].from_export(cfg)


__all__ = [
    "ARCHITECTURES",
    "BatchTopKSAE",
    "JumpReluSAE",
    "LossContext",
    "Params",
    "ReluSAE",
    "SparseAutoencoder",
    "TopKSAE",
    "from_export_config",
]
