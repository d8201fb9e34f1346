"""What every SAE architecture provides, and what the trainer hands to its loss.

Parameters are trained by the optimizer; buffers are state an architecture keeps but does not
differentiate (BatchTopK's inference threshold). Inference (`encode`, `decode`) takes both in
one dict, which is also what is exported.
"""

from __future__ import annotations

from typing import Any, Protocol

import flax.struct
import jax

Params = dict[str, jax.Array]


@flax.struct.dataclass
class LossContext:
    """Per-step inputs to the loss that are not parameters or data."""

    # Multiplier in [0, 1] for the sparsity penalty (its warm-up).
    sparsity_scale: jax.Array
    # [d_sae] latents that have not fired within the dead window (AuxK revives them).
    dead: jax.Array


class SparseAutoencoder(Protocol):
    architecture: str
    # Its settings (sae.arch.spec.SaeSpec): what the loss, selection and optimizer read.
    spec: Any
    d_model: int
    d_sae: int
    # Decoder rows held at unit norm (gradient parallel to each row removed, then renormed).
    unit_norm_decoder: bool
    # Inputs are standardised per token before encoding (sae.arch.token_norm); encode and decode
    # themselves work on the standardised inputs.
    normalize_tokens: bool
    # A transcoder predicts another activation than its input (the MLP's output from its
    # input), with an affine skip from input to output when `skip`.
    transcoder: bool
    skip: bool

    def init_params(
        self, key: jax.Array, sample: jax.Array, target: jax.Array | None = None
    ) -> Params:
        """Initial parameters; `sample` is a first batch of (normalised) inputs, `target`
        their targets (a transcoder's; an SAE's are its inputs)."""

    def init_buffers(self) -> Params:
        """Initial non-trained state."""

    def partition_specs(self) -> dict[str, tuple[str | None, ...]]:
        """PartitionSpec entries per parameter and buffer (latents over the model axis)."""

    def encode(self, weights: Params, x: jax.Array) -> jax.Array:
        """Inference latents [tokens, d_sae]."""

    def decode(self, weights: Params, latents: jax.Array) -> jax.Array:
        """latents @ W_dec + b_dec [tokens, d_model]."""

    def output(self, weights: Params, x: jax.Array, latents: jax.Array) -> jax.Array:
        """What the dictionary outputs for inputs x: decode(latents), plus a skip transcoder's
        x @ W_skip.T: the SAE's reconstruction, or the transcoder's predicted target."""

    def loss(
        self,
        params: Params,
        buffers: Params,
        x: jax.Array,
        ctx: LossContext,
        target: jax.Array | None = None,
    ) -> tuple[jax.Array, dict[str, Any]]:
        """Training loss and its outputs: `reconstruction` (of `target`, default x),
        `fire_counts` [d_sae], `l0`, and the named loss parts under `parts`."""

    def update_buffers(self, buffers: Params, outputs: dict[str, Any], step: jax.Array) -> Params:
        """Buffers after one training step."""

    def export_weights(self, weights: Params) -> Params:
        """Weights in the exported (SAELens / Gemma Scope) form."""

    def export_config(self) -> dict[str, Any]:
        """Hyperparameters needed to rebuild the inference model (into cfg.json)."""
