"""A snapshot's manifest: what it holds and where it came from, as ``manifest.json``.

The manifest is the record every command believes about a snapshot: its scope, each
table's rows, checksum and columns, the owned sequences' values, the source's identity
(to refuse syncing a database onto itself) and the sha256 of every file beside it. Its
JSON lives here, apart from the folders that hold it (:mod:`snapshot.archive`: pending,
sealed, published, swept), so a reader of the format finds it in one place. A manifest of
another format version is refused with a sentence, never half-read.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from snapshot import __version__
from snapshot.catalog import Column, OwnedSequence
from snapshot.errors import ArchiveError, ConfigError
from snapshot.names import TableName
from snapshot.scope import Scope

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DUMP_FILE = "data.dump"


@dataclass(frozen=True)
class DatabaseIdentity:
    """Where a snapshot came from, to refuse syncing a database onto itself."""

    host: str
    port: int
    dbname: str
    system_identifier: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "port": self.port,
            "dbname": self.dbname,
            "system_identifier": self.system_identifier,
        }


def same_database(
    a: DatabaseIdentity, a_ref: str | None, b: DatabaseIdentity, b_ref: str | None
) -> list[str]:
    """The reasons to believe two identities are one database (empty when they differ)."""
    reasons = []
    if a_ref and b_ref and a_ref == b_ref:
        reasons.append(f"project ref {a_ref}")
    if (a.host, a.port, a.dbname) == (b.host, b.port, b.dbname):
        reasons.append(f"connection {a.host}:{a.port}/{a.dbname}")
    if a.system_identifier and a.system_identifier == b.system_identifier and a.dbname == b.dbname:
        reasons.append(f"database {a.dbname} on system {a.system_identifier}")
    return reasons


@dataclass(frozen=True)
class Masking:
    """How a masked snapshot was masked: its rules, the key's fingerprint (never the key),
    and the file holding the masked tables' rows (:mod:`snapshot.masking`)."""

    rules: tuple[tuple[str, str], ...]  # (column, rule): ("public.users.email", "email")
    key_fingerprint: str
    file: str
    tables: tuple[str, ...]  # the tables whose rows are in ``file``, not in the dump

    def describe(self) -> str:
        """What a report says of a masked snapshot: by which rules, under which key."""
        masked = [f"{column} {rule}" for column, rule in self.rules if rule != "keep"]
        kept = len(self.rules) - len(masked)
        also = f"; {kept} kept as they are" if kept else ""
        return (
            f"masked snapshot (key {self.key_fingerprint}): "
            f"{', '.join(masked) or 'no column masked'}{also}"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "rules": dict(self.rules),
            "key_fingerprint": self.key_fingerprint,
            "file": self.file,
            "tables": list(self.tables),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Masking:
        return cls(
            rules=tuple((str(k), str(v)) for k, v in dict(data["rules"]).items()),
            key_fingerprint=str(data["key_fingerprint"]),
            file=str(data["file"]),
            tables=tuple(str(t) for t in data["tables"]),
        )


@dataclass(frozen=True)
class SubsetTable:
    """One table of a subsetted snapshot: the rows kept of the source's."""

    table: str
    kept: int
    total: int

    def describe(self) -> str:
        """``public.question_attempts kept 10,012 of 100,120``."""
        return f"{self.table} kept {self.kept:,} of {self.total:,}"


@dataclass(frozen=True)
class Subset:
    """How a subsetted snapshot was cut (:mod:`snapshot.subset`): its rules, the file holding
    the subsetted tables' rows, and per table the rows kept of the source's."""

    rules: tuple[tuple[str, str], ...]  # (table, rule): ("public.question_attempts", "10%")
    file: str
    tables: tuple[SubsetTable, ...]  # the tables whose rows are in ``file``, not in the dump

    def describe(self) -> str:
        """What a report says of a subsetted snapshot: by which rules, what each table kept."""
        rules = ", ".join(f"{table} {rule}" for table, rule in self.rules)
        kept = "; ".join(t.describe() for t in self.tables)
        return f"subsetted snapshot ({rules}): {kept}"

    def to_json(self) -> dict[str, Any]:
        return {
            "rules": dict(self.rules),
            "file": self.file,
            "tables": {t.table: {"kept": t.kept, "total": t.total} for t in self.tables},
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Subset:
        return cls(
            rules=tuple((str(k), str(v)) for k, v in dict(data["rules"]).items()),
            file=str(data["file"]),
            tables=tuple(
                SubsetTable(str(t), int(v["kept"]), int(v["total"]))
                for t, v in dict(data["tables"]).items()
            ),
        )


@dataclass(frozen=True)
class TableEntry:
    """A table in a snapshot: its rows, checksum and schema fingerprint."""

    table: TableName
    rows: int
    checksum: str
    columns: tuple[Column, ...]
    generated: tuple[str, ...] = ()
    auth: bool = False

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)

    def to_json(self) -> dict[str, Any]:
        return {
            "table": str(self.table),
            "schema": self.table.schema,
            "name": self.table.name,
            "rows": self.rows,
            "checksum": self.checksum,
            "columns": [c.to_json() for c in self.columns],
            "generated": list(self.generated),
            "auth": self.auth,
        }


@dataclass(frozen=True)
class Manifest:
    """Everything known about a snapshot; ``manifest.json`` on disk."""

    environment: str
    kind: str
    created: str
    label: str | None
    project_ref: str | None
    server_version: str
    pg_dump_version: str
    database: DatabaseIdentity
    scope: Scope
    tables: tuple[TableEntry, ...]
    sequences: tuple[OwnedSequence, ...]
    dump_file: str = DUMP_FILE
    applies: str | None = None
    migrations: tuple[str, ...] | None = None
    files: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    format: int = FORMAT_VERSION
    tool_version: str = __version__
    # Whether the source environment was marked safe when taken; None in older manifests.
    source_safe: bool | None = None
    # How the snapshot was masked; None: its rows are the source's as they were.
    masking: Masking | None = None
    # How the snapshot was subsetted; None: it holds every row of its tables.
    subset: Subset | None = None

    @property
    def beside_dump(self) -> frozenset[TableName]:
        """The tables whose rows are in files beside the dump (masked, subsetted), not in it."""
        masked = self.masking.tables if self.masking else ()
        cut = [t.table for t in self.subset.tables] if self.subset else []
        return frozenset(TableName.parse(t) for t in (*masked, *cut))

    @property
    def row_files(self) -> tuple[str, ...]:
        """The files of ``REPLACE`` blocks beside the dump, each once (masked, subsetted)."""
        files = [self.masking.file if self.masking else "", self.subset.file if self.subset else ""]
        return tuple(dict.fromkeys(f for f in files if f))

    @property
    def scope_tables(self) -> tuple[TableEntry, ...]:
        return tuple(t for t in self.tables if not t.auth)

    def table(self, name: TableName) -> TableEntry | None:
        return next((t for t in self.tables if t.table == name), None)

    @property
    def total_rows(self) -> int:
        return sum(t.rows for t in self.scope_tables)

    @property
    def size(self) -> int:
        return sum(int(f["bytes"]) for f in self.files.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "tool_version": self.tool_version,
            "kind": self.kind,
            "created": self.created,
            "environment": self.environment,
            "source_safe": self.source_safe,
            "label": self.label,
            "project_ref": self.project_ref,
            "server_version": self.server_version,
            "pg_dump_version": self.pg_dump_version,
            "database": self.database.to_json(),
            "applies": self.applies,
            "migrations": list(self.migrations) if self.migrations is not None else None,
            "scope": self.scope.to_json(),
            "dump": {"file": self.dump_file, "format": "custom"},
            "tables": [t.to_json() for t in self.tables],
            "sequences": [s.to_json() for s in self.sequences],
            "files": {k: dict(v) for k, v in self.files.items()},
            **({"masking": self.masking.to_json()} if self.masking else {}),
            **({"subset": self.subset.to_json()} if self.subset else {}),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Manifest:
        fmt = data.get("format")
        if fmt != FORMAT_VERSION:
            raise ArchiveError(
                f"manifest format {fmt!r} is not one this version reads ({FORMAT_VERSION}): "
                "use the snapshot version that wrote it"
            )
        db = data["database"]
        source_safe = data.get("source_safe")
        if source_safe is not None and not isinstance(source_safe, bool):
            raise ValueError(f"source_safe is {source_safe!r}, not true, false or null")
        return cls(
            format=fmt,
            tool_version=data["tool_version"],
            kind=data["kind"],
            created=data["created"],
            environment=data["environment"],
            source_safe=source_safe,
            label=data.get("label"),
            project_ref=data.get("project_ref"),
            server_version=data["server_version"],
            pg_dump_version=data["pg_dump_version"],
            database=DatabaseIdentity(
                db["host"], int(db["port"]), db["dbname"], db.get("system_identifier")
            ),
            applies=data.get("applies"),
            migrations=tuple(data["migrations"]) if data.get("migrations") is not None else None,
            scope=Scope.from_json(data["scope"]),
            dump_file=data["dump"]["file"],
            tables=tuple(
                TableEntry(
                    table=_table_of(t),
                    rows=int(t["rows"]),
                    checksum=t["checksum"],
                    columns=tuple(
                        Column(c["name"], c["type"], bool(c["not_null"])) for c in t["columns"]
                    ),
                    generated=tuple(t.get("generated", ())),
                    auth=bool(t.get("auth", False)),
                )
                for t in data["tables"]
            ),
            sequences=tuple(
                OwnedSequence(
                    TableName.parse(s["sequence"]),
                    TableName.parse(s["table"]),
                    s["column"],
                    int(s["last_value"]),
                    bool(s["is_called"]),
                    int(s["increment"]),
                    int(s["start"]),
                )
                for s in data["sequences"]
            ),
            files=data.get("files", {}),
            masking=Masking.from_json(data["masking"]) if data.get("masking") else None,
            subset=Subset.from_json(data["subset"]) if data.get("subset") else None,
        )


def _table_of(data: Mapping[str, Any]) -> TableName:
    """A manifest's table: its separate schema and name fields, else its quoted text."""
    if "schema" in data and "name" in data:
        return TableName(str(data["schema"]), str(data["name"]))
    return TableName.parse(str(data["table"]))


def manifest_text(manifest: Manifest) -> str:
    """``manifest.json`` as written: indented JSON and a final newline."""
    return json.dumps(manifest.to_json(), indent=2) + "\n"


def write_manifest(folder: Path, manifest: Manifest) -> None:
    """Write ``folder/manifest.json`` once (never over another) and sync it to disk.

    On a full disk the half-written file is removed before the ``OSError`` goes up, so the
    folder holds no manifest and stays unsealed.
    """
    target = folder / MANIFEST
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(manifest_text(manifest))
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            target.unlink(missing_ok=True)
        raise


def read_manifest(folder: Path) -> Manifest:
    """Load ``folder/manifest.json``; any defect is an :class:`ArchiveError` saying which."""
    path = folder / MANIFEST
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ArchiveError(f"{folder} has no {MANIFEST}: it is not a complete snapshot") from None
    except (ValueError, UnicodeDecodeError):
        raise ArchiveError(f"{path} is not valid JSON: the snapshot is damaged") from None
    except OSError as exc:
        raise ArchiveError(f"{path} cannot be read ({exc.strerror or exc})") from None
    if not isinstance(data, dict):
        raise ArchiveError(f"{path} is not a manifest: the snapshot is damaged")
    try:
        return Manifest.from_json(data)
    except ArchiveError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, ConfigError) as exc:
        reason = f"lacks {exc}" if isinstance(exc, KeyError) else f"garbles a field ({exc})"
        raise ArchiveError(f"{path} {reason}: the snapshot is damaged") from None
