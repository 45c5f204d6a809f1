"""Sequences owned by scoped tables restart where the snapshot's did, never below the data;
sequences their defaults share with others only ever move up, above the data."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from psycopg import sql

from snapshot import catalog
from snapshot.apply.state import ApplyRun
from snapshot.catalog import OwnedSequence
from snapshot.names import TableName

log = logging.getLogger(__name__)


def send(run: ApplyRun, statements: Sequence[sql.Composed]) -> None:
    """Send :func:`restarts`' statements, in one round trip (none without any)."""
    if statements:
        with run.conn.pipeline():
            for statement in statements:
                run.conn.execute(statement)


def restarts(run: ApplyRun, state: catalog.State | None = None) -> list[sql.Composed]:
    """The statements that restart each owned sequence at the snapshot's next value, for the
    caller to send (with its next round trip, :func:`send` or :func:`.since.record`).

    A sequence already there is left alone. Where the data holds higher values than the
    snapshot's sequence (rows a trigger added, say), it restarts above them, so the next
    insert cannot collide. ``state``: where everything stands, with the data's highest
    values (``catalog.read_state_later(..., highest=True)`` in the caller's round trip);
    read here when not given.
    """
    archived = {(q.table, q.column): q for q in run.snapshot.manifest.sequences}
    if state is None:
        state = catalog.read_state(run.conn, run.state_names(), highest=True)
    moves: list[tuple[TableName, int]] = []
    for current in state.owned:
        snap = archived.get((current.table, current.column))
        if snap is None:
            run.notes.append(f"{current.sequence} is not in the snapshot: left as it was")
            continue
        value = snap.next_value
        highest = (
            state.highest.get((current.table, current.column)) if current.increment > 0 else None
        )
        if highest is not None and highest >= value:
            value = highest + current.increment
            run.notes.append(f"{current.sequence} restarts at {value}, above its data")
        if current.next_value != value:
            moves.append((current.sequence, value))
    moves += _above_the_data(run, state)
    log.info("  restarted %d sequences", len(moves))
    return [
        sql.SQL("ALTER SEQUENCE {} RESTART WITH {}").format(sequence.ident, sql.Literal(value))
        for sequence, value in moves
    ]


def _above_the_data(run: ApplyRun, state: catalog.State) -> list[tuple[TableName, int]]:
    """Move up a shared sequence (a column default's, owned by no column) the data outgrew.

    The snapshot does not carry it and other tables may draw from it, so it never moves
    down: only above the highest value the apply left in a column whose default calls it,
    so that the app's next insert cannot collide. Returns the moves to make.
    """
    highest: dict[TableName, tuple[OwnedSequence, int]] = {}
    for current in state.shared:
        top = state.highest.get((current.table, current.column)) if current.increment > 0 else None
        if top is None:
            continue
        known = highest.get(current.sequence)
        if known is None or top > known[1]:
            highest[current.sequence] = (current, top)
    moves = []
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
        run.notes.append(
            f"{sequence} (the default of {current.table}.{current.column}, owned by no column, "
            f"so not in the snapshot) restarts at {value}, above the data"
        )
        moves.append((sequence, value))
    return moves
