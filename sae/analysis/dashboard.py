"""A static feature dashboard for one SAE: an index page and one page per feature.

Everything is plain files that work opened from disk (file://): no server, no network, no
CDN. The index's rows come from the feature data inlined as JSON (a page opened from disk
may not fetch() a sibling file) and are built with DOM text nodes, so token text is never
parsed as HTML; the feature pages are rendered here with every piece of text escaped.
"""

from __future__ import annotations

import html
import json
from typing import Any

# Rows the index shows before "show more" (the DOM stays small for very wide SAEs).
INDEX_PAGE_ROWS = 500

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem; color: #222; max-width: 76rem; }
table { border-collapse: collapse; }
th, td { padding: 0.25rem 0.6rem; border-bottom: 1px solid #ddd; text-align: left; }
th { background: #f4f4f4; }
th.sortable { cursor: pointer; user-select: none; }
th[aria-sort="ascending"]::after { content: " \\25B2"; }
th[aria-sort="descending"]::after { content: " \\25BC"; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.metrics td:first-child { font-weight: 600; }
.tok { white-space: pre; font-family: ui-monospace, monospace; }
.toks .tok { border: 1px solid #ccc; border-radius: 3px; padding: 0 0.2rem; margin-right: 0.2rem; }
.context { font-family: ui-monospace, monospace; margin: 0.15rem 0; white-space: nowrap;
  overflow-x: auto; }
.hl { border-radius: 3px; font-weight: 700; outline: 1px solid #c96d00; }
.act { color: #666; display: inline-block; min-width: 5.5rem; }
.band { margin: 0.8rem 0; }
.empty { color: #888; font-style: italic; }
.warning { color: #8a4b00; background: #fff4e0; padding: 0.3rem 0.6rem; border-radius: 3px; }
.effects { display: flex; gap: 3rem; flex-wrap: wrap; }
figure { margin: 0.5rem 0; }
img.plot { max-width: 100%; border: 1px solid #eee; }
#search { padding: 0.3rem; width: 22rem; margin: 0.5rem 0; }
nav { margin-bottom: 1rem; }
"""

_INDEX_SCRIPT = """
(function () {
  const data = JSON.parse(document.getElementById('feature-data').textContent);
  const body = document.querySelector('#index tbody');
  const count = document.getElementById('count');
  const more = document.getElementById('more');
  const search = document.getElementById('search');
  let order = data.slice(), shown = PAGE_ROWS, sortKey = null, sortDir = 1;
  function fmt(v, digits) { return v === null ? '-' : v.toFixed(digits); }
  function cell(row, text, cls) {
    const td = document.createElement('td');
    td.textContent = text;
    if (cls) td.className = cls;
    row.appendChild(td);
    return td;
  }
  function matches(f, q) {
    if (!q) return true;
    if (String(f.index) === q) return true;
    if (f.explanation && f.explanation.toLowerCase().includes(q)) return true;
    return f.top_tokens.some(t => t.toLowerCase().includes(q));
  }
  function render() {
    const q = search.value.trim().toLowerCase();
    const rows = order.filter(f => matches(f, q));
    body.replaceChildren();
    for (const f of rows.slice(0, shown)) {
      const tr = document.createElement('tr');
      tr.dataset.index = f.index;
      const link = document.createElement('a');
      link.href = 'features/' + f.index + '.html';
      link.textContent = f.index;
      cell(tr, '', 'num').appendChild(link);
      cell(tr, (100 * f.density).toPrecision(3) + '%', 'num');
      cell(tr, fmt(f.log10_density, 2), 'num');
      cell(tr, fmt(f.mean_activation, 3), 'num');
      cell(tr, fmt(f.max_activation, 3), 'num');
      const tokens = cell(tr, '', 'toks');
      for (const t of f.top_tokens) {
        const span = document.createElement('span');
        span.className = 'tok';
        span.textContent = t.replace(/\\n/g, '\\u21b5').replace(/\\t/g, '\\u21e5');
        tokens.appendChild(span);
      }
      cell(tr, f.explanation || '', 'explanation');
      body.appendChild(tr);
    }
    count.textContent = 'showing ' + Math.min(shown, rows.length) + ' of ' + rows.length +
      ' features' + (q ? ' matching the search' : '');
    more.hidden = rows.length <= shown;
  }
  function sortBy(th) {
    const key = th.dataset.key;
    sortDir = sortKey === key ? -sortDir : -1;
    sortKey = key;
    order.sort((a, b) => {
      const x = a[key] === null ? -Infinity : a[key];
      const y = b[key] === null ? -Infinity : b[key];
      return (x < y ? -1 : x > y ? 1 : a.index - b.index) * sortDir;
    });
    for (const h of document.querySelectorAll('#index th')) h.removeAttribute('aria-sort');
    th.setAttribute('aria-sort', sortDir > 0 ? 'ascending' : 'descending');
    render();
  }
  for (const th of document.querySelectorAll('#index th.sortable')) {
    th.addEventListener('click', () => sortBy(th));
  }
  search.addEventListener('input', () => { shown = PAGE_ROWS; render(); });
  more.addEventListener('click', () => { shown += PAGE_ROWS; render(); });
  render();
})();
"""

_INDEX_COLUMNS = (
    ("index", "feature"),
    ("density", "density"),
    ("log10_density", "log10 density"),
    ("mean_activation", "mean act"),
    ("max_activation", "max act"),
)


def escape(value: Any) -> str:
    """Text for HTML content or a quoted attribute: <, >, &, and both quotes escaped."""
    return html.escape(str(value), quote=True)


def display_token(token: str) -> str:
    """A token as shown in a context: line breaks and tabs made visible, not laid out."""
    return token.replace("\n", "\u21b5").replace("\t", "\u21e5")


def inline_json(data: Any) -> str:
    """JSON safe inside a <script> element: no '</script>' or '<!--' can appear in it."""
    text = json.dumps(data, ensure_ascii=False, allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _page(title: str, body: str) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title><style>{STYLE}</style></head>\n"
        f"<body>\n{body}\n</body></html>\n"
    )


def _number(value: Any) -> str:
    if value is None:  # measured but meaningless here (see the page's warnings)
        return "undefined"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def warnings_html(warnings: list[str]) -> str:
    """Lines about metrics left undefined (sae.model.spliced.recovery_warnings), shown above
    the metrics they concern."""
    return "".join(f'<p class="warning">warning: {escape(w)}</p>' for w in warnings)


def _table(rows: dict[str, Any]) -> str:
    cells = "".join(
        f"<tr><td>{escape(k)}</td><td>{escape(_number(v))}</td></tr>" for k, v in rows.items()
    )
    return f'<table class="metrics">{cells}</table>'


def render_index(
    title: str,
    metrics: dict[str, Any],
    run_info: dict[str, Any],
    summaries: list[dict[str, Any]],
    plots: dict[str, str],
) -> str:
    """The SAE's index.html: metrics, plots (`plots`: caption -> relative PNG path) and a
    sortable, searchable table of `summaries` linking to features/<index>.html."""
    keys = [key for key, _ in _INDEX_COLUMNS] + ["top_tokens"]
    rows = [
        {**{key: f[key] for key in keys}, "explanation": f.get("explanation")} for f in summaries
    ]
    figures = "".join(
        f'<figure><img class="plot" src="{escape(path)}" alt="{escape(caption)}">'
        f"<figcaption>{escape(caption)}</figcaption></figure>"
        for caption, path in plots.items()
    )
    head = "".join(
        f'<th class="sortable" data-key="{key}">{escape(label)}</th>'
        for key, label in _INDEX_COLUMNS
    )
    script = _INDEX_SCRIPT.replace("PAGE_ROWS", str(INDEX_PAGE_ROWS))
    body = f"""<nav><a href="../index.html">all SAEs of this run</a></nav>
<h1>{escape(title)}</h1>
<h2>Held-out evaluation</h2>{warnings_html(metrics.get("warnings", []))}
{_table({k: v for k, v in metrics.items() if k != "warnings"})}
<h2>Run</h2>{_table(run_info)}
<h2>Plots</h2>{figures or '<p class="empty">no plots</p>'}
<h2>Features</h2>
<p>Live features on the held-out tokens, most frequently active first; click a column to sort,
type to search the top tokens (or a feature number), click a feature for its page.</p>
<input id="search" type="search" placeholder="search top tokens, explanations or a number"
  aria-label="search features">
<p id="count"></p>
<noscript><p>The feature list needs JavaScript; the pages under features/ do not.</p></noscript>
<table id="index"><thead><tr>{head}<th>top tokens</th><th>explanation</th></tr></thead>
<tbody></tbody></table>
<button id="more" hidden>show more</button>
<script type="application/json" id="feature-data">{inline_json(rows)}</script>
<script>{script}</script>"""
    return _page(title, body)


def _context_html(context: dict[str, Any], max_activation: float) -> str:
    """One context: tokens in spans, the firing token highlighted, its colour's strength the
    activation relative to the feature's maximum (only that token's activation is known)."""
    value = context["activation"]
    strength = 0.15 + 0.85 * min(1.0, value / max_activation) if max_activation > 0 else 1.0
    parts = []
    for i, token in enumerate(context["tokens"]):
        text = escape(display_token(token))
        if i == context["highlight"]:
            parts.append(
                f'<span class="tok hl" style="background: rgba(255, 140, 0, {strength:.2f})" '
                f'title="activation {value:.4g}">{text}</span>'
            )
        else:
            parts.append(f'<span class="tok">{text}</span>')
    return f'<div class="context"><span class="act">{value:.3f}</span>{"".join(parts)}</div>'


def histogram_svg(histogram: dict[str, list], width: int = 640, height: int = 170) -> str:
    """Inline SVG bars, one per bin of equal width (the bins are log-spaced, so the x axis
    reads as log activation); each bar's tooltip gives its range and count."""
    counts, edges = histogram["counts"], histogram["edges"]
    if not counts:
        return '<p class="empty">never active</p>'
    top, left, bottom = max(counts), 40, height - 22
    bar = (width - left - 10) / len(counts)
    bars = []
    for i, count in enumerate(counts):
        h = (bottom - 10) * count / top
        tip = f"{edges[i]:.4g} to {edges[i + 1]:.4g}: {count}"
        bars.append(
            f'<rect x="{left + i * bar:.1f}" y="{bottom - h:.1f}" width="{max(bar - 1, 1):.1f}" '
            f'height="{h:.1f}" fill="#4c72b0"><title>{escape(tip)}</title></rect>'
        )
    labels = (
        f'<text x="{left}" y="{height - 6}" font-size="11">{edges[0]:.3g}</text>'
        f'<text x="{width - 10}" y="{height - 6}" font-size="11" text-anchor="end">'
        f"{edges[-1]:.3g}</text>"
        f'<text x="{left - 4}" y="16" font-size="11" text-anchor="end">{top}</text>'
        f'<text x="{left - 4}" y="{bottom}" font-size="11" text-anchor="end">0</text>'
        f'<line x1="{left}" y1="{bottom}" x2="{width - 10}" y2="{bottom}" stroke="#999"/>'
    )
    return (
        f'<svg class="histogram" width="{width}" height="{height}" role="img" '
        f'aria-label="activation histogram" xmlns="http://www.w3.org/2000/svg">'
        f"{''.join(bars)}{labels}</svg>"
    )


def _effects_table(caption: str, effects: list[dict[str, Any]]) -> str:
    rows = "".join(
        f'<tr><td><span class="tok">{escape(display_token(e["token"]))}</span></td>'
        f'<td class="num">{e["effect"]:+.4f}</td></tr>'
        for e in effects
    )
    return f"<table><caption>{escape(caption)}</caption>{rows}</table>"


def _quantiles_html(feature: dict[str, Any]) -> str:
    parts = []
    for band in feature.get("quantiles", []):
        heading = (
            f"quantile {100 * band['quantile_low']:.0f}&ndash;{100 * band['quantile_high']:.0f}%"
            f" (activation {band['activation_low']:.3g} to {band['activation_high']:.3g})"
        )
        samples = "".join(_context_html(c, feature["max_activation"]) for c in band["samples"])
        samples = samples or '<p class="empty">no sampled firing in this band</p>'
        parts.append(f'<div class="band"><h3>{heading}</h3>{samples}</div>')
    return "".join(parts)


def _explanation_html(record: dict[str, Any] | None) -> str:
    """Auto-interp's explanation and its detection score (sae.analysis.autointerp)."""
    if record is None:
        return ""
    explanation = record.get("explanation")
    if explanation is None:
        return (
            f'<h2>Explanation</h2><p class="empty">{escape(record["explainer"])} gave no usable '
            f"explanation (it answered: {escape(record['explainer_answer'])!s})</p>"
        )
    detection = record.get("detection", {})
    score = detection.get("balanced_accuracy")
    auroc = detection.get("auroc")
    scored = (
        f"balanced accuracy {score:.3f}"
        + ("" if auroc is None else f", AUROC {auroc:.3f}")
        + f" (chance 0.5) over {detection['examples']} held-out contexts, "
        f"{detection['activating']} of them activating ({detection['unparsed']} unanswered)"
        if score is not None
        else "not scored (no usable answer on both kinds of context)"
    )
    return f"""<h2>Explanation</h2>
<p class="explanation">{escape(explanation)}</p>
<p>By {escape(record["explainer"])} from {record["explained_from"]} contexts; detection
(given only this explanation, which held-out contexts make the feature fire?): {escape(scored)}.
</p>"""


def render_feature(
    sae_title: str, feature: dict[str, Any], previous: int | None, following: int | None
) -> str:
    """features/<index>.html: statistics, histogram, contexts, quantile samples, logit
    effects of one feature (`previous`/`following`: neighbours in the index's order)."""
    index = feature["index"]
    nav = ['<a href="../index.html">all features</a>']
    if previous is not None:
        nav.append(f'<a href="{previous}.html" rel="prev">previous ({previous})</a>')
    if following is not None:
        nav.append(f'<a href="{following}.html" rel="next">next ({following})</a>')
    stats = {
        "fire count (held-out tokens active)": feature["fire_count"],
        "density": f"{feature['density']:.4%}",
        "log10 density": (
            "-" if feature["log10_density"] is None else f"{feature['log10_density']:.3f}"
        ),
        "mean activation (where active)": feature["mean_activation"],
        "max activation": feature["max_activation"],
    }
    if feature.get("min_activation") is not None:
        stats["min activation"] = feature["min_activation"]
    contexts = "".join(_context_html(c, feature["max_activation"]) for c in feature["contexts"])
    effects = feature.get("logit_effects")
    effects_html = (
        '<div class="effects">'
        + _effects_table("raised most", effects["positive"])
        + _effects_table("lowered most", effects["negative"])
        + "</div>"
        if effects
        else '<p class="empty">not computed</p>'
    )
    title = f"Feature {index}"
    body = f"""<nav>{" &middot; ".join(nav)}</nav>
<h1>{title} <small>{escape(sae_title)}</small></h1>
{_table(stats)}
{_explanation_html(feature.get("autointerp"))}
<h2>Activation histogram</h2>
<p>Held-out firings per log-spaced bin (8 per decade); the outer edges are the smallest and
largest activation seen.</p>
{histogram_svg(feature.get("histogram", {"counts": [], "edges": []}))}
<h2>Top-activating contexts</h2>
<p>The highlighted token is where the feature fired (number: its activation); the colour's
strength is that activation relative to the feature's maximum.</p>
{contexts or '<p class="empty">none</p>'}
<h2>Samples by activation quantile</h2>
<p>Random firings grouped by the feature's estimated activation quantiles (from its
histogram), so the weak, typical firings show up as well as the strongest.</p>
{_quantiles_html(feature)}
<h2>Logit effects</h2>
<p>Decoder direction through the unembedding (W_dec &middot; W_U, no final norm): the tokens
whose logits this feature raises and lowers most directly.</p>
{effects_html}"""
    return _page(f"{title}: {sae_title}", body)


def render_pages(
    title: str,
    metrics: dict[str, Any],
    run_info: dict[str, Any],
    summaries: list[dict[str, Any]],
    plots: dict[str, str],
) -> dict[str, str]:
    """Every page of the SAE's dashboard, by path relative to its directory."""
    pages = {"index.html": render_index(title, metrics, run_info, summaries, plots)}
    indices = [f["index"] for f in summaries]
    for n, feature in enumerate(summaries):
        previous = indices[n - 1] if n > 0 else None
        following = indices[n + 1] if n + 1 < len(indices) else None
        pages[f"features/{feature['index']}.html"] = render_feature(
            title, feature, previous, following
        )
    return pages
