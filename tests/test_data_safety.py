"""Data safety: rollback goes back one apply, locks are bounded, and manifests are believed
only when the staged rows agree with them."""

from __future__ import annotations

import hashlib
import json
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import psycopg

from snapshot.db import SESSION_SETTINGS
from tests.fix_apps import (
    TEAMS_SCOPE,
    apply,
    resync_pair,
    setup_pair,
    take_teams_dev,
    teams_db,
)
from tests.fix_db import SCOPE_TABLES, Database
from tests.fix_project import Project, unpublish


def _second_apply_unlisted(project: Project, make_db) -> tuple[Database, dict, list[Path]]:
    """Two applies; the second committed, then died before listing its backup.

    Returns prod, its fingerprint after the first apply, and the two backups.
    """
    dev, prod = setup_pair(project, make_db)
    assert apply(project).exit_code == 0
    after_first = prod.fingerprint()
    dev.execute("UPDATE public.categories SET name = name || ' (second)'")
    assert project.run("take", "dev").exit_code == 0
    assert apply(project).exit_code == 0
    assert prod.fingerprint() != after_first
    backups = project.snapshots("prod")
    unpublish(backups[1])
    return prod, after_first, backups


def test_rollback_after_a_kill_before_publishing_undoes_only_the_last_apply(
    project: Project, make_db
) -> None:
    prod, after_first, (first_backup, second_backup) = _second_apply_unlisted(project, make_db)

    result = project.run("rollback", "prod", "--yes")

    assert result.exit_code == 0, result.output
    assert prod.fingerprint() == after_first  # one apply undone, not two
    assert f"recovered backup prod/{second_backup.name} of an apply that committed" in (
        result.stderr
    )
    assert f"rollback prod/{second_backup.name} to prod" in result.stdout
    assert first_backup.exists()


def test_rollback_waits_for_the_ending_apply_before_choosing_its_backup(
    project: Project, make_db
) -> None:
    # The session of the apply that just ended still holds the apply lock a moment, and its
    # backup is unsettled: choosing then would roll back to the backup before it.
    prod, after_first, _backups = _second_apply_unlisted(project, make_db)
    holder = psycopg.connect(prod.app_url, autocommit=True)
    holder.execute("SELECT pg_advisory_lock(%s)", (0x736E6170,))
    threading.Timer(1.0, holder.close).start()

    result = project.run("rollback", "prod", "--yes")

    assert result.exit_code == 0, result.output
    assert prod.fingerprint() == after_first  # one apply undone, not two


def test_rollback_without_any_backup_says_where_it_looked(project: Project, make_db) -> None:
    _dev, prod = setup_pair(project, make_db)
    original = prod.fingerprint()

    result = project.run("rollback", "prod", "--yes")

    assert result.exit_code == 2
    assert "there is no pre-apply backup of 'prod' in snapshots/prod" in result.stderr
    assert "snapshot take" not in result.stderr
    assert prod.fingerprint() == original


def _idle_reader(prod: Database, table: str) -> psycopg.Connection:
    """An app session idle in a transaction that has read ``table`` (it holds ACCESS SHARE)."""
    conn = psycopg.connect(prod.app_url, application_name="idle reader")
    conn.execute(f"SELECT count(*) FROM {table}")
    return conn


def _wait_for_sessions_to_end(db: Database) -> None:
    """The apply's server session may outlive its client by a moment (it holds the lock)."""
    deadline = time.monotonic() + 20
    while db.execute(
        "SELECT 1 FROM pg_stat_activity WHERE datname = current_database() "
        "AND application_name = 'snapshot'"
    ):
        assert time.monotonic() < deadline, "the apply's session never ended"
        time.sleep(0.05)


def _helper_indexes(prod: Database) -> list[str]:
    rows = prod.execute(
        "SELECT indexrelid::regclass::text FROM pg_index i JOIN pg_class c "
        "ON c.oid = i.indexrelid WHERE c.relname LIKE 'snapshot_apply_fk_%%'"
    )
    return [r[0] for r in rows]


def test_an_idle_reader_never_stalls_the_apply_and_helper_indexes_go_later(
    project: Project, make_db
) -> None:
    # Every playlist is replaced: the apply indexes playlist_items(playlist_id) for itself.
    # A plain DROP INDEX at commit would wait on the idle reader while holding every lock.
    _dev, prod = setup_pair(project, make_db)
    # Row by row: foreign keys checked in bulk need no helper index.
    project.config('[apply]\nlock_timeout = "1s"\nforeign_key_checks = "per-row"\n')
    reader = _idle_reader(prod, "public.user_playlist_progress")
    try:
        result = apply(project)
        left = _helper_indexes(prod)
    finally:
        reader.close()

    assert result.exit_code == 0, result.output
    assert "16/16 tables match; committed" in result.stdout
    assert left, "the idle reader should have kept one helper index from being dropped"
    _wait_for_sessions_to_end(prod)
    assert "the next apply drops them" in " ".join(result.stderr.split())

    again = apply(project)

    assert again.exit_code == 0, again.output
    assert _helper_indexes(prod) == []
    assert "helper indexes an earlier apply left behind" in again.stderr


def test_a_lock_that_cannot_be_had_names_its_holder_and_changes_nothing(
    project: Project, make_db
) -> None:
    _dev, prod = setup_pair(project, make_db)
    project.config('[apply]\nlock_timeout = "500ms"\n')
    original = prod.fingerprint()
    writer = psycopg.connect(prod.app_url, application_name="busy app")
    writer.execute("UPDATE public.categories SET name = name WHERE id = 1")
    pid = writer.info.backend_pid
    try:
        result = apply(project)
    finally:
        writer.rollback()
        writer.close()

    assert result.exit_code == 1
    error = result.stderr.strip().splitlines()[-1]
    assert "could not lock public.categories on prod within 500ms" in error
    assert f"held by pid {pid} ('busy app', idle in transaction for" in error
    assert "nothing was changed" in error
    assert prod.fingerprint() == original
    assert project.snapshots("prod") == []


def _edit_manifest(snapshot: Path, change) -> None:
    path = snapshot / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest, indent=2))


def _edit_checksum(manifest: dict) -> None:
    table = next(t for t in manifest["tables"] if t["name"] == "categories")
    table["checksum"] = "0" * len(table["checksum"])


def test_a_manifest_that_contradicts_its_rows_is_refused_before_any_lock(
    project: Project, make_db
) -> None:
    _dev, prod = setup_pair(project, make_db)
    [snapshot] = project.snapshots("dev")
    _edit_manifest(snapshot, _edit_checksum)
    original = prod.fingerprint()

    checked = project.run("check", "prod", "--json")
    applied = apply(project)

    assert checked.exit_code == 1
    [finding] = [
        f
        for f in json.loads(checked.stdout)["findings"]
        if f["check"] == "snapshot integrity" and f["status"] == "error"
    ]
    assert "contradict its manifest: public.categories (its checksum differs)" in finding["detail"]
    assert applied.exit_code == 1
    assert "contradict its manifest" in applied.stdout
    assert "locking" not in applied.stderr
    assert prod.fingerprint() == original


def test_a_dump_swapped_in_with_its_hash_updated_is_refused(project: Project, make_db) -> None:
    dev, prod = setup_pair(project, make_db)
    # same row counts (staging already compares those), other contents
    dev.execute("UPDATE public.playlists SET title = title || ' (edited)'")
    assert project.run("take", "dev").exit_code == 0
    first, second = project.snapshots("dev")
    (first / "data.dump").write_bytes((second / "data.dump").read_bytes())

    def rehash(manifest: dict) -> None:
        manifest["files"]["data.dump"] = json.loads((second / "manifest.json").read_text())[
            "files"
        ]["data.dump"]

    _edit_manifest(first, rehash)
    original = prod.fingerprint()

    result = project.run("apply", "prod", "--snapshot", f"dev/{first.name}", "--yes")

    assert result.exit_code == 1
    flat = " ".join(result.stdout.split())
    assert "contradict its manifest: public.playlists (its checksum differs)" in flat
    assert prod.fingerprint() == original


def test_an_app_writing_child_rows_never_deadlocks_with_the_apply(
    project: Project, make_db
) -> None:
    # The app inserts attempts in transactions that hold the child table while their
    # foreign-key checks then lock rows of the parents: an apply holding a parent while
    # waiting for the child would deadlock with it, and the server would fail the app.
    _dev, prod = setup_pair(project, make_db)
    errors: list[str] = []
    written = 0
    stop = threading.Event()

    def app() -> None:
        nonlocal written
        with psycopg.connect(prod.app_url, autocommit=True, application_name="app") as conn:
            user, question = conn.execute(
                "SELECT user_id, question_id FROM public.question_attempts LIMIT 1"
            ).fetchone()
            while not stop.is_set():
                try:
                    with conn.transaction():
                        for _ in range(2):
                            conn.execute(
                                "INSERT INTO public.question_attempts (user_id, question_id, "
                                "is_correct) VALUES (%s, %s, true)",
                                (user, question),
                            )
                            time.sleep(0.03)
                    written += 1
                except psycopg.Error as exc:
                    errors.append(str(exc).splitlines()[0])
                    return

    thread = threading.Thread(target=app)
    thread.start()
    try:
        time.sleep(0.2)
        result = apply(project)
    finally:
        stop.set()
        thread.join()

    assert result.exit_code == 0, result.output
    assert errors == []
    assert written > 0


# What an app writes between the backup's pg_dump snapshot (taken while the snapshot is
# staged) and the apply's lock: in scope (insert, update, delete) and in the auth tables.
APP_WRITES = """
INSERT INTO public.question_attempts (user_id, question_id, is_correct)
  SELECT user_id, question_id, true FROM public.question_attempts ORDER BY id LIMIT 5;
UPDATE public.answers SET body = body || ' (app)' WHERE id IN (
  SELECT id FROM public.answers ORDER BY id LIMIT 3);
DELETE FROM public.user_question_progress WHERE (user_id, question_id) IN (
  SELECT user_id, question_id FROM public.user_question_progress ORDER BY 1, 2 LIMIT 4);
UPDATE auth.users SET last_sign_in_at = now() WHERE id IN (
  SELECT id FROM auth.users ORDER BY id LIMIT 2);
"""


def _apply_while_the_app_writes(
    project: Project,
    prod: Database,
    writes: str | Callable[[], object] = APP_WRITES,
    scope: Sequence[str] | None = None,
) -> tuple[subprocess.CompletedProcess, dict[str, tuple[int, str]]]:
    """``apply prod --yes`` while the app writes: the app's transaction, open before the apply
    starts, commits once the apply waits for its lock (after the plan was made and the
    backup's pg_dump started); ``writes`` is its SQL, or a call that ends it.

    Returns the outcome and prod's fingerprint (of ``scope``) as the apply's lock found it.
    """
    with prod.connect() as app:
        if not callable(writes):
            app.execute("BEGIN")
            app.execute(writes)  # not committed: it holds its row locks, the apply plans on
        process = project.spawn("apply", "prod", "--yes")
        assert process.stderr is not None
        waiting = (
            "SELECT EXISTS (SELECT 1 FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
            "WHERE NOT l.granted AND a.application_name = 'snapshot' "
            "AND a.datname = current_database())"
        )
        deadline = time.monotonic() + 120
        while not prod.scalar(waiting):
            assert process.poll() is None, process.communicate()[1]
            assert time.monotonic() < deadline, "the apply never waited for its lock"
            time.sleep(0.01)
        if callable(writes):
            writes()
        else:
            app.execute("COMMIT")
        locked = prod.fingerprint() if scope is None else prod.fingerprint(scope)
        out, err = process.communicate(timeout=180)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err), locked


def test_what_the_app_writes_while_the_backup_runs_is_in_the_backup(
    project: Project, make_db
) -> None:
    # pg_dump starts before the lock (while the snapshot is staged and compared); the rows
    # written until the lock are caught up under it.
    dev, prod = setup_pair(project, make_db)

    result, locked = _apply_while_the_app_writes(project, prod)

    assert result.returncode == 0, result.stderr
    assert prod.fingerprint() != locked
    assert prod.fingerprint(SCOPE_TABLES) == dev.fingerprint(SCOPE_TABLES)
    [backup] = project.snapshots("prod")
    catch_up = (backup / "catchup.copy").read_text()
    headers = {
        line.split(" (")[0].replace('"', "")
        for line in catch_up.splitlines()
        if line.endswith("stdin;")
    }
    assert {
        "REMOVE public.question_attempts",
        "ADD public.question_attempts",
        "REMOVE public.answers",
        "ADD public.answers",
        "REMOVE public.user_question_progress",
        "REMOVE auth.users",  # by key: only the users the app touched, not the whole table
        "ADD auth.users",
    } <= headers
    assert not any(header.startswith("REPLACE") for header in headers)
    assert not any("identities" in header for header in headers)  # untouched: nothing copied
    rolled = project.run("rollback", "prod", "--yes")
    assert rolled.exit_code == 0, rolled.output
    # The app's writes included, nothing else (auth users are never taken back by a rollback).
    scope = [table for table in locked if not table.startswith("auth.")]
    assert prod.fingerprint(scope) == {table: locked[table] for table in scope}


# Writes that delete nothing: under the lock only the row versions written since the plan's
# snapshot are matched with its record (the deletes above make it match every row).
APP_UPDATES = """
INSERT INTO public.question_attempts (user_id, question_id, is_correct)
  SELECT user_id, question_id, true FROM public.question_attempts ORDER BY id LIMIT 5;
UPDATE public.answers SET body = body || ' (app)' WHERE id IN (
  SELECT id FROM public.answers ORDER BY id LIMIT 3);
UPDATE public.user_question_progress SET attempts = attempts + 1 WHERE (user_id, question_id)
  IN (SELECT user_id, question_id FROM public.user_question_progress ORDER BY 1, 2 LIMIT 4);
"""


def test_rows_the_app_writes_before_the_lock_are_found_without_matching_every_row(
    project: Project, make_db
) -> None:
    dev, prod = setup_pair(project, make_db)

    result, locked = _apply_while_the_app_writes(project, prod, APP_UPDATES)

    assert result.returncode == 0, result.stderr
    assert "12 rows changed since the plan was made: compared again" in result.stderr
    assert prod.fingerprint(SCOPE_TABLES) == dev.fingerprint(SCOPE_TABLES)
    assert project.run("rollback", "prod", "--yes").exit_code == 0
    assert prod.fingerprint(SCOPE_TABLES) == {t: locked[t] for t in SCOPE_TABLES}


def test_a_transaction_open_when_the_plan_was_made_and_committed_before_the_lock_is_seen(
    project: Project, make_db
) -> None:
    # The app's transaction has written (it holds the oldest running xid: the record's
    # horizon) before the plan's snapshot is taken, and commits while the plan is read: the
    # plan found the row as dev has it, the lock finds the app's version.
    dev, prod = teams_db(make_db), teams_db(make_db)
    take_teams_dev(project, dev)
    project.point("prod", prod)
    with prod.connect() as app:
        app.execute("BEGIN")
        app.execute("UPDATE public.node SET label = 'the app was here' WHERE id = 1")
        result, locked = _apply_while_the_app_writes(
            project, prod, lambda: app.execute("COMMIT"), TEAMS_SCOPE
        )

    assert result.returncode == 0, result.stderr
    assert locked != dev.fingerprint(TEAMS_SCOPE)
    assert prod.fingerprint(TEAMS_SCOPE) == dev.fingerprint(TEAMS_SCOPE)


def test_a_rollback_stages_from_prod_the_tables_it_already_holds_catch_up_included(
    project: Project, make_db
) -> None:
    # The app inserts, while the plan is read, the very row dev has and prod lacks: the
    # apply then has nothing to write in that table, and the backup catches the row up.
    # Rolling back finds prod already holding that table (and the others the apply did not
    # write): the dump's data and the catch-up's blocks of those tables are read past, and
    # only the table the apply wrote is put back.
    dev, prod = teams_db(make_db), teams_db(make_db)
    new_row = "INSERT INTO public.stamped (id, body) VALUES (21, 'body 21');"
    dev.execute(new_row)
    dev.execute("UPDATE public.node SET label = 'edited in dev' WHERE id = 2")
    take_teams_dev(project, dev)
    project.point("prod", prod)

    result, locked = _apply_while_the_app_writes(project, prod, new_row, TEAMS_SCOPE)

    assert result.returncode == 0, result.stderr
    assert prod.fingerprint(TEAMS_SCOPE) == dev.fingerprint(TEAMS_SCOPE)
    [backup] = project.snapshots("prod")
    assert 'ADD "public"."stamped" ' in (backup / "catchup.copy").read_text()
    rolled = project.run("-v", "rollback", "prod", "--yes")
    assert rolled.exit_code == 0, rolled.output
    assert "recorded 4 tables (3 already hold the snapshot's rows)" in rolled.stderr
    assert "staged   public.stamped" not in rolled.stderr
    assert prod.fingerprint(TEAMS_SCOPE) == locked


def test_a_tampered_catch_up_is_refused(project: Project, make_db) -> None:
    _dev, prod = setup_pair(project, make_db)
    result, _ = _apply_while_the_app_writes(project, prod)
    assert result.returncode == 0, result.stderr
    [backup] = project.snapshots("prod")
    path = backup / "catchup.copy"
    # Drop the app's new answers' versions: the keys are removed, nothing is added back.
    kept, skipping = [], False
    for line in path.read_text().splitlines(keepends=True):
        if line.startswith('ADD "public"."answers" '):
            skipping = True
        if not skipping:
            kept.append(line)
        elif line == "\\.\n":
            skipping = False
    path.write_text("".join(kept))

    def rehash(manifest: dict) -> None:
        manifest["files"]["catchup.copy"] = {
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "bytes": path.stat().st_size,
        }

    _edit_manifest(backup, rehash)
    applied = prod.fingerprint()

    rolled = project.run("rollback", "prod", "--yes")

    assert rolled.exit_code != 0
    assert "public.answers holds" in " ".join(rolled.output.split())
    assert prod.fingerprint() == applied


def test_block_readers_waits_for_a_reader_at_most_lock_timeout_and_changes_nothing(
    project: Project, make_db
) -> None:
    # The default apply never waits for readers; --block-readers must, but only as long
    # as [apply] lock_timeout allows, and then roll back naming the reader.
    _dev, prod = setup_pair(project, make_db)
    project.config('[apply]\nlock_timeout = "500ms"\n')
    original = prod.fingerprint()
    reader = _idle_reader(prod, "public.answers")
    try:
        result = apply(project, "--block-readers")
    finally:
        reader.close()

    assert result.exit_code == 1, result.output
    error = " ".join(result.stderr.split())
    assert "waited longer than [apply] lock_timeout (500ms)" in error
    assert "while dropping foreign keys" in error
    assert "'idle reader'" in error
    assert "rolled back, prod is unchanged" in error
    assert prod.fingerprint() == original
    assert project.snapshots("prod") == []


FRESH = "0a0a0a0a-0000-4000-8000-000000000001"  # a user of dev with a profile and nothing else


def test_a_snapshot_user_deleted_in_prod_after_the_plan_is_created_again(
    project: Project, make_db
) -> None:
    # The plan finds no user to create (prod holds dev's users after a first apply); one of
    # them is deleted (its profile cascades) while the apply waits for its lock: the apply
    # must not trust the plan's "none to create", and creates that user again.
    dev, prod = setup_pair(project, make_db)
    dev.execute(f"INSERT INTO auth.users (id, email) VALUES ('{FRESH}', 'fresh@example.com')")
    dev.execute(
        f"INSERT INTO public.users (id, email) VALUES ('{FRESH}', 'fresh@example.com') "
        "ON CONFLICT (id) DO NOTHING"
    )
    assert project.run("take", "dev").exit_code == 0
    assert apply(project).exit_code == 0
    assert prod.scalar(f"SELECT count(*) FROM auth.users WHERE id = '{FRESH}'") == 1

    result, _ = _apply_while_the_app_writes(
        project, prod, f"DELETE FROM auth.users WHERE id = '{FRESH}'"
    )

    assert result.returncode == 0, result.stderr
    assert "created 1 auth user" in result.stderr
    assert prod.scalar(f"SELECT count(*) FROM auth.users WHERE id = '{FRESH}'") == 1
    assert prod.fingerprint(SCOPE_TABLES) == dev.fingerprint(SCOPE_TABLES)


def test_with_nobody_to_create_and_auth_users_as_it_was_no_insert_is_tried(
    project: Project, make_db
) -> None:
    dev, prod = setup_pair(project, make_db)
    assert apply(project).exit_code == 0
    dev.execute("UPDATE public.answers SET body = body || ' (edited)' WHERE id < 4")
    assert project.run("take", "dev").exit_code == 0
    process = project.spawn("-v", "apply", "prod", "--yes")
    _, err = process.communicate(timeout=180)

    assert process.returncode == 0, err
    assert "the plan found none to create and auth.users is as it was" in err
    assert prod.fingerprint(SCOPE_TABLES) == dev.fingerprint(SCOPE_TABLES)


def _catch_up_state(path: Path, table: str) -> tuple[list[str], set[str]]:
    """``table``'s rows as a difference backup's catch-up leaves them: its ``REPLACE``
    block, then each ``REMOVE`` (by key) and ``ADD`` in order; its columns and rows."""
    columns: list[str] = []
    rows: dict[str, str] = {}  # by the key's text (the first column of a REMOVE block)
    block: tuple[str, list[str]] | None = None
    for line in path.read_text().splitlines():
        if block is None:
            verb, name, rest = line.split(" ", 2)
            names = [c.strip().strip('"') for c in rest[1:].split(") FROM")[0].split(",")]
            block = (verb, names) if name.replace('"', "") == table else ("skip", names)
            if block[0] == "REPLACE":
                columns, rows = names, {}
        elif line == "\\.":
            block = None
        elif block[0] in ("REPLACE", "ADD"):
            rows[line.split("\t")[columns.index("id")]] = line
        elif block[0] == "REMOVE":
            assert block[1] == ["id"], block
            rows.pop(line, None)
    return columns, set(rows.values())


def test_a_difference_backup_holds_the_auth_rows_the_app_writes_while_the_apply_prepares(
    project: Project, make_db
) -> None:
    # Over a network (upload "changed") a re-sync's backup is dev's dump and what tells prod
    # apart from it: the auth tables read whole in the backup's snapshot, beside the
    # staging, and what the app writes until the lock, caught up under it.
    dev, prod = resync_pair(project, make_db)
    dev.execute("UPDATE public.answers SET body = body || ' (dev)' WHERE id IN (3, 4)")
    assert project.run("take", "dev").exit_code == 0

    result, locked = _apply_while_the_app_writes(project, prod)

    assert result.returncode == 0, result.stderr
    assert "'s dump: the" in result.stderr  # the backup is the difference, no pg_dump
    [backup] = project.snapshots("prod")
    columns, backed_up = _catch_up_state(backup / "catchup.copy", "auth.users")
    with psycopg.connect(prod.app_url, autocommit=True) as conn:
        for name, value in SESSION_SETTINGS.items():
            conn.execute("SELECT set_config(%s, %s, false)", [name, value])
        names = ", ".join(f'"{c}"' for c in columns)
        with (
            conn.cursor() as cur,
            cur.copy(f"COPY (SELECT {names} FROM auth.users) TO STDOUT") as copy,
        ):
            held = set(b"".join(copy).decode().splitlines())
    assert len(held) > 10 and backed_up == held  # the apply created no login
    assert project.run("rollback", "prod", "--yes").exit_code == 0
    assert prod.fingerprint() == locked
