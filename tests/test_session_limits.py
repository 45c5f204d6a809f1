"""Time limits the server or role sets (Supabase: 2 minutes for every role) never cut an
apply short; snapshot's own limits come from [session] in snapshot.toml."""

from __future__ import annotations

import psycopg
import pytest

from tests.fix_apps import apply, setup_pair
from tests.fix_db import SCOPE_TABLES, Database
from tests.fix_project import Project


def _role_limit(db: Database, limit: str) -> None:
    db.execute(f"ALTER ROLE app_owner IN DATABASE {db.name} SET statement_timeout = '{limit}'")


def _slow_answers(db: Database, seconds: float) -> None:
    """Every INSERT statement into answers lasts at least ``seconds`` (a statement trigger)."""
    db.execute(
        "CREATE FUNCTION public.slow_down() RETURNS trigger LANGUAGE plpgsql AS "
        f"$$ BEGIN PERFORM pg_sleep({seconds}); RETURN NULL; END $$; "
        "CREATE TRIGGER slow_down AFTER INSERT ON public.answers "
        "FOR EACH STATEMENT EXECUTE FUNCTION public.slow_down()"
    )


def test_a_role_statement_timeout_does_not_cancel_take_or_apply(project: Project, make_db) -> None:
    dev, prod = make_db("dev"), make_db("prod")
    for db in (dev, prod):
        _role_limit(db, "100ms")
    _slow_answers(prod, 0.5)
    with (
        psycopg.connect(prod.app_url) as conn,
        pytest.raises(psycopg.errors.QueryCanceled),
    ):
        conn.execute("SELECT pg_sleep(0.3)")  # the limit is real for any other session
    project.point("dev", dev)
    project.point("prod", prod)

    taken = project.run("take", "dev")
    assert taken.exit_code == 0, taken.output
    applied = apply(project)

    assert applied.exit_code == 0, applied.output
    assert "16/16 tables match; committed" in applied.stdout


def test_session_limits_come_from_snapshot_toml(project: Project, make_db) -> None:
    _dev, prod = setup_pair(project, make_db)
    _slow_answers(
        prod, 6
    )  # far beyond the limit, which the rest stays under even on a busy machine
    project.config('[session]\nstatement_timeout = "3s"\n')
    original = prod.fingerprint()

    result = apply(project)

    assert result.exit_code == 1, result.output
    error = result.stderr.strip().splitlines()[-1]
    assert "prod cancelled a statement while" in error
    assert "canceling statement due to statement timeout" in error
    assert "[session] statement_timeout" in error and "prod is unchanged" in error
    assert "lost the connection" not in error
    assert prod.fingerprint() == original


@pytest.mark.fast
@pytest.mark.parametrize("value", ["soon", "-5", "true", "10 parsecs"])
def test_a_bad_session_limit_is_one_clear_line(project: Project, value: str) -> None:
    project.config(f"[session]\nstatement_timeout = {value if value == 'true' else repr(value)}\n")

    result = project.run("list")

    assert result.exit_code == 2
    assert "[session] statement_timeout must be a duration" in result.stderr
    assert "Traceback" not in result.output


def _safeupdate_available(db: Database) -> bool:
    try:
        with db.connect() as conn:
            conn.execute("LOAD 'safeupdate'")
    except psycopg.Error:
        return False
    return True


def test_every_write_passes_pg_safeupdate(project: Project, make_db) -> None:
    # Supabase preloads safeupdate for postgres; enabled, it refuses DELETE and UPDATE
    # without WHERE. Delta, full replace and rollback must all pass it.
    _dev, prod = setup_pair(project, make_db)
    if not _safeupdate_available(prod):
        pytest.skip("pg-safeupdate is not installed on the test server")
    prod.execute(f"ALTER DATABASE {prod.name} SET session_preload_libraries = 'safeupdate'")
    with (
        psycopg.connect(prod.app_url) as conn,
        pytest.raises(psycopg.Error, match="DELETE requires a WHERE clause"),
    ):
        conn.execute("DELETE FROM public.playlist_items")  # safeupdate is on for the tool's role
    before = prod.fingerprint(SCOPE_TABLES)

    delta = apply(project)
    full = apply(project, "--full")
    rolled = project.run("rollback", "prod", "--yes", "--to", _oldest_backup(project))

    assert delta.exit_code == 0, delta.output
    assert full.exit_code == 0, full.output
    assert "16/16 tables match; committed" in full.stdout
    assert rolled.exit_code == 0, rolled.output
    assert prod.fingerprint(SCOPE_TABLES) == before  # created auth users stay, by design


def _oldest_backup(project: Project) -> str:
    oldest = project.snapshots("prod")[0]
    return f"prod/{oldest.name}"
