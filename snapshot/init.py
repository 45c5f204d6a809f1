"""``snapshot init``: a ``snapshot.toml`` that works as it stands for the app it is run in.

When dev's env file answers, the scope is read from dev: every table of its app schemas
in foreign-key order (partitions and extensions' tables left out), auth users where
Supabase Auth's tables exist, and the bundled app's guardrail setting (``insert_as``) only
where its column exists. Otherwise the bundled example app's commented template is written,
and the file and the command say why.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace
from pathlib import Path

import psycopg

from snapshot import catalog
from snapshot.config import (
    CONFIG_FILE,
    DEFAULT_INSERT_AS,
    TEMPLATE,
    ColumnRef,
    Config,
    Proposal,
    load_config,
    parse_config,
    render_config,
)
from snapshot.db import connect
from snapshot.environments import resolve_connection
from snapshot.errors import ConfigError, Refused, SnapshotError
from snapshot.names import AUTH_TABLES
from snapshot.project import find_root

SOURCE = "dev"  # the environment init reads the app's tables from


def write_config(path: Path | None, *, force: bool) -> tuple[Path, Proposal]:
    """Write ``snapshot.toml`` at ``path`` (default: in the project root) for this app, and
    say where and what; an existing file is kept unless ``force``."""
    if path is None:
        root = find_root(Path.cwd())
        path = root.config or root.folder / CONFIG_FILE
    if path.exists() and not force:
        raise ConfigError(f"{path} already exists: edit it, or pass --force to overwrite it")
    proposal = propose(init_config(path))
    path.write_text(render_config(proposal), encoding="utf-8")
    return path, proposal


def init_config(path: Path) -> Config:
    """The environments ``init`` reaches dev through: those of the file it replaces
    (``--force``), else the defaults of the folder it writes in."""
    if path.is_file():
        with contextlib.suppress(ConfigError):
            return load_config(path)
    folder = path.resolve().parent
    return parse_config({}, None, folder, find_root(folder).describe())


def propose(config: Config) -> Proposal:
    """What ``init`` writes: dev's own scope, or the template and why dev was not read."""
    try:
        target = resolve_connection(config.environment(SOURCE))
        with contextlib.closing(connect(target)) as conn:
            return _read(conn, target.describe())
    except SnapshotError as exc:
        return replace(TEMPLATE, why_template=_one_line(str(exc)))
    except psycopg.Error as exc:
        return replace(TEMPLATE, why_template=_one_line(str(exc)))


def _one_line(text: str) -> str:
    return " ".join(text.split()) or "no reason given"


def _read(conn: psycopg.Connection, where: str) -> Proposal:
    tables = catalog.app_tables(conn)
    if not tables:
        return replace(TEMPLATE, why_template=f"{where} holds no table of its own")
    key_order = True
    try:
        ordered = catalog.apply_order(tables, catalog.foreign_keys(conn, tables))
    except Refused:  # a cycle of keys: the apply will say so; here, by name
        ordered, key_order = tuple(tables), False
    shapes = catalog.table_shapes(conn, ordered)
    insert_as = {}
    for text, value in DEFAULT_INSERT_AS.items():
        column = ColumnRef.parse(text, "[apply] insert_as")
        shape = shapes.get(column.table)
        if shape is not None and column.column in shape.column_names:
            insert_as[text] = value
    return Proposal(
        tables=ordered,
        auth_users=len(catalog.table_shapes(conn, AUTH_TABLES)) == len(AUTH_TABLES),
        insert_as=insert_as,
        read_from=where,
        key_order=key_order,
    )


def summary(proposal: Proposal) -> str:
    """What the written file holds, or why it is the template, in one line."""
    if not proposal.read_from:
        return (
            f"could not read {SOURCE} ({proposal.why_template}): wrote the bundled example "
            f"app's scope; run 'snapshot init --force' once {SOURCE} answers, or list your "
            "tables in [scope]"
        )
    auth = "auth users copied" if proposal.auth_users else "no auth users (no auth.users)"
    return (
        f"read {SOURCE} ({proposal.read_from}): {len(proposal.tables)} of its tables, {auth}; "
        "remove from [scope] tables those whose rows prod keeps"
    )
