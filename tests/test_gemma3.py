"""Gemma 3 (keras-hub Gemma3Backbone, text only): the block-by-block forward, the spliced loss
and steered generation match keras-hub's own model, at float32, on a random tiny Gemma 3 with
both kinds of layer (sliding-window local attention with RoPE base 10k, global attention with
RoPE base 1M), QK norm, and sequences longer than the sliding window."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sae import sharding
from sae.demo import tiny_model
from sae.demo.corpus import generate_documents
from sae.errors import InputError
from sae.model import lm, spliced

VOCAB, WINDOW, LAYERS = 256, 6, 6
EOS = tiny_model.EOS_ID


@pytest.fixture(scope="module")
def backbone():
    import keras
    import keras_hub

    keras.utils.set_random_seed(0)
    return keras_hub.models.Gemma3Backbone(
        vocabulary_size=VOCAB,
        image_size=None,
        num_layers=LAYERS,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=32,
        intermediate_dim=64,
        head_dim=16,
        use_sliding_window_attention=True,
        sliding_window_size=WINDOW,
        vision_encoder=None,
        dtype="float32",
    )


@pytest.fixture(scope="module")
def causal_lm(backbone):
    import keras_hub

    return keras_hub.models.Gemma3CausalLM(backbone=backbone, preprocessor=None)


def _tokens(batch: int = 3, length: int = 20) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    token_ids = rng.integers(4, VOCAB, size=(batch, length)).astype(np.int32)
    token_ids[:, 0] = tiny_model.BOS_ID
    lengths = np.array([length, 13, 9][:batch])
    return token_ids, lengths


def _mask(token_ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    return np.arange(token_ids.shape[1])[None, :] < lengths[:, None]


def test_the_tiny_model_has_both_kinds_of_layer(backbone):
    kinds = [
        (b.attention.use_sliding_window_attention, b.attention.rope_wavelength)
        for b in backbone.transformer_layers
    ]
    assert kinds[:5] == [(True, 10_000.0)] * 5 and kinds[5] == (False, 1_000_000.0)
    assert backbone.use_query_key_norm
    lm.check_gemma(backbone)


def test_block_by_block_forward_matches_the_backbone(backbone, causal_lm):
    token_ids, lengths = _tokens()
    mask = _mask(token_ids, lengths)
    weights = lm.backbone_weights(backbone)

    @jax.jit
    def piecewise(weights, token_ids, mask):
        with lm.bound_weights(backbone, weights):
            streams = [lm.run_to_layer(backbone, token_ids, mask, 0)]
            for layer in range(1, LAYERS):
                streams.append(lm.run_blocks(backbone, streams[-1], mask, layer, layer + 1))
            return streams, lm.final_logits(backbone, streams[-1])

    streams, logits = piecewise(weights, token_ids, mask)
    tapped = lm.ActivationTap(backbone, list(range(LAYERS)), sharding.make_mesh(1, 1))
    for layer, (ours, theirs) in enumerate(zip(streams, tapped(token_ids, lengths), strict=True)):
        np.testing.assert_allclose(
            np.asarray(ours)[mask], np.asarray(theirs)[mask], rtol=1e-5, atol=1e-5, err_msg=layer
        )
    expected = causal_lm({"token_ids": token_ids, "padding_mask": mask})
    np.testing.assert_allclose(
        np.asarray(logits)[mask], np.asarray(expected)[mask], rtol=1e-4, atol=1e-4
    )


def test_spliced_loss_of_the_identity_is_the_clean_loss(backbone, causal_lm):
    token_ids, lengths = _tokens()
    identity = spliced.SplicedModel(lambda p, x: x, {})
    zeros = spliced.SplicedModel(lambda p, x: jnp.zeros_like(x), {})
    loss = spliced.SplicedLoss(
        backbone, 2, [identity, zeros], sharding.make_mesh(1, 1), tiny_model.BOS_ID
    )
    metrics = loss(token_ids, lengths).metrics(0)
    assert metrics["ce_loss_with_sae"] == metrics["ce_loss_clean"]
    assert abs(metrics["kl_div_with_sae"]) < 1e-6
    assert metrics["kl_div_zero_ablation"] > 0
    # The clean loss is keras-hub's Gemma3CausalLM's own next-token cross-entropy.
    mask = _mask(token_ids, lengths)
    logits = np.asarray(causal_lm({"token_ids": token_ids, "padding_mask": mask}), np.float64)
    log_probs = (
        logits
        - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1))[..., None]
        - logits.max(-1, keepdims=True)
    )
    target = np.take_along_axis(log_probs[:, :-1], token_ids[:, 1:, None], axis=-1)[..., 0]
    scored = mask[:, :-1] & mask[:, 1:]
    reference = float(-(target * scored).sum() / scored.sum())
    assert metrics["ce_loss_clean"] == pytest.approx(reference, rel=1e-4)


@pytest.fixture(scope="module")
def generator(backbone):
    from sae.model.generation import SteeredGenerator

    proto = tiny_model.train_tokenizer(generate_documents(200, 0), VOCAB)
    return SteeredGenerator(backbone, proto)


def test_steered_generation_at_strength_zero_equals_keras_hub(generator, causal_lm):
    """Prompts longer than the sliding window, so the cached loop's local masks matter."""
    rng = np.random.default_rng(1)
    prompts = [list(rng.integers(4, VOCAB, size=n)) for n in (9, 12)]
    token_ids = np.zeros((2, 26), np.int32)
    padding_mask = np.zeros((2, 26), bool)
    for row, ids in enumerate(prompts):
        token_ids[row, : len(ids)], padding_mask[row, : len(ids)] = ids, True
    direction = np.zeros(32, np.float32)
    ours = generator.generate_ids(token_ids, padding_mask, direction, [0.0, 0.0], layer=3)
    expected = causal_lm.generate_step(
        {"token_ids": token_ids, "padding_mask": padding_mask}, stop_token_ids=[EOS]
    )
    np.testing.assert_array_equal(ours, np.asarray(expected["token_ids"]))


def test_steered_tokens_are_the_full_forwards_choice(backbone, generator):
    """With a vector added after block 3, each generated token is the argmax of the
    uncached block-by-block forward with the same vector: an independent check of the
    cache path."""
    direction = np.random.default_rng(2).normal(size=32).astype(np.float32)
    strength = 4.0
    ids = [tiny_model.BOS_ID, *np.random.default_rng(3).integers(4, VOCAB, size=8)]
    token_ids, padding_mask = generator.padded(ids, 2, 14)
    plain, steered = generator.generate_ids(
        token_ids, padding_mask, direction, [0.0, strength], layer=3
    )
    assert list(plain) != list(steered)
    vector = jnp.asarray(strength * direction)
    with lm.bound_weights(backbone, lm.backbone_weights(backbone)):
        x = lm.run_to_layer(backbone, steered[None], np.ones((1, len(steered)), bool), 3)
        x = lm.run_blocks(backbone, x + vector, np.ones((1, len(steered)), bool), 4, LAYERS)
        logits = np.asarray(lm.final_logits(backbone, x))[0]
    generated = range(len(ids), len(steered))
    stop = next((i for i in generated if steered[i] == EOS), len(steered) - 1)
    for position in range(len(ids), stop + 1):
        assert steered[position] == logits[position - 1].argmax(), position


def test_a_gemma3_with_a_vision_encoder_is_refused():
    class WithVision:
        vision_encoder = object()

    WithVision.__name__ = "Gemma3Backbone"
    with pytest.raises(InputError, match="^the model is a Gemma 3 with a vision encoder"):
        lm.check_gemma(WithVision())


@pytest.mark.slow
def test_the_demo_pipeline_runs_on_a_tiny_gemma3(tmp_path, capsys):
    """demo.model_family=gemma3: the tiny model is a Gemma3Backbone, and tokenize, train,
    the report (spliced metrics included) and steering run on it as on Gemma 2."""
    import sae
    from jobs.cli import main

    from .conftest import SMALL

    workdir = tmp_path / "run"
    args = [f"workdir={workdir}", *SMALL, "demo.model_family=gemma3"]
    assert main(["pipeline", *args, "report.spliced_sequences=16"]) == 0
    config = json.loads((workdir / "model" / "config.json").read_text())
    assert config["class_name"].endswith("Gemma3Backbone")
    metrics = json.loads((workdir / "report" / "metrics.json").read_text())["saes"]
    topk = metrics["topk-L1-x4-k16"]
    assert topk["fraction_variance_explained"] > 0.6
    assert topk["ce_loss_recovered"] > 0.8
    assert 0 < topk["kl_div_with_sae"] < topk["kl_div_zero_ablation"]
    topk_sae = sae.load_sae(str(workdir / "sae" / "topk-L1-x4-k16"))
    plain, steered = sae.steer(topk_sae, 0, "Once upon a time", [40.0], max_new_tokens=12)
    assert steered.strength == 40.0 and steered.new_ids != plain.new_ids


def test_gemma4_is_refused_with_what_it_needs():
    """Gemma 4's blocks take per-layer inputs, shared K/V and position ids: not supported yet
    (README, Models), and both entry points say so in one line."""
    import keras_hub

    gemma4 = keras_hub.models.Gemma4Backbone(
        vocabulary_size=64,
        image_size=None,
        num_layers=2,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=16,
        intermediate_dim=32,
        head_dim=8,
    )
    with pytest.raises(InputError, match="^the tap .* Gemma4Backbone also takes position_ids"):
        lm.ActivationTap(gemma4, [0], sharding.make_mesh(1, 1))
    with pytest.raises(InputError, match="^the model is a Gemma4Backbone; running it block by"):
        lm.check_gemma(gemma4)
