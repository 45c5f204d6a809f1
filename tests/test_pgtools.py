"""pg_dump and pg_restore: found down to the bundled PostgreSQL when the system has none,
or where pg_bin in snapshot.toml says, and checked before use."""

from __future__ import annotations

import json

import pytest

from snapshot import localpg
from snapshot.pgtools import bundled_bins
from tests.fix_db import ROOT
from tests.fix_project import Project, one_error_line


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
