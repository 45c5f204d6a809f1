"""``snapshot verify``: compare two live databases over the one scope, counts and checksums.

Both sides are read in REPEATABLE READ, READ ONLY transactions, at the same time (one
thread each), with the same checksum that take and apply use.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from snapshot import archive, catalog
from snapshot.catalog import TableShape
from snapshot.checksum import TableStats, column_checksums, kind_of, table_stats
from snapshot.config import Config
from snapshot.db import connect
from snapshot.environments import Connection, resolve_connection
from snapshot.errors import ConfigError
from snapshot.names import AUTH_USERS, TableName
from snapshot.parity import TableParity
from snapshot.take import identity

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VerifyReport:
    """Two live databases compared table by table."""

    source: str
    target: str
    tables: tuple[TableParity, ...]
    auth_users_missing: int | None

    @property
    def matches(self) -> bool:
        return all(t.match for t in self.tables) and not self.auth_users_missing

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "target": self.target,
            "matches": self.matches,
            "tables": [t.to_json() for t in self.tables],
            "auth_users_missing": self.auth_users_missing,
        }


@dataclass
class _Side:
    env: str
    target: Connection
    conn: psycopg.Connection
    shapes: dict[TableName, TableShape]


def _open(config: Config, env: str) -> _Side:
    target = resolve_connection(config.environment(env))
    conn = connect(target)
    try:
        fix = config.scope.fix("fix [scope] tables in snapshot.toml")
        shapes = catalog.require_tables(conn, config.scope.tables, env, fix)
        auth = [AUTH_USERS] if config.scope.auth_users else []
        readable = [*shapes, *catalog.table_shapes(conn, auth)]
        catalog.require_readable(conn, readable, f"cannot compare {env}")
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        conn.read_only = True
    except BaseException:
        conn.close()
        raise
    return _Side(env, target, conn, shapes)


def _stats(
    side: _Side, columns: dict[TableName, Sequence[str]], ignored: dict[TableName, tuple[str, ...]]
) -> dict[TableName, TableStats]:
    return {
        table: table_stats(side.conn, table, names, ignored[table])
        for table, names in columns.items()
    }


def _auth_ids(conn: psycopg.Connection) -> list[Any]:
    return [r[0] for r in conn.execute("SELECT id FROM auth.users")]


def verify(config: Config, source_env: str, target_env: str) -> VerifyReport:
    """Compare ``source_env`` and ``target_env`` over the configured scope."""
    source = _open(config, source_env)
    with contextlib.closing(source.conn):
        target = _open(config, target_env)
        with contextlib.closing(target.conn):
            same = archive.same_database(
                identity(source.target, catalog.server_info(source.conn)),
                source.target.project_ref,
                identity(target.target, catalog.server_info(target.conn)),
                target.target.project_ref,
            )
            if same:
                raise ConfigError(
                    f"{source_env} and {target_env} are the same database ({'; '.join(same)}): "
                    "a verify would prove nothing; check the env files"
                )
            return _compare(config, source, target)


def _compare(config: Config, source: _Side, target: _Side) -> VerifyReport:
    columns: dict[TableName, Sequence[str]] = {}
    drift: dict[TableName, tuple[str, ...]] = {}
    for table in config.scope.tables:
        src = source.shapes[table].column_names
        dst = set(target.shapes[table].column_names)
        columns[table] = [c for c in src if c in dst]
        if set(src) != dst:
            drift[table] = tuple(sorted(set(src) ^ dst))
    ignored = {t: config.ignored_columns(t) for t in config.scope.tables}
    with source.conn.transaction(force_rollback=True), target.conn.transaction(force_rollback=True):
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(_stats, source, columns, ignored)
            target_stats = _stats(target, columns, ignored)
            source_stats = pending.result()
        for table in config.scope.tables:  # one line per table, both sides read at once
            log.info(
                "  %-32s %s %10s rows  %s %10s rows",
                table,
                source.env,
                f"{source_stats[table].rows:,}",
                target.env,
                f"{target_stats[table].rows:,}",
            )
        results = []
        for table in config.scope.tables:
            a, b = source_stats[table], target_stats[table]
            match = a == b and table not in drift
            differing = drift.get(table, ())
            if not match and a.rows == b.rows and table not in drift:
                used = [c for c in columns[table] if c not in ignored[table]]
                left = column_checksums(source.conn, table, used)
                right = column_checksums(target.conn, table, used)
                differing = tuple(c for c in used if left[c] != right[c])
            results.append(
                TableParity(table, a.rows, b.rows, match, None, differing, ignored[table])
            )
        missing = None
        if config.scope.auth_users and AUTH_USERS in catalog.table_shapes(
            target.conn, [AUTH_USERS]
        ):
            ids = _auth_ids(source.conn)
            row = target.conn.execute(
                sql.SQL(
                    "SELECT count(*) FROM unnest(%s::uuid[]) AS s(id) "
                    "WHERE NOT EXISTS (SELECT 1 FROM auth.users u WHERE u.id = s.id)"
                ),
                (ids,),
            ).fetchone()
            missing = int(row[0]) if row else 0
    return VerifyReport(source.env, target.env, tuple(results), missing)


def verify_snapshot(config: Config, env: str, snapshot: archive.Snapshot) -> VerifyReport:
    """Compare live ``env`` with an archived snapshot's manifest: does it still hold those rows?

    Counts and checksums over the snapshot's columns; auth users are not compared (an apply
    creates them and a rollback never deletes them).
    """
    side = _open(config, env)
    with contextlib.closing(side.conn), side.conn.transaction(force_rollback=True):
        results = []
        for entry in snapshot.manifest.scope_tables:
            stats = table_stats(
                side.conn, entry.table, entry.column_names, kind=kind_of(entry.checksum)
            )
            log.info("  %-5s %-32s %10s rows", env, entry.table, f"{stats.rows:,}")
            match = (stats.rows, stats.checksum) == (entry.rows, entry.checksum)
            results.append(TableParity(entry.table, entry.rows, stats.rows, match))
    return VerifyReport(snapshot.id, env, tuple(results), None)
