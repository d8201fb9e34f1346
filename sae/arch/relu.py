"""ReLU SAE with an L1 penalty weighted by decoder-row norms (Anthropic, April 2024 update).

The decoder is left free (its norms enter the penalty instead of being pinned to one), so
this is the one architecture whose decoder rows are not renormalised.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from sae.arch import common
from sae.arch.base import LossContext, Params


@dataclass(frozen=True)
class ReluSAE:
    d_model: int
    d_sae: int
    l1_coefficient: float = 5.0
    decoder_bias_init: str = "mean"
    matmul_dtype: str = "float32"

    architecture: ClassVar[str] = "relu"
    unit_norm_decoder: ClassVar[bool] = False

    @classmethod
    def from_export(cls, cfg: dict[str, Any]) -> ReluSAE:
        return cls(d_model=cfg["d_in"], d_sae=cfg["d_sae"])

    def export_config(self) -> dict[str, Any]:
        return {"architecture": self.architecture, "l1_coefficient": self.l1_coefficient}

    def export_weights(self, weights: Params) -> Params:
        return dict(weights)

    def init_params(self, key: jax.Array, sample: jax.Array) -> Params:
        return common.init_weights(key, sample, self.d_sae, self.decoder_bias_init)

    def init_buffers(self) -> Params:
        return {}

    def partition_specs(self) -> dict[str, tuple[str | None, ...]]:
        return dict(common.STANDARD_SPECS)

    def encode(self, weights: Params, x: jax.Array) -> jax.Array:
        return jax.nn.relu(common.pre_activations(weights, x, self.matmul_dtype))

    def decode(self, weights: Params, latents: jax.Array) -> jax.Array:
        return common.dense_decode(weights, latents, self.matmul_dtype)

    def loss(
        self, params: Params, buffers: Params, x: jax.Array, ctx: LossContext
    ) -> tuple[jax.Array, dict[str, Any]]:
        latents = self.encode(params, x)
        reconstruction = self.decode(params, latents)
        mse = common.squared_error(x, reconstruction)
        decoder_norms = jnp.linalg.norm(params["W_dec"], axis=1)
        l1 = jnp.mean(jnp.sum(latents * decoder_norms, axis=-1))
        loss = mse + self.l1_coefficient * ctx.sparsity_scale * l1
        active = latents > 0
        return loss, {
            "reconstruction": reconstruction,
            "fire_counts": jnp.sum(active, axis=0, dtype=jnp.float32),
            "l0": jnp.mean(jnp.sum(active, axis=-1)),
            "parts": {"mse": mse, "l1": l1},
        }

    def update_buffers(self, buffers: Params, outputs: dict[str, Any], step: jax.Array) -> Params:
        return buffers
