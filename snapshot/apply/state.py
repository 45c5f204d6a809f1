"""One apply's (or rollback's) own state: what it found, decided and made, in one object.

The :class:`~snapshot.session.Session` is what was read about the target before anything
changed, and never changes. An :class:`ApplyRun` holds that session, the options of the
command, and what the apply accumulates as it goes: the row sets it compares, the record's
horizon, the plan, the backup being written, the rows kept for outside references, the
notes for the report. Every step of the apply takes it by one name, ``run``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import psycopg

from snapshot import catalog, pgtools
from snapshot.archive import Snapshot
from snapshot.catalog import ForeignKey, ServerInfo, StateNames, TableShape
from snapshot.config import Config
from snapshot.environments import Connection
from snapshot.manifest import TableEntry
from snapshot.names import TableName
from snapshot.session import Session

if TYPE_CHECKING:
    from snapshot.apply.backup import Backup
    from snapshot.apply.outside import Kept, Reference
    from snapshot.apply.plan import Plan
    from snapshot.apply.rows import Counts, RowSet
    from snapshot.apply.since import Applied
    from snapshot.checksum import TableStats
    from snapshot.sparse import Sparse


@dataclass(frozen=True)
class Options:
    """What the command asked for, beyond the snapshot and the target."""

    dry_run: bool = False
    full: bool = False  # replace every table in full (apply --full)
    block_readers: bool = False  # apply --block-readers (snapshot.apply.constraints)
    keep_referenced: bool = False  # keep parents outside rows refer to (snapshot.apply.outside)
    allowed: frozenset[str] = frozenset()  # cascades into outside tables acknowledged


@dataclass
class ApplyRun:
    """The state of one apply or rollback, from its preparation to its commit."""

    session: Session
    options: Options = field(default_factory=Options)
    backup_into: Path | None = None  # a pending archive folder: the apply backs up into it
    notes: list[str] = field(default_factory=list)
    row_sets: dict[TableName, RowSet] = field(default_factory=dict)
    horizon: int | None = None  # of the records' snapshot (snapshot.apply.rows.horizon)
    recorded: dict[TableName, TableStats] = field(default_factory=dict)  # while still true
    # tables staged with only their changed rows sent up (snapshot.sparse), by plan.record
    sparse: dict[TableName, Sparse] = field(default_factory=dict)
    plan: Plan | None = None
    # the deltas' counts asked with the reconciliation under the lock, for the first attempt's
    # plan (snapshot.apply.plan.decide); None once used, or when the deltas changed since
    counts_ahead: Callable[[], Counts] | None = None
    # the session the backup exports its snapshot from, opened during the preflight
    # (snapshot.apply.backup.connect_ahead)
    exporter_ahead: Future[psycopg.Connection] | None = None
    # the foreign keys worth a helper index, by the keys whose parents lose many rows
    # (snapshot.apply.plan._helper_indexes): found once, the attempts use them (helper
    # indexes are made from the preparation's plan; the attempts' plans only show them)
    helper_indexes: dict[tuple[ForeignKey, ...], list[ForeignKey]] = field(default_factory=dict)
    backup: Backup | None = None  # started with the staging, joined before the commit
    row_by_row: str = ""  # why bulk foreign-key checks are off for the rest of the apply
    # what keeps the scope from bulk foreign-key checks ("" for nothing), found once: by the
    # staged checks, before the lock (snapshot.apply.replica.obstacle)
    bulk_obstacle: str | None = None
    outside: tuple[Reference, ...] = ()  # the keys from outside the scope, last counted
    kept: dict[TableName, Kept] = field(default_factory=dict)  # rows kept for them
    applied: Applied | None = None  # a rollback: what the apply it undoes wrote (since.py)
    # the scope's sequences and migration history, found before the lock (catalog.StateNames)
    names: StateNames | None = None

    def state_names(self) -> StateNames:
        """:attr:`names`, found now if they were not before the lock."""
        if self.names is None:
            self.names = catalog.state_names(self.conn, self.order)
        return self.names

    # The session's facts, read through the run: every step needs some of them.
    @property
    def config(self) -> Config:
        return self.session.config

    @property
    def action(self) -> str:
        return self.session.action

    @property
    def snapshot(self) -> Snapshot:
        return self.session.snapshot

    @property
    def target(self) -> Connection:
        return self.session.target

    @property
    def conn(self) -> psycopg.Connection:
        return self.session.conn

    @property
    def info(self) -> ServerInfo:
        return self.session.info

    @property
    def shapes(self) -> Mapping[TableName, TableShape]:
        return self.session.shapes

    @property
    def fks(self) -> Sequence[ForeignKey]:
        return self.session.fks

    @property
    def order(self) -> tuple[TableName, ...]:
        return self.session.order

    @property
    def auth_entries(self) -> tuple[TableEntry, ...]:
        return self.session.auth_entries

    @property
    def entries(self) -> dict[TableName, TableEntry]:
        return self.session.entries

    @property
    def pg_dump(self) -> pgtools.PgTool | None:
        return self.session.pg_dump

    @property
    def pg_restore(self) -> pgtools.PgTool | None:
        return self.session.pg_restore

    @property
    def auth_withheld(self) -> str:
        return self.session.auth_withheld

    @property
    def block_readers(self) -> bool:
        return self.options.block_readers

    @property
    def keep_referenced(self) -> bool:
        return self.options.keep_referenced
