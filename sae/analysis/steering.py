"""Steering vectors: a feature's unit decoder direction and a strength typical of the feature.

The strength is the mean norm of the feature's contribution to the residual stream over its
top-activating held-out examples (activation times decoder-row norm), so adding
`strength * vector` mimics the feature firing as strongly as it usually does when it matters.

A vectors file is safetensors: `vectors` [n, d_model] float32 (unit rows), `strengths` [n],
`features` [n] (indices into the SAE), and string metadata (JSON values) naming the model
preset, layer, hook and SAE they belong to. `gemma-sae steer` applies one.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from sae.analysis.evaluation import EvalResult
from sae.errors import InputError
from sae.io import storage

STRENGTH_STATISTIC = (
    "mean of the feature's top held-out activations times its decoder-row norm "
    "(the size of its typical strong contribution to the residual stream)"
)


def unit_directions(w_dec: np.ndarray, features: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """[n, d_model] unit decoder rows of `features`, and the rows' norms."""
    rows = np.asarray(w_dec, np.float32)[features]
    norms = np.linalg.norm(rows, axis=1)
    return rows / np.maximum(norms, 1e-12)[:, None], norms


def steering_vectors(
    w_dec: np.ndarray, result: EvalResult, features: list[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Unit directions and suggested strengths (0 for a feature that never fired)."""
    vectors, norms = unit_directions(w_dec, features)
    strengths = []
    for index, norm in zip(features, norms, strict=True):
        top = result.top_values[index]
        top = top[top > 0]
        strengths.append(float(np.mean(top) * norm) if len(top) else 0.0)
    return vectors.astype(np.float32), np.asarray(strengths, np.float32)


def save(
    uri: str,
    vectors: np.ndarray,
    strengths: np.ndarray,
    features: list[int],
    metadata: dict[str, Any],
) -> None:
    """Write a vectors file; `metadata` (model_preset, layer, hook_name, sae) is kept with it."""
    if not len(vectors) == len(strengths) == len(features):
        raise ValueError("one vector, strength and feature index per row")
    tensors = {
        "vectors": np.asarray(vectors, np.float32),
        "strengths": np.asarray(strengths, np.float32),
        "features": np.asarray(features, np.int64),
    }
    described = {
        "d_model": int(tensors["vectors"].shape[1]) if len(vectors) else 0,
        "strength_statistic": STRENGTH_STATISTIC,
        **metadata,
    }
    text_metadata = {key: json.dumps(value) for key, value in described.items()}
    storage.write_bytes(uri, save_safetensors(tensors, metadata=text_metadata))


def load(uri: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The tensors of a vectors file and its metadata (JSON values decoded)."""
    if not storage.exists(uri):
        raise InputError(f"no steering vectors at {uri}")
    data = storage.read_bytes(uri)
    tensors = load_safetensors(data)
    # safetensors keeps the metadata in its JSON header: 8 bytes of length, then the header.
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    metadata = {k: json.loads(v) for k, v in header.get("__metadata__", {}).items()}
    return tensors, metadata
