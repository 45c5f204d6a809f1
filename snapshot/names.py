"""Qualified table names, parsed once, printed so that they parse back, composed safely into SQL.

PostgreSQL's rules: an unquoted identifier folds to lower case (ASCII letters only); a
double-quoted one keeps its case, spaces, dots and doubled quotes. ``str()`` quotes every
part that would not survive unquoted, so ``TableName.parse(str(t)) == t`` for every legal
name (``public.questions``, ``public."User"``, ``"App Data"."Ünïcode"``).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from psycopg import sql

from snapshot.errors import ConfigError

_PART = r'(?:"(?:[^"]|"")+"|[^."\s]+)'
_DOTTED = re.compile(rf"^{_PART}(?:\.{_PART})*$")
_PARTS = re.compile(_PART)
_PLAIN = re.compile(r"^[a-z_][a-z0-9_$]*$")
# Words PostgreSQL reserves (pg_get_keywords() catcode R and T, PostgreSQL 15): a table or
# column named so must be quoted to parse, e.g. in a printed CREATE INDEX or GRANT.
_RESERVED_WORDS = """
    all analyse analyze and any array as asc asymmetric authorization binary both case
    cast check collate collation column concurrently constraint create cross
    current_catalog current_date current_role current_schema current_time
    current_timestamp current_user default deferrable desc distinct do else end except
    false fetch for foreign freeze from full grant group having ilike in initially inner
    intersect into is isnull join lateral leading left like limit localtime localtimestamp
    natural not notnull null offset on only or order outer overlaps placing primary
    references returning right select session_user similar some symmetric table
    tablesample then to trailing true union unique user using variadic verbose when where
    window with
"""
_RESERVED = frozenset(_RESERVED_WORDS.split())
# PostgreSQL truncates identifiers to NAMEDATALEN - 1 bytes.
MAX_IDENTIFIER_BYTES = 63


def fold(part: str) -> str:
    """An identifier as PostgreSQL stores it: quoted parts verbatim, unquoted ones ASCII-lowered."""
    if part.startswith('"'):
        return part[1:-1].replace('""', '"')
    return part.translate(_ASCII_LOWER)


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def quote(name: str) -> str:
    """``name`` as it must be written to parse back to itself (quoted only when needed)."""
    if _PLAIN.match(name) and name not in _RESERVED:
        return name
    return '"' + name.replace('"', '""') + '"'


def split_dotted(text: str, what: str) -> list[str]:
    """The folded parts of a dotted name (``a.b``, ``"A b".c``); a ConfigError otherwise."""
    text = text.strip()
    if not text or not _DOTTED.match(text):
        raise ConfigError(f"{text!r} is not {what}")
    return [fold(p) for p in _PARTS.findall(text)]


@dataclass(frozen=True, order=True)
class TableName:
    """A schema-qualified table name, e.g. ``public.questions``."""

    schema: str
    name: str

    @classmethod
    def parse(cls, text: str, default_schema: str = "public") -> TableName:
        """Parse ``table`` or ``schema.table`` (SQL rules: unquoted parts fold to lower case)."""
        what = "a table name: write 'table' or 'schema.table' (quote mixed case: 'public.\"User\"')"
        parts = split_dotted(text, what)
        if len(parts) == 1:
            return cls(default_schema, parts[0])
        if len(parts) == 2:
            return cls(parts[0], parts[1])
        raise ConfigError(f"{text.strip()!r} is not {what}")

    def __str__(self) -> str:
        return f"{quote(self.schema)}.{quote(self.name)}"

    @property
    def ident(self) -> sql.Identifier:
        """The name as a SQL identifier, quoted as needed."""
        return sql.Identifier(self.schema, self.name)

    @property
    def staging(self) -> str:
        """Name of the temporary table holding the snapshot's rows during an apply.

        ``snapshot_<table>`` for public tables, ``snapshot_<schema>_<table>`` otherwise;
        a name longer than PostgreSQL's 63 bytes is cut and given a hash of the full name,
        so that two long names never meet in one truncated identifier.
        """
        base = (
            f"snapshot_{self.name}"
            if self.schema == "public"
            else (f"snapshot_{self.schema}_{self.name}")
        )
        if len(base.encode()) <= MAX_IDENTIFIER_BYTES:
            return base
        digest = hashlib.sha256(f"{self.schema}\0{self.name}".encode()).hexdigest()[:8]
        cut = base.encode()[: MAX_IDENTIFIER_BYTES - 9].decode("utf-8", "ignore")
        return f"{cut}_{digest}"


AUTH_USERS = TableName("auth", "users")
AUTH_IDENTITIES = TableName("auth", "identities")
AUTH_TABLES = (AUTH_USERS, AUTH_IDENTITIES)
