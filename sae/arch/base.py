"""What every SAE architecture provides: parameters with shardings, encode, decode, loss."""

from __future__ import annotations

from typing import Any, Protocol

import jax

Params = dict[str, jax.Array]


class SparseAutoencoder(Protocol):
    d_model: int
    d_sae: int

    def init_params(self, key: jax.Array, sample: jax.Array) -> Params:
        """Initial parameters; `sample` is a first batch of (normalised) activations."""

    def partition_specs(self) -> dict[str, tuple[str | None, ...]]:
        """PartitionSpec entries per parameter (latent dimensions over the model axis)."""

    def encode(self, params: Params, x: jax.Array) -> jax.Array:
        """Latent activations [tokens, d_sae]."""

    def decode(self, params: Params, latents: jax.Array) -> jax.Array:
        """Reconstruction [tokens, d_model]."""

    def loss(self, params: Params, x: jax.Array) -> tuple[jax.Array, dict[str, Any]]:
        """Training loss and its parts (mse, sparsity penalty, latents) for one batch."""
