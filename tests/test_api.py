"""The README's Python API example runs as written (no workdir, corpus or model), and the API's
objects behave as it says."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

import sae
from sae.errors import ConfigError, InputError

README = Path(__file__).resolve().parent.parent / "README.md"


def _api_example() -> str:
    section = README.read_text().split("## Python API", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, re.S)
    return code


def test_readme_api_example_fits_saves_loads_and_evaluates(tmp_path, capsys):
    code = _api_example().replace("/tmp/topk-sae", str(tmp_path / "topk-sae"))
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    topk, loaded, held_out = namespace["topk"], namespace["loaded"], namespace["held_out"]
    assert namespace["latents"].shape == (4000, 256)
    assert (np.count_nonzero(namespace["latents"], axis=1) <= 8).all()
    assert (tmp_path / "topk-sae" / "cfg.json").exists()
    np.testing.assert_allclose(loaded.encode(held_out[:50]), topk.encode(held_out[:50]), rtol=1e-5)
    metrics = namespace["metrics"]
    assert 7.0 <= metrics["l0"] <= 8.0
    # A real fit: far better than the mean (FVE 0) on rows it never saw.
    assert metrics["fraction_variance_explained"] > 0.6
    assert "L0" in capsys.readouterr().out


def test_trainer_takes_an_iterator_and_checks_its_input():
    rng = np.random.default_rng(1)
    batches = (rng.normal(size=(64, 16)).astype(np.float32) for _ in range(5))
    trainer = sae.Trainer(
        [sae.SaeSpec(architecture="relu")], d_model=16, batch_size=64, lr_warmup_steps=0
    )
    (relu,) = trainer.fit(batches, steps=5, log_every=5)
    assert relu.d_sae == 16 * 8 and trainer.history[-1][0] == 5
    reconstruction = relu.reconstruct(rng.normal(size=(3, 16)))
    assert reconstruction.shape == (3, 16)
    with pytest.raises(InputError, match="^activations have width 8; the Trainer's d_model is 16$"):
        trainer.fit(np.ones((100, 8), np.float32), steps=5)
    bad = np.ones((100, 16), np.float32)
    bad[3, 2] = np.nan
    with pytest.raises(InputError, match="NaN or infinite"):
        trainer.fit(bad, steps=5)
    with pytest.raises(ConfigError, match="batch_size must be positive"):
        sae.Trainer([sae.SaeSpec()], d_model=16, batch_size=0).fit(bad, steps=5)
    with pytest.raises(ConfigError, match="unexpected keyword argument 'batchsize'"):
        sae.Trainer([sae.SaeSpec()], d_model=16, batchsize=64)


def test_public_names():
    assert sae.train.__module__ == "sae.training.run"
    assert sae.load_sae.__qualname__ == "Sae.load"
    assert {"Trainer", "SaeSpec", "evaluate", "load_config", "steer"} <= set(dir(sae))
    with pytest.raises(AttributeError):
        sae.nothing  # noqa: B018


def test_fve_without_dominant_dimensions_sees_through_one_huge_dimension():
    """One dimension with ~99% of the variance: an SAE that reconstructs only it has a plain
    FVE near 1 and an FVE over the other dimensions near 0; the metrics name the dimension."""
    from sae.arch import ReluSAE

    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, 16)).astype(np.float32)
    x[:, 5] = 1000.0 + 30.0 * rng.normal(size=2000)
    one_hot = np.eye(16, dtype=np.float32)[5]
    weights = {"W_enc": one_hot[:, None], "b_enc": np.zeros(1, np.float32)}
    weights |= {"W_dec": one_hot[None, :], "b_dec": np.zeros(16, np.float32)}
    only_dim_5 = sae.Sae(ReluSAE(sae.SaeSpec(), d_model=16, d_sae=1), weights, {})
    metrics = sae.evaluate(only_dim_5, x)[0]
    assert metrics["fraction_variance_explained"] > 0.9
    assert metrics["dominant_dimensions"] == [5] and metrics["dominant_variance_share"] > 0.9
    assert abs(metrics["fraction_variance_explained_without_dominant"]) < 0.01
