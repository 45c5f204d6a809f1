"""What an apply will do, worked out before it takes any lock: the plan a person confirms.

Per table: whether it is written as a delta (only the rows that differ) or replaced in
full, and how many rows it inserts, updates, deletes and leaves alone. The snapshot's rows
are hashed from their staged copy and the target's from one REPEATABLE READ read of every
table, so the numbers are exact for that moment; the apply reconciles them under its lock.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import psycopg
from psycopg import sql

from snapshot import catalog, latency, sparse, staging
from snapshot.apply import backup, outside, since
from snapshot.apply import rows as rowsets
from snapshot.apply.auth import AuthPlan, auth_plan_later
from snapshot.apply.rows import RowSet
from snapshot.apply.state import ApplyRun
from snapshot.catalog import ForeignKey
from snapshot.checksum import TableStats, kind_of, table_stats
from snapshot.names import TableName

log = logging.getLogger(__name__)

# Deleting a parent row makes PostgreSQL look for its children; without an index on the
# child's foreign key every look scans the child. From this many deleted parents on, a
# temporary index (built inside the transaction) is cheaper than the scans.
HELPER_INDEX_FROM = 16


@dataclass(frozen=True)
class TablePlan:
    """One table: how it is written and how many rows change."""

    table: TableName
    full: bool
    reason: str  # why it is replaced in full ("" for a delta)
    inserts: int
    updates: int
    deletes: int
    target_rows: int
    kept: int = 0  # rows the snapshot lacks, kept for rows outside the scope (outside.py)

    @property
    def unchanged(self) -> int:
        """Target rows left as they are (the kept ones among them)."""
        return self.target_rows - self.updates - self.deletes

    @property
    def changes(self) -> int:
        """Rows written: inserted, updated and deleted."""
        return self.inserts + self.updates + self.deletes

    @property
    def mode(self) -> str:
        return "full" if self.full else "delta"

    def to_json(self) -> dict[str, Any]:
        return {
            "table": str(self.table),
            "mode": self.mode,
            "reason": self.reason,
            "insert": self.inserts,
            "update": self.updates,
            "delete": self.deletes,
            "unchanged": self.unchanged,
            "kept": self.kept,
            "target_rows": self.target_rows,
        }


@dataclass(frozen=True)
class Plan:
    """Every table's plan, in the order the inserts go (parents first)."""

    tables: tuple[TablePlan, ...]
    helper_indexes: tuple[ForeignKey, ...] = ()
    auth: AuthPlan | None = None
    kept: tuple[outside.Kept, ...] = ()  # rows kept for rows outside the scope
    # a rollback: rows written since the apply it undoes, per table (None: not recorded)
    written_since: tuple[since.WrittenSince, ...] | None = None
    seconds: float = 0.0
    notes: tuple[str, ...] = field(default_factory=tuple)

    def table(self, name: TableName) -> TablePlan:
        return next(t for t in self.tables if t.table == name)

    @property
    def full_tables(self) -> frozenset[TableName]:
        return frozenset(t.table for t in self.tables if t.full)

    @property
    def changes(self) -> int:
        return sum(t.inserts + t.updates + t.deletes for t in self.tables)

    def to_json(self) -> dict[str, Any]:
        return {
            "tables": [t.to_json() for t in self.tables],
            "helper_indexes": [str(fk) for fk in self.helper_indexes],
            "auth": self.auth.to_json() if self.auth else None,
            "kept": [k.to_json() for k in self.kept],
            "written_since": (
                None if self.written_since is None else [w.to_json() for w in self.written_since]
            ),
            "changes": self.changes,
        }


def descendants(
    tables: Iterable[TableName], fks: Sequence[ForeignKey], scope: Collection[TableName]
) -> set[TableName]:
    """``tables`` and every scoped table that references them, transitively.

    A table replaced in full loses every row; rows of a child kept as they are would then
    point at nothing (or be cascaded away), so its children are replaced in full too.
    """
    found = set(tables)
    frontier = list(found)
    while frontier:
        parent = frontier.pop()
        for fk in fks:
            if fk.parent == parent and fk.child in scope and fk.child not in found:
                found.add(fk.child)
                frontier.append(fk.child)
    return found


def row_keys_later(run: ApplyRun) -> Callable[[], dict[TableName, tuple[str, ...]]]:
    """The scoped tables' keys (:func:`catalog.row_keys`) among the snapshot's columns, asked
    now (in the caller's pipeline) and read when called, for :func:`row_sets`."""
    return catalog.row_keys_later(run.conn, {t: run.entries[t].column_names for t in run.order})


def row_sets(
    run: ApplyRun, keys: Mapping[TableName, tuple[str, ...]] | None = None
) -> dict[TableName, RowSet]:
    """A :class:`RowSet` for every scoped table the catalog gives a key (``keys``:
    :func:`row_keys_later`'s answer, asked here when not given)."""
    entries = run.entries
    columns = {t: entries[t].column_names for t in run.order}
    if keys is None:
        keys = catalog.row_keys(run.conn, columns)
    numbers = {t: i for i, t in enumerate(run.config.scope.tables)}
    return {
        table: RowSet(
            table,
            numbers[table],
            keys[table],
            columns[table],
            staging.staging_table(entries[table]),
            kind_of(entries[table].checksum),
        )
        for table in run.order
        if table in keys and rowsets.keyable(keys[table])
    }


def record(
    run: ApplyRun, keys: Mapping[TableName, tuple[str, ...]] | None = None
) -> frozenset[TableName]:
    """Record the target's rows, and stage from it the tables that already match (no lock).

    Every scoped table with a key gets its record (key, row version, hash of every row) in
    one REPEATABLE READ moment: the pre-apply backup's snapshot when there is one. A table
    whose recorded rows add up to the manifest's count and checksum already holds the
    snapshot's rows: its staged copy and hashes are taken from the target in that same
    moment (a copy inside the server), and its share of the dump is never parsed. Returns
    those tables. Call before :func:`snapshot.staging.stage`, with ``skip`` set to them.
    ``keys``: the tables' keys, when asked already (:func:`row_keys_later`).
    """
    started = time.monotonic()
    conn = run.conn
    run.row_sets = row_sets(run, keys)
    sets = list(run.row_sets.values())
    changed_only = upload_changed_only(run)
    # a masked or subsetted table's rows are not in the dump (snapshot.beside): they go up whole
    beside = run.snapshot.manifest.beside_dump
    conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
    # One moment for every table, in two round trips: the records and their counts (the
    # backup's snapshot imported and the deltas made first), then the copies made from them.
    # Sparse staging compares the digests of the rows of the tables that do not add up: each
    # asked right after its record (the largest first), downloaded while the server makes
    # the next ones.
    compared = (
        sorted(
            (rows for rows in sets if rows.table not in beside),
            key=lambda rows: -run.entries[rows.table].rows,
        )
        if changed_only
        else []
    )
    with conn.pipeline() as pipeline, conn.transaction():
        if run.backup is not None:
            backup.import_snapshot(conn, run.backup)  # the moment the pre-apply backup sees
        for rows in sets:
            rowsets.create_delta(conn, rows)
        others = backup.others_later(run, run.backup) if run.backup is not None else None
        horizon = rowsets.horizon_later(conn)
        found = {}
        uncompared = [rows for rows in sets if rows not in compared]  # counted below
        for rows in [*compared, *uncompared]:
            types = {c.name: c.type for c in run.shapes[rows.table].columns}
            line = sparse.line_sql("t", [(c, types.get(c, "text")) for c in rows.columns])
            rowsets.fill_record(conn, rows, line=line if changed_only else None)
            if rows in compared:
                entry = run.entries[rows.table]
                found[rows.table] = sparse.digests_unless_later(
                    conn, rows.record, entry.rows, entry.checksum
                )
        counted = rowsets.stats_later(conn, uncompared, rowsets.RECORD)
        if run.backup is not None:
            backup.sync_import(pipeline, run.backup)
        run.horizon = horizon()
        run.recorded = counted()
        digests = {}
        for rows in compared:
            count, sums, digests[rows.table] = found[rows.table]()
            run.recorded[rows.table] = TableStats(count, rows.digest(count, sums))
        matched = {
            rows.table
            for rows in sets
            if run.recorded[rows.table]
            == TableStats(run.entries[rows.table].rows, run.entries[rows.table].checksum)
        }
        run.sparse = {
            rows.table: sparse.Sparse(
                rows.table,
                rows.number,
                rows.stage,
                rows.record,
                rows.key,
                rows.columns,
                digests[rows.table],
            )
            for rows in compared
            if rows.table not in matched
        }
        for rows in sets:
            if rows.table in matched:
                rowsets.stage_from_record(conn, rows)
            elif rows.table in run.sparse:
                sparse.copy_recorded(conn, run.sparse[rows.table])
        if run.backup is not None and others is not None:
            _record_auth(run, run.backup, others(), changed_only, beside)
        keyed = sparse.download_later(conn, [s for s in run.sparse.values() if s.by_key])
    keyed()
    log.info(
        "  recorded %d tables (%d already hold the snapshot's rows)%s  %.1f s",
        len(run.row_sets),
        len(matched),
        f", {len(run.sparse)} to stage from what differs" if run.sparse else "",
        time.monotonic() - started,
    )
    return frozenset(matched)


def _record_auth(
    run: ApplyRun,
    running: backup.Backup,
    keys: Mapping[TableName, tuple[str, ...]],
    changed_only: bool,
    beside: Collection[TableName],
) -> None:
    """The backup's records of the auth tables (:func:`backup.record_others`); with
    ``changed_only``, only the snapshot's auth rows whose key the target lacks go up (the
    apply creates logins, never updates one: :attr:`sparse.Sparse.by_key`), where every
    row costs the upload of a whole login otherwise. Needs a key and every snapshot column
    in the target, and the rows in the dump (not ``beside`` it: masked); in the record's
    pipeline."""
    lines: dict[TableName, sql.Composable] = {}
    staged: list[sparse.Sparse] = []
    for entry in run.auth_entries if changed_only else ():
        shape, key = run.shapes.get(entry.table), keys.get(entry.table)
        if shape is None or key is None or not rowsets.keyable(key) or entry.table in beside:
            continue
        types = {c.name: c.type for c in shape.columns}
        if not set(entry.column_names) <= set(types) or not set(key) <= set(entry.column_names):
            continue
        lines[entry.table] = sparse.line_sql("t", [(c, types[c]) for c in key])
    backup.record_others(run, running, keys, lines)
    for table in lines:
        rows = running.followed[table]
        entry = next(e for e in run.auth_entries if e.table == table)
        changes = sparse.Sparse(
            table, rows.number, staging.staging_table(entry), rows.record, rows.key,
            entry.column_names, by_key=True,
        )  # fmt: skip
        sparse.copy_recorded(run.conn, changes)
        staged.append(changes)
    run.sparse.update((changes.table, changes) for changes in staged)


# A server this many seconds away or more (one round trip) is reached over a network where
# bytes cost more than the local work of finding the changed rows (snapshot.sparse).
FAR_ROUND_TRIP = 0.005
CLEARLY_FAR = 0.02  # no near server, however busy, took this long for each of them


def upload_changed_only(run: ApplyRun) -> bool:
    """Whether tables the target does not hold yet are staged sparsely (only their changed
    rows sent up): ``[apply] upload``, or when "auto" whether the server is far."""
    setting = run.config.apply.upload
    if setting != "auto":
        return setting == "changed"
    # The shortest of the session's first, nearly free, statements (snapshot.latency): a
    # near server needs no ping, nor a clearly far one; one in between (a busy near one?)
    # gets one to make sure.
    known = latency.round_trip(run.conn)
    if known is not None and known < FAR_ROUND_TRIP:
        return False
    if known is not None and known >= CLEARLY_FAR:
        return True
    trips = [] if known is None else [known]
    for _ in range(3 if known is None else 1):
        began = time.monotonic()
        run.conn.execute("SELECT 1")
        trips.append(time.monotonic() - began)
    return min(trips) >= FAR_ROUND_TRIP


def prepare(
    run: ApplyRun,
    matched: Collection[TableName],
    *,
    hashed: Collection[TableName] = (),
    full: bool = False,
    allowed: Collection[str] = (),
) -> Plan:
    """Hash the staged rows, classify every row, and decide each table's mode (no lock taken).

    Call after :func:`record` and staging; ``matched`` is what :func:`record` returned (those
    tables' hashes are the record's, and nothing in them differs); ``hashed`` tables have
    their snapshot hashes made already (:mod:`.prepare`). ``full`` replaces every
    table in full (``apply --full``); the hashes are still made, since they are what the
    apply's backup and parity are computed from. The references from outside the scope are
    counted (and their parents kept, when asked: :func:`snapshot.apply.outside.settle`;
    ``allowed`` are the acknowledged cascades, whose parents go).
    """
    started = time.monotonic()
    conn = run.conn
    with conn.pipeline():
        for rows in run.row_sets.values():
            if rows.table not in matched:
                if rows.table not in hashed:
                    rowsets.hash_snapshot(conn, rows)
                rowsets.classify(conn, rows)
    log.info(
        "  compared %d tables row by row  %.1f s", len(run.row_sets), time.monotonic() - started
    )
    run.outside = outside.settle(run, allowed)
    if run.action == "rollback":
        run.applied = since.load(run)
    forced = {t: "apply --full" for t in run.order} if full else {}
    with conn.pipeline():  # the deltas' counts and the auth plan's questions: one round trip
        run.counts_ahead = rowsets.counts_later(
            conn,
            [run.row_sets[t] for t in run.order if t in run.row_sets],
            {t: known.rows for t, known in run.recorded.items()},
        )
        people = auth_plan_later(run)
    return replace(decide(run, forced), auth=people(), seconds=time.monotonic() - started)


def decide(run: ApplyRun, forced: Mapping[TableName, str]) -> Plan:
    """Each table's mode and counts from the current deltas; ``forced`` tables go in full."""
    scope = set(run.order)
    reasons = dict(forced)
    keyless = [t for t in run.order if t not in run.row_sets and t not in reasons]
    for table in keyless:
        if not _holds_snapshot(run, table):
            reasons[table] = "no primary key or unique key over NOT NULL columns"
    for table in sorted(descendants(reasons, run.fks, scope) - set(reasons)):
        parents = sorted(
            str(fk.parent) for fk in run.fks if fk.child == table and fk.parent in reasons
        )
        reasons[table] = f"references {', '.join(parents)}, replaced in full"
    plans = []
    ahead, run.counts_ahead = run.counts_ahead, None
    counted = (
        ahead()
        if ahead is not None
        else rowsets.counts(
            run.conn,
            [run.row_sets[t] for t in run.order if t in run.row_sets],
            {t: known.rows for t, known in run.recorded.items()},
        )
    )
    for table in run.order:
        entry = run.entries[table]
        if table in counted:
            inserts, updates, deletes, target = counted[table]
        elif table in reasons:
            inserts, updates, deletes = entry.rows, 0, 0
            target = _count(run.conn, table)
        else:  # a table without a key that holds the snapshot's rows already
            inserts, updates, deletes, target = 0, 0, 0, entry.rows
        kept = run.kept[table].rows if table in run.kept else 0
        if table in reasons:
            plans.append(
                TablePlan(table, True, reasons[table], entry.rows, 0, target - kept, target, kept)
            )
        else:
            plans.append(TablePlan(table, False, "", inserts, updates, deletes, target, kept))
    return Plan(
        tuple(plans),
        helper_indexes=tuple(_helper_indexes(run, plans)),
        kept=tuple(run.kept.values()),
        written_since=since.count(run, run.applied) if run.applied is not None else None,
    )


def _holds_snapshot(run: ApplyRun, table: TableName) -> bool:
    """Whether ``table`` holds the snapshot's rows already: its count and checksum match.

    A table without a key can only be replaced whole; one that already matches is left
    alone, so the same snapshot applied twice writes nothing. Read when deciding, so under
    the apply's lock the answer holds until the writes.
    """
    entry = run.entries[table]
    stats = table_stats(run.conn, table, entry.column_names, kind=kind_of(entry.checksum))
    return stats == TableStats(entry.rows, entry.checksum)


def _count(conn: psycopg.Connection, table: TableName) -> int:
    row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(table.ident)).fetchone()
    return int(row[0]) if row else 0


def _helper_indexes(run: ApplyRun, plans: Sequence[TablePlan]) -> list[ForeignKey]:
    """Foreign keys inside the scope whose parents lose enough rows to index the child."""
    deletes = {p.table: p.deletes for p in plans}
    heavy = [fk for fk in run.fks if deletes.get(fk.parent, 0) >= HELPER_INDEX_FROM]
    if not heavy:  # the usual re-sync: nothing to ask the catalog
        return []
    known = run.helper_indexes.get(tuple(heavy))
    if known is not None:  # asked by the preparation: an attempt under the lock asks nothing
        return known
    # Not a partitioned table: an index on it cannot be dropped concurrently after commit.
    partitioned = catalog.leaf_partitions(run.conn, run.order)
    children = [t for t in run.order if t not in partitioned and any(fk.child == t for fk in heavy)]
    owned = _owned(run.conn, children)
    found = catalog.unindexed_foreign_keys(run.conn, [fk for fk in heavy if fk.child in owned])
    run.helper_indexes[tuple(heavy)] = found
    return found


def _owned(conn: psycopg.Connection, tables: Sequence[TableName]) -> set[TableName]:
    """Those of ``tables`` the role owns (or is a member of the owner of)."""
    rows = conn.execute(
        "SELECT w.i FROM unnest(%s::regclass[]) WITH ORDINALITY AS w(t, i) "
        "JOIN pg_class c ON c.oid = w.t WHERE pg_has_role(c.relowner, 'USAGE')",
        ([t.ident.as_string(conn) for t in tables],),
    ).fetchall()
    return {tables[int(r[0]) - 1] for r in rows}
