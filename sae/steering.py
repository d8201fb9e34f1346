"""Steering vectors: a feature's unit decoder direction and a strength typical of the feature.

The strength is the mean norm of the feature's contribution to the residual stream over its
top-activating examples (activation times decoder-row norm), so adding `strength * vector`
mimics the feature firing as strongly as it usually does when it matters.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from safetensors.numpy import save as save_safetensors

from sae import storage
from sae.evaluation import EvalResult


def steering_vectors(
    w_dec: np.ndarray, result: EvalResult, features: list[int]
) -> tuple[np.ndarray, np.ndarray]:
    rows = w_dec[features]
    norms = np.linalg.norm(rows, axis=1)
    vectors = rows / np.maximum(norms, 1e-12)[:, None]
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
    tensors = {
        "vectors": vectors,
        "strengths": strengths,
        "features": np.asarray(features, np.int64),
    }
    text_metadata = {key: json.dumps(value) for key, value in metadata.items()}
    storage.write_bytes(uri, save_safetensors(tensors, metadata=text_metadata))
