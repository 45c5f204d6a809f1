"""Sequences owned by scoped tables restart where the snapshot's did, never below the data;
sequences their defaults share with others only ever move up, above the data."""

from __future__ import annotations

import logging

from psycopg import sql

from snapshot import catalog
from snapshot.apply.state import ApplyRun
from snapshot.catalog import OwnedSequence
from snapshot.names import TableName

log = logging.getLogger(__name__)


def restart(run: ApplyRun) -> int:
    """Restart each owned sequence at the snapshot's next value; returns how many moved.

    A sequence already there is left alone. Where the data holds higher values than the
    snapshot's sequence (rows a trigger added, say), it restarts above them, so the next
    insert cannot collide.
    """
    archived = {(q.table, q.column): q for q in run.snapshot.manifest.sequences}
    owned = catalog.owned_sequences(run.conn, run.order)
    tops = _highest(run, [q for q in owned if q.increment > 0])
    restarted = 0
    with run.conn.pipeline():  # every restart in one round trip
        for current in owned:
            snap = archived.get((current.table, current.column))
            if snap is None:
                run.notes.append(f"{current.sequence} is not in the snapshot: left as it was")
                continue
            value = snap.next_value
            highest = tops.get((current.table, current.column))
            if highest is not None and highest >= value:
                value = highest + current.increment
                run.notes.append(f"{current.sequence} restarts at {value}, above its data")
            if current.next_value == value:
                continue
            run.conn.execute(
                sql.SQL("ALTER SEQUENCE {} RESTART WITH {}").format(
                    current.sequence.ident, sql.Literal(value)
                )
            )
            restarted += 1
    restarted += _above_the_data(run)
    log.info("  restarted %d sequences", restarted)
    return restarted


def _above_the_data(run: ApplyRun) -> int:
    """Move up a shared sequence (a column default's, owned by no column) the data outgrew.

    The snapshot does not carry it and other tables may draw from it, so it never moves
    down: only above the highest value the apply left in a column whose default calls it,
    so that the app's next insert cannot collide. Returns how many moved.
    """
    highest: dict[TableName, tuple[OwnedSequence, int]] = {}
    shared = [q for q in catalog.shared_sequences(run.conn, run.order) if q.increment > 0]
    tops = _highest(run, shared)
    for current in shared:
        top = tops.get((current.table, current.column))
        if top is None:
            continue
        known = highest.get(current.sequence)
        if known is None or top > known[1]:
            highest[current.sequence] = (current, top)
    moved = 0
    for sequence, (current, top) in highest.items():
        if top < current.next_value:
            continue
        value = top + current.increment
        owned = run.conn.execute(
            "SELECT pg_has_role(relowner, 'USAGE') FROM pg_class WHERE oid = %s::regclass",
            (sequence.ident.as_string(run.conn),),
        ).fetchone()
        if not (owned and owned[0]):
            run.notes.append(
                f"{sequence} (the default of {current.table}.{current.column}) would next give "
                f"{current.next_value}, at or below the data's {top}, and {run.target.env}'s role "
                f"may not move it: run ALTER SEQUENCE {sequence} RESTART WITH {value} as its owner"
            )
            continue
        run.conn.execute(
            sql.SQL("ALTER SEQUENCE {} RESTART WITH {}").format(sequence.ident, sql.Literal(value))
        )
        run.notes.append(
            f"{sequence} (the default of {current.table}.{current.column}, owned by no column, "
            f"so not in the snapshot) restarts at {value}, above the data"
        )
        moved += 1
    return moved


def _highest(
    run: ApplyRun, sequences: list[OwnedSequence]
) -> dict[tuple[TableName, str], int | None]:
    """The highest value of each sequence's column (every one read in one round trip)."""
    with run.conn.pipeline():
        asked = [
            (
                (q.table, q.column),
                run.conn.execute(
                    sql.SQL("SELECT max({})::bigint FROM {}").format(
                        sql.Identifier(q.column), q.table.ident
                    )
                ),
            )
            for q in sequences
        ]
    found: dict[tuple[TableName, str], int | None] = {}
    for column, cursor in asked:
        row = cursor.fetchone()
        found[column] = int(row[0]) if row and row[0] is not None else None
    return found
