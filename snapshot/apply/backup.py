"""The pre-apply backup: the target exactly as the apply found it, archived for rollback.

pg_dump starts right after the lock, in the transaction's exported snapshot, so it sees
the locked state before any write, and runs while the writes run. Its manifest's counts
and checksums come from the record the apply already holds (no second read of the
target). The apply joins it before committing: a backup that failed stops the commit, so
an apply never commits without its way back. It is published only after the commit.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import psycopg

from snapshot import archive
from snapshot.archive import Snapshot
from snapshot.checksum import TableStats, table_stats
from snapshot.config import Config
from snapshot.environments import Connection
from snapshot.names import TableName
from snapshot.pgtools import Running
from snapshot.session import Session
from snapshot.take import DumpPlan, DumpState, build_manifest, describe_state, export_snapshot
from snapshot.take import start_dump as start_pg_dump

log = logging.getLogger(__name__)

TRANSACTION_FILE = "transaction"  # in a backup folder: the id of the apply's transaction


@dataclass
class Backup:
    """A pre-apply backup being written."""

    folder: Path
    plan: DumpPlan
    dump: Running
    started: float
    state: DumpState | None = None


def start(s: Session, folder: Path) -> Backup:
    """Start pg_dump in this transaction's snapshot (call before anything is written)."""
    assert s.pg_dump is not None, "a backup needs pg_dump (the preflight found one)"
    plan = DumpPlan(s.target, s.info, s.pg_dump, s.config.scope, s.shapes)
    log.info("backing up %s (pg_dump %s, in the background)", s.target.env, s.pg_dump.version)
    dump = start_pg_dump(plan, export_snapshot(s.conn), folder)
    return Backup(folder, plan, dump, time.monotonic())


def describe(s: Session, backup: Backup, known: Mapping[TableName, TableStats]) -> None:
    """Record what the backup holds (call before anything is written)."""
    backup.state = describe_state(s.conn, backup.plan, known)


def finish(s: Session, backup: Backup) -> Snapshot:
    """Wait for pg_dump; seal the backup (published by the caller after the commit)."""
    assert backup.state is not None
    backup.dump.wait()
    log.info("  backup written in %.1f s", time.monotonic() - backup.started)
    # The apply's transaction id: if the process dies around the commit, the next run asks
    # the server whether this transaction committed, instead of guessing from the rows.
    row = s.conn.execute("SELECT txid_current()::text").fetchone()
    assert row is not None
    archive.write_file(backup.folder, TRANSACTION_FILE, f"{row[0]}\n", "transaction id")
    kind = f"pre-{s.action}"
    manifest = build_manifest(
        backup.plan, backup.state, kind=kind, label=kind, applies=s.snapshot.id
    )
    return archive.seal(backup.folder, manifest)


def abandon(backup: Backup) -> None:
    """Stop pg_dump (the apply failed); the pending folder is removed by its owner."""
    backup.dump.kill()


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
                table_stats(conn, e.table, e.column_names) == TableStats(e.rows, e.checksum)
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
