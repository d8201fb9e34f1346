"""The run's overview page (report/index.html): one row per SAE, linking to its dashboard
(sae.analysis.dashboard renders the per-SAE pages). Readable straight from disk."""

from __future__ import annotations

from typing import Any

from sae.analysis.dashboard import STYLE, escape, warnings_html

_CURVE = """<h2>Over training</h2>
<p>Each SAE's snapshots (train.n_checkpoints) and its final weights, judged on the same held-out
tokens and spliced on the same held-out sequences (<a href="curve.json">curve.json</a>).</p>
<img src="curve.png" alt="held-out metrics against training tokens">
"""


def render_overview(title: str, rows: list[dict[str, Any]], curve: bool = False) -> str:
    """One row per SAE of the run with its headline held-out metrics and a link to its page;
    `curve`: the run has snapshots, and curve.png beside the page plots them."""
    columns = ["name", "architecture", "layer", "d_sae", "l0", "fraction_variance_explained"]
    columns += ["ce_loss_recovered", "delta_lm_loss", "kl_div_with_sae"]
    columns += ["dead_fraction", "dense_latents", "sae_top_1_test_accuracy"]
    head = "".join(f"<th>{escape(c)}</th>" for c in columns)

    def cell(row: dict[str, Any], column: str) -> str:
        value = row.get(column)
        if column not in row:  # not measured (e.g. spliced metrics switched off)
            return "-"
        if value is None:  # measured but meaningless here (see the warnings below)
            return "undefined"
        if column == "name":
            return f'<a href="{escape(value)}/index.html">{escape(value)}</a>'
        return escape(f"{value:.4g}" if isinstance(value, float) else value)

    body = "".join(
        "<tr>" + "".join(f"<td>{cell(r, c)}</td>" for c in columns) + "</tr>" for r in rows
    )
    notes = "".join(
        warnings_html([f"{row['name']}: {w}" for w in row.get("warnings", [])]) for row in rows
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>
<style>{STYLE}</style></head>
<body><h1>{escape(title)}</h1>
<p>Held-out evaluation of every SAE trained in this run; click a name for its feature
dashboard.</p>
<table class="metrics"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>
{notes}
{_CURVE if curve else ""}</body></html>
"""
