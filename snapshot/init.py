"""``snapshot init``: a ``snapshot.toml`` that works as it stands for the app it is run in.

When dev's env file answers, the scope is read from dev: every table of its app schemas
in foreign-key order (partitions and extensions' tables left out), auth users where
Supabase Auth's tables exist, and the bundled app's guardrail setting (``insert_as``) only
where its column exists. Otherwise the bundled example app's commented template is written,
and the file and the command say why.

What is proposed and how it is written (the commented ``snapshot.toml``, its comments fitted
to the proposal) live together here; :mod:`snapshot.config` only reads the file back.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import psycopg

from snapshot import catalog
from snapshot.config import (
    CONFIG_FILE,
    DEFAULT_INSERT_AS,
    DEFAULT_TABLES,
    ColumnRef,
    Config,
    load_config,
    parse_config,
)
from snapshot.db import connect
from snapshot.environments import resolve_connection
from snapshot.errors import ConfigError, Refused, SnapshotError
from snapshot.names import AUTH_TABLES, TableName, quote
from snapshot.project import find_root

SOURCE = "dev"  # the environment init reads the app's tables from


@dataclass(frozen=True)
class Proposal:
    """What ``snapshot init`` writes: a scope read from dev, or the bundled app's template."""

    tables: tuple[TableName, ...]
    auth_users: bool
    insert_as: Mapping[str, str]  # as written in the file: "questions.status" = "draft"
    read_from: str = ""  # the database the scope was read from; "" for the template
    why_template: str = ""  # why dev was not read (the template is written instead)
    key_order: bool = True  # the tables are in foreign-key order (not: a cycle, by name)


TEMPLATE = Proposal(tuple(TableName("public", t) for t in DEFAULT_TABLES), True, DEFAULT_INSERT_AS)


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


def _toml_string(text: str) -> str:
    """``text`` as a TOML string: literal ('public."User"') when it can be, else basic."""
    if "'" not in text and text.isprintable():
        return f"'{text}'" if '"' in text else f'"{text}"'
    return json.dumps(text, ensure_ascii=False)  # JSON's escapes are TOML's


def _scope_name(table: TableName) -> str:
    """How a table is written in [scope] tables: public's without their schema."""
    return quote(table.name) if table.schema == "public" else str(table)


def _scope_comment(proposal: Proposal) -> str:
    if not proposal.read_from:
        return """\
# Tables copied by take, replaced by apply and compared by verify. Order does not matter:
# apply computes it from the target's foreign keys. "users" means "public.users"."""
    order = (
        "parents before children by their foreign keys"
        if proposal.key_order
        else "by name (their foreign keys form a cycle: make one DEFERRABLE)"
    )
    return f"""\
# dev's own tables, as `snapshot init` read them from {proposal.read_from}:
# every table of its public schema and of its other schemas (those of PostgreSQL,
# Supabase and extensions left out), {order}.
# A partitioned table stands for its partitions; tables an extension created are left out.
# take copies them, apply makes each equal the snapshot, verify compares them. Remove the
# tables whose rows prod must keep as they are (sign-ups, orders, logs...). Other schemas'
# tables are written "schema.table". The order does not matter: apply computes its own
# from the target's foreign keys. "users" means "public.users"."""


def _auth_comment(proposal: Proposal) -> str:
    if not proposal.read_from:
        what = "Copy auth.users and auth.identities"
    elif proposal.auth_users:
        what = "dev has auth.users and auth.identities (Supabase Auth): copy them"
    else:
        return "# dev has no auth.users and auth.identities (not Supabase Auth): none are copied."
    return f"# {what}: users the target lacks are created, never updated."


def _insert_as(proposal: Proposal) -> str:
    if proposal.insert_as == DEFAULT_INSERT_AS:
        return """\
# Columns given a fixed value on insert; the post-scripts restore the snapshot's value.
# Questions go in as drafts so the publish guardrails hold while topic links are missing.
insert_as = { "questions.status" = "draft" }"""
    pairs = ", ".join(
        f"{_toml_string(k)} = {_toml_string(v)}" for k, v in proposal.insert_as.items()
    )
    written = f"{{ {pairs} }}" if pairs else "{}"
    return (
        "# Columns given a fixed value on insert, for guardrails that refuse rows inserted as\n"
        "# they are (post-scripts in sql/post restore the snapshot's value), as in\n"
        '# { "posts.status" = "draft" }\n'
        f"insert_as = {written}"
    )


def render_config(proposal: Proposal = TEMPLATE) -> str:
    """The commented ``snapshot.toml`` that ``snapshot init`` writes for ``proposal``."""
    tables = "\n".join(f"    {_toml_string(_scope_name(t))}," for t in proposal.tables)
    header = ""
    if proposal.why_template:
        header = (
            f"# `snapshot init` could not read dev ({proposal.why_template}): the scope below is\n"
            "# the bundled example app's. Run `snapshot init --force` once dev answers, or list\n"
            "# your own tables in [scope].\n"
        )
    auth = "true" if proposal.auth_users else "false"
    return f"""\
{header}# snapshot.toml: the one scope that `snapshot take`, `apply` and `verify` share.
# Relative paths are relative to this file's folder, the project root: snapshot finds it
# from any folder below it.

# Where snapshots and pre-apply backups are archived: <archive>/<env>/<UTC time>[-label]/
# (private: 0700, with a .gitignore of its own, so git never offers to commit it).
archive = "snapshots"

# SQL scripts run by apply inside its transaction: <scripts>/pre/*.sql before any row
# changes, <scripts>/post/*.sql after the snapshot's rows are in, in file-name order; and
# <scripts>/smoke/*.sql for `snapshot smoke`. They can read the snapshot's rows from
# temporary tables named snapshot_<table>. Until a sql/ folder exists here, snapshot's
# bundled scripts run; set this to use another folder.
# scripts = "sql"

# The folder of pg_dump and pg_restore (at least the servers' major version). Default:
# --pg-bin/PG_BIN, then PATH, then the usual install places, then the bundled PostgreSQL.
# pg_bin = "/usr/lib/postgresql/17/bin"

[retention]
# `snapshot prune` keeps the newest N snapshots per environment and kind (takes, pre-apply
# backups, pre-rollback backups) and deletes older ones; when set, take, apply, rollback and
# cutover prune their environments after they succeed. The newest pre-apply backup (what
# `snapshot rollback` restores) is always kept. Unset: keep everything.
# keep = 10

[scope]
{_scope_comment(proposal)}
tables = [
{tables}
]
{_auth_comment(proposal)}
auth_users = {auth}

# safe = true: no real people's data here. A snapshot of an environment that is not safe
# (prod: logins, password hashes, personal columns) is taken, or applied to a safe one,
# only with --unmasked. Applies ask you to type the target's name unless it is safe and
# the snapshot comes the usual way (dev -> prod).
[environments.dev]
env_file = ".env.local"
safe = true

[environments.prod]
env_file = ".env.production"
safe = false
# connection = "auto"  # "direct" (db.<ref>.supabase.co), "pooler" (session pooler) or "auto"
# pooler_host = "aws-0-eu-central-1.pooler.supabase.com"  # copy it from the dashboard;
#                        # without it, SUPABASE_ACCESS_TOKEN lets snapshot ask the Management API
# ssl_root_cert = "prod-ca-2021.crt"  # verify the server against Supabase's CA (verify-full)

[apply]
# How long apply waits for its table locks before giving up, changing nothing.
lock_timeout = "10s"
{_insert_as(proposal)}
# Target users who exist only there keep their login (auth users are never deleted) but
# lose their rows in the scope: "warn" (check and apply say so) or "error" (refuse).
orphaned_users = "warn"
# Large writes (a tenth of the scope or more) check foreign keys once per key, in bulk,
# instead of once per row: "auto", "bulk" (any size) or "per-row" (never).
foreign_key_checks = "auto"
# Rows outside the scope (prod's own history) that refer to rows the snapshot lacks stop
# the apply; true keeps those rows in prod instead (the reports say so), as --keep-referenced.
keep_referenced = false
# What goes up to prod for a table it does not already hold as the snapshot does: "changed"
# rows only (found by comparing row digests), "all", or "auto" (changed rows only when prod
# is 5 ms or more away, as a hosted project is).
upload = "auto"

[parity]
# Columns the parity check before commit leaves out (the report says so). Columns the app's
# triggers maintain (updated_at...) need no entry: what triggers write does not stay.
ignore_columns = []

[session]
# Time limits of snapshot's own database sessions, whatever the server or role sets (Supabase
# gives every role a 2-minute statement_timeout, which a large apply can exceed). "0" means
# no limit; otherwise milliseconds or a unit: "30s", "10min".
statement_timeout = "0"
idle_in_transaction_session_timeout = "0"
transaction_timeout = "0"   # PostgreSQL 17 and later

[preflight]
# Foreign keys from tables outside the scope whose ON DELETE CASCADE / SET NULL you accept
# (the apply's deletes would delete or null out their rows), as "schema.table.constraint".
allow_cascades = []

# A take of an environment not marked safe (prod) is masked: every column that looks
# personal needs a rule, and the key comes from $SNAPSHOT_MASK_KEY (docs/masking.md).
# [masking.columns]
# "users.email" = "email"
# "users.display_name" = "name"

# Takes keep part of the rows: a percentage (the same rows every take, by a hash of the key)
# or a SQL condition per table, closed over foreign keys so every key still holds; such a
# snapshot goes only to environments marked safe; `take --whole` ignores it (docs/subsets.md).
# [subset.tables]
# "question_attempts" = {{ percent = 10 }}
# "questions" = {{ where = "category_id = 3" }}
"""
