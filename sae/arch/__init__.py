"""SAE architectures. Each module defines one, behind the interface in `sae.arch.base`."""

from __future__ import annotations

from typing import Any

from sae.arch.base import LossContext, Params, SparseAutoencoder
from sae.arch.batchtopk import BatchTopKSAE
from sae.arch.jumprelu import JumpReluSAE
from sae.arch.matryoshka import MatryoshkaBatchTopKSAE
from sae.arch.relu import ReluSAE
from sae.arch.spec import SaeSpec
from sae.arch.topk import TopKSAE

# What training can build.
ARCHITECTURES: dict[str, type] = {
    "relu": ReluSAE,
    "topk": TopKSAE,
    "batchtopk": BatchTopKSAE,
    "matryoshka_batchtopk": MatryoshkaBatchTopKSAE,
    "jumprelu": JumpReluSAE,
}
# What an exported cfg.json can name, in SAELens' terms (the BatchTopK kinds export as
# JumpReLUs); "relu" is how files written before the SAELens name called a standard SAE.
INFERENCE_ARCHITECTURES: dict[str, type] = {
    "standard": ReluSAE,
    "relu": ReluSAE,
    "topk": TopKSAE,
    "jumprelu": JumpReluSAE,
    # Transcoders (SAELens' names; it has no TopK transcoder, those two are ours).
    "transcoder": ReluSAE,
    "skip_transcoder": ReluSAE,
    "jumprelu_transcoder": JumpReluSAE,
    "jumprelu_skip_transcoder": JumpReluSAE,
    "topk_transcoder": TopKSAE,
    "topk_skip_transcoder": TopKSAE,
}


def build(
    spec: SaeSpec,
    d_model: int,
    *,
    d_sae: int | None = None,
    decoder_bias_init: str = "mean",
    matmul_dtype: str = "float32",
) -> SparseAutoencoder:
    """The trainable SAE `spec` describes, on a model of hidden size `d_model` (width
    `spec.width(d_model)` unless `d_sae` is given)."""
    width = spec.width(d_model) if d_sae is None else d_sae
    return ARCHITECTURES[spec.architecture](
        spec, d_model, width, decoder_bias_init=decoder_bias_init, matmul_dtype=matmul_dtype
    )


def from_export_config(cfg: dict[str, Any]) -> SparseAutoencoder:
    """The inference model a saved cfg.json describes."""
    return INFERENCE_ARCHITECTURES[cfg["architecture"]].from_export(cfg)


__all__ = [
    "ARCHITECTURES",
    "BatchTopKSAE",
    "JumpReluSAE",
    "LossContext",
    "MatryoshkaBatchTopKSAE",
    "Params",
    "ReluSAE",
    "SaeSpec",
    "SparseAutoencoder",
    "TopKSAE",
    "build",
    "from_export_config",
]
