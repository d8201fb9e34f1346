"""Held-out metrics against training tokens: the train stage's SAE snapshots
(train.n_checkpoints, saved under sae/<name>/checkpoints/<tokens>/) and the final SAEs,
judged on the same held-out tokens and spliced on the same held-out sequences, so a reader
sees whether more training tokens would still help."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sae.errors import InputError
from sae.io import saelens

# The metrics a curve point keeps (those of the held-out evaluation and the spliced pass).
CURVE_METRICS = (
    "l0",
    "fraction_variance_explained",
    "fraction_variance_explained_without_dominant",
    "dead_fraction",
    "delta_lm_loss",
    "ce_loss_recovered",
    "ce_loss_recovered_vs_mean_ablation",
    "kl_div_with_sae",
)


@dataclass
class Snapshot:
    """One SAE as of `tokens` training tokens, loaded from its SAELens folder."""

    name: str
    tokens: int
    entry: tuple  # (sae, params, cfg) as saelens.load returns them


def load_snapshots(sae_uri: str, train_manifest: dict[str, Any]) -> list[Snapshot]:
    """Every snapshot the train manifest lists (none when train.n_checkpoints was 0)."""
    snapshots = []
    for name, token_counts in train_manifest.get("checkpoints", {}).items():
        for tokens in token_counts:
            uri = saelens.snapshot_uri(sae_uri, name, tokens)
            try:
                entry = saelens.load(uri)
            except InputError as error:
                raise InputError(f"the train manifest lists a snapshot it lacks: {error}") from None
            snapshots.append(Snapshot(name, int(tokens), entry))
    return snapshots


def curve_points(
    points: list[tuple[str, int, dict[str, Any]]],
) -> dict[str, list[dict[str, Any]]]:
    """(name, training tokens, metrics) triples to each SAE's points in token order, keeping
    the CURVE_METRICS that were measured."""
    curves: dict[str, list[dict[str, Any]]] = {}
    for name, tokens, metrics in points:
        point = {"training_tokens": tokens}
        point.update({k: metrics[k] for k in CURVE_METRICS if k in metrics})
        curves.setdefault(name, []).append(point)
    return {name: sorted(p, key=lambda q: q["training_tokens"]) for name, p in curves.items()}
