"""The `gemma-sae` command line: where a stage's options may go."""

from __future__ import annotations

import pytest

from jobs import cli


@pytest.fixture
def dispatched(monkeypatch) -> list[tuple]:
    """(stage, config, force) of every stage the command would run; none runs."""
    calls: list[tuple] = []
    monkeypatch.setattr(cli, "_dispatch", lambda *args: calls.append(args))
    return calls


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--config", "{config}", "train.steps=700", "report.eval_tokens=9"],
        ["train", "train.steps=700", "--force", "-c", "{config}", "report.eval_tokens=9"],
        ["--config", "{config}", "train", "train.steps=700", "report.eval_tokens=9", "--force"],
    ],
)
def test_config_and_force_go_anywhere_among_a_stages_arguments(tmp_path, dispatched, argv):
    config = tmp_path / "run.yaml"
    config.write_text(f"workdir: {tmp_path / 'run'}\n")
    assert cli.main([arg.format(config=config) for arg in argv]) == 0
    [(stage, loaded, force)] = dispatched
    assert stage == "train" and force == ("--force" in argv)
    assert loaded.workdir == str(tmp_path / "run")
    assert (loaded.train.steps, loaded.report.eval_tokens) == (700, 9)


def test_an_unknown_option_is_still_refused(dispatched, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", "--nonsense", "train.steps=700"])
    assert exit_.value.code == 2 and "--nonsense" in capsys.readouterr().err
    assert dispatched == []
