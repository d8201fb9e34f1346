"""Per-feature summaries for reports: density, activation statistics, top-activating contexts."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import numpy as np
import sentencepiece as spm

from sae.evaluation import EvalResult


def piece_text(processor: spm.SentencePieceProcessor, token_id: int) -> str:
    """A token as it reads in running text (SentencePiece marks word starts with '▁')."""
    return processor.id_to_piece(int(token_id)).replace("\u2581", " ")


def feature_summaries(
    result: EvalResult, processor: spm.SentencePieceProcessor, window: int, features: list[int]
) -> list[dict[str, Any]]:
    tokens = int(result.metrics["eval_tokens"])
    summaries = []
    for index in features:
        fires = int(result.fire_counts[index])
        contexts = []
        for value, (sequence, position) in zip(
            result.top_values[index], result.top_refs[index], strict=True
        ):
            if value <= 0:
                continue
            ids = result.sequences[int(sequence)]
            start = max(0, int(position) - window)
            stop = min(len(ids), int(position) + window + 1)
            contexts.append(
                {
                    "activation": float(value),
                    "sequence": int(sequence),
                    "position": int(position),
                    "tokens": [piece_text(processor, t) for t in ids[start:stop]],
                    "highlight": int(position) - start,
                }
            )
        top_tokens = Counter(c["tokens"][c["highlight"]] for c in contexts).most_common(5)
        density = fires / tokens
        summaries.append(
            {
                "index": int(index),
                "density": density,
                "log10_density": math.log10(density) if density > 0 else None,
                "mean_activation": float(result.activation_sums[index] / fires) if fires else 0.0,
                "max_activation": float(result.max_activations[index]),
                "top_tokens": [token for token, _ in top_tokens],
                "contexts": contexts,
            }
        )
    return summaries


def most_active(result: EvalResult, limit: int, exclude_dense: bool = False) -> list[int]:
    """Live features ordered by how often they fire (all live ones when `limit` is 0)."""
    counts = result.fire_counts.astype(np.float64)
    if exclude_dense:
        tokens = result.metrics["eval_tokens"]
        counts = np.where(counts > 0.1 * tokens, 0, counts)
    live = np.flatnonzero(counts > 0)
    ordered = live[np.argsort(-counts[live], kind="stable")]
    return [int(i) for i in (ordered if limit == 0 else ordered[:limit])]
