"""Database sessions: opened with the settings every query of the tool relies on, and their
errors told as the sentences a user reads.

Every command meets the same few failures (a lock not granted in time, a statement the
server cancelled, a lost connection, a statement refused); :func:`error_sentence` is the
one place that words them, so a statement timeout reads the same in apply, take or cutover.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Callable, Iterator

import psycopg
from psycopg import sql

from snapshot import catalog, latency
from snapshot.environments import Connection
from snapshot.errors import ConnectionFailed

log = logging.getLogger(__name__)

# Pinned so that text output, and therefore checksums, do not depend on the server's or the
# role's defaults. search_path without "public" makes format_type() schema-qualify user types,
# so column fingerprints compare across databases. row_security=off turns a read that RLS
# would silently filter into an error instead of a short count.
SESSION_SETTINGS = {
    "TimeZone": "UTC",
    "DateStyle": "ISO, YMD",
    "IntervalStyle": "postgres",
    "extra_float_digits": "1",
    "bytea_output": "hex",
    "lc_monetary": "C",
    "xmloption": "content",  # as pg_dump and pg_restore set it: an xml fragment loads back
    "row_security": "off",
    "search_path": "pg_catalog, pg_temp",
    "application_name": "snapshot",
    "lock_timeout": "0",
    # The tool's queries scan whole tables through simple expressions: compiling them costs
    # more than it saves (50-150 ms a query, much of it under the apply's lock).
    "jit": "off",
    # The tool analyzes only its own temporary tables, whose joins are on keys: a sample of
    # 3,000 rows plans them as well as one of 30,000, for a fifth of the time (20-40 ms of
    # each large table's ANALYZE, a dozen of them in an apply).
    "default_statistics_target": "10",
}
# Settings that do not exist on every supported server: (name, first server_version_num).
_INTRODUCED = {
    "transaction_timeout": 170000,
    "client_connection_check_interval": 140000,
    "jit": 110000,
}


_ATTEMPT = re.compile(r"^(?:connection failed: )?connection to server .*? failed: ")


def libpq_reason(text: str) -> str:
    """libpq's connection error as one line, its cause kept.

    libpq writes ``connection to server at "h", port p failed: Connection refused`` and a
    tab-indented hint on the next line ("Is the server running…"); with several addresses,
    one such block per attempt. The last attempt's cause and hint are kept, on one line.
    """
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    if not lines:
        return "connection failed"
    starts = [i for i, ln in enumerate(lines) if _ATTEMPT.match(ln)] or [0]
    cause, *hints = lines[starts[-1] :]
    cause = _ATTEMPT.sub("", cause).removeprefix("connection failed: ")
    cause = re.sub(r"^(FATAL|ERROR):\s+", "", cause)
    if hints:
        hint = " ".join(hints).rstrip(".")
        cause += f" ({hint[:1].lower()}{hint[1:]})"
    return cause


def _explain(exc: psycopg.OperationalError, target: Connection) -> str:
    text = str(exc).strip()
    where = target.describe()
    if "password authentication failed" in text or "no password supplied" in text:
        return (
            f"{where} refused the password for user {target.user!r}: "
            f"check {target.password_from} in {target.source}"
        )
    if "Tenant or user not found" in text:
        return (
            f"the pooler at {target.host} does not know user {target.user!r} "
            "(Tenant or user not found): copy the pooler host from the dashboard or "
            "set SUPABASE_ACCESS_TOKEN so it is discovered"
        )
    reason = libpq_reason(text) if text else type(exc).__name__
    if "does not exist" in text and ("database" in text or "role" in text):
        return f"{where}: {reason}: check {target.source}"
    return f"cannot connect to {where}: {reason}: check the host and port in {target.source}"


def connect(target: Connection) -> psycopg.Connection:
    """Open an autocommit session on ``target`` with :data:`SESSION_SETTINGS` applied.

    Callers open transactions explicitly with ``conn.transaction()``, after setting
    ``conn.isolation_level`` and ``conn.read_only`` as they need.
    """
    log.debug("connecting to %s", target.describe())
    try:
        # No prepared statements (prepare_threshold=None): Supabase's pooler in transaction
        # mode cannot keep them, and psycopg throws its own away (DEALLOCATE ALL, a round
        # trip) after every DROP or ROLLBACK, which the apply runs many of.
        conn = psycopg.connect(
            target.conninfo(),
            password=target.password,
            autocommit=True,
            connect_timeout=10,
            prepare_threshold=None,
        )
    except psycopg.OperationalError as exc:
        raise ConnectionFailed(_explain(exc, target)) from None
    # The session's own time limits (snapshot.toml [session]) replace the server's and the
    # role's: Supabase's 2-minute statement_timeout would otherwise cancel a large apply.
    # If the tool dies mid-statement, client_connection_check_interval makes the server
    # notice within a second and roll back, instead of holding the apply's locks.
    settings = {
        **SESSION_SETTINGS,
        **target.session,
        "client_connection_check_interval": "1s",
    }
    settings = {
        k: v for k, v in settings.items() if conn.info.server_version >= _INTRODUCED.get(k, 0)
    }
    # Set after connecting, in one round trip: Supabase's pooler drops startup options.
    calls = sql.SQL(", ").join(
        sql.SQL("set_config({}, {}, false)").format(sql.Literal(k), sql.Literal(v))
        for k, v in settings.items()
    )
    try:
        started = time.monotonic()
        # what the server is, in the same round trip (catalog.server_info reads it)
        row = conn.execute(sql.SQL("SELECT {}, {}").format(catalog.IDENTITY, calls)).fetchone()
        latency.note(conn, time.monotonic() - started)
        catalog.remember_identity(conn, row)
    except psycopg.Error as exc:
        conn.close()
        raise ConnectionFailed(
            f"{target.describe()} refused snapshot's session settings ({exc}): check [session] "
            "in snapshot.toml"
        ) from None
    return conn


# The two search_path switches as statements without parameters, for a simple query that
# sends several statements in one round trip (scripts.run).
APP_SEARCH_PATH = (
    "SELECT set_config('search_path', reset_val, true) FROM pg_settings WHERE name = 'search_path'"
)
TOOL_SEARCH_PATH = f"SELECT set_config('search_path', '{SESSION_SETTINGS['search_path']}', true)"


def use_app_search_path(conn: psycopg.Connection, *, local: bool = True) -> None:
    """Give the current transaction the ``search_path`` the target's own sessions start with.

    That is the role's or database's default (``reset_val``: Supabase's is ``"$user",
    public, extensions``), which the app's trigger functions and the user's scripts are
    written against: a trigger naming its tables unqualified finds them. Transaction-local;
    a savepoint rolled back restores the pinned one. The tool's own queries run with
    :data:`SESSION_SETTINGS`' (:func:`use_tool_search_path`). ``local=False``: for the
    session (an autocommit one), until :func:`use_tool_search_path` with ``local=False``.
    """
    conn.execute(
        "SELECT set_config('search_path', reset_val, %s) FROM pg_settings "
        "WHERE name = 'search_path'",
        (local,),
    )


def use_tool_search_path(conn: psycopg.Connection, *, local: bool = True) -> None:
    """Back to the pinned ``search_path`` (see :data:`SESSION_SETTINGS`)."""
    conn.execute(
        "SELECT set_config('search_path', %s, %s)", (SESSION_SETTINGS["search_path"], local)
    )


def error_message(exc: psycopg.Error) -> str:
    """The server's one-line message for a failed statement."""
    primary = exc.diag.message_primary if not isinstance(exc, psycopg.OperationalError) else None
    text = primary or str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def cancelled_message(exc: psycopg.errors.QueryCanceled, env: str, doing: str) -> str:
    """The sentence for a statement the server cancelled (a time limit, or someone's cancel)."""
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else "canceling statement"
    if "timeout" in reason:
        fix = (
            "a time limit of the server or role cut it short; snapshot's own sessions use "
            "[session] statement_timeout in snapshot.toml (no limit unless set there): raise it"
        )
    else:
        fix = "someone cancelled it (pg_cancel_backend)"
    return f"{env} cancelled a statement while {doing} ({reason}): {fix}"


def connection_lost(exc: psycopg.Error) -> bool:
    """Whether ``exc`` ended the session: the connection broke, or the server closed it
    (terminated backend, shutdown, crash); then the server rolls its transaction back."""
    if not isinstance(exc, psycopg.OperationalError):
        return False
    return exc.sqlstate is None or exc.sqlstate.startswith(("08", "57P"))


def error_sentence(
    exc: psycopg.Error,
    env: str,
    doing: str,
    *,
    unchanged: bool = False,
    lock_limit: str = "its lock_timeout",
    lock_holders: str | None = None,
) -> str:
    """The user's sentence for ``exc``, met on ``env`` while ``doing`` ("inserting").

    A lock not granted in time, a statement cancelled (a time limit, or someone), a lost
    connection, or any other failed statement. ``unchanged``: ``env`` is known unchanged
    (its transaction rolled back), and the sentence ends by saying so. ``lock_limit`` names
    the limit a lock wait ran into, ``lock_holders`` who held the lock.
    """
    if isinstance(exc, psycopg.errors.LockNotAvailable):
        said = f"snapshot waited longer than {lock_limit} for a lock on {env} while {doing}"
        said += f": {lock_holders}" if lock_holders else f" ({error_message(exc)})"
    elif isinstance(exc, psycopg.errors.QueryCanceled):
        said = cancelled_message(exc, env, doing)
    elif connection_lost(exc):
        said = f"lost the connection to {env} while {doing} ({error_message(exc)})"
        if unchanged:
            return f"{said}: the server rolls the transaction back, so {env} is unchanged"
        return said
    else:
        said = f"a statement on {env} failed while {doing}: {error_message(exc)}"
    return f"{said}; rolled back, {env} is unchanged" if unchanged else said


@contextlib.contextmanager
def snapshot_session(
    target: Connection,
    snapshot_id: str,
    prepare: Callable[[psycopg.Connection], None] | None = None,
) -> Iterator[psycopg.Connection]:
    """A second session on ``target`` reading the exported snapshot ``snapshot_id``, in a
    ``REPEATABLE READ, READ ONLY`` transaction rolled back when done: it sees exactly the
    rows the exporting transaction and pg_dump see, and reads them on another core.
    ``prepare`` runs first, in autocommit (what a read-only transaction may not do)."""
    with contextlib.closing(connect(target)) as session:
        if prepare is not None:
            prepare(session)
        session.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        session.read_only = True
        with session.transaction(force_rollback=True):
            session.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot_id)))
            yield session
