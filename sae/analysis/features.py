"""Per-feature summaries for reports: density, activation statistics, top-activating contexts,
quantile samples, activation histograms and logit effects (the data behind features.json and
the dashboard; docs/REPORT.md describes each field)."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from sae.analysis import feature_stats
from sae.analysis.evaluation import EvalResult

QUANTILE_BANDS = 4
SAMPLES_PER_BAND = 4


# (feature, sequence, start, stop) -> the feature's activations at those positions.
ContextValues = Callable[[int, int, int, int], list[float]]


class Pieces(Protocol):
    """What summaries need of a tokenizer (a SentencePieceProcessor has it)."""

    def id_to_piece(self, token_id: int) -> str: ...


def piece_text(processor: Pieces, token_id: int) -> str:
    """A token as it reads in running text (SentencePiece marks word starts with '▁')."""
    return processor.id_to_piece(int(token_id)).replace("\u2581", " ")


def _context(
    result: EvalResult,
    processor: Pieces,
    window: int,
    value: float,
    sequence: int,
    position: int,
    values: ContextValues | None = None,
    feature: int = 0,
) -> dict[str, Any]:
    """The tokens around one firing, with the firing token's index among them (and, given
    `values`, the feature's activation at every one of them)."""
    ids = result.sequences[sequence]
    start = max(0, position - window)
    stop = min(len(ids), position + window + 1)
    context = {
        "activation": float(value),
        "sequence": sequence,
        "position": position,
        "tokens": [piece_text(processor, t) for t in ids[start:stop]],
        "highlight": position - start,
    }
    if values is not None:
        context["values"] = values(feature, sequence, start, stop)
    return context


def _effects(processor: Pieces, pairs: list[tuple[int, float]]) -> list[dict[str, Any]]:
    return [
        {"token_id": token, "token": piece_text(processor, token), "effect": effect}
        for token, effect in pairs
    ]


def feature_summaries(
    result: EvalResult,
    processor: Pieces,
    window: int,
    features: list[int],
    logit_effects: list[dict[str, list[tuple[int, float]]]] | None = None,
    values: ContextValues | None = None,
) -> list[dict[str, Any]]:
    """One summary per feature in `features`; `logit_effects` (from
    `sae.analysis.logit_effects.top_logit_effects`, same order) adds the tokens each one
    promotes, `values` every context's per-token activations."""
    tokens = int(result.metrics["eval_tokens"])
    stats = result.feature_stats
    summaries = []
    for n, index in enumerate(features):
        fires = int(result.fire_counts[index])
        contexts = [
            _context(result, processor, window, value, int(sequence), int(position), values, index)
            for value, (sequence, position) in zip(
                result.top_values[index], result.top_refs[index], strict=True
            )
            if value > 0
        ]
        top_tokens = Counter(c["tokens"][c["highlight"]] for c in contexts).most_common(5)
        density = fires / tokens
        max_activation = float(result.max_activations[index])
        summary: dict[str, Any] = {
            "index": int(index),
            "fire_count": fires,
            "density": density,
            "log10_density": math.log10(density) if density > 0 else None,
            "mean_activation": float(result.activation_sums[index] / fires) if fires else 0.0,
            "max_activation": max_activation,
            "top_tokens": [token for token, _ in top_tokens],
            "contexts": contexts,
        }
        if stats is not None:
            summary.update(_distribution(result, processor, window, index, max_activation, values))
        if logit_effects is not None:
            effects = logit_effects[n]
            summary["logit_effects"] = {
                sign: _effects(processor, effects[sign]) for sign in ("positive", "negative")
            }
        summaries.append(summary)
    return summaries


def _distribution(
    result: EvalResult,
    processor: Pieces,
    window: int,
    index: int,
    max_activation: float,
    values: ContextValues | None = None,
) -> dict[str, Any]:
    """Minimum activation, histogram and quantile bands with their sampled contexts."""
    stats = result.feature_stats
    assert stats is not None
    minimum = float(stats.min_activations[index])
    histogram = stats.histogram_of(index, max_activation)
    bands = feature_stats.quantile_bands(histogram, stats.samples_of(index), QUANTILE_BANDS)
    for band in bands:
        band["samples"] = [
            _context(result, processor, window, value, sequence, position, values, index)
            # A random few of the band's samples, shown strongest first.
            for value, sequence, position in sorted(
                band["samples"][:SAMPLES_PER_BAND], key=lambda sample: -sample[0]
            )
        ]
    return {
        "min_activation": minimum if np.isfinite(minimum) else None,
        "histogram": histogram,
        "quantiles": bands,
    }


def most_active(result: EvalResult, limit: int, exclude_dense: bool = False) -> list[int]:
    """Live features ordered by how often they fire (all live ones when `limit` is 0)."""
    counts = result.fire_counts.astype(np.float64)
    if exclude_dense:
        tokens = result.metrics["eval_tokens"]
        counts = np.where(counts > 0.1 * tokens, 0, counts)
    live = np.flatnonzero(counts > 0)
    ordered = live[np.argsort(-counts[live], kind="stable")]
    return [int(i) for i in (ordered if limit == 0 else ordered[:limit])]
