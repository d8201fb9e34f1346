"""The feature report of one SAE on disk: features.json, the dashboard pages and PNG plots.

features.json follows docs/report_schema.json (described in docs/REPORT.md); the dashboard
shows the same data. Everything is written through the storage layer, so a report can go to a
local directory or a bucket.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
from typing import Any

from sae.analysis import dashboard, feature_stats, features, plots
from sae.analysis.evaluation import EvalResult
from sae.io import storage

SCHEMA_VERSION = 1
_WRITERS = 8
LOGIT_EFFECTS_DEFINITION = (
    "W_dec[feature] @ W_U (raw decoder row through the unembedding, which Gemma ties to the "
    "token embedding); no final norm, no soft-cap"
)


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity: such numbers become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def export_document(
    name: str,
    run_info: dict[str, Any],
    metrics: dict[str, Any],
    result: EvalResult,
    summaries: list[dict[str, Any]],
) -> dict[str, Any]:
    """The features.json document (schema: docs/report_schema.json)."""
    return _finite(
        {
            "schema_version": SCHEMA_VERSION,
            "sae": name,
            "run": run_info,
            "metrics": metrics,
            "eval_tokens": int(result.metrics["eval_tokens"]),
            "d_sae": len(result.fire_counts),
            "latent_fire_counts": [int(c) for c in result.fire_counts],
            "histogram_bins_per_decade": feature_stats.BINS_PER_DECADE,
            "quantile_bands": features.QUANTILE_BANDS,
            "logit_effects_definition": LOGIT_EFFECTS_DEFINITION,
            "features": summaries,
        }
    )


def write(
    output: str,
    name: str,
    title: str,
    metrics: dict[str, Any],
    run_info: dict[str, Any],
    result: EvalResult,
    summaries: list[dict[str, Any]],
    training_log: list[dict[str, float]],
    plots_shown: dict[str, str] | None = None,
) -> list[str]:
    """Write features.json, density.png, training.png (when the log has this SAE's curves),
    index.html and features/<index>.html under `output`; returns what was written.
    `plots_shown` ({caption: path under `output`}) are plots written already, shown too."""
    written: dict[str, bytes] = {}
    document = export_document(name, run_info, metrics, result, summaries)
    written["features.json"] = json.dumps(document, ensure_ascii=False, allow_nan=False).encode()
    tokens = int(result.metrics["eval_tokens"])
    written["density.png"] = plots.density_histogram(result.fire_counts, tokens, name)
    shown = {"Feature density (held-out tokens)": "density.png"}
    curves = plots.training_curves(training_log, name)
    if curves is not None:
        written["training.png"] = curves
        shown["Training curves"] = "training.png"
    shown.update(plots_shown or {})
    pages = dashboard.render_pages(title, metrics, run_info, summaries, shown)
    written.update({path: text.encode() for path, text in pages.items()})
    uris = {path: storage.join(output, *path.split("/")) for path in written}
    # Pages of features a previous run listed and this one does not would linger otherwise.
    storage.delete_tree(storage.join(output, "features"))
    if curves is None:
        storage.delete_tree(storage.join(output, "training.png"))
    # A page per feature: on a bucket each write is a round trip, so a few run at once.
    with concurrent.futures.ThreadPoolExecutor(_WRITERS) as pool:
        for future in [pool.submit(storage.write_bytes, uris[p], d) for p, d in written.items()]:
            future.result()
    return list(uris.values())
