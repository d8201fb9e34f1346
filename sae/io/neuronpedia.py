"""Neuronpedia's bulk export format, written from a report's features.json, so a trained SAE
can be browsed and shared on Neuronpedia (or a self-hosted copy of it).

The layout is what Neuronpedia's own converter (`utils/neuronpedia-utils`,
convert-saedashboard-to-neuronpedia-export.py) writes and its importer
(`apps/webapp/app/api/admin/import`) reads:

    <out>/<model_id>/<source_id>/
        model.jsonl, release.jsonl, sourceset.jsonl, source.jsonl   one record each
        features/batch-<n>.jsonl.gz       one `Neuron` row per feature
        activations/batch-<n>.jsonl.gz    one `Activation` row per shown context
        explanations/batch-<n>.jsonl.gz   one `Explanation` row per auto-interp explanation
                                          (report.autointerp), when the report has any

`source_id` is `<layer>-<source set>`, from which Neuronpedia reads the layer. Rows use the
database's column names; every row of a file has the same keys (the importer takes its
columns from the first line); activation ids are stable and unique (the importer needs them).
`creator_id` must be a user id of the target Neuronpedia. The importer reads its files from
Neuronpedia's dataset bucket: sharing means handing this directory to its maintainers, or
importing it into a self-hosted instance. docs/neuronpedia_schema.json describes each row.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

from sae.errors import InputError
from sae.io import storage

# Rows per batch file (Neuronpedia's converter writes 128 features a batch).
ROWS_PER_BATCH = {"features": 128, "activations": 4096, "explanations": 128}


@dataclass(frozen=True)
class ExportNames:
    """How the SAE is named on Neuronpedia."""

    model_id: str  # e.g. gemma-2-2b
    source_set: str  # e.g. res-gemma-sae-16k
    source_set_description: str  # e.g. "Residual stream, 16k TopK"
    release: str  # a release id grouping source sets
    creator_id: str  # an existing Neuronpedia user id
    creator_name: str
    model_layers: int
    model_owner: str = "Google"


def _histogram_rows(histogram: dict[str, list[float]] | None) -> tuple[list[float], list[float]]:
    """(bin centres, counts) of a features.json histogram (log-spaced: geometric centres)."""
    if not histogram:
        return [], []
    edges, counts = histogram["edges"], histogram["counts"]
    centres = [
        math.sqrt(low * high) if low > 0 else (low + high) / 2
        for low, high in zip(edges[:-1], edges[1:], strict=True)
    ]
    return [round(c, 5) for c in centres], [float(c) for c in counts]


def _activation_id(source_id: str, feature: int, n: int | str) -> str:
    digest = hashlib.sha256(f"{source_id}/{feature}/{n}".encode()).hexdigest()
    return "c" + digest[:24]  # cuid-shaped: 25 characters, starting with c


def _explanation(feature: dict[str, Any], where: dict[str, str], author: str) -> dict | None:
    """The feature's auto-interp explanation as an Explanation row (None without one). Its
    explainer and detection score go in `notes`: Neuronpedia's type and model names are rows
    of their own tables that a bulk import cannot assume exist."""
    record = feature.get("autointerp")
    if not record or not record.get("explanation"):
        return None
    detection = record.get("detection", {})
    score = detection.get("balanced_accuracy")
    notes = f"gemma-sae auto-interp by {record['explainer']}"
    if score is not None:
        notes += (
            f"; detection balanced accuracy {score:.3f} over {detection['examples']} held-out "
            f"contexts ({detection['activating']} activating)"
        )
    index = int(where["index"])
    return {
        "id": _activation_id(where["layer"], index, "explanation"),
        "modelId": where["modelId"],
        "layer": where["layer"],
        "index": where["index"],
        "description": record["explanation"],
        "authorId": author,
        "notes": notes,
    }


def _activation(
    context: dict[str, Any], where: dict[str, str], identity: str, band: tuple[float, float, float]
) -> dict[str, Any]:
    values = context.get("values")
    if values is None:
        raise InputError(
            "features.json has no per-token values: re-run the report with "
            "report.context_values=true"
        )
    peak = max(values)
    return {
        "id": identity,
        **where,
        "tokens": context["tokens"],
        "values": values,
        "maxValue": peak,
        "maxValueTokenIndex": values.index(peak),
        "minValue": min(values),
        "qualifyingTokenIndex": context["highlight"],
        "binMin": band[0],
        "binMax": band[1],
        "binContains": band[2],
        "dataIndex": str(context["sequence"]),
    }


def feature_rows(
    report: dict[str, Any], source_id: str, names: ExportNames
) -> tuple[list[dict], list[dict], list[dict]]:
    """(Neuron rows, Activation rows, Explanation rows) of every feature of a features.json
    document."""
    features, activations, explanations = [], [], []
    for feature in report["features"]:
        index = int(feature["index"])
        where = {
            "modelId": names.model_id,
            "layer": source_id,
            "index": str(index),
            "creatorId": names.creator_id,
        }
        centres, counts = _histogram_rows(feature.get("histogram"))
        effects = feature.get("logit_effects", {"positive": [], "negative": []})
        features.append(
            {
                **where,
                "maxActApprox": feature["max_activation"],
                "frac_nonzero": feature["density"],
                "freq_hist_data_bar_values": centres,
                "freq_hist_data_bar_heights": counts,
                "pos_str": [e["token"] for e in effects["positive"]],
                "pos_values": [e["effect"] for e in effects["positive"]],
                "neg_str": [e["token"] for e in effects["negative"]],
                "neg_values": [e["effect"] for e in effects["negative"]],
                "hookName": report["run"]["layer"],
            }
        )
        # Top contexts as Neuronpedia's top group (binMin -1, binMax the maximum), then the
        # quantile bands' samples with their activation range and share of firings.
        groups = [((-1.0, feature["max_activation"], -1.0), feature["contexts"])]
        for band in feature.get("quantiles", []):
            share = band["quantile_high"] - band["quantile_low"]
            bounds = (band["activation_low"], band["activation_high"], share)
            groups.append((bounds, band["samples"]))
        explanation = _explanation(feature, where, names.creator_id)
        if explanation is not None:
            explanations.append(explanation)
        n = 0
        for band, contexts in groups:
            for context in contexts:
                identity = _activation_id(source_id, index, n)
                activations.append(_activation(context, where, identity, band))
                n += 1
    return features, activations, explanations


def metadata_rows(report: dict[str, Any], source_id: str, names: ExportNames) -> dict[str, dict]:
    """The one-record files: model, release, source set, source."""
    run = report["run"]
    public = "PUBLIC"
    return {
        "model": {
            "id": names.model_id,
            "displayName": names.model_id,
            "displayNameShort": names.model_id,
            "creatorId": names.creator_id,
            "layers": names.model_layers,
            "neuronsPerLayer": int(run["d_in"]),
            "owner": names.model_owner,
            "visibility": public,
        },
        "release": {
            "name": names.release,
            "description": names.source_set_description,
            "creatorName": names.creator_name,
            "creatorId": names.creator_id,
            "visibility": public,
        },
        "sourceset": {
            "modelId": names.model_id,
            "name": names.source_set,
            "description": names.source_set_description,
            "creatorName": names.creator_name,
            "creatorId": names.creator_id,
            "releaseName": names.release,
            "visibility": public,
            "hasDashboards": True,
        },
        "source": {
            "id": source_id,
            "modelId": names.model_id,
            "setName": names.source_set,
            "creatorId": names.creator_id,
            "visibility": public,
            "hasDashboards": True,
            "saelensConfig": {
                "d_in": run["d_in"],
                "d_sae": run["d_sae"],
                "hook_name": run["layer"],
            },
        },
    }


def layer_of(hook_name: str) -> int:
    """The block index of a SAELens hook name (blocks.<layer>.hook_...)."""
    parts = hook_name.split(".")
    if len(parts) < 3 or parts[0] != "blocks" or not parts[1].isdigit():
        raise InputError(f"hook {hook_name!r} is not blocks.<layer>.<hook>")
    return int(parts[1])


def write_export(report: dict[str, Any], out: str, names: ExportNames) -> list[str]:
    """Write the export of one report's features.json under `out`; returns the files written
    (the metadata files last, so a partial export lacks them)."""
    source_id = f"{layer_of(report['run']['layer'])}-{names.source_set}"
    root = storage.join(out, names.model_id, source_id)
    features, activations, explanations = feature_rows(report, source_id, names)
    if not features:
        raise InputError("features.json lists no features: nothing to export")
    written = []
    tables = (("features", features), ("activations", activations))
    for kind, rows in (*tables, ("explanations", explanations)):
        size = ROWS_PER_BATCH[kind]
        for n, batch in enumerate(rows[i : i + size] for i in range(0, len(rows), size)):
            uri = storage.join(root, kind, f"batch-{n}.jsonl.gz")
            lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in batch)
            storage.write_bytes(uri, gzip.compress(lines.encode(), compresslevel=5))
            written.append(uri)
    for name, record in metadata_rows(report, source_id, names).items():
        uri = storage.join(root, f"{name}.jsonl")
        storage.write_text(uri, json.dumps(record, ensure_ascii=False) + "\n")
        written.append(uri)
    return written
