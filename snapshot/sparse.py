"""Staging only the rows that differ: a re-sync sends the server what changed, not whole tables.

The target's rows are already in the server. For a table the target does not hold as the
snapshot does, the apply copies the target's recorded rows into the staged table inside the
server (:func:`copy_recorded`), downloads one short line per target row, its key and a
64-bit digest of its row text (:func:`download`), and reads the archive's COPY block
locally: a snapshot row whose digest is the target's is staged already; one that is new or
differs goes up into a side table; the staged rows whose key the snapshot changes or lacks
are removed, and the side table's rows put in their place (:func:`finish`). The staged
table then holds the snapshot's rows, exactly as a full upload would have it, and the same
integrity check proves it: its count and checksum, computed in the server, must be the
manifest's. When they are not, the table is staged again in full (the apply does that).

Both sides digest the same text: ``ROW(...)::text`` of the snapshot's columns in name order,
the text the checksums hash (:mod:`snapshot.checksum`). Locally it is rebuilt from the COPY
fields by ``record_out``'s rules: a field is unescaped from COPY's text format, then quoted
when it is empty or holds a double quote, backslash, parenthesis, comma or white space, its
quotes and backslashes doubled; NULL is nothing. A row whose text differs only in form (a
type the dump wrote under other settings) is uploaded and then found equal in the server:
it costs bytes, never a wrong row.

A key is its COPY field for a one-column key, its ``ROW(...)::text`` for a longer one; the
server removes staged rows by the same text.
"""

from __future__ import annotations

import hashlib
import logging
import operator
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import psycopg
from psycopg import sql

from snapshot.errors import ArchiveError
from snapshot.names import TableName

log = logging.getLogger(__name__)

NULL = b"\\N"
# A field record_out quotes: one holding any of these (C's isspace, quote, backslash,
# parentheses, comma). Deleted with bytes.translate, a length change says "quote".
_SPECIAL = b' \t\n\r\f\v"\\(),'
_ESCAPE = re.compile(rb"\\(?:([0-7]{1,3})|x([0-9A-Fa-f]{1,2})|(.))", re.S)
_ESCAPED = {b"b": b"\b", b"f": b"\f", b"n": b"\n", b"r": b"\r", b"t": b"\t", b"v": b"\v"}


def _unescape_one(found: re.Match[bytes]) -> bytes:
    octal, hexadecimal, char = found.groups()
    if octal:
        return bytes([int(octal, 8) & 0xFF])
    if hexadecimal:
        return bytes([int(hexadecimal, 16)])
    return _ESCAPED.get(char, char)


def unescape(value: bytes) -> bytes:
    """A COPY text field's value (not ``\\N``): its backslash escapes undone."""
    return _ESCAPE.sub(_unescape_one, value) if b"\\" in value else value


def _quoted(value: bytes) -> bytes:
    if value and len(value.translate(None, _SPECIAL)) == len(value):
        return value
    return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'""') + b'"'


def record_text(fields: Sequence[bytes]) -> bytes:
    """``ROW(...)::text`` of a row whose fields are COPY text fields."""
    return b"(" + b",".join([b"" if f == NULL else _quoted(unescape(f)) for f in fields]) + b")"


def _record_text_plain(fields: Sequence[bytes]) -> bytes:
    """:func:`record_text` of fields without any backslash (no NULL, nothing escaped)."""
    return b"(" + b",".join([_quoted(f) for f in fields]) + b")"


def digest(text: bytes) -> bytes:
    """The 64-bit digest both sides compare: the first 16 hex digits of the text's md5."""
    return hashlib.md5(text, usedforsecurity=False).hexdigest()[:16].encode()


def digest_sql(term: sql.Composable, md5_term: bool) -> sql.Composable:
    """The server's :func:`digest` of a row, from its checksum term (the row text, or its md5
    for an old snapshot's checksum kind, whose first 16 digits it already is)."""
    if md5_term:
        return sql.SQL("left({}, 16)").format(term)
    return sql.SQL("left(md5({}), 16)").format(term)


@dataclass
class Sparse:
    """One table staged sparsely: what the target holds, and what the snapshot changes."""

    table: TableName
    number: int
    stage: sql.Identifier
    key: tuple[str, ...]
    columns: tuple[str, ...]  # the snapshot's columns: digested in name order
    target: dict[bytes, bytes] = field(default_factory=dict)  # key -> digest, not yet seen
    removes: list[bytes] = field(default_factory=list)  # keys of staged rows to remove
    # the keys of the rows that went up, as COPY lines of the key columns (what a pre-apply
    # backup removes from the snapshot's rows, snapshot.apply.backup)
    sent: list[bytes] = field(default_factory=list)
    gone: int = 0  # staged rows removed (their keys stay in :data:`GONE`)
    uploaded: int = 0
    read: int = 0  # the snapshot's rows read (all of them, whether they went up or not)
    seen: bool = False  # a COPY block of the table was read

    @property
    def side(self) -> sql.Identifier:
        """The temporary table the snapshot's new and changed rows go up into."""
        return sql.Identifier("pg_temp", f"_snapshot_a{self.number}")

    def key_text(self, alias: str) -> sql.Composable:
        """The server's text of a row's key (see the module)."""
        names = [sql.Identifier(alias, k) for k in self.key]
        if len(names) == 1:
            return sql.SQL("{}::text").format(names[0])
        return sql.SQL("ROW({})::text").format(sql.SQL(", ").join(names))

    def filter(self, columns: Sequence[str], open_sink: Callable[[], Sink]) -> LineFilter:
        """A sink for one COPY block (its ``columns`` in the dump's order) that passes on
        only the rows the target lacks or holds otherwise, into the sink ``open_sink``
        opens when the first such row comes (a block with none costs no round trip)."""
        return LineFilter(self, columns, open_sink)


class Sink(Protocol):
    """Where a COPY block's data is written (a psycopg Copy)."""

    def write(self, buffer: bytes, /) -> object: ...


class LineFilter:
    """Reads a COPY block's data in chunks, writes on the changed rows, notes the keys."""

    def __init__(
        self, sparse: Sparse, columns: Sequence[str], open_sink: Callable[[], Sink]
    ) -> None:
        position = {name: i for i, name in enumerate(columns)}
        self._sparse = sparse
        self._open_sink = open_sink
        self._sink: Sink | None = None
        self._rest = b""
        self._key: Callable[[list[bytes]], bytes]
        self._key_line: Callable[[list[bytes]], bytes]
        key = [position[k] for k in sparse.key]
        if len(key) == 1:
            only = key[0]
            self._key = self._key_line = operator.itemgetter(only)
        else:
            pick_key = operator.itemgetter(*key)
            self._key = lambda fields: record_text(pick_key(fields))
            self._key_line = lambda fields: b"\t".join(pick_key(fields))
        ordered = [position[c] for c in sorted(sparse.columns)]
        pick = operator.itemgetter(*ordered)
        self._row: Callable[[list[bytes]], Sequence[bytes]] = (
            (lambda fields: (pick(fields),)) if len(ordered) == 1 else pick
        )

    def write(self, buffer: bytes) -> None:
        lines = (self._rest + buffer).split(b"\n")
        self._rest = lines.pop()
        sparse, target, removes, sent = (
            self._sparse,
            self._sparse.target,
            self._sparse.removes,
            self._sparse.sent,
        )
        out = []
        sparse.read += len(lines)
        for line in lines:
            fields = line.split(b"\t")
            row = self._row(fields)
            text = record_text(row) if b"\\" in line else _record_text_plain(row)
            key = self._key(fields)
            had = target.pop(key, None)
            if had == digest(text):
                continue
            if had is not None:
                removes.append(key)
            out.append(line)
            sent.append(self._key_line(fields))
        if out:
            out.append(b"")
            if self._sink is None:
                self._sink = self._open_sink()
            self._sink.write(b"\n".join(out))
            sparse.uploaded += len(out) - 1

    def close(self) -> None:
        if self._rest:
            raise ArchiveError("the archive's data ends inside a row: it is damaged")


def copy_recorded(conn: psycopg.Connection, sparse: Sparse) -> None:
    """Stage the target's rows as the record sees them (call in the record's transaction),
    and make the empty side table the changed rows go up into."""
    names = sql.SQL(", ").join(map(sql.Identifier, sparse.columns))
    for statement in (
        "DROP TABLE IF EXISTS {stage}",
        "CREATE TEMP TABLE {stage} AS SELECT {names} FROM {t}",
        "DROP TABLE IF EXISTS {side}",
        "CREATE TEMP TABLE {side} AS SELECT * FROM {stage} WITH NO DATA",
    ):  # one statement each: the caller may send them in a pipeline
        conn.execute(
            sql.SQL(statement).format(
                stage=sparse.stage, names=names, t=sparse.table.ident, side=sparse.side
            )
        )


def download(
    conn: psycopg.Connection, tables: Sequence[Sparse], records: Mapping[TableName, sql.Composable]
) -> None:
    """Fill each table's ``target`` from its record (``records``: its temporary table, with
    the digest column ``c$``), every table in one COPY."""
    if not tables:
        return
    branches = sql.SQL(" UNION ALL ").join(
        sql.SQL("SELECT {n}, {key}, r.c$ FROM {record} AS r").format(
            n=sql.Literal(i), key=s.key_text("r"), record=records[s.table]
        )
        for i, s in enumerate(tables)
    )
    rest = b""
    query = sql.SQL("COPY ({}) TO STDOUT").format(branches)
    with conn.cursor() as cur, cur.copy(query) as copy:
        for chunk in copy:
            lines = (rest + bytes(chunk)).split(b"\n")
            rest = lines.pop()
            for line in lines:
                number, key, hashed = line.split(b"\t")
                # COPY escaped the key's text: for a one-column key that is the dump's own
                # field; a longer key's text is compared unescaped
                sparse = tables[int(number)]
                if len(sparse.key) > 1:
                    key = unescape(key)
                sparse.target[key] = hashed


def _escape_copy(value: bytes) -> bytes:
    """A value as a COPY text field."""
    return (
        value.replace(b"\\", b"\\\\")
        .replace(b"\t", b"\\t")
        .replace(b"\n", b"\\n")
        .replace(b"\r", b"\\r")
    )


GONE = sql.Identifier(
    "pg_temp", "_snapshot_gone"
)  # (n, k): keys of rows the snapshot changes or lacks


def finish(conn: psycopg.Connection, tables: Sequence[Sparse]) -> dict[TableName, int]:
    """Remove the staged rows the snapshot changes or lacks, add its new and changed rows;
    each staged table's row count. A few round trips for all the tables.

    The removed rows' keys stay in :data:`GONE` (by table number): a pre-apply backup
    downloads those rows' versions (snapshot.apply.backup).
    """
    conn.execute(
        sql.SQL("DROP TABLE IF EXISTS {gone}; CREATE TEMP TABLE {gone} (n int, k text)").format(
            gone=GONE
        )
    )
    with conn.cursor() as cur, cur.copy(sql.SQL("COPY {} FROM STDIN").format(GONE)) as copy:
        for changes in tables:
            gone = changes.removes + list(changes.target)
            changes.gone = len(gone)
            if not gone:
                continue
            # a one-column key is already a COPY field; a longer key's text is escaped
            one = len(changes.key) == 1
            prefix = b"%d\t" % changes.number
            copy.write(b"".join(prefix + (k if one else _escape_copy(k)) + b"\n" for k in gone))
    with conn.pipeline():
        counted = []
        for changes in tables:
            if changes.gone:
                conn.execute(
                    sql.SQL("DELETE FROM {} AS s USING {} AS g WHERE g.n = {} AND {} = g.k").format(
                        changes.stage, GONE, sql.Literal(changes.number), changes.key_text("s")
                    )
                )
            if changes.uploaded:
                conn.execute(
                    sql.SQL("INSERT INTO {} SELECT * FROM {}").format(changes.stage, changes.side)
                )
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(changes.side))
            query = sql.SQL("SELECT count(*) FROM {}").format(changes.stage)
            counted.append((changes, conn.execute(query)))
    found = {}
    for changes, cursor in counted:
        log.debug(
            "  %s: %d rows went up, %d staged rows removed",
            changes.table,
            changes.uploaded,
            changes.gone,
        )
        row = cursor.fetchone()
        found[changes.table] = int(row[0]) if row else 0
    return found
