"""The scope: the one list of tables that ``take`` archives, ``apply`` replaces and ``verify``
compares, and whether auth users come along.

It lives apart from the parsing of ``snapshot.toml`` (:mod:`snapshot.config`) because every
manifest records the scope it was taken with (:mod:`snapshot.manifest`), and the archive
sits below the configuration: the configuration asks the archive which environments it
holds, never the other way round.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from snapshot.names import TableName

# Without snapshot.toml the scope is the bundled example app's (config.DEFAULT_TABLES): what
# to do when it does not fit the database.
NO_CONFIG_FIX = (
    "there is no snapshot.toml, so the scope is the bundled example app's: run "
    "'snapshot init' to write one from dev's own tables"
)


@dataclass(frozen=True)
class Scope:
    """The tables that take, apply and verify share, and whether auth users come along."""

    tables: tuple[TableName, ...]
    auth_users: bool = True
    # False when no snapshot.toml set it (the defaults): messages then suggest `init`
    configured: bool = field(default=True, compare=False)

    def fix(self, change: str) -> str:
        """How to fix the scope: ``change`` (in snapshot.toml), or without one, ``init``."""
        return change if self.configured else NO_CONFIG_FIX

    def to_json(self) -> dict[str, Any]:
        return {"tables": [str(t) for t in self.tables], "auth_users": self.auth_users}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Scope:
        return cls(
            tables=tuple(TableName.parse(t) for t in data["tables"]),
            auth_users=bool(data["auth_users"]),
        )
