"""The whole pipeline, for real, on a small demo: local, idempotent, resumable, and on gs://."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from jobs.cli import main
from sae.io import manifest, storage

from .conftest import SMALL, SMALL_SAES, reuse_run

pytestmark = pytest.mark.slow

STAGE_DIRS = ("corpus", "labels", "model", "tokens", "sae", "report")


def _manifest_times(workdir: Path) -> dict[str, float]:
    return {d: (workdir / d / "manifest.json").stat().st_mtime_ns for d in STAGE_DIRS}


@pytest.mark.parametrize("name", SMALL_SAES)
def test_pipeline_writes_a_real_report(local_run, name):
    summary = json.loads((local_run / "report" / "metrics.json").read_text())
    assert summary["split"].startswith("eval")
    assert set(summary["saes"]) == set(SMALL_SAES)
    metrics = json.loads((local_run / "report" / name / "metrics.json").read_text())
    assert metrics == {"split": summary["split"], **summary["saes"][name]}
    assert metrics["eval_tokens"] > 1000
    assert 1 < metrics["l0"] < 128
    assert metrics["fraction_variance_explained"] > 0.5
    pages = sorted((local_run / "report" / name / "features").glob("*.html"))
    assert len(pages) == 40  # report.max_features
    assert 'class="tok hl"' in pages[0].read_text()
    assert f'href="{name}/index.html"' in (local_run / "report" / "index.html").read_text()
    steering = load_file(local_run / "report" / name / "steering" / "vectors.safetensors")
    np.testing.assert_allclose(np.linalg.norm(steering["vectors"], axis=1), 1.0, rtol=1e-5)
    assert (steering["strengths"] > 0).all()
    model = json.loads((local_run / "model" / "manifest.json").read_text())["training"]
    assert model["final_heldout_loss"] < 0.6 * model["initial_heldout_loss"]


def test_the_report_probes_the_demo_genres_with_a_few_latents(local_run):
    """The demo's genre-labelled documents (none from the corpus), one balanced task per
    genre: the raw activations and a handful of latents tell genres apart far above chance."""
    found = json.loads((local_run / "report" / "probing.json").read_text())
    assert found["data"].endswith("labels/genres.jsonl")
    assert len(found["tasks"]) == 7 and found["chance"] == 0.5
    assert found["documents"] == 350 and found["dropped_empty_documents"] == 0
    for task in found["tasks"]:
        assert task["test_documents"] >= 10 and task["test_documents"] % 2 == 0
    (site,) = found["sites"].values()
    assert site["llm_test_accuracy"] > 0.9
    summary = json.loads((local_run / "report" / "metrics.json").read_text())["saes"]
    for name in SMALL_SAES:
        accuracies = found["saes"][name]["sae_top_k_test_accuracy"]
        assert set(accuracies) == {"1", "2", "5", "20"}
        assert accuracies["20"] > 0.9 and accuracies["1"] > 0.75
        assert summary[name]["sae_top_1_test_accuracy"] == accuracies["1"]
        assert summary[name]["llm_test_accuracy"] == site["llm_test_accuracy"]
    corpus = {
        json.loads(line)["text"]
        for path in (local_run / "corpus").glob("*.jsonl")
        for line in path.read_text().splitlines()
    }
    probing = (local_run / "labels" / "genres.jsonl").read_text().splitlines()
    assert not corpus & {json.loads(line)["text"] for line in probing}


@pytest.mark.parametrize("name", SMALL_SAES)
def test_every_context_token_has_the_features_activation(local_run, name):
    """report.context_values: the contexts' sequences run again; each token gets the feature's
    activation, and at the firing token it is the activation the evaluation recorded."""
    report = json.loads((local_run / "report" / name / "features.json").read_text())
    checked = 0
    for feature in report["features"]:
        samples = [s for band in feature["quantiles"] for s in band["samples"]]
        for context in feature["contexts"] + samples:
            values = context["values"]
            assert len(values) == len(context["tokens"]) and min(values) >= 0
            # Rounded to 5 decimals, as SAEDashboard writes them.
            assert values[context["highlight"]] == pytest.approx(
                context["activation"], rel=2e-3, abs=1e-5
            )
            bos = [v for t, v in zip(context["tokens"], values, strict=True) if t == "<bos>"]
            assert bos == [0.0] * len(bos)  # BOS is never evaluated
            checked += 1
    assert checked > 200


def test_the_report_measures_absorption_on_the_demo_concepts(local_run):
    """Weekdays, colours, number words and names labelled on held-out tokens: every SAE gets
    its best latent per concept, and a number latent far above what a random one reaches."""
    found = json.loads((local_run / "report" / "absorption.json").read_text())
    assert set(found["concepts"]) == {"weekday", "colour", "number", "name"}
    assert found["split"].startswith("eval") and found["tokens"] > 5000
    summary = json.loads((local_run / "report" / "metrics.json").read_text())["saes"]
    for name in SMALL_SAES:
        per_concept = found["saes"][name]
        assert set(per_concept) == set(found["concepts"])  # each occurs in the held-out text
        for concept, result in per_concept.items():
            assert sum(result["words"].values()) == result["tokens"] > 0
            assert set(result["words"]) <= set(found["concepts"][concept])
            best = result["best_latent"]
            p, r = best["precision"], best["recall"]
            assert best["f1"] == pytest.approx(2 * p * r / (p + r))
            assert 0 <= result["absorption_fraction"] <= 1
        assert summary[name]["concept_best_latent_f1"] == pytest.approx(
            np.mean([r["best_latent"]["f1"] for r in per_concept.values()])
        )
    # A random latent's F1 on number words is at most about twice their share of the tokens.
    numbers = found["saes"]["topk-L1-x4-k16"]["number"]
    share = numbers["tokens"] / found["tokens"]
    assert numbers["best_latent"]["f1"] > 5 * 2 * share


def test_snapshots_give_a_held_out_curve_over_training_tokens(local_run):
    """train.n_checkpoints=1 of 60 steps of 256: one snapshot at step 30, in SAELens' format;
    the report judges it and the final SAE on the same tokens and sequences."""
    from sae.io import saelens

    train = manifest.read(str(local_run / "sae"))
    assert train["checkpoints"] == {name: [30 * 256] for name in SMALL_SAES}
    summary = json.loads((local_run / "report" / "metrics.json").read_text())["saes"]
    curve = json.loads((local_run / "report" / "curve.json").read_text())
    assert curve["spliced_sequences"] == 64
    for name in SMALL_SAES:
        _, _, snapshot_cfg = saelens.load(str(local_run / "sae" / name / "checkpoints" / "7680"))
        assert snapshot_cfg["training_tokens"] == 7680
        early, final = curve["saes"][name]
        assert [early["training_tokens"], final["training_tokens"]] == [7680, 60 * 256]
        # The final point is the report's own evaluation (the curve's spliced sequences are
        # the report's here: both 64, more than the held-out split has).
        for key in ("l0", "fraction_variance_explained", "delta_lm_loss", "kl_div_with_sae"):
            assert final[key] == pytest.approx(summary[name][key], rel=1e-4, abs=1e-6), key
        # Another SAE: 30 more steps change what it does.
        assert early["fraction_variance_explained"] != final["fraction_variance_explained"]
        assert all(np.isfinite(v) for v in early.values())
    assert 'src="curve.png"' in (local_run / "report" / "index.html").read_text()
    assert (local_run / "report" / "curve.png").read_bytes()[:4] == b"\x89PNG"


def test_every_stage_wrote_its_outputs_then_a_manifest(local_run):
    for stage_dir in STAGE_DIRS:
        found = manifest.read(str(local_run / stage_dir))
        assert found is not None, stage_dir
        for output in found["outputs"]:
            assert storage.exists(output), output
        assert "jax" in found["versions"] or stage_dir in ("corpus",)
        resources = found["resources"]
        assert resources["peak_host_memory_scope"] == "stage"
        # Each stage's own peak: a Python process with JAX loaded holds a few hundred MB.
        assert 50 * 2**20 < resources["peak_host_memory_bytes"] < 20 * 2**30
        assert resources["wall_seconds"] >= 0


def test_rerun_does_nothing_and_a_changed_config_reruns_only_its_stage(local_run, capsys):
    before = _manifest_times(local_run)
    assert main(["pipeline", f"workdir={local_run}", *SMALL]) == 0
    assert "up to date" in capsys.readouterr().err
    assert _manifest_times(local_run) == before

    assert main(["pipeline", f"workdir={local_run}", *SMALL, "report.top_contexts=3"]) == 0
    after = _manifest_times(local_run)
    assert after["report"] != before["report"]
    assert {k: v for k, v in after.items() if k != "report"} == {
        k: v for k, v in before.items() if k != "report"
    }


def _train_workdir(local_run: Path, target: Path) -> list[str]:
    return [*reuse_run(local_run, target), "train.checkpoint_every=10"]


def test_preempted_training_resumes_to_the_same_weights(local_run, tmp_path):
    straight = _train_workdir(local_run, tmp_path / "straight")
    assert main(["train", *straight]) == 0

    resumed = _train_workdir(local_run, tmp_path / "resumed")
    process = subprocess.Popen(
        [sys.executable, "-m", "jobs.cli", "train", *resumed],
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ.copy(),
    )
    lines = []
    for line in process.stderr:
        lines.append(line)
        if "checkpoint saved at step 20" in line:
            process.send_signal(signal.SIGTERM)
            break
    lines += process.stderr.read().splitlines()
    assert process.wait(timeout=120) == 75
    saved = [line.strip() for line in lines if "checkpoint saved at step" in line]
    assert len(saved) == len(set(saved)), f"a checkpoint announced twice: {saved}"
    assert manifest.read(str(tmp_path / "resumed" / "sae")) is None
    assert main(["train", *resumed]) == 0
    # Back at the stop's checkpoint from its stream position: the model re-ran nothing.
    record = manifest.read(str(tmp_path / "resumed" / "sae"))["resumed"]
    assert record["step"] >= 20 and record["replayed_lm_batches"] == 0

    for sae in SMALL_SAES:
        a = load_file(tmp_path / "straight" / "sae" / sae / "sae_weights.safetensors")
        b = load_file(tmp_path / "resumed" / "sae" / sae / "sae_weights.safetensors")
        for name in a:
            np.testing.assert_allclose(b[name], a[name], rtol=1e-4, atol=1e-6)


@pytest.mark.gcs
def test_pipeline_on_gcs(local_run, gcs_bucket_uri):
    preset = storage.join(gcs_bucket_uri, "presets", "tiny")
    corpus = storage.join(gcs_bucket_uri, "corpus")
    storage.upload_tree(str(local_run / "model"), preset)
    storage.upload_tree(str(local_run / "corpus"), corpus)
    workdir = storage.join(gcs_bucket_uri, "run")
    args = [
        "pipeline",
        f"workdir={workdir}",
        *SMALL,
        "demo.enabled=false",
        f"model.preset={preset}",
        f"tokenize.input={corpus}/*.jsonl",
    ]
    assert main(args) == 0
    metrics = storage.read_json(storage.join(workdir, "report", "metrics.json"))["saes"]
    assert all(m["fraction_variance_explained"] > 0.5 for m in metrics.values())
    assert storage.list_files(storage.join(workdir, "sae", "checkpoints"))
    assert storage.exists(storage.join(workdir, "report", "index.html"))
    for stage in ("tokens", "sae", "report"):
        assert manifest.read(storage.join(workdir, stage)) is not None


def test_a_bfloat16_model_trains_from_its_bfloat16_stream(local_run, tmp_path):
    """model.dtype=bfloat16: the stream's batches stay bfloat16 up to the device (see
    tests/test_activations.py) and the step casts them; training ends with finite weights."""
    args = [*_train_workdir(local_run, tmp_path / "bf16"), "model.dtype=bfloat16"]
    assert main(["train", *args]) == 0
    for sae in SMALL_SAES:
        weights = load_file(tmp_path / "bf16" / "sae" / sae / "sae_weights.safetensors")
        assert all(np.isfinite(value).all() for value in weights.values())
