"""The train stage on users' own activation caches (.npy), end to end through the CLI."""

import json

import numpy as np

from jobs.cli import main
from sae.data import activation_files

from .test_training import _data


def _args(tmp_path, *extra):
    return [
        "train",
        f"workdir={tmp_path / 'run'}",
        "train.source=npy",
        f"train.activations={tmp_path / 'acts'}/*.npy",
        "train.saes=[{architecture: topk, k: 8, expansion_factor: 4}, {architecture: jumprelu}]",
        "train.steps=30",
        "train.batch_size=128",
        "train.shuffle_buffer=128",
        "train.lr_warmup_steps=5",
        "train.checkpoint_every=10",
        "train.log_every=10",
        *extra,
    ]


def test_training_from_npy_files(tmp_path):
    """Without the demo and with neither a corpus nor a model named: .npy rows need neither."""
    (tmp_path / "acts").mkdir()
    for index in range(2):
        np.save(tmp_path / "acts" / f"part-{index}.npy", _data(700, seed=index) * 7.0)
    assert main(_args(tmp_path, "demo.enabled=false")) == 0
    run = tmp_path / "run" / "sae"
    manifest = json.loads((run / "manifest.json").read_text())
    assert set(manifest["saes"]) == {"topk-L2-x4-k8", "jumprelu-L2-x8-c2"}
    cfg = json.loads((run / "topk-L2-x4-k8" / "cfg.json").read_text())
    assert cfg["activation_source"] == "npy" and cfg["d_in"] == 16 and cfg["d_sae"] == 64
    assert cfg["input_scale_folded"] < 1  # the rows were scaled up 7x
    assert manifest["counts"]["final_topk-L2-x4-k8/l0"] == 8
    assert (run / "jumprelu-L2-x8-c2" / "sae_weights.safetensors").exists()


def test_k_wider_than_the_dictionary_is_refused_before_training(tmp_path, capsys):
    (tmp_path / "acts").mkdir()
    np.save(tmp_path / "acts" / "a.npy", _data(300))
    code = main(_args(tmp_path, "train.saes.0.k=100"))
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2
    assert message == "error: train.saes[0].k=100 is larger than the SAE's width 64"
    assert not (tmp_path / "run" / "sae").exists()


def _with_nan_rows(tmp_path, finite_rows) -> None:
    """Two .npy files whose rows are NaN except `finite_rows` (global row indices)."""
    (tmp_path / "acts").mkdir()
    rows = np.concatenate([_data(700, seed=0), _data(700, seed=1)])
    keep = np.zeros(len(rows), bool)
    keep[finite_rows] = True
    rows[~keep] = np.nan
    np.save(tmp_path / "acts" / "part-0.npy", rows[:700])
    np.save(tmp_path / "acts" / "part-1.npy", rows[700:])


def test_non_finite_steps_are_skipped_then_stop_the_run(tmp_path, capsys):
    """The first batch is finite, every later one holds NaN rows: those steps are skipped (the
    weights never see them) and the fourth in a row stops the run with a one-line error naming
    the step and the source; nothing is exported."""
    first = activation_files.batch_rows(0, 128, 1400, 0)
    _with_nan_rows(tmp_path, first)
    code = main(_args(tmp_path, "train.max_skipped_steps=3"))
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert code != 0
    assert message.startswith(
        "error: step 5: 4 consecutive steps of jumprelu-L2-x8-c2, topk-L2-x4-k8 had a NaN"
    )
    assert message.endswith("train.source=npy")
    assert not (tmp_path / "run" / "sae" / "manifest.json").exists()
    assert not (tmp_path / "run" / "sae" / "topk-L2-x4-k8" / "cfg.json").exists()


def test_a_non_finite_first_batch_is_refused(tmp_path, capsys):
    _with_nan_rows(tmp_path, [])
    code = main(_args(tmp_path))
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert code != 0
    assert message == (
        "error: the first batch, which initialises the SAEs, holds NaN or infinite values"
    )
