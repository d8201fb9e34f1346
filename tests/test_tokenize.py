"""The Beam tokenize pipeline (real in-process runner): packing, splits, bad records, gs://."""

import json

import numpy as np
import pytest
import sentencepiece as spm

from sae import storage, token_shards, tokenize_beam
from sae.corpus import BadRecordError, find_corpus_files
from sae.errors import InputError
from sae.tiny_model import train_tokenizer

TEXTS = [
    f"document {i} says the {c} cat sat on mat number {i % 7}."
    for i, c in enumerate(["red", "blue", "green", "white"] * 60)
]


@pytest.fixture(scope="module")
def proto() -> bytes:
    return train_tokenizer(TEXTS, vocabulary_size=96, seed=0)


def _write_corpus(directory: str, texts=TEXTS, files: int = 3) -> list[str]:
    uris = []
    for f in range(files):
        lines = "".join(json.dumps({"text": t}) + "\n" for t in texts[f::files])
        uri = storage.join(directory, f"part-{f}.jsonl")
        storage.write_text(uri, lines)
        uris.append(uri)
    return uris


def _run(files, out, proto, skip_bad=False, eval_fraction=0.2):
    spec = tokenize_beam.packing_spec(32, 2, eval_fraction, seed=0)
    return tokenize_beam.run(files, out, proto, "jsonl", "text", skip_bad, spec)


def test_pack_cuts_fixed_length_sequences_and_pads_the_tail():
    out = list(tokenize_beam.pack(iter([[2, 5, 6], [2, 7, 8, 9, 10]]), 3, pad_id=0))
    assert [s.tolist() for s, _ in out] == [[2, 5, 6], [2, 7, 8], [9, 10, 0]]
    assert [n for _, n in out] == [3, 3, 2]


def test_shard_assignment_is_deterministic_and_splits():
    spec = tokenize_beam.packing_spec(32, 4, 0.25, seed=0)
    keys = [tokenize_beam.assign_shard(spec, 0, i) for i in range(2000)]
    assert keys == [tokenize_beam.assign_shard(spec, 0, i) for i in range(2000)]
    eval_share = sum(k[0] == "eval" for k in keys) / len(keys)
    assert 0.2 < eval_share < 0.3
    assert {k[1] for k in keys if k[0] == "train"} == {0, 1, 2, 3}


def test_pipeline_writes_every_token_once(tmp_path, proto):
    files = _write_corpus(str(tmp_path / "corpus"))
    out = str(tmp_path / "tokens")
    counts = _run(files, out, proto)
    assert counts["documents"] == len(TEXTS)
    shards = storage.list_files(out)
    assert any("eval" in s for s in shards) and any("train" in s for s in shards)
    processor = spm.SentencePieceProcessor(model_proto=proto)
    expected = sum(len(processor.encode(t)) + 1 for t in TEXTS)
    total, bos = 0, 0
    for shard in shards:
        tokens, lengths = token_shards.read_shard(shard)
        assert tokens.shape[1] == 32
        for row, length in zip(tokens, lengths, strict=True):
            total += length
            bos += int(np.sum(row[:length] == processor.bos_id()))
            assert (row[length:] == processor.pad_id()).all()
    assert total == expected
    assert bos == len(TEXTS)


def test_pipeline_output_is_repeatable(tmp_path, proto):
    files = _write_corpus(str(tmp_path / "corpus"))
    _run(files, str(tmp_path / "a"), proto)
    _run(files, str(tmp_path / "b"), proto)
    for name in ("train-00000.parquet", "eval-00000.parquet"):
        a, _ = token_shards.read_shard(str(tmp_path / "a" / name))
        b, _ = token_shards.read_shard(str(tmp_path / "b" / name))
        np.testing.assert_array_equal(a, b)


def test_undecodable_record_stops_or_is_skipped(tmp_path, proto):
    corpus_dir = tmp_path / "corpus"
    files = _write_corpus(str(corpus_dir))
    with open(files[0], "ab") as handle:
        handle.write(b'{"text": "caf\xe9"}\n')
    with pytest.raises(BadRecordError, match=r"part-0.jsonl line \d+ is not valid UTF-8"):
        _run(files, str(tmp_path / "out"), proto)
    counts = _run(files, str(tmp_path / "skip"), proto, skip_bad=True)
    assert counts["bad_records"] == 1
    assert counts["documents"] == len(TEXTS)


def test_missing_corpus_is_a_one_line_error(tmp_path):
    with pytest.raises(InputError, match="no corpus files match"):
        find_corpus_files(str(tmp_path / "nothing" / "*.jsonl"))


@pytest.mark.gcs
def test_pipeline_reads_and_writes_gcs(gcs_bucket_uri, proto):
    files = _write_corpus(storage.join(gcs_bucket_uri, "corpus"))
    assert find_corpus_files(storage.join(gcs_bucket_uri, "corpus", "*.jsonl")) == files
    out = storage.join(gcs_bucket_uri, "tokens")
    counts = _run(files, out, proto)
    assert counts["documents"] == len(TEXTS)
    shards = storage.list_files(out)
    assert shards and all(s.startswith("gs://") for s in shards)
    tokens, lengths = token_shards.read_shard(shards[0])
    assert tokens.shape[1] == 32 and len(lengths) == len(tokens)
