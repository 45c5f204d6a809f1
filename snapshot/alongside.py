"""A second session in a subsetted take's exported snapshot, working beside the take's own.

The take's session closes the subset and writes the kept rows; a server runs one session's
statements on one core. This session, on a thread of its own, reads the same snapshot
(``SET TRANSACTION SNAPSHOT``) on another core: it counts the subsetted tables' rows in the
source while the closure runs, then writes streamed followers' blocks while the take's
session writes the others (:func:`snapshot.beside.write_beside`).

A streamed follower's rows are filtered by its parents' kept rows, which live in the take's
session's temporary tables. So their keys are copied here once the closure is over, into
temporary tables of the same names and the key columns only, made before this session's
transaction (a read-only transaction may fill a temporary table but not create one): the
filter's SQL is then the same in either session.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import logging
from collections.abc import Callable
from types import TracebackType
from typing import TypeVar

import psycopg
from psycopg import sql

from snapshot import masking
from snapshot import subset as subsets
from snapshot.db import snapshot_session
from snapshot.environments import Connection
from snapshot.masking import Masks
from snapshot.names import TableName
from snapshot.subset import SubsetPlan

log = logging.getLogger(__name__)

T = TypeVar("T")


class Alongside:
    """The second session: open (and counting the source's rows) from ``__enter__`` on,
    closed, its transaction rolled back, on ``__exit__``."""

    def __init__(
        self, target: Connection, snapshot_id: str, cut: SubsetPlan, masks: Masks | None
    ) -> None:
        self.cut = cut
        self._target = target
        self._snapshot_id = snapshot_id
        self._masks = masks
        self._keys = cut.streamed_keys()
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="alongside")
        self._stack = contextlib.ExitStack()
        self._session: psycopg.Connection | None = None
        self._loads: list[concurrent.futures.Future[None]] = []

    def __enter__(self) -> Alongside:
        self._opened = self._pool.submit(self._open)
        self.source_rows = self.run(self._count)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None and self._session is not None:
            self._session.cancel()  # a failed take does not wait for a long statement
        self._pool.shutdown(cancel_futures=True)  # then the thread is done with the session
        self._stack.close()

    @property
    def writes(self) -> tuple[TableName, ...]:
        """The tables whose blocks this session can write, the streamed followers, the
        largest source first (a large one left for last would keep the other session
        waiting)."""
        streamed = [t for t, cut in self.cut.tables.items() if cut.streamed]
        total = self.source_rows.result()
        return tuple(sorted(streamed, key=lambda t: -total[t]))

    def run(self, work: Callable[[psycopg.Connection], T]) -> concurrent.futures.Future[T]:
        """Run ``work`` with the session, on its thread, after what was run before; not
        when the session failed to open or to receive keys (that failure is raised)."""

        loads = list(self._loads)  # done before this runs: one thread, in order

        def after_the_keys() -> T:
            session = self._opened.result()
            for loaded in loads:
                loaded.result()
            return work(session)

        return self._pool.submit(after_the_keys)

    def receive_keys(self, conn: psycopg.Connection) -> None:
        """Copy the keys of the kept rows the streamed followers' filter reads, from
        ``conn`` (the take's session, its closure over) into this session."""
        for table, columns in self._keys.items():
            names = sql.SQL(", ").join(map(sql.Identifier, columns))
            query = sql.SQL("COPY (SELECT {} FROM {}) TO STDOUT").format(
                names, self.cut.tables[table].kept
            )
            with conn.cursor() as cur, cur.copy(query) as copy:
                data = b"".join(bytes(chunk) for chunk in copy)
            self._loads.append(self.run(functools.partial(self._load, table=table, data=data)))

    def _open(self) -> psycopg.Connection:
        session = self._stack.enter_context(
            snapshot_session(self._target, self._snapshot_id, prepare=self._make_key_tables)
        )
        # One core beside the take's session, not parallel workers competing with it.
        session.execute("SET max_parallel_workers_per_gather = 0")
        if self._masks is not None:
            masking.set_key(session, self._masks)
        return session

    def _make_key_tables(self, session: psycopg.Connection) -> None:
        self._session = session
        for table, columns in self._keys.items():
            cut = self.cut.tables[table]
            session.execute(
                sql.SQL("CREATE TEMP TABLE {} AS SELECT {} FROM {} WITH NO DATA").format(
                    cut.kept, sql.SQL(", ").join(map(sql.Identifier, columns)), cut.source
                )
            )

    def _count(self, session: psycopg.Connection) -> dict[TableName, int]:
        return subsets.source_rows(session, self.cut)

    def _load(self, session: psycopg.Connection, table: TableName, data: bytes) -> None:
        kept = self.cut.tables[table].kept
        names = sql.SQL(", ").join(map(sql.Identifier, self._keys[table]))
        with session.cursor() as cur:
            with cur.copy(sql.SQL("COPY {} ({}) FROM STDIN").format(kept, names)) as copy:
                copy.write(data)
            cur.execute(sql.SQL("ANALYZE {}").format(kept))
