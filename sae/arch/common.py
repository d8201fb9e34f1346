"""Building blocks the architectures share: initialisation, encoder matmul, losses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from sae.arch.base import Params
from sae.arch.spec import SaeSpec
from sae.sharding import MODEL

STANDARD_SPECS: dict[str, tuple[str | None, ...]] = {
    "W_enc": (None, MODEL),
    "b_enc": (MODEL,),
    "W_dec": (MODEL, None),
    "b_dec": (),
}


@dataclass(frozen=True)
class StandardDictionary:
    """What every architecture shares: its settings (`spec`, read directly: the one place they
    are declared), the sizes, the run's matmul dtype and decoder-bias init; encoder, decoder
    and their biases, sharded by STANDARD_SPECS; no buffers; a dense decoder; exported as
    trained. Subclasses override what differs."""

    spec: SaeSpec
    d_model: int
    d_sae: int
    # The run's train.decoder_bias_init and train.matmul_dtype.
    decoder_bias_init: str = "mean"
    matmul_dtype: str = "float32"

    @property
    def normalize_tokens(self) -> bool:
        return self.spec.normalize_tokens

    @classmethod
    def from_export(cls, cfg: dict[str, Any]) -> Any:
        """The inference model a saved cfg.json describes."""
        spec = SaeSpec(
            architecture=cls.architecture,  # type: ignore[attr-defined]
            k=int(cfg.get("k", SaeSpec.k)),
            normalize_tokens=cfg.get("normalize_activations") == "layer_norm",
        )
        return cls(spec, d_model=int(cfg["d_in"]), d_sae=int(cfg["d_sae"]))

    def export_weights(self, weights: Params) -> Params:
        return dict(weights)

    def init_params(self, key: jax.Array, sample: jax.Array) -> Params:
        return init_weights(key, sample, self.d_sae, self.decoder_bias_init)

    def init_buffers(self) -> Params:
        return {}

    def partition_specs(self) -> dict[str, tuple[str | None, ...]]:
        return dict(STANDARD_SPECS)

    def decode(self, weights: Params, latents: jax.Array) -> jax.Array:
        return dense_decode(weights, latents, self.matmul_dtype)

    def update_buffers(self, buffers: Params, outputs: dict[str, Any], step: jax.Array) -> Params:
        return buffers


def dense_outputs(
    reconstruction: jax.Array, active: jax.Array, parts: dict[str, jax.Array]
) -> dict[str, Any]:
    """A loss's outputs when the active latents are a dense [tokens, d_sae] mask."""
    return {
        "reconstruction": reconstruction,
        "fire_counts": jnp.sum(active, axis=0, dtype=jnp.float32),
        "l0": jnp.mean(jnp.sum(active, axis=-1)),
        "parts": parts,
    }


def geometric_median(points: jax.Array, iterations: int = 30) -> jax.Array:
    """Weiszfeld's algorithm: the point minimising the summed distance to `points`; more robust
    to outlier activations than the mean as a starting decoder bias."""

    def step(median: jax.Array, _: Any) -> tuple[jax.Array, None]:
        weights = 1.0 / jnp.maximum(jnp.linalg.norm(points - median, axis=1), 1e-8)
        return (weights @ points) / jnp.sum(weights), None

    median, _ = jax.lax.scan(step, jnp.mean(points, axis=0), None, length=iterations)
    return median


def init_weights(
    key: jax.Array, sample: jax.Array, d_sae: int, decoder_bias_init: str = "mean"
) -> Params:
    """Unit-norm random decoder rows, the encoder as their transpose, and the decoder bias at
    the mean (or geometric median) of a first batch: the start that keeps early latents alive."""
    d_model = sample.shape[-1]
    w_dec = jax.random.normal(key, (d_sae, d_model), jnp.float32)
    w_dec = w_dec / jnp.linalg.norm(w_dec, axis=1, keepdims=True)
    sample = sample.astype(jnp.float32)
    if decoder_bias_init == "geometric_median":
        b_dec = geometric_median(sample)
    elif decoder_bias_init == "mean":
        b_dec = jnp.mean(sample, axis=0)
    else:
        b_dec = jnp.zeros((d_model,), jnp.float32)
    return {
        "W_enc": w_dec.T,
        "b_enc": jnp.zeros((d_sae,), jnp.float32),
        "W_dec": w_dec,
        "b_dec": b_dec,
    }


def pre_activations(weights: Params, x: jax.Array, matmul_dtype: str) -> jax.Array:
    """(x - b_dec) @ W_enc + b_enc, with the matmul in `matmul_dtype` and fp32 accumulation."""
    dtype = jnp.dtype(matmul_dtype)
    centred = (x - weights["b_dec"]).astype(dtype)
    pre = jnp.matmul(centred, weights["W_enc"].astype(dtype), preferred_element_type=jnp.float32)
    return pre + weights["b_enc"]


def dense_decode(weights: Params, latents: jax.Array, matmul_dtype: str) -> jax.Array:
    dtype = jnp.dtype(matmul_dtype)
    out = jnp.matmul(
        latents.astype(dtype), weights["W_dec"].astype(dtype), preferred_element_type=jnp.float32
    )
    return out + weights["b_dec"]


def squared_error(x: jax.Array, reconstruction: jax.Array) -> jax.Array:
    """Summed over the model dimension, averaged over tokens (SAELens' `mse_loss` convention
    on normalised inputs)."""
    return jnp.mean(jnp.sum((reconstruction - x) ** 2, axis=-1))


def normalized_residual_loss(target: jax.Array, prediction: jax.Array) -> jax.Array:
    """||target - prediction||^2 over the total variance of target (AuxK's normalisation)."""
    error = jnp.sum((target - prediction) ** 2)
    variance = jnp.sum((target - jnp.mean(target, axis=0)) ** 2)
    return error / jnp.maximum(variance, 1e-12)
