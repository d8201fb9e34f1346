"""Per-token activations of the contexts a report shows: the evaluation keeps only each
firing's own value, so the held-out sequences that the shown features' top contexts and
quantile samples come from are run through the model again (once for every SAE), and each
shown feature's activation is kept at every position. features.json then gives every context
token its value, as Neuronpedia's and SAEDashboard's activation records do."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from sae.analysis.evaluation import EvalResult, latent_encoder
from sae.data.activations import content_mask, sequence_batches


class ContextValues:
    """(feature, sequence, start, stop) -> that feature's activations at those positions of
    that held-out sequence (0 at BOS)."""

    def __init__(self, columns: dict[int, int], latents: dict[int, np.ndarray]) -> None:
        self.columns, self.latents = columns, latents

    def __call__(self, feature: int, sequence: int, start: int, stop: int) -> list[float]:
        column = self.latents[sequence][start:stop, self.columns[feature]]
        return [round(float(v), 5) for v in column]


def referenced_sequences(result: EvalResult, features: Sequence[int]) -> set[int]:
    """The held-out sequences that these features' top contexts and samples come from."""
    needed = {
        int(s)
        for f in features
        for v, (s, _) in zip(result.top_values[f], result.top_refs[f], strict=True)
        if v > 0
    }
    if result.feature_stats is not None:
        needed |= {s for f in features for _, s, _ in result.feature_stats.samples_of(f)}
    return needed


def context_values(
    tap,
    entries: Sequence[tuple[object, dict, int, Sequence[int], EvalResult]],
    bos_id: int,
    lm_batch_size: int,
) -> list[ContextValues]:
    """For each (sae, params, tapped site index, shown features, its evaluation result): the
    shown features' activations on every sequence their contexts come from, one model pass
    for all entries (they share the evaluated sequences)."""
    sequences = entries[0][4].sequences if entries else []
    needed = sorted(set().union(*(referenced_sequences(e[4], e[3]) for e in entries)))
    longest = max((len(sequences[i]) for i in needed), default=0)
    encoders = [latent_encoder(sae, params) for sae, params, *_ in entries]
    columns = [np.asarray(e[3], np.int64) for e in entries]
    kept: list[dict[int, np.ndarray]] = [{} for _ in entries]

    def padded():
        for i in needed:
            ids = np.zeros(longest, np.int32)
            ids[: len(sequences[i])] = sequences[i]
            yield ids, len(sequences[i])

    batches = sequence_batches(padded(), lm_batch_size)
    for first in range(0, len(needed), lm_batch_size):
        token_ids, lengths = next(batches)
        mask = content_mask(token_ids, lengths, bos_id)
        outputs = [np.asarray(a, np.float32) for a in tap(token_ids, lengths)]
        for n, (_, _, site, _, _) in enumerate(entries):
            latents = np.asarray(encoders[n](outputs[site]))[:, :, columns[n]] * mask[..., None]
            for b, sequence in enumerate(needed[first : first + lm_batch_size]):
                kept[n][sequence] = latents[b, : lengths[b]]
    return [
        ContextValues({int(f): c for c, f in enumerate(e[3])}, found)
        for e, found in zip(entries, kept, strict=True)
    ]
