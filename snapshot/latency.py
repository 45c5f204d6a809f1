"""How far the server is: the shortest round trip a session's nearly free statements took.

The apply stages sparsely when the server is far (:func:`snapshot.apply.plan.upload_changed_only`);
the session's first statements (its settings, the server's identity) are timed as they run,
so knowing the distance costs no ping of its own.
"""

from __future__ import annotations

import weakref

import psycopg

_shortest: weakref.WeakKeyDictionary[psycopg.Connection, float] = weakref.WeakKeyDictionary()


def note(conn: psycopg.Connection, seconds: float) -> None:
    """Remember that a statement costing the server next to nothing took ``seconds``."""
    known = _shortest.get(conn)
    _shortest[conn] = seconds if known is None else min(known, seconds)


def round_trip(conn: psycopg.Connection) -> float | None:
    """The shortest round trip :func:`note` saw on ``conn``, if any."""
    return _shortest.get(conn)
