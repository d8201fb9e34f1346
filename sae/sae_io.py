"""The trained SAE on disk: `cfg.json` + `sae_weights.safetensors`, in raw activation units.

Training works on activations scaled by `input_scale`; that scale is folded into the saved
weights (W_enc*s, W_dec/s, b_dec/s) so that the file encodes and decodes raw activations and
gives the same latents, which is what every downstream user expects.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from sae import storage
from sae.arch import INFERENCE_ARCHITECTURES, SparseAutoencoder, from_export_config
from sae.errors import InputError

WEIGHTS_NAME = "sae_weights.safetensors"
CONFIG_NAME = "cfg.json"


def fold_input_scale(params: dict[str, np.ndarray], scale: float) -> dict[str, np.ndarray]:
    """Pre-activations are unchanged by the fold, so thresholds (JumpReLU) stay as they are."""
    folded = dict(params)
    folded["W_enc"] = params["W_enc"] * scale
    folded["W_dec"] = params["W_dec"] / scale
    folded["b_dec"] = params["b_dec"] / scale
    return {k: np.asarray(v, np.float32) for k, v in folded.items()}


def save(directory_uri: str, params: dict[str, np.ndarray], cfg: dict[str, Any]) -> list[str]:
    weights_uri = storage.join(directory_uri, WEIGHTS_NAME)
    config_uri = storage.join(directory_uri, CONFIG_NAME)
    storage.write_bytes(weights_uri, save_safetensors(params))
    storage.write_text(config_uri, json.dumps(cfg, indent=2, sort_keys=True))
    return [weights_uri, config_uri]


def load(directory_uri: str) -> tuple[SparseAutoencoder, dict[str, np.ndarray], dict[str, Any]]:
    config_uri = storage.join(directory_uri, CONFIG_NAME)
    if not storage.exists(config_uri):
        raise InputError(f"no trained SAE at {directory_uri} ({CONFIG_NAME} not found)")
    cfg = json.loads(storage.read_text(config_uri))
    params = load_safetensors(storage.read_bytes(storage.join(directory_uri, WEIGHTS_NAME)))
    if cfg.get("architecture") not in INFERENCE_ARCHITECTURES:
        raise InputError(f"{config_uri}: unknown SAE architecture {cfg.get('architecture')!r}")
    return from_export_config(cfg), params, cfg
