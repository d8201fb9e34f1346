"""Sparse probing's parts: reading labelled documents (with one-line errors), balanced tasks,
the top-k selection and the logistic probe, on data whose answer is known."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sae.analysis import probing
from sae.errors import InputError


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_reads_jsonl_and_parquet_with_named_fields(tmp_path):
    records = [{"body": f"text {i}", "genre": ["a", "b"][i % 2]} for i in range(6)]
    got = probing.read_labelled(_jsonl(tmp_path / "d.jsonl", records), "body", "genre", 4)
    assert got.texts == ["text 0", "text 1", "text 2", "text 3"]
    assert got.labels == ["a", "b", "a", "b"]
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "d.parquet")
    got = probing.read_labelled(str(tmp_path / "d.parquet"), "body", "genre", 100)
    assert len(got.texts) == 6 and got.labels[:2] == ["a", "b"]


@pytest.mark.parametrize(
    ("records", "message"),
    [
        ([{"text": "x", "label": "a"}, {"text": "y"}], "record 2 has no 'label' field"),
        ([{"text": "x", "label": "a"}, {"text": "y", "label": "a"}], "at least two labels"),
        ([{"text": 3, "label": "a"}, {"text": "y", "label": "b"}], "record 1: 'text' is not text"),
    ],
)
def test_bad_labelled_data_gets_a_one_line_error(tmp_path, records, message):
    with pytest.raises(InputError, match=message):
        probing.read_labelled(_jsonl(tmp_path / "d.jsonl", records), "text", "label", 10)
    (tmp_path / "bad.jsonl").write_text('{"text": "x", "label": "a"}\nnot json\n')
    with pytest.raises(InputError, match="line 2: not JSON"):
        probing.read_labelled(str(tmp_path / "bad.jsonl"), "text", "label", 10)
    with pytest.raises(InputError, match="no file at"):
        probing.read_labelled(str(tmp_path / "missing.jsonl"), "text", "label", 10)


def test_tasks_are_balanced_disjoint_and_skip_small_classes():
    labels = ["a"] * 50 + ["b"] * 30 + ["c"] * 5
    tasks = probing.balanced_tasks(labels, min_documents=20, test_fraction=0.2, seed=0)
    assert [t.positive for t in tasks] == ["a", "b"]
    for task in tasks:
        assert set(task.train).isdisjoint(task.test)
        assert task.train_y.mean() == 0.5 and task.test_y.mean() == 0.5
        positives = np.concatenate([task.train[task.train_y == 1], task.test[task.test_y == 1]])
        negatives = np.concatenate([task.train[task.train_y == 0], task.test[task.test_y == 0]])
        assert all(labels[i] == task.positive for i in positives)
        assert all(labels[i] != task.positive for i in negatives)
    # "a" has 50 documents but only 35 others: 35 of each side, 7 of each held out.
    assert len(tasks[0].test) == 14 and len(tasks[0].train) == 56


def test_the_probe_finds_the_one_informative_latent_and_stays_near_chance_without_one():
    rng = np.random.default_rng(0)
    labels = ["yes"] * 200 + ["no"] * 200
    features = rng.exponential(size=(400, 64))
    features[:200, 17] += 3.0  # latent 17 fires more on "yes" documents
    tasks = probing.balanced_tasks(labels, 20, 0.25, seed=1)
    task = next(t for t in tasks if t.positive == "yes")
    assert probing.top_k_by_mean_difference(features[task.train], task.train_y, 1)[0] == 17
    accuracy = probing.probe_accuracies(features, [task], [1, 5])["yes"]
    assert accuracy["1"] > 0.9 and accuracy["5"] > 0.9
    noise = rng.exponential(size=(400, 64))
    chance = probing.probe_accuracies(noise, [task], [1, 5])["yes"]
    assert max(chance.values()) < 0.7
    assert probing.full_probe_accuracies(features, [task])["yes"] > 0.85


def test_probing_follows_the_demo_unless_switched_off_or_named():
    from sae import config

    demo = config.load(None, ["workdir=/w"])
    assert demo.probing_uri == "/w/labels/genres.jsonl"
    assert config.load(None, ["workdir=/w", "report.probing.max_documents=0"]).probing_uri == ""
    named = config.load(None, ["workdir=/w", "report.probing.data=/d/labels.parquet"])
    assert named.probing_uri == "/d/labels.parquet"
    with pytest.raises(config.ConfigError, match="report.probing.test_fraction"):
        config.load(None, ["report.probing.test_fraction=1.5"])
