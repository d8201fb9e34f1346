"""Transcoders: every architecture learns a map from one activation to another, skip
transcoders add a linear path, exports carry SAELens' transcoder fields, and on the tiny model
a transcoder replaces block 1's MLP: its prediction is judged on held-out MLP outputs and,
spliced in place of the MLP, on the next-token loss."""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sae
from sae import SaeSpec, arch, sharding
from sae.arch import token_norm
from sae.arch.spec import Site
from sae.data import activations, token_shards
from sae.errors import ConfigError
from sae.io import manifest, saelens
from sae.model import lm, spliced

D, FEATURES = 32, 128


def _mapping(seed: int = 0):
    """A sparse code read through one dictionary and written through another, plus a linear
    part that only a skip connection can carry cheaply."""
    rng = np.random.default_rng(seed)
    into = rng.normal(size=(FEATURES, D))
    into /= np.linalg.norm(into, axis=1, keepdims=True)
    out = rng.normal(size=(FEATURES, D))
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    linear = rng.normal(size=(D, D)) * 0.3 / np.sqrt(D)

    def sample(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        r = np.random.default_rng(seed)
        codes = (r.random((n, FEATURES)) < 6 / FEATURES) * (r.exponential(1.0, (n, FEATURES)) + 0.5)
        x = codes @ into + 0.02 * r.normal(size=(n, D))
        return x.astype(np.float32), (codes @ out + x @ linear).astype(np.float32)

    return sample


SPECS = {
    "relu": SaeSpec(architecture="relu", sparsity_coefficient=1.0),
    "topk": SaeSpec(architecture="topk", k=8),
    "batchtopk": SaeSpec(architecture="batchtopk", k=8),
    "matryoshka": SaeSpec(architecture="matryoshka_batchtopk", k=8, matryoshka_widths=(128, 8 * D)),
    "jumprelu": SaeSpec(
        architecture="jumprelu",
        jumprelu_sparsity_loss_mode="quadratic",
        target_l0=8,
        sparsity_coefficient=1.0,
        jumprelu_init_threshold=0.5,
    ),
}


@functools.cache
def _fitted():
    sample = _mapping()
    x, target = sample(100_000, 1)
    specs = [
        SaeSpec(**{**spec.__dict__, "name": f"{kind}-{name}", "kind": kind, "learning_rate": 3e-3})
        for name, spec in SPECS.items()
        for kind in ("transcoder", "skip_transcoder")
    ]
    trainer = sae.Trainer(specs, d_model=D, batch_size=512, lr_warmup_steps=50)
    fitted = trainer.fit(x, steps=600, targets=target)
    held_x, held_target = sample(8192, 2)
    metrics = sae.evaluate(fitted, held_x, targets=held_target)
    return {s.name: (f, m) for s, f, m in zip(specs, fitted, metrics, strict=True)}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_every_architecture_trains_as_a_transcoder(name):
    """Held-out targets, not the inputs: an SAE of the inputs would score nothing here."""
    plain, plain_metrics = _fitted()[f"transcoder-{name}"]
    skip, skip_metrics = _fitted()[f"skip_transcoder-{name}"]
    assert plain_metrics["fraction_variance_explained"] > 0.5, plain_metrics
    # The linear part is ~10% of the target's variance: the skip takes it off the latents.
    assert (
        skip_metrics["fraction_variance_explained"] > plain_metrics["fraction_variance_explained"]
    )
    assert plain.cfg["d_out"] == D and plain.cfg["apply_b_dec_to_input"] is False
    assert "W_skip" in skip.weights and "W_skip" not in plain.weights


def test_transcoder_exports_are_named_as_saelens_names_them(tmp_path):
    names = {
        name: (_fitted()[f"transcoder-{name}"][0], _fitted()[f"skip_transcoder-{name}"][0])
        for name in SPECS
    }
    expected = {
        "relu": ("transcoder", "skip_transcoder"),
        "topk": ("topk_transcoder", "topk_skip_transcoder"),
        "batchtopk": ("jumprelu_transcoder", "jumprelu_skip_transcoder"),
        "matryoshka": ("jumprelu_transcoder", "jumprelu_skip_transcoder"),
        "jumprelu": ("jumprelu_transcoder", "jumprelu_skip_transcoder"),
    }
    x, _ = _mapping()(256, 3)
    for name, pair in names.items():
        for fitted, architecture in zip(pair, expected[name], strict=True):
            assert fitted.cfg["architecture"] == architecture
            assert fitted.cfg["hook_name"] == "blocks.2.ln2.hook_normalized"
            assert fitted.cfg["metadata"]["hook_name_out"] == "blocks.2.hook_mlp_out"
            directory = tmp_path / architecture / name
            fitted.save(str(directory))
            loaded = sae.load_sae(str(directory))
            assert loaded.model.transcoder and loaded.model.skip == fitted.model.skip
            np.testing.assert_allclose(loaded.encode(x), fitted.encode(x), rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(
                loaded.reconstruct(x), fitted.reconstruct(x), rtol=1e-5, atol=1e-5
            )


def test_the_exported_skip_reads_raw_units():
    """Trained on scaled inputs and targets; the saved weights, scales folded, give the same
    output on raw activations (W_skip scaled by input over output scale)."""
    spec = SaeSpec(architecture="topk", k=4, kind="skip_transcoder")
    model = arch.build(spec, D, d_sae=64)
    x, target = _mapping()(64, 4)
    in_scale, out_scale = 0.4, 2.5
    params = model.init_params(jax.random.key(0), jnp.asarray(x * in_scale), target * out_scale)
    params["W_skip"] = jnp.asarray(np.random.default_rng(5).normal(size=(D, D)), jnp.float32)
    trained = token_norm.encode_decode(model, params, jnp.asarray(x * in_scale))[1] / out_scale
    folded = saelens.fold_input_scale(jax.tree.map(np.asarray, params), in_scale, out_scale)
    raw = token_norm.encode_decode(model, folded, jnp.asarray(x))[1]
    np.testing.assert_allclose(raw, trained, rtol=1e-4, atol=1e-4)


def test_transcoder_settings_are_checked():
    with pytest.raises(ConfigError, match="normalize_tokens is for SAEs, not transcoders"):
        SaeSpec(kind="transcoder", architecture="topk", normalize_tokens=True).validate("s")
    with pytest.raises(ConfigError, match="fit\\(\\) needs its targets"):
        sae.Trainer([SaeSpec(kind="transcoder", architecture="topk")], d_model=D).fit(
            np.ones((8, D), np.float32), steps=1
        )
    with pytest.raises(ConfigError, match="evaluating a transcoder needs its targets"):
        sae.evaluate(_fitted()["transcoder-topk"][0], np.ones((8, D), np.float32))


# --- The tiny model's MLP -------------------------------------------------------------------

LAYER = 1  # the local run's model has 2 blocks


@pytest.fixture(scope="module")
def model(local_run):
    return lm.load_backbone(str(local_run / "model"))


def _mlp_rows(backbone, shards, max_tokens: int, bos_id: int):
    """(MLP input, MLP output) rows of block LAYER over content tokens of `shards`."""

    def both(weights, token_ids, mask):
        with lm.bound_weights(backbone, weights):
            return lm.run_to_mlp(backbone, token_ids, mask, LAYER)

    forward = jax.jit(both)
    weights = lm.backbone_weights(backbone)
    inputs, outputs, tokens = [], [], 0
    for token_ids, lengths in activations.sequence_batches(token_shards.iter_sequences(shards), 32):
        mask = np.arange(token_ids.shape[1])[None, :] < lengths[:, None]
        mlp_in, mlp_out = forward(weights, token_ids, mask.astype(np.int32))
        content = activations.content_mask(token_ids, lengths, bos_id)
        inputs.append(np.asarray(mlp_in, np.float32)[content])
        outputs.append(np.asarray(mlp_out, np.float32)[content])
        tokens += int(content.sum())
        if tokens >= max_tokens:
            break
    return np.concatenate(inputs), np.concatenate(outputs)


def _true_mlp(block):
    """The block's own MLP, from its input: the transcoder a perfect one would be."""

    def mlp(_, x):
        x = x[None] if x.ndim == 2 else x  # the projections take [batch, seq, hidden]
        hidden = jax.nn.gelu(block.gating_ffw(x), approximate=True) * block.gating_ffw_2(x)
        out = block.ffw_linear(hidden)
        out = block.post_ffw_norm(out) if block.use_post_ffw_norm else out
        return out[0] if out.shape[0] == 1 and x.shape[0] == 1 else out

    return spliced.SplicedModel(mlp, {})


@pytest.mark.slow
def test_mlp_hook_reads_what_the_block_computes(model, local_run):
    tokens = manifest.read(str(local_run / "tokens"))
    token_ids, lengths = next(
        activations.sequence_batches(token_shards.iter_sequences(tokens["shards"]["eval"]), 4)
    )
    mask = (np.arange(token_ids.shape[1])[None, :] < lengths[:, None]).astype(np.int32)
    block = model.transformer_layers[LAYER]

    def run(weights):
        with lm.bound_weights(model, weights):
            entering = lm.run_to_layer(model, token_ids, mask, LAYER - 1)
            plain = block(entering, padding_mask=mask)
            with lm.mlp_hook(block, lambda _, out: out) as captured:
                hooked = block(entering, padding_mask=mask)
            recomputed = _true_mlp(block).reconstruct({}, captured["mlp_in"])
            return plain, hooked, captured["mlp_out"], recomputed

    plain, hooked, mlp_out, recomputed = jax.jit(run)(lm.backbone_weights(model))
    np.testing.assert_array_equal(np.asarray(hooked), np.asarray(plain))
    np.testing.assert_allclose(np.asarray(recomputed), np.asarray(mlp_out), rtol=1e-5, atol=1e-5)
    # The hook is gone afterwards: the block's sublayers are their classes' again.
    assert "call" not in block.pre_ffw_norm.__dict__


@pytest.mark.slow
def test_a_transcoder_replaces_the_tiny_models_mlp(model, local_run):
    """The issue's bar: on held-out tokens FVE >= 0.8 of the MLP output at L0 <= 32, and CE
    recovered >= 0.9 with the transcoder spliced in place of the MLP; the skip transcoder at
    least as well. The true MLP spliced in recovers everything (the splice is exact)."""
    tokens = manifest.read(str(local_run / "tokens"))
    bos = tokens["tokenizer"]["bos_id"]
    train_in, train_out = _mlp_rows(model, tokens["shards"]["train"], 200_000, bos)
    eval_in, eval_out = _mlp_rows(model, tokens["shards"]["eval"], 8000, bos)
    hidden = int(model.hidden_dim)
    specs = [
        SaeSpec(name=kind, architecture="topk", kind=kind, k=32, layer=LAYER, learning_rate=3e-3)
        for kind in ("transcoder", "skip_transcoder")
    ]
    fitted = sae.Trainer(specs, d_model=hidden, batch_size=1024, lr_warmup_steps=50).fit(
        train_in, steps=1500, targets=train_out
    )
    metrics = sae.evaluate(fitted, eval_in, targets=eval_out)
    fve = [m["fraction_variance_explained"] for m in metrics]
    assert all(m["l0"] <= 32 for m in metrics), metrics
    assert fve[0] >= 0.8 and fve[1] >= fve[0] - 0.01, fve

    mesh = sharding.make_mesh()
    models = [_true_mlp(model.transformer_layers[LAYER])]
    models += [spliced.sae_model(f.model, f.weights) for f in fitted]
    loss = spliced.SplicedLoss(model, LAYER, models, mesh, bos, site="mlp_out")
    sequences = token_shards.iter_sequences(tokens["shards"]["eval"])
    sums = spliced.evaluate_spliced(loss, sequences, 16, 64)
    exact, plain, skip = (sums.metrics(i) for i in range(3))
    assert exact["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-4)
    assert exact["kl_div_with_sae"] < 1e-5
    recovered = [plain["ce_loss_recovered"], skip["ce_loss_recovered"]]
    print(json.dumps({"fve": fve, "l0": [m["l0"] for m in metrics], "recovered": recovered}))
    assert recovered[0] >= 0.9 and recovered[1] >= recovered[0] - 0.01, recovered


@pytest.mark.slow
def test_the_tap_reads_mlp_sites_beside_the_residual_stream(model, local_run):
    """The block-by-block tap (MLP sites) gives the keras sub-model's residual stream and
    `run_to_mlp`'s MLP input and output."""
    tokens = manifest.read(str(local_run / "tokens"))
    token_ids, lengths = next(
        activations.sequence_batches(token_shards.iter_sequences(tokens["shards"]["eval"]), 8)
    )
    mesh = sharding.make_mesh()
    sites = [Site(LAYER, "mlp_in"), Site(LAYER, "mlp_out"), Site(LAYER)]
    mlp_in, mlp_out, resid = lm.ActivationTap(model, sites, mesh)(token_ids, lengths)
    (plain,) = lm.ActivationTap(model, [LAYER], mesh)(token_ids, lengths)
    mask = np.arange(token_ids.shape[1])[None, :] < lengths[:, None]

    def both(weights):
        with lm.bound_weights(model, weights):
            return lm.run_to_mlp(model, token_ids, mask.astype(np.int32), LAYER)

    want_in, want_out = jax.jit(both)(lm.backbone_weights(model))
    real = mask[..., None]
    for got, want in ((resid, plain), (mlp_in, want_in), (mlp_out, want_out)):
        np.testing.assert_allclose(
            np.where(real, np.asarray(got), 0), np.where(real, np.asarray(want), 0), atol=1e-5
        )


@pytest.mark.slow
def test_the_pipeline_extracts_trains_and_reports_a_transcoder(local_run, tmp_path):
    """extract stores the MLP sites beside the residual stream, train learns a skip
    transcoder and an SAE from the store in one pass, and report evaluates the transcoder on
    held-out MLP outputs and splices it in place of the MLP."""
    from jobs.cli import main

    from .conftest import reuse_run

    workdir = tmp_path / "run"
    overrides = [
        *reuse_run(local_run, workdir),
        "train.saes=[{architecture: topk, kind: skip_transcoder, layer: 1, k: 16, "
        "expansion_factor: 4}, {architecture: topk, layer: 1, k: 16, expansion_factor: 4}]",
        "train.source=store",
        "report.num_steering=2",
    ]
    assert main(["extract", *overrides]) == 0
    store = manifest.read(str(workdir / "activations"))
    assert store["sites"] == ["mlp_in.1", "mlp_out.1", "resid_post.1"]
    assert main(["train", *overrides]) == 0
    name = "skip-transcoder-topk-L1-x4-k16"
    cfg = json.loads((workdir / "sae" / name / "cfg.json").read_text())
    assert cfg["architecture"] == "topk_skip_transcoder" and cfg["d_out"] == cfg["d_in"]
    assert cfg["hook_name"] == "blocks.1.ln2.hook_normalized"
    assert cfg["hook_name_out"] == "blocks.1.hook_mlp_out"
    assert main(["report", *overrides]) == 0
    metrics = json.loads((workdir / "report" / "metrics.json").read_text())["saes"]
    transcoder, sae_metrics = metrics[name], metrics["topk-L1-x4-k16"]
    # Judged on the MLP output it predicts, spliced in place of the MLP; 60 steps train it
    # only part way (the quality bar is the test above).
    assert transcoder["fraction_variance_explained"] > 0.3
    assert 0.2 < transcoder["ce_loss_recovered"] <= 1.0
    # Zeroing one MLP's output costs far less than zeroing the whole residual stream.
    clean = transcoder["ce_loss_clean"]
    assert clean == sae_metrics["ce_loss_clean"]
    assert clean < transcoder["ce_loss_zero_ablation"] < sae_metrics["ce_loss_zero_ablation"]
    assert (workdir / "report" / name / "steering" / "vectors.safetensors").exists()
