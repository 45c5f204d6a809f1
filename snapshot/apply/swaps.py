"""Rows that trade unique values: two rows swapping slugs, a chain (a→b while b→c), a cycle, a
new row taking the value a removed or renamed row gives up.

PostgreSQL checks a unique key that is not deferrable row by row, as each row is written,
not at the end of the statement. So one ``UPDATE`` giving row 3 the slug row 4 holds, and
row 4 row 3's, fails on whichever row it writes first; an ``INSERT`` of a slug a row still
holds fails until that row has let it go. Before each table's inserts and updates, the rows
whose present value another row of the snapshot wants (the *blockers*) are first moved
aside: one ``UPDATE`` gives them values no row holds or will hold. The table's ordinary
inserts and updates then find every wanted value free, in whatever order they write.

Why move values aside with a second ``UPDATE`` of the same rows rather than the other ways:

* **Ordering the updates** (each one freeing the value the next needs) handles chains but
  not cycles, and costs one statement per link: renumbering a list of 1,000 positions by
  one is a chain of 1,000.
* **Deleting and inserting the movers again** makes the app see rows deleted that the
  snapshot keeps: its ``ON DELETE`` triggers fire (a guardrail refusing deletes, or a
  clean-up deleting rows outside the scope, which no check would notice row by row), and
  rows that refer to them cascade, are nulled or refuse (``CASCADE``, ``SET NULL``,
  ``RESTRICT``), from inside or outside the scope. Only replica mode could hold those
  back, and not every role may use it.
* **Moving aside first** writes only rows the delta writes anyway (an update, or a row it
  deletes later), with ``UPDATE`` alone: the app's ``UPDATE`` triggers fire, as they do for
  any row the apply updates, and the keeper triggers (:mod:`.keepers`) undo what they write
  both times; a row keeps its key, so nothing referring to it by key notices. A value set
  aside that something refuses (a ``CHECK``, a guardrail, a foreign key row by row whose
  rows refer to that value) fails the statement like any write: the attempt falls back to
  replacing the table in full, as before. Nothing is ever lost silently.

A moved-aside value: ``NULL`` for a nullable column of a plain unique key (NULLs never
collide, unless the key says ``NULLS NOT DISTINCT``); above every value the table and the
snapshot hold for a number; a random one for a uuid; random hex text for a string (a
``varchar(n)`` cuts it to its length). The column moved is one the key reads that no
foreign key of the table uses, never generated nor ``GENERATED ALWAYS``. A key on
expressions or with a predicate (``lower(email)``, ``WHERE deleted_at IS NULL``) moves
every row whose columns it reads change, rather than only the blockers. Keys that are
deferrable wait for the commit anyway and need none of this; exclusion constraints are
left as they are (a trade of ranges still falls back to a full replace).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from psycopg import sql

from snapshot.apply import outside
from snapshot.apply.rows import DELETE, INSERT, UPDATE, RowSet
from snapshot.apply.state import ApplyRun
from snapshot.names import TableName

log = logging.getLogger(__name__)

NULL, NUMBER, UUID, TEXT = "null", "number", "uuid", "text"
# While this setting of the transaction is 'on', the keeper triggers (keepers.py) put back
# what the app's triggers write without counting it: the moved rows are written again, and
# counted then, once each.
UNCOUNTED = "snapshot.moving_aside"
_NUMBERS = re.compile(r"^(smallint|integer|bigint|numeric(\(.*\))?)$")
_TEXTS = re.compile(r"^(text|character varying(\(\d+\))?|character(\(\d+\))?|(.*\.)?citext)$")


@dataclass(frozen=True)
class UniqueKey:
    """One unique key of a table checked as each row is written (not deferrable)."""

    number: int  # its place among the table's keys (names it in the statements)
    name: str
    columns: tuple[str, ...]  # its plain key columns; empty where it has expressions
    reads: tuple[str, ...]  # every column its keys, expressions and predicate read
    exact: bool  # plain columns only, no predicate: blockers are found exactly
    nulls_distinct: bool
    aside: str  # the column its blockers' values are moved aside in
    how: str  # NULL, NUMBER, UUID or TEXT


# Unique indexes checked as rows are written, with the columns they read (pg_depend holds
# one entry per column an index reads: its keys, expressions and predicate).
_UNIQUE_KEYS = """
SELECT w.i, ic.relname,
       i.indexprs IS NULL AND i.indpred IS NULL AND NOT (0 = ANY(i.indkey::int2[])),
       coalesce((to_jsonb(i) ->> 'indnullsnotdistinct')::boolean, false),
       ARRAY(SELECT a.attname::text FROM unnest(i.indkey::int2[]) WITH ORDINALITY AS k(att, n)
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.att
             WHERE k.n <= i.indnkeyatts ORDER BY k.n),
       ARRAY(SELECT DISTINCT a.attname::text FROM pg_depend d
             JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
             WHERE d.classid = 'pg_class'::regclass AND d.objid = i.indexrelid
               AND d.refclassid = 'pg_class'::regclass AND d.refobjsubid > 0)
FROM unnest(%s::regclass[]) WITH ORDINALITY AS w(t, i)
JOIN pg_index i ON i.indrelid = w.t
JOIN pg_class ic ON ic.oid = i.indexrelid
WHERE i.indisunique AND i.indimmediate AND i.indisvalid
ORDER BY w.i, ic.relname
"""


def unique_keys_later(
    run: ApplyRun, tables: Sequence[TableName]
) -> Callable[[], dict[TableName, tuple[UniqueKey, ...]]]:
    """Per table of ``tables`` (all with a key), the unique keys a row could trade values in:
    those beside the row key, whose values can be moved aside. Asked now, read when called
    (in the caller's pipeline: no round trip of its own)."""
    if not tables:
        return dict
    names = [t.ident.as_string(run.conn) for t in tables]
    cursor = run.conn.execute(_UNIQUE_KEYS, (names,))

    def result() -> dict[TableName, tuple[UniqueKey, ...]]:
        found: dict[TableName, list[UniqueKey]] = {}
        for i, name, plain, not_distinct, columns, reads in cursor.fetchall():
            table = tables[int(i) - 1]
            rows = run.row_sets[table]
            exact = bool(plain)
            keyed = tuple(map(str, columns)) if exact else ()
            if exact and set(keyed) <= set(rows.key):
                continue  # the row key itself, or wider: a row never trades it
            read = tuple(sorted(map(str, reads)))
            if not set(read) <= set(rows.columns):
                continue  # reads a column the snapshot lacks or a generated one: not ours
            chosen = _aside(run, table, keyed or read, exact and not not_distinct)
            if chosen is None:
                log.debug("  %s: no column of %s can be moved aside", table, name)
                continue
            number = len(found.get(table, ()))
            key = UniqueKey(number, str(name), keyed, read, exact, not not_distinct, *chosen)
            found.setdefault(table, []).append(key)
        return {table: tuple(keys) for table, keys in found.items()}

    return result


def _aside(
    run: ApplyRun, table: TableName, candidates: Sequence[str], nulls: bool
) -> tuple[str, str] | None:
    """The column a key's blockers are moved aside in, and how; None when none fits."""
    shape = run.shapes[table]
    referring = {c for fk in run.fks if fk.child == table for c in fk.columns}
    usable = [
        c
        for c in shape.columns
        if c.name in candidates
        and c.name not in referring
        and c.name not in shape.generated
        and c.identity != "a"
    ]
    if nulls:
        for column in usable:
            if not column.not_null:
                return column.name, NULL
    for kind, fits in (
        (NUMBER, _NUMBERS.match),
        (UUID, lambda t: t == "uuid"),
        (TEXT, _TEXTS.match),
    ):
        for column in usable:
            if fits(column.type):
                return column.name, kind
    return None


def move_aside(
    run: ApplyRun,
    rows: RowSet,
    keys: Sequence[UniqueKey],
    *,
    whole: bool = False,
    inserts_first: bool = False,
) -> tuple[sql.Composed, sql.Composed, sql.Composed]:
    """The statements that move aside the values of ``rows.table`` other rows of the snapshot
    want (see the module), to run in order right before the table's inserts and updates: a
    setting on, the ``UPDATE`` (its row count is the rows moved, often none), the setting off.

    ``whole``: the table is replaced in full with rows held in place (:mod:`.write`): every
    present row is written or deleted, and every snapshot row is wanted. ``inserts_first``:
    the table inserts before it updates (a self-referencing one). The ``UPDATE`` finds its
    blockers itself: no question asked first, so a batch of writes needs no round trip here.
    """
    blockers = sql.SQL(" UNION ALL ").join(
        _blockers(run, rows, key, whole, inserts_first) for key in keys
    )
    types = {c.name: c.type for c in run.shapes[rows.table].columns}
    by_column: dict[str, list[UniqueKey]] = {}
    for key in keys:
        by_column.setdefault(key.aside, []).append(key)
    assignments = sql.SQL(", ").join(
        sql.SQL(
            "{c} = CASE WHEN p.u$ && ARRAY[{numbers}]::int[] THEN CAST({value} AS {type}) "
            "ELSE t.{c} END"
        ).format(
            c=sql.Identifier(column),
            numbers=sql.SQL(", ").join(sql.Literal(k.number) for k in moved),
            # NULL only where every key moving this column allows it (see _aside)
            value=_value(rows, column, next((k.how for k in moved if k.how != NULL), NULL)),
            type=sql.SQL(types[column]),
        )
        for column, moved in by_column.items()
    )
    query = sql.SQL(
        "UPDATE {table} AS t SET {assignments} FROM (SELECT {k}, array_agg(b.u$) AS u$, "
        "row_number() OVER () AS n$ FROM ({blockers}) AS b GROUP BY {k}) AS p WHERE {on}"
    ).format(
        table=rows.table.ident,
        assignments=assignments,
        k=rows.keys,
        blockers=blockers,
        on=rows.match("t", "p"),
    )
    on = sql.SQL("SELECT set_config({}, {}, true)")
    return (
        on.format(sql.Literal(UNCOUNTED), sql.Literal("on")),
        query,
        on.format(sql.Literal(UNCOUNTED), sql.Literal("off")),
    )


def moved(table: TableName, keys: Sequence[UniqueKey], rows: int) -> None:
    """Say how many rows of ``table`` :func:`move_aside` moved (nothing when none)."""
    if rows:
        log.info(
            "  %s: %d rows hold unique values other rows take (%s): moved aside first",
            table,
            rows,
            ", ".join(k.name for k in keys),
        )


def _value(rows: RowSet, column: str, how: str) -> sql.Composable:
    """A value no row holds or will hold, for the ``n$``-th row moved aside."""
    if how == NULL:
        return sql.SQL("NULL")
    if how == NUMBER:
        return sql.SQL(
            "(SELECT greatest((SELECT max({c}) FROM {table}), (SELECT max({c}) FROM {stage}), 0)) "
            "+ p.n$"
        ).format(c=sql.Identifier(column), table=rows.table.ident, stage=rows.stage)
    random = sql.SQL("md5(random()::text || clock_timestamp()::text || p.n$::text)")
    return sql.SQL("{}::uuid").format(random) if how == UUID else random


def _present(run: ApplyRun, rows: RowSet, whole: bool) -> tuple[sql.Composable, sql.Composable]:
    """``FROM`` the live rows the writes will change or delete, and ``t`` is one they delete."""
    if not whole:
        return sql.SQL("{} AS t JOIN {} AS d ON {} AND d.op$ IN ({}, {})").format(
            rows.table.ident,
            rows.delta,
            rows.match("t", "d"),
            sql.Literal(UPDATE),
            sql.Literal(DELETE),
        ), sql.SQL("d.op$ = {}").format(sql.Literal(DELETE))
    source: sql.Composable = sql.SQL("{} AS t").format(rows.table.ident)
    if rows.table in run.kept:  # rows kept in place are never written
        source = sql.SQL(
            "(SELECT * FROM {} AS z WHERE NOT EXISTS (SELECT 1 FROM {} AS k WHERE {})) AS t"
        ).format(rows.table.ident, outside.kept_keys(rows), rows.match("z", "k"))
    goes = sql.SQL("NOT EXISTS (SELECT 1 FROM {} AS z WHERE {})").format(
        rows.stage, rows.match("z", "t")
    )
    return source, goes


def _wanted(rows: RowSet, whole: bool) -> tuple[sql.Composable, sql.Composable]:
    """``FROM`` the snapshot rows the writes will insert or update, and ``s`` is an update."""
    if not whole:
        return sql.SQL("{} AS s JOIN {} AS e ON {} AND e.op$ IN ({}, {})").format(
            rows.stage, rows.delta, rows.match("s", "e"), sql.Literal(INSERT), sql.Literal(UPDATE)
        ), sql.SQL("e.op$ = {}").format(sql.Literal(UPDATE))
    updates = sql.SQL("EXISTS (SELECT 1 FROM {} AS y WHERE {})").format(
        rows.table.ident, rows.match("y", "s")
    )
    return sql.SQL("{} AS s").format(rows.stage), updates


def _blockers(
    run: ApplyRun, rows: RowSet, key: UniqueKey, whole: bool, inserts_first: bool
) -> sql.Composed:
    """``SELECT key, u$``: the present rows to move aside for one unique key.

    Exact keys: the rows holding a value another row is written with (compared with the
    key's NULL rule), unless the row's own update frees it first (updates go before
    inserts, but in a self-referencing table). Others: every row whose read columns change,
    and every row to delete.
    """
    keys = sql.SQL(", ").join(sql.SQL("t.{}").format(sql.Identifier(k)) for k in rows.key)
    number = sql.SQL("{}::int").format(sql.Literal(key.number))
    present, goes = _present(run, rows, whole)
    if key.exact:
        wanted, updates = _wanted(rows, whole)
        same = sql.SQL(" AND ").join(
            sql.SQL("s.{c} {eq} t.{c}").format(
                c=sql.Identifier(c),
                eq=sql.SQL("=" if key.nulls_distinct else "IS NOT DISTINCT FROM"),
            )
            for c in key.columns
        )
        when = sql.SQL("true") if inserts_first else sql.SQL("({} OR {})").format(goes, updates)
        return sql.SQL(
            "SELECT {keys}, {number} AS u$ FROM {present} WHERE EXISTS "
            "(SELECT 1 FROM {wanted} WHERE {same} AND NOT ({own}) AND {when})"
        ).format(
            keys=keys,
            number=number,
            present=present,
            wanted=wanted,
            same=same,
            own=rows.match("s", "t"),
            when=when,
        )
    return sql.SQL(
        "SELECT {keys}, {number} AS u$ FROM {present} WHERE NOT EXISTS (SELECT 1 FROM {stage} "
        "AS s WHERE {own} AND ROW({s_reads}) IS NOT DISTINCT FROM ROW({t_reads}))"
    ).format(
        keys=keys,
        number=number,
        present=present,
        stage=rows.stage,
        own=rows.match("s", "t"),
        s_reads=_columns("s", key.reads),
        t_reads=_columns("t", key.reads),
    )


def _columns(alias: str, columns: Sequence[str]) -> sql.Composable:
    return sql.SQL(", ").join(sql.Identifier(alias, c) for c in columns)
