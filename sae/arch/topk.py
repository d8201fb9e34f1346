"""TopK SAE (Gao et al. 2024): keep each token's k largest pre-activations, plus AuxK.

Selection is exact under model-axis sharding (`sparse_ops.top_k`). The decode reads only the k
selected decoder rows per token (cost scaling with k) or, where the backend and shape favour it,
multiplies the scattered latents by the whole decoder (`sparse_ops.decode`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from sae.arch import common, sparse_ops
from sae.arch.auxk import aux_latents, auxk_loss
from sae.arch.base import LossContext, Params


@dataclass(frozen=True)
class TopKSAE(common.StandardDictionary):
    architecture: ClassVar[str] = "topk"
    unit_norm_decoder: ClassVar[bool] = True

    def export_config(self) -> dict[str, Any]:
        # Selection on the plain pre-activations (the decoder rows are unit norm in training).
        return {
            "architecture": self.export_name("topk"),
            "trained_as": self.architecture,
            "k": self.spec.k,
            "rescale_acts_by_decoder_norm": False,
        }

    def select(self, weights: Params, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(pre-activations, relu'd top-k values, their latent indices)."""
        pre = self.pre_activations(weights, x)
        values, indices = sparse_ops.top_k(pre, self.spec.k)
        return pre, jax.nn.relu(values), indices

    def encode(self, weights: Params, x: jax.Array) -> jax.Array:
        _, values, indices = self.select(weights, x)
        return sparse_ops.dense_from_sparse(values, indices, self.d_sae)

    def loss(
        self,
        params: Params,
        buffers: Params,
        x: jax.Array,
        ctx: LossContext,
        target: jax.Array | None = None,
    ) -> tuple[jax.Array, dict[str, Any]]:
        target = x if target is None else target
        pre, values, indices = self.select(params, x)
        w_dec = params["W_dec"].astype(self.matmul_dtype)
        decoded = sparse_ops.decode(values, indices, w_dec) + params["b_dec"]
        reconstruction = decoded + self.skip_output(params, x)
        mse = common.squared_error(target, reconstruction)
        k_aux = aux_latents(self.spec.k_aux, self.d_model, self.d_sae)
        auxk = auxk_loss(params, target, reconstruction, pre, ctx.dead, k_aux, self.matmul_dtype)
        active = values > 0
        return mse + self.spec.auxk_coefficient * auxk, {
            "reconstruction": reconstruction,
            "fire_counts": sparse_ops.fire_counts(indices, active, self.d_sae),
            "l0": jnp.mean(jnp.sum(active, axis=-1)),
            "parts": {"mse": mse, "auxk": auxk},
        }
