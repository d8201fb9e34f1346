"""JumpReLU SAE (Rajamanoharan et al. 2024; Gemma Scope): a latent passes its pre-activation
through only above a learned per-latent threshold, and the penalty is L0 itself.

Neither the jump nor L0 has a useful gradient for the threshold, so both use straight-through
estimators with a rectangle kernel of width `bandwidth` around the threshold. The threshold is
learned as a log in float32 whatever the matmul dtype. `bandwidth` and the initial threshold
are in the units of inputs normalised to mean norm sqrt(d_model): Gemma Scope's 0.001 on
unit mean-squared-norm inputs is ~0.05 here.

The sparsity loss follows SAELens' `jumprelu_sparsity_loss_mode`: L0 itself ("step",
DeepMind), a quadratic pull toward `target_l0` ("quadratic", Gemma Scope 2) or a tanh of each
latent's decoder-weighted activation ("tanh", Anthropic); Anthropic's pre-activation loss on
dead latents can be added to any of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from sae.arch import common
from sae.arch.base import LossContext, Params
from sae.sharding import MODEL


def _window(pre: jax.Array, threshold: jax.Array, bandwidth: float) -> jax.Array:
    """Rectangle kernel K((pre - threshold) / bandwidth) / bandwidth."""
    return (jnp.abs(pre - threshold) < bandwidth / 2).astype(pre.dtype) / bandwidth


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def jump_relu(pre: jax.Array, threshold: jax.Array, bandwidth: float) -> jax.Array:
    return jnp.where(pre > threshold, pre, 0.0)


def _jump_relu_fwd(pre, threshold, bandwidth):
    return jump_relu(pre, threshold, bandwidth), (pre, threshold)


def _jump_relu_bwd(bandwidth, residuals, grad):
    pre, threshold = residuals
    grad_pre = jnp.where(pre > threshold, grad, 0.0)
    grad_threshold = -jnp.sum(grad * threshold * _window(pre, threshold, bandwidth), axis=0)
    return grad_pre, grad_threshold


jump_relu.defvjp(_jump_relu_fwd, _jump_relu_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def step_function(pre: jax.Array, threshold: jax.Array, bandwidth: float) -> jax.Array:
    return (pre > threshold).astype(pre.dtype)


def _step_fwd(pre, threshold, bandwidth):
    return step_function(pre, threshold, bandwidth), (pre, threshold)


def _step_bwd(bandwidth, residuals, grad):
    pre, threshold = residuals
    grad_threshold = -jnp.sum(grad * _window(pre, threshold, bandwidth), axis=0)
    return jnp.zeros_like(pre), grad_threshold


step_function.defvjp(_step_fwd, _step_bwd)


@dataclass(frozen=True)
class JumpReluSAE(common.StandardDictionary):
    architecture: ClassVar[str] = "jumprelu"
    unit_norm_decoder: ClassVar[bool] = True

    def export_config(self) -> dict[str, Any]:
        return {"architecture": self.export_name("jumprelu"), "trained_as": self.architecture}

    def export_weights(self, weights: Params) -> Params:
        exported = {k: v for k, v in weights.items() if k != "log_threshold"}
        exported["threshold"] = self.thresholds(weights)
        return exported

    def init_params(
        self, key: jax.Array, sample: jax.Array, target: jax.Array | None = None
    ) -> Params:
        params = super().init_params(key, sample, target)
        log_threshold = jnp.log(jnp.float32(self.spec.jumprelu_init_threshold))
        params["log_threshold"] = jnp.full((self.d_sae,), log_threshold, jnp.float32)
        return params

    def partition_specs(self) -> dict[str, tuple[str | None, ...]]:
        return {**common.STANDARD_SPECS, "log_threshold": (MODEL,), "threshold": (MODEL,)}

    @staticmethod
    def thresholds(weights: Params) -> jax.Array:
        if "threshold" in weights:  # exported form
            return weights["threshold"]
        return jnp.exp(weights["log_threshold"])

    def encode(self, weights: Params, x: jax.Array) -> jax.Array:
        pre = self.pre_activations(weights, x)
        return jnp.where(pre > self.thresholds(weights), pre, 0.0)

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
        threshold = jnp.exp(params["log_threshold"])
        latents = jump_relu(pre, threshold, self.spec.jumprelu_bandwidth)
        reconstruction = self.output(params, x, latents)
        mse = common.squared_error(target, reconstruction)
        # Unit-norm rows in training; kept so the penalties read as SAELens writes them.
        decoder_norms = jnp.linalg.norm(params["W_dec"], axis=1)
        sparsity = self.sparsity_loss(pre, threshold, latents, decoder_norms)
        parts = {"mse": mse, f"{self.spec.jumprelu_sparsity_loss_mode}_penalty": sparsity}
        loss = mse + self.spec.sparsity_coefficient * ctx.sparsity_scale * sparsity
        if self.spec.pre_act_loss_coefficient:
            parts["pre_act_loss"] = pre_activation_loss(pre, threshold, ctx.dead, decoder_norms)
            loss = loss + self.spec.pre_act_loss_coefficient * parts["pre_act_loss"]
        return loss, common.dense_outputs(reconstruction, latents != 0, parts)

    def sparsity_loss(
        self, pre: jax.Array, threshold: jax.Array, latents: jax.Array, decoder_norms: jax.Array
    ) -> jax.Array:
        """The per-token sparsity loss of `jumprelu_sparsity_loss_mode`, averaged over tokens
        (before its coefficient)."""
        mode = self.spec.jumprelu_sparsity_loss_mode
        if mode == "tanh":
            scaled = self.spec.jumprelu_tanh_scale * latents * decoder_norms
            return jnp.mean(jnp.sum(jnp.tanh(scaled), axis=-1))
        l0 = jnp.sum(step_function(pre, threshold, self.spec.jumprelu_bandwidth), axis=-1)
        if mode == "quadratic":
            target = self.spec.target_l0
            return jnp.mean(2.0 / target * (l0 - target) ** 2)
        return jnp.mean(l0)


def pre_activation_loss(
    pre: jax.Array, threshold: jax.Array, dead: jax.Array, decoder_norms: jax.Array
) -> jax.Array:
    """Anthropic's pre-activation loss, on dead latents only (as SAELens computes it): how far
    below its threshold each dead latent's pre-activation sits, weighted by its decoder norm,
    summed over latents and averaged over tokens. Zero while no latent is dead."""
    gap = jax.nn.relu(threshold - pre) * jnp.where(dead, decoder_norms, 0.0)
    return jnp.mean(jnp.sum(gap, axis=-1))
