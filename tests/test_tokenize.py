"""The Beam tokenize pipeline (real in-process runner): packing, splits, bad records, Parquet
corpora, tokenizer files, EOS, document packing, Dataflow options, gs://."""

import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sentencepiece as spm
from apache_beam.options.pipeline_options import (
    GoogleCloudOptions,
    SetupOptions,
    StandardOptions,
    WorkerOptions,
)

from sae.config import DataflowConfig
from sae.data import token_shards, tokenize_beam
from sae.data.corpus import BadRecordError, find_corpus_files, read_records
from sae.demo.tiny_model import train_tokenizer
from sae.errors import InputError
from sae.io import storage

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


def _write_parquet(uri: str, columns: dict[str, pa.Array], row_group_size: int = 50) -> str:
    with storage.open_write(uri) as handle:
        pq.write_table(pa.table(columns), handle, row_group_size=row_group_size)
    return uri


def _run(files, out, proto, skip_bad=False, eval_fraction=0.2, fmt="jsonl", **kwargs):
    packing = kwargs.pop("packing", "pack")
    length = kwargs.pop("sequence_length", 32)
    spec = tokenize_beam.packing_spec(length, 2, eval_fraction, seed=0, packing=packing)
    return tokenize_beam.run(files, out, proto, fmt, "text", skip_bad, spec, **kwargs)


def _read_all(out: str) -> list[tuple[np.ndarray, int]]:
    rows = []
    for shard in storage.list_files(out):
        tokens, lengths = token_shards.read_shard(shard)
        rows += list(zip(tokens, lengths, strict=True))
    return rows


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
    parquet = _write_parquet(storage.join(gcs_bucket_uri, "c.parquet"), {"text": TEXTS})
    assert [r.text for r in read_records(parquet, "parquet", "text")] == TEXTS


def test_parquet_corpus_reads_the_column_and_counts_null_rows(tmp_path, proto):
    texts = [None if i % 5 == 2 else t for i, t in enumerate(TEXTS)]
    files = [
        _write_parquet(
            str(tmp_path / f"part-{f}.parquet"),
            {"id": range(f, 240, 2), "text": pa.array(texts[f::2], pa.string())},
        )
        for f in range(2)
    ]
    records = list(read_records(files[0], "parquet", "text"))
    # Rows are numbered across row groups (row_group_size 50 < 120 rows).
    assert [r.line for r in records] == list(range(1, 121))
    assert records[1].text is None and "column 'text' is null" in records[1].problem
    with pytest.raises(BadRecordError, match=r"part-0.parquet line 2 column 'text' is null"):
        _run(files, str(tmp_path / "stop"), proto, fmt="parquet")
    counts = _run(files, str(tmp_path / "out"), proto, skip_bad=True, fmt="parquet")
    assert counts["bad_records"] == texts.count(None)
    assert counts["documents"] == len(TEXTS) - texts.count(None)


def test_parquet_non_string_column_is_bad_records_and_missing_column_an_error(tmp_path):
    uri = _write_parquet(str(tmp_path / "c.parquet"), {"text": pa.array([1, 2, 3])})
    records = list(read_records(uri, "parquet", "text"))
    assert [r.text for r in records] == [None] * 3
    assert "column 'text' is int64, not a string" in records[0].problem
    with pytest.raises(InputError, match=r"c.parquet has no column 'body' \(it has: text\)$"):
        list(read_records(uri, "parquet", "body"))
    not_parquet = tmp_path / "n.parquet"
    not_parquet.write_text("hello")
    with pytest.raises(InputError, match="n.parquet is not a Parquet file"):
        list(read_records(str(not_parquet), "parquet", "text"))


def test_add_eos_ends_every_document(tmp_path, proto):
    files = _write_corpus(str(tmp_path / "corpus"))
    out = str(tmp_path / "tokens")
    counts = _run(files, out, proto, add_eos=True)
    processor = spm.SentencePieceProcessor(model_proto=proto)
    rows = _read_all(out)
    assert counts["documents"] == len(TEXTS)
    assert sum(int(length) for _, length in rows) == sum(
        len(processor.encode(t)) + 2 for t in TEXTS
    )
    assert sum(int(np.sum(row[:n] == processor.eos_id())) for row, n in rows) == len(TEXTS)


def test_document_packing_truncates_and_counts(tmp_path, proto):
    files = _write_corpus(str(tmp_path / "corpus"))
    out = str(tmp_path / "tokens")
    length = 16
    counts = _run(files, out, proto, packing="document", sequence_length=length)
    processor = spm.SentencePieceProcessor(model_proto=proto)
    sizes = [len(processor.encode(t)) + 1 for t in TEXTS]
    assert 0 < counts["truncated_documents"] == sum(n > length for n in sizes) < len(TEXTS)
    rows = _read_all(out)
    assert len(rows) == len(TEXTS)  # one sequence per document
    assert sorted(int(n) for _, n in rows) == sorted(min(n, length) for n in sizes)
    for row, n in rows:
        assert row[0] == processor.bos_id() and np.sum(row == processor.bos_id()) == 1
        assert (row[n:] == processor.pad_id()).all()


def test_one_per_sequence_pads_and_cuts():
    out = list(tokenize_beam.one_per_sequence(iter([[2, 5], [2, 7, 8, 9]]), 3, pad_id=0))
    assert [(s.tolist(), n) for s, n in out] == [([2, 5, 0], 2), ([2, 7, 8], 3)]


def test_progress_counts_each_record_once(tmp_path, proto):
    (uri,) = _write_corpus(str(tmp_path / "corpus"), files=1)
    spec = tokenize_beam.packing_spec(32, 2, 0.0, seed=0)
    dofn = tokenize_beam.TokenizeFile(proto, "jsonl", "text", False, spec, storage.size(uri))
    dofn.setup()
    list(dofn.process((0, uri)))
    processor = spm.SentencePieceProcessor(model_proto=proto)
    assert dofn.progress.done == sum(len(t.encode()) for t in TEXTS) < storage.size(uri)
    assert dofn.tokens == sum(len(processor.encode(t)) + 1 for t in TEXTS)


def test_tokenizer_from_a_sentencepiece_file_or_preset(tmp_path, proto):
    from sae.io.presets import chosen_tokenizer_proto

    model = tmp_path / "tok.model"
    model.write_bytes(proto)
    assert chosen_tokenizer_proto(str(model), "unused-preset") == proto
    preset = tmp_path / "preset"
    (preset / "assets" / "tokenizer").mkdir(parents=True)
    (preset / "assets" / "tokenizer" / "vocabulary.spm").write_bytes(proto)
    assert chosen_tokenizer_proto(str(preset), "unused-preset") == proto
    assert chosen_tokenizer_proto("", str(preset)) == proto
    with pytest.raises(InputError, match="tokenizer file not found: .*missing.spm$"):
        chosen_tokenizer_proto(str(tmp_path / "missing.spm"), "unused")
    with pytest.raises(InputError, match="neither a SentencePiece model file"):
        chosen_tokenizer_proto(str(tmp_path / "nothing"), "unused")


def test_tokenize_stage_with_a_tokenizer_file_parquet_and_eos(tmp_path, proto):
    from sae import config
    from sae.data.tokenize import tokenize
    from sae.io import manifest

    model = tmp_path / "tok.model"
    model.write_bytes(proto)
    corpus = _write_parquet(str(tmp_path / "c.parquet"), {"text": pa.array(TEXTS + [None, ""])})
    overrides = [
        f"workdir={tmp_path / 'run'}",
        "demo.enabled=false",
        f"tokenize.input={corpus}",
        "model.preset=/no/such/preset",  # not read: the tokenizer file is
        f"tokenize.tokenizer={model}",
        "tokenize.format=parquet",
        "tokenize.add_eos=true",
        "tokenize.packing=document",
        "tokenize.sequence_length=16",
        "tokenize.on_bad_record=skip",
    ]
    cfg = config.load(None, overrides)
    tokenize(cfg)
    found = manifest.read(cfg.tokens_uri)
    counts = found["counts"]
    assert counts["documents"] == len(TEXTS)
    assert counts["bad_records"] == 1 and counts["empty_documents"] == 1
    assert counts["truncated_documents"] > 0
    assert counts["train_sequences"] + counts["eval_sequences"] == len(TEXTS)
    assert found["tokenizer"]["fingerprint"].startswith("sha256:")
    # A missing column stops the stage with one line, and leaves no manifest behind.
    missing = config.load(None, [*overrides, "tokenize.text_field=body"])
    with pytest.raises(InputError, match=r"c.parquet has no column 'body' \(it has: text\)$"):
        tokenize(missing, force=True)
    assert manifest.read(cfg.tokens_uri) is None


def test_dataflow_options_parse_to_beam_options():
    dataflow = DataflowConfig(
        project="my-project",
        region="us-west4",
        temp_location="gs://bucket/tmp",
        staging_location="gs://bucket/staging",
        sdk_container_image="us-west4-docker.pkg.dev/p/r/gemma-sae:dataflow",
        requirements_file="requirements.txt",
        setup_file="./pyproject.toml",
        machine_type="n2-standard-4",
        max_num_workers=32,
        service_account_email="sa@my-project.iam.gserviceaccount.com",
        subnetwork="regions/us-west4/subnetworks/default",
        no_use_public_ips=True,
    )
    options = tokenize_beam.pipeline_options(
        "dataflow", dataflow, "gs://Bucket/runs/L12_run/tokens"
    )
    cloud = options.view_as(GoogleCloudOptions)
    assert (cloud.project, cloud.region) == ("my-project", "us-west4")
    assert (cloud.temp_location, cloud.staging_location) == (
        "gs://bucket/tmp",
        "gs://bucket/staging",
    )
    assert cloud.service_account_email == "sa@my-project.iam.gserviceaccount.com"
    assert cloud.job_name == "tokenize-bucket-runs-l12-run-tokens"
    worker = options.view_as(WorkerOptions)
    assert (worker.machine_type, worker.max_num_workers) == ("n2-standard-4", 32)
    assert worker.subnetwork == "regions/us-west4/subnetworks/default"
    assert worker.network is None and worker.use_public_ips is False
    assert worker.sdk_container_image == dataflow.sdk_container_image
    setup = options.view_as(SetupOptions)
    assert (setup.requirements_file, setup.setup_file) == ("requirements.txt", "./pyproject.toml")
    assert not setup.save_main_session
    assert options.view_as(StandardOptions).runner == "DataflowRunner"
    # Unset fields stay Beam's defaults.
    bare = tokenize_beam.pipeline_options("dataflow", DataflowConfig(project="p"), "gs://b/t")
    assert bare.view_as(WorkerOptions).max_num_workers is None
    assert bare.view_as(WorkerOptions).use_public_ips is None


def test_job_names_are_valid_for_dataflow():
    for uri in ("gs://b/x", "/tmp/Some Dir/tokens", "gs://b/" + "deep/" * 40 + "-tokens-"):
        name = tokenize_beam.job_name(uri)
        assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 89, name
