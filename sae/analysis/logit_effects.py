"""A feature's direct effect on the next-token logits: its decoder row through the unembedding.

effect[token] = W_dec[feature] @ W_U[:, token], with W_dec in raw residual-stream units (as
saved) and W_U the model's unembedding (Gemma ties it to the token embedding, so W_U is the
embedding matrix transposed). As in SAELens and Neuronpedia, the final RMS norm and Gemma 2's
logit soft-cap are not applied: this is the direction's linear effect, not what the model would
output after adding it.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Features per matmul: bounds the [chunk, vocab] logits block on the device.
_CHUNK = 128


def unembedding(backbone: Any) -> np.ndarray:
    """W_U [d_model, vocab] of a keras-hub backbone (the tied embedding, transposed)."""
    embedding = backbone.token_embedding
    if getattr(embedding, "tie_weights", True):
        matrix = np.asarray(embedding.embeddings.value, np.float32).T
    else:
        matrix = np.asarray(embedding.reverse_embeddings.value, np.float32)
    return np.ascontiguousarray(matrix)


@partial(jax.jit, static_argnums=2)
def _top_effects(rows: jax.Array, w_u: jax.Array, k: int):
    logits = rows @ w_u
    top_values, top_ids = jax.lax.top_k(logits, k)
    bottom_values, bottom_ids = jax.lax.top_k(-logits, k)
    return top_values, top_ids, -bottom_values, bottom_ids


def top_logit_effects(
    w_dec: np.ndarray, w_u: np.ndarray, features: list[int], k: int
) -> list[dict[str, list[tuple[int, float]]]]:
    """Per feature, the `k` tokens it raises most (`positive`, largest first) and lowers most
    (`negative`, most negative first), as (token id, logit effect)."""
    if not features:
        return []
    k = min(k, w_u.shape[1])
    device_w_u = jnp.asarray(w_u, jnp.float32)
    effects = []
    for start in range(0, len(features), _CHUNK):
        chunk = features[start : start + _CHUNK]
        rows = np.asarray(w_dec, np.float32)[chunk]
        # Pad the last chunk so the function compiles once.
        padded = np.zeros((_CHUNK, rows.shape[1]), np.float32)
        padded[: len(chunk)] = rows
        out = jax.device_get(_top_effects(jnp.asarray(padded), device_w_u, k))
        pos_values, pos_ids, neg_values, neg_ids = (a[: len(chunk)] for a in out)
        for i in range(len(chunk)):
            effects.append(
                {
                    "positive": [
                        (int(t), float(v)) for t, v in zip(pos_ids[i], pos_values[i], strict=True)
                    ],
                    "negative": [
                        (int(t), float(v)) for t, v in zip(neg_ids[i], neg_values[i], strict=True)
                    ],
                }
            )
    return effects
