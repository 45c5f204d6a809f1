"""A database error reads the same wherever it is met: one sentence for each kind of failure,
naming the database, what was running, and whether the target is known unchanged."""

from __future__ import annotations

import os
from collections.abc import Iterator

import psycopg
import pytest

from snapshot.db import connection_lost, error_sentence
from tests.fix_apps import setup_pair
from tests.fix_db import Server
from tests.fix_project import Project

TIME_LIMIT_FIX = (
    "a time limit of the server or role cut it short; snapshot's own sessions use [session] "
    "statement_timeout in snapshot.toml (no limit unless set there): raise it"
)


@pytest.fixture
def session(server: Server) -> Iterator[psycopg.Connection]:
    with server.connect() as conn:
        conn.autocommit = True
        yield conn


def _error(conn: psycopg.Connection, query: str) -> psycopg.Error:
    with pytest.raises(psycopg.Error) as raised:
        conn.execute(query)  # type: ignore[arg-type]
    return raised.value


def test_a_lock_not_granted_in_time(server: Server, session: psycopg.Connection) -> None:
    key = os.getpid()  # other test runs may share the server
    with server.connect() as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", [key])
        session.execute("SET lock_timeout = '50ms'")
        with pytest.raises(psycopg.errors.LockNotAvailable) as raised:
            session.execute("SELECT pg_advisory_lock(%s)", [key])
    exc = raised.value

    assert error_sentence(exc, "prod", "inserting") == (
        "snapshot waited longer than its lock_timeout for a lock on prod while inserting "
        "(canceling statement due to lock timeout)"
    )
    assert error_sentence(
        exc,
        "prod",
        "inserting",
        unchanged=True,
        lock_limit="[apply] lock_timeout (50ms)",
        lock_holders="held by 'app' (pid 7)",
    ) == (
        "snapshot waited longer than [apply] lock_timeout (50ms) for a lock on prod while "
        "inserting: held by 'app' (pid 7); rolled back, prod is unchanged"
    )


def test_a_statement_the_server_cancelled(session: psycopg.Connection) -> None:
    session.execute("SET statement_timeout = '50ms'")
    exc = _error(session, "SELECT pg_sleep(5)")

    assert not connection_lost(exc)
    assert error_sentence(exc, "prod", "deleting", unchanged=True) == (
        "prod cancelled a statement while deleting (canceling statement due to statement "
        f"timeout): {TIME_LIMIT_FIX}; rolled back, prod is unchanged"
    )


def test_a_lost_connection_says_the_server_rolls_back(
    server: Server, session: psycopg.Connection
) -> None:
    pid = session.info.backend_pid
    with server.connect() as other:
        other.execute("SELECT pg_terminate_backend(%s, 5000)", [pid])  # waits till gone
    exc = _error(session, "SELECT 1")

    assert connection_lost(exc)
    reason = str(exc).strip().splitlines()[0]
    assert error_sentence(exc, "dev", "running take") == (
        f"lost the connection to dev while running take ({reason})"
    )
    assert error_sentence(exc, "prod", "inserting", unchanged=True) == (
        f"lost the connection to prod while inserting ({reason}): the server rolls the "
        "transaction back, so prod is unchanged"
    )


def test_a_server_failure_that_keeps_the_session_is_no_lost_connection(
    session: psycopg.Connection,
) -> None:
    exc = _error(session, "SELECT repeat('x', 2000000000)")  # program limit exceeded

    assert isinstance(exc, psycopg.OperationalError) and not connection_lost(exc)
    assert error_sentence(exc, "prod", "updating").startswith(
        "a statement on prod failed while updating: "
    )
    assert session.execute("SELECT 1").fetchone() == (1,)  # the session is still there


def test_any_other_failed_statement(session: psycopg.Connection) -> None:
    exc = _error(session, "SELECT 1/0")

    assert error_sentence(exc, "prod", "deleting", unchanged=True) == (
        "a statement on prod failed while deleting: division by zero; rolled back, prod is "
        "unchanged"
    )


def test_a_command_cut_short_by_a_time_limit_says_so_in_one_line(project: Project, make_db) -> None:
    setup_pair(project, make_db)
    project.config('[session]\nstatement_timeout = "1ms"\n')

    result = project.run("verify", "dev", "prod")

    assert result.exit_code == 1, result.output
    assert result.stderr.strip().splitlines()[-1] == (
        "Error: the database cancelled a statement while running verify (canceling statement "
        f"due to statement timeout): {TIME_LIMIT_FIX}"
    )
