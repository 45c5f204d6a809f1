"""Nothing is ever lost: a failure at any phase of an apply leaves the target exactly as it was."""

from __future__ import annotations

import os
import pty
import select
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.fix_apps import apply, setup_pair
from tests.fix_db import SCOPE_TABLES, SQL, Database
from tests.fix_project import Project


def own_scripts(project: Project) -> Path:
    """Copy the default pre/post scripts into the project, to add or remove some."""
    folder = project.path / "sql"
    for phase in ("pre", "post"):
        shutil.copytree(SQL / phase, folder / phase)
    return folder


def _failing_pre_script(project: Project, prod: Database) -> None:
    (own_scripts(project) / "pre" / "020_broken.sql").write_text(
        "UPDATE public.no_such_table SET x = 1;\n"
    )


def _guardrail_violation(project: Project, prod: Database) -> None:
    # Without the drafting pre-script, unlinking topics from published questions is refused.
    folder = own_scripts(project)
    (folder / "pre" / "010_questions_to_draft.sql").unlink()


def _foreign_key_violation(project: Project, prod: Database) -> None:
    # A table outside the scope references playlists; it is empty when the preflight looks,
    # and a row appears after the lock (here: a pre-script), pointing at a playlist the apply
    # deletes: the recount under the lock must refuse before any delete.
    prod.execute(
        "SET ROLE app_owner; CREATE TABLE public.notifications (id int PRIMARY KEY, "
        "playlist_id uuid REFERENCES public.playlists (id))"
    )
    (own_scripts(project) / "pre" / "020_notify.sql").write_text(
        "INSERT INTO public.notifications SELECT 1, id FROM public.playlists LIMIT 1;\n"
    )


def _cascade_after_preflight(project: Project, prod: Database) -> None:
    # Same, with ON DELETE CASCADE: the apply would delete the new row without being asked.
    prod.execute(
        "SET ROLE app_owner; CREATE TABLE public.notifications (id int PRIMARY KEY, "
        "playlist_id uuid REFERENCES public.playlists (id) ON DELETE CASCADE)"
    )
    (own_scripts(project) / "pre" / "020_notify.sql").write_text(
        "INSERT INTO public.notifications SELECT row_number() OVER (), id "
        "FROM public.playlists LIMIT 3;\n"
    )


def _failing_post_script(project: Project, prod: Database) -> None:
    (own_scripts(project) / "post" / "020_broken.sql").write_text("SELECT 1 / 0;\n")


def _parity_mismatch(project: Project, prod: Database) -> None:
    (own_scripts(project) / "post" / "020_drift.sql").write_text(
        "UPDATE public.categories SET name = name || ' (edited)' WHERE id = 2;\n"
    )


def _missing_status_restore(project: Project, prod: Database) -> None:
    (own_scripts(project) / "post" / "010_restore_question_status.sql").unlink()


Setup = Callable[[Project, Database], None]
FAILURES: dict[str, tuple[Setup, str]] = {
    "failing pre-script": (
        _failing_pre_script,
        'pre-script sql/pre/020_broken.sql failed: relation "public.no_such_table" does not exist',
    ),
    "guardrail violation": (
        _guardrail_violation,
        "failed while deleting: guardrail: cannot unlink topic",
    ),
    "foreign key violation": (
        _foreign_key_violation,
        "public.notifications(playlist_id) -> public.playlists(id) (on delete no action): 1 row "
        "of public.notifications refers to 1 public.playlists row (id ",
    ),
    "cascade to rows written after the preflight": (
        _cascade_after_preflight,
        "public.notifications(playlist_id) -> public.playlists(id) (on delete cascade): 3 rows "
        "of public.notifications refer to 3 public.playlists rows (id ",
    ),
    "failing post-script": (
        _failing_post_script,
        "post-script sql/post/020_broken.sql failed: division by zero",
    ),
    "parity mismatch": (
        _parity_mismatch,
        "parity check failed for public.categories (differs in name)",
    ),
    "status not restored": (
        _missing_status_restore,
        "parity check failed for public.questions (differs in status)",
    ),
}


@pytest.mark.parametrize("failure", FAILURES)
def test_a_failure_at_any_phase_leaves_the_target_unchanged(
    project: Project, make_db, failure: str
) -> None:
    _dev, prod = setup_pair(project, make_db)
    setup, message = FAILURES[failure]
    setup(project, prod)
    original = prod.fingerprint()

    result = apply(project)

    assert result.exit_code == 1, result.output
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("Error: ") and message in error, error
    assert "prod is unchanged" in error
    assert "Traceback" not in result.output
    notes = [ln for ln in result.stderr.splitlines() if ln.startswith("note")]
    assert all(ln.startswith("note (rolled back with the rest): ") for ln in notes), notes
    assert prod.fingerprint() == original
    assert project.snapshots("prod") == []
    assert list((project.path / "snapshots" / "prod").glob(".tmp-*")) == []


def _slow_inserts(prod: Database, seconds: int) -> None:
    """Make the apply pause while it inserts answers (a statement trigger that sleeps)."""
    prod.execute(
        "CREATE FUNCTION public.slow_down() RETURNS trigger LANGUAGE plpgsql AS "
        f"$$ BEGIN PERFORM pg_sleep({seconds}); RETURN NULL; END $$; "
        "CREATE TRIGGER slow_down AFTER INSERT ON public.answers "
        "FOR EACH STATEMENT EXECUTE FUNCTION public.slow_down()"
    )


def _wait_for_insert(prod: Database, process) -> int:
    """The pid of the apply's backend once it is inserting answers."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        rows = prod.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name = 'snapshot' AND state = 'active' "
            'AND query LIKE \'INSERT INTO "public"."answers"%%\''
        )
        if rows:
            return int(rows[0][0])
        time.sleep(0.02)
    raise AssertionError("the apply never reached the answers insert")


def _trigger_states(prod: Database) -> list[tuple]:
    """Every app trigger and whether it fires (a bulk apply changes them inside its
    transaction: snapshot.apply.replica)."""
    return prod.execute(
        "SELECT tgrelid::regclass::text, tgname, tgenabled FROM pg_trigger "
        "WHERE NOT tgisinternal ORDER BY 1, 2"
    )


def test_killed_apply_leaves_target_unchanged(project: Project, make_db) -> None:
    _dev, prod = setup_pair(project, make_db)
    _slow_inserts(prod, 30)
    original = prod.fingerprint()
    triggers = _trigger_states(prod)

    process = project.spawn("apply", "prod", "--yes")
    backend = _wait_for_insert(prod, process)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    prod.wait_until_gone(backend)  # the server noticed the client die and rolled back

    assert prod.fingerprint() == original
    assert _trigger_states(prod) == triggers
    assert project.snapshots("prod") == []
    listed = project.run("list", "prod", "--json")
    assert listed.stdout.strip() == "[]"
    # The next apply settles the sealed backup left behind (its apply never committed).
    prod.execute("DROP TRIGGER slow_down ON public.answers")
    again = apply(project)
    assert again.exit_code == 0, again.output
    assert [p.name.split("-", 1)[1] for p in project.snapshots("prod")] == ["pre-apply"]
    assert list((project.path / "snapshots" / "prod").glob(".tmp-*")) == []


def test_terminated_connection_leaves_target_unchanged(project: Project, make_db) -> None:
    _dev, prod = setup_pair(project, make_db)
    _slow_inserts(prod, 30)
    original = prod.fingerprint()
    triggers = _trigger_states(prod)

    process = project.spawn("apply", "prod", "--yes")
    backend = _wait_for_insert(prod, process)
    prod.execute("SELECT pg_terminate_backend(%s)", [backend])
    _out, err = process.communicate(timeout=60)

    assert process.returncode == 1, err
    assert "lost the connection to prod while inserting" in err
    assert "prod is unchanged" in err and "Traceback" not in err
    prod.wait_until_gone(backend)
    assert prod.fingerprint() == original
    assert _trigger_states(prod) == triggers
    assert project.snapshots("prod") == []
    assert list((project.path / "snapshots" / "prod").glob(".tmp-*")) == []


def test_a_second_apply_is_refused_while_one_runs(project: Project, make_db) -> None:
    _dev, prod = setup_pair(project, make_db)
    _slow_inserts(prod, 5)
    original = prod.fingerprint()

    first = project.spawn("apply", "prod", "--yes")
    _wait_for_insert(prod, first)
    second = apply(project)
    first.communicate(timeout=60)

    assert second.exit_code == 1
    assert "another snapshot apply or rollback is running against prod" in " ".join(
        second.stdout.split()
    )
    assert "Error: preflight found 1 error" in second.stderr
    assert first.returncode == 0
    assert prod.fingerprint() != original  # the first one went through, alone


@pytest.mark.parametrize(
    "command", [["apply", "prod", "--yes"], ["cutover", "dev", "prod", "--yes"]]
)
def test_ctrl_c_says_prod_is_unchanged_and_exits_130(
    project: Project, make_db, command: list[str]
) -> None:
    _dev, prod = setup_pair(project, make_db)
    _slow_inserts(prod, 30)
    original = prod.fingerprint()

    process = project.spawn(*command)
    backend = _wait_for_insert(prod, process)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)

    assert process.returncode == 130, err
    assert "Traceback" not in err and "Aborted!" not in err
    error = err.strip().splitlines()[-1]
    assert error.startswith("Error: ")
    assert "interrupted (Ctrl-C)" in error
    prod.wait_until_gone(backend)
    assert prod.fingerprint() == original
    assert project.snapshots("prod") == []
    if command[0] == "apply":
        assert "while inserting and updating: rolled back, prod is unchanged" in error
    else:  # the cutover's step report, as on any other stop
        assert "apply      failed" in out
        assert "state: nothing was changed: prod is exactly as it was" in out


@pytest.mark.parametrize(
    "command", [["apply", "prod", "--yes"], ["cutover", "dev", "prod", "--yes"]]
)
def test_sigterm_says_prod_is_unchanged_and_exits_143(
    project: Project, make_db, command: list[str]
) -> None:
    _dev, prod = setup_pair(project, make_db)
    _slow_inserts(prod, 30)
    original = prod.fingerprint()

    process = project.spawn(*command)
    backend = _wait_for_insert(prod, process)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=60)

    assert process.returncode == 143, err
    assert "Traceback" not in err
    error = err.strip().splitlines()[-1]
    assert error.startswith("Error: ") and "terminated (SIGTERM)" in error
    prod.wait_until_gone(backend)
    assert prod.fingerprint() == original
    assert project.snapshots("prod") == []
    assert list((project.path / "snapshots" / "prod").glob(".tmp-*")) == []
    if command[0] == "apply":
        assert error == (
            "Error: terminated (SIGTERM) while inserting and updating: rolled back, prod is "
            "unchanged"
        )
    else:
        assert "apply      failed" in out
        assert "state: nothing was changed: prod is exactly as it was" in out


def test_ctrl_c_at_the_prompt_changes_nothing_and_exits_130(project: Project, make_db) -> None:
    _dev, prod = setup_pair(project, make_db)
    original = prod.fingerprint()
    main, terminal = pty.openpty()
    try:
        process = project.spawn("apply", "prod", stdin=terminal)
        assert process.stderr is not None
        seen = ""
        deadline = time.monotonic() + 120
        while "Type prod to apply" not in seen:
            assert time.monotonic() < deadline, seen
            ready, _, _ = select.select([process.stderr], [], [], 1)
            if ready:
                chunk = os.read(process.stderr.fileno(), 65536).decode()
                assert chunk, f"the apply ended before asking: {seen}"
                seen += chunk
        process.send_signal(signal.SIGINT)
        _out, err = process.communicate(timeout=60)
    finally:
        os.close(main)
        os.close(terminal)

    assert process.returncode == 130, seen + err
    assert "Aborted!" not in err and "Traceback" not in err
    assert err.strip().splitlines()[-1] == "Error: interrupted (Ctrl-C): nothing was changed"
    assert prod.fingerprint() == original
    assert project.snapshots("prod") == []
    assert list((project.path / "snapshots" / "prod").glob(".tmp-*")) == []


def test_nothing_is_held_on_prod_while_the_prompt_waits(project: Project, make_db) -> None:
    # The plan is shown and the question asked with no lock, no open transaction and no
    # exported snapshot on prod; what the app writes meanwhile is in the apply and its backup.
    dev, prod = setup_pair(project, make_db)
    main, terminal = pty.openpty()
    try:
        process = project.spawn("apply", "prod", stdin=terminal)
        assert process.stderr is not None
        seen = ""
        deadline = time.monotonic() + 120
        while "Type prod to apply" not in seen:
            assert time.monotonic() < deadline, seen
            ready, _, _ = select.select([process.stderr], [], [], 1)
            if ready:
                chunk = os.read(process.stderr.fileno(), 65536).decode()
                assert chunk, f"the apply ended before asking: {seen}"
                seen += chunk
        held = prod.execute(
            "SELECT a.state, a.backend_xmin IS NOT NULL, EXISTS (SELECT 1 FROM pg_locks l "
            "WHERE l.pid = a.pid AND l.locktype = 'advisory') FROM pg_stat_activity a "
            "WHERE a.datname = current_database() AND a.pid <> pg_backend_pid() "
            "AND a.application_name LIKE 'snapshot%%'"
        )
        prod.execute(
            "INSERT INTO public.question_attempts (user_id, question_id, is_correct) "
            "SELECT user_id, question_id, true FROM public.question_attempts LIMIT 1"
        )
        meanwhile = prod.fingerprint(SCOPE_TABLES)
        os.write(main, b"prod\n")
        _out, err = process.communicate(timeout=120)
    finally:
        os.close(main)
        os.close(terminal)

    assert held and all(state == "idle" and not xmin and not lock for state, xmin, lock in held), (
        held
    )
    assert process.returncode == 0, seen + err
    assert prod.fingerprint(SCOPE_TABLES) == dev.fingerprint(SCOPE_TABLES)
    rolled = project.run("rollback", "prod", "--yes")
    assert rolled.exit_code == 0, rolled.output
    # the backup holds what the app wrote meanwhile (auth users the apply created stay)
    assert prod.fingerprint(SCOPE_TABLES) == meanwhile
