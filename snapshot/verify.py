"""``snapshot verify``: compare two live databases over the one scope, counts and checksums.

Both sides are read in REPEATABLE READ, READ ONLY transactions, at the same time (one
thread each), with the same checksum that take and apply use.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import psycopg
from psycopg import sql

from snapshot import archive, catalog
from snapshot.catalog import TableShape
from snapshot.checksum import TableStats, column_checksums, kind_of, table_stats
from snapshot.config import Config
from snapshot.db import connect
from snapshot.dump import identity
from snapshot.environments import Connection, resolve_connection
from snapshot.errors import ConfigError
from snapshot.manifest import same_database
from snapshot.names import AUTH_TABLES, AUTH_USERS, TableName
from snapshot.parity import TableParity

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

    @property
    def failure(self) -> str | None:
        """The error line when the two differ: which tables, and auth users missing."""
        if self.matches:
            return None
        bad = [str(t.table) for t in self.tables if not t.match]
        if self.auth_users_missing:
            bad.append(f"auth.users ({self.auth_users_missing} missing in {self.target})")
        return f"{self.target} differs from {self.source} in {', '.join(bad)}"

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
            same = same_database(
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
        results = _with_kept(config, source, target, columns, ignored, source_stats, results)
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


def _with_kept(
    config: Config,
    source: _Side,
    target: _Side,
    columns: dict[TableName, Sequence[str]],
    ignored: dict[TableName, tuple[str, ...]],
    source_stats: dict[TableName, TableStats],
    results: list[TableParity],
) -> list[TableParity]:
    """Tables that hold the source's rows and rows kept for rows outside the scope.

    An apply with ``--keep-referenced`` keeps target rows the source lacks that rows outside
    the scope refer to, and the scoped rows those need in turn. A table whose only
    difference is such rows is stated as kept (never as a match, nor as a difference).
    Children first: a table's kept rows may be what its parents' rows are kept for.
    """
    scope = list(config.scope.tables)
    fks = catalog.foreign_keys(target.conn, scope)
    outward = [fk for fk in fks if fk.child not in scope and fk.child not in AUTH_TABLES]
    keys = catalog.row_keys(target.conn, columns)
    by_table = {r.table: r for r in results}
    kept: dict[TableName, list[str]] = {}
    for table in reversed(catalog.apply_order(scope, fks)):
        found = by_table[table]
        key = keys.get(table)
        drift = set(source.shapes[table].column_names) != set(target.shapes[table].column_names)
        if found.match or found.target_rows <= found.source_rows or key is None or drift:
            continue
        refers = []
        needing: list[str] = []
        for fk in fks:
            if fk.parent != table or (fk not in outward and fk.child not in kept):
                continue
            on = sql.SQL(" AND ").join(
                sql.SQL("c.{} = p.{}").format(sql.Identifier(c), sql.Identifier(pc))
                for c, pc in zip(fk.columns, fk.parent_columns, strict=True)
            )
            only: sql.Composable = sql.SQL("")
            if fk.child in kept:  # a scoped table: only its kept rows count
                only = sql.SQL(" AND {} = ANY({}::text[])").format(
                    _key_text(keys[fk.child], "c"), sql.Literal(kept[fk.child])
                )
            refers.append(
                sql.SQL("EXISTS (SELECT 1 FROM {} AS c WHERE {}{})").format(
                    fk.child.ident, on, only
                )
            )
            needing.append(str(fk.child) if fk in outward else f"kept rows of {fk.child}")
        if not refers:
            continue
        referred = [
            str(r[0])
            for r in target.conn.execute(
                sql.SQL("SELECT {} FROM {} AS p WHERE {}").format(
                    _key_text(key, "p"), table.ident, sql.SQL(" OR ").join(refers)
                )
            )
        ]
        lacking = [
            str(r[0])
            for r in source.conn.execute(
                sql.SQL(
                    "SELECT k FROM unnest(%s::text[]) AS k WHERE NOT EXISTS "
                    "(SELECT 1 FROM {} AS p WHERE {} = k)"
                ).format(table.ident, _key_text(key, "p")),
                (referred,),
            )
        ]
        if not lacking:
            continue
        rest = table_stats(
            target.conn,
            table,
            columns[table],
            ignored[table],
            where=sql.SQL("NOT {} = ANY({}::text[])").format(
                _key_text(key, None), sql.Literal(lacking)
            ),
        )
        if rest != source_stats[table]:
            continue
        kept[table] = lacking
        by_table[table] = replace(
            found, match=True, kept=len(lacking), kept_for=tuple(dict.fromkeys(needing))
        )
    return [by_table[r.table] for r in results]


def _key_text(key: Sequence[str], alias: str | None) -> sql.Composable:
    """A row's key as text (the same text on both sides: snapshot.db pins the settings)."""
    return sql.SQL("ROW({})::text").format(
        sql.SQL(", ").join(sql.Identifier(alias, c) if alias else sql.Identifier(c) for c in key)
    )


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
