"""Scheduled retraining (`gemma-sae retrain`), for real on the tiny demo: dated runs under a
base, LATEST written last, warm starts, resumption after a preemption, reuse of current stage
outputs, and failed runs that leave every good output as it was."""

import contextlib
import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from jobs import train as train_job
from jobs.cli import main
from jobs.cloud import retrain
from sae import sharding
from sae.config import load
from sae.demo.corpus import write_demo_corpus
from sae.errors import PREEMPTED_EXIT_CODE, Preempted
from sae.io import manifest, saelens, storage
from sae.training import run as training_run
from sae.training.step import StepTrainer, to_host

from .conftest import SMALL, SMALL_SAES

pytestmark = pytest.mark.slow

# SMALL, shorter: the train and report stages run four times here.
FAST = [
    "train.steps=40",
    "train.checkpoint_every=20",
    "report.eval_tokens=2000",
    "report.max_features=10",
    "report.num_steering=2",
    "report.spliced_sequences=0",
]


def _retrain(base: Path, corpus: Path, *extra: str) -> tuple[int, str]:
    """`gemma-sae retrain` in this process: its exit code and what it printed to stderr. The
    demo makes the model inside each run; the corpus is the files in `corpus`."""
    printed = io.StringIO()
    argv = ["retrain", f"workdir={base}", f"tokenize.input={corpus}/*.jsonl", *SMALL, *FAST]
    with contextlib.redirect_stderr(printed):
        code = main([*argv, *extra])
    return code, printed.getvalue()


def _runs(base: Path) -> list[str]:
    return sorted(p.name for p in (base / "runs").iterdir())


def _latest(base: Path) -> str:
    return (base / "LATEST").read_text().strip()


def _tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _first_losses(sae_dir: Path) -> dict[str, float]:
    first = json.loads((sae_dir / "metrics.jsonl").read_text().splitlines()[0])
    return {name: first[f"{name}/loss"] for name in SMALL_SAES}


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Run 1 (cold, on one corpus file); a second file, and run 2 preempted in training, then
    resumed; run 3 on a changed report config only. What each printed, by name."""
    root = tmp_path_factory.mktemp("retrain")
    base, corpus, spare = root / "base", root / "corpus", root / "spare"
    first, second = write_demo_corpus(str(spare), num_documents=1000, num_files=2)
    corpus.mkdir()
    shutil.copy(first, corpus)
    printed = {}

    code, printed["run1"] = _retrain(base, corpus)
    assert code == 0, printed["run1"]
    run1 = _latest(base)

    shutil.copy(second, corpus)

    def preempted(config, force=False):
        raise Preempted("stopped at step 20 on SIGTERM; checkpoint saved")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_job, "run", preempted)
        code, printed["run2 preempted"] = _retrain(base, corpus)
    assert code == PREEMPTED_EXIT_CODE, printed["run2 preempted"]
    (run2,) = set(_runs(base)) - {run1}
    assert _latest(base) == run1, "a preempted run is not LATEST"

    code, printed["run2 resumed"] = _retrain(base, corpus)
    assert code == 0, printed["run2 resumed"]
    assert _latest(base) == run2

    code, printed["run3"] = _retrain(base, corpus, "report.max_features=8")
    assert code == 0, printed["run3"]
    run3 = _latest(base)
    return {"base": base, "corpus": corpus, "runs": [run1, run2, run3], "printed": printed}


def test_first_run_trains_from_scratch_and_becomes_latest(history):
    base, (run1, _, _) = history["base"], history["runs"]
    workdir = base / "runs" / run1
    train_manifest = manifest.read(str(workdir / "sae"))
    assert "init_from" not in train_manifest and "init" not in train_manifest["inputs"]
    # The whole pipeline ran inside the run, the demo model included.
    for stage in ("corpus", "model", "tokens", "sae", "report"):
        assert manifest.read(str(workdir / stage)) is not None, stage
    record = json.loads((workdir / retrain.RECORD).read_text())
    assert (record["latest"], record["init_from"]) == (None, "")
    assert f"done: LATEST names run {run1}" in history["printed"]["run1"]


def test_new_corpus_file_makes_a_run_warm_started_from_the_last(history):
    base, (run1, run2, _) = history["base"], history["runs"]
    run1_sae, run2_sae = base / "runs" / run1 / "sae", base / "runs" / run2 / "sae"
    # The corpus changed: tokenized anew; the demo model did not: carried over, not retrained.
    printed = history["printed"]["run2 preempted"]
    assert "[tokenize] done" in printed and "[demo-model] up to date" in printed
    tokens = manifest.read(str(base / "runs" / run2 / "tokens"))
    assert len([k for k in tokens["inputs"] if k.endswith(".jsonl")]) == 2
    train_manifest = manifest.read(str(run2_sae))
    assert train_manifest["init_from"] == {"uri": str(run1_sae), "step": 40}
    assert train_manifest["inputs"]["init"] == manifest.fingerprint(str(run1_sae))
    # At its first logged step a warm start is far ahead of run 1's cold start.
    cold, warm = _first_losses(run1_sae), _first_losses(run2_sae)
    for name in SMALL_SAES:
        assert warm[name] < 0.7 * cold[name], (name, warm, cold)


def test_warm_start_begins_at_the_previous_final_weights(history):
    """The states a warm start trains from, in exported form, are run 1's exported SAEs."""
    base, (run1, _, _) = history["base"], history["runs"]
    config = load(None, [f"workdir={base / 'runs' / run1}", *SMALL, *FAST])
    members = training_run.build_members(config.train, 64, by_site=True)
    trainer = StepTrainer(members, sharding.make_mesh(-1, 1), config.train.dead_window_tokens)
    sample = np.random.default_rng(0).normal(size=(256, 64)).astype(np.float32)
    fresh = trainer.init_state(1, sample)
    warm = training_run._warm_started(trainer, fresh, training_run.WarmStart(config.sae_uri, 40))
    for name in SMALL_SAES:
        member, state = members[name], warm[name]
        weights = to_host(member.sae.export_weights({**state.params, **state.buffers}))
        started = saelens.fold_input_scale(weights, float(state.input_scale))
        final = load_file(base / "runs" / run1 / "sae" / name / saelens.WEIGHTS_NAME)
        assert set(started) == set(final)
        for key in final:
            np.testing.assert_allclose(started[key], final[key], rtol=1e-6, atol=1e-7)
        assert not np.allclose(to_host(fresh[name].params["W_enc"]), started["W_enc"])
        assert int(state.step) == 0


def test_preempted_run_is_resumed_not_started_again(history):
    base, (run1, run2, _) = history["base"], history["runs"]
    printed = history["printed"]
    assert f"new run {base / 'runs' / run2} (LATEST: {run1})" in printed["run2 preempted"]
    assert not (base / "runs" / run2 / retrain.FAILED).exists(), "preempted is not failed"
    resumed = printed["run2 resumed"]
    assert f"resuming the unfinished run {run2}" in resumed
    assert "[tokenize] up to date" in resumed and "[tokenize] done" not in resumed
    assert "[retrain] new run" not in resumed


def test_a_run_reuses_the_current_outputs_of_the_last(history):
    """Run 3 changed only the report config: the demo corpus and model and the tokens are
    carried over from run 2 and skipped by their manifests; train and report run."""
    base, (_, run2, run3) = history["base"], history["runs"]
    printed = history["printed"]["run3"]
    for stage in ("demo-corpus", "demo-model", "tokenize"):
        assert f"[{stage}] up to date" in printed, stage
    for output in ("corpus", "model", "tokens"):
        assert f"carried over {base / 'runs' / run2 / output}" in printed
        assert (
            _tree(base / "runs" / run3 / output).keys()
            == _tree(base / "runs" / run2 / output).keys()
        )
    # The copies describe themselves: their manifests name run 3's files.
    tokens = manifest.read(str(base / "runs" / run3 / "tokens"))
    shards = [uri for split in tokens["shards"].values() for uri in split]
    assert shards and all(uri.startswith(str(base / "runs" / run3 / "tokens")) for uri in shards)
    assert all(Path(uri).exists() for uri in shards)
    assert "[train] done" in printed and "[report] done" in printed
    run3_train = manifest.read(str(base / "runs" / run3 / "sae"))
    assert run3_train["init_from"]["uri"] == str(base / "runs" / run2 / "sae")


def test_failed_run_leaves_latest_and_earlier_runs_untouched(history):
    base, corpus, runs = history["base"], history["corpus"], history["runs"]
    before = {run: _tree(base / "runs" / run) for run in runs}
    latest_before = (base / "LATEST").read_bytes()
    bad = corpus / "0-new.jsonl"
    bad.write_bytes(b'{"text": "fine"}\n\xff\xfe not utf-8\n')
    try:
        code, printed = _retrain(base, corpus)
        # The same request again: a failed run is never resumed, a new one fails the same way.
        again, printed_again = _retrain(base, corpus)
    finally:
        bad.unlink()
    assert again == 2 and "[retrain] new run" in printed_again
    assert code == 2
    errors = [line for line in printed.splitlines() if line.startswith("error:")]
    failed, failed_again = sorted(set(_runs(base)) - set(runs))
    assert f"run {failed_again} failed" in printed_again
    assert errors == [
        f"error: run {failed} failed, LATEST still names {runs[2]}: undecodable corpus record: "
        f"{bad} line 2 is not valid UTF-8 (set tokenize.on_bad_record=skip to count and skip "
        "such records)"
    ]
    assert (base / "LATEST").read_bytes() == latest_before
    assert {run: _tree(base / "runs" / run) for run in runs} == before
    assert (base / "runs" / failed / retrain.FAILED).read_text().startswith("undecodable")


def test_nothing_new_makes_no_run(history):
    base, corpus, runs = history["base"], history["corpus"], history["runs"]
    before = _runs(base)
    code, printed = _retrain(base, corpus, "report.max_features=8")
    assert code == 0, printed
    assert f"[retrain] nothing new since run {runs[2]} (same config and inputs)" in printed
    assert _runs(base) == before and _latest(base) == runs[2]


def test_warm_start_from_other_saes_is_a_one_line_error(history, capsys):
    base, (run1, run2, _) = history["base"], history["runs"]
    workdir, init = base / "runs" / run1, base / "runs" / run2 / "sae"
    args = ["train", f"workdir={workdir}", *SMALL, *FAST, f"train.init_from={init}"]
    before = _tree(workdir)
    assert main([*args, "train.saes.1.expansion_factor=2"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: train.init_from {init}: checkpoint from another config "
        "(it has no SAE topk-L1-x2-k16)"
    )
    assert main([*args, "train.saes.1.name=topk-L1-x4-k16", "train.saes.1.layer=0"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: train.init_from {init}: checkpoint from another config "
        "(topk-L1-x4-k16 has layer 1 there, 0 here)"
    )
    assert main([*args[:-1], f"train.init_from={workdir / 'sae'}"]) == 2
    assert "names this run's own output" in capsys.readouterr().err
    assert _tree(workdir) == before


def test_retrain_refuses_outputs_outside_the_run(tmp_path, capsys):
    code = main(["retrain", f"workdir={tmp_path}", "model.preset=/elsewhere/model"])
    assert code == 2
    assert "leave model.preset empty with demo.enabled" in capsys.readouterr().err
    assert not any(tmp_path.iterdir()), "no run was started"


def test_the_scheduled_command_line_parses():
    """What the TPU workers run (infra/retrain.tf: stage retrain, then the startup template's
    order): `gemma-sae retrain workdir=BASE OVERRIDES... --config CONFIG`."""
    argv = [
        "workdir=gs://my-bucket/retrain",
        "model.preset=gs://my-bucket/presets/gemma2_2b_en",
        "tokenize.input=gs://my-bucket/corpus/*.jsonl",
        "--promotion-request",
        "--config",
        "configs/gemma2-2b-v5e-8.yaml",
    ]
    parsed = retrain._parser().parse_intermixed_args(argv)
    assert parsed.config == "configs/gemma2-2b-v5e-8.yaml" and parsed.promotion_request
    assert parsed.overrides == argv[:3] and not (parsed.force or parsed.cold)
    # A flag between overrides too (main parses intermixed, as the stages' command line).
    mixed = retrain._parser().parse_intermixed_args([argv[0], "--cold", *argv[1:3]])
    assert mixed.overrides == argv[:3] and mixed.cold


@pytest.mark.gcs
def test_carry_over_and_pointers_on_gcs(history, gcs_bucket_uri):
    """A run's output copied to the next run on gs://, its manifest last and moved along."""
    base, (_, _, run3) = history["base"], history["runs"]
    old_root = storage.join(gcs_bucket_uri, "runs", "a")
    new_root = storage.join(gcs_bucket_uri, "runs", "b")
    storage.upload_tree(str(base / "runs" / run3 / "tokens"), storage.join(old_root, "tokens"))
    local = manifest.read(str(base / "runs" / run3 / "tokens"))
    storage.write_json(
        manifest.manifest_uri(storage.join(old_root, "tokens")),
        retrain._moved(local, str(base / "runs" / run3), old_root),
    )
    retrain._carry_over(
        storage.join(old_root, "tokens"), storage.join(new_root, "tokens"), old_root, new_root
    )
    copied = manifest.read(storage.join(new_root, "tokens"))
    shards = copied["shards"]["train"]
    assert shards and all(uri.startswith(new_root + "/tokens/") for uri in shards)
    for uri in shards:
        old = uri.replace(new_root, old_root)
        assert storage.read_bytes(uri) == storage.read_bytes(old)
    assert copied["counts"] == local["counts"]

    assert retrain.read_latest(gcs_bucket_uri) is None
    storage.write_text(storage.join(gcs_bucket_uri, retrain.LATEST), "b\n")
    assert retrain.read_latest(gcs_bucket_uri) == "b"
    # A run of this second exists (as a directory, i.e. objects below it): the next second.
    taken = storage.join(retrain.run_uri(gcs_bucket_uri, "20231114-221320"), "retrain.json")
    storage.write_text(taken, "{}")
    assert retrain._new_name(gcs_bucket_uri, now=1_700_000_000) == "20231114-221321"
    assert retrain._new_name(gcs_bucket_uri, now=1_700_000_100) == "20231114-221500"


@pytest.mark.gcs
def test_warm_start_from_gcs(history, gcs_bucket_uri):
    """`train.init_from` on gs://: the same final weights as from the local copy."""
    base, (run1, _, _) = history["base"], history["runs"]
    local_sae = base / "runs" / run1 / "sae"
    remote_sae = storage.join(gcs_bucket_uri, "runs", run1, "sae")
    storage.upload_tree(str(local_sae), remote_sae)
    config = load(None, [f"workdir={base / 'runs' / run1}", *SMALL, *FAST])
    config.train.init_from = remote_sae
    warm = training_run.warm_start_source(config, 64)
    assert warm == training_run.WarmStart(remote_sae, 40)
    members = training_run.build_members(config.train, 64, by_site=True)
    trainer = StepTrainer(members, sharding.make_mesh(-1, 1), config.train.dead_window_tokens)
    fresh = trainer.init_state(1, np.ones((256, 64), np.float32))
    started = training_run._warm_started(trainer, fresh, warm)
    for name in SMALL_SAES:
        final = load_file(local_sae / name / saelens.WEIGHTS_NAME)
        folded = saelens.fold_input_scale(
            to_host(started[name].params), float(started[name].input_scale)
        )
        np.testing.assert_allclose(folded["W_dec"], final["W_dec"], rtol=1e-6, atol=1e-7)


def _stage_free(tmp_path: Path) -> tuple[Path, Path]:
    """A base and a one-file corpus for retrains whose stages are stubbed out."""
    base, corpus = tmp_path / "base", tmp_path / "corpus"
    write_demo_corpus(str(corpus), num_documents=50, num_files=1)
    return base, corpus


def test_of_two_retrains_planned_at_once_one_starts(tmp_path, monkeypatch):
    """Another retrain claims STARTED between this one's plan and its claim: this one stops
    with a one-line error and writes nothing (no run record, STARTED stays theirs)."""
    base, corpus = _stage_free(tmp_path)
    planned = retrain._shared_plan

    def plan_then_lose_the_race(*args, **kwargs):
        plan = planned(*args, **kwargs)
        storage.write_text(storage.join(str(base), retrain.STARTED), "20991231-000000\n")
        return plan

    monkeypatch.setattr(retrain, "_shared_plan", plan_then_lose_the_race)
    ran = []
    monkeypatch.setattr(retrain, "_run_steps", lambda *a, **k: ran.append(a))
    code, printed = _retrain(base, corpus)
    assert code == 2 and not ran  # a one-line error, as every user-fixable one
    last = printed.strip().splitlines()[-1]
    assert "does not start" in last and "now names run 20991231-000000" in last, printed
    assert (base / retrain.STARTED).read_text() == "20991231-000000\n"
    assert not (base / "runs").exists() or not list((base / "runs").rglob(retrain.RECORD))


def test_a_run_finishing_after_another_moved_latest_does_not_undo_it(tmp_path, monkeypatch):
    """While this run's stages run another retrain publishes its run: this one fails in one
    line, and LATEST keeps naming the other run."""
    base, corpus = _stage_free(tmp_path)

    def stages_meanwhile_another_publishes(*args, **kwargs):
        storage.write_text(storage.join(str(base), retrain.LATEST), "20991231-000000\n")

    monkeypatch.setattr(retrain, "_run_steps", stages_meanwhile_another_publishes)
    code, printed = _retrain(base, corpus)
    assert code == 2
    last = printed.strip().splitlines()[-1]
    assert "is not LATEST" in last and "now names run 20991231-000000" in last, printed
    assert retrain.read_latest(str(base)) == "20991231-000000"


def test_a_promotion_request_leaves_latest_to_the_build(tmp_path, monkeypatch):
    """--promotion-request (the scheduled retraining, whose TPU account may not write LATEST):
    the run writes PROMOTE, its name and the LATEST version it read, and LATEST stays."""
    base, corpus = _stage_free(tmp_path)
    storage.write_text(storage.join(str(base), retrain.LATEST), "")  # read as "no run yet"
    _, version = storage.read_versioned(storage.join(str(base), retrain.LATEST))
    monkeypatch.setattr(retrain, "_run_steps", lambda *a, **k: None)
    code, printed = _retrain(base, corpus, "--promotion-request")
    assert code == 0, printed
    (run,) = _runs(base)
    assert (base / retrain.PROMOTE).read_text() == f"{run} {version}\n"
    assert (base / retrain.LATEST).read_text() == ""
    assert f"done: run {run} finished; PROMOTE asks the build to make it LATEST" in printed
