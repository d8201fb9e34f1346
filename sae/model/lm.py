"""Language-model access: a keras-hub backbone under JAX, tapped at chosen residual-stream layers.

The tap is a functional sub-model ending at `decoder_block_<i>`, so blocks after the deepest
tapped layer are never computed; it runs as one jitted pure function (`stateless_call`) with
the batch split over the mesh's data axis and the weights over its model axis
(`sharding.weight_sharding`; replicated when that axis is 1). For running the model in
pieces (an SAE spliced in at one layer), `bound_weights` and the block functions call the
backbone's own layers one by one as a pure function of its weights, and `mlp_hook` reads (or
replaces) a block's MLP input and output inside it, for transcoders.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import Mesh  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from sae import sharding
from sae.arch.spec import Site  # noqa: E402
from sae.errors import InputError  # noqa: E402
from sae.io import presets  # noqa: E402
from sae.sharding import DATA  # noqa: E402


def load_backbone(preset_uri: str, dtype: str = "float32"):
    import keras_hub

    return keras_hub.models.Backbone.from_preset(str(presets.local_copy(preset_uri)), dtype=dtype)


# keras-hub backbones whose blocks the piecewise forward and generation call one by one:
# Gemma 1 and 2 (GemmaBackbone) and Gemma 3's text model (Gemma3Backbone without a vision
# encoder). Their graphs agree: scaled token embedding, blocks called with a padding mask,
# final RMS norm, tied embedding in reverse (with the config's soft-cap, if any).
SUPPORTED_BACKBONES = ("GemmaBackbone", "Gemma3Backbone")


def check_gemma(backbone: Any, hint: str = "") -> None:
    """Fails with one line unless the piecewise forward below rebuilds `backbone`'s graph."""
    name = type(backbone).__name__
    if name not in SUPPORTED_BACKBONES:
        raise InputError(
            f"the model is a {name}; running it block by block supports keras-hub's "
            f"GemmaBackbone (Gemma 1 and 2) and Gemma3Backbone (text only){hint}"
        )
    if getattr(backbone, "vision_encoder", None) is not None:
        raise InputError(
            f"the model is a Gemma 3 with a vision encoder; running it block by block "
            f"supports the text-only Gemma3Backbone{hint}"
        )


def backbone_weights(backbone: Any) -> list[jax.Array]:
    """Every variable's value in `backbone.variables` order: the weights that `bound_weights`
    takes, passed to jitted functions as arguments so they are not baked in as constants."""
    return [v.value for v in backbone.variables]


@contextlib.contextmanager
def bound_weights(backbone: Any, weights: list[jax.Array]) -> Iterator[None]:
    """Inside, the backbone's layers compute with `weights` (traced values) instead of their
    variables, so calling them one by one is a pure function of the weights."""
    import keras

    mapping = list(zip(backbone.variables, weights, strict=True))
    with keras.StatelessScope(state_mapping=mapping):
        yield


def run_to_layer(
    backbone: Any, token_ids: jax.Array, padding_mask: jax.Array, layer: int
) -> jax.Array:
    """The residual stream after `decoder_block_<layer>` (what ActivationTap reads), computed
    as GemmaBackbone and Gemma3Backbone do: scaled token embedding, then blocks 0..layer."""
    return run_blocks(backbone, embed(backbone, token_ids), padding_mask, 0, layer + 1)


def run_blocks(
    backbone: Any, x: jax.Array, padding_mask: jax.Array, start: int, stop: int
) -> jax.Array:
    """Decoder blocks start..stop-1 on the residual stream x [batch, seq, hidden]."""
    for block in backbone.transformer_layers[start:stop]:
        x = block(x, padding_mask=padding_mask)
    return x


def embed(backbone: Any, token_ids: jax.Array) -> jax.Array:
    """The scaled token embedding: the residual stream entering block 0."""
    from keras import ops

    x = backbone.token_embedding(token_ids)
    return x * ops.cast(ops.sqrt(backbone.hidden_dim), x.dtype)


def mlp_layers(block: Any) -> tuple[Any, Any]:
    """The sublayers of a Gemma decoder block whose outputs are its MLP's input and output:
    the pre-MLP norm, and the post-MLP norm (the feed-forward's last projection when the
    block has none, as in Gemma 1). The block adds the second to the residual stream."""
    output = block.post_ffw_norm if getattr(block, "use_post_ffw_norm", False) else None
    return block.pre_ffw_norm, output or block.ffw_linear


MlpReplacement = Callable[[jax.Array, jax.Array], jax.Array]


@contextlib.contextmanager
def mlp_hook(block: Any, replace: MlpReplacement | None = None) -> Iterator[dict[str, jax.Array]]:
    """Inside, calling `block` records its MLP's input and output (see `mlp_layers`) under
    "mlp_in" and "mlp_out" of the yielded dict; with `replace`, the block continues with
    replace(mlp_in, mlp_out) as the MLP's output (a transcoder spliced in). The block's own
    code runs unchanged: only those two sublayers' calls are wrapped, and restored after."""
    captured: dict[str, jax.Array] = {}
    first, last = mlp_layers(block)
    first_call, last_call = first.call, last.call

    def record_input(*args: Any, **kwargs: Any) -> jax.Array:
        captured["mlp_in"] = first_call(*args, **kwargs)
        return captured["mlp_in"]

    def record_output(*args: Any, **kwargs: Any) -> jax.Array:
        out = last_call(*args, **kwargs)
        captured["mlp_out"] = out
        return out if replace is None else replace(captured["mlp_in"], out).astype(out.dtype)

    first.call, last.call = record_input, record_output
    try:
        yield captured
    finally:
        del first.call, last.call


def call_with_mlp(
    block: Any, x: jax.Array, padding_mask: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(block output, MLP input, MLP output) of one decoder block on the residual stream x."""
    with mlp_hook(block) as captured:
        out = block(x, padding_mask=padding_mask)
    return out, captured["mlp_in"], captured["mlp_out"]


def run_to_mlp(
    backbone: Any, token_ids: jax.Array, padding_mask: jax.Array, layer: int
) -> tuple[jax.Array, jax.Array]:
    """(MLP input, MLP output) of block `layer`, [batch, seq, hidden] each: what a
    transcoder at that layer reads and predicts."""
    x = run_blocks(backbone, embed(backbone, token_ids), padding_mask, 0, layer)
    _, mlp_in, mlp_out = call_with_mlp(backbone.transformer_layers[layer], x, padding_mask)
    return mlp_in, mlp_out


def final_logits(backbone: Any, x: jax.Array) -> jax.Array:
    """Next-token logits from the last block's output: final RMS norm, then the tied embedding
    in reverse (which applies Gemma 2's final logit soft-cap when the config sets one)."""
    return backbone.token_embedding(backbone.layer_norm(x), reverse=True)


class ActivationTap:
    """Activations at each requested site (sae.arch.spec.Site; a bare layer index is the
    residual stream after `decoder_block_<layer>`), in the backbone's compute dtype (`dtype`:
    bfloat16 for a bfloat16 model), so the device-to-host copy is no wider than what the
    model computed; consumers cast to float32 where they do arithmetic.

    Residual-stream sites only: a keras functional sub-model ending at the deepest block.
    With MLP sites (transcoders): the same blocks called one by one, `mlp_hook` reading the
    MLP's input and output inside theirs."""

    def __init__(self, backbone: Any, sites: Sequence[int | Site], mesh: Mesh) -> None:
        import keras

        extra = sorted(set(backbone.input) - {"token_ids", "padding_mask"})
        if extra:
            raise InputError(
                f"the tap feeds a model token_ids and padding_mask; this "
                f"{type(backbone).__name__} also takes {', '.join(extra)} (text-only Gemma 1, "
                "2 and 3 are supported)"
            )
        self.sites = [s if isinstance(s, Site) else Site(int(s)) for s in sites]
        self.mesh = mesh
        self.hidden_dim = int(backbone.hidden_dim)
        self.dtype = np.dtype(backbone.dtype_policy.compute_dtype)
        if all(site.point == "resid_post" for site in self.sites):
            outputs = [backbone.get_layer(f"decoder_block_{s.layer}").output for s in self.sites]
            self.model = keras.Model(backbone.input, outputs)
            weights: Any = (
                [v.value for v in self.model.trainable_variables],
                [v.value for v in self.model.non_trainable_variables],
            )
            call = self._call
        else:
            check_gemma(backbone)
            self.backbone = backbone
            weights, call = backbone_weights(backbone), self._call_blocks
        # Split over the mesh's model axis (model.mesh_model), or replicated when it is 1.
        self._weights, placed = sharding.place_weights(weights, mesh)
        batch = sharding.batch_sharding(mesh)
        self._forward = jax.jit(call, in_shardings=(placed, batch, batch), out_shardings=batch)
        self._host_max = sharding.HostMax(mesh)

    @property
    def layers(self) -> list[int]:
        return [site.layer for site in self.sites]

    @property
    def weight_bytes(self) -> int:
        """The bytes of the weights the tap computes with (all of them, on all devices)."""
        return sum(w.nbytes for w in jax.tree.leaves(self._weights))

    @property
    def weight_bytes_per_device(self) -> int:
        return sharding.bytes_per_device(self._weights)

    def describe_weights(self) -> str:
        """For the logs: how much of the model each device holds."""
        return (
            f"model weights {self.weight_bytes_per_device / 2**20:.2f} MiB per device (of "
            f"{self.weight_bytes / 2**20:.2f} MiB) on mesh {dict(self.mesh.shape)}"
        )

    def _call(self, weights, token_ids: jax.Array, padding_mask: jax.Array) -> list[jax.Array]:
        trainable, non_trainable = weights
        outputs, _ = self.model.stateless_call(
            trainable, non_trainable, {"token_ids": token_ids, "padding_mask": padding_mask}
        )
        outputs = outputs if isinstance(outputs, list | tuple) else [outputs]
        return [out.astype(self.dtype) for out in outputs]

    def _call_blocks(
        self, weights: list[jax.Array], token_ids: jax.Array, padding_mask: jax.Array
    ) -> list[jax.Array]:
        backbone, found = self.backbone, {}
        mlp_layers = {site.layer for site in self.sites if site.point != "resid_post"}
        with bound_weights(backbone, weights):
            x = embed(backbone, token_ids)
            for layer in range(max(site.layer for site in self.sites) + 1):
                block = backbone.transformer_layers[layer]
                if layer in mlp_layers:
                    x, mlp_in, mlp_out = call_with_mlp(block, x, padding_mask)
                    found[Site(layer, "mlp_in")], found[Site(layer, "mlp_out")] = mlp_in, mlp_out
                else:
                    x = block(x, padding_mask=padding_mask)
                found[Site(layer)] = x
        return [found[site].astype(self.dtype) for site in self.sites]

    def device_forward(self, token_ids: jax.Array, padding_mask: jax.Array) -> list[jax.Array]:
        """The jitted forward alone, on (sharded) device arrays: what benchmarks compare with."""
        return self._forward(self._weights, token_ids, padding_mask)

    def __call__(self, token_ids: np.ndarray, lengths: np.ndarray) -> list[jax.Array]:
        """[batch, seq, hidden] activations (`self.dtype`) per tapped layer (this host's
        sequences).

        Returned as soon as the forward is dispatched: reading them (np.asarray) waits for it,
        so a caller can dispatch the next batch first and keep the device busy. With several
        hosts every host must call this the same number of times (see `any_host`)."""
        positions = np.arange(token_ids.shape[1])[None, :]
        padding_mask = positions < lengths[:, None]
        inputs = (token_ids.astype(np.int32), padding_mask)
        if jax.process_count() > 1:
            # Multi-host: each host passes its own sequences and gets their activations back.
            inputs = multihost_utils.host_local_array_to_global_array(inputs, self.mesh, P(DATA))
            outputs = self.device_forward(*inputs)
            outputs = multihost_utils.global_array_to_host_local_array(outputs, self.mesh, P(DATA))
        else:
            outputs = self.device_forward(*inputs)
        return list(outputs)

    def any_host(self, flag: bool) -> jax.Array:
        """Whether `flag` is true on any host (a replicated device 0/1). Dispatched like a
        forward (reading it waits only for the work queued before it), so hosts can agree when
        to stop calling the tap without a blocking barrier per batch."""
        return self._host_max(int(flag))
