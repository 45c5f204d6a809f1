"""Faults that ``bench/faults.py`` found in apply, reproduced deterministically.

Each test states the promise the fault broke. The first two hold since the apply records
its transaction id in the backup and nothing after the commit can call the target
unchanged; a connection lost during the COMMIT itself is the in-doubt outcome it is.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path

import psycopg
import pytest

from snapshot import localpg
from tests.fix_apps import setup_pair
from tests.fix_db import SCHEMA_FILES, SCOPE_TABLES, SQL, Database, Server
from tests.fix_project import Project
from tests.fix_servers import system_bin


def _wait_for_query(
    db: Database, process: subprocess.Popen[str], prefix: str, event: str = "%"
) -> int:
    """The pid of the apply's backend once it runs a statement starting with ``prefix``.

    With ``event``, once that statement waits on it (``PgSleep``: in a trigger that sleeps).
    """
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        rows = db.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name = 'snapshot' AND state = 'active' AND query LIKE %s "
            "AND coalesce(wait_event, '') LIKE %s",
            [prefix + "%", event],
        )
        if rows:
            return int(rows[0][0])
        time.sleep(0.01)
    raise AssertionError(f"the apply never ran {prefix}")


def test_a_connection_lost_after_the_commit_keeps_the_way_back(project: Project, make_db) -> None:
    dev, prod = setup_pair(project, make_db)
    # Row by row, the deletes get helper indexes, dropped after the commit: the window.
    project.config('[apply]\nforeign_key_checks = "per-row"\n')
    original = prod.fingerprint(SCOPE_TABLES)
    with prod.connect() as reader:
        # A reader's open transaction makes the post-commit DROP INDEX CONCURRENTLY of the
        # apply's helper indexes wait: the window in which the connection is lost.
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM public.question_attempts")
        process = project.spawn("apply", "prod", "--yes")
        backend = _wait_for_query(prod, process, "DROP INDEX CONCURRENTLY")
        prod.execute("SELECT pg_terminate_backend(%s)", [backend])
        _out, err = process.communicate(timeout=60)
        reader.execute("ROLLBACK")

    assert prod.fingerprint(SCOPE_TABLES) == dev.fingerprint(SCOPE_TABLES)  # it committed
    assert "prod is unchanged" not in err
    rollback = project.run("rollback", "prod", "--yes")
    assert rollback.exit_code == 0, rollback.output
    assert prod.fingerprint(SCOPE_TABLES) == original


def test_a_backup_of_an_apply_that_never_committed_is_never_restored(
    project: Project, make_db
) -> None:
    _dev, prod = setup_pair(project, make_db)
    # A COMMIT that takes seconds (a deferred trigger sleeps in it): the apply is killed
    # there, after its backup was sealed, and the server rolls it back.
    prod.execute(
        "CREATE FUNCTION public.slow_commit() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN PERFORM pg_sleep(2); RETURN NULL; END $$; "
        "CREATE CONSTRAINT TRIGGER slow_commit AFTER UPDATE ON public.categories "
        "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION public.slow_commit()"
    )
    original = prod.fingerprint(SCOPE_TABLES)
    process = project.spawn("apply", "prod", "--yes")
    try:
        # The backup is sealed just before the COMMIT (other COMMITs come earlier).
        folder = project.path / "snapshots" / "prod"
        deadline = time.monotonic() + 60
        while not list(folder.glob(".tmp-*/manifest.json")):
            assert process.poll() is None and time.monotonic() < deadline, "no sealed backup"
            time.sleep(0.01)
        backend = _wait_for_query(prod, process, "COMMIT")
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.communicate()
    prod.wait_until_gone(backend)
    assert prod.fingerprint(SCOPE_TABLES) == original  # rolled back
    prod.execute("DROP TRIGGER slow_commit ON public.categories")
    # The app goes on writing to the scope.
    prod.execute("UPDATE public.topics SET name = 'written by the app' WHERE id = 1")

    rollback = project.run("rollback", "prod", "--yes")

    # No apply committed: there is nothing to roll back, and the app's write stays.
    assert rollback.exit_code != 0, rollback.output
    assert prod.scalar("SELECT name FROM public.topics WHERE id = 1") == "written by the app"


def test_a_connection_lost_during_the_commit_keeps_the_way_back(
    project: Project, make_db, server_base: Path
) -> None:
    folder = server_base / "syncrep"
    folder.mkdir(mode=0o700)
    server = localpg.start(system_bin(), folder, "pg", settings={"synchronous_commit": "on"})
    try:
        with psycopg.connect(server.url(), autocommit=True) as conn:
            conn.execute("CREATE DATABASE app")
        prod = Database(Server(f"host=127.0.0.1 port={server.port} user=postgres"), "app")
        seed = [SQL / "seed" / "10_generator.sql", SQL / "seed" / "20_prod.sql"]
        prod.server.run_sql_files("app", [*SCHEMA_FILES, *seed])
        # A COMMIT that runs two seconds before its commit record: a deferred trigger sleeps.
        prod.execute(
            "CREATE FUNCTION public.slow_commit() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN PERFORM pg_sleep(1); RETURN NULL; END $$; "
            "CREATE CONSTRAINT TRIGGER slow_commit AFTER UPDATE ON public.categories "
            "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION public.slow_commit()"
        )
        dev = make_db("dev")
        project.point("dev", dev)
        project.env("prod", SUPABASE_DB_URL=server.url("app", user="app_owner"))
        assert project.run("take", "dev").exit_code == 0
        original = prod.fingerprint(SCOPE_TABLES)

        process = project.spawn("apply", "prod", "--yes")
        # The apply's last COMMIT (the plan's own transactions commit too, without sleeping).
        backend = _wait_for_query(prod, process, "COMMIT", "PgSleep")
        # Meanwhile every commit starts waiting for a standby that never comes: this one is
        # written locally, and its answer never reaches the apply.
        prod.execute("ALTER SYSTEM SET synchronous_standby_names = 'nobody'")
        prod.execute("SELECT pg_reload_conf()")
        deadline = time.monotonic() + 30
        while not prod.execute(
            "SELECT 1 FROM pg_stat_activity WHERE pid = %s AND wait_event = 'SyncRep'", [backend]
        ):
            assert time.monotonic() < deadline, "the COMMIT never waited for the standby"
            time.sleep(0.05)
        prod.execute("SELECT pg_terminate_backend(%s)", [backend])
        prod.execute("ALTER SYSTEM RESET synchronous_standby_names")
        prod.execute("SELECT pg_reload_conf()")
        _out, err = process.communicate(timeout=60)
        prod.execute("DROP TRIGGER slow_commit ON public.categories")

        assert prod.fingerprint(SCOPE_TABLES) == dev.fingerprint(SCOPE_TABLES)  # it committed
        assert "prod is unchanged" not in err
        rollback = project.run("rollback", "prod", "--yes")
        assert rollback.exit_code == 0, rollback.output
        assert prod.fingerprint(SCOPE_TABLES) == original
    finally:
        server.stop()


def _slow_to_start(folder: Path, seconds: float, hide_name: bool = False) -> Path:
    """A --pg-bin whose pg_dump starts ``seconds`` late (the real one, then), as on a busy host.

    ``hide_name``: its session is named "Supavisor", as a pooler in session mode names every
    session it opens.
    """
    from snapshot import pgtools

    real = {name: pgtools.find_tool(name, 0, None, "the test").path for name in TOOLS}
    folder.mkdir()
    rename = (
        """for a in "$@"; do shift; case "$a" in --dbname=*) a=$(printf '%s' "$a" | """
        """sed "s/application_name='[^']*'/application_name=Supavisor/");; esac; """
        """set -- "$@" "$a"; done\n"""
    )
    for name, path in real.items():
        script = folder / name
        delay = f"sleep {seconds}" if name == "pg_dump" else ":"
        script.write_text(
            f'#!/bin/sh\ncase "$1" in --version) ;; *) {delay};; esac\n'
            f"{rename if hide_name and name == 'pg_dump' else ''}"
            f'exec "{path}" "$@"\n'
        )
        script.chmod(0o755)
    return folder


TOOLS = ("pg_dump", "pg_restore")


@pytest.mark.parametrize(
    "how", ["--block-readers", "a pre-script that locks a table", "the same behind a pooler"]
)
def test_an_apply_that_locks_before_its_backup_has_started_waits_for_it(
    project: Project, make_db, how: str
) -> None:
    # pg_dump starts once the plan has recorded the target; on a small target the apply may
    # reach its locks before pg_dump took its own. An ACCESS EXCLUSIVE lock taken then
    # (--block-readers' ALTER TABLE, a script's DDL) used to stall pg_dump until its lock
    # wait failed, 30 s later, and the apply with it (seen once in CI). The apply now lets
    # pg_dump end before it locks.
    dev, prod = setup_pair(project, make_db)
    original = prod.fingerprint(SCOPE_TABLES)
    pooled = how == "the same behind a pooler"
    bin_dir = str(_slow_to_start(project.path / "slow-bin", 2, hide_name=pooled))
    args = ["--block-readers"] if how == "--block-readers" else []
    if not args:
        pre = project.path / "sql" / "pre"
        pre.mkdir(parents=True)
        shutil.copy(SQL / "pre" / "010_questions_to_draft.sql", pre)
        (pre / "020_lock.sql").write_text("LOCK TABLE public.answers IN ACCESS EXCLUSIVE MODE;")

    result = project.run("-v", "--pg-bin", bin_dir, "apply", "prod", "--yes", *args)

    assert result.exit_code == 0, result.output
    # the apply lets pg_dump end before it locks (behind a pooler too)
    assert "the backup's pg_dump ended before the lock" in result.stderr
    assert prod.fingerprint(SCOPE_TABLES) == dev.fingerprint(SCOPE_TABLES)
    rolled = project.run("--pg-bin", bin_dir, "rollback", "prod", "--yes")
    assert rolled.exit_code == 0, rolled.output
    assert prod.fingerprint(SCOPE_TABLES) == original  # the backup is whole
