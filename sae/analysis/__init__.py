"""Analysis: held-out evaluation, per-feature statistics, dashboards, plots and steering vectors."""
