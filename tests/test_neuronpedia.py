"""`gemma-sae export-neuronpedia` on the tiny run's report: every row matches the schema of
what Neuronpedia's importer reads (docs/neuronpedia_schema.json), the rows carry the report's
numbers, and bad input is a one-line error with nothing written."""

import gzip
import json
from pathlib import Path

import jsonschema
import pytest

from jobs.cli import main

from .conftest import SMALL_SAES

SCHEMA = json.loads((Path(__file__).parent.parent / "docs" / "neuronpedia_schema.json").read_text())
BOT_USER = "clkht01d40000jv08hvalcvly"  # the user Neuronpedia's database is seeded with
NAMES = [
    "--model-id", "tiny-gemma", "--source-set", "res-test", "--creator-id", BOT_USER,
    "--creator-name", "gemma-sae tests",
]  # fmt: skip


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in gzip.decompress(path.read_bytes()).decode().splitlines()]


def _check(row: dict, kind: str) -> None:
    jsonschema.validate(row, {**SCHEMA, "$ref": f"#/$defs/{kind}"})


def test_export_matches_the_schema_and_the_report(local_run, tmp_path):
    name = SMALL_SAES[1]
    features_json = local_run / "report" / name / "features.json"
    report = json.loads(features_json.read_text())
    assert main(["export-neuronpedia", "--features", str(features_json), "--out", str(tmp_path),
                 *NAMES]) == 0  # fmt: skip
    root = tmp_path / "tiny-gemma" / "1-res-test"  # layer 1 of the tiny model
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    metadata = {p.stem: json.loads(p.read_text()) for p in root.glob("*.jsonl")}
    assert set(metadata) == {"model", "release", "sourceset", "source"}
    for kind, record in metadata.items():
        _check(record, kind)
    assert metadata["model"]["layers"] == 2 and metadata["model"]["neuronsPerLayer"] == 64
    assert metadata["source"]["setName"] == metadata["sourceset"]["name"] == "res-test"

    features = [r for p in sorted(root.glob("features/*.jsonl.gz")) for r in _rows(p)]
    activations = [r for p in sorted(root.glob("activations/*.jsonl.gz")) for r in _rows(p)]
    explanations = [r for p in sorted(root.glob("explanations/*.jsonl.gz")) for r in _rows(p)]
    tables = (("feature", features), ("activation", activations), ("explanation", explanations))
    for kind, rows in tables:
        assert len({tuple(sorted(r)) for r in rows}) == 1, f"{kind} rows differ in their keys"
        for row in rows:
            _check(row, kind)
    assert [int(r["index"]) for r in features] == [f["index"] for f in report["features"]]
    assert len({r["id"] for r in activations}) == len(activations)
    by_index = {f["index"]: f for f in report["features"]}
    for row in features:
        feature = by_index[int(row["index"])]
        assert row["frac_nonzero"] == feature["density"]
        assert row["maxActApprox"] == feature["max_activation"]
        assert sum(row["freq_hist_data_bar_heights"]) == feature["fire_count"]
        assert row["pos_str"] == [e["token"] for e in feature["logit_effects"]["positive"]]
    expected = sum(
        len(f["contexts"]) + sum(len(b["samples"]) for b in f["quantiles"])
        for f in report["features"]
    )
    assert len(activations) == expected
    first = activations[0]
    top = by_index[int(first["index"])]["contexts"][0]
    assert (first["tokens"], first["values"]) == (top["tokens"], top["values"])
    assert first["binMin"] == -1 and first["qualifyingTokenIndex"] == top["highlight"]
    assert first["maxValue"] == max(top["values"])
    # The report's auto-interp explanations (report.autointerp.features of them), one row each.
    explained = [f for f in report["features"] if f.get("explanation")]
    assert explained and [r["index"] for r in explanations] == [str(f["index"]) for f in explained]
    for row, feature in zip(explanations, explained, strict=True):
        assert row["description"] == feature["explanation"]
        assert feature["autointerp"]["explainer"] in row["notes"]
    assert len({r["id"] for r in explanations}) == len(explanations)


def test_a_report_without_context_values_is_a_one_line_error(local_run, tmp_path, capsys):
    name = SMALL_SAES[0]
    report = json.loads((local_run / "report" / name / "features.json").read_text())
    for feature in report["features"]:
        for context in feature["contexts"]:
            del context["values"]
    old = tmp_path / "features.json"
    old.write_text(json.dumps(report))
    out = tmp_path / "export"
    assert main(["export-neuronpedia", "--features", str(old), "--out", str(out), *NAMES]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        "error: features.json has no per-token values: re-run the report with "
        "report.context_values=true"
    )
    assert not out.exists()
    missing = ["--features", str(tmp_path / "nope.json"), "--out", str(out), *NAMES]
    assert main(["export-neuronpedia", *missing]) == 2
    assert "no file at" in capsys.readouterr().err


@pytest.mark.parametrize("hook", ["blocks.x.hook_resid_post", "resid_post"])
def test_a_hook_without_a_layer_is_refused(hook):
    from sae.errors import InputError
    from sae.io import neuronpedia

    with pytest.raises(InputError, match="is not blocks"):
        neuronpedia.layer_of(hook)
