"""The trained SAE on disk, in SAELens' v6 format: `cfg.json` + `sae_weights.safetensors`.

Training works on activations scaled by `input_scale`; that scale is folded into the saved
weights (W_enc*s, W_dec/s, b_dec/s) so that the file encodes and decodes raw activations and
gives the same latents, which is what every downstream user expects. An SAE trained on
per-token standardised inputs (sae.arch.token_norm) says so with normalize_activations="layer_norm",
which SAELens applies the same way at run time.

cfg.json carries the keys SAELens' config classes read (architecture `standard`, `topk` or
`jumprelu`, d_in, d_sae, dtype, device, apply_b_dec_to_input, normalize_activations,
reshape_activations, topk's k and rescale_acts_by_decoder_norm, and `metadata` with
sae_lens_version >= 6 so SAELens reads it as v6 without conversion) next to our own keys
(layer, model_preset, hook_name, training_tokens, trained_as, ...), which SAELens ignores.

Transcoders are saved as SAELens saves them: `transcoder`, `skip_transcoder`,
`jumprelu_transcoder` or `jumprelu_skip_transcoder` (TopK ones as `topk_transcoder` and
`topk_skip_transcoder`, which SAELens lacks), with `d_out`, apply_b_dec_to_input=false (b_dec
is in the output space), `W_skip` [d_out, d_in] for the skip kinds, the input hook
`blocks.<n>.ln2.hook_normalized` (the MLP's input after its norm) and `hook_name_out`
`blocks.<n>.hook_mlp_out`. Their input and output scales are folded separately.

`load` also reads SAELens v6 files we did not write: it folds what our encoder does not do
itself (apply_b_dec_to_input=false, as in Gemma Scope; TopK's decoder-norm rescaling) into
the weights, so every consumer gets the same inference form.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from sae.arch import INFERENCE_ARCHITECTURES, SparseAutoencoder, from_export_config, token_norm
from sae.arch.spec import Site
from sae.errors import InputError
from sae.io import presets, storage

WEIGHTS_NAME = "sae_weights.safetensors"
CONFIG_NAME = "cfg.json"
# The on-disk format written: SAELens reads configs at or above 6.0.0 as v6 (no conversion).
SAE_LENS_VERSION = "6.0.0"
# TransformerLens names of the Gemma checkpoints, by (num_layers, hidden_dim) of the
# keras-hub backbone: what SAELens, SAEDashboard and Neuronpedia load the model by. Base and
# instruction-tuned models share a shape; the base name is given. Gemma 3 as SAELens' Gemma
# Scope 2 loader names it (the Hugging Face id).
TRANSFORMER_LENS_NAMES: dict[tuple[int, int], str] = {
    (18, 2048): "gemma-2b",
    (28, 3072): "gemma-7b",
    (26, 2304): "gemma-2-2b",
    (42, 3584): "gemma-2-9b",
    (46, 4608): "gemma-2-27b",
    (18, 640): "google/gemma-3-270m",
    (26, 1152): "google/gemma-3-1b-pt",
    (34, 2560): "google/gemma-3-4b-pt",
    (48, 3840): "google/gemma-3-12b-pt",
    (62, 5376): "google/gemma-3-27b-pt",
}


@dataclass(frozen=True)
class Provenance:
    """What an SAE reads: the model, the layer and the data, for cfg.json and SAELens'
    metadata. None where unknown (e.g. training on .npy rows)."""

    layer: int
    model_preset: str
    model_name: str | None
    context_size: int | None
    dataset_path: str | None
    training_tokens: int | None
    prepend_bos: bool = True


def hook_name(layer: int) -> str:
    """TransformerLens' name for the residual stream after block `layer`, which is what
    keras-hub's `decoder_block_<layer>` outputs."""
    return f"blocks.{layer}.hook_resid_post"


def transcoder_hook_names(layer: int) -> tuple[str, str]:
    """TransformerLens' names of a transcoder's input, the MLP's input after the pre-MLP norm
    (keras-hub's `pre_ffw_norm` output), and its output, the MLP's output after the post-MLP
    norm (`post_ffw_norm`): what the block adds to the residual stream."""
    return f"blocks.{layer}.ln2.hook_normalized", f"blocks.{layer}.hook_mlp_out"


def is_transcoder(architecture: str) -> bool:
    return architecture.endswith("transcoder")


def sites(cfg: dict[str, Any]) -> tuple[Site, Site | None]:
    """Where a saved SAE reads, and what a transcoder among them predicts (None for an SAE):
    the residual stream after its layer, or that block's MLP input and output."""
    layer = int(cfg["layer"])
    if is_transcoder(cfg["architecture"]):
        return Site(layer, "mlp_in"), Site(layer, "mlp_out")
    return Site(layer), None


def model_name(preset_uri: str) -> str | None:
    """The TransformerLens name of the preset's model when it is a known Gemma shape, else
    the preset's directory name; None when there is no readable preset."""
    if not storage.exists(storage.join(preset_uri, "config.json")):
        return None
    backbone = presets.backbone_config(preset_uri)
    shape = (int(backbone.get("num_layers", 0)), int(backbone.get("hidden_dim", 0)))
    return TRANSFORMER_LENS_NAMES.get(shape, storage.basename(preset_uri))


def build_config(
    architecture_cfg: dict[str, Any],
    d_in: int,
    d_sae: int,
    provenance: Provenance,
    apply_b_dec_to_input: bool = True,
    normalize_activations: str = "none",
    **extra: Any,
) -> dict[str, Any]:
    """cfg.json of an SAE whose weights are in raw activation units (scale folded in).

    `architecture_cfg` is the architecture's `export_config()`; `extra` adds our own keys."""
    hook, hook_out = hook_name(provenance.layer), None
    transcoder: dict[str, Any] = {}
    if is_transcoder(architecture_cfg["architecture"]):
        hook, hook_out = transcoder_hook_names(provenance.layer)
        apply_b_dec_to_input = False  # SAELens' transcoders refuse anything else
        transcoder = {
            "d_out": int(d_in),
            "hook_name_out": hook_out,
            "keras_hub_hooks": [
                f"decoder_block_{provenance.layer}.pre_ffw_norm",
                f"decoder_block_{provenance.layer}.post_ffw_norm",
            ],
        }
    metadata_out = {"hook_name_out": hook_out} if hook_out else {}
    return {
        **architecture_cfg,
        **transcoder,
        "d_in": int(d_in),
        "d_sae": int(d_sae),
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": apply_b_dec_to_input,
        "normalize_activations": normalize_activations,
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": SAE_LENS_VERSION,
            # Not trained by SAELens (its loader would otherwise fill in its own version).
            "sae_lens_training_version": None,
            "model_name": provenance.model_name,
            "model_class_name": "HookedTransformer",
            "hook_name": hook,
            **metadata_out,
            "hook_head_index": None,
            "context_size": provenance.context_size,
            "prepend_bos": provenance.prepend_bos,
            "dataset_path": provenance.dataset_path,
        },
        # Ours; SAELens keeps only the fields its config classes declare.
        "layer": provenance.layer,
        "hook_name": hook,
        "keras_hub_layer": f"decoder_block_{provenance.layer}",
        "model_preset": provenance.model_preset,
        "training_tokens": provenance.training_tokens,
        **extra,
    }


def fold_input_scale(
    params: dict[str, np.ndarray], scale: float, output_scale: float | None = None
) -> dict[str, np.ndarray]:
    """Weights that read and write raw units, from ones trained on inputs times `scale` and
    (a transcoder's) targets times `output_scale` (default: `scale`). Pre-activations are
    unchanged by the fold, so thresholds (JumpReLU) stay as they are."""
    output_scale = scale if output_scale is None else output_scale
    folded = dict(params)
    folded["W_enc"] = params["W_enc"] * scale
    folded["W_dec"] = params["W_dec"] / output_scale
    folded["b_dec"] = params["b_dec"] / output_scale
    if "W_skip" in params:
        folded["W_skip"] = params["W_skip"] * (scale / output_scale)
    return {k: np.asarray(v, np.float32) for k, v in folded.items()}


def weight_shapes(d_in: int, d_sae: int, architecture: str) -> dict[str, tuple[int, ...]]:
    """The tensors an exported SAE of `architecture` (cfg.json's name) holds, and their
    shapes (transcoders here have d_out = d_in)."""
    shapes = {
        "W_enc": (d_in, d_sae),
        "W_dec": (d_sae, d_in),
        "b_enc": (d_sae,),
        "b_dec": (d_in,),
    }
    if architecture.startswith("jumprelu"):
        shapes["threshold"] = (d_sae,)
    if "skip_transcoder" in architecture:
        shapes["W_skip"] = (d_in, d_in)
    return shapes


def check_weights(
    params: dict[str, np.ndarray], d_in: int, d_sae: int, architecture: str, where: str
) -> None:
    """One-line InputError on a missing tensor, a wrong shape or a non-finite value."""
    for key, shape in weight_shapes(d_in, d_sae, architecture).items():
        if key not in params:
            raise InputError(f"{where}: missing tensor {key!r}")
        value = np.asarray(params[key])
        if value.shape != shape:
            raise InputError(
                f"{where}: {key} has shape {list(value.shape)}, expected {list(shape)} "
                f"(d_in={d_in}, d_sae={d_sae})"
            )
        if not np.issubdtype(value.dtype, np.floating):
            raise InputError(f"{where}: {key} has dtype {value.dtype}, expected floating point")
        bad = int(np.size(value) - np.count_nonzero(np.isfinite(value)))
        if bad:
            raise InputError(f"{where}: {key} has {bad} non-finite values")


def check_model_dim(cfg: dict[str, Any], d_model: int, sae: str, model: str) -> None:
    """An SAE only reads a model whose hidden size is its d_in: one-line error otherwise."""
    if int(cfg["d_in"]) != int(d_model):
        raise InputError(
            f"the SAE {sae} reads d_model={cfg['d_in']} but the model at {model} has "
            f"hidden size {d_model}"
        )


def snapshot_uri(sae_uri: str, name: str, tokens: int) -> str:
    """Where SAE `name` of a train output at `sae_uri` keeps its snapshot after `tokens`
    training tokens (SAELens names its checkpoint folders by training tokens)."""
    return storage.join(sae_uri, name, "checkpoints", str(tokens))


def save(directory_uri: str, params: dict[str, np.ndarray], cfg: dict[str, Any]) -> list[str]:
    weights_uri = storage.join(directory_uri, WEIGHTS_NAME)
    config_uri = storage.join(directory_uri, CONFIG_NAME)
    storage.write_bytes(weights_uri, save_safetensors(params))
    storage.write_text(config_uri, json.dumps(cfg, indent=2, sort_keys=True))
    return [weights_uri, config_uri]


def load(directory_uri: str) -> tuple[SparseAutoencoder, dict[str, np.ndarray], dict[str, Any]]:
    """The inference model, its weights (in our inference form) and the cfg describing them."""
    config_uri = storage.join(directory_uri, CONFIG_NAME)
    if not storage.exists(config_uri):
        raise InputError(f"no trained SAE at {directory_uri} ({CONFIG_NAME} not found)")
    cfg = json.loads(storage.read_text(config_uri))
    _check_config(cfg, config_uri)
    weights_uri = storage.join(directory_uri, WEIGHTS_NAME)
    if not storage.exists(weights_uri):
        raise InputError(f"no SAE weights at {weights_uri}")
    params = load_safetensors(storage.read_bytes(weights_uri))
    check_weights(params, int(cfg["d_in"]), int(cfg["d_sae"]), cfg["architecture"], weights_uri)
    return _inference(params, cfg)


def _inference(
    params: dict[str, np.ndarray], cfg: dict[str, Any]
) -> tuple[SparseAutoencoder, dict[str, np.ndarray], dict[str, Any]]:
    params, cfg = to_inference_form(params, cfg)
    return from_export_config(cfg), params, cfg


def _check_config(cfg: dict[str, Any], config_uri: str) -> None:
    if cfg.get("architecture") not in INFERENCE_ARCHITECTURES:
        raise InputError(f"{config_uri}: unknown SAE architecture {cfg.get('architecture')!r}")
    for key in ("d_in", "d_sae"):
        if not isinstance(cfg.get(key), int) or cfg[key] <= 0:
            raise InputError(f"{config_uri}: {key} must be a positive integer")
    # Of SAELens' run-time input normalisations only per-token standardisation is applied
    # (sae.arch.token_norm); a dataset-level scale must be folded into the weights.
    normalize = cfg.get("normalize_activations") or "none"
    if normalize not in ("none", "layer_norm"):
        raise InputError(
            f"{config_uri}: normalize_activations={normalize!r} is not supported; "
            "fold the normalisation into the weights (normalize_activations='none') or "
            "standardise each token ('layer_norm')"
        )
    if (cfg.get("reshape_activations") or "none") != "none":
        raise InputError(f"{config_uri}: reshape_activations must be 'none'")
    if is_transcoder(cfg["architecture"]) and cfg.get("d_out", cfg["d_in"]) != cfg["d_in"]:
        raise InputError(
            f"{config_uri}: a transcoder from width {cfg['d_in']} to {cfg.get('d_out')}; "
            "only transcoders that keep the width (MLP input to MLP output) are supported"
        )


def to_inference_form(
    params: dict[str, np.ndarray], cfg: dict[str, Any]
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """SAELens semantics folded into weights our encoders use as they are: the input's b_dec
    subtraction, TopK's decoder-norm rescaling, and JumpReLU's ReLU before the threshold."""
    params = {k: np.asarray(v, np.float32) for k, v in params.items()}
    cfg = dict(cfg)
    # A transcoder's b_dec is in the output space: its encoder never subtracts it.
    if not cfg.get("apply_b_dec_to_input", True) and not is_transcoder(cfg["architecture"]):
        # (x - b_dec) W_enc + b_enc' = x W_enc + b_enc  when  b_enc' = b_enc + b_dec W_enc.
        shift = params["b_dec"].astype(np.float64) @ params["W_enc"].astype(np.float64)
        params["b_enc"] = (params["b_enc"] + shift).astype(np.float32)
        cfg["apply_b_dec_to_input"] = True
    if cfg.get("rescale_acts_by_decoder_norm"):
        # SAELens' fold_W_dec_norm: the same latents' selection and the same reconstruction.
        norms = np.maximum(np.linalg.norm(params["W_dec"], axis=1), 1e-8)
        params["W_enc"] = params["W_enc"] * norms
        params["b_enc"] = params["b_enc"] * norms
        params["W_dec"] = params["W_dec"] / norms[:, None]
        cfg["rescale_acts_by_decoder_norm"] = False
    if "threshold" in params:
        # SAELens' JumpReLU is relu(pre) * (pre > t); for t < 0 that is a threshold of 0.
        params["threshold"] = np.maximum(params["threshold"], 0.0)
    return params, cfg


@dataclass
class Sae:
    """A trained SAE as one object: the architecture, its weights in inference form (raw
    activation units, input scale folded in) and the cfg.json describing them. What
    `sae.load_sae` returns and `sae.Trainer.fit` gives; saved in SAELens' v6 format."""

    model: SparseAutoencoder
    weights: dict[str, np.ndarray]
    cfg: dict[str, Any]

    @classmethod
    def load(cls, uri: str) -> Sae:
        """An SAE directory (cfg.json + sae_weights.safetensors), local or gs://."""
        return cls(*load(uri))

    @classmethod
    def from_saved(cls, weights: dict[str, np.ndarray], cfg: dict[str, Any]) -> Sae:
        """The SAE that `save(uri, weights, cfg)` writes, without the round trip."""
        return cls(*_inference(weights, cfg))

    def save(self, uri: str) -> list[str]:
        """Writes cfg.json and sae_weights.safetensors under `uri`; returns their URIs."""
        return save(uri, {k: np.asarray(v) for k, v in self.weights.items()}, self.cfg)

    @property
    def d_in(self) -> int:
        return int(self.cfg["d_in"])

    @property
    def d_sae(self) -> int:
        return int(self.cfg["d_sae"])

    @property
    def layer(self) -> int | None:
        return self.cfg.get("layer")

    def encode(self, x: Any) -> np.ndarray:
        """Latents [..., d_sae] of raw activations [..., d_in] (standardised per token first
        when the SAE was trained so)."""
        return np.asarray(self._encode_decode(self.weights, _rows(x))[0])

    def reconstruct(self, x: Any) -> np.ndarray:
        """The SAE's reconstruction of raw activations, in raw units."""
        return np.asarray(self._encode_decode(self.weights, _rows(x))[1])

    def decode(self, latents: Any) -> np.ndarray:
        """latents @ W_dec + b_dec: raw units, or standardised units for an SAE that
        standardises tokens (`reconstruct` maps those back with each token's statistics)."""
        return np.asarray(self._decode(self.weights, jnp.asarray(latents, jnp.float32)))

    @functools.cached_property
    def _encode_decode(self) -> Any:
        return jax.jit(functools.partial(token_norm.encode_decode, self.model))

    @functools.cached_property
    def _decode(self) -> Any:
        return jax.jit(self.model.decode)


def _rows(x: Any) -> jax.Array:
    return jnp.asarray(x, jnp.float32)
