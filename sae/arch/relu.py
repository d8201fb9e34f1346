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
class ReluSAE(common.StandardDictionary):
    architecture: ClassVar[str] = "relu"
    unit_norm_decoder: ClassVar[bool] = False

    def export_config(self) -> dict[str, Any]:
        # SAELens calls a ReLU SAE "standard".
        return {"architecture": self.export_name("standard"), "trained_as": self.architecture}

    def encode(self, weights: Params, x: jax.Array) -> jax.Array:
        return jax.nn.relu(self.pre_activations(weights, x))

    def loss(
        self,
        params: Params,
        buffers: Params,
        x: jax.Array,
        ctx: LossContext,
        target: jax.Array | None = None,
    ) -> tuple[jax.Array, dict[str, Any]]:
        target = x if target is None else target
        latents = self.encode(params, x)
        reconstruction = self.output(params, x, latents)
        mse = common.squared_error(target, reconstruction)
        decoder_norms = jnp.linalg.norm(params["W_dec"], axis=1)
        l1 = jnp.mean(jnp.sum(latents * decoder_norms, axis=-1))
        loss = mse + self.spec.sparsity_coefficient * ctx.sparsity_scale * l1
        return loss, common.dense_outputs(reconstruction, latents > 0, {"mse": mse, "l1": l1})
