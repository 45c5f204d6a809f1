"""One table's rows on both sides, as hashes: what the apply compares, writes and proves.

For a scoped table with a key (its primary key, else a unique index over NOT NULL
columns) the apply keeps three temporary tables in its session:

* ``_snapshot_s<n>``: key and hash of every snapshot row (from the staged copy);
* ``_snapshot_t<n>``, the *record*: key, ``xmin`` and hash of every target row version;
* ``_snapshot_d<n>``, the *delta*: key and op of every row that differs
  (``i`` insert, ``u`` update, ``d`` delete).

A row's hash is that of its text over the snapshot's columns in name order, kept as two
bigint halves, with the row hash the snapshot's checksums were made with: exactly the terms
of the table checksum (:mod:`snapshot.checksum`), so a sum of recorded hashes *is* a
checksum. A row version is identified by ``(key, xmin)``: a
version never changes, every write makes a new one with the writer's transaction id, and
under the apply's lock no other transaction writes. That is what lets the record be made
before the lock (reconciled under it by a cheap ``(key, xmin)`` join instead of hashing
every row again) and what makes :func:`prove` a proof: every live row is counted, with
its recorded hash when its version is the recorded one, else hashed afresh.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import psycopg
from psycopg import sql

from snapshot import sparse
from snapshot.checksum import CURRENT, KEEP_APART, TableStats, digest, halves, row_term
from snapshot.names import TableName

log = logging.getLogger(__name__)

INSERT, UPDATE, DELETE = "i", "u", "d"

# The columns the tool's temporary tables and queries put beside a table's key columns. Each
# ends in ``$``, which PostgreSQL allows in a name and the SQL standard does not, so that no
# key column is called so (a key column named ``op`` or ``x`` is common enough); a table
# whose key is, all the same, is treated as one without a key (:func:`keyable`).
INTERNAL_COLUMNS = frozenset({"op$", "x$", "h1$", "h2$", "c$", "l$", "m$", "apart$"})


def keyable(key: Sequence[str]) -> bool:
    """Whether a key's column names stay apart from :data:`INTERNAL_COLUMNS`."""
    return not INTERNAL_COLUMNS.intersection(key)


def _hashed(
    outer: sql.Composable,
    inner: sql.Composable,
    term: sql.Composable,
    source: sql.Composable,
    kind: str,
    line: sql.Composable | None = None,
) -> sql.Composed:
    """``SELECT outer, h1, h2`` over ``SELECT inner, term AS m FROM source``, hashed once a row
    (and ``c$``, the digest of the row's COPY ``line`` for sparse staging,
    :mod:`snapshot.sparse`, when given)."""
    first, second = halves(sql.SQL("z.m$"), kind)
    extra: sql.Composable = sql.SQL("")
    lined: sql.Composable = sql.SQL("")
    if line is not None:
        extra = sql.SQL(", {} AS c$").format(sparse.digest_sql(sql.SQL("z.l$")))
        lined = sql.SQL(", {} AS l$").format(line)
    return sql.SQL(
        "SELECT {outer}, {h1} AS h1$, {h2} AS h2${extra} "
        "FROM (SELECT {inner}, {term} AS m${lined}, {apart} FROM {source}) AS z"
    ).format(
        outer=outer,
        h1=first,
        h2=second,
        extra=extra,
        inner=inner,
        term=term,
        lined=lined,
        apart=KEEP_APART,
        source=source,
    )


@dataclass(frozen=True)
class RowSet:
    """The temporary tables of one scoped table, and how its rows are keyed and hashed."""

    table: TableName
    number: int
    key: tuple[str, ...]
    columns: tuple[str, ...]  # the snapshot's columns: what is hashed and written
    stage: sql.Identifier  # pg_temp.snapshot_<table>: the snapshot's rows
    kind: str = CURRENT  # the row hash of the snapshot's checksum (snapshot.checksum)

    def _temp(self, kind: str) -> sql.Identifier:
        return sql.Identifier("pg_temp", f"_snapshot_{kind}{self.number}")

    @property
    def hashes(self) -> sql.Identifier:
        return self._temp("s")

    @property
    def record(self) -> sql.Identifier:
        return self._temp("t")

    @property
    def delta(self) -> sql.Identifier:
        return self._temp("d")

    @property
    def moved(self) -> sql.Identifier:
        return self._temp("m")

    @property
    def keys(self) -> sql.Composable:
        return sql.SQL(", ").join(map(sql.Identifier, self.key))

    def match(self, left: str, right: str) -> sql.Composable:
        """``left.k1 = right.k1 AND ...`` over the key."""
        return sql.SQL(" AND ").join(
            sql.SQL("{}.{} = {}.{}").format(
                sql.Identifier(left), sql.Identifier(k), sql.Identifier(right), sql.Identifier(k)
            )
            for k in self.key
        )

    def row_term(self, alias: str) -> sql.Composable:
        return row_term(self.columns, alias, self.kind)

    def digest(self, rows: int, sums: str) -> str:
        return digest(rows, sums, self.kind)


def _analyze(conn: psycopg.Connection, table: sql.Identifier, columns: sql.Composable) -> None:
    """Row count and statistics of the columns joins and filters use: not of the hashes,
    which no plan needs and which cost most of a full ANALYZE (every value distinct)."""
    conn.execute(sql.SQL("ANALYZE {} ({})").format(table, columns))


def hash_snapshot(conn: psycopg.Connection, rows: RowSet) -> None:
    """``_snapshot_s<n>``: key and hash of every staged snapshot row (before any lock)."""
    conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(rows.hashes))
    conn.execute(
        sql.SQL("CREATE TEMP TABLE {} AS {}").format(
            rows.hashes,
            _hashed(
                rows.keys,
                rows.keys,
                rows.row_term("s"),
                sql.SQL("{} AS s").format(rows.stage),
                rows.kind,
            ),
        )
    )
    _analyze(conn, rows.hashes, rows.keys)


def hash_sparse(conn: psycopg.Connection, rows: RowSet, staged: sparse.Sparse) -> None:
    """:func:`hash_snapshot` of a table staged sparsely, without hashing its rows again.

    Its staged rows are the target's as the record saw them (hashed there already), less
    those the snapshot changes or lacks, plus the ones that went up (hashed now): the
    hashes are those, in the same terms as the record's.
    """
    conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(rows.hashes))
    conn.execute(
        sql.SQL(
            "CREATE TEMP TABLE {hashes} AS "
            "SELECT {keys}, r.h1$, r.h2$ FROM {record} AS r WHERE NOT EXISTS ("
            "SELECT 1 FROM {gone} AS g WHERE g.n = {n} AND g.d = r.c$) "
            "UNION ALL {side}"
        ).format(
            hashes=rows.hashes,
            keys=sql.SQL(", ").join(sql.Identifier("r", k) for k in rows.key),
            record=rows.record,
            gone=sparse.GONE,
            n=sql.Literal(staged.number),
            side=_hashed(
                rows.keys,
                rows.keys,
                rows.row_term("s"),
                sql.SQL("{} AS s").format(staged.side),
                rows.kind,
            ),
        )
    )
    conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(staged.side))
    _analyze(conn, rows.hashes, rows.keys)


SNAPSHOT, RECORD = "snapshot", "record"  # the two sides a row set hashes


def stats_later(
    conn: psycopg.Connection, sets: Sequence[RowSet], side: str
) -> Callable[[], dict[TableName, TableStats]]:
    """Per row set, the count and checksum of its ``side`` (:data:`SNAPSHOT`, the staged
    rows' hashes, or :data:`RECORD`), asked now and read when called (in a pipeline)."""
    cursors = [
        (
            rows,
            conn.execute(
                sql.SQL(
                    "SELECT count(*), coalesce(sum(h1$), 0)::text || ':' || "
                    "coalesce(sum(h2$), 0)::text FROM {}"
                ).format(rows.hashes if side == SNAPSHOT else rows.record)
            ),
        )
        for rows in sets
    ]

    def result() -> dict[TableName, TableStats]:
        found = {}
        for rows, cursor in cursors:
            row = cursor.fetchone()
            assert row is not None
            found[rows.table] = TableStats(int(row[0]), rows.digest(int(row[0]), str(row[1])))
        return found

    return result


def create_delta(conn: psycopg.Connection, rows: RowSet) -> None:
    """An empty delta for ``rows.table`` (its record is made by :func:`fill_record`)."""
    conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(rows.delta))
    conn.execute(
        sql.SQL("CREATE TEMP TABLE {} AS SELECT ''::text AS op$, {k} FROM {} WITH NO DATA").format(
            rows.delta, rows.table.ident, k=rows.keys
        )
    )


def fill_record(
    conn: psycopg.Connection, rows: RowSet, *, line: sql.Composable | None = None
) -> None:
    """Record every live row version of the target with its hash (in a transaction), and
    with ``line`` (:func:`snapshot.sparse.line_sql`) each row's digest for sparse staging.

    The rows' text, most of the cost, is made by a parallel scan where the server has
    workers to spare (``CREATE TABLE AS`` may run in parallel, ``INSERT`` may not).
    """
    conn.execute(
        "SELECT set_config('parallel_setup_cost', '0', true), "
        "set_config('parallel_tuple_cost', '0', true)"
    )
    conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(rows.record))
    conn.execute(
        sql.SQL("CREATE TEMP TABLE {} AS {}").format(
            rows.record,
            _hashed(
                sql.SQL("{}, z.x$").format(rows.keys),
                sql.SQL("{}, t.xmin AS x$").format(rows.keys),
                rows.row_term("t"),
                sql.SQL("{} AS t").format(rows.table.ident),
                rows.kind,
                line,
            ),
        )
    )
    _analyze(conn, rows.record, sql.SQL("{}, x$").format(rows.keys))


def stage_from_record(conn: psycopg.Connection, rows: RowSet) -> None:
    """Stage the table from the target itself, its hashes from the record.

    Only for a table whose record adds up to the manifest's count and checksum, in the
    record's own transaction: its rows are then the snapshot's, value for value.
    """
    names = sql.SQL(", ").join(map(sql.Identifier, rows.columns))
    for temp in (rows.stage, rows.hashes):
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(temp))
    conn.execute(
        sql.SQL("CREATE TEMP TABLE {} AS SELECT {} FROM {}").format(
            rows.stage, names, rows.table.ident
        )
    )
    conn.execute(
        sql.SQL("CREATE TEMP TABLE {} AS SELECT {}, h1$, h2$ FROM {}").format(
            rows.hashes, rows.keys, rows.record
        )
    )
    _analyze(conn, rows.hashes, rows.keys)


def classify(conn: psycopg.Connection, rows: RowSet) -> None:
    """The delta: every key whose row differs between the snapshot and the record."""
    conn.execute(sql.SQL("TRUNCATE {}").format(rows.delta))
    conn.execute(_CLASSIFY.format(delta=rows.delta, k=rows.keys, s=rows.hashes, t=rows.record))
    _analyze(conn, rows.delta, sql.SQL("op$, {}").format(rows.keys))


_CLASSIFY = sql.SQL(
    "INSERT INTO {delta} "
    "SELECT CASE WHEN t.x$ IS NULL THEN 'i' WHEN s.h1$ IS NULL THEN 'd' ELSE 'u' END, {k} "
    "FROM {s} AS s FULL JOIN {t} AS t USING ({k}) "
    "WHERE (s.h1$, s.h2$) IS DISTINCT FROM (t.h1$, t.h2$)"
)


Counts = dict[TableName, tuple[int, int, int, int]]  # inserts, updates, deletes, target rows


def counts(
    conn: psycopg.Connection, sets: Sequence[RowSet], recorded: Mapping[TableName, int]
) -> Counts:
    """Per table, (inserts, updates, deletes, target rows) of the current delta and record.

    ``recorded``: the record's row count where it is known (else it is counted). Every
    table's counts in one round trip (a pipeline).
    """
    with conn.pipeline():
        later = counts_later(conn, sets, recorded)
    return later()


def counts_later(
    conn: psycopg.Connection, sets: Sequence[RowSet], recorded: Mapping[TableName, int]
) -> Callable[[], Counts]:
    """:func:`counts`, asked now and read when called (in the caller's pipeline)."""
    known = dict(recorded)
    pending = [
        (
            rows,
            conn.execute(sql.SQL("SELECT op$, count(*) FROM {} GROUP BY op$").format(rows.delta)),
            None
            if rows.table in known
            else conn.execute(sql.SQL("SELECT count(*) FROM {}").format(rows.record)),
        )
        for rows in sets
    ]

    def result() -> Counts:
        found = {}
        for rows, by_op, counted in pending:
            ops = {str(op): int(n) for op, n in by_op.fetchall()}
            if counted is None:
                target = known[rows.table]
            else:
                row = counted.fetchone()
                target = int(row[0]) if row else 0
            found[rows.table] = (
                ops.get(INSERT, 0),
                ops.get(UPDATE, 0),
                ops.get(DELETE, 0),
                target,
            )
        return found

    return result


def reconcile(
    conn: psycopg.Connection,
    sets: Sequence[RowSet],
    horizon: int | None = None,
    *,
    records: Sequence[RowSet] = (),
    then: Callable[[Mapping[TableName, int]], None] | None = None,
) -> dict[TableName, int]:
    """Bring the records and the deltas up to the live tables (under the lock); rows moved
    per table of ``sets``.

    A ``(key, xmin)`` match finds the row versions that appeared or vanished since each
    record was made (:func:`find_moved`); only those are hashed and classified again.
    ``records``: row sets whose record alone is brought up (the backup's, which have no
    delta). Every table's statements go together: a round trip to find what moved, one to
    bring it up (none when nothing moved), where ``then`` asks the caller's questions too,
    given the rows moved per table.
    """
    moved = find_moved(conn, [*sets, *records], horizon)
    if then is not None or any(moved.values()):
        with conn.pipeline():
            for rows in [*sets, *records]:
                if moved[rows.table]:
                    _refresh(conn, rows)
            for rows in sets:
                if moved[rows.table]:
                    conn.execute(_FORGET.format(rows.delta, rows.moved, rows.match("d", "m")))
                    conn.execute(
                        _RECLASSIFY.format(
                            delta=rows.delta,
                            k=rows.keys,
                            s=rows.hashes,
                            t=rows.record,
                            moved=rows.moved,
                            sm=rows.match("s", "m"),
                            tm=rows.match("t", "m"),
                        )
                    )
            if then is not None:
                then(moved)
    return {rows.table: moved[rows.table] for rows in sets}


_FORGET = sql.SQL("DELETE FROM {} AS d USING {} AS m WHERE {}")
_RECLASSIFY = sql.SQL(
    "INSERT INTO {delta} "
    "SELECT CASE WHEN t.x$ IS NULL THEN 'i' WHEN s.h1$ IS NULL THEN 'd' ELSE 'u' END, "
    "{k} FROM (SELECT * FROM {s} AS s WHERE EXISTS (SELECT 1 FROM {moved} AS m "
    "WHERE {sm})) AS s FULL JOIN (SELECT * FROM {t} AS t WHERE EXISTS (SELECT 1 "
    "FROM {moved} AS m WHERE {tm})) AS t USING ({k}) "
    "WHERE (s.h1$, s.h2$) IS DISTINCT FROM (t.h1$, t.h2$)"
)


def find_moved(
    conn: psycopg.Connection, sets: Sequence[RowSet], horizon: int | None = None
) -> dict[TableName, int]:
    """The rows that moved since each record was made, by ``(key, xmin)``, per table.

    Their keys stay in each ``rows.moved``: :func:`reconcile` brings the records up to
    them, and the pre-apply backup copies those rows. With the ``horizon`` of the records'
    snapshot (:func:`horizon`), only the row versions written after it are matched with a
    record (see :func:`_moved_since`); without it, or where versions were deleted, every
    live row is. Each step runs for every table at once.
    """
    moved: dict[TableName, int | None] = dict.fromkeys((r.table for r in sets), None)
    if horizon is not None:
        moved.update(_moved_since(conn, sets, horizon))
    matching = [rows for rows in sets if moved[rows.table] is None]
    created = []
    with conn.pipeline() if matching else contextlib.nullcontext():
        for rows in matching:
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(rows.moved))
            every = _MATCH_EVERY_ROW.format(
                moved=rows.moved, k=rows.keys, table=rows.table.ident, record=rows.record
            )
            created.append((rows, conn.execute(every)))
    for rows, cursor in created:
        moved[rows.table] = cursor.rowcount
    return {table: int(n or 0) for table, n in moved.items()}


def _refresh(conn: psycopg.Connection, rows: RowSet) -> None:
    """The record's moved rows (:func:`find_moved`) replaced by their live versions."""
    conn.execute(_FORGET.format(rows.record, rows.moved, rows.match("d", "m")))
    conn.execute(
        sql.SQL("INSERT INTO {} {}").format(
            rows.record,
            _hashed(
                sql.SQL("{}, z.x$").format(rows.keys),
                sql.SQL("{}, t.xmin AS x$").format(key_columns(rows, "t")),
                rows.row_term("t"),
                sql.SQL("{} AS t JOIN {} AS m ON {}").format(
                    rows.table.ident, rows.moved, rows.match("t", "m")
                ),
                rows.kind,
            ),
        )
    )


_MATCH_EVERY_ROW = sql.SQL(
    "CREATE TEMP TABLE {moved} AS SELECT {k} FROM "
    "(SELECT {k}, t.xmin AS x$ FROM {table} AS t) AS live FULL JOIN {record} AS r "
    "USING ({k}) WHERE live.x$ IS DISTINCT FROM r.x$"
)


def horizon(conn: psycopg.Connection) -> int:
    """The snapshot's ``xmin`` (as a 32-bit xid): the oldest transaction it may not see.

    Every transaction older than it had ended when the snapshot was taken. Call in the
    record's transaction: a row version such a transaction wrote that is still live later
    is in the record, with the same ``(key, xmin)``.
    """
    return horizon_later(conn)()


def horizon_later(conn: psycopg.Connection) -> Callable[[], int]:
    """:func:`horizon`, asked now and read when called (in the caller's pipeline)."""
    cursor = conn.execute("SELECT txid_snapshot_xmin(txid_current_snapshot()) % 4294967296")

    def result() -> int:
        row = cursor.fetchone()
        assert row is not None
        return int(row[0])

    return result


def _moved_since(
    conn: psycopg.Connection, sets: Sequence[RowSet], horizon: int
) -> dict[TableName, int | None]:
    """:func:`find_moved`'s moved rows, reading only the versions written since ``horizon``.

    A live version older than the horizon is a recorded one (see :func:`horizon`). The
    newer live versions not in the record *moved in*; the recorded versions that vanished
    number ``recorded - live + moved in``. When each of those is the old version of a key
    that moved in (updates, deleted-then-inserted keys), the moved keys are exactly the
    moved-in ones. Otherwise (a key was deleted) None: the caller matches every row.
    """
    # The horizon's own transaction was still running: its rows are newer too (<=).
    newer = sql.SQL("age(t.xmin) <= (SELECT age({}::text::xid))").format(sql.Literal(str(horizon)))
    with conn.pipeline():
        pending = []
        for rows in sets:
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(rows.moved))
            created = conn.execute(
                sql.SQL(
                    "CREATE TEMP TABLE {moved} AS SELECT {k} FROM "
                    "(SELECT {k}, t.xmin AS x$ FROM {table} AS t WHERE {newer}) AS live "
                    "LEFT JOIN {record} AS r USING ({k}) WHERE r.x$ IS DISTINCT FROM live.x$"
                ).format(
                    moved=rows.moved,
                    k=rows.keys,
                    table=rows.table.ident,
                    record=rows.record,
                    newer=newer,
                )
            )
            counted = conn.execute(
                sql.SQL(
                    "SELECT (SELECT count(*) FROM {record}), (SELECT count(*) FROM {table}), "
                    "(SELECT count(*) FROM {record} AS r JOIN {moved} AS m ON {on})"
                ).format(
                    record=rows.record,
                    table=rows.table.ident,
                    moved=rows.moved,
                    on=rows.match("r", "m"),
                )
            )
            pending.append((rows, created, counted))
    found: dict[TableName, int | None] = {}
    for rows, created, counted in pending:
        row = counted.fetchone()
        assert row is not None
        moved_in = int(created.rowcount)
        recorded, live, replaced = int(row[0]), int(row[1]), int(row[2])
        found[rows.table] = moved_in if recorded - live + moved_in == replaced else None
    return found


def prove(conn: psycopg.Connection, rows: RowSet) -> TableStats:
    """Count and checksum of the live table, every row accounted for (under the lock).

    Since the record was last reconciled, only this transaction has written the table (it
    holds the lock), and every row version it writes carries its transaction id or a later
    one (its subtransactions'). So a live row with an older ``xmin`` is a recorded version,
    its hash recorded; the rows written since are found by ``xmin`` alone and hashed now.
    The recorded versions they replaced, and those the delta deleted, are subtracted. The
    counts must add up (``record - gone + written = live``); when they do not (a trigger or
    script deleted other rows), every live row is matched with the record instead.
    """
    return prove_later(conn, rows)() or prove_by_join(conn, rows)


def prove_later(conn: psycopg.Connection, rows: RowSet) -> Callable[[], TableStats | None]:
    """:func:`prove`'s first way, sent now and read when called (many tables in a pipeline);
    None when the counts do not add up: then :func:`prove_by_join`."""
    cursor = conn.execute(
        _PROVE.format(
            table=rows.table.ident,
            record=rows.record,
            delta=rows.delta,
            k=rows.keys,
            on=rows.match("r", "x"),
            h1=halves(sql.SQL("z.m$"), rows.kind)[0],
            h2=halves(sql.SQL("z.m$"), rows.kind)[1],
            term=rows.row_term("t"),
            written=_WRITTEN,
        )
    )

    def result() -> TableStats | None:
        fast = cursor.fetchone()
        assert fast is not None
        live, written, gone, recorded = int(fast[0]), int(fast[1]), int(fast[2]), int(fast[3])
        if recorded - gone + written == live:
            return TableStats(live, rows.digest(live, str(fast[4])))
        log.debug(
            "%s: %d recorded - %d gone + %d written != %d live: matching every row with the record",
            rows.table,
            recorded,
            gone,
            written,
            live,
        )
        return None

    return result


# Rows written by this transaction: their xmin is its id or a later one (its
# subtransactions'), so ``age`` (the distance back from its id, the permanent ids 0-2
# excluded) is 0 or negative. Integer arithmetic on the xid: no text conversion per row.
# A very old row taken for a new one is only hashed again (the same hash): never a wrong sum.
_WRITTEN = sql.SQL("age(t.xmin) <= 0")
_PROVE = sql.SQL(
    "WITH written AS MATERIALIZED ("
    "  SELECT {k}, {h1} AS h1$, {h2} AS h2$ FROM ("
    "    SELECT {k}, {term} AS m$ FROM {table} AS t WHERE {written} OFFSET 0) AS z),"
    " gone AS MATERIALIZED ("
    "  SELECT r.h1$, r.h2$ FROM {record} AS r JOIN ("
    "    SELECT {k} FROM written UNION SELECT {k} FROM {delta} WHERE op$ = 'd') AS x ON {on}),"
    " w AS (SELECT count(*) AS n, coalesce(sum(h1$), 0) AS s1, coalesce(sum(h2$), 0) AS s2"
    "  FROM written),"
    " g AS (SELECT count(*) AS n, coalesce(sum(h1$), 0) AS s1, coalesce(sum(h2$), 0) AS s2"
    "  FROM gone),"
    " r AS (SELECT count(*) AS n, coalesce(sum(h1$), 0) AS s1, coalesce(sum(h2$), 0) AS s2"
    "  FROM {record})"
    " SELECT (SELECT count(*) FROM {table}), w.n, g.n, r.n,"
    " (r.s1 - g.s1 + w.s1)::text || ':' || (r.s2 - g.s2 + w.s2)::text FROM w, g, r"
)


def prove_by_join(conn: psycopg.Connection, rows: RowSet) -> TableStats:
    """:func:`prove` by matching every live row with the record by ``(key, xmin)``."""
    row = conn.execute(
        sql.SQL(
            "SELECT count(*), coalesce(sum(coalesce(r.h1$, f.h1$)), 0)::text || ':' || "
            "coalesce(sum(coalesce(r.h2$, f.h2$)), 0)::text "
            "FROM {table} AS t LEFT JOIN {record} AS r ON {on} AND r.x$ = t.xmin "
            "CROSS JOIN LATERAL (SELECT {h1} AS h1$, {h2} AS h2$ FROM (SELECT CASE WHEN r.x$ IS "
            "NULL THEN {term} END AS m$ OFFSET 0) AS z) AS f"
        ).format(
            table=rows.table.ident,
            record=rows.record,
            on=rows.match("r", "t"),
            h1=halves(sql.SQL("z.m$"), rows.kind)[0],
            h2=halves(sql.SQL("z.m$"), rows.kind)[1],
            term=rows.row_term("t"),
        )
    ).fetchone()
    assert row is not None
    return TableStats(int(row[0]), rows.digest(int(row[0]), str(row[1])))


def key_columns(rows: RowSet, alias: str) -> sql.Composable:
    """``alias.k1, alias.k2``."""
    return sql.SQL(", ").join(
        sql.SQL("{}.{}").format(sql.Identifier(alias), sql.Identifier(k)) for k in rows.key
    )


def drop_all(conn: psycopg.Connection, sets: Sequence[RowSet]) -> None:
    """Remove the temporary tables of ``sets`` (they also die with the session)."""
    for rows in sets:
        for temp in (rows.hashes, rows.record, rows.delta, rows.moved):
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(temp))
