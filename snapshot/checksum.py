"""Row counts and content checksums, computed on the server, for take, apply and verify.

A table's checksum is the sum, over its rows, of a 128-bit hash of the row's text form
(columns in name order, generated columns left out), kept as two 64-bit halves summed in
``numeric``. A sum does not depend on physical row order and counts duplicate rows; the
session settings pinned in :mod:`snapshot.db` make the text form the same on every server.

Two row hashes exist. :data:`HASHTEXT` (``hashtextextended`` of the row text with seeds 0
and 1, PostgreSQL's own stable 64-bit text hash) is what new checksums use: it costs half
of :data:`MD5`, which snapshots and backups written before December 2026 carry. A checksum
says which it is (``h2:`` in front for HASHTEXT), and whatever is compared with a stored
checksum is computed the same way (:func:`kind_of`): an old snapshot or backup still
applies, rolls back and verifies.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import psycopg
from psycopg import sql

from snapshot.names import TableName

MD5 = "md5"
HASHTEXT = "hashtext"
CURRENT = HASHTEXT
_PREFIX = "h2:"  # in front of a HASHTEXT checksum; an MD5 one has none


def kind_of(checksum: str) -> str:
    """The row hash a stored checksum was computed with."""
    return HASHTEXT if checksum.startswith(_PREFIX) else MD5


@dataclass(frozen=True)
class TableStats:
    """Row count and content checksum of one table."""

    rows: int
    checksum: str


def row_term(
    columns: Sequence[str], alias: str | None = None, kind: str = CURRENT
) -> sql.Composable:
    """The per-row value :func:`halves` reads: the row's text (its md5 for :data:`MD5`).

    Compute it once per row, in an inner query with :data:`KEEP_APART` beside it: written
    twice in a select list, it would be computed twice.
    """
    ordered = sorted(columns)
    names = [sql.Identifier(alias, c) if alias else sql.Identifier(c) for c in ordered]
    text = sql.SQL("ROW({})::text").format(sql.SQL(", ").join(names))
    return sql.SQL("md5({})").format(text) if kind == MD5 else text


# A column to put beside :func:`row_term` in an inner query, so that the row text is made once
# a row. The planner merges a plain inner query into the outer one, copying the row text into
# each of the two halves (made twice); it never merges one whose columns call a volatile
# function. ``OFFSET 0`` keeps it apart too, but a query with it cannot be split among
# parallel workers, and this can: the whole-table checksums then run on every core the
# server gives (clock_timestamp() is volatile and parallel safe; its value is never read).
KEEP_APART = sql.SQL("clock_timestamp() AS apart$")


def halves(term: sql.Composable, kind: str = CURRENT) -> tuple[sql.Composable, sql.Composable]:
    """The two signed 64-bit halves of a row's hash, from its :func:`row_term`."""
    if kind == MD5:
        return (
            sql.SQL("('x' || substr({}, 1, 16))::bit(64)::bigint").format(term),
            sql.SQL("('x' || substr({}, 17, 16))::bit(64)::bigint").format(term),
        )
    return (
        sql.SQL("hashtextextended({}, 0)").format(term),
        sql.SQL("hashtextextended({}, 1)").format(term),
    )


def _sum_halves(term: sql.Composable, kind: str) -> sql.Composable:
    first, second = halves(term, kind)
    return sql.SQL("coalesce(sum({}), 0)::text || ':' || coalesce(sum({}), 0)::text").format(
        first, second
    )


_DIGEST_HEX = 32  # of the sha256's hex digits a checksum keeps


def digest(rows: int, sums: str, kind: str = CURRENT) -> str:
    """The checksum of a table from its row count and its two sums (``"sum1:sum2"``)."""
    hashed = hashlib.sha256(f"{rows}:{sums}".encode()).hexdigest()[:_DIGEST_HEX]
    return hashed if kind == MD5 else _PREFIX + hashed


def checksum_sql(rows: sql.Composable, sums: sql.Composable, kind: str) -> sql.Composable:
    """:func:`digest` made in the server, from a count and a ``"sum1:sum2"`` text."""
    hashed = sql.SQL(
        "substr(encode(sha256(convert_to({} || ':' || {}, 'UTF8')), 'hex'), 1, {})"
    ).format(rows, sums, sql.Literal(_DIGEST_HEX))
    return hashed if kind == MD5 else sql.SQL("{} || {}").format(sql.Literal(_PREFIX), hashed)


def with_row_hashes(
    query: sql.Composable, columns: Sequence[str], kind: str = CURRENT
) -> sql.Composable:
    """``query``'s rows (``columns``, in its order) with the two :func:`halves` of each row's
    hash after them: a COPY of it carries the rows and their checksum in one reading, the
    sums made by whoever reads it (:func:`stats_of_sums`).

    ``query``'s columns are computed once a row (``OFFSET 0``: flattened, an expression of
    its would be copied into both the column and the row text), and so is the row text.
    """
    names = sql.SQL(", ").join(sql.Identifier("r", c) for c in columns)
    first, second = halves(sql.Identifier("r", "snapshot$row"), kind)
    return sql.SQL(
        "SELECT {names}, {first}, {second} FROM (SELECT b.*, {term} AS {row} "
        "FROM (SELECT * FROM ({query}) AS q OFFSET 0) AS b OFFSET 0) AS r"
    ).format(
        names=names,
        first=first,
        second=second,
        term=row_term(columns, "b", kind),
        row=sql.Identifier("snapshot$row"),
        query=query,
    )


def stats_of_sums(rows: int, first: int, second: int, kind: str = CURRENT) -> TableStats:
    """The :class:`TableStats` of ``rows`` rows whose :func:`halves` sum to ``first`` and
    ``second``: the same checksum :func:`table_stats` computes on the server."""
    return TableStats(rows, digest(rows, f"{first}:{second}", kind))


def table_stats(
    conn: psycopg.Connection,
    table: TableName | sql.Composable,
    columns: Sequence[str],
    ignore: Sequence[str] = (),
    kind: str = CURRENT,
    where: sql.Composable | None = None,
) -> TableStats:
    """Count and checksum ``table`` over ``columns`` minus ``ignore``, with ``kind``'s hash
    (of the rows ``where`` selects, when given)."""
    return table_stats_later(conn, table, columns, ignore, kind, where)()


def table_stats_later(
    conn: psycopg.Connection,
    table: TableName | sql.Composable,
    columns: Sequence[str],
    ignore: Sequence[str] = (),
    kind: str = CURRENT,
    where: sql.Composable | None = None,
) -> Callable[[], TableStats]:
    """:func:`table_stats`, sent now and read when called: in a pipeline, many tables'
    statements go in one round trip. ``table`` may be a subquery with its alias."""
    relation = table.ident if isinstance(table, TableName) else table
    used = [c for c in columns if c not in ignore]
    query = sql.SQL("SELECT count(*), {} FROM (SELECT {} AS h, {} FROM {} WHERE {}) AS s").format(
        _sum_halves(sql.SQL("h"), kind),
        row_term(used, kind=kind),
        KEEP_APART,
        relation,
        where if where is not None else sql.SQL("true"),
    )
    cursor = conn.execute(query)

    def result() -> TableStats:
        row = cursor.fetchone()
        assert row is not None
        rows, sums = int(row[0]), str(row[1])
        return TableStats(rows, digest(rows, sums, kind))

    return result


def column_checksums(
    conn: psycopg.Connection, table: TableName | sql.Identifier, columns: Sequence[str]
) -> dict[str, str]:
    """One checksum per column (over its multiset of values), to name the columns that differ."""
    relation = table.ident if isinstance(table, TableName) else table
    parts = [_sum_halves(row_term([c]), CURRENT) for c in columns]
    query = sql.SQL("SELECT {} FROM {}").format(sql.SQL(", ").join(parts), relation)
    row = conn.execute(query).fetchone()
    assert row is not None
    return {c: str(v) for c, v in zip(columns, row, strict=True)}


def differing_columns(left: dict[str, str], right: dict[str, str]) -> list[str]:
    """Columns whose per-column checksums differ between two sides."""
    return [c for c in left if c in right and left[c] != right[c]]
