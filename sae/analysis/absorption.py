"""Feature absorption and splitting for token-level concepts (after SAEBench's first-letter
absorption, on concepts a corpus labels): does one latent stand for a concept, or do several
word-specific latents share it, and where the concept's main latent stays silent, does a more
specific latent fire instead?

A concept is a set of words (the demo's weekdays, colours, number words, names). A token is
labelled with a concept when it is the last piece of a whole word in that set (the model has
then read the word). On held-out sequences, for every latent of an SAE: on how many concept
tokens it fires (true positives) and on how many others (false positives). Per concept:

- the **best latent**: the highest F1 for "fires" against "is a concept token", with its
  precision and recall;
- **coverage**: the precise latents (precision >= `precise`) taken in order of recall, and how
  many of them it takes for their union to reach 90% of the concept's tokens (None: never);
- **split latents**: precise latents that each cover less than half of the concept, with the
  words they fire on (a "Monday" latent inside a weekday concept);
- **absorption fraction**: of the concept tokens the best latent misses, the share on which a
  precise latent fires instead (it absorbed the concept there), over all concept tokens.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from sae.analysis.evaluation import latent_encoder
from sae.data.activations import content_mask, sequence_batches

COVERAGE = 0.9
_WORD = re.compile(r"[^\w]+")


def token_concepts(
    pieces: Sequence[str], concepts: dict[str, Sequence[str]]
) -> list[tuple[str, str] | None]:
    """For each SentencePiece piece of a sequence: (concept, word) on the last piece holding
    letters of a whole word of a concept (case and punctuation around it ignored), else None."""
    lookup = {w.lower(): name for name, words in concepts.items() for w in words}
    labels: list[tuple[str, str] | None] = [None] * len(pieces)
    word, last = "", None  # the word so far, and its last piece with letters or digits

    def close() -> None:
        clean = _WORD.sub("", word).lower()
        if clean in lookup and last is not None:
            labels[last] = (lookup[clean], clean)

    for i, piece in enumerate(pieces):
        if piece.startswith("▁"):
            close()
            word, last = "", None
        word += piece.lstrip("▁")
        if _WORD.sub("", piece.lstrip("▁")):
            last = i
    close()
    return labels


class ConceptCounts:
    """Running counts for one SAE: per latent, fires on concept tokens and in all, and for the
    concept tokens, which latents fired."""

    def __init__(self, d_sae: int, concepts: Sequence[str]) -> None:
        self.concepts = list(concepts)
        self.fires = np.zeros(d_sae, np.int64)
        self.true_positives = np.zeros((len(self.concepts), d_sae), np.int64)
        self.tokens = 0
        # Per concept token: its concept, its word, and the latents that fired on it.
        self.labelled: list[tuple[int, str, np.ndarray]] = []

    def add(self, active: np.ndarray, labels: Sequence[tuple[str, str] | None]) -> None:
        """`active` [tokens, d_sae] bool of content tokens, `labels` one per row."""
        self.fires += active.sum(axis=0)
        self.tokens += len(active)
        for row, label in zip(active, labels, strict=True):
            if label is None:
                continue
            concept = self.concepts.index(label[0])
            self.true_positives[concept] += row
            self.labelled.append((concept, label[1], np.flatnonzero(row)))

    def summary(self, precise: float) -> dict[str, dict]:
        results = {}
        for c, name in enumerate(self.concepts):
            rows = [(word, fired) for concept, word, fired in self.labelled if concept == c]
            if not rows:
                continue
            results[name] = _concept_summary(
                rows, self.true_positives[c], self.fires, precise, len(rows)
            )
        return results


def _concept_summary(
    rows: list[tuple[str, np.ndarray]],
    true_positives: np.ndarray,
    fires: np.ndarray,
    precise: float,
    positives: int,
) -> dict:
    precision = true_positives / np.maximum(fires, 1)
    recall = true_positives / positives
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    best = int(np.argmax(f1))
    # Precise latents in order of recall, and their union's growth.
    order = [int(j) for j in np.argsort(-recall, kind="stable") if precision[j] >= precise]
    order = [j for j in order if true_positives[j] > 0]
    covered: set[int] = set()
    needed = None
    for count, latent in enumerate(order, 1):
        covered |= {i for i, (_, fired) in enumerate(rows) if latent in fired}
        if needed is None and len(covered) >= COVERAGE * positives:
            needed = count
    split = []
    for latent in order:
        if recall[latent] < 0.5 and latent != best:
            words = Counter(word for word, fired in rows if latent in fired)
            split.append(
                {
                    "latent": latent,
                    "precision": float(precision[latent]),
                    "recall": float(recall[latent]),
                    "words": dict(words.most_common(5)),
                }
            )
    precise_set = set(order) - {best}
    absorbed = sum(
        1 for _, fired in rows if best not in fired and precise_set.intersection(fired.tolist())
    )
    return {
        "tokens": positives,
        "words": dict(Counter(word for word, _ in rows).most_common()),
        "best_latent": {
            "latent": best,
            "precision": float(precision[best]),
            "recall": float(recall[best]),
            "f1": float(f1[best]),
        },
        "precise_latents": len(order),
        "latents_for_90_percent": needed,
        "split_latents": split,
        "absorption_fraction": absorbed / positives,
    }


class ConceptObserver:
    """Absorption and splitting of every concept for every SAE of `saes` ({name: (sae,
    params, index of the tapped site it reads)}), fed the model batches of a pass over
    held-out sequences (`observe`) until it has seen `max_sequences` of them; the report's
    evaluation pass feeds it, so the concepts cost no model pass of their own."""

    def __init__(
        self,
        saes: dict[str, tuple[object, dict, int]],
        id_to_piece: Callable[[int], str],
        concepts: dict[str, Sequence[str]],
        *,
        bos_id: int,
        max_sequences: int,
        precise: float = 0.9,
    ) -> None:
        self.saes, self.concepts, self.bos_id = saes, concepts, bos_id
        self.id_to_piece, self.precise = id_to_piece, precise
        self.remaining = max_sequences
        self.encode = {name: latent_encoder(sae, params) for name, (sae, params, _) in saes.items()}
        self.counts = {
            name: ConceptCounts(sae.d_sae, list(concepts)) for name, (sae, _, _) in saes.items()
        }
        self._pieces: dict[int, str] = {}

    def done(self) -> bool:
        return self.remaining <= 0

    def _piece(self, token: int) -> str:
        if token not in self._pieces:
            self._pieces[token] = self.id_to_piece(int(token))
        return self._pieces[token]

    def observe(self, token_ids: np.ndarray, lengths: np.ndarray, outputs: Sequence) -> None:
        """One model batch: token ids and lengths [batch], the tap's outputs per site; rows
        past `max_sequences` (and empty padding rows) are left out."""
        rows = np.flatnonzero(np.asarray(lengths) > 0)[: max(self.remaining, 0)]
        if not len(rows):
            return
        self.remaining -= len(rows)
        token_ids, lengths = token_ids[rows], lengths[rows]
        mask = content_mask(token_ids, lengths, self.bos_id)
        labels = [
            label
            for row, length, keep in zip(token_ids, lengths, mask, strict=True)
            for label, kept in zip(
                token_concepts([self._piece(t) for t in row[:length]], self.concepts)
                + [None] * (len(row) - length),
                keep,
                strict=True,
            )
            if kept
        ]
        for name, (_, _, site) in self.saes.items():
            activations = np.asarray(outputs[site], np.float32)[rows][mask]
            active = np.asarray(self.encode[name](activations) > 0)
            self.counts[name].add(active, labels)

    def document(self) -> dict:
        """The JSON document the report writes (absorption.json, less its split note)."""
        found = {name: c.summary(self.precise) for name, c in self.counts.items()}
        return {
            "concepts": {
                name: sorted({w.lower() for w in words}) for name, words in self.concepts.items()
            },
            "precise": self.precise,
            "coverage": COVERAGE,
            "tokens": next(iter(self.counts.values())).tokens if self.counts else 0,
            "saes": found,
        }


def concept_absorption(
    tap,
    saes: dict[str, tuple[object, dict, int]],
    sequences: Iterable[tuple[np.ndarray, int]],
    id_to_piece: Callable[[int], str],
    concepts: dict[str, Sequence[str]],
    *,
    bos_id: int,
    lm_batch_size: int,
    precise: float = 0.9,
) -> dict:
    """ConceptObserver's document over all of `sequences`, in a model pass of its own."""
    sequences = list(sequences)
    observer = ConceptObserver(
        saes, id_to_piece, concepts, bos_id=bos_id, max_sequences=len(sequences), precise=precise
    )
    for token_ids, lengths in sequence_batches(iter(sequences), lm_batch_size):
        observer.observe(token_ids, lengths, tap(token_ids, lengths))
    return observer.document()


def headline(per_concept: dict[str, dict]) -> dict[str, float]:
    """An SAE's summary metrics: means over its concepts."""
    if not per_concept:
        return {}
    values = defaultdict(list)
    for result in per_concept.values():
        values["concept_best_latent_f1"].append(result["best_latent"]["f1"])
        values["concept_absorption_fraction"].append(result["absorption_fraction"])
        values["concept_split_latents"].append(len(result["split_latents"]))
    return {key: float(np.mean(v)) for key, v in values.items()}
