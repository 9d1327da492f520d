"""The ``fedsynth`` command line: ``-h`` everywhere, ``--version``, every command group wired in."""

from __future__ import annotations

from importlib.metadata import version

import pytest
from typer.testing import CliRunner

from fedsynth.simulations.cli import app

runner = CliRunner()

GROUPS = {
    "coordinator": ("init", "add-node", "start"),
    "node": ("init", "start", "status"),
    "task": ("validate", "run"),
    "synthesis": ("serve", "pull", "list", "report"),
}


def test_version_prints_the_installed_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"fedsynth {version('fedsynth')}"


def test_top_level_help_lists_every_command() -> None:
    result = runner.invoke(app, ["-h"], terminal_width=200)
    assert result.exit_code == 0
    for command in ("demo", "simulate", "generate", "inspect", "ledger", "pull", *GROUPS):
        assert command in result.output, command


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_each_group_and_its_commands_answer_dash_h(group: str) -> None:
    result = runner.invoke(app, [group, "-h"], terminal_width=200)
    assert result.exit_code == 0, result.output
    for command in GROUPS[group]:
        assert command in result.output, (group, command)
        sub = runner.invoke(app, [group, command, "-h"], terminal_width=200)
        assert sub.exit_code == 0, (group, command, sub.output)
        assert "Usage" in sub.output


@pytest.mark.parametrize("command", ["demo", "simulate", "generate", "inspect", "ledger", "pull"])
def test_commands_answer_dash_h(command: str) -> None:
    result = runner.invoke(app, [command, "-h"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_help_keeps_bracketed_section_names() -> None:
    """Rich markup must not swallow ``[pe]``-style names in option help (it printed "(, , )")."""
    result = runner.invoke(app, ["simulate", "-h"], terminal_width=200)
    assert result.exit_code == 0
    assert "[pe], [dp_training], [baselines]" in result.output
