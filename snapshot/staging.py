"""Loading a snapshot's rows into temporary tables ``snapshot_<table>`` on the target.

pg_restore turns each table's archived data into a script without touching any server;
only its COPY block is used, streamed through the tool's own session into a temporary
table shaped like the target's columns. Nothing else in the script is executed, so a
newer pg_restore can feed an older server (its ``SET transaction_timeout`` and
``\\restrict`` lines never reach it). The temporary tables are what the SQL scripts in
``sql/`` read to see the snapshot's own values.

A pre-apply backup may carry a catch-up (``catchup.copy``, see
:mod:`snapshot.apply.backup`): blocks in the same COPY text format whose header verb says
what to do with the staged rows: ``REMOVE`` those with these keys, ``ADD`` these rows,
``REPLACE`` the whole table with these rows. It is applied after the dump is staged, and
only then are the counts compared with the manifest. A masked or subsetted snapshot
(:mod:`snapshot.beside`) carries those tables' rows the same way, as ``REPLACE`` blocks in
``masked.copy`` or ``subset.copy`` beside a dump that lacks them.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Collection, Mapping, Sequence
from typing import BinaryIO, Protocol

import psycopg
from psycopg import sql

from snapshot import pgtools, progress, sparse
from snapshot.archive import CATCH_UP_FILE, Snapshot
from snapshot.copytext import TERMINATOR
from snapshot.db import use_app_search_path, use_tool_search_path
from snapshot.errors import ArchiveError, Refused
from snapshot.manifest import TableEntry
from snapshot.names import TableName

log = logging.getLogger(__name__)

COPY, REMOVE, ADD, REPLACE = "COPY", "REMOVE", "ADD", "REPLACE"
CATCH_UP_VERBS = (REMOVE, ADD, REPLACE)
_IDENT = re.compile(r'"((?:[^"]|"")*)"|([^,\s]+)')


def staging_table(entry: TableEntry) -> sql.Identifier:
    """The temporary table holding a snapshot table's rows."""
    return sql.Identifier("pg_temp", entry.table.staging)


def parse_copy_header(header: bytes) -> tuple[TableName, list[str]]:
    """Table and column names of a ``COPY schema.table (a, "b c") FROM stdin;`` line."""
    _, table, names = parse_header(header, (COPY,))
    return table, names


def parse_header(header: bytes, verbs: Sequence[str]) -> tuple[str, TableName, list[str]]:
    """Verb, table and column names of a ``VERB schema.table (a, "b c") FROM stdin;`` line."""
    text = header.decode("utf-8", "replace").rstrip()
    verb = text.split(" ", 1)[0]
    open_paren = _outside_quotes(text, " (")
    if verb not in verbs or open_paren < 0 or not text.endswith(") FROM stdin;"):
        raise ArchiveError(f"unexpected COPY line in the archive: {text[:80]!r}")
    table = TableName.parse(text[len(verb) + 1 : open_paren])
    inner = text[open_paren + 2 : -len(") FROM stdin;")]
    names = [
        quoted.replace('""', '"') if quoted else plain for quoted, plain in _IDENT.findall(inner)
    ]
    return verb, table, names


def _outside_quotes(text: str, needle: str) -> int:
    """Index of the first ``needle`` not inside a double-quoted identifier; -1 if none."""
    quoted = False
    for i, char in enumerate(text):
        if char == '"':
            quoted = not quoted  # a doubled quote inside a name toggles twice: still inside
        elif not quoted and text.startswith(needle, i):
            return i
    return -1


class Sink(Protocol):
    def write(self, buffer: bytes) -> None: ...


class _Discard:
    def write(self, buffer: bytes) -> None:
        pass


DISCARD = _Discard()  # where the data of a block that is read past goes


class ScriptReader:
    """Reads a pg_restore script: lines up to each COPY header, then that block's data."""

    def __init__(self, stream: BinaryIO, verbs: Sequence[str] = (COPY,)) -> None:
        self._stream = stream
        self._buffer = b""
        self._starts = tuple(f"{verb} ".encode() for verb in verbs)

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
            if line.startswith(self._starts) and line.rstrip().endswith(b"FROM stdin;"):
                return line

    def pump(self, copy: Sink) -> None:
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
    skip: Collection[TableName] = (),
    sparse_tables: Mapping[TableName, sparse.Sparse] | None = None,
) -> None:
    """Create and fill ``pg_temp.snapshot_<table>`` for each entry (autocommit session).

    One pg_restore streams the archive's data; each COPY block is identified by its
    header and checked against the manifest (columns, then row count). The data of the
    tables in ``skip`` (already staged from elsewhere) is read past, never loaded. A
    partitioned table comes as one block per partition, each naming the partitioned
    table; one without any partition comes as none (and has no rows). The tables in
    ``sparse_tables`` hold the target's rows already: only the rows that differ go up
    (:mod:`snapshot.sparse`).
    """
    wanted = {entry.table: entry for entry in entries if entry.table not in skip}
    sparse_tables = sparse_tables or {}
    progress.begin("staged", len(wanted), sum(e.rows for e in wanted.values()))
    # The staged copies have the target's column types: a domain's CHECK runs as the rows
    # load, with the path the app's own sessions have (it may name tables unqualified).
    use_app_search_path(conn, local=False)
    try:
        counts = _load(conn, pg_restore, snapshot, wanted, skip, sparse_tables)
        # one without any block and rows in the manifest is missing (said below)
        finished = [s for s in sparse_tables.values() if s.seen or wanted[s.table].rows == 0]
        counts.update(
            sparse.finish(conn, finished, lambda table, exc: _cannot_hold(snapshot, table, exc))
        )
    finally:
        if not conn.closed:
            use_tool_search_path(conn, local=False)
    beside = snapshot.manifest.beside_dump
    for table, entry in wanted.items():
        # A partitioned table with no partition; a masked or subsetted one, whose rows follow.
        if table not in counts and (entry.rows == 0 or table in beside):
            counts[table] = _stage_table(conn, entry, entry.column_names, None)
    missing = [str(t) for t in wanted if t not in counts]
    if missing:
        raise ArchiveError(f"{snapshot.id}: the dump lacks {', '.join(missing)}: it is damaged")
    # A masked or subsetted snapshot's rows, then a backup's catch-up: blocks of one format.
    for extra in (*snapshot.manifest.row_files, CATCH_UP_FILE):
        if extra in snapshot.manifest.files:
            counts.update(_catch_up(conn, snapshot, wanted, skip, extra))
    for table, rows in counts.items():
        if rows != wanted[table].rows:
            raise ArchiveError(
                f"{snapshot.id}: {table} holds {rows} rows in the dump but "
                f"{wanted[table].rows} in the manifest: the snapshot is damaged"
            )


def _load(
    conn: psycopg.Connection,
    pg_restore: pgtools.PgTool,
    snapshot: Snapshot,
    wanted: dict[TableName, TableEntry],
    skip: Collection[TableName],
    sparse_tables: Mapping[TableName, sparse.Sparse],
) -> dict[TableName, int]:
    """Every COPY block of the archive into its staged copy; the rows staged per table
    (the sparse tables' are counted once they are finished)."""
    counts: dict[TableName, int] = {}
    started: dict[TableName, float] = {}
    shown: TableName | None = None  # the table whose blocks are being read (one per partition)
    with pgtools.restore_script(pg_restore, snapshot.dump_path) as stream:
        script = ScriptReader(stream)
        while header := script.next_header():
            table, columns = parse_copy_header(header)
            if shown is not None and shown != table:
                _staged(shown, counts, started)
                shown = None
            started.setdefault(table, time.monotonic())
            if table in skip:
                script.pump(DISCARD)
                continue
            shown = table
            entry = wanted.get(table)
            if entry is None:
                raise ArchiveError(f"{snapshot.id}: the dump holds unexpected data for {table}")
            _same_columns(snapshot, entry, columns)
            with progress.still_running(f"staging {table}"):
                try:
                    if table in sparse_tables:  # rows read for now; finish counts them
                        before = sparse_tables[table].read
                        _stage_changes(conn, sparse_tables[table], columns, script)
                        counts[table] = counts.get(table, 0) + sparse_tables[table].read - before
                        continue
                    rows = _stage_table(conn, entry, columns, script, append=table in counts)
                except psycopg.OperationalError:
                    raise
                except psycopg.Error as exc:
                    raise _cannot_hold(snapshot, table, exc) from None
            counts[table] = counts.get(table, 0) + rows
    if shown is not None:
        _staged(shown, counts, started)
    return counts


def _staged(
    table: TableName, counts: dict[TableName, int], started: dict[TableName, float]
) -> None:
    """Progress for one table, once all its blocks are in (a partitioned table has several)."""
    progress.table_done("staged", table, counts.get(table, 0), time.monotonic() - started[table])


def _cannot_hold(snapshot: Snapshot, table: TableName, exc: psycopg.Error) -> Refused:
    """The target's types refuse a snapshot row: its schema is not the source's."""
    message = (exc.diag.message_primary or str(exc)).splitlines()[0]
    context = (exc.diag.context or "").splitlines()
    found = re.search(r"line (\d+)(?:, column (.+?):)?", context[0]) if context else None
    at = ""
    if found:
        at = f" (row {found.group(1)}" + (f", column {found.group(2)})" if found.group(2) else ")")
    return Refused(
        f"the target cannot hold {snapshot.id}'s rows of {table}: {message}{at}: its schema "
        "differs from the snapshot's source (an enum label, a domain's CHECK, a type defined "
        "otherwise); run the migrations so both sides match, then retry; nothing was changed"
    )


def _same_columns(snapshot: Snapshot, entry: TableEntry, columns: Sequence[str]) -> None:
    if sorted(columns) != sorted(entry.column_names):
        raise ArchiveError(
            f"{snapshot.id}: the dump's columns of {entry.table} differ from its manifest: "
            "the snapshot is damaged"
        )


def _catch_up(
    conn: psycopg.Connection,
    snapshot: Snapshot,
    wanted: dict[TableName, TableEntry],
    skip: Collection[TableName],
    name: str = CATCH_UP_FILE,
) -> dict[TableName, int]:
    """Apply a backup's catch-up (or a masked snapshot's masked rows, ``name``) to the
    staged rows; the patched tables' new counts.

    The tables in ``skip`` were staged as they end up (their manifest's state): their
    blocks are read past.
    """
    counts: dict[TableName, int] = {}
    keys = sql.Identifier("pg_temp", "_snapshot_catch_up_keys")
    with (snapshot.path / name).open("rb") as stream:
        script = ScriptReader(stream, CATCH_UP_VERBS)
        while header := script.next_header():
            verb, table, columns = parse_header(header, CATCH_UP_VERBS)
            if table in skip:
                script.pump(DISCARD)
                continue
            entry = wanted.get(table)
            if entry is None:
                raise ArchiveError(f"{snapshot.id}: its catch-up holds unexpected data for {table}")
            staged = staging_table(entry)
            names = sql.SQL(", ").join(map(sql.Identifier, columns))
            if verb == REMOVE:
                if not columns or not set(columns) <= set(entry.column_names):
                    _same_columns(snapshot, entry, columns)  # raises: names unknown columns
                conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(keys))
                conn.execute(
                    sql.SQL("CREATE TEMP TABLE {} AS SELECT {} FROM {} WITH NO DATA").format(
                        keys, names, staged
                    )
                )
                _copy_in(conn, keys, names, script)
                # Key columns are never NULL (a primary key, or a unique key over NOT NULL).
                on = sql.SQL(" AND ").join(
                    sql.SQL("s.{c} = k.{c}").format(c=sql.Identifier(c)) for c in columns
                )
                conn.execute(
                    sql.SQL("DELETE FROM {} AS s USING {} AS k WHERE {}").format(staged, keys, on)
                )
                conn.execute(sql.SQL("DROP TABLE {}").format(keys))
            else:
                _same_columns(snapshot, entry, columns)
                if verb == REPLACE:
                    conn.execute(sql.SQL("TRUNCATE {}").format(staged))
                _copy_in(conn, staged, names, script)
            row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(staged)).fetchone()
            counts[table] = int(row[0]) if row else 0
    return counts


def _copy_in(
    conn: psycopg.Connection, table: sql.Identifier, names: sql.Composable, script: ScriptReader
) -> int:
    with conn.cursor() as cur:
        with cur.copy(sql.SQL("COPY {} ({}) FROM STDIN").format(table, names)) as copy:
            script.pump(copy)
        return cur.rowcount


def _stage_changes(
    conn: psycopg.Connection, changes: sparse.Sparse, columns: Sequence[str], script: ScriptReader
) -> None:
    """Send up one COPY block's rows that the staged target rows lack (:mod:`snapshot.sparse`)."""
    changes.seen = True
    names = sql.SQL(", ").join(map(sql.Identifier, columns))
    query = sql.SQL("COPY {} ({}) FROM STDIN").format(changes.side, names)
    with contextlib.ExitStack() as stack:

        def open_copy() -> sparse.Sink:
            cursor = stack.enter_context(conn.cursor())
            return stack.enter_context(cursor.copy(query))

        lines = changes.filter(columns, open_copy)
        script.pump(lines)
        lines.close()


def _stage_table(
    conn: psycopg.Connection,
    entry: TableEntry,
    columns: Sequence[str],
    script: ScriptReader | None,
    *,
    append: bool = False,
) -> int:
    """Load one COPY block into the table's staged copy (created unless ``append``).

    Without ``script`` the staged copy is only created, empty.
    """
    target = staging_table(entry)
    names = sql.SQL(", ").join(map(sql.Identifier, columns))
    if not append:  # both statements in one round trip
        conn.execute(
            sql.SQL(
                "DROP TABLE IF EXISTS {target}; "
                "CREATE TEMP TABLE {target} AS SELECT {names} FROM {table} WITH NO DATA"
            ).format(target=target, names=names, table=entry.table.ident)
        )
    return _copy_in(conn, target, names, script) if script is not None else 0
