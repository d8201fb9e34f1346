"""Building blocks the architectures share: initialisation, encoder matmul, losses, and what
makes any architecture a transcoder (no decoder bias subtracted from an input that lives in
another space; an optional affine skip)."""

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
    # d_model x d_model, small next to the dictionary: replicated.
    "W_skip": (),
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
        name = str(cfg["architecture"])
        kind = "sae"
        if name.endswith("transcoder"):
            kind = "skip_transcoder" if name.endswith("skip_transcoder") else "transcoder"
        spec = SaeSpec(
            architecture=cls.architecture,  # type: ignore[attr-defined]
            kind=kind,
            k=int(cfg.get("k", SaeSpec.k)),
            normalize_tokens=cfg.get("normalize_activations") == "layer_norm",
        )
        return cls(spec, d_model=int(cfg["d_in"]), d_sae=int(cfg["d_sae"]))

    @property
    def transcoder(self) -> bool:
        return self.spec.kind != "sae"

    @property
    def skip(self) -> bool:
        return self.spec.kind == "skip_transcoder"

    def export_weights(self, weights: Params) -> Params:
        return dict(weights)

    def export_name(self, saelens_name: str) -> str:
        """The architecture name cfg.json gives this dictionary: SAELens' name for the SAE
        (`standard`, `topk`, `jumprelu`), or for the transcoder of that kind
        (`transcoder`, `jumprelu_skip_transcoder`, ...; `topk_transcoder` is ours, SAELens
        has no TopK transcoder)."""
        if not self.transcoder:
            return saelens_name
        prefix = "" if saelens_name == "standard" else f"{saelens_name}_"
        return prefix + self.spec.kind

    def init_params(
        self, key: jax.Array, sample: jax.Array, target: jax.Array | None = None
    ) -> Params:
        """From a first batch of inputs and (transcoders) of their targets: the decoder bias
        starts at the targets' mean (or geometric median); a skip starts at zero."""
        target = sample if target is None else target
        params = init_weights(key, target, self.d_sae, self.decoder_bias_init)
        if sample.shape[-1] != target.shape[-1]:
            raise ValueError("inputs and targets of different widths are not supported")
        if self.skip:
            params["W_skip"] = jnp.zeros((self.d_model, self.d_model), jnp.float32)
        return params

    def pre_activations(self, weights: Params, x: jax.Array) -> jax.Array:
        """x @ W_enc + b_enc, with b_dec subtracted from x first for an SAE (SAELens'
        apply_b_dec_to_input); a transcoder's b_dec lives in the output space."""
        return pre_activations(weights, x, self.matmul_dtype, centre=not self.transcoder)

    def skip_output(self, weights: Params, x: jax.Array) -> jax.Array | float:
        """x @ W_skip.T for a skip transcoder (SAELens' layout, [d_out, d_in]); else 0."""
        if not self.skip:
            return 0.0
        dtype = jnp.dtype(self.matmul_dtype)
        return jnp.matmul(
            x.astype(dtype), weights["W_skip"].T.astype(dtype), preferred_element_type=jnp.float32
        )

    def output(self, weights: Params, x: jax.Array, latents: jax.Array) -> jax.Array:
        """The dictionary's output for inputs x with these latents: the reconstruction (an
        SAE), or the predicted MLP output (a transcoder, skip included)."""
        return self.decode(weights, latents) + self.skip_output(weights, x)

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


def pre_activations(
    weights: Params, x: jax.Array, matmul_dtype: str, centre: bool = True
) -> jax.Array:
    """(x - b_dec) @ W_enc + b_enc (x @ W_enc + b_enc without `centre`), with the matmul in
    `matmul_dtype` and fp32 accumulation."""
    dtype = jnp.dtype(matmul_dtype)
    centred = (x - weights["b_dec"] if centre else x).astype(dtype)
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
