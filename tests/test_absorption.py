"""Absorption's parts on data whose answer is known: concept labels from SentencePiece pieces,
and the best latent, coverage, split latents and absorption fraction from known firings."""

import numpy as np
import pytest

from sae.analysis import absorption

CONCEPTS = {"weekday": ["Monday", "Tuesday"], "colour": ["red"]}


def test_the_last_piece_of_a_concept_word_is_labelled():
    pieces = ["▁On", "▁Mon", "day", ",", "▁the", "▁Red", "▁car", "▁Tuesday", "."]
    labels = absorption.token_concepts(pieces, CONCEPTS)
    assert labels == [
        None, None, ("weekday", "monday"), None, None, ("colour", "red"), None,
        ("weekday", "tuesday"), None,
    ]  # fmt: skip
    # The comma belongs to the word "Monday," but holds none of its letters.
    assert absorption.token_concepts(["▁Monday", ","], CONCEPTS) == [("weekday", "monday"), None]
    # A longer word that starts like a concept word is not one.
    assert absorption.token_concepts(["▁Red", "dish"], CONCEPTS) == [None, None]


def test_best_latent_split_latents_and_absorption_from_known_firings():
    """Latent 0 fires on most weekday tokens; latent 1 only on Tuesdays, exactly where latent 0
    stays silent (it absorbed them); latent 2 fires everywhere (dense, not precise)."""
    counts = absorption.ConceptCounts(4, ["weekday", "colour"])
    rows, labels = [], []
    for i in range(10):  # 6 Mondays, 4 Tuesdays
        tuesday = i >= 6
        rows.append([not tuesday, tuesday, True, False])
        labels.append(("weekday", "tuesday" if tuesday else "monday"))
    for _ in range(30):  # other tokens: only the dense latent
        rows.append([False, False, True, False])
        labels.append(None)
    counts.add(np.array(rows), labels)
    found = counts.summary(precise=0.9)
    assert set(found) == {"weekday"}  # no colour token was seen
    weekday = found["weekday"]
    assert weekday["tokens"] == 10 and weekday["words"] == {"monday": 6, "tuesday": 4}
    assert weekday["best_latent"] == pytest.approx(
        {"latent": 0, "precision": 1.0, "recall": 0.6, "f1": 0.75}
    )
    assert weekday["precise_latents"] == 2
    assert weekday["latents_for_90_percent"] == 2  # latents 0 and 1 together cover all
    [split] = weekday["split_latents"]
    assert split["latent"] == 1 and split["words"] == {"tuesday": 4}
    assert weekday["absorption_fraction"] == pytest.approx(0.4)
    headline = absorption.headline(found)
    assert headline == pytest.approx(
        {
            "concept_best_latent_f1": 0.75,
            "concept_absorption_fraction": 0.4,
            "concept_split_latents": 1.0,
        }
    )
