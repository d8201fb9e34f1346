"""Feature analysis for the report: histograms, quantile samples, logit effects, the JSON
export against its schema, the dashboard's escaping, and the PNG plots."""

from __future__ import annotations

import io
import json
from html.parser import HTMLParser
from pathlib import Path

import jax.numpy as jnp
import jsonschema
import numpy as np
import pytest
from PIL import Image

from sae.analysis import dashboard, feature_report, feature_stats, logit_effects, plots

from . import dashboard_data

SCHEMA = json.loads((Path(__file__).parent.parent / "docs" / "report_schema.json").read_text())


@pytest.fixture(scope="module")
def synthetic() -> dashboard_data.Synthetic:
    return dashboard_data.build()


@pytest.fixture(scope="module")
def report(synthetic, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("report")
    dashboard_data.write_report(synthetic, str(output))
    return output


def _firings(synthetic, index: int) -> np.ndarray:
    """Every held-out activation of one latent, recomputed densely."""
    values = np.concatenate([latents[:, index] for latents in synthetic.latents])
    return values[values > 0]


def test_histograms_add_up_to_the_fire_counts_and_match_numpy(synthetic):
    stats = synthetic.result.feature_stats
    np.testing.assert_array_equal(stats.histogram.sum(axis=1), synthetic.result.fire_counts)
    spread = 0
    for index in range(dashboard_data.D_SAE):
        firings = _firings(synthetic, index)
        expected, _ = np.histogram(firings, bins=feature_stats.EDGES)
        # Values within float rounding of a bin edge may land on either side of it.
        assert np.abs(stats.histogram[index] - expected).sum() <= 2
        assert stats.min_activations[index] == pytest.approx(firings.min(), rel=1e-4, abs=1e-4)
        spread = max(spread, np.count_nonzero(expected))
    assert spread > 16  # the synthetic activations really span many bins


def test_both_ways_of_binning_agree_including_values_on_the_edges():
    rng = np.random.default_rng(3)
    values = rng.normal(size=(300, 40)) * 10.0 ** rng.uniform(-5, 5, size=(300, 40))
    bins = feature_stats.NUM_BINS
    values[:, 0] = 0.0
    values[:bins, 0] = feature_stats.EDGES[:-1]  # exactly on every edge (and 0: inactive)
    values[: bins - 1, 1] = np.nextafter(feature_stats.EDGES[1:-1].astype(np.float32), 0)
    latents = jnp.asarray(np.maximum(values, 0), jnp.float32)
    dense = np.asarray(feature_stats.bin_counts_dense(latents))
    scatter = np.asarray(feature_stats.bin_counts_scatter(latents))
    np.testing.assert_array_equal(dense, scatter)
    np.testing.assert_array_equal(dense.sum(axis=1), np.sum(np.asarray(latents) > 0, axis=0))
    assert np.all(dense[0, 1:] == 1) and dense[0, 0] == 0  # one value starts each bin


def test_exported_histogram_is_trimmed_to_the_observed_range(synthetic):
    stats, result = synthetic.result.feature_stats, synthetic.result
    for index in range(dashboard_data.D_SAE):
        histogram = stats.histogram_of(index, float(result.max_activations[index]))
        assert len(histogram["edges"]) == len(histogram["counts"]) + 1
        assert sum(histogram["counts"]) == result.fire_counts[index]
        assert histogram["counts"][0] > 0 and histogram["counts"][-1] > 0
        assert histogram["edges"][0] == pytest.approx(float(stats.min_activations[index]))
        assert histogram["edges"][-1] == pytest.approx(float(result.max_activations[index]))
        assert np.all(np.diff(histogram["edges"]) > 0)


def test_samples_are_real_firings_without_repeats(synthetic):
    stats = synthetic.result.feature_stats
    for index in range(dashboard_data.D_SAE):
        samples = stats.samples_of(index)
        assert len(samples) == min(feature_stats.SAMPLES, synthetic.result.fire_counts[index])
        assert len({(s, p) for _, s, p in samples}) == len(samples)
        for value, sequence, position in samples:
            recomputed = synthetic.latents[sequence][position, index]
            assert value == pytest.approx(recomputed, rel=1e-4, abs=1e-4)


def test_samples_are_uniform_over_the_firings(synthetic):
    # The rank of a uniformly drawn firing among all of a feature's firings is uniform on
    # [0, 1]: pooled over features, the mean rank is 0.5 within a few standard errors (a
    # sampler favouring strong or weak firings lands far off).
    ranks = []
    for index in range(dashboard_data.D_SAE):
        firings = np.sort(_firings(synthetic, index))
        for value, _, _ in synthetic.result.feature_stats.samples_of(index):
            ranks.append(np.searchsorted(firings, value * (1 - 1e-6)) / len(firings))
    standard_error = (1 / 12 / len(ranks)) ** 0.5
    assert abs(np.mean(ranks) - 0.5) < 5 * standard_error


def test_quantile_bands_hold_their_samples_and_track_numpy_quantiles(synthetic):
    stats, result = synthetic.result.feature_stats, synthetic.result
    bin_ratio = 10 ** (1 / feature_stats.BINS_PER_DECADE)
    for index in range(dashboard_data.D_SAE):
        histogram = stats.histogram_of(index, float(result.max_activations[index]))
        samples = stats.samples_of(index)
        bands = feature_stats.quantile_bands(histogram, samples, 4)
        assert sum(len(b["samples"]) for b in bands) == len(samples)
        for band in bands:
            assert band["activation_low"] <= band["activation_high"]
            for value, _, _ in band["samples"]:
                assert band["activation_low"] <= value <= band["activation_high"]
        # Interior edges are within one bin of numpy's quantiles of all the firings.
        firings = _firings(synthetic, index)
        for band in bands[1:]:
            true = np.quantile(firings, band["quantile_low"])
            assert true / bin_ratio <= band["activation_low"] <= true * bin_ratio


def test_quantile_edges_of_a_single_bin_interpolate_in_log_space():
    histogram = {"edges": [1.0, 100.0], "counts": [10]}
    np.testing.assert_allclose(feature_stats.quantile_edges(histogram, 2), [1.0, 10.0, 100.0])


def test_logit_effects_equal_the_decoder_rows_through_the_unembedding():
    rng = np.random.default_rng(1)
    w_dec = rng.normal(size=(300, 12)).astype(np.float32)
    w_u = rng.normal(size=(12, 50)).astype(np.float32)
    chosen = list(range(0, 300, 2))  # more than one chunk of the device computation
    effects = logit_effects.top_logit_effects(w_dec, w_u, chosen, 7)
    logits = w_dec[chosen].astype(np.float64) @ w_u
    for row, effect in zip(logits, effects, strict=True):
        top = np.argsort(-row)[:7]
        bottom = np.argsort(row)[:7]
        assert [t for t, _ in effect["positive"]] == list(top)
        assert [t for t, _ in effect["negative"]] == list(bottom)
        np.testing.assert_allclose([v for _, v in effect["positive"]], row[top], rtol=1e-5)
        np.testing.assert_allclose([v for _, v in effect["negative"]], row[bottom], rtol=1e-5)


@pytest.mark.parametrize("tied", [True, False])
def test_unembedding_is_what_the_model_multiplies_by(tied):
    import keras

    class Backbone:
        token_embedding = keras.layers.ReversibleEmbedding(40, 8, tie_weights=tied)

    Backbone.token_embedding.build((None,))
    x = np.random.default_rng(2).normal(size=(3, 8)).astype(np.float32)
    logits = np.asarray(Backbone.token_embedding(x, reverse=True))
    w_u = logit_effects.unembedding(Backbone())
    assert w_u.shape == (8, 40)
    np.testing.assert_allclose(x @ w_u, logits, rtol=1e-5, atol=1e-5)


def test_the_export_follows_the_schema(report, synthetic):
    document = json.loads((report / "features.json").read_text())
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    jsonschema.validate(document, SCHEMA)
    assert document["latent_fire_counts"] == synthetic.result.fire_counts.tolist()
    for feature in document["features"]:
        assert sum(feature["histogram"]["counts"]) == feature["fire_count"]
        assert len(feature["quantiles"]) == document["quantile_bands"]
    broken = json.loads(json.dumps(document))
    del broken["features"][0]["histogram"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, SCHEMA)


def test_every_listed_feature_has_a_page_and_the_plots_are_pngs(report):
    document = json.loads((report / "features.json").read_text())
    pages = sorted(int(p.stem) for p in (report / "features").glob("*.html"))
    assert pages == sorted(f["index"] for f in document["features"])
    for name, size in (("density.png", (700, 400)), ("training.png", (1000, 650))):
        assert Image.open(report / name).size == size


class _Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.highlights: list[str] = []
        self._in_highlight = False

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self._in_highlight = "hl" in (dict(attrs).get("class") or "").split()

    def handle_data(self, data):
        if self._in_highlight:
            self.highlights.append(data)
            self._in_highlight = False


def test_hostile_token_text_is_escaped(report):
    document = json.loads((report / "features.json").read_text())
    by_index = {f["index"]: f for f in document["features"]}
    hostile_seen = False
    for path in (report / "features").glob("*.html"):
        page = _Collector()
        page.feed(path.read_text())
        assert "script" not in page.tags and "b" not in page.tags
        feature = by_index[int(path.stem)]
        contexts = feature["contexts"] + [s for b in feature["quantiles"] for s in b["samples"]]
        expected = [dashboard.display_token(c["tokens"][c["highlight"]]) for c in contexts]
        assert page.highlights == expected
        hostile_seen |= any(t in dashboard_data.HOSTILE for t in expected)
    assert hostile_seen
    index = (report / "index.html").read_text()
    # The only scripts are the inlined data and the table code; no token closes them early.
    assert index.count("<script") == 2 and index.count("</script>") == 2
    assert "<!--" not in index


def test_inline_json_round_trips_and_cannot_close_its_script():
    data = {"t": ["</script><script>alert(1)</script>", "<!--", "&amp;", "\u2028"]}
    text = dashboard.inline_json(data)
    assert "<" not in text and ">" not in text and "&" not in text
    assert json.loads(text) == data


def test_training_log_keeps_the_last_record_of_a_repeated_step(tmp_path):
    log = tmp_path / "metrics.jsonl"
    records = [
        {"step": 10, "a/loss": 3.0},
        {"step": 20, "a/loss": 2.0},
        {"step": 20, "a/loss": 1.5},
    ]
    log.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert plots.read_training_log(str(log)) == [records[0], records[2]]
    assert plots.read_training_log(str(tmp_path / "missing.jsonl")) == []
    assert plots.training_curves(plots.read_training_log(str(log)), "other") is None
    png = plots.training_curves(plots.read_training_log(str(log)), "a")
    assert Image.open(io.BytesIO(png)).format == "PNG"


def test_density_plot_handles_dead_latents():
    png = plots.density_histogram(np.array([0, 0, 5, 50, 500]), 1000, "x")
    assert Image.open(io.BytesIO(png)).size == (700, 400)
    assert Image.open(io.BytesIO(plots.density_histogram(np.zeros(4), 10, "dead"))).format == "PNG"


def test_export_turns_non_finite_numbers_into_null(synthetic):
    metrics = {"l0": float("nan"), "eval_tokens": 5}
    document = feature_report.export_document("s", {}, metrics, synthetic.result, [])
    assert document["metrics"]["l0"] is None
    json.dumps(document, allow_nan=False)


@pytest.mark.slow
def test_a_real_report_has_the_dashboard_files_and_a_valid_export(local_run):
    from .conftest import SMALL_SAES

    for name in SMALL_SAES:
        sae_dir = local_run / "report" / name
        document = json.loads((sae_dir / "features.json").read_text())
        jsonschema.validate(document, SCHEMA)
        assert len(document["features"]) == 40
        for feature in document["features"]:
            assert (sae_dir / "features" / f"{feature['index']}.html").exists()
            assert len(feature["logit_effects"]["positive"]) == 10
        assert (sae_dir / "density.png").exists() and (sae_dir / "training.png").exists()


def test_a_rewritten_report_drops_the_pages_of_features_no_longer_listed(synthetic, tmp_path):
    listed = dashboard_data.summaries(synthetic)
    for summaries in (listed, listed[:3]):
        feature_report.write(
            str(tmp_path), "syn", "t", {}, {}, synthetic.result, summaries, training_log=[]
        )
    pages = sorted(int(p.stem) for p in (tmp_path / "features").glob("*.html"))
    assert pages == sorted(f["index"] for f in listed[:3])
    assert not (tmp_path / "training.png").exists()  # no curves in this log
