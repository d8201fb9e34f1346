"""Steering evaluation on the tiny model: the machinery, the baselines and the arithmetic of
concept and cost (the tiny model's steering is not judged for quality)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jobs.cli import main
from sae import sharding
from sae.analysis import steering_eval
from sae.analysis.steering_eval import SteeringPoint
from sae.data import activations, token_shards
from sae.io import manifest
from sae.io.saelens import Sae
from sae.model import lm

pytestmark = pytest.mark.slow

SAE_NAME = "topk-L1-x4-k16"
PROMPTS = ["Once upon a time", "The recipe needs"]


@pytest.fixture(scope="module")
def setup(local_run):
    from sae.model.generation import SteeredGenerator

    tokens = manifest.read(str(local_run / "tokens"))
    held_out = list(token_shards.iter_sequences(tokens["shards"]["eval"]))[:40]
    sae = Sae.load(str(local_run / "sae" / SAE_NAME))
    generator = SteeredGenerator.from_preset(str(local_run / "model"))
    bos = tokens["tokenizer"]["bos_id"]
    # A feature that fires often on held-out text: the first of the report's steering vectors.
    report = json.loads((local_run / "report" / SAE_NAME / "steering" / "vectors.json").read_text())
    feature = report["vectors"][0]["feature"]
    strength = report["vectors"][0]["suggested_strength"]
    return {
        "sae": sae,
        "generator": generator,
        "held_out": held_out,
        "bos": bos,
        "feature": feature,
        "strengths": [strength, 8 * strength],
        "tokens": tokens,
    }


@pytest.fixture(scope="module")
def evaluation(setup):
    return steering_eval.evaluate_steering(
        setup["generator"],
        setup["sae"],
        setup["feature"],
        1,
        setup["strengths"],
        PROMPTS,
        setup["held_out"],
        setup["bos"],
        cost_sequences=16,
        diffmean_tokens=3000,
        max_new_tokens=12,
        max_ce_increase=10.0,
    )


def test_every_direction_at_every_strength_beside_the_unsteered_model(setup, evaluation):
    points = evaluation.points
    assert [(p.method, p.strength) for p in points] == [("none", 0.0)] + [
        (m, s) for m in ("sae", "diffmean", "random") for s in setup["strengths"]
    ]
    unsteered = points[0]
    assert unsteered.kl == pytest.approx(0, abs=1e-6)
    assert unsteered.ce_increase == pytest.approx(0, abs=1e-6)
    for method in ("sae", "diffmean", "random"):
        low, high = [p for p in points if p.method == method]
        # A stronger push moves the next-token distribution further.
        assert 0 < low.kl < high.kl, (method, low, high)
        assert high.generated_tokens > 0
    assert evaluation.scored_positions > 1000
    assert len(evaluation.samples) == len(points) and evaluation.samples[0]["method"] == "none"


def test_concept_is_the_feature_reread_by_the_unsteered_model(setup, evaluation):
    """Recomputed by hand for the first prompt: the continuation generated with the SAE
    direction at the high strength, read by the clean model at block 1, encoded by the SAE."""
    generator, sae, feature = setup["generator"], setup["sae"], setup["feature"]
    strength = setup["strengths"][1]
    direction = sae.weights["W_dec"][feature] / np.linalg.norm(sae.weights["W_dec"][feature])
    tap = lm.ActivationTap(generator.backbone, [1], sharding.make_mesh(1, 1))
    fired = counted = 0
    for prompt in PROMPTS:
        (steered,) = generator.generate(prompt, direction, [strength], 1, 12)
        ids = np.asarray([steered.prompt_ids + steered.new_ids], np.int32)
        residual = np.asarray(tap(ids, np.asarray([ids.shape[1]]))[0][0], np.float32)
        latents = sae.encode(residual[len(steered.prompt_ids) :])[:, feature]
        fired += int(np.sum(latents > 0))
        counted += len(latents)
        if prompt == PROMPTS[0]:
            sample = [s for s in evaluation.samples if s["method"] == "sae"][1]
            assert sample["text"] == steered.text
    point = next(p for p in evaluation.points if (p.method, p.strength) == ("sae", strength))
    assert point.generated_tokens == counted
    assert point.fires == pytest.approx(fired / counted)


def test_diffmean_is_the_difference_of_the_two_means(setup):
    sae, feature, bos = setup["sae"], setup["feature"], setup["bos"]
    tap = lm.ActivationTap(setup["generator"].backbone, [1], sharding.make_mesh(1, 1))
    direction, fired = steering_eval.diffmean_direction(
        sae, feature, tap, iter(setup["held_out"]), 8, bos, 10**9
    )
    rows = []
    for token_ids, lengths in activations.sequence_batches(iter(setup["held_out"]), 8):
        mask = activations.content_mask(token_ids, lengths, bos)
        rows.append(np.asarray(tap(token_ids, lengths)[0], np.float32)[mask])
    rows = np.concatenate(rows)
    active = sae.encode(rows)[:, feature] > 0
    expected = rows[active].mean(axis=0) - rows[~active].mean(axis=0)
    assert fired == int(active.sum()) > 0
    np.testing.assert_allclose(direction, expected / np.linalg.norm(expected), atol=1e-5)


def test_best_strength_is_the_most_concept_within_the_budget():
    def point(strength, fires, cost):
        return SteeringPoint("sae", strength, fires, fires, cost, cost, 10)

    unsteered = SteeringPoint("none", 0.0, 0.1, 0.1, 0.0, 0.0, 10)
    points = [unsteered, point(1.0, 0.1, 0.05), point(2.0, 0.4, 0.3), point(4.0, 0.9, 2.0)]
    assert steering_eval.best_strength(points, "sae", 0.5) == 2.0
    assert steering_eval.best_strength(points, "sae", 5.0) == 4.0
    assert steering_eval.best_strength(points, "sae", 0.01) is None  # none within the budget
    assert steering_eval.best_strength(points, "random", 5.0) is None
    # Within the budget but no more concept than the unsteered model: no best.
    assert steering_eval.best_strength(points, "sae", 0.1) is None


def _config(local_run, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(f"workdir: {local_run}\ntrain:\n  lm_batch_size: 8\n")
    return str(path)


def test_steer_evaluate_prints_the_table_and_writes_json(setup, local_run, tmp_path, capsys):
    out_json = tmp_path / "eval.json"
    strengths = ",".join(f"{s:g}" for s in setup["strengths"])
    argv = ["steer", "--config", _config(local_run, tmp_path), "--evaluate"]
    argv += ["--sae", str(local_run / "sae" / SAE_NAME), "--feature", str(setup["feature"])]
    argv += ["--sweep", strengths, "--prompt", PROMPTS[0], "--max-new-tokens", "8"]
    argv += ["--cost-sequences", "8", "--diffmean-tokens", "2000", "--json", str(out_json)]
    assert main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"feature {setup['feature']} at block 1")
    table = out[2:]
    assert len(table) == 7 and table[0].split()[:2] == ["none", "0"]
    assert [line.split()[0] for line in table[1:]] == ["sae"] * 2 + ["diffmean"] * 2 + [
        "random"
    ] * 2
    saved = json.loads(out_json.read_text())
    assert saved["feature"] == setup["feature"] and len(saved["points"]) == 7
    assert set(saved["best"]) == {"sae", "diffmean", "random"}


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--top-k", "5"], "--evaluate generates greedily"),
        (["--cost-sequences", "0"], "--cost-sequences must be positive"),
    ],
)
def test_evaluate_bad_flags_are_one_line(setup, local_run, tmp_path, capsys, extra, expected):
    argv = ["steer", "--config", _config(local_run, tmp_path), "--evaluate"]
    argv += ["--sae", str(local_run / "sae" / SAE_NAME), "--feature", str(setup["feature"])]
    argv += ["--strength", "5", "--prompt", PROMPTS[0], *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err


def test_the_report_evaluates_its_first_steering_vectors(local_run, tmp_path):
    """report.steering_eval_features=1: evaluation.json and .png beside each residual SAE's
    steering vectors, for its first vector, at the scaled suggested strengths; the SAE's page
    shows the plot."""
    from sae.io import storage

    from .conftest import reuse_run

    args = reuse_run(local_run, tmp_path)
    storage.upload_tree(str(local_run / "sae"), str(tmp_path / "sae"))
    args += ["report.spliced_sequences=0", "report.eval_tokens=2000", "report.max_features=5"]
    args += ["report.steering_eval_features=1", "report.steering_eval_scales=[1.0, 4.0]"]
    args += ["report.steering_eval_prompts=[Once upon a time]", "report.steering_eval_new_tokens=8"]
    args += ["report.steering_eval_sequences=8"]
    assert main(["report", *args]) == 0
    for name in ("relu-L1-x4-c2", SAE_NAME):
        steering_dir = tmp_path / "report" / name / "steering"
        saved = json.loads((steering_dir / "evaluation.json").read_text())
        vectors = json.loads((steering_dir / "vectors.json").read_text())["vectors"]
        assert (steering_dir / "evaluation.png").read_bytes()[:4] == b"\x89PNG"
        # The SAE's dashboard shows the plot.
        page = (tmp_path / "report" / name / "index.html").read_text()
        assert 'src="steering/evaluation.png"' in page
        if not vectors:  # every live latent of the tiny ReLU SAE is dense: none to steer with
            assert name == "relu-L1-x4-c2" and saved["features"] == []
            continue
        (evaluated,) = saved["features"]
        assert evaluated["feature"] == vectors[0]["feature"]
        suggested = vectors[0]["suggested_strength"]
        strengths = sorted({p["strength"] for p in evaluated["points"]} - {0.0})
        assert strengths == pytest.approx([suggested, 4 * suggested], rel=1e-6)
    written = manifest.read(str(tmp_path / "report"))["outputs"]
    assert str(tmp_path / "report" / SAE_NAME / "steering" / "evaluation.json") in written
