"""A self-contained HTML page of evaluation metrics and features, readable straight from disk."""

from __future__ import annotations

import html
from typing import Any

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem; color: #222; max-width: 72rem; }
table { border-collapse: collapse; }
th, td { padding: 0.25rem 0.6rem; border-bottom: 1px solid #ddd; text-align: left; }
th { cursor: pointer; background: #f4f4f4; }
.metrics td:first-child { font-weight: 600; }
.feature { border: 1px solid #ddd; border-radius: 6px; padding: 0.6rem 1rem; margin: 1rem 0; }
.context { font-family: ui-monospace, monospace; white-space: pre-wrap; margin: 0.2rem 0; }
.hl { background: #ffb347; border-radius: 3px; font-weight: 700; }
.act { color: #777; display: inline-block; min-width: 5rem; }
#search { padding: 0.3rem; width: 20rem; margin-bottom: 0.5rem; }
"""

_SCRIPT = """
function sortTable(col) {
  const body = document.querySelector('#index tbody');
  const rows = Array.from(body.rows);
  const dir = body.dataset.col == col && body.dataset.dir == 'desc' ? 'asc' : 'desc';
  rows.sort((a, b) => {
    const x = a.cells[col].dataset.v, y = b.cells[col].dataset.v;
    const c = isNaN(x) ? x.localeCompare(y) : parseFloat(x) - parseFloat(y);
    return dir == 'asc' ? c : -c;
  });
  rows.forEach(r => body.appendChild(r));
  body.dataset.col = col; body.dataset.dir = dir;
}
function filterRows() {
  const q = document.getElementById('search').value.toLowerCase();
  for (const r of document.querySelectorAll('#index tbody tr')) {
    r.style.display = r.textContent.toLowerCase().includes(q) ? '' : 'none';
  }
}
"""


def _e(value: Any) -> str:
    return html.escape(str(value))


def _context_html(context: dict[str, Any]) -> str:
    parts = []
    for i, token in enumerate(context["tokens"]):
        text = _e(token)
        parts.append(f'<span class="hl">{text}</span>' if i == context["highlight"] else text)
    activation = f'<span class="act">{context["activation"]:.3f}</span>'
    return f'<div class="context">{activation}{"".join(parts)}</div>'


def _index_row(feature: dict[str, Any]) -> str:
    density = feature["log10_density"]
    tokens = ", ".join(repr(t) for t in feature["top_tokens"])
    cells = [
        (feature["index"], f'<a href="#f{feature["index"]}">{feature["index"]}</a>'),
        (density, f"{density:.2f}" if density is not None else "-"),
        (feature["mean_activation"], f"{feature['mean_activation']:.3f}"),
        (feature["max_activation"], f"{feature['max_activation']:.3f}"),
        (tokens, _e(tokens)),
    ]
    return "<tr>" + "".join(f'<td data-v="{_e(v)}">{h}</td>' for v, h in cells) + "</tr>"


def _feature_section(feature: dict[str, Any]) -> str:
    contexts = "".join(_context_html(c) for c in feature["contexts"])
    return (
        f'<div class="feature" id="f{feature["index"]}"><h3>Feature {feature["index"]}</h3>'
        f"<p>density {feature['density']:.4%} &middot; mean activation "
        f"{feature['mean_activation']:.3f} &middot; max {feature['max_activation']:.3f}</p>"
        f"<h4>Top-activating contexts</h4>{contexts}</div>"
    )


def render(
    title: str, metrics: dict[str, Any], run_info: dict[str, Any], features: list[dict[str, Any]]
) -> str:
    metric_rows = "".join(
        f"<tr><td>{_e(k)}</td><td>{_e(f'{v:.4g}' if isinstance(v, float) else v)}</td></tr>"
        for k, v in metrics.items()
    )
    info_rows = "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in run_info.items())
    headers = ["feature", "log10 density", "mean act", "max act", "top tokens"]
    head = "".join(f'<th onclick="sortTable({i})">{h}</th>' for i, h in enumerate(headers))
    index_rows = "".join(_index_row(f) for f in features)
    sections = "".join(_feature_section(f) for f in features)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>
<style>{_STYLE}</style><script>{_SCRIPT}</script></head>
<body><h1>{_e(title)}</h1>
<h2>Held-out evaluation</h2><table class="metrics">{metric_rows}</table>
<h2>Run</h2><table class="metrics">{info_rows}</table>
<h2>Features ({len(features)} shown)</h2>
<input id="search" placeholder="search features or tokens" oninput="filterRows()">
<table id="index"><thead><tr>{head}</tr></thead><tbody>{index_rows}</tbody></table>
{sections}
</body></html>
"""


def render_overview(title: str, rows: list[dict[str, Any]]) -> str:
    """One row per SAE of the run with its headline held-out metrics and a link to its page."""
    columns = ["name", "architecture", "layer", "d_sae", "l0", "fraction_variance_explained"]
    columns += ["dead_fraction", "dense_latents"]
    head = "".join(f"<th>{_e(c)}</th>" for c in columns)

    def cell(row: dict[str, Any], column: str) -> str:
        value = row.get(column, "")
        if column == "name":
            return f'<a href="{_e(value)}/index.html">{_e(value)}</a>'
        return _e(f"{value:.4g}" if isinstance(value, float) else value)

    body = "".join(
        "<tr>" + "".join(f"<td>{cell(r, c)}</td>" for c in columns) + "</tr>" for r in rows
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>
<style>{_STYLE}</style></head>
<body><h1>{_e(title)}</h1>
<p>Held-out evaluation of every SAE trained in this run.</p>
<table class="metrics"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>
</body></html>
"""
