"""The README is the front door: every command is documented there and has help text."""

from __future__ import annotations

from pathlib import Path

import click
import pytest

from snapshot.cli import cli

pytestmark = pytest.mark.fast  # the CLI's help and the README: no database

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


def test_quick_start_is_two_commands_that_exist_and_ci_runs() -> None:
    quick = README.split("## Quick start", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in quick.strip().splitlines()]
    assert commands[0].startswith("git clone")
    assert commands[1:] == ["scripts/rehearse", "scripts/test"]
    root = Path(__file__).resolve().parent.parent
    ci = (root / ".ci" / "run").read_text()
    for command in commands[1:]:
        path = root / command
        assert path.is_file() and path.stat().st_mode & 0o111, command
        assert command in ci


GLOBAL_OPTIONS = {"--config", "--pg-bin", "--verbose", "--quiet", "--help"}


@pytest.mark.parametrize("name", COMMANDS)
def test_every_option_is_in_the_readme_synopsis(name: str) -> None:
    command = cli.commands[name]
    [synopsis] = [
        line
        for line in README.splitlines()
        if line.startswith("### ") and f"`snapshot {name} " in line + " "
    ]
    own = {
        max(p.opts, key=len)
        for p in command.params
        if isinstance(p, click.Option) and not GLOBAL_OPTIONS & set(p.opts)
    }
    missing = sorted(o for o in own if o not in synopsis)
    assert not missing, f"README's `snapshot {name}` synopsis lacks {', '.join(missing)}"
