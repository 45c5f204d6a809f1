"""The README is the front door: every command is documented there and has help text."""

from __future__ import annotations

from pathlib import Path

import click
import pytest

from snapshot.cli import cli

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
COMMANDS = sorted(cli.commands)


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_has_help_and_a_readme_entry(name: str) -> None:
    command = cli.commands[name]
    assert command.help and command.help.strip().split("\n")[0].endswith(".")
    assert f"snapshot {name}" in README, f"README does not document `snapshot {name}`"


@pytest.mark.parametrize("name", COMMANDS)
def test_help_has_an_example(name: str) -> None:
    command = cli.commands[name]
    with click.Context(command, info_name=name) as ctx:
        text = command.get_help(ctx)
    assert f"snapshot {name}" in text


def test_readme_test_command_is_what_ci_runs() -> None:
    ci = (Path(__file__).resolve().parent.parent / ".ci" / "run").read_text()
    assert "scripts/test" in README and "scripts/test" in ci
