"""Blocks in COPY text format, as the archive keeps rows beside a dump.

A block is a ``VERB schema.table (columns) FROM stdin;`` line, the rows in COPY text
format, and a ``\\.`` line. A pre-apply backup's catch-up (``REMOVE``/``ADD``/``REPLACE``,
:mod:`snapshot.apply.backup`) and a masked snapshot's rows (:mod:`snapshot.masking`) are
written as such blocks; :mod:`snapshot.staging` reads them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import BinaryIO

import psycopg
from psycopg import sql

from snapshot.names import TableName

TERMINATOR = b"\n\\.\n"  # a block's end, with the newline of its last row


def write_header(
    conn: psycopg.Connection, out: BinaryIO, verb: str, table: TableName, columns: Sequence[str]
) -> None:
    """A block's ``VERB schema.table (columns) FROM stdin;`` line."""
    names = ", ".join(sql.Identifier(c).as_string(conn) for c in columns)
    out.write(f"{verb} {table.ident.as_string(conn)} ({names}) FROM stdin;\n".encode())


def write_block(
    conn: psycopg.Connection,
    out: BinaryIO,
    verb: str,
    table: TableName,
    columns: Sequence[str],
    query: sql.Composable,
) -> int:
    """One block of ``query``'s rows (``columns``) written to ``out``; the rows written."""
    write_header(conn, out, verb, table, columns)
    with conn.cursor() as cur:
        with cur.copy(sql.SQL("COPY ({}) TO STDOUT").format(query)) as copy:
            for data in copy:
                out.write(data)
        count = cur.rowcount  # once the COPY is over, while the cursor is open
    out.write(TERMINATOR[1:])
    return count
