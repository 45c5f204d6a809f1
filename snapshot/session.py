"""What check, apply and rollback know before anything changes: one prepared session.

Opening a session connects to the target and reads what the catalog says about the
snapshot's scope. It raises only when it cannot go on at all (no connection); everything
else that could stop an apply (a missing tool, a cycle, a missing table) is recorded for
the preflight to report, all at once.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg.pq import TransactionStatus

from snapshot import catalog, pgtools
from snapshot.archive import Snapshot
from snapshot.catalog import ForeignKey, ServerInfo, TableShape
from snapshot.config import Config
from snapshot.db import connect
from snapshot.environments import Connection, resolve_connection
from snapshot.errors import Refused, SnapshotError
from snapshot.manifest import TableEntry
from snapshot.names import TableName

log = logging.getLogger(__name__)

# One apply or rollback per database at a time (advisory locks are per database).
ADVISORY_KEY = 0x736E6170  # "snap"


@dataclass(frozen=True)
class Session:
    """A snapshot about to meet a target, and everything read about both: facts, not state.

    What one apply accumulates (its rows, plan, backup, notes) is that apply's own object,
    :class:`snapshot.apply.state.ApplyRun`, which holds its session.
    """

    config: Config
    action: str
    snapshot: Snapshot
    target: Connection
    conn: psycopg.Connection
    info: ServerInfo
    shapes: Mapping[TableName, TableShape]
    fks: Sequence[ForeignKey]
    order: tuple[TableName, ...]
    auth_entries: tuple[TableEntry, ...]
    pg_restore: pgtools.PgTool | None
    pg_dump: pgtools.PgTool | None
    problems: Mapping[str, str] = field(default_factory=dict)  # what stops it, for preflight
    auth_withheld: str = ""  # why the snapshot's auth users are not created (snapshot.direction)

    @functools.cached_property
    def entries(self) -> dict[TableName, TableEntry]:
        """The snapshot's scoped tables (auth tables excluded)."""
        return {t.table: t for t in self.snapshot.manifest.scope_tables}

    @property
    def withheld_tables(self) -> frozenset[TableName]:
        """The snapshot's auth tables that are not staged (:attr:`auth_withheld`)."""
        copied = {e.table for e in self.auth_entries}
        auth = (t.table for t in self.snapshot.manifest.tables if t.auth)
        return frozenset(t for t in auth if t not in copied)


def _tool(
    name: str, major: int, pg_bin: Path | None, why: str, problems: dict[str, str]
) -> pgtools.PgTool | None:
    try:
        return pgtools.find_tool(name, major, pg_bin, why)
    except SnapshotError as exc:
        problems[name] = str(exc)
        return None


@contextlib.contextmanager
def open_session(
    config: Config,
    target_env: str,
    snapshot: Snapshot,
    *,
    action: str,
    pg_bin: Path | None,
    backup: bool,
    auth_withheld: str = "",
) -> Iterator[Session]:
    """Connect to ``target_env`` and read the catalog for ``snapshot``'s scope.

    ``auth_withheld``: why the snapshot's auth users must not be created (they are then
    neither staged nor created: the target's users are what the scope's rows may refer to).
    """
    target = resolve_connection(config.environment(target_env))
    conn = connect(target)
    with contextlib.closing(conn), _releasing_locks(conn):
        info = catalog.server_info(conn)
        manifest = snapshot.manifest
        problems: dict[str, str] = {}
        dump_major = int(manifest.pg_dump_version.split(".")[0])
        pg_restore = _tool(
            "pg_restore",
            dump_major,
            pg_bin,
            f"reading {snapshot.id} (written by pg_dump {manifest.pg_dump_version})",
            problems,
        )
        pg_dump = None
        if backup:
            pg_dump = _tool(
                "pg_dump",
                info.major,
                pg_bin,
                f"the pre-{action} backup of {target_env} (PostgreSQL {info.version})",
                problems,
            )
        archived_auth = (
            tuple(t for t in manifest.tables if t.auth) if config.scope.auth_users else ()
        )
        auth_entries = () if auth_withheld else archived_auth
        tables = [*manifest.scope.tables, *(t.table for t in archived_auth)]
        with conn.pipeline():  # both in one round trip (a missing table has no keys)
            shapes_later = catalog.table_shapes_later(conn, tables)
            fks_later = catalog.foreign_keys_later(conn, manifest.scope.tables)
        shapes, fks = shapes_later(), fks_later()
        order: tuple[TableName, ...] = ()
        try:
            order = catalog.apply_order([t for t in config.scope.tables if t in shapes], fks)
        except Refused as exc:
            problems["order"] = str(exc)
        yield Session(
            config,
            action,
            snapshot,
            target,
            conn,
            info,
            shapes,
            fks,
            order,
            auth_entries,
            pg_restore,
            pg_dump,
            problems,
            auth_withheld=auth_withheld,
        )


@contextlib.contextmanager
def _releasing_locks(conn: psycopg.Connection) -> Iterator[None]:
    """Release the apply lock before the session closes, not when the server gets round to it.

    A closed connection's backend exits, and drops its advisory locks, a moment later: an
    apply started right after this one would find the lock still held.
    """
    try:
        yield
    finally:
        if not conn.closed and conn.info.transaction_status == TransactionStatus.IDLE:
            with contextlib.suppress(psycopg.Error):
                conn.execute("SELECT pg_advisory_unlock_all()")


def apply_lock_holder(conn: psycopg.Connection) -> str | None:
    """Who holds the apply lock on this database ("backend pid N since T"), or None if free.

    The lock is taken and kept for the session when free (apply), so check and apply call
    the same function; check releases it with :func:`release_apply_lock`.
    """
    return apply_lock_holder_later(conn)()


def apply_lock_holder_later(conn: psycopg.Connection) -> Callable[[], str | None]:
    """:func:`apply_lock_holder`: the lock tried now (in the caller's pipeline), its holder
    read when called (asked then, when it is taken)."""
    tried = conn.execute("SELECT pg_try_advisory_lock(%s)", (ADVISORY_KEY,))
    return lambda: _holder(conn, tried.fetchone())


def _holder(conn: psycopg.Connection, row: Sequence[Any] | None) -> str | None:
    if row and row[0]:
        return None
    holder = conn.execute(
        "SELECT a.pid, a.backend_start FROM pg_locks l "
        "JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory' "
        "AND l.objid = %s AND l.granted AND l.database = "
        "(SELECT oid FROM pg_database WHERE datname = current_database())",
        (ADVISORY_KEY,),
    ).fetchone()
    if holder is None:
        return "another session"
    since = f", connected since {holder[1]:%H:%M:%S} UTC" if holder[1] else ""
    return f"backend pid {holder[0]}{since}"


def release_apply_lock(conn: psycopg.Connection) -> None:
    conn.execute("SELECT pg_advisory_unlock(%s)", (ADVISORY_KEY,))
