"""PostgreSQL's programs: pg_dump and pg_restore found down to the bundled PostgreSQL when the
system has none, or where pg_bin in snapshot.toml says, and checked before use; and the one
runner that starts them (stdout back, a failure as ProgramFailed or CannotStart)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from psycopg import sql

from snapshot import localpg, pgtools
from snapshot.names import TableName
from snapshot.pgtools import bundled_bins
from tests.fix_db import ROOT
from tests.fix_project import Project, one_error_line
from tests.fix_servers import system_bin


def test_take_falls_back_to_the_bundled_pg_dump(
    project: Project, pg16: localpg.LocalServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # Debian's pg_dump 15 at most
    project.env("dev", SUPABASE_DB_URL=pg16.url("app", user="app_owner"))

    result = project.run("take", "dev", "--json")

    assert result.exit_code == 0, result.stderr
    assert int(json.loads(result.stdout)["pg_dump_version"].split(".")[0]) >= 16


def test_pg_bin_in_snapshot_toml_is_used_and_checked(
    project: Project, pg16: localpg.LocalServer
) -> None:
    project.env("dev", SUPABASE_DB_URL=pg16.url("app", user="app_owner"))
    project.config(f'pg_bin = "{localpg.embedded_bin(16)}"\n')
    taken = project.run("take", "dev", "--json")
    project.config('pg_bin = "no/such/bin"\n')
    refused = project.run("take", "dev")

    assert taken.exit_code == 0, taken.stderr
    assert json.loads(taken.stdout)["pg_dump_version"].startswith("16.")
    assert refused.exit_code == 2
    assert "pg_bin in snapshot.toml" in one_error_line(refused)


@pytest.mark.fast
def test_bundled_postgresql_is_found() -> None:
    assert bundled_bins(), "the rehearse/test extras bundle PostgreSQL"


@pytest.mark.fast
def test_ci_proves_the_suite_without_a_system_postgresql() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    assert "unshare --mount --net" in ci and "/usr/lib/postgresql" in ci


def test_run_returns_what_the_program_printed() -> None:
    out = pgtools.run(system_bin() / "pg_dump", "--version", env=os.environ)
    assert out.startswith("pg_dump (PostgreSQL) ")


def test_a_failing_program_keeps_its_exit_status_and_stderr() -> None:
    with pytest.raises(pgtools.ProgramFailed) as failed:
        pgtools.run(
            system_bin() / "pg_dump",
            "--schema-only",
            "--dbname=postgresql://nobody@127.0.0.1:1/none",
            env=os.environ,
        )
    assert failed.value.returncode == 1
    assert "Connection refused" in failed.value.stderr
    assert str(failed.value).startswith("pg_dump failed: ")


def test_a_killed_program_says_by_which_signal() -> None:
    with pytest.raises(pgtools.ProgramFailed) as failed:
        pgtools.run(Path("/bin/sh"), "-c", "kill -KILL $$", env=os.environ)
    assert failed.value.returncode == -9
    assert str(failed.value) == "sh failed: killed by signal 9"


def test_a_missing_program_cannot_start(tmp_path: Path) -> None:
    with pytest.raises(pgtools.CannotStart) as failed:
        pgtools.run(tmp_path / "pg_dump", "--version", env=os.environ)
    assert str(failed.value) == (
        f"cannot run {tmp_path / 'pg_dump'}: missing, or not an executable program for this user"
    )


def test_table_patterns_match_exactly_the_tables_named(make_db, tmp_path: Path) -> None:
    # One pattern per schema (pg_dump pays three round trips a pattern): the alternation of
    # quoted names must match these tables and none of their look-alikes.
    db = make_db("empty")
    names = ["a|b", "a", "b", "Mixed", "mixed", "x$", "arr[]", "dot.ted", "(p)", 'q"uote', "ab"]
    with db.connect() as conn:
        conn.execute('CREATE SCHEMA "Odd.Schema"; CREATE SCHEMA odd')
        for schema in ("Odd.Schema", "odd"):
            for name in names:
                conn.execute(
                    sql.SQL("CREATE TABLE {} (v int); INSERT INTO {} VALUES (1)").format(
                        sql.Identifier(schema, name), sql.Identifier(schema, name)
                    )
                )
    chosen = [
        TableName("Odd.Schema", "a|b"),
        TableName("Odd.Schema", "Mixed"),
        TableName("Odd.Schema", "x$"),
        TableName("Odd.Schema", "arr[]"),
        TableName("Odd.Schema", "dot.ted"),
        TableName("Odd.Schema", "(p)"),
        TableName("Odd.Schema", 'q"uote'),
        TableName("odd", "a"),
    ]
    patterns = pgtools.table_patterns(chosen)
    archive = tmp_path / "chosen.dump"
    pgtools.run(
        system_bin() / "pg_dump",
        f"--dbname={db.server.url(db.name)}",
        "--data-only",
        "--format=custom",
        f"--file={archive}",
        *(f"--table={p}" for p in patterns),
        env=os.environ,
    )
    listing = pgtools.run(system_bin() / "pg_restore", "--list", str(archive), env=os.environ)
    dumped = sorted(
        line.split(" TABLE DATA ", 1)[1].rsplit(" ", 1)[0]
        for line in listing.splitlines()
        if " TABLE DATA " in line
    )

    assert len(patterns) == 2
    assert dumped == sorted(f"{t.schema} {t.name}" for t in chosen)
