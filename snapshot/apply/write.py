"""Writing the plan into the target, every app trigger firing and every constraint holding.

Three passes over the scope, in the order computed from its foreign keys:

1. children first: delete the rows the snapshot lacks, except parents a surviving child
   still points at (those wait for pass 3); a table replaced in full loses every row;
2. parents first: insert the rows the target lacks and update the rows that differ
   (a self-referencing table inserts first, so a row can move under a new parent);
3. children first: delete the parents that waited, now that their children point elsewhere.

So a child re-pointed to a new parent finds it inserted, a parent removed while its
children move to another one is deleted only once they have moved, and nothing cascades
into rows the snapshot keeps. ``[apply] insert_as`` columns get their fixed value on
insert and on update alike (the post-scripts restore the snapshot's value).
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Collection
from dataclasses import dataclass, field

import psycopg
from psycopg import sql

from snapshot import progress, staging, text
from snapshot.apply.plan import Plan
from snapshot.apply.rows import DELETE, INSERT, UPDATE, RowSet
from snapshot.catalog import ForeignKey
from snapshot.errors import Refused
from snapshot.names import AUTH_TABLES, TableName
from snapshot.session import Session

log = logging.getLogger(__name__)

DELETE_RULES = {
    "a": "no action",
    "r": "restrict",
    "c": "cascade",
    "n": "set null",
    "d": "set default",
}


@dataclass
class Written:
    """Rows each table actually had inserted, updated and deleted."""

    inserted: dict[TableName, int] = field(default_factory=dict)
    updated: dict[TableName, int] = field(default_factory=dict)
    deleted: dict[TableName, int] = field(default_factory=dict)

    def add(self, counter: dict[TableName, int], table: TableName, rows: int) -> None:
        counter[table] = counter.get(table, 0) + max(rows, 0)


class TableFailed(Exception):
    """A statement on one table failed; carries the table, for the fallback to replace it."""

    def __init__(self, table: TableName, error: psycopg.Error) -> None:
        super().__init__(str(error))
        self.table = table
        self.error = error


class _Statement:
    """Runs one statement for a table, turning a failure into :class:`TableFailed`."""

    def __init__(self, conn: psycopg.Connection) -> None:
        self.conn = conn

    def __call__(self, table: TableName, query: sql.Composed) -> int:
        try:
            return int(self.conn.execute(query).rowcount)
        except psycopg.errors.QueryCanceled:
            raise
        except psycopg.OperationalError:
            raise
        except psycopg.Error as exc:
            raise TableFailed(table, exc) from exc


HELPER_PREFIX = "snapshot_apply_fk_"

# Modes that conflict with LOCK TABLE ... IN EXCLUSIVE MODE (and so hold up the apply).
_CONFLICTING = (
    "RowShareLock",
    "RowExclusiveLock",
    "ShareUpdateExclusiveLock",
    "ShareLock",
    "ShareRowExclusiveLock",
    "ExclusiveLock",
    "AccessExclusiveLock",
)


def create_helper_indexes(s: Session, fks: Collection[ForeignKey]) -> list[sql.Identifier]:
    """Index the children of parents that lose many rows; dropped concurrently after commit.

    Built before anything in the transaction writes: an index built after this
    transaction updated its table is flagged ``indcheckxmin`` and useless until commit.
    ``CREATE INDEX`` takes a SHARE lock on a table the apply already holds: readers go on.
    """
    created: list[sql.Identifier] = []
    for fk in fks:
        name = f"{HELPER_PREFIX}{secrets.token_hex(4)}"
        s.conn.execute(
            sql.SQL("CREATE INDEX {} ON {} ({})").format(
                sql.Identifier(name),
                fk.child.ident,
                sql.SQL(", ").join(map(sql.Identifier, fk.columns)),
            )
        )
        created.append(sql.Identifier(fk.child.schema, name))
    if created:
        log.info(
            "  indexed %d foreign keys for the deletes (dropped after commit): %s",
            len(created),
            ", ".join(str(fk) for fk in fks),
        )
    return created


def leftover_helper_indexes(
    conn: psycopg.Connection, tables: Collection[TableName]
) -> list[sql.Identifier]:
    """Helper indexes an earlier apply could not drop (killed right after its commit)."""
    rows = conn.execute(
        "SELECT n.nspname, c.relname FROM pg_index i "
        "JOIN pg_class c ON c.oid = i.indexrelid "
        "JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE c.relname LIKE %s AND i.indrelid = ANY(%s::regclass[])",
        (HELPER_PREFIX.replace("_", r"\_") + "%", [t.ident.as_string(conn) for t in tables]),
    ).fetchall()
    return [sql.Identifier(schema, name) for schema, name in rows]


def drop_helper_indexes(
    conn: psycopg.Connection, indexes: Collection[sql.Identifier], lock_timeout: str
) -> list[str]:
    """Drop ``indexes`` with ``DROP INDEX CONCURRENTLY``, outside any transaction.

    A plain ``DROP INDEX`` takes an ACCESS EXCLUSIVE lock that makes every reader wait;
    the concurrent form never blocks them. Each wait is bounded by ``lock_timeout``; the
    indexes that could not be dropped are returned (the next apply drops them).
    """
    left = []
    conn.execute(sql.SQL("SET lock_timeout = {}").format(sql.Literal(lock_timeout)))
    try:
        for index in indexes:
            try:
                conn.execute(sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(index))
            except (psycopg.errors.LockNotAvailable, psycopg.errors.QueryCanceled):
                left.append(index.as_string(conn))
    finally:
        conn.execute("SET lock_timeout = 0")
    return left


def lock_holders(
    conn: psycopg.Connection, tables: Collection[TableName], *, readers: bool = False
) -> str:
    """The other sessions holding locks on ``tables`` that writers conflict with, in words.

    ``readers`` counts readers too (``ACCESS SHARE``): they hold up ``ALTER TABLE``.
    """
    modes = [*_CONFLICTING, "AccessShareLock"] if readers else list(_CONFLICTING)
    rows = conn.execute(
        "SELECT DISTINCT a.pid, coalesce(nullif(a.application_name, ''), 'no name'), "
        "coalesce(a.state, 'unknown'), "
        "extract(epoch FROM now() - coalesce(a.xact_start, a.query_start, now()))::int "
        "FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
        "WHERE l.granted AND l.pid <> pg_backend_pid() AND l.mode = ANY(%s) "
        "AND l.relation = ANY(%s::regclass[]) ORDER BY 4 DESC, 1",
        (modes, [t.ident.as_string(conn) for t in tables]),
    ).fetchall()
    if not rows:
        return "no session holds it any more"
    sessions = [
        f"pid {pid} ({name!r}, {state} for {seconds} s)" for pid, name, state, seconds in rows[:5]
    ]
    more = f" and {len(rows) - 5} more" if len(rows) > 5 else ""
    return "held by " + ", ".join(sessions) + more


def guard_outside(s: Session, plan: Plan, allowed: Collection[str]) -> None:
    """Refuse deletes that would reach rows outside the scope the user did not accept.

    Checked under the lock, just before the deletes, against what they will delete.
    """
    scoped = set(s.order)
    auth = set(AUTH_TABLES)
    for fk in s.fks:
        if fk.parent not in scoped or fk.child in scoped or fk.child in auth:
            continue
        name = f"{fk.child}.{fk.name}"
        rule = DELETE_RULES.get(fk.on_delete, fk.on_delete)
        if fk.on_delete in ("c", "n", "d") and name in allowed:
            continue
        count = referring_rows(s, plan, fk)
        if not count:
            continue
        if fk.on_delete in ("a", "r"):
            what = "would block the deletes"
            fix = f"add {fk.child} to the scope, or remove those references first"
        else:
            what = (
                f"would be {'deleted' if fk.on_delete == 'c' else 'nulled out'} (on delete {rule})"
            )
            fix = f"add {fk.child} to the scope, or accept it with --allow-cascade {name}"
        raise Refused(
            f"{text.count(count, 'row')} of {fk.child} (outside the scope) "
            f"{'refers' if count == 1 else 'refer'} to rows this apply deletes "
            f"from {fk.parent} ({fk}) and {what}: {fix}; rolled back, {s.target.env} is unchanged"
        )


def referring_rows(s: Session, plan: Plan, fk: ForeignKey) -> int:
    """Rows of ``fk.child`` that refer to rows the apply deletes from ``fk.parent``."""
    not_null = sql.SQL(" AND ").join(
        sql.SQL("c.{} IS NOT NULL").format(sql.Identifier(c)) for c in fk.columns
    )
    rows = s.row_sets.get(fk.parent)
    if fk.parent in plan.full_tables or rows is None:
        query = sql.SQL("SELECT count(*) FROM {} AS c WHERE {}").format(fk.child.ident, not_null)
    else:
        refer = sql.SQL(" AND ").join(
            sql.SQL("c.{} = p.{}").format(sql.Identifier(c), sql.Identifier(p))
            for c, p in zip(fk.columns, fk.parent_columns, strict=True)
        )
        query = sql.SQL(
            "SELECT count(*) FROM {child} AS c JOIN {parent} AS p ON {refer} "
            "JOIN {delta} AS d ON {match} AND d.op$ = {op}"
        ).format(
            child=fk.child.ident,
            parent=fk.parent.ident,
            refer=refer,
            delta=rows.delta,
            match=rows.match("p", "d"),
            op=sql.Literal(DELETE),
        )
    row = s.conn.execute(query).fetchone()
    return int(row[0]) if row else 0


def _values(s: Session, table: TableName, columns: tuple[str, ...]) -> list[sql.Composable]:
    """``s.column``, or the column's ``insert_as`` value cast to its type."""
    overrides = {c.column: v for c, v in s.config.apply.insert_as.items() if c.table == table}
    types = {c.name: c.type for c in s.shapes[table].columns}
    return [
        sql.SQL("CAST({} AS {})").format(sql.Literal(overrides[c]), sql.SQL(types[c]))
        if c in overrides
        else sql.Identifier("s", c)
        for c in columns
    ]


def _insert(s: Session, table: TableName, source: sql.Composable) -> sql.Composed:
    entry = s.entries[table]
    return sql.SQL("INSERT INTO {} ({}) {}SELECT {} FROM {}").format(
        table.ident,
        sql.SQL(", ").join(map(sql.Identifier, entry.column_names)),
        sql.SQL("OVERRIDING SYSTEM VALUE ") if s.shapes[table].identity_always else sql.SQL(""),
        sql.SQL(", ").join(_values(s, table, entry.column_names)),
        source,
    )


def _delta_rows(rows: RowSet, op: str) -> sql.Composed:
    """``stage AS s JOIN delta AS d ON ... AND d.op$ = op``: the snapshot rows to write."""
    return sql.SQL("{} AS s JOIN {} AS d ON {} AND d.op$ = {}").format(
        rows.stage, rows.delta, rows.match("s", "d"), sql.Literal(op)
    )


def _update(s: Session, rows: RowSet) -> sql.Composed | None:
    changing = tuple(c for c in s.entries[rows.table].column_names if c not in rows.key)
    if not changing:
        return None
    assignments = sql.SQL(", ").join(
        sql.SQL("{} = {}").format(sql.Identifier(c), value)
        for c, value in zip(changing, _values(s, rows.table, changing), strict=True)
    )
    return sql.SQL("UPDATE {} AS t SET {} FROM {} WHERE {}").format(
        rows.table.ident, assignments, _delta_rows(rows, UPDATE), rows.match("t", "s")
    )


def _guarded_delete(s: Session, rows: RowSet, final: bool) -> sql.Composed:
    """Delete the rows the snapshot lacks; before the inserts, spare those still referred to."""
    spare: list[sql.Composable] = []
    if not final:
        for fk in s.fks:
            if fk.parent != rows.table or fk.child not in s.order:
                continue
            refer = sql.SQL(" AND ").join(
                sql.SQL("c.{} = t.{}").format(sql.Identifier(c), sql.Identifier(p))
                for c, p in zip(fk.columns, fk.parent_columns, strict=True)
            )
            spare.append(
                sql.SQL("AND NOT EXISTS (SELECT 1 FROM {} AS c WHERE {})").format(
                    fk.child.ident, refer
                )
            )
    return sql.SQL("DELETE FROM {} AS t USING {} AS d WHERE {} AND d.op$ = {} {}").format(
        rows.table.ident,
        rows.delta,
        rows.match("t", "d"),
        sql.Literal(DELETE),
        sql.SQL(" ").join(spare),
    )


def _timed(run: _Statement, verb: str, table: TableName, query: sql.Composed) -> int:
    """Run one table's statement, saying so while it runs long and when it is done."""
    started = time.monotonic()
    with progress.still_running(f"{_PRESENT[verb]} {table}"):
        rows = run(table, query)
    progress.table_done(verb, table, rows, time.monotonic() - started)
    return rows


_PRESENT = {"deleted": "deleting from", "inserted": "inserting into", "updated": "updating"}


def delete_first(s: Session, plan: Plan, *, spare: bool = True) -> Written:
    """Pass 1, children first: the rows the snapshot lacks, but parents still referred to.

    ``spare=False`` (foreign keys checked in bulk, none acting per row): every one of them.
    """
    run, done = _Statement(s.conn), Written()
    for table in reversed(s.order):
        if table in plan.full_tables:
            # WHERE true: pg_safeupdate (Supabase) refuses a DELETE without WHERE
            query = sql.SQL("DELETE FROM {} WHERE true").format(table.ident)
        elif plan.table(table).deletes:
            query = _guarded_delete(s, s.row_sets[table], final=not spare)
        else:
            continue
        done.add(done.deleted, table, _timed(run, "deleted", table, query))
    return done


def insert_and_update(s: Session, plan: Plan, done: Written) -> None:
    """Pass 2, parents first: insert what the target lacks, update what differs."""
    run = _Statement(s.conn)
    for table in s.order:
        if table in plan.full_tables:
            source = sql.SQL("{} AS s").format(staging.staging_table(s.entries[table]))
            done.add(
                done.inserted, table, _timed(run, "inserted", table, _insert(s, table, source))
            )
            continue
        counts = plan.table(table)
        if not counts.inserts and not counts.updates:
            continue  # (a table without a key is here only when it holds the snapshot's rows)
        rows = s.row_sets[table]
        self_ref = any(fk.child == table == fk.parent for fk in s.fks)
        for step in ("insert", "update") if self_ref else ("update", "insert"):
            if step == "insert" and counts.inserts:
                insert = _insert(s, table, _delta_rows(rows, INSERT))
                done.add(done.inserted, table, _timed(run, "inserted", table, insert))
            elif step == "update" and counts.updates and (update := _update(s, rows)) is not None:
                done.add(done.updated, table, _timed(run, "updated", table, update))


def delete_last(s: Session, plan: Plan, done: Written) -> None:
    """Pass 3, children first: the parents that waited for their children to move."""
    run = _Statement(s.conn)
    for table in reversed(s.order):
        if table in plan.full_tables or plan.table(table).deletes <= done.deleted.get(table, 0):
            continue
        query = _guarded_delete(s, s.row_sets[table], final=True)
        done.add(done.deleted, table, _timed(run, "deleted", table, query))


def expected_writes(plan: Plan) -> tuple[int, int]:
    """Table statements and rows the writes will run through, for progress."""
    statements = sum(bool(t.inserts) + bool(t.updates) + bool(t.deletes) for t in plan.tables)
    return statements, plan.changes


def plan_settings(conn: psycopg.Connection, plan: Plan) -> None:
    """What the SQL scripts may read of the plan, as settings of the transaction.

    ``snapshot.full_replace``: the tables replaced in full; ``snapshot.unchanged``: the
    tables the apply writes no row of (a delta with nothing to insert, update or delete).
    Both are text arrays (``current_setting('snapshot.unchanged', true)::text[]``).
    """
    unchanged = [t.table for t in plan.tables if not t.full and not t.changes]
    conn.execute(
        "SELECT set_config('snapshot.full_replace', %s::text[]::text, true), "
        "set_config('snapshot.unchanged', %s::text[]::text, true)",
        ([str(t) for t in sorted(plan.full_tables)], [str(t) for t in sorted(unchanged)]),
    )
