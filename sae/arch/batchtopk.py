"""BatchTopK SAE (Bussmann et al. 2024): keep the k*batch largest activations of the whole
batch, so tokens share a sparsity budget instead of each getting exactly k.

At inference there is no batch: a latent fires when its pre-activation exceeds a threshold,
estimated during training as the running average of the batch cut-off. Exported that way, the
SAE is a JumpReLU with one shared threshold, and loads as one elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from sae.arch import common, sparse_ops
from sae.arch.auxk import aux_latents, auxk_loss
from sae.arch.base import LossContext, Params

# Weight of the newest batch cut-off in the running threshold estimate.
THRESHOLD_MOMENTUM = 0.01


@dataclass(frozen=True)
class BatchTopKSAE(common.StandardDictionary):
    architecture: ClassVar[str] = "batchtopk"
    unit_norm_decoder: ClassVar[bool] = True

    def export_config(self) -> dict[str, Any]:
        return {
            "architecture": self.export_name("jumprelu"),
            "trained_as": self.architecture,
            "k": self.spec.k,
        }

    def export_weights(self, weights: Params) -> Params:
        exported = {k: v for k, v in weights.items() if k != "threshold"}
        exported["threshold"] = jnp.full((self.d_sae,), weights["threshold"], jnp.float32)
        return exported

    def init_buffers(self) -> Params:
        return {"threshold": jnp.zeros((), jnp.float32)}

    def partition_specs(self) -> dict[str, tuple[str | None, ...]]:
        return {**common.STANDARD_SPECS, "threshold": ()}

    def encode(self, weights: Params, x: jax.Array) -> jax.Array:
        pre = self.pre_activations(weights, x)
        return jnp.where(pre > weights["threshold"], pre, 0.0)

    def select(self, pre: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(latents, active mask, cut-off): the k * tokens largest positive pre-activations of
        the batch, and the smallest of them (the batch's threshold)."""
        positive = jax.nn.relu(pre)
        cutoff = jax.lax.stop_gradient(sparse_ops.kth_largest(positive, self.spec.k * pre.shape[0]))
        active = (positive >= cutoff) & (positive > 0)
        return jnp.where(active, positive, 0.0), active, cutoff

    def loss(
        self,
        params: Params,
        buffers: Params,
        x: jax.Array,
        ctx: LossContext,
        target: jax.Array | None = None,
    ) -> tuple[jax.Array, dict[str, Any]]:
        target = x if target is None else target
        pre = self.pre_activations(params, x)
        latents, active, cutoff = self.select(pre)
        reconstruction = self.output(params, x, latents)
        mse = common.squared_error(target, reconstruction)
        k_aux = aux_latents(self.spec.k_aux, self.d_model, self.d_sae)
        auxk = auxk_loss(params, target, reconstruction, pre, ctx.dead, k_aux, self.matmul_dtype)
        outputs = common.dense_outputs(reconstruction, active, {"mse": mse, "auxk": auxk})
        return mse + self.spec.auxk_coefficient * auxk, {**outputs, "cutoff": cutoff}

    def update_buffers(self, buffers: Params, outputs: dict[str, Any], step: jax.Array) -> Params:
        cutoff = outputs["cutoff"]
        running = buffers["threshold"] + THRESHOLD_MOMENTUM * (cutoff - buffers["threshold"])
        return {"threshold": jnp.where(step == 0, cutoff, running)}
