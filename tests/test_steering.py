"""Steering: vectors files, generation with a vector at a block's output, `gemma-sae steer`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from jobs.cli import main
from sae.analysis import steering
from sae.io import saelens

pytestmark = pytest.mark.slow

SAE_NAME = "topk-L1-x4-k16"  # conftest's SMALL run: both SAEs read layer 1 of a 2-layer model
PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def run(local_run) -> dict:
    """The local run's model, one SAE, and the report's steering vectors for it."""
    tensors, metadata = steering.load(
        str(local_run / "report" / SAE_NAME / "steering" / "vectors.safetensors")
    )
    sae_dir = local_run / "sae" / SAE_NAME
    sae, params, cfg = saelens.load(str(sae_dir))
    return {
        "preset": str(local_run / "model"),
        "sae_dir": sae_dir,
        "sae": sae,
        "params": params,
        "cfg": cfg,
        "vectors": tensors,
        "metadata": metadata,
    }


@pytest.fixture(scope="module")
def generator(run):
    from sae.model.generation import SteeredGenerator

    return SteeredGenerator.from_preset(run["preset"])


@pytest.fixture(scope="module")
def causal_lm(run):
    import keras_hub

    return keras_hub.models.GemmaCausalLM.from_preset(run["preset"], preprocessor=None)


def test_vectors_file_holds_unit_directions_strengths_and_metadata(run):
    tensors, metadata, cfg = run["vectors"], run["metadata"], run["cfg"]
    features = [int(f) for f in tensors["features"]]
    np.testing.assert_allclose(np.linalg.norm(tensors["vectors"], axis=1), 1.0, rtol=1e-5)
    # Each row is the feature's own decoder direction.
    rows = run["params"]["W_dec"][features]
    cosine = np.sum(rows * tensors["vectors"], axis=1) / np.linalg.norm(rows, axis=1)
    np.testing.assert_allclose(cosine, 1.0, rtol=1e-5)
    assert np.all(tensors["strengths"] > 0)  # the report picks live features
    assert metadata["layer"] == cfg["layer"] == 1
    assert metadata["model_preset"] == cfg["model_preset"]
    assert metadata["sae"].endswith(SAE_NAME)
    assert metadata["d_model"] == cfg["d_in"]
    assert "activations" in metadata["strength_statistic"]


def test_strength_zero_equals_keras_hub_greedy_generate(run, generator, causal_lm):
    ids = generator.prompt_ids(PROMPT)
    # Same prompt ids as keras-hub's own preprocessor.
    import keras_hub

    preprocessor = keras_hub.models.GemmaCausalLMPreprocessor.from_preset(run["preset"])
    theirs = preprocessor.generate_preprocess(PROMPT, sequence_length=len(ids) + 1)
    assert list(np.asarray(theirs["token_ids"])[: len(ids)]) == ids

    token_ids, padding_mask = generator.padded(ids, 1, 24)
    direction = run["vectors"]["vectors"][0]
    ours = generator.generate_ids(token_ids, padding_mask, direction, [0.0], layer=1)
    expected = causal_lm.generate(
        {"token_ids": token_ids, "padding_mask": padding_mask},
        stop_token_ids=[generator.eos_id],
    )
    np.testing.assert_array_equal(ours, np.asarray(expected["token_ids"]))
    assert len(generator.generate(PROMPT, direction, [0.0], 1, 24)[0].new_ids) > 0


def _steered_scores(causal_lm, ids: list[int], vector: np.ndarray, layer: int):
    """keras-hub's own full-sequence scoring with `vector` added after block `layer`, and the
    residual stream there: an independent reference for the cached generation loop."""
    captured = {}

    def intercept(x, index):
        if index == layer:
            x = x + jnp.asarray(vector, x.dtype)
            captured["residual"] = x
        return x

    token_ids = np.asarray([ids], np.int32)
    logits = causal_lm.score(token_ids, np.ones_like(token_ids, bool), layer_intercept_fn=intercept)
    return np.asarray(logits[0], np.float32), np.asarray(captured["residual"][0], np.float32)


def test_large_strength_changes_the_text_and_raises_the_feature(run, generator, causal_lm):
    tensors, sae, params = run["vectors"], run["sae"], run["params"]
    feature, direction = int(tensors["features"][0]), tensors["vectors"][0]
    strength = 8 * float(tensors["strengths"][0])
    plain, steered = generator.generate(PROMPT, direction, [0.0, strength], 1, 24)
    assert steered.new_ids != plain.new_ids
    weights = {k: jnp.asarray(v) for k, v in params.items()}
    activation = {}
    for name, generation, amount in (("plain", plain, 0.0), ("steered", steered, strength)):
        ids = generation.prompt_ids + generation.new_ids
        logits, residual = _steered_scores(causal_lm, ids, amount * direction, layer=1)
        # The cached loop picked, at every generated position, the token that full-sequence
        # scoring with the same vector at the same block ranks first (up to float noise).
        start = len(generation.prompt_ids)
        chosen = logits[np.arange(start - 1, len(ids) - 1), ids[start:]]
        np.testing.assert_allclose(chosen, logits[start - 1 : -1].max(axis=-1), atol=1e-3)
        latents = np.asarray(sae.encode(weights, jnp.asarray(residual)))
        activation[name] = float(latents[start:, feature].mean())
    assert activation["steered"] > activation["plain"] + 1.0, activation


def test_a_sweep_compiles_the_generation_loop_once(run):
    from sae.model.generation import SteeredGenerator

    generator = SteeredGenerator.from_preset(run["preset"])  # its own compilation cache
    vectors = run["vectors"]["vectors"]
    texts = set()
    for direction, strengths in (
        (vectors[0], [0.0, 2.0, 8.0]),
        (vectors[0], [0.0, 30.0, 120.0]),
        (vectors[1], [0.0, -50.0, 500.0]),
    ):
        texts |= {g.text for g in generator.generate(PROMPT, direction, strengths, 1, 12)}
    assert generator.traces == 1 and generator.compilations() == 1
    assert len(texts) > 3  # the strengths really reached the model


def test_prompts_of_different_lengths_share_one_batch(run, generator):
    """The steering evaluation generates every prompt with every vector in one batch: each
    row continues as it would alone (its own prompt kept where the batch's is longer)."""
    vectors = run["vectors"]["vectors"][:1] * np.array([[0.0], [40.0]], np.float32)
    prompts = [PROMPT, "A", "The recipe for a cake needs four cups of"]
    together = generator.generate_rows(
        [generator.prompt_ids(p) for p in prompts for _ in vectors],
        np.tile(vectors, (len(prompts), 1)),
        1,
        max_new_tokens=10,
    )
    alone = [g for p in prompts for g in generator.generate_with_vectors(p, vectors, 1, 10)]
    assert [g.new_ids for g in together] == [g.new_ids for g in alone]
    assert all(len(g.new_ids) <= 10 for g in together)
    assert len({g.text for g in together}) > 2


def test_top_k_sampling_is_seeded_and_top_1_is_greedy(run, generator):
    direction = run["vectors"]["vectors"][0]
    greedy = generator.generate(PROMPT, direction, [0.0, 20.0], 1, 16)
    top_1 = generator.generate(PROMPT, direction, [0.0, 20.0], 1, 16, top_k=1, seed=3)
    assert [g.new_ids for g in top_1] == [g.new_ids for g in greedy]
    first = generator.generate(PROMPT, direction, [0.0, 20.0], 1, 16, top_k=40, seed=7)
    again = generator.generate(PROMPT, direction, [0.0, 20.0], 1, 16, top_k=40, seed=7)
    assert [g.new_ids for g in first] == [g.new_ids for g in again]


def _steer(capsys, *argv: str) -> tuple[int, str, list[str]]:
    code = main(["steer", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip().splitlines()


def test_steer_command_prints_each_strength_beside_the_unsteered_text(run, generator, capsys):
    feature = int(run["vectors"]["features"][0])
    args = ["--sae", str(run["sae_dir"]), "--feature", str(feature), "--prompt", PROMPT]
    code, out, _ = _steer(capsys, *args, "--sweep", "4,40", "--max-new-tokens", "12")
    assert code == 0
    blocks = out.split("\n--- ")
    assert [b.splitlines()[0] for b in blocks[1:]] == [
        "unsteered ---",
        "strength 4 ---",
        "strength 40 ---",
    ]
    direction = steering.unit_directions(run["params"]["W_dec"], [feature])[0][0]
    expected = generator.generate(PROMPT, direction, [0.0, 4.0, 40.0], 1, 12)
    for block, generation in zip(blocks[1:], expected, strict=True):
        assert block.splitlines()[1:] == ["  " + line for line in generation.text.splitlines()]
    assert "decoder_block_1, greedy, 12 tokens" in out
    code, out, _ = _steer(
        capsys, *args, "--strength", "8", "--layer", "0", "--allow-layer-mismatch"
    )
    assert code == 0 and "decoder_block_0 (SAE trained on layer 1)" in out


def _files(*roots: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime for root in roots for p in root.rglob("*")}


def _narrow_sae(run, target: Path) -> Path:
    """The run's SAE cut down to read 32-wide activations (the model's are 64 wide)."""
    params = {k: np.asarray(v) for k, v in run["params"].items()}
    params["W_enc"], params["W_dec"] = params["W_enc"][:32], params["W_dec"][:, :32]
    params["b_dec"] = params["b_dec"][:32]
    saelens.save(str(target), params, {**run["cfg"], "d_in": 32})
    return target


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("feature-too-large", "--feature {d_sae} is out of range"),
        ("feature-negative", "--feature -1 is out of range"),
        ("other-layer", "--layer 0 differs from the SAE's layer 1"),
        ("layer-past-the-model", "layer 2 is out of range"),
        ("missing-sae", "no trained SAE at"),
        ("missing-preset", "no keras-hub preset at"),
        ("narrower-sae", "reads d_model=32 but the model"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(run, tmp_path, capsys, case, expected):
    sae_dir, feature, extra = str(run["sae_dir"]), "3", []
    if case == "feature-too-large":
        feature = str(run["sae"].d_sae)
    elif case == "feature-negative":
        feature = "-1"
    elif case == "other-layer":
        extra = ["--layer", "0"]
    elif case == "layer-past-the-model":
        extra = ["--layer", "2", "--allow-layer-mismatch"]
    elif case == "missing-sae":
        sae_dir = str(tmp_path / "no-such-sae")
    elif case == "missing-preset":
        extra = ["--model-preset", str(tmp_path / "no-such-model")]
    elif case == "narrower-sae":
        sae_dir = str(_narrow_sae(run, tmp_path / "narrow"))
    local_run = run["sae_dir"].parent.parent
    before = _files(local_run, tmp_path)
    argv = ["--sae", sae_dir, "--feature", feature, "--strength", "10", "--prompt", PROMPT]
    code, out, err = _steer(capsys, *argv, *extra)
    assert code == 2 and out == ""
    expected = expected.format(d_sae=run["sae"].d_sae)
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    assert _files(local_run, tmp_path) == before


def test_bad_input_through_the_console_command(run):
    before = _files(run["sae_dir"].parent.parent)
    argv = ["--sae", str(run["sae_dir"]), "--feature", "99999", "--strength", "1"]
    done = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "steer", *argv, "--prompt", PROMPT],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        f"error: --feature 99999 is out of range: the SAE at {run['sae_dir']} has "
        f"{run['sae'].d_sae} features (0..{run['sae'].d_sae - 1})"
    ]
    assert _files(run["sae_dir"].parent.parent) == before


def test_steer_takes_an_sae_object_and_defaults_to_its_model_and_layer(run, generator):
    from sae.analysis.steer import steer
    from sae.errors import InputError
    from sae.io.saelens import Sae

    sae = Sae.load(str(run["sae_dir"]))
    feature = int(run["vectors"]["features"][0])
    generations = steer(sae, feature, PROMPT, [40.0, 0.0, -8.0], max_new_tokens=8)
    direction = steering.unit_directions(run["params"]["W_dec"], [feature])[0][0]
    expected = generator.generate(PROMPT, direction, [0.0, 40.0, -8.0], 1, 8)
    assert [(g.strength, g.new_ids) for g in generations] == [
        (g.strength, g.new_ids) for g in expected
    ]
    with pytest.raises(InputError, match=rf"^--feature {sae.d_sae} is out of range: the SAE has"):
        steer(sae, sae.d_sae, PROMPT, [1.0])
