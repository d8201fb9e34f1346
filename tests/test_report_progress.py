"""The report's progress line plans with the held-out tokens that exist."""

from __future__ import annotations

import pytest

from jobs.cli import main
from sae.analysis.report import planned_tokens
from sae.io import manifest, storage

from .conftest import reuse_run


def test_the_plan_is_the_smaller_of_the_setting_and_the_held_out_split():
    tokens = {"counts": {"eval_tokens": 22_222}}
    assert planned_tokens(50_000, tokens) == 22_222
    assert planned_tokens(4_000, tokens) == 4_000


@pytest.mark.slow
@pytest.mark.parametrize("share", [2.0, 0.3])
def test_the_progress_line_ends_at_100_percent(local_run, tmp_path, capsys, share):
    """More tokens asked for than the held-out split holds (configs/local.yaml's setting is for
    its larger demo), or fewer, not at the end of a model batch: either way the last line
    says 100% of what was evaluated."""
    workdir = tmp_path / "run"
    args = reuse_run(local_run, workdir)
    storage.upload_tree(str(local_run / "sae"), str(workdir / "sae"))
    held_out = manifest.read(str(workdir / "tokens"))["counts"]["eval_tokens"]
    settings = [f"report.eval_tokens={int(share * held_out)}", "report.spliced_sequences=0"]
    assert main(["report", *args, *settings, "report.max_features=5"]) == 0
    lines = capsys.readouterr().err.splitlines()
    [last] = [line for line in lines if line.startswith("[report] ") and "| took " in line]
    share, counted = last.split(" ")[1:3]
    done, total = counted.split("/")
    assert share == "100.0%" and done == total, last
