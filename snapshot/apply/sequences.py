"""Sequences owned by scoped tables restart where the snapshot's did, never below the data."""

from __future__ import annotations

import logging

from psycopg import sql

from snapshot import catalog
from snapshot.session import Session

log = logging.getLogger(__name__)


def restart(s: Session) -> int:
    """Restart each owned sequence at the snapshot's next value; returns how many moved.

    A sequence already there is left alone. Where the data holds higher values than the
    snapshot's sequence (rows a trigger added, say), it restarts above them, so the next
    insert cannot collide.
    """
    archived = {(q.table, q.column): q for q in s.snapshot.manifest.sequences}
    restarted = 0
    for current in catalog.owned_sequences(s.conn, s.order):
        snap = archived.get((current.table, current.column))
        if snap is None:
            s.notes.append(f"{current.sequence} is not in the snapshot: left as it was")
            continue
        value = snap.next_value
        if current.increment > 0:
            row = s.conn.execute(
                sql.SQL("SELECT max({})::bigint FROM {}").format(
                    sql.Identifier(current.column), current.table.ident
                )
            ).fetchone()
            highest = row[0] if row else None
            if highest is not None and highest >= value:
                value = highest + current.increment
                s.notes.append(f"{current.sequence} restarts at {value}, above its data")
        if current.next_value == value:
            continue
        s.conn.execute(
            sql.SQL("ALTER SEQUENCE {} RESTART WITH {}").format(
                current.sequence.ident, sql.Literal(value)
            )
        )
        restarted += 1
    log.info("  restarted %d sequences", restarted)
    return restarted
