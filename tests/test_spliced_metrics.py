"""Spliced metrics: the model re-run with a substitute at the SAE's layer. Identity and zeros
pin the ends of CE loss recovered, keras-hub's own causal LM pins the clean loss, BOS keeps its
clean activation, and the local run's SAEs land in between (and in its report)."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from sae import config, sharding
from sae.data import activations, token_shards
from sae.errors import ConfigError, InputError
from sae.io import saelens
from sae.model import lm, spliced

from .conftest import SMALL_SAES

pytestmark = pytest.mark.slow

LAYER = 1  # the SMALL run's SAEs read decoder_block_1 of its 2-layer model
IDENTITY = spliced.SplicedModel(lambda p, x: x, {})
ZEROS = spliced.SplicedModel(lambda p, x: jnp.zeros_like(x), {})


@pytest.fixture(scope="module")
def batch(tokens):
    """Eight held-out sequences, two cut short so padding is exercised."""
    sequences = token_shards.iter_sequences(tokens["shards"]["eval"])
    token_ids, lengths = next(activations.sequence_batches(sequences, 8))
    lengths = lengths.copy()
    lengths[2], lengths[5] = 40, 1
    return token_ids, lengths


def _loss(backbone, tokens, models):
    bos = tokens["tokenizer"]["bos_id"]
    return spliced.SplicedLoss(backbone, LAYER, models, sharding.make_mesh(), bos)


def _reference_ce(backbone, token_ids, lengths) -> float:
    """Mean next-token CE from keras-hub's GemmaCausalLM forward, in float64 numpy."""
    import keras_hub

    causal_lm = keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=None)
    mask = np.arange(token_ids.shape[1])[None, :] < lengths[:, None]
    logits = np.asarray(causal_lm({"token_ids": token_ids, "padding_mask": mask}), np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    target = np.take_along_axis(log_probs[:, :-1], token_ids[:, 1:, None], axis=-1)[..., 0]
    scored = mask[:, :-1] & mask[:, 1:]
    return float(-(target * scored).sum() / scored.sum())


def test_identity_recovers_everything_and_zeros_nothing(backbone, tokens, batch):
    sums = _loss(backbone, tokens, [IDENTITY, ZEROS])(*batch)
    identity, zeros = sums.metrics(0), sums.metrics(1)
    # Predictions from every real token but the last of each sequence.
    assert sums.positions == int(np.sum(np.maximum(batch[1] - 1, 0)))
    assert identity["ce_loss_with_sae"] == identity["ce_loss_clean"]
    assert identity["ce_loss_recovered"] == 1.0
    assert identity["delta_lm_loss"] == 0.0
    assert abs(identity["kl_div_with_sae"]) < 1e-6
    assert zeros["ce_loss_recovered"] == 0.0
    assert zeros["ce_loss_with_sae"] == zeros["ce_loss_zero_ablation"]
    # Zero-ablating the residual stream of a trained model costs a lot.
    assert zeros["ce_loss_zero_ablation"] > identity["ce_loss_clean"] + 1.0
    assert zeros["kl_div_with_sae"] == zeros["kl_div_zero_ablation"] > 1.0


def test_mean_ablation_is_the_mean_substituted(backbone, tokens, batch):
    """The mean-ablated path is the activation replaced by the given mean (here over the
    batch's own content tokens): the same loss as a model that outputs the mean, recovery
    against it is 1 for the identity, and the models' own metrics do not change. (Whether the
    mean is a stronger baseline than zeros depends on the model: on the tiny one it is not; on
    Gemma 3 270M it is, tests/test_real_gemma.py.)"""
    token_ids, lengths = batch
    bos = tokens["tokenizer"]["bos_id"]
    tapped = lm.ActivationTap(backbone, [LAYER], sharding.make_mesh())(token_ids, lengths)[0]
    mask = activations.content_mask(token_ids, lengths, bos)
    mean = np.asarray(tapped, np.float32)[mask].mean(axis=0)
    mesh = sharding.make_mesh()
    loss = spliced.SplicedLoss(backbone, LAYER, [IDENTITY, ZEROS], mesh, bos, mean)
    sums = loss(token_ids, lengths)
    identity, zeros = sums.metrics(0), sums.metrics(1)
    as_model = spliced.SplicedLoss(backbone, LAYER, [spliced.mean_model(mean)], mesh, bos)
    substituted = as_model(token_ids, lengths).metrics(0)
    assert identity["ce_loss_mean_ablation"] == pytest.approx(substituted["ce_loss_with_sae"])
    assert identity["kl_div_mean_ablation"] == pytest.approx(substituted["kl_div_with_sae"])
    assert identity["ce_loss_recovered_vs_mean_ablation"] == 1.0
    assert identity["ce_loss_clean"] < identity["ce_loss_mean_ablation"]
    plain = _loss(backbone, tokens, [IDENTITY, ZEROS])(token_ids, lengths).metrics(1)
    assert zeros["ce_loss_with_sae"] == pytest.approx(plain["ce_loss_with_sae"], rel=1e-6)
    assert "ce_loss_mean_ablation" not in plain


def test_clean_loss_is_keras_hub_causal_lm_loss(backbone, tokens, batch):
    clean = _loss(backbone, tokens, [IDENTITY])(*batch).metrics(0)["ce_loss_clean"]
    assert clean == pytest.approx(_reference_ce(backbone, *batch), rel=1e-5)


def test_spliced_activation_is_the_tapped_one(backbone, batch):
    """The SAE is applied to what ActivationTap gave it in training, not a neighbouring layer."""
    import jax

    token_ids, lengths = batch
    mask = (np.arange(token_ids.shape[1])[None, :] < lengths[:, None]).astype(np.int32)

    def tapped(weights):
        with lm.bound_weights(backbone, weights):
            return lm.run_to_layer(backbone, token_ids, mask, LAYER)

    ours = jax.jit(tapped)(lm.backbone_weights(backbone))
    tap = lm.ActivationTap(backbone, [LAYER], sharding.make_mesh())(token_ids, lengths)[0]
    np.testing.assert_allclose(np.asarray(ours), np.asarray(tap), rtol=1e-5, atol=1e-5)


def test_bos_keeps_its_clean_activation(backbone, tokens):
    """Two-token sequences score one prediction, from position 0: zero ablation leaves it
    alone when that position is BOS, and changes it when it is an ordinary token."""
    bos = tokens["tokenizer"]["bos_id"]
    token_ids = np.full((8, 16), 0, np.int32)
    token_ids[:, 1] = 40
    token_ids[:4, 0] = bos
    token_ids[4:, 0] = 41
    lengths = np.full(8, 2, np.int32)
    loss = _loss(backbone, tokens, [ZEROS])
    from_bos = loss(token_ids[:4].repeat(2, axis=0), lengths)
    from_word = loss(token_ids[4:].repeat(2, axis=0), lengths)
    assert from_bos.positions == from_word.positions == 8
    assert from_bos.ce[1] == from_bos.ce[0]
    assert from_bos.kl[1] == 0.0
    assert from_word.kl[1] > 0.1


def test_chunked_logits_equal_one_chunk(backbone, tokens, batch, monkeypatch):
    whole = _loss(backbone, tokens, [ZEROS])(*batch)
    # 3 positions per chunk: 127 predicted positions in 43 chunks, the last one padded.
    monkeypatch.setattr(spliced, "LOGITS_BUDGET", 3 * 3 * 8 * backbone.vocabulary_size)
    chunked = _loss(backbone, tokens, [ZEROS])(*batch)
    assert chunked.positions == whole.positions
    np.testing.assert_allclose(chunked.ce, whole.ce, rtol=1e-5)
    np.testing.assert_allclose(chunked.kl, whole.kl, rtol=1e-5, atol=1e-3)


def test_trained_saes_recover_most_of_the_loss_and_report_it(local_run, backbone, tokens):
    models = [spliced.sae_model(*saelens.load(str(local_run / "sae" / n))[:2]) for n in SMALL_SAES]
    loss = _loss(backbone, tokens, models)
    count = config.ReportConfig().spliced_sequences
    sequences = token_shards.iter_sequences(tokens["shards"]["eval"])
    sums = spliced.evaluate_spliced(loss, sequences, config.TrainConfig().lm_batch_size, count)
    for i, name in enumerate(SMALL_SAES):
        metrics = sums.metrics(i)
        assert 0.0 < metrics["ce_loss_recovered"] < 1.0
        assert metrics["delta_lm_loss"] > 0.0
        assert 0.0 < metrics["kl_div_with_sae"] < metrics["kl_div_zero_ablation"]
        # The report stage ran the same evaluation for this SAE on the same sequences.
        report = json.loads((local_run / "report" / name / "metrics.json").read_text())
        for key, value in metrics.items():
            assert report[key] == pytest.approx(value, rel=1e-5), key


def test_bad_spliced_settings_fail_with_one_line():
    with pytest.raises(ConfigError, match="report.spliced_sequences must not be negative"):
        config.load(None, ["report.spliced_sequences=-1"])
    with pytest.raises(InputError, match="GemmaBackbone"):
        lm.check_gemma(object())


def test_recovery_is_undefined_when_the_ablation_costs_nothing():
    """On text far from the model's training data the zero ablation once scored below the clean
    run (7.19 < 9.58 nats) and CE recovered came out 1.05, a "perfect" score: a ratio whose
    ablation is not clearly worse than the clean run is undefined and says why."""
    positions = 10
    # Paths: clean, zero ablation, mean ablation, the SAE (summed over 10 positions).
    far = spliced.SplicedSums(positions, np.array([95.8, 71.9, 96.3, 97.0]), np.zeros(4), True)
    metrics = far.metrics(0)
    assert metrics["ce_loss_recovered"] is None
    # The mean ablation costs 0.05 nats: below the gap, undefined too.
    assert metrics["ce_loss_recovered_vs_mean_ablation"] is None
    assert metrics["delta_lm_loss"] == pytest.approx(0.12)
    warnings = spliced.recovery_warnings(metrics)
    assert len(warnings) == 2
    assert warnings[0].startswith("ce_loss_recovered undefined: the zero-ablated CE loss 7.19")
    assert "ce_loss_recovered_vs_mean_ablation undefined" in warnings[1]
    near = spliced.SplicedSums(positions, np.array([95.8, 105.8, 98.8, 96.8]), np.zeros(4), True)
    metrics = near.metrics(0)
    assert metrics["ce_loss_recovered"] == pytest.approx(0.9)
    assert metrics["ce_loss_recovered_vs_mean_ablation"] == pytest.approx(2 / 3)
    assert spliced.recovery_warnings(metrics) == []
