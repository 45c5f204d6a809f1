"""Qualified table names, parsed once and composed safely into SQL."""

from __future__ import annotations

import re
from dataclasses import dataclass

from psycopg import sql

from snapshot.errors import ConfigError

_PART = r'(?:"(?:[^"]|"")+"|[^."\s]+)'
_QUALIFIED = re.compile(rf"^({_PART})(?:\.({_PART}))?$")


def _unquote(part: str) -> str:
    if part.startswith('"'):
        return part[1:-1].replace('""', '"')
    return part.lower()


@dataclass(frozen=True, order=True)
class TableName:
    """A schema-qualified table name, e.g. ``public.questions``."""

    schema: str
    name: str

    @classmethod
    def parse(cls, text: str, default_schema: str = "public") -> TableName:
        """Parse ``table`` or ``schema.table`` (SQL rules: unquoted parts fold to lower case)."""
        match = _QUALIFIED.match(text.strip())
        if not match:
            raise ConfigError(
                f"{text!r} is not a table name: write 'table' or 'schema.table' in snapshot.toml"
            )
        first, second = match.groups()
        if second is None:
            return cls(default_schema, _unquote(first))
        return cls(_unquote(first), _unquote(second))

    def __str__(self) -> str:
        return f"{self.schema}.{self.name}"

    @property
    def ident(self) -> sql.Identifier:
        """The name as a SQL identifier, quoted as needed."""
        return sql.Identifier(self.schema, self.name)

    @property
    def staging(self) -> str:
        """Name of the temporary table holding the snapshot's rows during an apply."""
        if self.schema == "public":
            return f"snapshot_{self.name}"
        return f"snapshot_{self.schema}_{self.name}"


AUTH_USERS = TableName("auth", "users")
AUTH_IDENTITIES = TableName("auth", "identities")
AUTH_TABLES = (AUTH_USERS, AUTH_IDENTITIES)
