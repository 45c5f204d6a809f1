"""Parity before commit: every row of every scoped table against the snapshot's manifest.

For a table written as a delta the proof reuses the record (see :mod:`snapshot.apply.rows`):
rows whose version the apply saw under its lock keep their recorded hash, and only the
rows written since (by the apply, its scripts or its triggers) are hashed again. A table
replaced in full, mostly rewritten by its delta, without a key, or with ``[parity]
ignore_columns`` is hashed whole.
Either way the count and checksum cover every live row.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from snapshot import staging
from snapshot.apply import outside
from snapshot.apply import rows as rowsets
from snapshot.apply.plan import Plan
from snapshot.apply.state import ApplyRun
from snapshot.checksum import TableStats, kind_of, table_stats_later
from snapshot.names import TableName
from snapshot.parity import TableParity, name_columns


def _mostly_written(plan: Plan, table: TableName) -> bool:
    """Whether the delta writes most of the table: hashing it whole is then cheaper."""
    written = plan.table(table)
    return 2 * (written.inserts + written.updates) > written.target_rows + written.inserts


def parity(
    run: ApplyRun,
    plan: Plan,
    before: Mapping[TableName, int],
    also: Callable[[], None] | None = None,
) -> list[TableParity]:
    """Each scoped table compared with the snapshot; differing columns named on mismatch.

    Every table's statements go together (a pipeline): a few round trips, not one a table.
    ``also`` asks the caller's own questions in that pipeline (read once it is over).
    """
    full = plan.full_tables
    conn = run.conn
    proved: dict[TableName, Callable[[], TableStats | None]] = {}
    hashed: dict[TableName, Callable[[], TableStats]] = {}
    wanted: dict[TableName, Callable[[], TableStats]] = {}
    with conn.pipeline():
        for table in run.config.scope.tables:
            entry = run.entries[table]
            ignored = _ignored(run, table)
            rows = run.row_sets.get(table)
            kind = kind_of(entry.checksum)
            if (
                rows is not None
                and table not in full
                and not ignored
                and not _mostly_written(plan, table)
            ):
                proved[table] = rowsets.prove_later(conn, rows)
            else:
                hashed[table] = table_stats_later(conn, table, entry.column_names, ignored, kind)
            if ignored:
                stage = staging.staging_table(entry)
                wanted[table] = table_stats_later(conn, stage, entry.column_names, ignored, kind)
        if also is not None:
            also()
    actual = {table: result() for table, result in hashed.items()}
    for table, later in proved.items():
        actual[table] = later() or rowsets.prove_by_join(conn, run.row_sets[table])
    results = []
    for table in run.config.scope.tables:
        entry = run.entries[table]
        ignored = _ignored(run, table)
        expected = wanted[table]() if table in wanted else TableStats(entry.rows, entry.checksum)
        kept = run.kept.get(table)
        if kept is not None:  # the snapshot's rows, but those kept as the target had them
            expected = outside.expected(run, table, ignored, kind_of(entry.checksum))
        match = actual[table] == expected
        columns: tuple[str, ...] = ()
        if not match:
            used = [c for c in entry.column_names if c not in ignored]
            stage = staging.staging_table(entry)
            columns = name_columns(conn, table, conn, stage, used)
        results.append(
            TableParity(
                table=table,
                source_rows=entry.rows,
                target_rows=actual[table].rows,
                match=match,
                target_rows_before=before.get(table),
                columns=columns,
                ignored=ignored,
                kept=kept.rows if kept else 0,
                kept_for=kept.referenced_by if kept else (),
            )
        )
    return results


def _ignored(run: ApplyRun, table: TableName) -> tuple[str, ...]:
    entry = run.entries[table]
    return tuple(c for c in run.config.ignored_columns(table) if c in entry.column_names)
