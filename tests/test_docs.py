"""The documentation is the front door: every command documented, with help text; the command
reference generated from that help and current; the README short, its links whole; every
install command naming our own distribution."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from snapshot import DISTRIBUTION
from snapshot.cli import cli

pytestmark = pytest.mark.fast  # the CLI's help and the docs: no database

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
DOCS = sorted((ROOT / "docs").glob("*.md"))
COMMANDS = sorted(cli.commands)


def commands_doc():
    """scripts/commands_doc.py, the generator of docs/commands.md, as a module."""
    spec = importlib.util.spec_from_file_location(
        "commands_doc", ROOT / "scripts" / "commands_doc.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_has_help_and_a_readme_entry(name: str) -> None:
    command = cli.commands[name]
    assert command.help and command.help.strip().split("\n")[0].endswith(".")
    assert f"snapshot {name}" in README, f"README does not name `snapshot {name}`"


@pytest.mark.parametrize("name", COMMANDS)
def test_help_has_an_example(name: str) -> None:
    result = CliRunner().invoke(cli, [name, "--help"])
    assert result.exit_code == 0 and f"snapshot {name}" in result.stdout


def test_the_command_reference_is_generated_from_the_help_and_current() -> None:
    reference = (ROOT / "docs" / "commands.md").read_text()
    assert reference == commands_doc().render(), "docs/commands.md is stale: run scripts/docs"


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_and_option_is_in_the_reference(name: str) -> None:
    reference = (ROOT / "docs" / "commands.md").read_text()
    section = reference.split(f"\n## snapshot {name}\n", 1)[1].split("\n## ", 1)[0]
    options = {
        max(p.opts, key=len) for p in cli.commands[name].params if isinstance(p, click.Option)
    }
    missing = sorted(o for o in options if o not in section)
    assert not missing, f"docs/commands.md's `snapshot {name}` lacks {', '.join(missing)}"


def test_readme_is_a_front_page() -> None:
    lines = README.count("\n")
    assert lines < 250, f"README.md has {lines} lines: move detail to docs/"


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("path", [ROOT / "README.md", *DOCS], ids=lambda p: p.name)
def test_links_between_the_docs_resolve(path: Path) -> None:
    text = path.read_text()
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        file, _, anchor = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        if not linked.exists():
            broken.append(target)
        elif anchor and linked.suffix == ".md":
            headings = re.findall(r"^#{1,6} (.+)$", linked.read_text(), flags=re.M)
            if anchor not in {_slug(h) for h in headings}:
                broken.append(target)
    assert not broken, f"{path.name}: broken links {broken}"


def test_every_install_command_names_our_distribution() -> None:
    places = [
        ROOT / "README.md",
        *DOCS,
        *(ROOT / "scripts").iterdir(),
        *(ROOT / "snapshot").rglob("*.py"),
    ]
    wrong = [
        f"{p.relative_to(ROOT)}: {m.group(0)}"
        for p in places
        if p.is_file()
        for m in re.finditer(
            r"(pip|pipx|uv tool|uv add --dev) install\s+'?snapshot(\[|\s|'|$)|'snapshot\[",
            p.read_text(),
        )
    ]
    assert not wrong, wrong
    assert f"pipx install '{DISTRIBUTION}[rehearse]'" in README
    assert f'name = "{DISTRIBUTION}"' in (ROOT / "pyproject.toml").read_text()


def test_readme_test_command_is_what_ci_runs() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    assert "scripts/test" in README and "scripts/test" in ci


def test_quick_start_is_two_commands_that_exist_and_ci_runs() -> None:
    quick = README.split("## Quick start", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in quick.strip().splitlines()]
    assert commands[0].startswith("git clone")
    assert commands[1:] == ["scripts/rehearse", "scripts/test"]
    ci = (ROOT / ".ci" / "run").read_text()
    for command in commands[1:]:
        path = ROOT / command
        assert path.is_file() and path.stat().st_mode & 0o111, command
        assert command in ci
