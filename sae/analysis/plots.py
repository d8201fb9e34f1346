"""PNG plots for reports: the feature density histogram and training curves of one SAE.

Figures are built with matplotlib's object API on the Agg canvas (no pyplot, no display, no
global state), and returned as PNG bytes for the storage layer to write anywhere.
"""

from __future__ import annotations

import io
import json
import math

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from sae.io import storage

# The training metrics plotted per SAE, with their axis labels and whether a log scale reads
# better (loss and L0 fall over orders of magnitude early in training).
TRAINING_CURVES = (
    ("loss", "loss", True),
    ("l0", "L0 (active latents per token)", True),
    ("fve", "fraction of variance explained", False),
    ("dead_fraction", "dead fraction", False),
)


def _png(figure: Figure) -> bytes:
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def density_histogram(fire_counts: np.ndarray, tokens: int, title: str) -> bytes:
    """Histogram of log10 feature density over the live latents; dead ones (density 0, no
    logarithm) are counted in the title instead."""
    fire_counts = np.asarray(fire_counts)
    live = fire_counts[fire_counts > 0]
    dead = int(len(fire_counts) - len(live))
    figure = Figure(figsize=(7, 4))
    axes = figure.add_subplot()
    if len(live):
        log_density = np.log10(live / tokens)
        low = math.floor(min(log_density.min(), math.log10(1 / tokens)))
        axes.hist(log_density, bins=np.linspace(low, 0, 8 * -low + 1), color="#4c72b0")
    axes.axvline(math.log10(0.1), color="#c44e52", linestyle="--", label="dense (10%)")
    axes.set_xlabel("log10 feature density (fraction of held-out tokens active)")
    axes.set_ylabel("latents")
    axes.legend(loc="upper left")
    axes.set_title(
        f"{title}\n{len(live)} live latents; {dead} dead (never active on {tokens} tokens)",
        fontsize=10,
    )
    figure.tight_layout()
    return _png(figure)


def read_training_log(uri: str) -> list[dict[str, float]]:
    """The train stage's metrics.jsonl records, one per logged step (the last record wins when
    a resumed run logged a step twice); empty when there is no log."""
    if not storage.exists(uri):
        return []
    by_step: dict[int, dict[str, float]] = {}
    for line in storage.read_text(uri).splitlines():
        if line.strip():
            record = json.loads(line)
            by_step[int(record["step"])] = record
    return [by_step[step] for step in sorted(by_step)]


def training_curves(records: list[dict[str, float]], name: str) -> bytes | None:
    """Loss, L0, FVE and dead fraction against step for the SAE `name` (metrics logged as
    `<name>/<metric>`); None when the log has none of them."""
    figure = Figure(figsize=(10, 6.5))
    plotted = 0
    for i, (metric, label, log_scale) in enumerate(TRAINING_CURVES):
        points = [(r["step"], r[f"{name}/{metric}"]) for r in records if f"{name}/{metric}" in r]
        axes = figure.add_subplot(2, 2, i + 1)
        axes.set_xlabel("step")
        axes.set_title(label, fontsize=10)
        if not points:
            axes.text(0.5, 0.5, "not logged", ha="center", va="center", transform=axes.transAxes)
            continue
        steps, values = zip(*points, strict=True)
        axes.plot(steps, values, color="#4c72b0")
        if log_scale and min(values) > 0:
            axes.set_yscale("log")
        axes.grid(alpha=0.3)
        plotted += 1
    if not plotted:
        return None
    figure.suptitle(f"Training: {name}", fontsize=11)
    figure.tight_layout()
    return _png(figure)


# The curve over training tokens: what each panel plots (report/curve.json's keys).
TOKEN_CURVES = (
    ("delta_lm_loss", "held-out delta LM loss (nats/token)"),
    ("fraction_variance_explained_without_dominant", "held-out FVE without dominant dims"),
    ("l0", "held-out L0"),
    ("dead_fraction", "dead fraction (held out)"),
)


def token_curves(curves: dict[str, list[dict]]) -> bytes:
    """Held-out metrics against training tokens, one line per SAE (report/curve.json)."""
    figure = Figure(figsize=(10, 6.5))
    for i, (metric, label) in enumerate(TOKEN_CURVES):
        axes = figure.add_subplot(2, 2, i + 1)
        axes.set_xlabel("training tokens")
        axes.set_title(label, fontsize=10)
        axes.set_xscale("log")
        for name, points in curves.items():
            xy = [(p["training_tokens"], p[metric]) for p in points if p.get(metric) is not None]
            if xy:
                axes.plot(*zip(*xy, strict=True), marker="o", label=name)
        axes.grid(alpha=0.3)
        if axes.get_lines():
            axes.legend(fontsize=8)
        else:  # e.g. delta LM loss without spliced metrics
            axes.text(0.5, 0.5, "not measured", ha="center", va="center", transform=axes.transAxes)
    figure.suptitle("Held-out metrics over training", fontsize=11)
    figure.tight_layout()
    return _png(figure)


# One colour per steering direction, the same in every panel.
STEERING_COLOURS = {"sae": "#4c72b0", "diffmean": "#dd8452", "random": "#8c8c8c"}


def steering_tradeoffs(evaluations: list, name: str) -> bytes:
    """Concept against cost per evaluated feature (sae.analysis.steering_eval): the share of
    generated tokens where the feature fires against the held-out CE increase, one line per
    direction over its strengths, the unsteered model as a black dot."""
    panels = max(len(evaluations), 1)
    figure = Figure(figsize=(4.2 * panels, 3.8))
    for i, evaluated in enumerate(evaluations):
        axes = figure.add_subplot(1, panels, i + 1)
        points = evaluated.points
        for method, colour in STEERING_COLOURS.items():
            mine = [p for p in points if p.method == method]
            axes.plot(
                [p.ce_increase for p in mine],
                [p.fires for p in mine],
                marker="o",
                color=colour,
                label=method,
            )
            best = evaluated.best.get(method)
            for p in mine:
                if p.strength == best:
                    axes.plot(p.ce_increase, p.fires, marker="*", markersize=14, color=colour)
        axes.plot(points[0].ce_increase, points[0].fires, "ko", label="unsteered")
        axes.axvline(evaluated.max_ce_increase, color="#c44e52", linestyle="--", linewidth=1)
        axes.set_xlabel("held-out CE increase (nats/token)")
        axes.set_ylabel("share of generated tokens firing")
        axes.set_title(f"feature {evaluated.feature}", fontsize=10)
        axes.grid(alpha=0.3)
        if i == 0:
            axes.legend(fontsize=8)
    if not evaluations:
        figure.add_subplot().text(0.5, 0.5, "no feature evaluated", ha="center", va="center")
    figure.suptitle(f"Steering: concept against cost ({name}; * best within budget)", fontsize=11)
    figure.tight_layout()
    return _png(figure)
