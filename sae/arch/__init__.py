"""SAE architectures. Each module defines one, behind the interface in `sae.arch.base`."""

from sae.arch.base import SparseAutoencoder
from sae.arch.relu import ReluSAE

ARCHITECTURES: dict[str, type[SparseAutoencoder]] = {"relu": ReluSAE}

__all__ = ["ARCHITECTURES", "ReluSAE", "SparseAutoencoder"]
