"""What an apply wrote, recorded with its backup, and what a rollback would throw away.

A rollback makes the target equal the pre-apply backup again, so it undoes the apply and,
with it, whatever was written after the apply: a row the app inserted since is deleted,
one it updated is put back, one it deleted comes back. Only the pre-rollback backup keeps
them. The rollback's plan, prompt and report count those rows per table, from what the
apply recorded beside its backup before committing (:func:`record`):

* ``applied-xids``: the ids of the apply's transaction (and subtransactions) that the rows
  it wrote carry as ``xmin``. A row version never changes; any later write makes a new one
  with the writer's id. So a live row whose ``xmin`` is one of them is exactly as the apply
  wrote it; any other row the rollback would change was written since (or, never touched
  by the apply, changed since by someone else);
* ``applied-deletes.copy``: the keys of the rows it deleted (``DELETED table (key) FROM
  stdin;`` blocks, COPY text; a table without one lost no row): a row the backup holds and
  the target lacks was deleted by the apply, or since.

An apply that wrote nothing (the same snapshot again) keeps no backup at all
(:func:`wrote`): rollback then undoes the apply before it, as the user means.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from snapshot import archive
from snapshot.apply.rows import DELETE, INSERT, UPDATE, RowSet
from snapshot.apply.state import ApplyRun
from snapshot.copytext import PIPELINED_AT_MOST, block_later, write_block
from snapshot.errors import ArchiveError
from snapshot.names import TableName
from snapshot.staging import DISCARD, ScriptReader, parse_header

log = logging.getLogger(__name__)

XIDS_FILE = "applied-xids"
DELETES_FILE = "applied-deletes.copy"
DELETED = "DELETED"


@dataclass(frozen=True)
class WrittenSince:
    """Rows of one table written since the apply a rollback undoes, which it throws away."""

    table: TableName
    inserted: int  # rows inserted since: the rollback deletes them
    updated: int  # rows written since (updated, or the apply's rows rewritten): put back
    deleted: int  # rows deleted since: the rollback inserts them again

    @property
    def rows(self) -> int:
        return self.inserted + self.updated + self.deleted

    def sentence(self) -> str:
        """``public.question_attempts: 1 row inserted since (deleted)``."""
        parts = [
            f"{n:,} {what}"
            for n, what in (
                (self.inserted, "inserted since (deleted)"),
                (self.updated, "written since (put back)"),
                (self.deleted, "deleted since (inserted again)"),
            )
            if n
        ]
        return f"{self.table}: {', '.join(parts)}"

    def to_json(self) -> dict[str, Any]:
        return {
            "table": str(self.table),
            "inserted_since": self.inserted,
            "updated_since": self.updated,
            "deleted_since": self.deleted,
        }


@dataclass(frozen=True)
class Applied:
    """An apply's record, loaded by the rollback that undoes it."""

    xids: tuple[str, ...]
    deleted: frozenset[TableName]  # tables whose deleted keys are loaded (pg_temp)
    unknown: frozenset[TableName]  # tables whose key changed since: not counted


# --- the apply: recorded beside its backup --------------------------------------------------

_XACT_WRITES = """
SELECT n.nspname, c.relname, s.n_tup_ins, s.n_tup_upd, s.n_tup_del
FROM pg_stat_xact_user_tables s JOIN pg_class c ON c.oid = s.relid
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relpersistence <> 't'
"""


def xact_writes(conn: psycopg.Connection) -> dict[TableName, tuple[int, int, int]]:
    """Rows this transaction inserted, updated and deleted so far, per table (partitions apart)."""
    return xact_writes_later(conn)()


def xact_writes_later(
    conn: psycopg.Connection,
) -> Callable[[], dict[TableName, tuple[int, int, int]]]:
    """:func:`xact_writes`, asked now and read when called (in a pipeline)."""
    cursor = conn.execute(_XACT_WRITES)
    return lambda: {
        TableName(str(schema), str(name)): (int(ins), int(upd), int(dele))
        for schema, name, ins, upd, dele in cursor.fetchall()
    }


@dataclass(frozen=True)
class Wrote:
    """What this transaction wrote: rows per table (inserted, updated, deleted; partitions
    apart), whether a scoped table's sequence moved, and the scoped tables whose rows live
    in partitions."""

    rows: dict[TableName, tuple[int, int, int]]
    sequences_moved: bool
    partitioned: frozenset[TableName]

    @property
    def anything(self) -> bool:
        return self.sequences_moved or any(any(counts) for counts in self.rows.values())


def wrote_later(run: ApplyRun) -> Callable[[bool], Wrote]:
    """What this transaction wrote, asked now (in the caller's pipeline), read when called
    with whether a scoped table's sequence moved (the caller knows: it restarted them, and
    it read where they stand in the same round trip)."""
    rows = xact_writes_later(run.conn)
    partitioned = run.conn.execute(
        "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n "
        "ON n.oid = c.relnamespace WHERE c.oid = ANY(%s::regclass[]) AND c.relkind = 'p'",
        ([t.ident.as_string(run.conn) for t in run.order],),
    )
    return lambda sequences_moved: Wrote(
        rows(),
        sequences_moved,
        frozenset(TableName(str(s), str(n)) for s, n in partitioned.fetchall()),
    )


def record(
    run: ApplyRun,
    folder: Path,
    wrote: Wrote,
    first: Sequence[sql.Composed] = (),
    then: Sequence[sql.Composed] = (),
) -> str:
    """Write ``applied-xids`` and ``applied-deletes.copy`` into the backup's folder; the
    transaction's id.

    Call after the writes, before the commit (in the apply's transaction). ``first`` and
    ``then``: statements of the transaction's own to send ahead and after, in the same
    round trip.
    """
    started = time.monotonic()
    written, partitioned = wrote.rows, wrote.partitioned
    xids: set[str] = set()
    # Every table's question, the deleted keys and the id: one round trip.
    with run.conn.pipeline():
        for statement in first:
            run.conn.execute(statement)
        asked = [
            run.conn.execute(
                sql.SQL("SELECT DISTINCT xmin::text FROM {} WHERE age(xmin) <= 0").format(
                    table.ident
                )
            )
            for table in run.order
            # no row inserted or updated: no row version carries its id
            if table in partitioned or any(written.get(table, (0, 0, 0))[:2])
        ]
        txid = run.conn.execute("SELECT txid_current()::text")
        # the keys deleted, asked here up to PIPELINED_AT_MOST a table (more, or a
        # partitioned table's unknown count, by a COPY each, streamed)
        deleting = [
            rows
            for rows in run.row_sets.values()
            if rows.table in partitioned or written.get(rows.table, (0, 0, 0))[2] > 0
        ]
        gone = {
            rows.table: block_later(run.conn, DELETED, rows.table, rows.key, _deleted(rows))
            for rows in deleting
            if rows.table not in partitioned
            and written.get(rows.table, (0, 0, 0))[2] <= PIPELINED_AT_MOST
        }
        for statement in then:
            run.conn.execute(statement)
    # Every row version this transaction wrote has its id or a later one (its
    # subtransactions'): age() of it is 0 or less.
    for cursor in asked:
        xids.update(str(r[0]) for r in cursor.fetchall())
    row = txid.fetchone()
    assert row is not None
    try:
        (folder / XIDS_FILE).write_text("".join(f"{x}\n" for x in sorted(xids)), encoding="ascii")
        with (folder / DELETES_FILE).open("wb") as out:
            for rows in deleting:
                if rows.table in gone:
                    gone[rows.table](out)
                else:
                    write_block(run.conn, out, DELETED, rows.table, rows.key, _deleted(rows))
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        for name in (XIDS_FILE, DELETES_FILE):
            (folder / name).unlink(missing_ok=True)
        raise archive.no_space(folder, None, f"pre-{run.action} backup") from None
    log.info(
        "  recorded what the %s wrote, for a rollback to count what is written since  %.1f s",
        run.action,
        time.monotonic() - started,
    )
    return str(row[0])


def _deleted(rows: RowSet) -> sql.Composed:
    """The keys the lock found that are gone now (a ``DELETED`` block's rows; a table
    without one lost no row)."""
    return sql.SQL(
        "SELECT {k} FROM {record} AS r WHERE NOT EXISTS (SELECT 1 FROM {table} AS t WHERE {on})"
    ).format(
        k=sql.SQL(", ").join(sql.Identifier("r", c) for c in rows.key),
        record=rows.record,
        table=rows.table.ident,
        on=rows.match("t", "r"),
    )


# --- the rollback: what it throws away ------------------------------------------------------


def _deleted_keys(rows: RowSet) -> sql.Identifier:
    return sql.Identifier("pg_temp", f"_snapshot_a{rows.number}")


def load(run: ApplyRun) -> Applied | None:
    """Load the record of the apply the rollback undoes (None: the backup has none).

    Call once the rollback's row sets exist (after the record of the target is made).
    """
    files = run.snapshot.manifest.files
    if XIDS_FILE not in files or DELETES_FILE not in files:
        return None
    folder = run.snapshot.path
    xids = tuple(x for x in (folder / XIDS_FILE).read_text(encoding="ascii").split() if x)
    if not all(x.isdigit() for x in xids):
        raise ArchiveError(f"{run.snapshot.id}: {XIDS_FILE} holds something else than ids")
    loaded, unknown = set(), set()
    with run.conn.pipeline():
        for rows in run.row_sets.values():
            run.conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(_deleted_keys(rows)))
    with (folder / DELETES_FILE).open("rb") as stream:
        script = ScriptReader(stream, (DELETED,))
        while header := script.next_header():
            _, table, columns = parse_header(header, (DELETED,))
            found = run.row_sets.get(table)
            if found is None or tuple(columns) != found.key:  # the key changed since: unknown
                unknown.add(table)
                script.pump(DISCARD)
                continue
            keys = _deleted_keys(found)
            run.conn.execute(
                sql.SQL("CREATE TEMP TABLE {} AS SELECT {} FROM {} WITH NO DATA").format(
                    keys, found.keys, table.ident
                )
            )
            load_keys = sql.SQL("COPY {} ({}) FROM STDIN").format(keys, found.keys)
            with run.conn.cursor() as cur, cur.copy(load_keys) as copy:
                script.pump(copy)
            loaded.add(table)
    return Applied(xids, frozenset(loaded), frozenset(unknown))


def count(run: ApplyRun, applied: Applied) -> tuple[WrittenSince, ...]:
    """Per table, the rows the rollback's current delta would throw away that were written
    since the apply (tables with a key whose deletions the apply recorded)."""
    return tuple(_count(run, applied, rows) for rows in _tables(run, applied))


def _tables(run: ApplyRun, applied: Applied) -> Iterator[RowSet]:
    for table in run.order:
        if table not in applied.unknown and table in run.row_sets:
            yield run.row_sets[table]


def _count(run: ApplyRun, applied: Applied, rows: RowSet) -> WrittenSince:
    # A row the target has (the rollback deletes or updates it) is the apply's own while it
    # carries one of the apply's ids; a row it lacks (the rollback inserts it) was deleted
    # by the apply if the apply recorded its key.
    since = sql.SQL("NOT coalesce(r.x$ = ANY({}::xid[]), false)").format(
        sql.Literal(list(applied.xids))
    )
    kept: sql.Composable = sql.SQL("true")  # a table without deleted keys lost no row to it
    if rows.table in applied.deleted:
        kept = sql.SQL("NOT EXISTS (SELECT 1 FROM {} AS a WHERE {})").format(
            _deleted_keys(rows), rows.match("a", "d")
        )
    row = run.conn.execute(
        sql.SQL(
            "SELECT count(*) FILTER (WHERE d.op$ = {d} AND {since}), "
            "count(*) FILTER (WHERE d.op$ = {u} AND {since}), "
            "count(*) FILTER (WHERE d.op$ = {i} AND {kept}) "
            "FROM {delta} AS d LEFT JOIN {record} AS r ON {rd}"
        ).format(
            d=sql.Literal(DELETE),
            u=sql.Literal(UPDATE),
            i=sql.Literal(INSERT),
            since=since,
            kept=kept,
            delta=rows.delta,
            record=rows.record,
            rd=rows.match("r", "d"),
        )
    ).fetchone()
    assert row is not None
    return WrittenSince(rows.table, int(row[0]), int(row[1]), int(row[2]))
