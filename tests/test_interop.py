"""Interoperability: our SAEs in SAELens' v6 on-disk format, and Gemma Scope's params.npz in.

SAELens itself needs torch, transformer-lens and transformers (about 2 GB installed), so it
lives in its own environment (.venv-saelens, made by scripts/ensure_saelens.sh, which the
test command runs): `test_real_saelens_loads_our_exports` has the real library load every kind
we export and encode and decode the same inputs, in a subprocess. `SaeLensReference` below is
the in-process check: it re-implements what SAELens 6 (`SAE.load_from_disk`, sae_lens 6.54)
does with a directory, from its source: the v6 version gate, the config dataclass of each
architecture and its fields, the strict state-dict keys and shapes, and each architecture's
encode and decode.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import sae as sae_api
from jobs import import_sae
from sae import arch
from sae.arch import ARCHITECTURES, SaeSpec, token_norm
from sae.errors import InputError, SaeError
from sae.io import manifest, saelens, storage

D = 64  # the hidden size of the tiny model preset the local run trains (demo.hidden_dim)
WIDTH = 256
TOKENS = 128
SCALE = 0.37

# SAELens 6's inference config classes: the dataclass fields each reads from cfg.json
# (SAEConfig's, plus TopKSAEConfig's k and rescale_acts_by_decoder_norm), with defaults.
_BASE_FIELDS = {
    "d_in": None,
    "d_sae": None,
    "dtype": "float32",
    "device": "cpu",
    "apply_b_dec_to_input": True,
    "normalize_activations": "none",
    "reshape_activations": "none",
}
SAELENS_FIELDS = {
    "standard": _BASE_FIELDS,
    "jumprelu": _BASE_FIELDS,
    "topk": {**_BASE_FIELDS, "k": 100, "rescale_acts_by_decoder_norm": False},
}
SAELENS_PARAMETERS = {
    "standard": ("W_enc", "W_dec", "b_enc", "b_dec"),
    "topk": ("W_enc", "W_dec", "b_enc", "b_dec"),
    "jumprelu": ("W_enc", "W_dec", "b_enc", "b_dec", "threshold"),
}


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("-")[0].split(".")[:3])


@dataclass
class SaeLensReference:
    """An SAE as SAELens 6 loads it from disk, computed in float64 numpy."""

    architecture: str
    fields: dict
    metadata: dict
    weights: dict[str, np.ndarray]

    @classmethod
    def load_from_disk(cls, path: Path) -> SaeLensReference:
        cfg = json.loads((path / "cfg.json").read_text())
        version = cfg.get("sae_lens_version") or cfg.get("metadata", {}).get("sae_lens_version")
        # Below 6.0.0-rc.0 SAELens would treat the file as a pre-v6 config and convert it.
        assert version and _version(version) >= (6, 0, 0), version
        architecture = cfg["architecture"]
        declared = SAELENS_FIELDS[architecture]  # KeyError: SAELens has no such class
        fields = {key: cfg.get(key, default) for key, default in declared.items()}
        assert fields["d_in"] is not None and fields["d_sae"] is not None
        # "layer_norm" standardises each token at run time (below); others are not written.
        assert fields["normalize_activations"] in ("none", "layer_norm")
        assert fields["reshape_activations"] == "none"
        assert fields["dtype"] == "float32" and fields["device"] == "cpu"
        raw = load_file(str(path / "sae_weights.safetensors"))
        # load_state_dict(strict=True): exactly the module's parameters, with their shapes.
        assert sorted(raw) == sorted(SAELENS_PARAMETERS[architecture])
        d_in, d_sae = fields["d_in"], fields["d_sae"]
        expected = saelens.weight_shapes(d_in, d_sae, architecture)
        assert {k: v.shape for k, v in raw.items()} == expected
        weights = {key: value.astype(np.float64) for key, value in raw.items()}
        return cls(architecture, fields, cfg["metadata"], weights)

    def hidden_pre(self, x: np.ndarray) -> np.ndarray:
        w = self.weights
        x = x.astype(np.float64)
        if self.fields["normalize_activations"] == "layer_norm":
            # SAELens keeps the token's mean and deviation for decode (run_time_activation_ln).
            mean = x.mean(axis=-1, keepdims=True)
            std = (x - mean).std(axis=-1, ddof=1, keepdims=True)
            x = (x - mean) / (std + 1e-5)
            self.layer_norm = (mean, std)
        sae_in = x - w["b_dec"] * self.fields["apply_b_dec_to_input"]
        pre = sae_in @ w["W_enc"] + w["b_enc"]
        if self.architecture == "topk" and self.fields["rescale_acts_by_decoder_norm"]:
            pre = pre * np.linalg.norm(w["W_dec"], axis=-1)
        return pre

    def encode(self, x: np.ndarray) -> np.ndarray:
        pre = self.hidden_pre(x)
        if self.architecture == "standard":
            return np.maximum(pre, 0.0)
        if self.architecture == "jumprelu":
            return np.maximum(pre, 0.0) * (pre > self.weights["threshold"])
        k = self.fields["k"]
        top = np.argpartition(-pre, k - 1, axis=-1)[:, :k]
        latents = np.zeros_like(pre)
        np.put_along_axis(latents, top, np.maximum(np.take_along_axis(pre, top, -1), 0.0), -1)
        return latents

    def decode(self, latents: np.ndarray) -> np.ndarray:
        w_dec = self.weights["W_dec"]
        if self.architecture == "topk" and self.fields["rescale_acts_by_decoder_norm"]:
            latents = latents / np.linalg.norm(w_dec, axis=-1)
        out = latents @ w_dec + self.weights["b_dec"]
        if self.fields["normalize_activations"] == "layer_norm":
            mean, std = self.layer_norm
            out = out * std + mean
        return out

    def decided(self, x: np.ndarray, margin: float = 1e-4) -> np.ndarray:
        """Entries whose firing float32 rounding cannot flip (away from the threshold or, for
        TopK, in rows without a near tie at the k-th value)."""
        pre = self.hidden_pre(x)
        if self.architecture == "standard":
            return np.abs(pre) > margin
        if self.architecture == "jumprelu":
            return np.abs(pre - np.maximum(self.weights["threshold"], 0.0)) > margin
        k = self.fields["k"]
        ordered = -np.sort(-pre, axis=-1)
        clear = ordered[:, k - 1] - ordered[:, k] > margin
        return np.broadcast_to(clear[:, None], pre.shape)


def _inputs(seed: int = 1, n: int = TOKENS) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, D)) * 2.0 + 0.3).astype(np.float32)


def _assert_same_latents(ours: np.ndarray, reference: SaeLensReference, x: np.ndarray) -> None:
    decided = reference.decided(x)
    assert decided.mean() > 0.99  # the comparison covers nearly every entry
    expected = reference.encode(x)
    np.testing.assert_allclose(
        np.where(decided, ours, 0.0), np.where(decided, expected, 0.0), rtol=1e-4, atol=1e-4
    )
    assert np.count_nonzero(expected) > 0


OPTIONS = {
    "topk": {"k": 8},
    "batchtopk": {"k": 8},
    "matryoshka_batchtopk": {"k": 8, "matryoshka_widths": (64, 128, WIDTH)},
}


def _trained_weights(
    architecture: str, normalize_tokens: bool = False, kind: str = "sae"
) -> tuple[object, dict]:
    """An SAE as training leaves it: random non-trivial biases and thresholds (and a random
    skip for a skip transcoder)."""
    options = OPTIONS.get(architecture, {})
    spec = SaeSpec(
        architecture=architecture, normalize_tokens=normalize_tokens, kind=kind, **options
    )
    sae = arch.build(spec, D, d_sae=WIDTH)
    sample = jnp.asarray(_inputs(0) * SCALE)
    params = sae.init_params(jax.random.key(0), sample)
    rng = np.random.default_rng(2)
    params["b_enc"] = jnp.asarray(rng.normal(size=WIDTH) * 0.3, jnp.float32)
    if "log_threshold" in params:
        params["log_threshold"] = jnp.asarray(np.log(rng.uniform(0.1, 0.6, WIDTH)), jnp.float32)
    if "W_skip" in params:
        params["W_skip"] = jnp.asarray(rng.normal(size=(D, D)) * 0.1, jnp.float32)
    buffers = {"threshold": jnp.float32(0.4)} if "threshold" in sae.init_buffers() else {}
    return sae, {**params, **buffers}


def _provenance(layer: int = 1) -> saelens.Provenance:
    return saelens.Provenance(
        layer=layer,
        model_preset="/presets/gemma2_2b_en",
        model_name="gemma-2-2b",
        context_size=1024,
        dataset_path="/corpus/*.jsonl",
        training_tokens=1000,
    )


def _export(
    tmp_path: Path, architecture: str, normalize_tokens: bool = False, kind: str = "sae"
) -> tuple[Path, object, dict]:
    """What the train stage writes for one SAE (same calls as sae.training.run._export)."""
    sae, weights = _trained_weights(architecture, normalize_tokens, kind)
    exported = jax.tree.map(np.asarray, sae.export_weights(weights))
    cfg = saelens.build_config(
        sae.export_config(),
        D,
        WIDTH,
        _provenance(),
        normalize_activations="layer_norm" if normalize_tokens else "none",
        name=architecture,
        input_scale_folded=SCALE,
    )
    suffix = ("-layer-norm" if normalize_tokens else "") + ("" if kind == "sae" else f"-{kind}")
    directory = tmp_path / (architecture + suffix)
    saelens.save(str(directory), saelens.fold_input_scale(exported, SCALE), cfg)
    return directory, sae, weights


EXPECTED = {
    "relu": ("standard", {}),
    "topk": ("topk", {"k": 8, "rescale_acts_by_decoder_norm": False}),
    "batchtopk": ("jumprelu", {}),
    "matryoshka_batchtopk": ("jumprelu", {"matryoshka_widths": [64, 128, WIDTH]}),
    "jumprelu": ("jumprelu", {}),
}


@pytest.mark.parametrize("architecture", sorted(EXPECTED))
def test_export_is_saelens_v6_and_encodes_like_training(architecture, tmp_path):
    directory, sae, weights = _export(tmp_path, architecture)
    cfg = json.loads((directory / "cfg.json").read_text())
    saelens_name, extra_keys = EXPECTED[architecture]
    assert cfg["architecture"] == saelens_name and cfg["trained_as"] == architecture
    assert {k: cfg[k] for k in extra_keys} == extra_keys
    assert cfg["normalize_activations"] == "none" and cfg["apply_b_dec_to_input"] is True
    assert cfg["metadata"] == {
        "sae_lens_version": "6.0.0",
        "sae_lens_training_version": None,
        "model_name": "gemma-2-2b",
        "model_class_name": "HookedTransformer",
        "hook_name": "blocks.1.hook_resid_post",
        "hook_head_index": None,
        "context_size": 1024,
        "prepend_bos": True,
        "dataset_path": "/corpus/*.jsonl",
    }

    x = _inputs()
    trained = np.asarray(sae.encode(weights, jnp.asarray(x * SCALE)))
    loaded, params, _ = saelens.load(str(directory))
    ours = np.asarray(loaded.encode(params, jnp.asarray(x)))
    np.testing.assert_allclose(ours, trained, rtol=1e-4, atol=1e-4)

    reference = SaeLensReference.load_from_disk(directory)
    _assert_same_latents(ours, reference, x)
    reconstruction = np.asarray(loaded.decode(params, jnp.asarray(ours)))
    np.testing.assert_allclose(reconstruction, reference.decode(ours), rtol=1e-4, atol=1e-4)
    trained_reconstruction = np.asarray(sae.decode(weights, jnp.asarray(trained))) / SCALE
    np.testing.assert_allclose(reconstruction, trained_reconstruction, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("architecture", ["batchtopk", "jumprelu", "matryoshka_batchtopk", "topk"])
def test_token_standardised_export_reads_raw_activations_like_saelens_layer_norm(
    architecture, tmp_path
):
    """Trained on standardised tokens: the file says layer_norm, and both our loader and
    SAELens' run-time standardisation give training's latents and reconstruction."""
    directory, sae, weights = _export(tmp_path, architecture, normalize_tokens=True)
    cfg = json.loads((directory / "cfg.json").read_text())
    assert cfg["normalize_activations"] == "layer_norm"

    x = _inputs()
    standardized, mean, deviation = token_norm.standardize(jnp.asarray(x))
    trained = sae.encode(weights, standardized * SCALE)
    trained_reconstruction = sae.decode(weights, trained) / SCALE * deviation + mean
    loaded, params, _ = saelens.load(str(directory))
    assert loaded.normalize_tokens
    ours, reconstruction = token_norm.encode_decode(loaded, params, jnp.asarray(x))
    np.testing.assert_allclose(ours, trained, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(reconstruction, trained_reconstruction, rtol=1e-4, atol=1e-4)

    reference = SaeLensReference.load_from_disk(directory)
    _assert_same_latents(np.asarray(ours), reference, x)
    np.testing.assert_allclose(
        reconstruction, reference.decode(np.asarray(ours)), rtol=1e-4, atol=1e-4
    )


def test_load_folds_saelens_options_our_encoder_lacks(tmp_path):
    """A SAELens TopK with apply_b_dec_to_input=false and decoder-norm rescaling, and a
    JumpReLU with negative thresholds, load into weights that encode as SAELens does."""
    rng = np.random.default_rng(3)
    for architecture in ("topk", "jumprelu"):
        weights = {
            "W_enc": rng.normal(size=(D, WIDTH)) / 8,
            "W_dec": rng.normal(size=(WIDTH, D)) * rng.uniform(0.2, 3.0, (WIDTH, 1)),
            "b_enc": rng.normal(size=WIDTH) * 0.3,
            "b_dec": rng.normal(size=D),
        }
        cfg = saelens.build_config(
            {"architecture": architecture}, D, WIDTH, _provenance(), apply_b_dec_to_input=False
        )
        if architecture == "topk":
            cfg.update(k=8, rescale_acts_by_decoder_norm=True)
        else:
            weights["threshold"] = rng.uniform(-0.5, 0.5, WIDTH)
        directory = tmp_path / architecture
        weights = {k: v.astype(np.float32) for k, v in weights.items()}
        saelens.save(str(directory), weights, cfg)
        x = _inputs()
        loaded, params, loaded_cfg = saelens.load(str(directory))
        assert loaded_cfg["apply_b_dec_to_input"] is True
        ours = np.asarray(loaded.encode(params, jnp.asarray(x)))
        reference = SaeLensReference.load_from_disk(directory)
        _assert_same_latents(ours, reference, x)
        np.testing.assert_allclose(
            np.asarray(loaded.decode(params, jnp.asarray(ours))),
            reference.decode(ours),
            rtol=1e-3,
            atol=1e-3,
        )


def test_train_stage_writes_saelens_configs(local_run):
    """The real train stage's exports: v6 configs naming the model's hook and data."""
    sae_dir = local_run / "sae"
    names = sorted(manifest.read(str(sae_dir))["saes"])
    assert names == ["relu-L1-x4-c2", "topk-L1-x4-k16"]
    x = _inputs()
    for name in names:
        cfg = json.loads((sae_dir / name / "cfg.json").read_text())
        assert cfg["d_in"] == D and cfg["layer"] == 1
        assert cfg["metadata"]["hook_name"] == "blocks.1.hook_resid_post"
        assert cfg["metadata"]["model_name"] == "model"  # not a known Gemma shape
        assert cfg["metadata"]["context_size"] > 0
        assert cfg["metadata"]["dataset_path"].endswith("*.jsonl")
        reference = SaeLensReference.load_from_disk(sae_dir / name)
        loaded, params, _ = saelens.load(str(sae_dir / name))
        _assert_same_latents(np.asarray(loaded.encode(params, jnp.asarray(x))), reference, x)


# --- Gemma Scope ---------------------------------------------------------------------------


def _gemma_scope_params(d_model: int = D, seed: int = 4) -> dict[str, np.ndarray]:
    """Random weights in the published layout (W_enc [d_model, d_sae], ...), float32."""
    rng = np.random.default_rng(seed)
    return {
        "W_enc": (rng.normal(size=(d_model, WIDTH)) / 8).astype(np.float32),
        "W_dec": (rng.normal(size=(WIDTH, d_model)) / 8).astype(np.float32),
        "b_enc": (rng.normal(size=WIDTH) * 0.2).astype(np.float32),
        "b_dec": rng.normal(size=d_model).astype(np.float32),
        "threshold": rng.uniform(0.05, 0.8, WIDTH).astype(np.float32),
    }


def _gemma_scope_encode(params: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """Gemma Scope's published JumpReLU: no b_dec subtraction from the input."""
    p = {k: v.astype(np.float64) for k, v in params.items()}
    pre = x.astype(np.float64) @ p["W_enc"] + p["b_enc"]
    return np.maximum(pre, 0.0) * (pre > p["threshold"])


def _import_args(params_uri: str, preset: Path | str, out: Path | str, layer: int = 1) -> list:
    return [
        "--params",
        str(params_uri),
        "--layer",
        str(layer),
        "--model-preset",
        str(preset),
        "--out",
        str(out),
    ]


def test_gemma_scope_import_encodes_as_its_jumprelu(local_run, tmp_path):
    params = _gemma_scope_params()
    np.savez(tmp_path / "params.npz", **params)
    out = tmp_path / "sae"
    import_sae.main(_import_args(tmp_path / "params.npz", local_run / "model", out))

    name = "gemma-scope-L1-256"
    recorded = manifest.read(str(out))
    assert recorded["stage"] == "train" and list(recorded["saes"]) == [name]
    cfg = json.loads((out / name / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu" and cfg["apply_b_dec_to_input"] is False
    assert cfg["layer"] == 1 and cfg["model_preset"] == str(local_run / "model")
    assert cfg["metadata"]["hook_name"] == "blocks.1.hook_resid_post"
    assert cfg["imported_from"]["uri"] == str(tmp_path / "params.npz")

    x = _inputs()
    expected = _gemma_scope_encode(params, x)
    loaded, weights, loaded_cfg = saelens.load(str(out / name))
    assert type(loaded) is ARCHITECTURES["jumprelu"]
    ours = np.asarray(loaded.encode(weights, jnp.asarray(x)))
    reference = SaeLensReference.load_from_disk(out / name)
    _assert_same_latents(ours, reference, x)  # SAELens reads it as Gemma Scope computes it
    decided = reference.decided(x)
    np.testing.assert_allclose(
        np.where(decided, reference.encode(x), 0), np.where(decided, expected, 0)
    )
    np.testing.assert_allclose(
        np.asarray(loaded.decode(weights, jnp.asarray(ours))),
        ours @ params["W_dec"] + params["b_dec"],
        rtol=1e-4,
        atol=1e-4,
    )
    # Published weights are kept bit for bit.
    stored = load_file(str(out / name / "sae_weights.safetensors"))
    assert all(np.array_equal(stored[k], params[k]) for k in params)
    saelens.check_model_dim(loaded_cfg, D, name, "the tiny model")


def test_gemma_scope_import_from_and_to_gcs(local_run, tmp_path, gcs_bucket_uri):
    buffer_path = tmp_path / "params.npz"
    np.savez(buffer_path, **_gemma_scope_params())
    params_uri = storage.join(gcs_bucket_uri, "layer_1", "params.npz")
    storage.write_bytes(params_uri, buffer_path.read_bytes())
    out = storage.join(gcs_bucket_uri, "run", "sae")
    import_sae.main(_import_args(params_uri, local_run / "model", out) + ["--name", "gs-L1"])
    loaded, weights, cfg = saelens.load(storage.join(out, "gs-L1"))
    assert cfg["imported_from"]["uri"] == params_uri
    x = _inputs()
    reference_params = _gemma_scope_params()
    ours = np.asarray(loaded.encode(weights, jnp.asarray(x)))
    margin = np.abs(
        x.astype(np.float64) @ reference_params["W_enc"]
        + reference_params["b_enc"]
        - reference_params["threshold"]
    )
    decided = margin > 1e-4
    np.testing.assert_allclose(
        np.where(decided, ours, 0),
        np.where(decided, _gemma_scope_encode(reference_params, x), 0),
        rtol=1e-4,
        atol=1e-4,
    )


def _gemma_scope_2_folder(
    folder: Path, params: dict[str, np.ndarray], hook: str = "model.layers.1.output", **cfg
) -> Path:
    """A Gemma Scope 2 SAE as published: config.json + params.safetensors, lowercase keys."""
    folder.mkdir(parents=True)
    config = {"architecture": "jump_relu", "hf_hook_point_in": hook, **cfg}
    (folder / "config.json").write_text(json.dumps(config))
    save_file({k.lower(): v for k, v in params.items()}, str(folder / "params.safetensors"))
    return folder


def test_gemma_scope_2_import_encodes_as_its_jumprelu(local_run, tmp_path):
    params = _gemma_scope_params(seed=5)
    folder = _gemma_scope_2_folder(tmp_path / "resid_post" / "layer_1_width_256_l0_small", params)
    out = tmp_path / "sae"
    import_sae.main(_import_args(folder, local_run / "model", out))
    name = "gemma-scope-L1-256"
    cfg = json.loads((out / name / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu" and cfg["apply_b_dec_to_input"] is False
    assert cfg["imported_from"]["format"] == "gemma-scope-2 params.safetensors"
    assert cfg["metadata"]["hook_name"] == "blocks.1.hook_resid_post"
    stored = load_file(str(out / name / "sae_weights.safetensors"))
    assert sorted(stored) == sorted(params)
    assert all(np.array_equal(stored[k], params[k]) for k in params)
    x = _inputs()
    loaded, weights, _ = saelens.load(str(out / name))
    reference = SaeLensReference.load_from_disk(out / name)
    decided = reference.decided(x)
    np.testing.assert_allclose(
        np.where(decided, np.asarray(loaded.encode(weights, jnp.asarray(x))), 0),
        np.where(decided, _gemma_scope_encode(params, x), 0),
        rtol=1e-4,
        atol=1e-4,
    )
    # The params file itself names the same SAE.
    again = tmp_path / "again"
    import_sae.main(_import_args(folder / "params.safetensors", local_run / "model", again))
    assert load_file(str(again / name / "sae_weights.safetensors")).keys() == stored.keys()


def _gemma_scope_2_transcoder(folder: Path, seed: int = 7) -> tuple[Path, dict]:
    """A Gemma Scope 2 skip transcoder of block 1's MLP, as published."""
    params = _gemma_scope_params(seed=seed)
    skip = (np.random.default_rng(seed).normal(size=(D, D)) * 0.1).astype(np.float32)
    published = {**params, "affine_skip_connection": skip}  # [d_in, d_out]
    _gemma_scope_2_folder(
        folder,
        published,
        "model.layers.1.pre_feedforward_layernorm.output",
        hf_hook_point_out="model.layers.1.post_feedforward_layernorm.output",
        affine_connection=True,
    )
    return folder, published


def test_gemma_scope_2_transcoder_imports_as_a_jumprelu_skip_transcoder(local_run, tmp_path):
    folder, published = _gemma_scope_2_transcoder(tmp_path / "transcoder_all" / "layer_1")
    out = tmp_path / "sae"
    import_sae.main(_import_args(folder, local_run / "model", out))
    name = "gemma-scope-skip-transcoder-L1-256"
    cfg = json.loads((out / name / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu_skip_transcoder" and cfg["d_out"] == D
    assert cfg["hook_name_out"] == "blocks.1.hook_mlp_out"
    loaded = sae_api.load_sae(str(out / name))
    x = _inputs()
    pre = x.astype(np.float64) @ published["W_enc"] + published["b_enc"]
    latents = np.maximum(pre, 0) * (pre > published["threshold"])
    expected = latents @ published["W_dec"] + published["b_dec"]
    expected += x @ published["affine_skip_connection"]
    decided = np.all(np.abs(pre - published["threshold"]) > 1e-4, axis=1)
    assert decided.mean() > 0.5
    np.testing.assert_allclose(
        loaded.reconstruct(x)[decided], expected[decided], rtol=1e-4, atol=1e-4
    )


def test_bad_gemma_scope_2_folders_are_refused_in_one_line(local_run, tmp_path):
    params = _gemma_scope_params()
    preset, out = local_run / "model", tmp_path / "sae"
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "params.safetensors").write_bytes(b"not safetensors")
    cases = {
        "layer 3": (
            _gemma_scope_2_folder(tmp_path / "l3", params, "model.layers.3.output"),
            "--layer 1, but",
        ),
        "attention output": (
            _gemma_scope_2_folder(
                tmp_path / "attn", params, "model.layers.1.self_attn.o_proj.input"
            ),
            "reads model.layers.1.self_attn.o_proj.input; only residual-stream SAEs",
        ),
        "transcoder across blocks": (
            _gemma_scope_2_folder(
                tmp_path / "tc",
                params,
                "model.layers.1.pre_feedforward_layernorm.output",
                hf_hook_point_out="model.layers.2.post_feedforward_layernorm.output",
            ),
            "only transcoders from a block's pre_feedforward_layernorm.output to its",
        ),
        "skip on a residual SAE": (
            _gemma_scope_2_folder(
                tmp_path / "skip", {**params, "affine_skip_connection": np.eye(D, dtype=np.float32)}
            ),
            "affine_skip_connection in a residual-stream SAE",
        ),
        "other architecture": (
            _gemma_scope_2_folder(tmp_path / "topk", params, architecture="topk"),
            "architecture 'topk', expected 'jump_relu'",
        ),
        "unreadable": (junk, "is not a readable safetensors file"),
        "empty folder": (tmp_path / "nothing", "no Gemma Scope SAE at"),
        "missing key": (
            _gemma_scope_2_folder(tmp_path / "nothr", _drop("threshold")(params)),
            "missing 'threshold'",
        ),
    }
    for case, (folder, fragment) in cases.items():
        try:
            _assert_refused(_import_args(folder, preset, out), fragment, out)
        except AssertionError as error:
            raise AssertionError(f"{case}: {error}") from None


def _drop(key):
    return lambda p: {k: v for k, v in p.items() if k != key}


BAD_PARAMS = {
    "missing key": (_drop("threshold"), "missing 'threshold'"),
    "transposed decoder": (
        lambda p: {**p, "W_dec": p["W_dec"].T.copy()},
        "W_dec has shape [64, 256], expected [256, 64]",
    ),
    "short bias": (lambda p: {**p, "b_dec": p["b_dec"][:10]}, "b_dec has shape [10], expected"),
    "vector encoder": (lambda p: {**p, "W_enc": p["b_enc"]}, "W_enc has shape [256], expected"),
    "non-finite": (
        lambda p: {**p, "W_enc": np.where(np.eye(D, WIDTH) > 0, np.nan, p["W_enc"])},
        "W_enc has 64 non-finite values",
    ),
    "extra array": (lambda p: {**p, "scaling_factor": np.ones(WIDTH)}, "'scaling_factor'"),
    "integer weights": (
        lambda p: {**p, "b_enc": np.zeros(WIDTH, np.int32)},
        "b_enc has dtype int32",
    ),
}


def _assert_refused(args: list, fragment: str, out: Path) -> None:
    with pytest.raises(SaeError) as raised:
        import_sae.main(args)
    message = str(raised.value)
    assert fragment in message, message
    assert "\n" not in message
    assert not out.exists()  # nothing written


@pytest.mark.parametrize("case", sorted(BAD_PARAMS))
def test_bad_gemma_scope_params_are_refused_in_one_line(case, local_run, tmp_path):
    change, fragment = BAD_PARAMS[case]
    np.savez(tmp_path / "params.npz", **change(_gemma_scope_params()))
    out = tmp_path / "sae"
    _assert_refused(_import_args(tmp_path / "params.npz", local_run / "model", out), fragment, out)


def test_bad_import_arguments_are_refused_in_one_line(local_run, tmp_path):
    np.savez(tmp_path / "wide.npz", **_gemma_scope_params(d_model=96))
    np.savez(tmp_path / "params.npz", **_gemma_scope_params())
    (tmp_path / "junk.npz").write_bytes(b"not a zip file")
    preset, out = local_run / "model", tmp_path / "sae"
    cases = [
        (_import_args(tmp_path / "wide.npz", preset, out), "reads d_model=96 but the model at"),
        (_import_args(tmp_path / "params.npz", preset, out, layer=5), "layer 5 is out of range"),
        (_import_args(tmp_path / "missing.npz", preset, out), "no Gemma Scope params at"),
        (_import_args(tmp_path / "junk.npz", preset, out), "is not a readable .npz file"),
        (_import_args(tmp_path / "params.npz", tmp_path, out), "no keras-hub preset at"),
    ]
    for args, fragment in cases:
        _assert_refused(args, fragment, out)


def test_import_never_mixes_into_a_training_run(local_run, tmp_path):
    np.savez(tmp_path / "params.npz", **_gemma_scope_params())
    trained = local_run / "sae"
    before = sorted(p.name for p in trained.iterdir())
    with pytest.raises(InputError, match="holds a train output; import elsewhere"):
        import_sae.main(_import_args(tmp_path / "params.npz", local_run / "model", trained))
    assert sorted(p.name for p in trained.iterdir()) == before


def test_imports_accumulate_for_one_model_only(local_run, tmp_path):
    np.savez(tmp_path / "params.npz", **_gemma_scope_params())
    out = tmp_path / "sae"
    for name in ("first", "second"):
        args = _import_args(tmp_path / "params.npz", local_run / "model", out)
        import_sae.main([*args, "--name", name])
    assert sorted(manifest.read(str(out))["saes"]) == ["first", "second"]
    other = tmp_path / "other-model"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"config": {"num_layers": 2, "hidden_dim": D}}))
    args = [*_import_args(tmp_path / "params.npz", other, out), "--name", "third"]
    with pytest.raises(InputError, match="holds SAEs of the model at"):
        import_sae.main(args)
    assert not (out / "third").exists()


def test_model_dim_check_is_one_line():
    with pytest.raises(InputError) as raised:
        saelens.check_model_dim({"d_in": 2304}, 64, "gemma-scope-L1-16k", "/presets/tiny")
    assert str(raised.value) == (
        "the SAE gemma-scope-L1-16k reads d_model=2304 but the model at /presets/tiny has "
        "hidden size 64"
    )


def test_report_runs_on_an_imported_sae(local_run, tmp_path):
    """Evaluation, the feature report and steering vectors on an imported SAE."""
    from jobs.cli import main

    from .conftest import reuse_run

    workdir = tmp_path / "run"
    overrides = reuse_run(local_run, workdir)
    np.savez(tmp_path / "params.npz", **_gemma_scope_params())
    import_sae.main(_import_args(tmp_path / "params.npz", local_run / "model", workdir / "sae"))
    assert main(["report", *overrides]) == 0
    report = workdir / "report" / "gemma-scope-L1-256"
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["l0"] > 0
    assert (report / "steering" / "vectors.safetensors").exists()


# --- The real SAELens ------------------------------------------------------------------------

_SAELENS_SCRIPT = """
import json, sys
import numpy as np, torch
from sae_lens import SAE
jobs = json.loads(sys.argv[1])
loaded = {}
for job in jobs:
    sae = SAE.load_from_disk(job["dir"])
    with torch.no_grad():
        x = torch.from_numpy(np.load(job["x"]))
        latents = sae.encode(x)
        reconstruction = sae(x)  # a skip transcoder's skip is in forward, not decode
    np.save(job["latents"], latents.numpy())
    np.save(job["reconstruction"], reconstruction.numpy())
    loaded[job["dir"]] = type(sae).__name__
print(json.dumps(loaded))
"""

SAELENS_CLASSES = {
    "standard": "StandardSAE",
    "topk": "TopKSAE",
    "jumprelu": "JumpReLUSAE",
    "transcoder": "Transcoder",
    "skip_transcoder": "SkipTranscoder",
    "jumprelu_transcoder": "JumpReLUTranscoder",
    "jumprelu_skip_transcoder": "JumpReLUSkipTranscoder",
}
# Every architecture as both transcoder kinds, except TopK: SAELens has no TopK transcoder.
TRANSCODERS = [
    (architecture, kind)
    for architecture in ("batchtopk", "jumprelu", "matryoshka_batchtopk", "relu")
    for kind in ("transcoder", "skip_transcoder")
]


def _saelens_python() -> str:
    """GEMMA_SAE_SAELENS_PYTHON, else .venv-saelens' Python. The test command installs it;
    elsewhere (Cloud Build's test step in the CPU image) the test skips, except under CI=true."""
    named = os.environ.get("GEMMA_SAE_SAELENS_PYTHON")
    python = Path(named) if named else Path(__file__).parents[1] / ".venv-saelens/bin/python"
    if not python.exists():
        message = f"needs `bash scripts/ensure_saelens.sh`: no Python with sae-lens at {python}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return str(python)


def _decided(directory: Path, loaded, params, x: np.ndarray) -> np.ndarray:
    """Entries away from the firing boundary; for transcoders (which SaeLensReference does
    not model) from our own pre-activations, which SAELens computes the same way."""
    if not loaded.transcoder:
        return SaeLensReference.load_from_disk(directory).decided(x)
    pre = np.asarray(loaded.pre_activations(params, jnp.asarray(x)), np.float64)
    threshold = np.maximum(params["threshold"], 0.0) if "threshold" in params else 0.0
    return np.abs(pre - threshold) > 1e-4


def test_real_saelens_loads_our_exports(tmp_path):
    """Every kind we export, SAEs with and without token standardisation and transcoders
    with and without a skip, and Gemma Scope 1 and 2 imports (a Gemma Scope 2 skip
    transcoder among them): SAELens 6.54 loads each into
    the class its cfg.json names, and its encode and forward of the same raw activations match
    ours to float32 tolerance."""
    python = _saelens_python()
    x = _inputs()
    np.save(tmp_path / "x.npy", x)
    directories = [
        _export(tmp_path, architecture, normalize_tokens)[0]
        for architecture in sorted(EXPECTED)
        for normalize_tokens in (False, True)
    ]
    directories += [_export(tmp_path, arch_, kind=kind)[0] for arch_, kind in TRANSCODERS]
    np.savez(tmp_path / "params.npz", **_gemma_scope_params())
    preset = tmp_path / "preset"
    preset.mkdir()
    (preset / "config.json").write_text(json.dumps({"config": {"num_layers": 2, "hidden_dim": D}}))
    import_sae.main(_import_args(tmp_path / "params.npz", preset, tmp_path / "imported"))
    directories.append(tmp_path / "imported" / "gemma-scope-L1-256")
    folder = _gemma_scope_2_folder(tmp_path / "gs2" / "layer_1", _gemma_scope_params(seed=6))
    import_sae.main(
        _import_args(folder, preset, tmp_path / "imported", layer=1) + ["--name", "gs2"]
    )
    directories.append(tmp_path / "imported" / "gs2")
    folder, _ = _gemma_scope_2_transcoder(tmp_path / "gs2-transcoder" / "layer_1")
    import_sae.main(_import_args(folder, preset, tmp_path / "imported") + ["--name", "gs2-tc"])
    directories.append(tmp_path / "imported" / "gs2-tc")
    jobs = [
        {
            "dir": str(d),
            "x": str(tmp_path / "x.npy"),
            "latents": str(d / "saelens-latents.npy"),
            "reconstruction": str(d / "saelens-reconstruction.npy"),
        }
        for d in directories
    ]
    result = subprocess.run(
        [python, "-c", _SAELENS_SCRIPT, json.dumps(jobs)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    classes = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(classes.values()) == set(SAELENS_CLASSES.values())
    for directory in directories:
        cfg = json.loads((directory / "cfg.json").read_text())
        assert classes[str(directory)] == SAELENS_CLASSES[cfg["architecture"]], directory.name
        loaded, params, _ = saelens.load(str(directory))
        ours, reconstruction = token_norm.encode_decode(loaded, params, jnp.asarray(x))
        theirs = np.load(directory / "saelens-latents.npy")
        # Entries whose firing float32 rounding could flip are left out (under 1%).
        decided = _decided(directory, loaded, params, x)
        assert decided.mean() > 0.99 and np.count_nonzero(theirs) > 0, directory.name
        np.testing.assert_allclose(
            np.where(decided, ours, 0),
            np.where(decided, theirs, 0),
            rtol=1e-4,
            atol=1e-4,
            err_msg=directory.name,
        )
        # Their decode of their latents against ours of ours: the whole round trip.
        np.testing.assert_allclose(
            np.asarray(reconstruction),
            np.load(directory / "saelens-reconstruction.npy"),
            rtol=1e-3,
            atol=1e-3,
            err_msg=directory.name,
        )
