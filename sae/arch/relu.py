"""ReLU SAE with an L1 penalty weighted by decoder-row norms (Anthropic, April 2024 update).

Written with Flax linen so parameters live in an ordinary pytree that shards and checkpoints
like any other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sae.arch.base import Params
from sae.sharding import MODEL


class _ReluModule(nn.Module):
    d_model: int
    d_sae: int

    def setup(self) -> None:
        zeros = nn.initializers.zeros
        self.W_enc = self.param("W_enc", zeros, (self.d_model, self.d_sae))
        self.b_enc = self.param("b_enc", zeros, (self.d_sae,))
        self.W_dec = self.param("W_dec", zeros, (self.d_sae, self.d_model))
        self.b_dec = self.param("b_dec", zeros, (self.d_model,))

    def encode(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu((x - self.b_dec) @ self.W_enc + self.b_enc)

    def decode(self, latents: jax.Array) -> jax.Array:
        return latents @ self.W_dec + self.b_dec

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        latents = self.encode(x)
        return self.decode(latents), latents


@dataclass(frozen=True)
class ReluSAE:
    d_model: int
    d_sae: int
    l1_coefficient: float = 5.0

    @property
    def module(self) -> _ReluModule:
        return _ReluModule(self.d_model, self.d_sae)

    def init_params(self, key: jax.Array, sample: jax.Array) -> Params:
        # Unit-norm random decoder rows, encoder as its transpose, decoder bias at the data
        # mean: the common starting point that keeps early latents alive.
        w_dec = jax.random.normal(key, (self.d_sae, self.d_model), jnp.float32)
        w_dec = w_dec / jnp.linalg.norm(w_dec, axis=1, keepdims=True)
        return {
            "W_enc": w_dec.T,
            "b_enc": jnp.zeros((self.d_sae,), jnp.float32),
            "W_dec": w_dec,
            "b_dec": jnp.mean(sample, axis=0).astype(jnp.float32),
        }

    def partition_specs(self) -> dict[str, tuple[str | None, ...]]:
        return {"W_enc": (None, MODEL), "b_enc": (MODEL,), "W_dec": (MODEL, None), "b_dec": ()}

    def encode(self, params: Params, x: jax.Array) -> jax.Array:
        return self.module.apply({"params": params}, x, method=_ReluModule.encode)

    def decode(self, params: Params, latents: jax.Array) -> jax.Array:
        return self.module.apply({"params": params}, latents, method=_ReluModule.decode)

    def loss(self, params: Params, x: jax.Array) -> tuple[jax.Array, dict[str, Any]]:
        reconstruction, latents = self.module.apply({"params": params}, x)
        mse = jnp.mean(jnp.sum((reconstruction - x) ** 2, axis=-1))
        decoder_norms = jnp.linalg.norm(params["W_dec"], axis=1)
        l1 = jnp.mean(jnp.sum(latents * decoder_norms, axis=-1))
        loss = mse + self.l1_coefficient * l1
        return loss, {"mse": mse, "l1": l1, "latents": latents, "reconstruction": reconstruction}
