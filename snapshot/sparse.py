"""Staging only the rows that differ: a re-sync sends the server what changed, not whole tables.

The target's rows are already in the server. For a table the target does not hold as the
snapshot does, the apply copies the target's recorded rows into the staged table inside the
server (:func:`copy_recorded`), downloads a 64-bit digest of each target row (8 bytes a
row, no key: :func:`download`), and reads the archive's COPY block locally: a snapshot row
whose digest the target has is staged already; one that is new or differs goes up into a
side table. The target's digests no snapshot row matched are the rows the snapshot changes
or lacks: they go up (one COPY) and the server removes the staged rows with those digests,
then puts the side table's rows in their place (:func:`finish`). The staged table then
holds the snapshot's rows, exactly as a full upload would have it, and the same integrity
check proves it: its count and checksum, computed in the server, must be the manifest's.
When they are not (a digest shared by two rows, say), the table is staged again in full
(the apply does that). An auth table, whose rows the apply never updates, is compared by key
alone (:attr:`Sparse.by_key`): only the logins the target lacks go up.

A table whose first rows (:data:`SAMPLE`) are mostly not the target's as they stand (a first
apply onto a prod that went its own way) goes up whole instead: every row into the side
table, which then replaces the staged copy (no digests removed, nothing deleted); it is
checked and hashed as a full upload is.

Both sides digest the same text: the row's line of COPY text, its columns in the snapshot's
order. Locally that is the archive's line as it stands (its fields put in that order when
the dump wrote them otherwise); the server builds it from each column's text the way COPY
does (:func:`line_sql`: a backslash doubled, the six control characters COPY names
written as ``\\n`` and the like, NULL as ``\\N``, tabs between). So the local work is one
md5 a row, not a rebuilt row text. A row whose text differs only in form (a type the dump
wrote under other settings) is uploaded and then found equal in the server: it costs bytes,
never a wrong row.
"""

from __future__ import annotations

import codecs
import hashlib
import logging
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import psycopg
from psycopg import sql

from snapshot import copytext
from snapshot.checksum import checksum_sql, kind_of
from snapshot.errors import ArchiveError
from snapshot.names import TableName

log = logging.getLogger(__name__)

DIGEST_BYTES = 8  # of a row's md5: what both sides compare
SAMPLE = 2000  # rows read before deciding whether a table goes up whole (LineFilter._decide)
SAME_AT_LEAST = 1 / 3  # of them the target must hold as they stand to send only the others
# The rows a table kept back (the target's as they stand), held while it may still go whole
# after all: when fewer than SAME_AT_LEAST of the rows read so far are the target's
# (LineFilter._held). Past this many bytes the table stays as it is.
HOLD_AT_MOST = 16 * 1024 * 1024
# The rows of a table that go up are held back and sent with finish(), in its one round trip
# (as text parameters: a COPY costs two round trips a table), up to this many rows and
# bytes; past either, the table's rows go by COPY, streamed while the archive is read. Two
# round trips at 30 ms are the time of 750 KB at 100 Mbit/s: more held back would upload
# after the reading what a COPY uploads during it.
UNSENT_AT_MOST = (5_000, 256 * 1024)


def digest(line: bytes) -> bytes:
    """The 64-bit digest both sides compare: the first 8 bytes of the line's md5."""
    return hashlib.md5(line, usedforsecurity=False).digest()[:DIGEST_BYTES]


# Types whose text (their cast to text is their output function's) never holds a backslash
# or a control character: their COPY text is their text (any other type's is escaped in the
# server, which costs more).
_PLAIN_TYPES = frozenset(
    {"smallint", "integer", "bigint", "real", "double precision", "uuid", "date", "oid"}
)
_PLAIN_PREFIXES = ("numeric", "timestamp", "time ", "time(", "interval")
_TEXT_TYPES = ("text", "character varying")  # their value is their text
# What COPY's text format writes for each character it escapes, the backslash first.
_COPY_ESCAPES = (
    ("\\", "\\\\"),
    ("\b", "\\b"),
    ("\f", "\\f"),
    ("\n", "\\n"),
    ("\r", "\\r"),
    ("\t", "\\t"),
    ("\v", "\\v"),
)
_NULL = sql.Literal("\\N")


def _field_sql(column: sql.Composable, type_name: str) -> sql.Composable:
    """One column's COPY text: its output function's text, escaped as COPY escapes it."""
    if type_name in _PLAIN_TYPES or type_name == "time" or type_name.startswith(_PLAIN_PREFIXES):
        return sql.SQL("coalesce({}::text, {})").format(column, _NULL)
    if type_name == "boolean":  # its cast to text says "true", its output "t"
        return sql.SQL("CASE {} WHEN true THEN 't' WHEN false THEN 'f' ELSE {} END").format(
            column, _NULL
        )
    # concat() writes the output function's text (a cast may not: inet's adds a /32,
    # character(n)'s trims); NULL is tested apart (concat makes it '').
    plain = type_name == "text" or type_name.startswith(_TEXT_TYPES[1])
    value: sql.Composable = column if plain else sql.SQL("concat({})").format(column)
    for char, written in _COPY_ESCAPES:
        value = sql.SQL("replace({}, {}, {})").format(
            value, sql.Literal(char), sql.Literal(written)
        )
    if plain:
        return sql.SQL("coalesce({}, {})").format(value, _NULL)
    return sql.SQL("CASE WHEN num_nulls({}) = 1 THEN {} ELSE {} END").format(column, _NULL, value)


def line_sql(alias: str, columns: Sequence[tuple[str, str]]) -> sql.Composable:
    """The server's COPY text line of a row (``columns``: name and type, in the snapshot's
    order), as the archive holds it: what both sides digest (see the module)."""
    fields = [_field_sql(sql.Identifier(alias, name), t) for name, t in columns]
    return sql.SQL("concat_ws({}, {})").format(sql.Literal("\t"), sql.SQL(", ").join(fields))


def digest_sql(line: sql.Composable) -> sql.Composable:
    """The server's :func:`digest` of a row's COPY line (:func:`line_sql`), a bytea."""
    return sql.SQL("substr(decode(md5({}), 'hex'), 1, {})").format(line, sql.Literal(DIGEST_BYTES))


@dataclass
class Sparse:
    """One table staged sparsely: what the target holds, and what the snapshot changes."""

    table: TableName
    number: int
    stage: sql.Identifier
    record: sql.Identifier  # the target's record: key and digest (``c$``) of each row
    key: tuple[str, ...]
    columns: tuple[str, ...]  # the snapshot's columns: digested in this order
    # the digests of the target's rows no snapshot row matched yet; once the snapshot's
    # rows are read, those of the rows it changes or lacks (removed from the staged table)
    target: set[bytes] = field(default_factory=set)
    # the keys of the rows that went up, as COPY lines of the key columns (what a pre-apply
    # backup removes from the snapshot's rows, snapshot.apply.backup)
    sent: list[bytes] = field(default_factory=list)
    gone: int = 0  # staged rows removed (their digests stay in :data:`GONE`)
    uploaded: int = 0
    read: int = 0  # the snapshot's rows read (all of them, whether they went up or not)
    seen: bool = False  # a COPY block of the table was read
    # Rows to go up that were held back, no COPY opened for them (:data:`UNSENT_AT_MOST`):
    # each block's columns (the dump's order) and lines. They go up with :func:`finish`'s
    # other statements, in its one round trip, where each COPY would cost two.
    unsent: list[tuple[tuple[str, ...], list[bytes]]] = field(default_factory=list)
    unsent_rows: int = 0
    unsent_bytes: int = 0
    # None until the first rows are read (:data:`SAMPLE`); then whether the table is staged
    # whole after all: every row goes up, as a full upload would send it (:class:`LineFilter`)
    whole: bool | None = None
    # the digests are of the key alone (the record's ``c$`` too): only the rows whose key the
    # target lacks go up, the target's own versions of the others stay staged. For auth
    # tables, whose rows the apply only ever inserts: the staged table then holds the
    # snapshot's keys, its rows where the target lacks them, and only its count can be
    # proven (not its checksum)
    by_key: bool = False

    @property
    def side(self) -> sql.Identifier:
        """The temporary table the snapshot's new and changed rows go up into."""
        return sql.Identifier("pg_temp", f"_snapshot_a{self.number}")

    def gone_rows(self, alias: str) -> sql.Composable:
        """A condition on rows of the table (as ``alias``): the target's rows the snapshot
        changes or lacks (their digests in :data:`GONE`, after :func:`finish`)."""
        return sql.SQL(
            "EXISTS (SELECT 1 FROM {record} AS r JOIN {gone} AS g ON g.d = r.c$ "
            "AND g.n = {n} WHERE {on})"
        ).format(
            record=self.record,
            gone=GONE,
            n=sql.Literal(self.number),
            on=sql.SQL(" AND ").join(
                sql.SQL("{} = {}").format(sql.Identifier("r", k), sql.Identifier(alias, k))
                for k in self.key
            ),
        )

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
        self._columns = tuple(columns)
        self._open_sink = open_sink
        self._sink: Sink | None = None
        self._unsent: list[bytes] = []  # held back: no COPY opened yet (Sparse.unsent)
        self._rest = b""
        self._sample: list[bytes] = []  # the first rows, until the table's mode is decided
        # Rows kept back as the target's, while the table may still go whole (None: it no
        # longer may); how many bytes; how many rows were compared and how many matched.
        self._held: list[bytes] | None = [] if not sparse.by_key else None
        self._held_bytes = 0
        self._compared = 0
        self._same = 0
        key = [position[k] for k in sparse.key]
        pick_key = operator.itemgetter(*key)
        # a key's COPY line (its fields, tab apart): only for the rows that go up
        self._key_line: Callable[[bytes], bytes] = (
            (lambda line: line[: line.find(b"\t")] if b"\t" in line else line)
            if key == [0]
            else (lambda line: line.split(b"\t")[key[0]])
            if len(key) == 1
            else (lambda line: b"\t".join(pick_key(line.split(b"\t"))))
        )
        ordered = [position[c] for c in sparse.columns]
        # The archive's line as it stands, or its fields in the snapshot's order (its key's
        # alone, by_key).
        self._line: Callable[[bytes], bytes] | None = None
        if sparse.by_key:
            self._line = self._key_line
        elif ordered != list(range(len(columns))):
            pick = operator.itemgetter(*ordered)
            self._line = (
                (lambda line: line.split(b"\t")[ordered[0]])
                if len(ordered) == 1
                else (lambda line: b"\t".join(pick(line.split(b"\t"))))
            )

    def write(self, buffer: bytes) -> None:
        lines = (self._rest + buffer).split(b"\n")
        self._rest = lines.pop()
        sparse = self._sparse
        sparse.read += len(lines)
        if sparse.whole is None:  # the first rows wait for the decision (see _decide)
            self._sample += lines
            if len(self._sample) < SAMPLE:
                return
            lines, self._sample = self._sample, []
            self._decide(lines)
        if sparse.whole:
            self._send(lines)
            return
        target = sparse.target
        out = []
        held, kept = self._held, 0
        reorder, md5, size = self._line, hashlib.md5, DIGEST_BYTES
        for line in lines:
            text = line if reorder is None else reorder(line)
            found = md5(text, usedforsecurity=False).digest()[:size]
            if found in target:
                target.discard(found)  # the target holds this row as it is
                if held is not None:
                    held.append(line)
                    kept += len(line)
                continue
            out.append(line)
        if out:
            key_line = self._key_line
            sparse.sent.extend(key_line(line) for line in out)
            self._send(out)
        if held is not None:
            self._compared += len(lines)
            self._same += len(lines) - len(out)
            self._held_bytes += kept
            self._reconsider()

    def _reconsider(self) -> None:
        """Send the table whole after all when, past its first rows, fewer than
        :data:`SAME_AT_LEAST` of the rows read so far are the target's: the rows kept back
        go up now, and every row after them. Past :data:`HOLD_AT_MOST` bytes kept back it
        stays sparse (the rows held are let go)."""
        assert self._held is not None
        if self._compared >= SAMPLE and self._same < SAME_AT_LEAST * self._compared:
            held, self._held = self._held, None
            self._sparse.whole = True
            log.debug(
                "  %s: %d of its first %d rows are the target's: it goes up whole after all",
                self._sparse.table,
                self._same,
                self._compared,
            )
            self._send(held)
        elif self._held_bytes > HOLD_AT_MOST:
            self._held = None

    def _decide(self, lines: Sequence[bytes]) -> None:
        """Whether the table goes up whole: when fewer than :data:`SAME_AT_LEAST` of its first
        rows are the target's as they stand (a first apply onto a prod that went its own
        way), sending only the others would save few bytes and cost the server more: the
        staged copy of the target's rows emptied of most of them, the new ones added. The
        first rows stand for the rest; a wrong guess costs time, never a wrong row."""
        reorder, size = self._line, DIGEST_BYTES
        same = sum(
            hashlib.md5(line if reorder is None else reorder(line), usedforsecurity=False).digest()[
                :size
            ]
            in self._sparse.target
            for line in lines
        )
        self._sparse.whole = len(lines) > 0 and same < SAME_AT_LEAST * len(lines)
        if self._sparse.whole:
            log.debug(
                "  %s: %d of its first %d rows are the target's: it goes up whole",
                self._sparse.table,
                same,
                len(lines),
            )

    def _send(self, lines: list[bytes]) -> None:
        if not lines:
            return
        sparse = self._sparse
        sparse.uploaded += len(lines)
        if self._sink is None:
            size = sum(map(len, lines))
            rows, at_most = sparse.unsent_rows + len(lines), UNSENT_AT_MOST
            if rows <= at_most[0] and sparse.unsent_bytes + size <= at_most[1]:
                self._unsent += lines
                sparse.unsent_rows, sparse.unsent_bytes = rows, sparse.unsent_bytes + size
                return
            self._sink = self._open_sink()
            sparse.unsent_rows -= len(self._unsent)
            sparse.unsent_bytes -= sum(map(len, self._unsent))
            lines, self._unsent = self._unsent + lines, []
        self._sink.write(b"\n".join(lines) + b"\n")  # the caller's list stays as it is

    def close(self) -> None:
        if self._rest:
            raise ArchiveError("the archive's data ends inside a row: it is damaged")
        if self._sample:  # a table smaller than the sample: decided on all its rows
            lines, self._sample = self._sample, []
            self._decide(lines)
            self.write(b"\n".join(lines) + b"\n")
            self._sparse.read -= len(lines)  # counted once, when first read
        if self._unsent:
            self._sparse.unsent.append((self._columns, self._unsent))
            self._unsent = []


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


def digests_unless_later(
    conn: psycopg.Connection, record: sql.Identifier, rows: int, checksum: str
) -> Callable[[], tuple[int, str, set[bytes]]]:
    """A record's count, its sums (``"sum1:sum2"``) and the digests of its rows (column
    ``c$``), those only when the count and checksum are not ``rows`` and ``checksum`` (a
    table that adds up holds the snapshot's rows and is staged from itself: nothing to
    compare), decided in the server. Asked in the caller's pipeline right after the record
    is made, so that their download runs while the server makes the next records; read when
    called."""
    made = checksum_sql(sql.SQL("q.n::text"), sql.SQL("q.s"), kind_of(checksum))
    cursor = conn.execute(
        sql.SQL(
            "SELECT q.n, q.s, CASE WHEN q.n = {rows} AND {made} = {checksum} THEN NULL "
            "ELSE (SELECT string_agg(c$, ''::bytea) FROM {record}) END FROM (SELECT count(*) "
            "AS n, coalesce(sum(h1$), 0)::text || ':' || coalesce(sum(h2$), 0)::text AS s "
            "FROM {record}) AS q"
        ).format(rows=sql.Literal(rows), made=made, checksum=sql.Literal(checksum), record=record),
        binary=True,
    )

    def result() -> tuple[int, str, set[bytes]]:
        row = cursor.fetchone()
        assert row is not None
        return int(row[0]), str(row[1]), _split(bytes(row[2]) if row[2] is not None else b"")

    return result


def _split(blob: bytes) -> set[bytes]:
    size = DIGEST_BYTES
    return {blob[i : i + size] for i in range(0, len(blob), size)}


def download_later(conn: psycopg.Connection, tables: Sequence[Sparse]) -> Callable[[], None]:
    """Fill each table's ``target`` with the digests of its record (column ``c$``), 8 bytes
    a row and no key: asked now (in the caller's pipeline, binary), filled when called."""
    asked = [
        conn.execute(
            sql.SQL("SELECT string_agg(c$, ''::bytea) FROM {}").format(s.record), binary=True
        )
        for s in tables
    ]

    def fill() -> None:
        for sparse, cursor in zip(tables, asked, strict=True):
            row = cursor.fetchone()
            sparse.target = _split(bytes(row[0]) if row and row[0] is not None else b"")

    return fill


GONE = sql.Identifier("pg_temp", "_snapshot_gone")  # (n, d): digests of rows the snapshot
# changes or lacks, by table number


def finish(
    conn: psycopg.Connection,
    tables: Sequence[Sparse],
    refused: Callable[[TableName, psycopg.Error], Exception],
) -> dict[TableName, int]:
    """Remove the staged rows the snapshot changes or lacks, add its new and changed rows;
    each staged table's row count. One round trip for all the tables, with the rows held
    back (:attr:`Sparse.unsent`) and the digests of those removed. The side tables stay:
    the staged rows are hashed from them and the record
    (:func:`snapshot.apply.rows.hash_sparse`).

    The removed rows' digests stay in :data:`GONE` (by table number): a pre-apply backup
    downloads those rows' versions (:meth:`Sparse.gone_rows`, snapshot.apply.backup).

    A row the target's types refuse fails the round trip, which changed nothing; the rows
    held back then go up by COPY, whose error names the row and the column, and
    ``refused`` makes it the error raised.
    """
    utf8 = codecs.lookup(conn.info.encoding).name == "utf-8"
    held: dict[TableName, list[str]] = {}
    for changes in tables:
        if not changes.unsent:
            continue
        values = _row_values(changes) if utf8 else None
        if values is None:  # not UTF-8: COPY says what the server makes of the bytes
            _copy_unsent(conn, changes, refused)
        else:
            held[changes.table] = values
    try:
        return _finish(conn, tables, held)
    except psycopg.OperationalError:
        raise
    except psycopg.Error:
        if not held:
            raise
    for changes in tables:  # the round trip failed as a whole: nothing of it stayed
        if changes.unsent:
            _copy_unsent(conn, changes, refused)
    return _finish(conn, tables, {})


def _finish(
    conn: psycopg.Connection, tables: Sequence[Sparse], held: Mapping[TableName, list[str]]
) -> dict[TableName, int]:
    """:func:`finish`'s round trip; the rows held back go up in it (``held``: by table, the
    text of each as a row of its side table)."""
    whole = [changes for changes in tables if changes.whole]
    tables = [changes for changes in tables if not changes.whole]
    gone = [changes for changes in tables if changes.target]
    with conn.pipeline():
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(GONE))
        conn.execute(sql.SQL("CREATE TEMP TABLE {} (n int, d bytea)").format(GONE))
        if gone:  # each table's digests as one string of them, cut up in the server
            conn.execute(
                sql.SQL(
                    "INSERT INTO {} SELECT u.n, substr(u.b, {size} * i + 1, {size}) "
                    "FROM unnest(%s::int[], %s::bytea[]) AS u(n, b), "
                    "generate_series(0, length(u.b) / {size} - 1) AS i"
                ).format(GONE, size=sql.Literal(DIGEST_BYTES)),
                [[c.number for c in gone], [b"".join(c.target) for c in gone]],
            )
        for changes in (*whole, *tables):
            if changes.table in held:
                conn.execute(
                    sql.SQL(
                        "INSERT INTO {side} SELECT (q.r).* FROM (SELECT CAST(u.l AS {side}) "
                        "AS r FROM unnest(%s::text[]) AS u(l) OFFSET 0) AS q"
                    ).format(side=changes.side),
                    [held[changes.table]],
                )
        counted = []
        for changes in whole:  # every row went up into the side table: it is the staged one
            conn.execute(sql.SQL("DROP TABLE {}").format(changes.stage))
            conn.execute(
                sql.SQL("ALTER TABLE {} RENAME TO {}").format(
                    changes.side, sql.Identifier(changes.table.staging)
                )
            )
            query = sql.SQL("SELECT count(*) FROM {}").format(changes.stage)
            counted.append((changes, conn.execute(query)))
        for changes in tables:
            changes.gone = len(changes.target)
            if changes.gone:
                conn.execute(
                    sql.SQL("DELETE FROM {} AS s WHERE {}").format(
                        changes.stage, changes.gone_rows("s")
                    )
                )
            if changes.uploaded:
                conn.execute(
                    sql.SQL("INSERT INTO {} SELECT * FROM {}").format(changes.stage, changes.side)
                )
            query = sql.SQL("SELECT count(*) FROM {}").format(changes.stage)
            counted.append((changes, conn.execute(query)))
    for changes in (*whole, *tables):
        if changes.table in held:
            changes.unsent = []
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


def _row_values(changes: Sparse) -> list[str] | None:
    """The rows held back, each as the text of a row of its side table (whose columns are
    the snapshot's, in its order), made from the bytes as UTF-8 keeps them; None when they
    are not UTF-8."""
    values = []
    for columns, lines in changes.unsent:
        position = {name: i for i, name in enumerate(columns)}
        pick = operator.itemgetter(*(position[c] for c in changes.columns))
        for line in lines:
            fields = line.split(b"\t")
            chosen = pick(fields) if len(changes.columns) > 1 else (pick(fields),)
            try:
                values.append(copytext.row_literal(chosen).decode())
            except UnicodeDecodeError:
                return None
    return values


def _copy_unsent(
    conn: psycopg.Connection,
    changes: Sparse,
    refused: Callable[[TableName, psycopg.Error], Exception],
) -> None:
    """Send a table's rows held back by COPY, as they would have gone."""
    try:
        for columns, lines in changes.unsent:
            names = sql.SQL(", ").join(map(sql.Identifier, columns))
            with conn.cursor() as cur:
                query = sql.SQL("COPY {} ({}) FROM STDIN").format(changes.side, names)
                with cur.copy(query) as copy:
                    copy.write(b"".join(line + b"\n" for line in lines))
    except psycopg.OperationalError:
        raise
    except psycopg.Error as exc:
        raise refused(changes.table, exc) from None
    changes.unsent = []
