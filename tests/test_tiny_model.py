"""The tiny Gemma: tokenizer ids, packing, training that learns, presets that load back."""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest

from sae.demo.corpus import generate_documents
from sae.demo.tiny_model import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    UNK_ID,
    TinyModelSpec,
    build_tiny_gemma,
    make_tiny_preset,
    pack_documents,
    sentencepiece_processor,
    split_heldout,
    train_language_model,
    train_tokenizer,
)
from sae.io.presets import tokenizer_proto

# Small enough to compile and train in seconds on 2 CPU cores, same Gemma 2 settings.
SMALL = TinyModelSpec(
    vocabulary_size=320,
    num_layers=2,
    hidden_dim=32,
    intermediate_dim=64,
    num_query_heads=2,
    num_key_value_heads=1,
    head_dim=16,
    sliding_window_size=16,
    sequence_length=32,
    train_steps=60,
    batch_size=16,
    learning_rate=1e-2,
    warmup_steps=10,
    heldout_fraction=0.1,
)


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return list(generate_documents(300, seed=0))


@pytest.fixture(scope="module")
def proto(texts: list[str]) -> bytes:
    return train_tokenizer(texts, SMALL.vocabulary_size, seed=0)


@pytest.fixture(scope="module")
def trained(texts: list[str], proto: bytes):
    causal_lm = build_tiny_gemma(SMALL, proto)
    progress: list[tuple[int, int, float]] = []
    stats = train_language_model(causal_lm, texts, SMALL, lambda *a: progress.append(a))
    return causal_lm, stats, progress


def test_tokenizer_special_ids_and_determinism(texts: list[str], proto: bytes) -> None:
    sp = sentencepiece_processor(proto)
    assert (sp.pad_id(), sp.eos_id(), sp.bos_id(), sp.unk_id()) == (PAD_ID, EOS_ID, BOS_ID, UNK_ID)
    assert [sp.id_to_piece(i) for i in range(4)] == ["<pad>", "<eos>", "<bos>", "<unk>"]
    assert sp.vocab_size() == SMALL.vocabulary_size
    assert train_tokenizer(texts, SMALL.vocabulary_size, seed=0) == proto


def test_tokenizer_keeps_code_layout(proto: bytes) -> None:
    sp = sentencepiece_processor(proto)
    code = "def add_total(count):\n    return count + 7\n\nprint(count)"
    assert sp.decode(sp.encode(code)) == code
    # Digits are split, as in Gemma: 1234 is four pieces.
    pieces = [sp.id_to_piece(i).lstrip("\u2581") for i in sp.encode("x 1234")]
    assert [p for p in pieces if p.isdigit()] == ["1", "2", "3", "4"]


def test_pack_documents_windows() -> None:
    windows = pack_documents([[10, 11, 12], [20, 21]], sequence_length=4)
    # Stream: <bos> 10 11 12 <eos> <bos> 20 21 <eos> (9 tokens) -> 2 windows of 5, overlap 1.
    assert windows.tolist() == [[BOS_ID, 10, 11, 12, EOS_ID], [EOS_ID, BOS_ID, 20, 21, EOS_ID]]
    assert pack_documents([[5]], sequence_length=8).shape == (0, 9)


def test_split_heldout_keeps_last_documents() -> None:
    train, held = split_heldout([str(i) for i in range(20)], 0.1)
    assert held == ["18", "19"]
    assert train == [str(i) for i in range(18)]


def test_training_lowers_heldout_loss(trained) -> None:
    _, stats, progress = trained
    assert stats["initial_heldout_loss"] == pytest.approx(math.log(SMALL.vocabulary_size), abs=0.5)
    assert stats["final_heldout_loss"] < stats["initial_heldout_loss"] - 1.5
    assert stats["final_train_loss"] < stats["initial_train_loss"] - 1.5
    assert stats["heldout_documents"] == 30
    assert progress[-1][:2] == (SMALL.train_steps, SMALL.train_steps)


def test_preset_round_trip_gives_same_logits(trained, proto: bytes, tmp_path: Path) -> None:
    import keras_hub

    causal_lm, _, _ = trained
    causal_lm.save_to_preset(str(tmp_path))
    assert (tmp_path / "assets" / "tokenizer" / "vocabulary.spm").is_file()
    assert tokenizer_proto(str(tmp_path)) == proto

    tokenizer = keras_hub.models.GemmaTokenizer.from_preset(str(tmp_path))
    assert tokenizer.token_to_id("<bos>") == BOS_ID
    assert tokenizer.token_to_id("<eos>") == EOS_ID
    assert tokenizer.token_to_id("<pad>") == PAD_ID

    inputs = {
        "token_ids": np.random.default_rng(0).integers(4, 300, (2, 24)).astype("int32"),
        "padding_mask": np.ones((2, 24), dtype=bool),
    }
    expected = np.asarray(causal_lm(inputs))
    loaded_lm = keras_hub.models.GemmaCausalLM.from_preset(str(tmp_path))
    np.testing.assert_array_equal(np.asarray(loaded_lm(inputs)), expected)
    backbone = keras_hub.models.Backbone.from_preset(str(tmp_path))
    np.testing.assert_array_equal(
        np.asarray(backbone(inputs)), np.asarray(causal_lm.backbone(inputs))
    )
    assert loaded_lm.preprocessor.sequence_length == SMALL.sequence_length


def test_preset_tokenizer_proto_missing(tmp_path: Path) -> None:
    from sae.errors import InputError

    with pytest.raises(InputError, match="spm"):
        tokenizer_proto(str(tmp_path))


def test_make_tiny_preset_writes_a_loadable_preset(texts: list[str], tmp_path: Path) -> None:
    spec = dataclasses.replace(SMALL, train_steps=3)
    out = tmp_path / "model"
    stats = make_tiny_preset(texts[:120], str(out), spec)
    for name in ("config.json", "model.weights.h5", "tokenizer.json", "task.json"):
        assert (out / name).is_file(), name
    assert stats["parameters"] > 0
    assert (
        stats["vocabulary_size"] == sentencepiece_processor(tokenizer_proto(str(out))).vocab_size()
    )
    assert stats["seconds"] > 0
