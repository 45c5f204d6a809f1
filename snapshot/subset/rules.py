"""``[subset]`` rules: which tables a take cuts, by a ``where`` clause or a percentage.

Plain data, read by :mod:`snapshot.config` and resolved against a source's catalog by
:mod:`snapshot.subset`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from snapshot.names import TableName

# A percentage keeps the rows whose key hashes below it, in millionths: 10% keeps the rows
# whose hash falls in [0, 100,000) of [0, 1,000,000).
BUCKETS = 1_000_000


@dataclass(frozen=True)
class SubsetRule:
    """The rows of one table a subset starts from: those matching ``where`` (SQL), and of
    them ``percent`` chosen by a hash of their key (both when both are given)."""

    where: str | None = None
    percent: float | None = None

    @property
    def buckets(self) -> int:
        """How many of :data:`BUCKETS` hash values a row may fall in to be kept."""
        return BUCKETS if self.percent is None else round(self.percent * BUCKETS / 100)

    def describe(self) -> str:
        """``10%``, ``where category_id = 3``, or both."""
        parts = []
        if self.percent is not None:
            parts.append(f"{self.percent:g}%")
        if self.where is not None:
            parts.append(f"where {self.where}")
        return " ".join(parts)


@dataclass(frozen=True)
class SubsetSettings:
    """``[subset]``: the rule of each table it names (none: takes keep every row)."""

    tables: Mapping[TableName, SubsetRule] = field(default_factory=dict)

    @property
    def configured(self) -> bool:
        return bool(self.tables)
