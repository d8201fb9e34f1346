"""keras-hub presets read without building a model: the backbone's config, its layer count,
its SentencePiece tokenizer, and a local copy for keras-hub to load."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sae.errors import ConfigError, InputError
from sae.io import storage


def local_copy(preset_uri: str) -> Path:
    """A local directory holding the preset (gs:// presets are copied to a cache first,
    because keras-hub reads gs:// through tf.io.gfile, which cannot reach an emulator)."""
    if not storage.exists(storage.join(preset_uri, "config.json")):
        raise InputError(f"no keras-hub preset at {preset_uri} (config.json not found)")
    return storage.local_copy(preset_uri)


def _saved(preset_uri: str) -> dict[str, Any]:
    return json.loads(storage.read_text(storage.join(preset_uri, "config.json")))


def backbone_config(preset_uri: str) -> dict[str, Any]:
    """The backbone's constructor arguments, read without building the model."""
    config = _saved(preset_uri)
    return config.get("config", config)


def backbone_class(preset_uri: str) -> str:
    """The backbone's keras-hub class name (GemmaBackbone, Gemma3Backbone, ...)."""
    return str(_saved(preset_uri).get("class_name", ""))


def check_layers(preset_uri: str, layers: list[int]) -> int:
    """Fail fast, before any work, on a layer the model does not have; returns the depth."""
    num_layers = int(backbone_config(preset_uri)["num_layers"])
    for layer in layers:
        if not 0 <= layer < num_layers:
            raise ConfigError(
                f"layer {layer} is out of range: the model at {preset_uri} has "
                f"{num_layers} layers (0..{num_layers - 1})"
            )
    return num_layers


def tokenizer_proto(preset_uri: str) -> bytes:
    """The SentencePiece model of a preset, so tokenizing needs neither keras nor TensorFlow."""
    directory = storage.join(preset_uri, "assets", "tokenizer")
    models = [uri for uri in storage.list_files(directory) if uri.endswith((".spm", ".model"))]
    if not models:
        raise InputError(
            f"no SentencePiece tokenizer in preset {preset_uri} (expected assets/tokenizer/*.spm)"
        )
    return storage.read_bytes(models[0])


def chosen_tokenizer_proto(tokenizer: str, preset_uri: str) -> bytes:
    """The SentencePiece model to tokenize with: `tokenizer` (a .model/.spm file or a preset
    directory) if set, else the model preset's."""
    if not tokenizer:
        return tokenizer_proto(preset_uri)
    if tokenizer.endswith((".model", ".spm")):
        if not storage.exists(tokenizer):
            raise InputError(f"tokenizer file not found: {tokenizer}")
        return storage.read_bytes(tokenizer)
    if storage.is_dir(tokenizer):
        return tokenizer_proto(tokenizer)
    raise InputError(
        f"tokenize.tokenizer '{tokenizer}' is neither a SentencePiece model file "
        "(.model, .spm) nor a preset directory"
    )
