"""Row counts and content checksums, computed on the server, for take, apply and verify.

A table's checksum is the sum, over its rows, of the md5 of the row's text form (columns
in name order, generated columns left out), kept as two 64-bit halves summed in ``numeric``.
A sum does not depend on physical row order and counts duplicate rows; the session
settings pinned in :mod:`snapshot.db` make the text form the same on every server.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import psycopg
from psycopg import sql

from snapshot.names import TableName


@dataclass(frozen=True)
class TableStats:
    """Row count and content checksum of one table."""

    rows: int
    checksum: str


def row_hash(columns: Sequence[str], alias: str | None = None) -> sql.Composable:
    """``md5(ROW(a, b, ...)::text)`` over ``columns`` in name order: one row's checksum term."""
    ordered = sorted(columns)
    names = [sql.Identifier(alias, c) if alias else sql.Identifier(c) for c in ordered]
    return sql.SQL("md5(ROW({})::text)").format(sql.SQL(", ").join(names))


def _sum_halves(hash_expr: sql.Composable) -> sql.Composable:
    return sql.SQL(
        "coalesce(sum(('x' || substr({h}, 1, 16))::bit(64)::bigint), 0)::text || ':' || "
        "coalesce(sum(('x' || substr({h}, 17, 16))::bit(64)::bigint), 0)::text"
    ).format(h=hash_expr)


def digest(rows: int, sums: str) -> str:
    """The checksum of a table from its row count and its two sums (``"sum1:sum2"``)."""
    return hashlib.sha256(f"{rows}:{sums}".encode()).hexdigest()[:32]


def table_stats(
    conn: psycopg.Connection,
    table: TableName | sql.Identifier,
    columns: Sequence[str],
    ignore: Sequence[str] = (),
) -> TableStats:
    """Count and checksum ``table`` over ``columns`` minus ``ignore``."""
    relation = table.ident if isinstance(table, TableName) else table
    used = [c for c in columns if c not in ignore]
    # OFFSET 0 keeps the inner query apart: flattened, md5 would run once per half.
    query = sql.SQL("SELECT count(*), {} FROM (SELECT {} AS h FROM {} OFFSET 0) AS s").format(
        _sum_halves(sql.SQL("h")), row_hash(used), relation
    )
    row = conn.execute(query).fetchone()
    assert row is not None
    rows, sums = int(row[0]), str(row[1])
    return TableStats(rows, digest(rows, sums))


def column_checksums(
    conn: psycopg.Connection, table: TableName | sql.Identifier, columns: Sequence[str]
) -> dict[str, str]:
    """One checksum per column (over its multiset of values), to name the columns that differ."""
    relation = table.ident if isinstance(table, TableName) else table
    parts = [_sum_halves(row_hash([c])) for c in columns]
    query = sql.SQL("SELECT {} FROM {}").format(sql.SQL(", ").join(parts), relation)
    row = conn.execute(query).fetchone()
    assert row is not None
    return {c: str(v) for c, v in zip(columns, row, strict=True)}


def differing_columns(left: dict[str, str], right: dict[str, str]) -> list[str]:
    """Columns whose per-column checksums differ between two sides."""
    return [c for c in left if c in right and left[c] != right[c]]
