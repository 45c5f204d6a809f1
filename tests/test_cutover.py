"""`snapshot cutover`: preflight, take, apply, smoke, verify, and a clear stop at the first failure."""

from __future__ import annotations

import json
import re

import pytest

from tests.fix_db import SCOPE_TABLES, Database
from tests.fix_project import Project

STEPS = ("preflight", "take", "apply", "smoke", "verify")


def pair(project: Project, make_db) -> tuple[Database, Database]:
    dev, prod = make_db("dev"), make_db("prod")
    project.point("dev", dev)
    project.point("prod", prod)
    return dev, prod


def step_statuses(stdout: str) -> dict[str, str]:
    return {
        m.group(1): m.group(2)
        for m in re.finditer(r"^(\w+)\s+(ok|failed|skipped)\b", stdout, re.M)
        if m.group(1) in STEPS
    }


def test_cutover_runs_every_step_and_rollback_undoes_it(project: Project, make_db) -> None:
    dev, prod = pair(project, make_db)
    before = prod.fingerprint(SCOPE_TABLES)

    result = project.run("cutover", "dev", "prod", "--yes")

    assert result.exit_code == 0, result.output
    assert step_statuses(result.stdout) == dict.fromkeys(STEPS, "ok")
    assert prod.fingerprint(SCOPE_TABLES) == dev.fingerprint(SCOPE_TABLES)
    assert "apply dev/" in result.stdout and "16/16 tables match; committed" in result.stdout
    assert "3/3 guardrails hold" in result.stdout
    assert "16/16 tables match live dev" in result.stdout
    [taken] = project.snapshots("dev")
    [backup] = project.snapshots("prod")
    assert taken.name.endswith("-cutover") and backup.name.endswith("-pre-apply")
    assert f"to roll back: snapshot rollback prod --to prod/{backup.name}" in result.stdout

    undo = project.run("rollback", "prod", "--to", f"prod/{backup.name}", "--yes")

    assert undo.exit_code == 0, undo.output
    assert prod.fingerprint(SCOPE_TABLES) == before


def test_cutover_stops_at_a_failing_preflight_and_changes_nothing(
    project: Project, make_db
) -> None:
    _dev, prod = pair(project, make_db)
    # A column prod's migrations added that dev lacks: the snapshot's rows could not go in.
    prod.execute(
        "SET ROLE app_owner; ALTER TABLE public.topics ADD COLUMN legacy text NOT NULL "
        "DEFAULT 'x'; ALTER TABLE public.topics ALTER COLUMN legacy DROP DEFAULT"
    )
    tables = [*SCOPE_TABLES, "auth.users", "auth.identities"]
    original = prod.fingerprint(tables)

    result = project.run("cutover", "dev", "prod", "--yes")

    assert result.exit_code == 1
    assert step_statuses(result.stdout) == {
        "preflight": "failed",
        "take": "skipped",
        "apply": "skipped",
        "smoke": "skipped",
        "verify": "skipped",
    }
    flat = " ".join(result.stdout.split())
    assert re.search(r"preflight failed [\d.]+ 1 error \(schema\): see the table", flat)
    assert "public.topics has an extra NOT NULL column legacy without a default" in flat
    assert "state: nothing was changed: prod is exactly as it was" in result.stdout
    assert "to roll back" not in result.stdout
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith(
        "Error: preflight failed: 1 error (schema): see the table below; the first: "
    )
    assert "public.topics has an extra NOT NULL column legacy without a default" in error
    assert project.snapshots() == []
    assert prod.fingerprint(tables) == original


def test_cutover_with_a_broken_guardrail_stops_and_names_the_rollback(
    project: Project, make_db
) -> None:
    dev, prod = pair(project, make_db)
    prod.execute("DROP TRIGGER question_topics_unlink_guardrail ON public.question_topics")
    before = prod.fingerprint(SCOPE_TABLES)

    result = project.run("cutover", "dev", "prod", "--yes", "--json")

    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert [(s["step"], s["status"]) for s in report["steps"]] == [
        ("preflight", "ok"),
        ("take", "ok"),
        ("apply", "ok"),
        ("smoke", "failed"),
        ("verify", "skipped"),
    ]
    assert "030_unlink_topic_from_published" in report["failure"]
    backup = report["apply"]["backup"]
    assert report["undo"] == f"snapshot rollback prod --to {backup}"
    assert "guardrails do not hold" in report["state"]
    assert prod.fingerprint(SCOPE_TABLES) == dev.fingerprint(SCOPE_TABLES)  # committed

    undo = project.run(*report["undo"].split()[1:], "--yes")

    assert undo.exit_code == 0, undo.output
    assert prod.fingerprint(SCOPE_TABLES) == before


def test_cutover_refuses_one_database_under_two_names(project: Project, make_db) -> None:
    dev = make_db("dev")
    project.point("dev", dev)
    project.point("prod", dev)
    original = dev.fingerprint()

    result = project.run("cutover", "dev", "prod", "--yes")

    assert result.exit_code == 1
    assert re.search(r"identity\s+error\s+dev and prod are one database", result.stdout)
    assert "--to" not in result.output  # there is no dev/live to roll back to
    assert step_statuses(result.stdout)["take"] == "skipped"
    assert dev.fingerprint() == original and project.snapshots() == []


def test_cutover_without_a_terminal_needs_yes(project: Project, make_db) -> None:
    _dev, prod = pair(project, make_db)
    original = prod.fingerprint()

    result = project.run("cutover", "dev", "prod")

    assert result.exit_code == 2
    assert "refusing to change prod without confirmation" in result.stderr
    assert result.stdout == "" and project.snapshots() == []
    assert prod.fingerprint() == original


@pytest.mark.fast
def test_cutover_needs_two_environments(project: Project) -> None:
    result = project.run("cutover", "prod", "prod", "--yes")

    assert result.exit_code == 2
    assert result.stderr.strip() == "Error: cutover needs two environments, got prod twice"
