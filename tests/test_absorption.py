"""Absorption's parts on data whose answer is known: concept labels from SentencePiece pieces,
and the best latent, coverage, split latents and absorption fraction from known firings; and
the same evaluation fed by the report's evaluation pass on the local run."""

import numpy as np
import pytest

from sae.analysis import absorption

from .conftest import SMALL_SAES

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


@pytest.mark.slow
def test_the_evaluation_pass_feeds_the_concepts(backbone, tokens, local_run):
    """The report computes absorption from its evaluation pass (no pass of its own): fed
    that pass's batches, going on past report.eval_tokens until it has its sequences, the
    observer finds what a pass of its own finds, and the evaluation's metrics do not move."""
    import itertools

    import sentencepiece as spm

    from sae import sharding
    from sae.analysis import evaluation
    from sae.data import token_shards
    from sae.io import presets, saelens
    from sae.model import lm

    sae, params, _ = saelens.load(str(local_run / "sae" / SMALL_SAES[1]))
    tap = lm.ActivationTap(backbone, [1], sharding.make_mesh())
    bos = tokens["tokenizer"]["bos_id"]
    processor = spm.SentencePieceProcessor(
        model_proto=presets.tokenizer_proto(str(local_run / "model"))
    )
    concepts = {"weekday": ["Monday", "Tuesday", "Friday"], "colour": ["red", "blue", "green"]}
    readers = {"topk": (sae, params, 0)}
    shards = tokens["shards"]["eval"]
    alone = absorption.concept_absorption(
        tap, readers, itertools.islice(token_shards.iter_sequences(shards), 40),
        processor.id_to_piece, concepts, bos_id=bos, lm_batch_size=8,
    )  # fmt: skip
    observer = absorption.ConceptObserver(
        readers, processor.id_to_piece, concepts, bos_id=bos, max_sequences=40
    )
    models = [evaluation.EvalModel(sae, params, 0)]
    args = (tap, 8, bos, 300, 4)  # 300 tokens: a few sequences, far fewer than 40
    fed = evaluation.evaluate(models, token_shards.iter_sequences(shards), *args, None, [observer])
    plain = evaluation.evaluate(models, token_shards.iter_sequences(shards), *args)
    assert observer.done() and alone["tokens"] > 0
    assert observer.document() == alone
    assert fed[0].metrics == plain[0].metrics
    assert len(fed[0].sequences) == len(plain[0].sequences) < 40
