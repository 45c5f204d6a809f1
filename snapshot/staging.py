"""Loading a snapshot's rows into temporary tables ``snapshot_<table>`` on the target.

pg_restore turns each table's archived data into a script without touching any server;
only its COPY block is used, streamed through the tool's own session into a temporary
table shaped like the target's columns. Nothing else in the script is executed, so a
newer pg_restore can feed an older server (its ``SET transaction_timeout`` and
``\\restrict`` lines never reach it). The temporary tables are what the SQL scripts in
``sql/`` read to see the snapshot's own values.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence
from typing import BinaryIO

import psycopg
from psycopg import sql

from snapshot import pgtools, progress
from snapshot.archive import Snapshot, TableEntry
from snapshot.errors import ArchiveError
from snapshot.names import TableName

log = logging.getLogger(__name__)

TERMINATOR = b"\n\\.\n"
_IDENT = re.compile(rb'"((?:[^"]|"")*)"|([^,\s]+)')


def staging_table(entry: TableEntry) -> sql.Identifier:
    """The temporary table holding a snapshot table's rows."""
    return sql.Identifier("pg_temp", entry.table.staging)


def parse_copy_header(header: bytes) -> tuple[TableName, list[str]]:
    """Table and column names of a ``COPY schema.table (a, "b c") FROM stdin;`` line."""
    text = header.decode("utf-8", "replace").rstrip()
    open_paren = text.find(" (")
    if not text.startswith("COPY ") or open_paren < 0 or not text.endswith(") FROM stdin;"):
        raise ArchiveError(f"unexpected COPY line in the archive: {text[:80]!r}")
    table = TableName.parse(text[5:open_paren])
    inner = header[header.find(b" (") + 2 : header.rfind(b") FROM stdin;")]
    names = [
        quoted.replace(b'""', b'"').decode() if quoted else plain.decode()
        for quoted, plain in _IDENT.findall(inner)
    ]
    return table, names


class ScriptReader:
    """Reads a pg_restore script: lines up to each COPY header, then that block's data."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._buffer = b""

    def next_header(self) -> bytes | None:
        """The next ``COPY ... FROM stdin;`` line; None at the end of the script."""
        while True:
            newline = self._buffer.find(b"\n")
            if newline < 0:
                chunk = self._stream.read(pgtools.CHUNK)
                if not chunk:
                    return None
                self._buffer += chunk
                continue
            line, self._buffer = self._buffer[: newline + 1], self._buffer[newline + 1 :]
            if line.startswith(b"COPY ") and line.rstrip().endswith(b"FROM stdin;"):
                return line

    def pump(self, copy: psycopg.Copy) -> None:
        """Write the block's COPY data, up to its ``\\.`` line, into ``copy`` in large chunks.

        ``pending`` starts with a virtual newline (skipped by ``offset``) so that an empty
        table's terminator matches too, and keeps the last few bytes of each read so that
        a terminator split across two reads is still found.
        """
        pending, offset = b"\n" + self._buffer, 1
        keep = len(TERMINATOR) - 1
        while True:
            end = pending.find(TERMINATOR)
            if end >= 0:
                if end + 1 > offset:
                    copy.write(pending[offset : end + 1])
                self._buffer = pending[end + len(TERMINATOR) :]
                return
            cut = len(pending) - keep
            if cut > offset:
                copy.write(pending[offset:cut])
                pending, offset = pending[cut:], 0
            chunk = self._stream.read(pgtools.CHUNK)
            if not chunk:
                raise ArchiveError("the archive's data ends without its terminator: it is damaged")
            pending += chunk


def stage(
    conn: psycopg.Connection,
    pg_restore: pgtools.PgTool,
    snapshot: Snapshot,
    entries: Sequence[TableEntry],
) -> None:
    """Create and fill ``pg_temp.snapshot_<table>`` for each entry (autocommit session).

    One pg_restore streams the archive's data; each COPY block is identified by its
    header and checked against the manifest (columns, then row count).
    """
    wanted = {entry.table: entry for entry in entries}
    progress.begin("staged", len(entries), sum(e.rows for e in entries))
    staged: set[TableName] = set()
    with pgtools.restore_script(pg_restore, snapshot.dump_path) as stream:
        script = ScriptReader(stream)
        while header := script.next_header():
            table, columns = parse_copy_header(header)
            started = time.monotonic()
            entry = wanted.get(table)
            if entry is None or table in staged:
                raise ArchiveError(f"{snapshot.id}: the dump holds unexpected data for {table}")
            if sorted(columns) != sorted(entry.column_names):
                raise ArchiveError(
                    f"{snapshot.id}: the dump's columns of {table} differ from its manifest: "
                    "the snapshot is damaged"
                )
            with progress.still_running(f"staging {table}"):
                rows = _stage_table(conn, entry, columns, script)
            if rows != entry.rows:
                raise ArchiveError(
                    f"{snapshot.id}: {table} holds {rows} rows in the dump but {entry.rows} "
                    "in the manifest: the snapshot is damaged"
                )
            staged.add(table)
            progress.table_done("staged", table, rows, time.monotonic() - started)
    missing = [str(t) for t in wanted if t not in staged]
    if missing:
        raise ArchiveError(f"{snapshot.id}: the dump lacks {', '.join(missing)}: it is damaged")


def _stage_table(
    conn: psycopg.Connection, entry: TableEntry, columns: Sequence[str], script: ScriptReader
) -> int:
    target = staging_table(entry)
    names = sql.SQL(", ").join(map(sql.Identifier, columns))
    conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(target))
    conn.execute(
        sql.SQL("CREATE TEMP TABLE {} AS SELECT {} FROM {} WITH NO DATA").format(
            target, names, entry.table.ident
        )
    )
    with conn.cursor() as cur:
        with cur.copy(sql.SQL("COPY {} ({}) FROM STDIN").format(target, names)) as copy:
            script.pump(copy)
        return cur.rowcount
