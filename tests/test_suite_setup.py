"""The suite's own footing: what an earlier run, or another tool, left on a shared server
never decides whether the tests pass; the fast tier needs no server, and a run that needs
one it cannot reach stops at once saying so."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from snapshot import localpg
from snapshot.errors import ConfigError
from tests.fix_db import APP_ROLE, ROOT, Server, Templates
from tests.fix_project import Project
from tests.fix_servers import start_with_dev_data, system_bin


def test_roles_another_tool_left_with_other_attributes_are_corrected(
    project: Project, server_base: Path
) -> None:
    folder = server_base / "stale-roles"
    folder.mkdir(mode=0o700)
    local = localpg.start(system_bin(), folder, "pg")
    try:
        with psycopg.connect(local.url(), autocommit=True) as conn:
            # What another tool's run left: the roles exist, with attributes of its own.
            conn.execute("CREATE ROLE supabase_auth_admin NOLOGIN")
            conn.execute("CREATE ROLE app_owner LOGIN NOBYPASSRLS CREATEROLE")
            conn.execute("ALTER ROLE app_owner SET search_path = nowhere")
            conn.execute("GRANT supabase_auth_admin TO app_owner")
            conn.execute("CREATE ROLE anon NOLOGIN BYPASSRLS")
        dev = Templates(Server(local.url())).get("dev")  # what the make_db fixture builds
        project.env("dev", SUPABASE_DB_URL=local.url(dev, APP_ROLE))

        taken = project.run("take", "dev")

        assert taken.exit_code == 0, taken.output
        with psycopg.connect(local.url(), autocommit=True) as conn:
            roles = conn.execute(
                "SELECT rolname, rolbypassrls, rolcreaterole FROM pg_roles "
                "WHERE rolname IN ('app_owner', 'anon') ORDER BY 1"
            ).fetchall()
            settings = conn.execute("SELECT count(*) FROM pg_db_role_setting").fetchone()
            member = conn.execute(
                "SELECT pg_has_role('app_owner', 'supabase_auth_admin', 'MEMBER')"
            ).fetchone()
        assert roles == [("anon", False, False), ("app_owner", True, False)]
        assert settings == (0,) and member == (False,)
    finally:
        local.stop()


@pytest.mark.skipif(os.geteuid() != 0, reason="servers run as another user only as root")
def test_the_pg16_fixture_starts_from_a_clone_in_a_private_folder(
    project: Project, server_base: Path, tmp_path: Path
) -> None:
    try:
        install = localpg.embedded_bin(16).parent  # <site>/<package>/pginstall
    except ConfigError as exc:
        pytest.skip(str(exc))
    site = tmp_path / "clone" / ".venv" / "site-packages"  # as scripts/test makes it
    site.parent.parent.mkdir(mode=0o700)
    package = install.parent
    shutil.copytree(install, site / package.name / install.name, symlinks=True)
    libs = package.parent / f"{package.name}.libs"
    if libs.is_dir():
        shutil.copytree(libs, site / libs.name, symlinks=True)

    server = start_with_dev_data(site / package.name / install.name / "bin", server_base / "p16")
    try:
        project.env("dev", SUPABASE_DB_URL=server.url("app", user=APP_ROLE))
        taken = project.run("take", "dev", "--json")

        assert taken.exit_code == 0, taken.output
        assert json.loads(taken.stdout)["server_version"].startswith("16.")
    finally:
        server.stop()


@pytest.mark.timeout(120)
def test_embedded_test_server_down_stops_only_its_own() -> None:
    def up() -> tuple[str, str]:
        out = subprocess.run(
            [sys.executable, "-m", "tests.embedded_server", "up"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        folder, dsn = out.strip().splitlines()
        return folder, dsn

    first, second = up(), up()
    try:
        subprocess.run(
            [sys.executable, "-m", "tests.embedded_server", "down", first[0]], cwd=ROOT, check=True
        )
        with psycopg.connect(second[1], connect_timeout=5) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(first[1], connect_timeout=5)
        assert not Path(first[0]).exists()
    finally:
        for folder, _ in (first, second):
            subprocess.run(
                [sys.executable, "-m", "tests.embedded_server", "down", folder], cwd=ROOT
            )


def _pytest(*args: str) -> subprocess.CompletedProcess[str]:
    """Run pytest on this suite against a DSN where no server listens."""
    nowhere = f"--test-dsn=host=127.0.0.1 port={localpg.free_port()} user=postgres dbname=x"
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", nowhere, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )


def test_the_fast_tier_runs_without_a_database_server() -> None:
    run = _pytest("-m", "fast")

    assert run.returncode == 0, run.stdout + run.stderr
    assert " passed, " in run.stdout and " deselected in " in run.stdout
    assert "cannot reach" not in run.stdout + run.stderr


def test_a_run_that_needs_the_server_stops_at_once_when_there_is_none() -> None:
    run = _pytest("tests/test_verify.py")

    assert run.returncode == 3, run.stdout + run.stderr
    said = run.stdout + run.stderr
    assert "cannot reach the test PostgreSQL server" in said and "-m fast" in said
    assert "no tests ran" in run.stdout  # one message, not a failure per test


def test_a_test_marked_fast_that_needs_a_server_is_refused(tmp_path: Path) -> None:
    probe = tmp_path / "test_probe.py"
    probe.write_text("import pytest\n\n\n@pytest.mark.fast\ndef test_probe(make_db):\n    pass\n")

    run = _pytest("-p", "tests.fix_db", "--rootdir", str(tmp_path), "-c", os.devnull, str(probe))

    assert run.returncode == pytest.ExitCode.USAGE_ERROR, run.stdout + run.stderr
    assert "test_probe is marked fast but uses server" in run.stdout + run.stderr
