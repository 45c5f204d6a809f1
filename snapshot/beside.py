"""Rows a take writes beside its dump instead of in it: masked and subsetted tables.

pg_dump leaves out the rows of every table that is masked (:mod:`snapshot.masking`) or
subsetted (:mod:`snapshot.subset`); in the same exported snapshot, each such table's rows
are written as one ``REPLACE schema.table (columns) FROM stdin;`` block of COPY text
(:mod:`snapshot.copytext`): the masked expressions over the kept rows for a table both
masked and subsetted. Staging reads these blocks after the dump
(:mod:`snapshot.staging`); the manifest's counts and checksums are those of the written rows,
summed from the same reading: the rows, masked expressions and all, are computed once.
"""

from __future__ import annotations

import errno
import os
import shutil
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import psycopg
from psycopg import sql

from snapshot import archive, copytext
from snapshot.checksum import TableStats, stats_of_sums, with_row_hashes
from snapshot.masking import MASKED_FILE, Masks
from snapshot.names import TableName
from snapshot.subset import SUBSET_FILE, SubsetPlan

if TYPE_CHECKING:
    from snapshot.alongside import Alongside


@dataclass(frozen=True)
class Block:
    """One table's rows beside the dump: its columns and the query that gives them."""

    columns: tuple[str, ...]
    query: sql.Composable


def blocks(
    order: tuple[TableName, ...], masks: Masks | None, subset: SubsetPlan | None
) -> dict[TableName, Block]:
    """The block of each table masked or subsetted, in ``order`` (the take's)."""
    masked = masks.tables if masks else {}
    cut = subset.tables if subset else {}
    found = {}
    for table in order:
        if table in masked:
            source = subset.rows(table) if subset and table in cut else None
            mask = masked[table]
            found[table] = Block(tuple(c.name for c in mask.columns), mask.select(source))
        elif subset and table in cut:
            found[table] = Block(cut[table].columns, subset.select(table))
    return found


def file_name(masks: Masks | None) -> str:
    """``masked.copy`` in a masked snapshot (the masking section names it), else
    ``subset.copy``: one file either way."""
    return MASKED_FILE if masks is not None else SUBSET_FILE


def write_beside(
    conn: psycopg.Connection,
    folder: Path,
    name: str,
    written: Mapping[TableName, Block],
    alongside: Alongside | None = None,
) -> dict[TableName, TableStats]:
    """Write ``written`` into ``folder/name``; each table's count and checksum.

    ``conn`` is in the take's transaction (after :func:`snapshot.masking.set_key` for masked
    blocks). With ``alongside``, that second session writes the blocks it can (the streamed
    followers') while ``conn`` writes the others, then whichever it reaches first: each block
    goes to a part file of its own, and the parts are joined in ``written``'s order. A full
    disk is the archive's one line (:func:`snapshot.archive.no_space`).
    """
    path = folder / name
    parts = folder / f".{name}.parts"
    try:
        if alongside is None or not set(alongside.writes) & set(written):
            return _write(conn, path, written)
        return _write_alongside(conn, alongside, path, parts, written)
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        path.unlink(missing_ok=True)
        what = "masked rows" if name == MASKED_FILE else "subsetted rows"
        raise archive.no_space(folder, None, what) from None
    finally:
        shutil.rmtree(parts, ignore_errors=True)


def _write(
    conn: psycopg.Connection, path: Path, written: Mapping[TableName, Block]
) -> dict[TableName, TableStats]:
    stats = {}
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        for table, block in written.items():
            stats[table] = _write_block(conn, out, table, block)
    return stats


def _write_alongside(
    conn: psycopg.Connection,
    alongside: Alongside,
    path: Path,
    parts: Path,
    written: Mapping[TableName, Block],
) -> dict[TableName, TableStats]:
    """:func:`write_beside` in two sessions: the blocks shared out as each session is free."""
    parts.mkdir(mode=0o700)
    order = list(written)
    theirs = [t for t in alongside.writes if t in written]
    # The take's session first writes what only it can, then helps with the largest left.
    pending = [t for t in order if t not in theirs] + theirs
    lock = threading.Lock()

    def next_block(mine: bool) -> TableName | None:
        """The next block for the take's session (``mine``), or for the second one."""
        with lock:
            for table in pending:
                if mine or table in theirs:
                    pending.remove(table)
                    return table
            return None

    def drain(session: psycopg.Connection, mine: bool) -> dict[TableName, TableStats]:
        done = {}
        while (table := next_block(mine)) is not None:
            fd = os.open(
                parts / str(order.index(table)), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600
            )
            with os.fdopen(fd, "wb") as out:
                done[table] = _write_block(session, out, table, written[table])
        return done

    other = alongside.run(lambda session: drain(session, mine=False))
    stats = drain(conn, mine=True)
    stats.update(other.result())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        for number in range(len(order)):
            with open(parts / str(number), "rb") as part:
                shutil.copyfileobj(part, out, 1 << 20)
    return {table: stats[table] for table in order}


def _write_block(
    conn: psycopg.Connection, out: BinaryIO, table: TableName, block: Block
) -> TableStats:
    """One table's ``REPLACE`` block, and its count and checksum from the same reading.

    The server computes each row once, with its hash's two halves after it
    (:func:`snapshot.checksum.with_row_hashes`); they are summed here and cut off before
    the row is written. Each COPY message is one row, whose values hold no tab or newline
    (COPY escapes them; "CopyData messages (always one per row)", says the protocol): the
    row's last two tab-separated fields are the halves.
    """
    copytext.write_header(conn, out, "REPLACE", table, block.columns)
    rows = first = second = 0
    write = out.write
    query = with_row_hashes(block.query, block.columns)
    with conn.cursor() as cur, cur.copy(sql.SQL("COPY ({}) TO STDOUT").format(query)) as copy:
        for data in copy:
            row, half, other = bytes(data).rsplit(b"\t", 2)  # int() takes other's newline
            first += int(half)
            second += int(other)
            write(row + b"\n")
            rows += 1
    out.write(copytext.TERMINATOR[1:])
    return stats_of_sums(rows, first, second)
