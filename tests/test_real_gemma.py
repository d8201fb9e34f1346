"""The real Gemma 3 270M through the pipeline's parts, in minutes: the GGUF that
scripts/ensure_gguf.sh installs (dequantized from 4-5 bits, so close to google/gemma-3-270m but
not identical) converts into a keras-hub preset, keras-hub's logits and the tap's residual
stream match transformers' on real text, and an SAE trains on the real activations and is
spliced in with finite metrics. Bad model sources fail in one line before any model work."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

import sae
from sae import sharding
from sae.data.activations import content_mask
from sae.errors import InputError
from sae.io import model_sources, presets
from sae.model import lm, spliced

ROOT = Path(__file__).resolve().parent.parent
GGUF = ROOT / "data" / "gemma-3-270m-Q4_K_M.gguf"
WIKI = ROOT / "data" / "wikipedia-en.jsonl"
LAYER, LENGTH = 6, 64

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def _needs_the_gguf_environment() -> None:
    """scripts/test.sh installs the model and the GGUF environment; elsewhere (Cloud Build's
    test step in the CPU image, which has neither) these tests skip, except under CI=true."""
    missing = [str(p) for p in (GGUF, WIKI) if not p.exists()]
    try:
        model_sources.gguf_python()
    except InputError as error:
        missing.append(str(error))
    if missing:
        message = f"needs `bash scripts/ensure_gguf.sh`: missing {', '.join(missing)}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="module")
def preset() -> str:
    return model_sources.resolve(str(GGUF))  # converted once, then from the cache


@pytest.fixture(scope="module")
def backbone(preset):
    return lm.load_backbone(preset)


def _sequences(preset: str, count: int, length: int = LENGTH) -> tuple[np.ndarray, np.ndarray]:
    """The first `count` Wikipedia extracts long enough, BOS first, `length` tokens each."""
    processor = spm.SentencePieceProcessor(model_proto=presets.tokenizer_proto(preset))
    rows = []
    with open(WIKI) as f:
        for line in f:
            ids = [processor.bos_id(), *processor.encode(json.loads(line)["text"])]
            if len(ids) >= length:
                rows.append(ids[:length])
            if len(rows) == count:
                break
    token_ids = np.asarray(rows, np.int32)
    return token_ids, np.full(len(rows), length)


def test_the_converted_preset_is_the_gguf_model(preset):
    source = json.loads((Path(preset) / "source.json").read_text())
    sha256 = hashlib.sha256(GGUF.read_bytes()).hexdigest()
    assert source["sha256"] == sha256 and Path(preset).name == f"gguf-{sha256}"
    config = presets.backbone_config(preset)
    assert (config["num_layers"], config["hidden_dim"]) == (18, 640)
    # A second resolve finds the cached preset.
    assert model_sources.resolve(str(GGUF)) == preset


def test_logits_and_residual_stream_match_transformers(preset, backbone, tmp_path):
    token_ids, lengths = _sequences(preset, 4)
    np.save(tmp_path / "tokens.npy", token_ids)
    model_sources.run_worker(
        "reference", str(GGUF), str(tmp_path / "tokens.npy"), str(LAYER), str(tmp_path / "hf.npz")
    )
    reference = np.load(tmp_path / "hf.npz")
    tapped = lm.ActivationTap(backbone, [LAYER], sharding.make_mesh(1, 1))
    residual = np.asarray(tapped(token_ids, lengths)[0], np.float32)
    # Real statistics: a few huge dimensions and a huge BOS position; match relative to them.
    scale = np.abs(reference["residual"]).max()
    assert scale > 1e3
    np.testing.assert_allclose(residual, reference["residual"], rtol=0, atol=1e-4 * scale)
    import keras_hub

    causal_lm = keras_hub.models.Gemma3CausalLM(backbone=backbone, preprocessor=None)
    logits = np.asarray(causal_lm({"token_ids": token_ids, "padding_mask": token_ids > -1}))
    np.testing.assert_allclose(logits, reference["logits"], rtol=0, atol=2e-3)
    # A real model: the next Wikipedia token costs about 3 nats, far below uniform (12.5).
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    target = np.take_along_axis(log_probs[:, :-1], token_ids[:, 1:, None], -1)
    assert 1.5 < -target.mean() < 4.5


@pytest.mark.parametrize("normalize_tokens", [False, True])
def test_an_sae_trains_on_real_activations_and_splices(preset, backbone, normalize_tokens):
    token_ids, lengths = _sequences(preset, 48)
    tap = lm.ActivationTap(backbone, [LAYER], sharding.make_mesh(1, 1))
    stream = np.asarray(tap(token_ids, lengths)[0], np.float32)
    bos = int(token_ids[0, 0])
    mask = content_mask(token_ids, lengths, bos)
    norms = np.linalg.norm(stream, axis=-1)
    # BOS is an outlier the SAE never sees: content_mask drops it, as training does.
    assert norms[:, 0].min() > 5 * np.median(norms[mask]) and not mask[:, 0].any()
    rows = stream[mask]
    train, held_out = rows[: -len(rows) // 4], rows[-len(rows) // 4 :]
    spec = sae.SaeSpec(
        architecture="topk",
        k=32,
        expansion_factor=4,
        learning_rate=1e-3,
        normalize_tokens=normalize_tokens,
    )
    trainer = sae.Trainer([spec], d_model=640, batch_size=256, lr_warmup_steps=5)
    (topk,) = trainer.fit(train, steps=40, log_every=10)
    losses = [metrics["topk-L2-x4-k32/mse"] for _, metrics in trainer.history]
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
    metrics = sae.evaluate(topk, held_out)[0]
    assert 0.0 < metrics["fraction_variance_explained"] <= 1.0 and metrics["l0"] <= 32
    loss = spliced.SplicedLoss(
        backbone,
        LAYER,
        [spliced.sae_model(topk.model, topk.weights)],
        sharding.make_mesh(1, 1),
        bos,
        train.mean(axis=0),
    )
    result = loss(token_ids[:8], lengths[:8]).metrics(0)
    assert all(np.isfinite(v) for v in result.values() if v is not None)
    assert result["ce_loss_clean"] < result["ce_loss_with_sae"] < result["ce_loss_zero_ablation"]
    # On the real model the mean is a far stronger baseline than zeros (one huge dimension).
    assert result["ce_loss_mean_ablation"] < result["ce_loss_zero_ablation"] - 1.0


def test_bad_model_sources_fail_in_one_line_before_model_work(tmp_path):
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 a zip, not a model")
    with pytest.raises(InputError, match=r"^.*model\.gguf is not a GGUF file"):
        model_sources.resolve(str(not_gguf))
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(GGUF.read_bytes()[: 1 << 16])
    with pytest.raises(InputError, match=r"truncated\.gguf is not a readable GGUF file"):
        model_sources.resolve(str(truncated))
    with pytest.raises(InputError, match=r"^no GGUF file at .*missing\.gguf$"):
        model_sources.resolve(str(tmp_path / "missing.gguf"))
    # A well-formed GGUF of another architecture, written by the gguf package itself.
    llama = tmp_path / "llama.gguf"
    write = (
        "import sys, gguf, numpy as np; w = gguf.GGUFWriter(sys.argv[1], 'llama'); "
        "w.add_tensor('x', np.zeros(4, np.float32)); w.write_header_to_file(); "
        "w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()"
    )
    subprocess.run([str(model_sources.gguf_python()), "-c", write, str(llama)], check=True)
    with pytest.raises(InputError, match=r"llama\.gguf holds a 'llama' model; only Gemma 3"):
        model_sources.resolve(str(llama))


def test_a_hugging_face_directory_converts_to_the_same_model(preset, backbone, tmp_path):
    """keras-hub's own converter reads a local Hugging Face directory (here the one the GGUF
    dequantizes to); the cached preset it becomes is the same model."""
    hugging_face = tmp_path / "gemma-3-270m-hf"
    model_sources.run_worker("convert", str(GGUF), str(hugging_face))
    converted = model_sources.resolve(str(hugging_face))
    assert Path(converted).name.startswith("hf-") and converted != preset
    token_ids, lengths = _sequences(preset, 2)
    ours = lm.ActivationTap(lm.load_backbone(converted), [LAYER], sharding.make_mesh(1, 1))
    theirs = lm.ActivationTap(backbone, [LAYER], sharding.make_mesh(1, 1))
    np.testing.assert_array_equal(
        np.asarray(ours(token_ids, lengths)[0]), np.asarray(theirs(token_ids, lengths)[0])
    )
    # A keras-hub preset directory is used as it is.
    assert model_sources.resolve(converted) == converted
