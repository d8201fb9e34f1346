"""Bad input: a one-line error naming the problem, exit code 2, and no manifest written."""

import json
from pathlib import Path

import pytest

from jobs.cli import main
from sae.io import manifest

from .conftest import SMALL

pytestmark = pytest.mark.slow


def _run(capsys, workdir: Path, local_run: Path, *overrides: str, stage: str = "tokenize"):
    code = main(
        [
            stage,
            f"workdir={workdir}",
            *SMALL,
            "demo.enabled=false",
            f"model.preset={local_run / 'model'}",
            f"tokenize.input={local_run / 'corpus'}",
            *overrides,
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[-1] if err else ""


def _assert_clean_failure(code, message, expected, workdir, stage_dir="tokens"):
    assert code == 2
    assert message.startswith("error: ") and expected in message, message
    assert manifest.read(str(workdir / stage_dir)) is None


def test_missing_corpus(capsys, tmp_path, local_run):
    code, message = _run(capsys, tmp_path, local_run, f"tokenize.input={tmp_path}/no/*.jsonl")
    _assert_clean_failure(code, message, "no corpus files match", tmp_path)


def test_empty_corpus(capsys, tmp_path, local_run):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"text": ""}) + "\n")
    code, message = _run(capsys, tmp_path, local_run, f"tokenize.input={corpus}")
    _assert_clean_failure(code, message, "has no usable documents", tmp_path)
    assert not (tmp_path / "tokens").exists() or not any((tmp_path / "tokens").iterdir())


def test_undecodable_corpus(capsys, tmp_path, local_run):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_bytes(b'{"text": "fine"}\n{"text": "bad \xff byte"}\n')
    code, message = _run(capsys, tmp_path, local_run, f"tokenize.input={corpus}")
    _assert_clean_failure(code, message, "corpus.jsonl line 2 is not valid UTF-8", tmp_path)
    assert not any((tmp_path / "tokens").glob("*.parquet"))


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.stpes=3", "unknown config key 'train.stpes' (did you mean 'train.steps'?)"),
        ("train.steps=many", "config key 'train.steps' must be an integer"),
    ],
)
def test_bad_config(capsys, tmp_path, local_run, override, expected):
    code, message = _run(capsys, tmp_path, local_run, override, stage="pipeline")
    _assert_clean_failure(code, message, expected, tmp_path)


def test_layer_past_the_models_depth(capsys, tmp_path, local_run):
    # Tokenize first (cheap), then train must refuse before loading anything.
    assert _run(capsys, tmp_path, local_run)[0] == 0
    code, message = _run(capsys, tmp_path, local_run, "train.saes.1.layer=9", stage="train")
    _assert_clean_failure(code, message, "layer 9 is out of range", tmp_path, "sae")
    assert "2 layers" in message


def test_train_before_tokenize(capsys, tmp_path, local_run):
    code, message = _run(capsys, tmp_path, local_run, stage="train")
    _assert_clean_failure(code, message, "no finished tokenize output", tmp_path, "sae")


@pytest.mark.gcs
def test_unreachable_bucket(capsys, gcs_emulator, local_run):
    workdir = "gs://no-such-bucket-for-gemma-sae/run"
    code = main(
        [
            "tokenize",
            f"workdir={workdir}",
            *SMALL,
            "demo.enabled=false",
            f"model.preset={local_run / 'model'}",
            f"tokenize.input={local_run / 'corpus'}",
        ]
    )
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2
    assert message.startswith("error: ") and "no-such-bucket-for-gemma-sae" in message
