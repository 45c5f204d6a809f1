"""Comparing a table on two sides: counts, checksums, and the columns that differ."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from snapshot.checksum import column_checksums
from snapshot.names import TableName
from snapshot.text import count


@dataclass(frozen=True)
class TableParity:
    """One table compared: the source side (snapshot or live source) against the target."""

    table: TableName
    source_rows: int
    target_rows: int
    match: bool
    target_rows_before: int | None = None
    columns: tuple[str, ...] = ()
    ignored: tuple[str, ...] = ()
    kept: int = 0  # target rows the source lacks, kept for rows outside the scope
    kept_for: tuple[str, ...] = ()  # ... the tables (outside, or kept scoped rows) needing them

    @property
    def status(self) -> str:
        """``match``, ``kept N`` (the source's rows and N more kept), or ``DIFFERS``."""
        if not self.match:
            return "DIFFERS"
        return f"kept {self.kept:,}" if self.kept else "match"

    @property
    def detail(self) -> str:
        """Why a table does not match, or what it holds beside the source's rows, in words."""
        parts = []
        if self.match and self.kept:
            parts.append(
                f"the source's rows and {self.kept:,} more kept for {', '.join(self.kept_for)}"
            )
        if not self.match:
            if self.source_rows != self.target_rows:
                parts.append(f"{self.target_rows - self.source_rows:+d} rows")
            if self.columns:
                parts.append("differs in " + ", ".join(self.columns))
            elif self.source_rows == self.target_rows:
                parts.append("same count, other rows")
        if self.ignored:
            parts.append("ignores " + ", ".join(self.ignored))
        return "; ".join(parts)

    def to_json(self) -> dict[str, Any]:
        return {
            "table": str(self.table),
            "source_rows": self.source_rows,
            "target_rows_before": self.target_rows_before,
            "target_rows": self.target_rows,
            "match": self.match,
            "differing_columns": list(self.columns),
            "ignored_columns": list(self.ignored),
            "kept_rows": self.kept,
            "kept_for": list(self.kept_for),
        }


def parity_failure(
    tables: Sequence[TableParity], target: str, *, auth_missing: int = 0
) -> str | None:
    """The error line of an apply or rollback rolled back because its parity check failed:
    each table that differs, with why, and the snapshot's auth users still missing; None
    when everything matches."""
    bad = [f"{t.table}" + (f" ({t.detail})" if t.detail else "") for t in tables if not t.match]
    if auth_missing:
        bad.append(f"auth.users ({count(auth_missing, 'snapshot user')} missing)")
    if not bad:
        return None
    return f"parity check failed for {', '.join(bad)}: rolled back, {target} is unchanged"


def name_columns(
    left: psycopg.Connection,
    left_rel: TableName | sql.Identifier,
    right: psycopg.Connection,
    right_rel: TableName | sql.Identifier,
    columns: Sequence[str],
) -> tuple[str, ...]:
    """The columns whose values differ between two relations (as multisets)."""
    a = column_checksums(left, left_rel, columns)
    b = column_checksums(right, right_rel, columns)
    return tuple(c for c in columns if a[c] != b[c])
