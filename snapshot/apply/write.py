"""Writing the plan into the target, every app trigger firing and every constraint holding.

Three passes over the scope, in the order computed from its foreign keys:

1. children first: delete the rows the snapshot lacks, except parents a surviving child
   still points at (those wait for pass 3); a table replaced in full loses every row
   (row by row, but those a row outside the scope, or a row kept for one, still points
   at: they are updated in place, :mod:`.outside`; rows kept for them never go);
2. parents first: insert the rows the target lacks and update the rows that differ
   (a self-referencing table inserts first, so a row can move under a new parent), the
   unique values other rows take moved aside first (:mod:`.swaps`);
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
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace

import psycopg
from psycopg import sql

from snapshot import progress, staging
from snapshot.apply import outside, swaps
from snapshot.apply.plan import Plan, decide
from snapshot.apply.rows import DELETE, INSERT, UPDATE, RowSet
from snapshot.apply.state import ApplyRun
from snapshot.catalog import ForeignKey
from snapshot.errors import Refused
from snapshot.names import TableName

log = logging.getLogger(__name__)


@dataclass
class Written:
    """Rows each table actually had inserted, updated and deleted."""

    inserted: dict[TableName, int] = field(default_factory=dict)
    updated: dict[TableName, int] = field(default_factory=dict)
    deleted: dict[TableName, int] = field(default_factory=dict)
    held: set[TableName] = field(default_factory=set)  # replaced in full, rows kept in place

    def add(self, counter: dict[TableName, int], table: TableName, rows: int) -> None:
        counter[table] = counter.get(table, 0) + max(rows, 0)


class TableFailed(Exception):
    """A statement on one table failed; carries the table, for the fallback to replace it."""

    def __init__(self, table: TableName, error: psycopg.Error) -> None:
        super().__init__(str(error))
        self.table = table
        self.error = error


@dataclass(frozen=True)
class Step:
    """One statement of a pass: the verb its rows count under (``deleted``, ``inserted``,
    ``updated``; ``""`` for a statement whose rows are not the table's writes), its table."""

    verb: str
    table: TableName
    query: sql.Composed


def send_steps(
    conn: psycopg.Connection, steps: Sequence[Step], *, batched: bool
) -> Callable[[], list[int]]:
    """Run ``steps`` in order; what it returns gives the rows each wrote.

    ``batched``: the caller's pipeline is open; the statements are only sent, and their rows
    are known once the pipeline has synced (call the result then). A failure then raises
    the server's error, whose table is not known (the caller runs the writes again one by
    one to find it). Otherwise one statement at a time, a failure raising
    :class:`TableFailed`.
    """
    if not batched:
        done = [_one(conn, step) for step in steps]
        return lambda: done
    cursors = [conn.execute(step.query) for step in steps]

    def counts() -> list[int]:
        rows = [max(int(cursor.rowcount), 0) for cursor in cursors]
        for step, count in zip(steps, rows, strict=True):
            if step.verb:
                progress.table_done(step.verb, step.table, count, None)
        return rows

    return counts


def _one(conn: psycopg.Connection, step: Step) -> int:
    """One statement, a failure turned into :class:`TableFailed`; timed when it counts."""
    started = time.monotonic()
    try:
        if step.verb:
            with progress.still_running(f"{_PRESENT[step.verb]} {step.table}"):
                rows = int(conn.execute(step.query).rowcount)
            progress.table_done(step.verb, step.table, rows, time.monotonic() - started)
            return rows
        return max(int(conn.execute(step.query).rowcount), 0)
    except psycopg.errors.QueryCanceled:
        raise
    except psycopg.OperationalError:
        raise
    except psycopg.Error as exc:
        raise TableFailed(step.table, exc) from exc


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


def create_helper_indexes(run: ApplyRun, fks: Collection[ForeignKey]) -> list[sql.Identifier]:
    """Index the children of parents that lose many rows; dropped concurrently after commit.

    Built before anything in the transaction writes: an index built after this
    transaction updated its table is flagged ``indcheckxmin`` and useless until commit.
    ``CREATE INDEX`` takes a SHARE lock on a table the apply already holds: readers go on.
    """
    created: list[sql.Identifier] = []
    for fk in fks:
        name = f"{HELPER_PREFIX}{secrets.token_hex(4)}"
        run.conn.execute(
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


def leftover_helper_indexes_later(
    conn: psycopg.Connection, tables: Collection[TableName]
) -> Callable[[], list[sql.Identifier]]:
    """Helper indexes an earlier apply could not drop (killed right after its commit),
    asked now and read when called (in a pipeline)."""
    cursor = conn.execute(
        "SELECT n.nspname, c.relname FROM pg_index i "
        "JOIN pg_class c ON c.oid = i.indexrelid "
        "JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE c.relname LIKE %s AND i.indrelid = ANY(%s::regclass[])",
        (HELPER_PREFIX.replace("_", r"\_") + "%", [t.ident.as_string(conn) for t in tables]),
    )
    return lambda: [sql.Identifier(schema, name) for schema, name in cursor.fetchall()]


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


def blocked_table(conn: psycopg.Connection, tables: Sequence[TableName]) -> TableName | None:
    """The first of ``tables`` (in their order) another session holds a lock on that writers
    conflict with: the one a ``LOCK TABLE`` of them all waits for."""
    row = conn.execute(
        "SELECT w.i FROM unnest(%s::regclass[]) WITH ORDINALITY AS w(t, i) "
        "WHERE EXISTS (SELECT 1 FROM pg_locks l WHERE l.relation = w.t AND l.granted "
        "AND l.pid <> pg_backend_pid() AND l.mode = ANY(%s)) ORDER BY w.i LIMIT 1",
        ([t.ident.as_string(conn) for t in tables], list(_CONFLICTING)),
    ).fetchone()
    return tables[int(row[0]) - 1] if row else None


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


def guard_outside(run: ApplyRun, plan: Plan, allowed: Collection[str]) -> Plan:
    """Refuse writes that would break references from outside the scope the user did not
    accept; with ``--keep-referenced``, keep their parents. Returns the plan as it now is.

    Checked under the lock, just before the writes, by the rule ``check`` applied
    (:mod:`.outside`): rows the app or a pre-script wrote since are counted too.
    """
    run.outside = outside.settle(run, allowed)
    refused = outside.refusal(run, run.outside, allowed)
    if refused:
        raise Refused(f"{refused}; rolled back, {run.target.env} is unchanged")
    if not run.kept:
        return plan
    forced = {t.table: t.reason for t in plan.tables if t.full}
    return replace(decide(run, forced), auth=plan.auth, seconds=plan.seconds)


def _values(run: ApplyRun, table: TableName, columns: tuple[str, ...]) -> list[sql.Composable]:
    """``s.column``, or the column's ``insert_as`` value cast to its type."""
    overrides = {c.column: v for c, v in run.config.apply.insert_as.items() if c.table == table}
    types = {c.name: c.type for c in run.shapes[table].columns}
    return [
        sql.SQL("CAST({} AS {})").format(sql.Literal(overrides[c]), sql.SQL(types[c]))
        if c in overrides
        else sql.Identifier("s", c)
        for c in columns
    ]


def _insert(run: ApplyRun, table: TableName, source: sql.Composable) -> sql.Composed:
    entry = run.entries[table]
    return sql.SQL("INSERT INTO {} ({}) {}SELECT {} FROM {}").format(
        table.ident,
        sql.SQL(", ").join(map(sql.Identifier, entry.column_names)),
        sql.SQL("OVERRIDING SYSTEM VALUE ") if run.shapes[table].identity_always else sql.SQL(""),
        sql.SQL(", ").join(_values(run, table, entry.column_names)),
        source,
    )


def _delta_rows(rows: RowSet, op: str) -> sql.Composed:
    """``stage AS s JOIN delta AS d ON ... AND d.op$ = op``: the snapshot rows to write."""
    return sql.SQL("{} AS s JOIN {} AS d ON {} AND d.op$ = {}").format(
        rows.stage, rows.delta, rows.match("s", "d"), sql.Literal(op)
    )


def _update(
    run: ApplyRun, rows: RowSet, source: sql.Composable | None = None
) -> sql.Composed | None:
    """Update the rows of ``source`` (the delta's updates by default), matched by key."""
    changing = tuple(c for c in run.entries[rows.table].column_names if c not in rows.key)
    if not changing:
        return None
    assignments = sql.SQL(", ").join(
        sql.SQL("{} = {}").format(sql.Identifier(c), value)
        for c, value in zip(changing, _values(run, rows.table, changing), strict=True)
    )
    return sql.SQL("UPDATE {} AS t SET {} FROM {} WHERE {}").format(
        rows.table.ident, assignments, source or _delta_rows(rows, UPDATE), rows.match("t", "s")
    )


def _guarded_delete(run: ApplyRun, rows: RowSet, final: bool) -> sql.Composed:
    """Delete the rows the snapshot lacks; before the inserts, spare those still referred to."""
    spare: list[sql.Composable] = []
    if not final:
        for fk in run.fks:
            if fk.parent != rows.table or fk.child not in run.order:
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


_PRESENT = {"deleted": "deleting from", "inserted": "inserting into", "updated": "updating"}


def delete_first(
    run: ApplyRun, plan: Plan, *, spare: bool = True
) -> tuple[Written, list[Step], Callable[[], dict[TableName, tuple[swaps.UniqueKey, ...]]]]:
    """Pass 1, children first: the rows the snapshot lacks, but parents still referred to.

    ``spare=False`` (foreign keys checked in bulk, none acting per row): every one of them.
    Returns what pass 2 builds on (its counts filled by :func:`deleted`), the statements
    to run, and the question pass 2 needs answered, already asked (:mod:`.swaps`): asked
    before the statements run, it travels in their round trip.
    """
    done = Written()
    holding = outside.holding(run) if spare else frozenset()
    steps = []
    for table in reversed(run.order):
        if table in plan.full_tables:
            query = _full_delete(run, table, held=table in holding and table in run.row_sets)
            if table in holding and table in run.row_sets:
                done.held.add(table)
        elif plan.table(table).deletes:
            query = _guarded_delete(run, run.row_sets[table], final=not spare)
        else:
            continue
        steps.append(Step("deleted", table, query))
    unique = swaps.unique_keys_later(run, [t for t in run.order if _trades(run, plan, done, t)])
    return done, steps, unique


def deleted(done: Written, steps: Sequence[Step], rows: Sequence[int]) -> None:
    """Count what pass 1's ``steps`` deleted (``rows``: from :func:`send_steps`)."""
    for step, count in zip(steps, rows, strict=True):
        done.add(done.deleted, step.table, count)


def insert_and_update(
    run: ApplyRun,
    plan: Plan,
    done: Written,
    unique: Mapping[TableName, tuple[swaps.UniqueKey, ...]],
    *,
    batched: bool,
) -> Callable[[], None]:
    """Pass 2, parents first: insert what the target lacks, update what differs. Call what
    it returns once the statements ran (batched: the pipeline synced) to count them.

    ``unique``: the keys whose values rows may trade, by table (from :func:`delete_first`).
    """
    steps: list[Step] = []
    moving: list[tuple[int, TableName]] = []  # where each table's move aside is among steps
    for table in run.order:
        self_ref = any(fk.child == table == fk.parent for fk in run.fks)
        whole = table in plan.full_tables
        if not whole:
            counts = plan.table(table)
            if not counts.inserts and not counts.updates:
                continue  # (a table without a key is here only when it holds the snapshot's rows)
        if table in unique:  # values other rows take move aside first (swaps.py); in a full
            # replace, rows held in place are updated: they may trade values too
            on, move, off = swaps.move_aside(
                run, run.row_sets[table], unique[table], whole=whole, inserts_first=self_ref
            )
            moving.append((len(steps) + 1, table))
            steps += [Step("", table, on), Step("", table, move), Step("", table, off)]
        if whole:
            steps += _full_insert(run, table, done, self_ref)
            continue
        delta = run.row_sets[table]
        for verb in ("insert", "update") if self_ref else ("update", "insert"):
            if verb == "insert" and counts.inserts:
                insert = _insert(run, table, _delta_rows(delta, INSERT))
                steps.append(Step("inserted", table, insert))
            elif verb == "update" and counts.updates and (update := _update(run, delta)):
                steps.append(Step("updated", table, update))
    sent = send_steps(run.conn, steps, batched=batched)

    def count() -> None:
        written = sent()
        for step, rows in zip(steps, written, strict=True):
            if step.verb == "inserted":
                done.add(done.inserted, step.table, rows)
            elif step.verb == "updated":
                done.add(done.updated, step.table, rows)
        for at, table in moving:
            swaps.moved(table, unique[table], written[at])

    return count


def _trades(run: ApplyRun, plan: Plan, done: Written, table: TableName) -> bool:
    """Whether rows of ``table`` may trade unique values in pass 2 (:mod:`.swaps`): it has a
    key and inserts or updates rows, or is replaced in full around rows held in place."""
    if table not in run.row_sets:
        return False
    if table in plan.full_tables:
        return table in done.held
    counts = plan.table(table)
    return bool(counts.inserts or counts.updates)


def delete_last(run: ApplyRun, plan: Plan, done: Written, *, batched: bool) -> Callable[[], None]:
    """Pass 3, children first: the parents that waited for their children to move. Call
    what it returns once the statements ran (batched: the pipeline synced) to count them.

    Needs pass 1's counts (a parent that lost every row it meant to needs no second pass).
    """
    steps = []
    for table in reversed(run.order):
        if table in done.held:
            held = run.row_sets[table]
            query = sql.SQL(
                "DELETE FROM {} AS t WHERE NOT EXISTS (SELECT 1 FROM {} AS s WHERE {})"
            ).format(table.ident, held.stage, held.match("s", "t"))
            query = _sparing_kept(run, held, query, "t")
        elif table in plan.full_tables or plan.table(table).deletes <= done.deleted.get(table, 0):
            continue
        else:
            query = _guarded_delete(run, run.row_sets[table], final=True)
        steps.append(Step("deleted", table, query))
    sent = send_steps(run.conn, steps, batched=batched)
    return lambda: deleted(done, steps, sent())


def _sparing_kept(run: ApplyRun, rows: RowSet, query: sql.Composed, alias: str) -> sql.Composed:
    """``query`` (ending in a WHERE clause over ``alias``) sparing the rows kept in place."""
    if rows.table not in run.kept:
        return query
    return sql.SQL("{} AND NOT EXISTS (SELECT 1 FROM {} AS k WHERE {})").format(
        query, outside.kept_keys(rows), rows.match(alias, "k")
    )


def _full_delete(run: ApplyRun, table: TableName, *, held: bool) -> sql.Composed:
    """Pass 1 of a full replace: every row, but those kept (:mod:`.outside`).

    ``held`` (row by row, rows outside the scope may refer to the table): also every row
    something still refers to. Those stay in place and are updated to the snapshot's
    values, so a parent the snapshot also holds never leaves its outside rows (NO ACTION
    and RESTRICT would refuse, CASCADE delete them); pass 3 deletes those it lacks.
    """
    # WHERE true: pg_safeupdate (Supabase) refuses a DELETE without WHERE
    query = sql.SQL("DELETE FROM {} AS t WHERE true").format(table.ident)
    if held:
        outer = set(outside.outside_keys(run))
        for fk in run.fks:
            if fk.parent != table or (fk.child not in run.order and fk not in outer):
                continue
            refer = sql.SQL(" AND ").join(
                sql.SQL("c.{} = t.{}").format(sql.Identifier(c), sql.Identifier(p))
                for c, p in zip(fk.columns, fk.parent_columns, strict=True)
            )
            query = sql.SQL("{} AND NOT EXISTS (SELECT 1 FROM {} AS c WHERE {})").format(
                query, fk.child.ident, refer
            )
    rows = run.row_sets.get(table)
    return _sparing_kept(run, rows, query, "t") if rows is not None else query


def _full_insert(run: ApplyRun, table: TableName, done: Written, self_ref: bool) -> list[Step]:
    """Pass 2 of a full replace: the snapshot's rows, but those of rows kept in place.

    Rows held in place (see :func:`_full_delete`) are updated to the snapshot's values and
    the others inserted (a self-referencing table inserts first, as a delta does).
    """
    stage = staging.staging_table(run.entries[table])
    rows = run.row_sets.get(table)
    source: sql.Composable = sql.SQL("{} AS s").format(stage)
    if rows is not None and table in run.kept:
        source = sql.SQL(
            "(SELECT * FROM {} AS z WHERE NOT EXISTS (SELECT 1 FROM {} AS k WHERE {})) AS s"
        ).format(stage, outside.kept_keys(rows), rows.match("z", "k"))
    if rows is None or table not in done.held:
        return [Step("inserted", table, _insert(run, table, source))]
    missing = sql.SQL("{} WHERE NOT EXISTS (SELECT 1 FROM {} AS t WHERE {})").format(
        source, table.ident, rows.match("t", "s")
    )
    steps = []
    for verb in ("insert", "update") if self_ref else ("update", "insert"):
        if verb == "insert":
            steps.append(Step("inserted", table, _insert(run, table, missing)))
        elif (update := _update(run, rows, source)) is not None:
            steps.append(Step("updated", table, update))
    return steps


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
