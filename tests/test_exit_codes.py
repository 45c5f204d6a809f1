"""One cause, one exit code and one sentence, in every command that meets it."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from snapshot import localpg
from snapshot.scripts import bundled_sql
from tests.fix_apps import setup_pair
from tests.fix_db import SCOPE, SCOPE_TABLES
from tests.fix_project import Project, one_error_line

COMMANDS = {
    "take": ["take", "dev"],
    "check": ["check", "prod"],
    "apply": ["apply", "prod", "--yes"],
    "cutover": ["cutover", "dev", "prod", "--yes"],
    "verify": ["verify", "dev", "prod"],
}


def _scope_with(project: Project, old: str, new: str) -> None:
    tables = [new if t == old else t for t in SCOPE]
    project.config("[scope]\ntables = [" + ", ".join(f'"{t}"' for t in tables) + "]\n")


@pytest.mark.parametrize("command", COMMANDS)
def test_a_misspelled_scope_table_exits_2_naming_it(
    project: Project, make_db, command: str
) -> None:
    _dev, prod = setup_pair(project, make_db)  # dev's snapshot, taken with the right scope
    _scope_with(project, "questions", "qestions")
    original = prod.fingerprint()

    result = project.run(*COMMANDS[command])

    assert result.exit_code == 2, result.output
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("Error: ") and "Traceback" not in result.output
    assert "has no table public.qestions (did you mean public.questions?)" in line, line
    assert prod.fingerprint() == original


@pytest.mark.parametrize("command", ["check", "apply", "cutover", "verify"])
def test_a_scope_table_missing_in_prod_exits_2_naming_it(
    project: Project, make_db, command: str
) -> None:
    _dev, prod = setup_pair(project, make_db)
    prod.execute("DROP TABLE public.topic_edges")
    original = prod.fingerprint([t for t in SCOPE_TABLES if t != "public.topic_edges"])

    result = project.run(*COMMANDS[command])

    assert result.exit_code == 2, result.output
    line = result.stderr.strip().splitlines()[-1]
    assert "prod" in line and "has no table public.topic_edges: " in line, line
    assert "did you mean" not in line  # a table the migrations never made resembles nothing
    assert original == prod.fingerprint([t for t in SCOPE_TABLES if t != "public.topic_edges"])


def test_a_cutover_whose_smoke_tested_nothing_is_no_pass(project: Project, make_db) -> None:
    dev, prod = make_db("dev"), make_db("prod")
    project.point("dev", dev)
    project.point("prod", prod)
    for phase in ("pre", "post"):
        shutil.copytree(bundled_sql() / phase, project.path / "sql" / phase)
    smoke = project.path / "sql" / "smoke"
    smoke.mkdir()
    for name in ("010_one.sql", "020_two.sql"):
        (smoke / name).write_text(
            "-- Nothing to try here.\n-- expect-error: refused\n"
            "DO $$ BEGIN RAISE EXCEPTION 'skip: nothing to try on'; END $$;\n"
        )

    result = project.run("cutover", "dev", "prod", "--yes", "--json")

    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    steps = {s["step"]: (s["status"], s["detail"]) for s in report["steps"]}
    assert steps["apply"][0] == "ok"
    assert steps["smoke"] == (
        "failed",
        "nothing tested: all 2 checks skipped (what they check is absent in prod)",
    )
    assert "no guardrail was tested" in report["state"]
    assert report["undo"] == f"snapshot rollback prod --to {report['apply']['backup']}"


def test_a_too_old_pg_restore_exits_2_in_check_and_apply_as_in_take(
    project: Project, make_db, pg16: localpg.LocalServer, pg_bin: Path
) -> None:
    prod = make_db("prod")
    project.env("dev", SUPABASE_DB_URL=pg16.url("app", user="app_owner"))
    project.point("prod", prod)
    assert project.run("--pg-bin", str(localpg.embedded_bin(16)), "take", "dev").exit_code == 0
    original = prod.fingerprint()

    checked = project.run("check", "prod", "--pg-bin", str(pg_bin))
    applied = project.run("apply", "prod", "--yes", "--pg-bin", str(pg_bin), "-q")

    for result in (checked, applied):
        assert result.exit_code == 2
        assert "tooling: " in one_error_line(result)
        assert "needs pg_restore 16 or newer" in one_error_line(result)
    assert prod.fingerprint() == original


def test_a_too_old_pg_dump_for_the_target_exits_2_in_cutover(
    project: Project, make_db, pg16: localpg.LocalServer, pg_bin: Path
) -> None:
    project.point("dev", make_db("dev"))
    project.env("prod", SUPABASE_DB_URL=pg16.url("app", user="app_owner"))

    result = project.run("cutover", "dev", "prod", "--yes", "--pg-bin", str(pg_bin), "--json")

    assert result.exit_code == 2
    assert "needs pg_dump 16 or newer" in one_error_line(result)
    assert json.loads(result.stdout)["steps"][0]["status"] == "failed"


def test_the_command_run_as_a_process_ends_with_its_code_and_all_its_output(
    project: Project, make_db
) -> None:
    # The console entry point ends the process without the interpreter's teardown: what the
    # command printed must still all arrive, and its exit code must be the command's.
    project.point("dev", make_db("dev"))
    _scope_with(project, "questions", "qestions")
    buffered = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}

    refused = project.spawn("take", "dev", env=buffered)
    out, err = refused.communicate(timeout=60)

    assert refused.returncode == 2, err
    assert err.strip().splitlines()[-1].startswith("Error: ") and "qestions" in err
    assert "Traceback" not in err and out == ""

    project.config("[scope]\ntables = [" + ", ".join(f'"{t}"' for t in SCOPE) + "]\n")
    taken = project.spawn("take", "dev", "--json", env=buffered)
    out, err = taken.communicate(timeout=120)

    assert taken.returncode == 0, err
    summary = json.loads(out)
    assert summary["rows"] == sum(v["rows"] for v in summary["tables"].values() if not v["auth"])
    assert len(project.snapshots("dev")) == 1
