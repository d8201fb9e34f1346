"""Steering evaluation: what a feature's steering vector does, measured against baselines.

AxBench found that steering with SAE features often loses to simple baselines, so this measures
it instead of assuming it. For one feature of an SAE and a sweep of strengths, three unit
directions are added (strength times direction) to the output of the SAE's block:

- `sae`: the feature's decoder direction;
- `diffmean`: the difference between the mean held-out activation on tokens where the feature
  fires and on tokens where it does not (DiffMean), normalised;
- `random`: a random direction (seeded), the same strengths.

Each direction and strength is scored twice:

- concept: greedy continuations of the prompts are generated with the vector added, then read
  by the *unsteered* model and encoded by the SAE: the fraction of generated tokens on which
  the feature fires (`fires`), and its mean activation over them. The text itself has to evoke
  the feature; the injected vector is not what is measured.
- cost: the vector added at every content position of held-out sequences (BOS keeps its clean
  activation, as in the spliced metrics): the mean KL from the unsteered next-token
  distribution and the increase in held-out cross-entropy (nats per token).

A direction's best trade-off is the strength with the highest `fires` whose CE increase stays
within `max_ce_increase`, provided it fires more than on the unsteered continuations; else none.
The unsteered model is the reference row (strength 0).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import jax
import numpy as np

from sae import sharding
from sae.data.activations import content_mask, sequence_batches
from sae.data.token_shards import iter_sequences
from sae.errors import InputError
from sae.io.saelens import Sae
from sae.model import lm, spliced
from sae.model.generation import SteeredGenerator

METHODS = ("sae", "diffmean", "random")


@dataclass(frozen=True)
class SteeringPoint:
    """One direction at one strength (method "none", strength 0: the unsteered model)."""

    method: str
    strength: float
    fires: float  # fraction of generated tokens on which the feature is active
    activation: float  # the feature's mean activation over the generated tokens
    kl: float  # mean KL(unsteered || steered) over scored held-out positions
    ce_increase: float  # held-out cross-entropy, steered minus unsteered (nats per token)
    generated_tokens: int


@dataclass
class SteeringEvaluation:
    feature: int
    layer: int
    max_ce_increase: float
    points: list[SteeringPoint]
    # Per method, the strength with the best trade-off (None: none stayed within the budget).
    best: dict[str, float | None]
    # The first prompt's continuation per (method, strength), for reading.
    samples: list[dict[str, Any]] = field(default_factory=list)
    scored_positions: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def random_direction(d_model: int, seed: int) -> np.ndarray:
    direction = np.random.default_rng(seed).normal(size=d_model)
    return (direction / np.linalg.norm(direction)).astype(np.float32)


def diffmean_direction(
    sae: Sae,
    feature: int,
    tap: lm.ActivationTap,
    sequences: Iterator[tuple[np.ndarray, int]],
    lm_batch_size: int,
    bos_id: int,
    max_tokens: int,
) -> tuple[np.ndarray, int]:
    """The unit DiffMean direction of `feature` from the tap's first site over held-out
    content tokens, and on how many of them the feature fired."""
    d_model = tap.hidden_dim
    sums = {True: np.zeros(d_model), False: np.zeros(d_model)}
    counts = {True: 0, False: 0}
    seen = 0
    for token_ids, lengths in sequence_batches(sequences, lm_batch_size):
        mask = content_mask(token_ids, lengths, bos_id)
        rows = np.asarray(tap(token_ids, lengths)[0], np.float32)[mask]
        fires = sae.encode(rows)[:, feature] > 0
        for active in (True, False):
            chosen = rows[fires == active]
            sums[active] += chosen.sum(axis=0, dtype=np.float64)
            counts[active] += len(chosen)
        seen += len(rows)
        if seen >= max_tokens:
            break
    if not counts[True] or not counts[False]:
        raise InputError(
            f"feature {feature} fired on {counts[True]} of {seen} held-out tokens: DiffMean "
            "needs tokens where it fires and where it does not (evaluate more tokens, or "
            "another feature)"
        )
    direction = sums[True] / counts[True] - sums[False] / counts[False]
    return (direction / np.linalg.norm(direction)).astype(np.float32), counts[True]


# Held-out tokens averaged for a feature's DiffMean direction.
DIFFMEAN_TOKENS = 20_000


def held_out_sequences(
    tokens_manifest: dict, cost_sequences: int, diffmean_tokens: int = DIFFMEAN_TOKENS
) -> list[tuple[np.ndarray, int]]:
    """Enough of a tokenize output's held-out sequences for the cost and for DiffMean."""
    per_sequence = int(tokens_manifest["sequence_length"])
    wanted = max(cost_sequences, diffmean_tokens // per_sequence + 1)
    return list(itertools.islice(iter_sequences(tokens_manifest["shards"]["eval"]), wanted))


def evaluate_steering(
    generator: SteeredGenerator,
    sae: Sae,
    feature: int,
    layer: int,
    strengths: Sequence[float],
    prompts: Sequence[str],
    held_out: list[tuple[np.ndarray, int]],
    bos_id: int,
    *,
    lm_batch_size: int = 8,
    cost_sequences: int = 16,
    diffmean_tokens: int = DIFFMEAN_TOKENS,
    max_new_tokens: int = 24,
    max_ce_increase: float = 0.5,
    seed: int = 0,
) -> SteeringEvaluation:
    """The concept and cost of each direction at each strength (see the module docstring).
    `held_out`: held-out (token ids, length) sequences, for DiffMean and the cost."""
    strengths = [float(s) for s in strengths if s != 0]
    if not strengths or not prompts:
        raise InputError("steering evaluation needs at least one non-zero strength and a prompt")
    # One device, as the generator: a handful of short batches.
    mesh = sharding.make_mesh(1, 1, devices=jax.devices()[:1])
    tap = lm.ActivationTap(generator.backbone, [layer], mesh)
    directions = {
        "sae": _unit(sae.weights["W_dec"][feature]),
        "diffmean": diffmean_direction(
            sae, feature, tap, iter(held_out), lm_batch_size, bos_id, diffmean_tokens
        )[0],
        "random": random_direction(tap.hidden_dim, seed),
    }
    rows = [("none", 0.0)] + [(m, s) for m in METHODS for s in strengths]
    unsteered = np.zeros(tap.hidden_dim, np.float32)
    vectors = np.stack([unsteered if m == "none" else s * directions[m] for m, s in rows])
    fires, activation, generated, samples = _concept(
        generator, tap, sae, feature, layer, prompts, vectors, max_new_tokens
    )
    kl, ce_increase, positions = _cost(
        generator.backbone, layer, vectors, held_out, cost_sequences, lm_batch_size, bos_id, mesh
    )
    points = [
        SteeringPoint(m, s, fires[i], activation[i], kl[i], ce_increase[i], generated[i])
        for i, (m, s) in enumerate(rows)
    ]
    return SteeringEvaluation(
        feature,
        layer,
        max_ce_increase,
        points,
        {m: best_strength(points, m, max_ce_increase) for m in METHODS},
        [
            {"method": m, "strength": s, "text": text}
            for (m, s), text in zip(rows, samples, strict=True)
        ],
        positions,
    )


def best_strength(points: list[SteeringPoint], method: str, max_ce_increase: float):
    """The strength of `method` with the highest `fires` (then activation) among those whose
    CE increase is within the budget; None when none is, or when even that one does not make
    the feature fire more than the unsteered model (points[0]) does."""
    within = [p for p in points if p.method == method and p.ce_increase <= max_ce_increase]
    if not within:
        return None
    best = max(within, key=lambda p: (p.fires, p.activation))
    return best.strength if best.fires > points[0].fires else None


def _unit(vector: np.ndarray) -> np.ndarray:
    vector = np.asarray(vector, np.float32)
    return vector / max(float(np.linalg.norm(vector)), 1e-12)


def _concept(generator, tap, sae, feature, layer, prompts, vectors, max_new_tokens):
    """Per row of `vectors`: the feature's firing fraction and mean activation over every
    prompt's generated tokens, the token count, and the first prompt's continuation."""
    rows = len(vectors)
    fired, total, counted = np.zeros(rows), np.zeros(rows), np.zeros(rows, np.int64)
    prompt_ids = [generator.prompt_ids(p) for p in prompts]
    # Every prompt with every vector in one generation batch (one compiled loop), then one
    # fixed shape for every prompt's re-read: the tap compiles once.
    everything = generator.generate_rows(
        [ids for ids in prompt_ids for _ in range(rows)],
        np.tile(vectors, (len(prompts), 1)),
        layer,
        max_new_tokens=max_new_tokens,
    )
    samples = [g.text for g in everything[:rows]]
    length = max(len(ids) for ids in prompt_ids) + max_new_tokens
    for index in range(len(prompts)):
        generations = everything[index * rows : (index + 1) * rows]
        token_ids = np.zeros((rows, length), np.int32)
        lengths = np.zeros(rows, np.int32)
        for row, g in enumerate(generations):
            ids = g.prompt_ids + g.new_ids
            token_ids[row, : len(ids)], lengths[row] = ids, len(ids)
        activations = np.asarray(tap(token_ids, lengths)[0], np.float32)
        start = len(prompt_ids[index])
        for row, g in enumerate(generations):
            if not g.new_ids:
                continue
            latents = sae.encode(activations[row, start : start + len(g.new_ids)])[:, feature]
            fired[row] += np.sum(latents > 0)
            total[row] += latents.sum()
            counted[row] += len(latents)
    safe = np.maximum(counted, 1)
    return list(fired / safe), list(total / safe), [int(c) for c in counted], samples


def _cost(backbone, layer, vectors, held_out, count, lm_batch_size, bos_id, mesh):
    """Per row of `vectors`: mean KL from the unsteered model and CE increase on held-out
    sequences with the vector added after block `layer`."""
    models = [
        spliced.SplicedModel(lambda p, x: x + p["vector"], {"vector": vector}) for vector in vectors
    ]
    loss = spliced.SplicedLoss(backbone, layer, models, mesh, bos_id)
    sums = spliced.evaluate_spliced(loss, iter(held_out), lm_batch_size, count)
    metrics = [sums.metrics(i) for i in range(len(vectors))]
    kl = [m["kl_div_with_sae"] for m in metrics]
    ce_increase = [m["delta_lm_loss"] for m in metrics]
    return kl, ce_increase, sums.positions


def render(evaluation: SteeringEvaluation) -> str:
    """The evaluation as a table: one row per direction and strength, the best marked."""
    lines = [
        f"feature {evaluation.feature} at block {evaluation.layer}: concept = share of generated "
        "tokens where the feature fires (re-read unsteered); cost = held-out KL and CE increase "
        f"over {evaluation.scored_positions} positions; * = best with CE increase <= "
        f"{evaluation.max_ce_increase:g}",
        f"{'direction':<10} {'strength':>9} {'fires':>7} {'mean act':>9} {'KL':>8} {'dCE':>8}",
    ]
    for p in evaluation.points:
        best = " *" if evaluation.best.get(p.method) == p.strength else ""
        lines.append(
            f"{p.method:<10} {p.strength:>9g} {p.fires:>7.3f} {p.activation:>9.3g} "
            f"{p.kl:>8.4f} {p.ce_increase:>8.4f}{best}"
        )
    return "\n".join(lines)
