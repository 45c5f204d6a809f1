"""Blocks in COPY text format, as the archive keeps rows beside a dump.

A block is a ``VERB schema.table (columns) FROM stdin;`` line, the rows in COPY text
format, and a ``\\.`` line. A pre-apply backup's catch-up (``REMOVE``/``ADD``/``REPLACE``,
:mod:`snapshot.apply.backup`) and a masked snapshot's rows (:mod:`snapshot.masking`) are
written as such blocks; :mod:`snapshot.staging` reads them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import BinaryIO

import psycopg
from psycopg import sql

from snapshot.names import TableName

TERMINATOR = b"\n\\.\n"  # a block's end, with the newline of its last row
# The rows a block asked in a pipeline (block_later) may hold, read into memory at once: more
# go by COPY, streamed (write_block).
PIPELINED_AT_MOST = 20_000


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


def block_later(
    conn: psycopg.Connection,
    verb: str,
    table: TableName,
    columns: Sequence[str],
    query: sql.Composable,
) -> Callable[[BinaryIO], int]:
    """:func:`write_block`, asked now (in the caller's pipeline: a COPY would cost a round trip
    of its own) and written to ``out`` when called; the rows written.

    Each value comes as its type's output text (``format('%s', v)`` calls the output
    function, as COPY does; a cast to text may not: ``true::text`` is ``true``, COPY's
    ``t``), and is escaped here as COPY escapes it. For a few rows (keys), not bulk data.
    """
    texts = sql.SQL(", ").join(
        sql.SQL("CASE WHEN q.{c} IS NULL THEN NULL ELSE format('%s', q.{c}) END").format(
            c=sql.Identifier(c)
        )
        for c in columns
    )
    cursor = conn.execute(sql.SQL("SELECT {} FROM ({}) AS q").format(texts, query))

    def write(out: BinaryIO) -> int:
        write_header(conn, out, verb, table, columns)
        rows = cursor.fetchall()
        encoding = conn.info.encoding
        for row in rows:
            out.write(("\t".join(map(_escaped, row)) + "\n").encode(encoding))
        out.write(TERMINATOR[1:])
        return len(rows)

    return write


_ESCAPES = str.maketrans({"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"})


def _escaped(value: str | None) -> str:
    """One value as COPY's text format writes it."""
    return "\\N" if value is None else value.translate(_ESCAPES)


# What follows a backslash in COPY's text format: up to three octal digits, x and up to two
# hex digits, or one character (b f n r t v stand for control characters, any other for
# itself).
_COPY_ESCAPE = re.compile(rb"\\(?:([0-7]{1,3})|x([0-9A-Fa-f]{1,2})|(.))", re.DOTALL)
_CONTROL = {b"b": b"\b", b"f": b"\f", b"n": b"\n", b"r": b"\r", b"t": b"\t", b"v": b"\v"}


def _unescaped(found: re.Match[bytes]) -> bytes:
    octal, hexadecimal, char = found.groups()
    if octal is not None:
        return bytes([int(octal, 8) & 0xFF])
    if hexadecimal is not None:
        return bytes([int(hexadecimal, 16)])
    return _CONTROL.get(char, char)


def row_literal(fields: Sequence[bytes]) -> bytes:
    """A row's fields, each in COPY's text format, as the text of a row value
    (``'(…)'::some_table``): the same values reach each column's input function, as COPY
    would pass them. Bytes in the session's encoding, which must keep every byte below 0x80
    for the character it is (UTF-8 does)."""
    parts = []
    for field in fields:
        if field == b"\\N":
            parts.append(b"")  # NULL: nothing between the commas
            continue
        if b"\\" in field:
            field = _COPY_ESCAPE.sub(_unescaped, field).replace(b"\\", b"\\\\")
        parts.append(b'"' + field.replace(b'"', b'\\"') + b'"')
    return b"(" + b",".join(parts) + b")"
