"""The pre-apply backup: the target exactly as the apply found it, archived for rollback.

pg_dump starts before the lock, while the staged snapshot is compared, in a snapshot exported
by a session of its own; the apply records the target's rows (key, row version, hash) in
that same snapshot. Under the lock, the record's reconciliation finds every row written
since, by key and row version, and :func:`catch_up` copies those rows (and the keys they
replace) into ``catchup.copy`` beside the dump. Dump plus catch-up is the target as the
lock found it, whatever the app wrote while pg_dump ran, and only that change is read
under the lock: the writers' wait no longer includes pg_dump. The auth tables, which the
plan does not compare, get a record of their own for the same purpose
(:func:`record_others`); a table without any key is copied whole under the lock. The
manifest's counts and checksums are the locked state's. The apply lets pg_dump end before
it locks (the download is never part of the writers' wait) and seals the backup before
committing: a backup that failed stops the commit, so an apply never commits without its
way back. It is published only after the commit.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import psycopg
from psycopg import sql

from snapshot import archive, catalog, text
from snapshot.apply import rows as rowsets
from snapshot.apply import since
from snapshot.apply.rows import RowSet
from snapshot.apply.state import ApplyRun
from snapshot.archive import Snapshot
from snapshot.checksum import TableStats, kind_of, table_stats
from snapshot.config import Config
from snapshot.copytext import (
    PIPELINED_AT_MOST,
    TERMINATOR,
    block_later,
    write_block,
    write_header,
)
from snapshot.db import connect
from snapshot.dump import DumpPlan, DumpState, build_manifest, describe_state
from snapshot.dump import start_dump as start_pg_dump
from snapshot.environments import Connection
from snapshot.errors import ApplyFailed
from snapshot.manifest import DUMP_FILE
from snapshot.names import TableName
from snapshot.pgtools import DUMP_APPLICATION, Running
from snapshot.staging import ADD, REMOVE, REPLACE

log = logging.getLogger(__name__)

TRANSACTION_FILE = "transaction"  # in a backup folder: the id of the apply's transaction


@dataclass
class Backup:
    """A pre-apply backup being written."""

    folder: Path
    plan: DumpPlan
    exporter: psycopg.Connection  # holds pg_dump's snapshot open until pg_dump is done
    snapshot_id: str
    started: float
    dump: Running | None = None  # pg_dump, once :func:`dump` started it
    # the backup is the applied snapshot's dump and what tells the target apart from it
    # (:func:`write_difference`), not a pg_dump of the target
    from_snapshot: bool = False
    state: DumpState | None = None
    caught_up: int = 0  # rows written between pg_dump's snapshot and the lock
    copied_whole: int = 0  # tables without a key, copied whole under the lock
    followed: dict[TableName, RowSet] = field(default_factory=dict)  # see record_others
    # the followed and compared tables with rows moved between the record and the lock
    # (None until the catch-up under the lock)
    moved: frozenset[TableName] | None = None
    # the followed tables' REPLACE blocks, read in the background (:func:`read_whole_ahead`)
    whole: Future[dict[TableName, tuple[BinaryIO, int]]] | None = None

    def close(self) -> None:
        """End the exporting session (its transaction only held the snapshot), once it is
        done reading ahead (stopped if it still is)."""
        if self.whole is not None:
            if not self.whole.done():
                with contextlib.suppress(psycopg.Error):
                    self.exporter.cancel()
                wait_for([self.whole])
            if self.whole.exception() is None:  # not read by a difference backup
                for block, _ in self.whole.result().values():
                    block.close()
        if not self.exporter.closed:
            self.exporter.close()


def start(
    run: ApplyRun,
    folder: Path,
    leaves: Mapping[TableName, tuple[TableName, ...]] | None = None,
) -> Backup:
    """Export the snapshot the backup will be taken in, from a session of its own.

    The apply records the target's rows in this snapshot (:func:`import_snapshot`), so
    that under the lock :func:`catch_up` knows exactly which rows changed since; then
    :func:`dump` starts pg_dump in it. ``leaves``: the scope's partitions
    (:func:`catalog.leaf_partitions`), when asked already.
    """
    assert run.pg_dump is not None, "a backup needs pg_dump (the preflight found one)"
    if leaves is None:
        leaves = catalog.leaf_partitions(run.conn, run.config.scope.tables)
    plan = DumpPlan(run.target, run.info, run.pg_dump, run.config.scope, run.shapes, leaves)
    ahead, run.exporter_ahead = run.exporter_ahead, None
    exporter = ahead.result() if ahead is not None else connect(run.target)
    try:
        # The transaction stays open (until :meth:`Backup.close`): it keeps the snapshot
        # valid. BEGIN and the export in one simple query, one round trip (psycopg's own
        # BEGIN would cost one of its own); the session does nothing else.
        exported = exporter.execute(
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SELECT pg_export_snapshot()"
        )
        exported.nextset()  # past BEGIN's result
        row = exported.fetchone()
        assert row is not None
        snapshot_id = str(row[0])
    except BaseException:
        exporter.close()
        raise
    return Backup(folder, plan, exporter, snapshot_id, time.monotonic())


def connect_ahead(target: Connection) -> Future[psycopg.Connection]:
    """The session :func:`start` exports the backup's snapshot from, opened in the
    background (while the preflight runs: its round trips are off the apply's path)."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="snapshot-backup")
    ahead = pool.submit(connect, target)
    pool.shutdown(wait=False)  # the thread ends with the connection made
    return ahead


def drop_ahead(run: ApplyRun) -> None:
    """Close the session :func:`connect_ahead` opened if :func:`start` did not take it."""
    ahead, run.exporter_ahead = run.exporter_ahead, None
    if ahead is not None:
        ahead.add_done_callback(_close_made)


def _close_made(made: Future[psycopg.Connection]) -> None:
    if made.exception() is None:
        made.result().close()


def dump(backup: Backup) -> None:
    """Start pg_dump in the exported snapshot, in the background (joined before the lock).

    On a local server it starts once the snapshot is staged, while its rows are hashed and
    compared: that step runs on one core, while the record (every target row, read in
    parallel) and staging (pg_restore feeding the server) keep two busy; on a two-core
    server this order made the first apply 0.2 s and the weekly re-sync 0.3 s shorter than
    starting it earlier. Over a network (sparse staging) it starts as soon as the snapshot is
    exported: its catalog round trips run beside the record, its download beside the
    staging's upload.
    """
    log.info(
        "backing up %s (pg_dump %s, in the background)",
        backup.plan.target.env,
        backup.plan.pg_dump.version,
    )
    backup.dump = start_pg_dump(
        backup.plan, backup.snapshot_id, backup.folder, _application(backup)
    )


DIFFERENCE_AT_MOST = 0.25  # of the target's rows the apply may change for a difference backup


def can_write_difference(run: ApplyRun, matched: Collection[TableName]) -> bool:
    """Whether the backup can be the snapshot's dump plus the difference (no pg_dump).

    So when the apply changes at most :data:`DIFFERENCE_AT_MOST` of the target's rows,
    every keyed scoped table is held as the snapshot's already (``matched``) or was
    staged from what differs (its changed rows known, :mod:`snapshot.sparse`), the
    snapshot is its dump alone, every
    backed-up table, and no other, is in the snapshot's dump with the target's columns,
    and no auth table is withheld (whose rows must not be copied into this target's
    archive).
    """
    if run.session.withheld_tables or not run.snapshot.dump_path.is_file():
        return False
    if set(run.snapshot.manifest.files) - {DUMP_FILE}:
        # rows beside the dump (a backup's catch-up, a masked snapshot's masked rows): the
        # dump alone is not the snapshot, and a table the target holds already may differ
        # from it
        return False
    if any(t not in matched and t not in run.sparse for t in run.row_sets):
        return False
    # Rows downloaded one table after another, while pg_dump runs beside the rest of the
    # preparation: past a quarter of the target, pg_dump is the quicker way back.
    gone = sum(changes.gone for changes in run.sparse.values())
    if gone > DIFFERENCE_AT_MOST * sum(stats.rows for stats in run.recorded.values()):
        return False
    assert run.backup is not None
    plan = run.backup.plan
    if {e.table for e in run.snapshot.manifest.tables} != set(plan.tables):
        return False  # the dump would hold other tables' data, or lack some
    for table in plan.tables:
        entry = run.snapshot.manifest.table(table)
        if entry is None or sorted(entry.column_names) != sorted(plan.shapes[table].column_names):
            return False
    return True


def read_whole_ahead(backup: Backup) -> None:
    """Read the followed tables whole (their ``REPLACE`` blocks, which a difference backup
    holds, :func:`write_difference`) in the backup's snapshot, by the exporting session, on
    a thread of its own: over a network their download runs beside the staging instead of
    after it. Call after the record; the blocks are kept in anonymous files."""
    tables = [t for t in backup.plan.tables if t in backup.followed]
    if not tables:
        return
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="snapshot-backup")
    backup.whole = pool.submit(_read_whole, backup, tables)
    pool.shutdown(wait=False)  # the thread ends with the blocks read


def _read_whole(
    backup: Backup, tables: Sequence[TableName]
) -> dict[TableName, tuple[BinaryIO, int]]:
    """Each table's block, in an anonymous file (closed by its reader), and its rows."""
    blocks: dict[TableName, tuple[BinaryIO, int]] = {}
    try:
        for table in tables:
            columns = tuple(backup.plan.shapes[table].column_names)
            query = sql.SQL("SELECT {} FROM {} AS t").format(_columns("t", columns), table.ident)
            out = tempfile.TemporaryFile(dir=backup.folder)  # noqa: SIM115 (returned open)
            blocks[table] = (out, 0)
            blocks[table] = (out, write_block(backup.exporter, out, REPLACE, table, columns, query))
    except BaseException:
        for opened, _ in blocks.values():
            opened.close()
        raise
    return blocks


def write_difference(run: ApplyRun, backup: Backup) -> None:
    """Make the backup the applied snapshot's dump plus what tells the target apart from it.

    The dump is linked (or copied) into the backup; ``catchup.copy`` starts with, for each
    table staged from what differs, the keys of the snapshot's rows that went up (``REMOVE``)
    and the target's versions of the rows the snapshot changes or lacks (``ADD``, the only
    rows downloaded); each followed auth table whole (``REPLACE``). A table held as the
    snapshot's already needs nothing; one without a key is copied whole under the lock, as
    always. Read before the lock, not in the record's snapshot: every row that moved since
    the record is caught up under the lock (:func:`catch_up`, which appends), so the backup
    is the target as the lock found it. pg_dump is not run at all.
    """
    if backup.dump is not None:  # started beside the staging: not needed after all
        backup.dump.kill()
        backup.dump = None
        (backup.folder / DUMP_FILE).unlink(missing_ok=True)
    try:
        changed, auth = _write_difference(run, backup)
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise archive.no_space(backup.folder, None, "pre-apply backup") from None
    backup.from_snapshot = True
    log.info(
        "backing up %s (beside %s's dump: the %s the apply changes or deletes, %s)",
        backup.plan.target.env,
        run.snapshot.id,
        text.count(changed, "row"),
        text.count(auth, "auth row"),
    )


def _write_difference(run: ApplyRun, backup: Backup) -> tuple[int, int]:
    """:func:`write_difference`'s files; the rows downloaded (scoped, auth)."""
    target = backup.folder / DUMP_FILE
    try:
        os.link(run.snapshot.dump_path, target)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise
        shutil.copyfile(run.snapshot.dump_path, target)  # another file system: a copy
    path = backup.folder / archive.CATCH_UP_FILE
    # Each table's rows: up to PIPELINED_AT_MOST asked together, in one round trip (as COPY
    # text made from each value's output text: copytext.block_later), more with a COPY each.
    blocks: list[tuple[str, TableName, tuple[str, ...], sql.Composable, int]] = []
    for table in backup.plan.tables:
        columns = tuple(backup.plan.shapes[table].column_names)
        changes = run.sparse.get(table)
        if changes is not None and not changes.by_key:
            if changes.gone:
                rows = sql.SQL("SELECT {} FROM {} AS t WHERE {}").format(
                    _columns("t", columns), table.ident, changes.gone_rows("t")
                )
                blocks.append((ADD, table, columns, rows, changes.gone))
        elif table in backup.followed and backup.whole is None:
            entry = run.snapshot.manifest.table(table)
            whole = sql.SQL("SELECT {} FROM {} AS t").format(_columns("t", columns), table.ident)
            blocks.append((REPLACE, table, columns, whole, entry.rows if entry else 0))
    with run.conn.pipeline():
        asked = {
            (verb, table): block_later(run.conn, verb, table, columns, query)
            for verb, table, columns, query, rows in blocks
            if rows <= PIPELINED_AT_MOST
        }
    changed = auth = 0
    read = backup.whole.result() if backup.whole is not None else {}
    with path.open("wb") as out:
        for table in backup.plan.tables:
            changes = run.sparse.get(table)
            if changes is not None and not changes.by_key and changes.sent:
                write_header(run.conn, out, REMOVE, table, changes.key)
                out.write(b"\n".join(changes.sent) + b"\n" + TERMINATOR[1:])
            elif table in read:
                block, count = read[table]
                with block:
                    block.seek(0)
                    shutil.copyfileobj(block, out)
                auth += count
            for verb, name, columns, query, _ in blocks:
                if name != table:
                    continue
                later = asked.get((verb, table))
                written = (
                    later(out)
                    if later is not None
                    else write_block(run.conn, out, verb, table, columns, query)
                )
                if verb == ADD:
                    changed += written
                else:
                    auth += written
    return changed, auth


def _columns(alias: str, columns: Sequence[str]) -> sql.Composable:
    return sql.SQL(", ").join(sql.Identifier(alias, c) for c in columns)


def _application(backup: Backup) -> str:
    """pg_dump's ``application_name``: this backup's alone (another pg_dump may be running)."""
    return f"{DUMP_APPLICATION} {backup.snapshot_id}"


DUMP_WAIT_POLL = 0.02  # seconds between two looks at whether pg_dump has ended


def wait_for_dump(backup: Backup) -> None:
    """Let the backup's pg_dump end (and fail here, if it fails): call before the apply locks.

    Its download is then never part of the writers' wait (what they write meanwhile is
    caught up under the lock), and no ACCESS EXCLUSIVE lock the apply takes (``--block-
    readers``' ALTER TABLE, a script's DDL) can hold pg_dump up until its lock wait fails.
    """
    running = backup.dump
    if running is None:  # the backup is the snapshot's dump and the difference: no pg_dump
        return
    started = time.monotonic()
    while running.running():
        time.sleep(DUMP_WAIT_POLL)
    running.wait()
    log.debug(
        "  the backup's pg_dump ended before the lock (waited %.2f s)", time.monotonic() - started
    )


def import_snapshot(conn: psycopg.Connection, backup: Backup) -> None:
    """Make ``conn``'s transaction see what pg_dump sees (its first statement). In a
    pipeline, end the statements that must see it with :func:`sync_import`."""
    try:
        conn.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(backup.snapshot_id)))
    except psycopg.Error as exc:
        _lost(backup, exc)
        raise


def sync_import(pipeline: psycopg.Pipeline, backup: Backup) -> None:
    """Sync ``pipeline``, which imported the backup's snapshot (:func:`import_snapshot`)."""
    try:
        pipeline.sync()
    except psycopg.Error as exc:
        _lost(backup, exc)
        raise


def _lost(backup: Backup, exc: psycopg.Error) -> None:
    """Raise the user's sentence when ``exc`` says the exported snapshot is gone: the
    exporting session ended (terminated, or an idle-in-transaction timeout)."""
    if isinstance(exc, psycopg.OperationalError):
        return
    message = exc.diag.message_primary or str(exc)
    if exc.sqlstate == "22023" and "snapshot" in message:
        raise ApplyFailed(
            f"the pre-apply backup's snapshot of {backup.plan.target.env} was lost before "
            f"the plan could read it ({message}): nothing was changed; run the apply again"
        ) from None


def others_later(run: ApplyRun, backup: Backup) -> Callable[[], dict[TableName, tuple[str, ...]]]:
    """The keys of the backed-up tables the plan does not compare, asked now (in the caller's
    pipeline, before the record's transaction), for :func:`record_others`."""
    return catalog.row_keys_later(run.conn, _other_columns(run, backup))


def _other_columns(run: ApplyRun, backup: Backup) -> dict[TableName, tuple[str, ...]]:
    return {
        t: tuple(backup.plan.shapes[t].column_names)
        for t in backup.plan.tables
        if t not in run.row_sets
    }


def record_others(
    run: ApplyRun,
    backup: Backup,
    keys_found: Mapping[TableName, tuple[str, ...]],
    lines: Mapping[TableName, sql.Composable] | None = None,
) -> None:
    """Record key, row version and hash of the backed-up tables the plan does not compare.

    Call in pg_dump's snapshot (the plan's transaction; in its pipeline: the statements are
    only sent), ``keys_found`` from :func:`others_later`: under the lock the reconcile
    (:func:`snapshot.apply.transaction.reconcile`) then reads only the rows written since,
    instead of the whole table.
    Hashed over the target's columns (what pg_dump writes), with the current row hash;
    ``lines``: the tables staged from what differs, each with the COPY line its digest is
    made of (:mod:`snapshot.sparse`, in the snapshot's columns).
    """
    columns = _other_columns(run, backup)
    first = len(run.config.scope.tables)  # numbers past the scope's: temporary names stay apart
    keys = {t: k for t, k in keys_found.items() if rowsets.keyable(k)}
    for number, (table, key) in enumerate(sorted(keys.items())):
        stage = sql.Identifier("pg_temp", table.staging)
        rows = RowSet(table, first + number, key, columns[table], stage)
        rowsets.fill_record(run.conn, rows, line=(lines or {}).get(table))
        backup.followed[table] = rows


def describe(
    run: ApplyRun,
    backup: Backup,
    known: Mapping[TableName, TableStats],
    state: catalog.State | None = None,
) -> None:
    """Record what the backup holds: the locked state (call before anything is written;
    ``state``: its sequences and migrations, read already)."""
    backup.state = describe_state(
        run.conn, backup.plan, known, names=run.state_names(), state=state
    )


@dataclass(frozen=True)
class CatchUp:
    """What :func:`catch_up` writes, asked with the reconciliation (:func:`catch_up_later`):
    the tables with rows moved since pg_dump's snapshot, and the blocks already asked."""

    moved: frozenset[TableName]
    asked: Mapping[tuple[str, TableName], Callable[[BinaryIO], int]]


def catch_up_later(run: ApplyRun, backup: Backup, moved: Mapping[TableName, int]) -> CatchUp:
    """:func:`catch_up`'s rows, asked now (in the reconciliation's pipeline: ``moved``, the
    rows moved per table, :func:`.rows.reconcile`): the moved keys and their live versions
    of each followed table, up to :data:`PIPELINED_AT_MOST` rows (more go by COPY)."""
    tables = frozenset(t for t in backup.plan.tables if moved.get(t, 0) > 0)
    asked: dict[tuple[str, TableName], Callable[[BinaryIO], int]] = {}
    for table in tables:
        followed = run.row_sets.get(table) or backup.followed.get(table)
        if followed is None or moved[table] > PIPELINED_AT_MOST:
            continue
        for verb, columns, query in _moved_blocks(table, followed, backup):
            asked[(verb, table)] = block_later(run.conn, verb, table, columns, query)
    return CatchUp(tables, asked)


def _moved_blocks(
    table: TableName, followed: RowSet, backup: Backup
) -> list[tuple[str, tuple[str, ...], sql.Composable]]:
    """The keys of ``table``'s moved rows (``REMOVE``) and their live versions (``ADD``)."""
    columns = tuple(backup.plan.shapes[table].column_names)
    return [
        (REMOVE, followed.key, sql.SQL("SELECT {} FROM {}").format(followed.keys, followed.moved)),
        (
            ADD,
            columns,
            sql.SQL(
                "SELECT {c} FROM {t} AS t WHERE EXISTS (SELECT 1 FROM {m} AS m WHERE {on})"
            ).format(
                c=sql.SQL(", ").join(sql.SQL("t.{}").format(sql.Identifier(c)) for c in columns),
                t=table.ident,
                m=followed.moved,
                on=followed.match("t", "m"),
            ),
        ),
    ]


def catch_up(run: ApplyRun, backup: Backup, caught: CatchUp | None = None) -> int:
    """Copy what changed between pg_dump's snapshot and the lock into ``catchup.copy``.

    Call under the lock, after the record is reconciled and before anything is written.
    For a table the record follows, the keys of the rows that moved (``REMOVE``) and their
    live versions (``ADD``); any other table whole (``REPLACE``). Returns the rows that
    changed in between (in the followed tables). ``caught``: what :func:`catch_up_later`
    asked with the reconciliation.
    """
    assert backup.state is not None
    path = backup.folder / archive.CATCH_UP_FILE
    try:
        copied, whole = _write_catch_up(
            run, backup, path, append=backup.from_snapshot, caught=caught
        )
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        path.unlink(missing_ok=True)
        raise archive.no_space(backup.folder, None, "pre-apply backup") from None
    if not copied and path.stat().st_size == 0:
        path.unlink()
    backup.caught_up, backup.copied_whole = copied, whole
    return copied


def _write_catch_up(
    run: ApplyRun, backup: Backup, path: Path, *, append: bool, caught: CatchUp | None
) -> tuple[int, int]:
    """(rows changed since pg_dump's snapshot, tables copied whole) written to ``path``
    (after what it holds, when ``append``)."""
    assert backup.state is not None
    copied = whole = 0
    if caught is None:
        with run.conn.pipeline():
            moved_later = moved_tables_later(run, backup)
        caught = CatchUp(frozenset(moved_later()), {})
    moved = caught.moved
    backup.moved = moved
    with path.open("ab" if append else "wb") as out:
        for entry in backup.state.tables:
            followed = run.row_sets.get(entry.table) or backup.followed.get(entry.table)
            columns = sql.SQL(", ").join(map(sql.Identifier, entry.column_names))
            if followed is None:  # no key: the whole table
                write_block(
                    run.conn,
                    out,
                    REPLACE,
                    entry.table,
                    entry.column_names,
                    sql.SQL("SELECT {} FROM {}").format(columns, entry.table.ident),
                )
                whole += 1
                continue
            if entry.table not in moved:
                continue
            # the keys that moved; their live versions follow
            for verb, names, query in _moved_blocks(entry.table, followed, backup):
                asked = caught.asked.get((verb, entry.table))
                written = (
                    asked(out)
                    if asked is not None
                    else write_block(run.conn, out, verb, entry.table, names, query)
                )
                if verb == REMOVE:
                    copied += written
    return copied, whole


def moved_tables_later(run: ApplyRun, backup: Backup) -> Callable[[], set[TableName]]:
    """The backed-up tables with rows moved since pg_dump's snapshot, asked now and read
    when called (in the caller's pipeline)."""
    asked = []
    for table in backup.plan.tables:
        followed = run.row_sets.get(table) or backup.followed.get(table)
        if followed is not None:
            query = sql.SQL("SELECT EXISTS (SELECT 1 FROM {})").format(followed.moved)
            asked.append((table, run.conn.execute(query)))
    return lambda: {table for table, cursor in asked if (row := cursor.fetchone()) and row[0]}


def finish(
    run: ApplyRun,
    backup: Backup,
    wrote: since.Wrote,
    first: Sequence[sql.Composed] = (),
    then: Sequence[sql.Composed] = (),
) -> Snapshot | None:
    """Wait for pg_dump; seal the backup (published by the caller after the commit), with
    the record of what the apply wrote (``wrote``: :func:`.since.wrote_later`). ``first``
    and ``then``: statements of the apply's to send ahead of the record's questions and
    after them, in their round trip.

    An apply that wrote nothing keeps no backup (None; a note says so): rolling back to
    it would restore what the target holds, leaving the apply the user meant in place.
    """
    assert backup.state is not None
    if not wrote.anything:
        for statement in (*first, *then):
            run.conn.execute(statement)
        abandon(backup)
        run.notes.append(
            f"this {run.action} wrote nothing ({run.target.env} already held its rows): no "
            f"pre-{run.action} backup was kept, 'snapshot rollback {run.target.env}' still undoes "
            "the apply before it"
        )
        return None
    txid = since.record(run, backup.folder, wrote, first, then)
    try:
        if backup.dump is not None:
            backup.dump.wait()
    finally:
        backup.close()
    whole = (
        f"; {backup.copied_whole} tables without a key copied whole" if backup.copied_whole else ""
    )
    log.info(
        "  backup written in %.1f s (%s changed since its snapshot%s, copied under the lock)",
        time.monotonic() - backup.started,
        text.count(backup.caught_up, "row"),
        whole,
    )
    # The apply's transaction id: if the process dies around the commit, the next run asks
    # the server whether this transaction committed, instead of guessing from the rows.
    archive.write_file(backup.folder, TRANSACTION_FILE, f"{txid}\n", "transaction id")
    kind = f"pre-{run.action}"
    manifest = build_manifest(
        backup.plan, backup.state, kind=kind, label=kind, applies=run.snapshot.id
    )
    # The snapshot's own dump, linked: its hash is the one verified when the apply began.
    known = {DUMP_FILE: run.snapshot.manifest.files[DUMP_FILE]} if backup.from_snapshot else {}
    return archive.seal(backup.folder, manifest, known)


def abandon(backup: Backup) -> None:
    """Stop pg_dump (the apply failed or was refused); the pending folder's owner removes it."""
    if backup.dump is not None:
        backup.dump.kill()
    backup.close()


def settle_orphaned_backups(
    config: Config, target: Connection, conn: psycopg.Connection
) -> list[str]:
    """Resolve backups left sealed but unpublished by a process that died at commit time.

    The server says whether the apply's transaction committed (its id is in the backup);
    when it no longer knows (a very old transaction), the rows decide: if the target still
    holds exactly the backup's rows, its apply never committed and the backup is removed;
    otherwise the apply committed, and the backup is published.
    """
    notes = []
    for orphan in archive.orphaned_backups(config.archive, target.env):
        committed = _committed(conn, orphan)
        if committed is None:
            committed = not all(
                table_stats(conn, e.table, e.column_names, kind=kind_of(e.checksum))
                == TableStats(e.rows, e.checksum)
                for e in orphan.manifest.scope_tables
            )
        if not committed:
            archive.discard(orphan)
        else:
            published = archive.publish(orphan, orphan.manifest.label)
            notes.append(f"recovered backup {published.id} of an apply that committed")
            log.warning("recovered %s: its apply committed before the process died", published.id)
    return notes


def _committed(conn: psycopg.Connection, orphan: Snapshot) -> bool | None:
    """Whether the orphan's apply committed, by its transaction id; None when unknown."""
    try:
        xid = (orphan.path / TRANSACTION_FILE).read_text(encoding="ascii").strip()
    except OSError:
        return None
    if not xid.isdigit():
        return None
    row = conn.execute("SELECT txid_status(%s::bigint)", (int(xid),)).fetchone()
    status = row[0] if row else None
    if status == "committed":
        return True
    if status == "aborted":
        return False
    return None  # in progress (cannot be: we hold the apply lock) or forgotten
