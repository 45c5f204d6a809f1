"""The preflight: every condition that would make an apply fail halfway, or succeed while
destroying data outside the scope, found before the first write and reported in one table.

``snapshot check`` runs it alone; apply and rollback run it first and stop on any error.
Each finding is ok, warning or error, and every error says what to do about it.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, LiteralString

import psycopg
from psycopg import sql

from snapshot import archive, catalog, staging, text
from snapshot.direction import CREATE_AUTH_USERS
from snapshot.dump import LIVE, identity
from snapshot.errors import SnapshotError
from snapshot.names import AUTH_IDENTITIES, AUTH_USERS, TableName, quote
from snapshot.session import Session

if TYPE_CHECKING:
    from snapshot.apply.plan import Plan

log = logging.getLogger(__name__)

OK, WARNING, ERROR = "ok", "warning", "error"


@dataclass(frozen=True)
class Finding:
    """One line of the preflight table."""

    check: str
    status: str
    detail: str

    def to_json(self) -> dict[str, str]:
        return {"check": self.check, "status": self.status, "detail": self.detail}


@dataclass(frozen=True)
class PreflightReport:
    """All findings for one snapshot and one target."""

    action: str
    target: str
    snapshot: str
    findings: tuple[Finding, ...]
    plan: Plan | None = None

    @property
    def errors(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if f.status == ERROR)

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def exit_code(self) -> int:
        """2 when an error is one of configuration (the scope) or installation (pg_dump,
        pg_restore), as in take and verify; else 1."""
        return 2 if any(f.check in ("scope", "tooling") for f in self.errors) else 1

    def to_json(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "target": self.target,
            "snapshot": self.snapshot,
            "ok": self.ok,
            "findings": [f.to_json() for f in self.findings],
            "plan": self.plan.to_json() if self.plan else None,
        }


class PreflightFailed(SnapshotError):
    """The preflight found errors; nothing was changed."""

    def __init__(self, report: PreflightReport) -> None:
        count = len(report.errors)
        super().__init__(
            f"preflight found {count} error{'s' if count > 1 else ''} for {report.action} "
            f"{report.snapshot} to {report.target}: nothing was changed"
        )
        self.report = report


def mask_email(email: str | None) -> str:
    """``j***@example.com [3fa1]``: enough to tell users apart, not to harvest addresses.

    The tag is a short hash of the whole address (lower-cased, as Supabase Auth compares
    them): two samples with one domain and initial still differ, and the same person's
    address gets the same tag on either side.
    """
    if not email:
        return "-"
    local, _, domain = email.partition("@")
    tag = hashlib.sha256(email.strip().lower().encode()).hexdigest()[:4]
    masked = f"{local[:1]}***@{domain}" if domain else f"{email[:1]}***"
    return f"{masked} [{tag}]"


def _identity(s: Session) -> Iterator[Finding]:
    m = s.snapshot.manifest
    here = identity(s.target, s.info)
    same = archive.same_database(m.database, m.project_ref, here, s.target.project_ref)
    if s.action == "apply" and same and m.kind == LIVE:  # the cutover's source, live
        yield Finding(
            "identity",
            ERROR,
            f"{m.environment} and {s.target.env} are one database ({'; '.join(same)}): a "
            f"cutover would copy it onto itself; check the env files of both",
        )
    elif s.action == "apply" and same:
        yield Finding(
            "identity",
            ERROR,
            f"{s.snapshot.id} was taken from {s.target.env} itself ({'; '.join(same)}): check "
            f"the env files; to restore its own snapshot use 'snapshot rollback "
            f"{s.target.env} --to {s.snapshot.id}'",
        )
    elif s.action != "apply" and not same:
        yield Finding(
            "identity",
            ERROR,
            f"{s.snapshot.id} was taken from {m.environment} ({m.database.host}:"
            f"{m.database.port}/{m.database.dbname}), not from {s.target.env}: use 'snapshot "
            f"apply {s.target.env} --snapshot {s.snapshot.id}'",
        )
    else:
        where = f"{m.database.host}:{m.database.port}/{m.database.dbname}"
        relation = "another database" if s.action == "apply" else "this database"
        yield Finding("identity", OK, f"{s.snapshot.id} comes from {relation} ({where})")


def _integrity(s: Session) -> Iterator[Finding]:
    try:
        archive.verify_files(s.snapshot)
    except SnapshotError as exc:
        yield Finding("snapshot integrity", ERROR, str(exc))
        return
    files = s.snapshot.manifest.files
    match = "matches its" if len(files) == 1 else "match their"
    yield Finding("snapshot integrity", OK, f"{text.count(len(files), 'file')} {match} sha256")


def _scope(s: Session) -> Iterator[Finding]:
    beside = catalog.partitions_beside_parents(s.conn, s.config.scope.tables)
    if beside:
        yield Finding("scope", ERROR, catalog.partition_refusal(beside))
        return
    configured = set(s.config.scope.tables)
    archived = set(s.snapshot.manifest.scope.tables)
    unknown = configured - archived  # the session read the catalog for the snapshot's tables
    here = {*s.shapes, *catalog.table_shapes(s.conn, sorted(unknown, key=str))}
    absent = [t for t in s.config.scope.tables if t not in here]
    if absent:
        yield Finding(
            "scope",
            ERROR,
            f"{s.target.env} has no table "
            f"{catalog.missing_tables(s.conn, absent, s.config.scope.tables)}: "
            f"{s.config.scope.fix('fix [scope] tables in snapshot.toml')}, or run the "
            "migrations that create it",
        )
    if configured == archived:
        yield Finding("scope", OK, f"the snapshot covers the {len(configured)} configured tables")
        return
    extra = ", ".join(sorted(map(str, archived - configured))) or "-"
    lacking = ", ".join(sorted(map(str, configured - archived))) or "-"
    yield Finding(
        "scope",
        ERROR,
        f"the snapshot covers another scope than snapshot.toml (only in the snapshot: {extra}; "
        f"only in snapshot.toml: {lacking}): take a new snapshot",
    )


def _tooling(s: Session) -> Iterator[Finding]:
    for name, tool in (("pg_restore", s.pg_restore), ("pg_dump", s.pg_dump)):
        if name in s.problems:
            yield Finding("tooling", ERROR, s.problems[name])
        elif tool is not None:
            yield Finding("tooling", OK, f"{name} {tool.version} ({tool.path})")


def _schema(s: Session) -> Iterator[Finding]:
    problems = 0
    for entry in s.snapshot.manifest.tables:
        shape = s.shapes.get(entry.table)
        if shape is None and entry.table in s.config.scope.tables:
            problems += 1  # the scope check names it: a missing scope table is configuration
            continue
        if shape is None:
            problems += 1
            yield Finding(
                "schema",
                ERROR,
                f"{entry.table} is missing in {s.target.env}: run the migrations that create it",
            )
            continue
        target = {c.name: c for c in shape.columns}
        errors, warnings = [], []
        for column in entry.columns:
            mine = target.get(column.name)
            if mine is None:
                errors.append(f"lacks column {column.name}")
            elif mine.type != column.type:
                errors.append(f"{column.name} is {mine.type}, the snapshot's is {column.type}")
            elif mine.not_null and not column.not_null:
                warnings.append(f"{column.name} is NOT NULL here but nullable in the snapshot")
        for name, column in target.items():
            if name in entry.column_names:
                continue
            if column.not_null and not column.has_default and not column.identity:
                errors.append(f"has an extra NOT NULL column {name} without a default")
            else:
                warnings.append(f"has an extra column {name} (it gets its default)")
        if errors:
            problems += 1
            yield Finding(
                "schema",
                ERROR,
                f"{entry.table} {'; '.join(errors)}: run the migrations so both sides match, "
                "then take a new snapshot",
            )
        if warnings:
            yield Finding("schema", WARNING, f"{entry.table} {'; '.join(warnings)}")
    if not problems:
        count = len(s.snapshot.manifest.tables)
        yield Finding("schema", OK, f"{count} tables have the snapshot's columns and types")


def _migrations(s: Session) -> Iterator[Finding]:
    source = s.snapshot.manifest.migrations
    here = catalog.migration_versions(s.conn)
    if source is None and here is None:
        yield Finding("migrations", OK, "neither side has supabase_migrations.schema_migrations")
        return
    env, other = s.snapshot.manifest.environment, s.target.env
    if source is None or here is None:
        lacking = env if source is None else other
        yield Finding(
            "migrations",
            WARNING,
            f"only one side has supabase_migrations.schema_migrations ({lacking} has none)",
        )
        return
    only_source = sorted(set(source) - set(here))
    only_here = sorted(set(here) - set(source))
    if not only_source and not only_here:
        yield Finding("migrations", OK, f"both sides list the same {len(here)} migrations")
        return
    parts = []
    if only_source:
        parts.append(f"{other} lacks {', '.join(only_source)} (applied in {env})")
    if only_here:
        parts.append(f"{env} lacked {', '.join(only_here)} (applied in {other})")
    yield Finding(
        "migrations",
        WARNING,
        "; ".join(parts) + ". The history alone proves nothing: the schema check decides",
    )


def _privileges(s: Session) -> Iterator[Finding]:
    conn = s.conn
    role = s.info.user
    grants: list[str] = []
    checks = [(t, "SELECT, INSERT, UPDATE, DELETE") for t in s.order]
    checks += [(e.table, "SELECT, INSERT") for e in s.auth_entries if e.table in s.shapes]
    for table, wanted in checks:
        name = table.ident.as_string(conn)
        missing = [
            p.strip()
            for p in wanted.split(",")
            if not _scalar(conn, "SELECT has_table_privilege(%s, %s)", (name, p.strip()))
        ]
        if missing:
            grants.append(f"GRANT {', '.join(missing)} ON {name} TO {quote(role)};")
    unreadable = catalog.hidden_by_row_security(conn, [t for t, _ in checks])
    if not _scalar(conn, "SELECT has_database_privilege(current_database(), 'TEMP')"):
        grants.append(f"GRANT TEMP ON DATABASE {quote(s.info.dbname)} TO {quote(role)};")
    if grants:
        yield Finding(
            "privileges",
            ERROR,
            f"{role} lacks what apply needs; run as the owner: " + " ".join(grants),
        )
    owners = _sequence_owners(s)
    for owner, tables in owners.items():
        named = ", ".join(map(str, tables[:3])) + (
            f" and {len(tables) - 3} more" if len(tables) > 3 else ""
        )
        yield Finding(
            "privileges",
            ERROR,
            f"{role} may not restart the sequences of {named} (ALTER SEQUENCE takes the owner "
            f"of their tables, {owner}, and a sequence linked to a table cannot change owner): "
            f"run snapshot as {owner}, or make {role} a member of it (as a superuser: "
            f"GRANT {quote(owner)} TO {quote(role)};)",
        )
    if unreadable:
        yield Finding("privileges", ERROR, catalog.row_security_refusal(role, unreadable))
    if not grants and not owners and not unreadable:
        yield Finding("privileges", OK, f"{role} may lock, delete, insert and update the scope")


def _triggers(s: Session) -> Iterator[Finding]:
    """The app's triggers that may write into the rows they fire on, and whether the apply
    can keep what they write from staying (:mod:`snapshot.apply.keepers`)."""
    rewriting = [t for t in catalog.app_triggers(s.conn, s.order) if t.may_rewrite]
    if not rewriting:
        return
    tables = sorted({t.table for t in rewriting})
    denied = {
        tables[int(i) - 1]
        for (i,) in s.conn.execute(
            "SELECT i FROM unnest(%s::regclass[]) WITH ORDINALITY AS w(t, i) "
            "WHERE NOT has_table_privilege(t, 'TRIGGER')",
            ([t.ident.as_string(s.conn) for t in tables],),
        )
    }
    listed = "; ".join(
        f"{table}: {', '.join(t.name for t in rewriting if t.table == table)}" for table in tables
    )
    yield Finding(
        "app triggers",
        OK,
        f"{len(tables)} table{'s' if len(tables) != 1 else ''} have triggers that write into the "
        f"rows they fire on ({listed}): they fire on every row the apply writes (one that raises "
        "still stops it), and what they write does not stay: the snapshot's values are kept",
    )
    for table in sorted(denied):
        yield Finding(
            "app triggers",
            WARNING,
            f"{s.info.user} may not create triggers on {table} (it neither owns it nor has "
            "TRIGGER), so what the app's triggers write there would stay and fail the parity "
            f"check: GRANT TRIGGER ON {table} TO {s.info.user};",
        )


def _sequence_owners(s: Session) -> dict[str, list[TableName]]:
    """The tables whose sequences (serial, identity) the role may not restart, by owner.

    The apply restarts them with ALTER SEQUENCE (transactional, unlike setval), which takes
    the sequence's owner: the owner of its table, as PostgreSQL keeps them together.
    """
    owners: dict[str, list[TableName]] = {}
    for seq, table, *_ in catalog.owned_sequence_names(s.conn, s.order):
        owner = _scalar(
            s.conn,
            "SELECT CASE WHEN NOT pg_has_role(relowner, 'USAGE') "
            "THEN pg_get_userbyid(relowner) END FROM pg_class WHERE oid = %s::regclass",
            (seq.ident.as_string(s.conn),),
        )
        if owner is not None and table not in owners.setdefault(str(owner), []):
            owners[str(owner)].append(table)
    return {owner: tables for owner, tables in owners.items() if tables}


def _scalar(
    conn: psycopg.Connection, query: LiteralString | sql.Composed, params: tuple[Any, ...] = ()
) -> Any:
    row = conn.execute(query, params).fetchone()
    return row[0] if row else None


def _order(s: Session) -> Iterator[Finding]:
    if "order" in s.problems:
        yield Finding("foreign keys", ERROR, s.problems["order"])
    elif s.order:
        inner = [f for f in s.fks if f.child in s.order and f.parent in s.order]
        yield Finding(
            "foreign keys",
            OK,
            f"{len(inner)} keys inside the scope; insert order {s.order[0]} … {s.order[-1]}",
        )


def _not_null(columns: tuple[str, ...]) -> sql.Composable:
    return sql.SQL(" AND ").join(
        sql.SQL("{} IS NOT NULL").format(sql.Identifier(c)) for c in columns
    )


def _closure(s: Session, allowed: Collection[str]) -> Iterator[Finding]:
    """Foreign keys from outside the scope into it: the rows the apply would take from under
    them, judged as the apply judges them (:mod:`snapshot.apply.outside`).

    Before anything is staged (the cutover's first look at a live source) the references
    are only counted: the apply decides once the snapshot is staged, before any write.
    """
    from snapshot.apply import outside

    refs = s.outside if s.staged else outside.survey(s, staged=False)
    if not refs:
        yield Finding("scope closure", OK, "no foreign key from outside the scope refers to it")
    for ref in refs:
        status, detail = outside.verdict(s, ref, allowed)
        yield Finding("scope closure", status, detail)
    direct = {ref.fk.parent for ref in refs if ref.rows}
    for kept in s.kept.values():
        if kept.table not in direct:
            yield Finding("scope closure", WARNING, kept.sentence(s.target.env))


def _outside_references(s: Session) -> Iterator[Finding]:
    """Snapshot rows that point at rows outside the scope the target lacks."""
    scoped = set(s.order)
    auth_copied = any(e.table == AUTH_USERS for e in s.auth_entries)
    found = False
    for fk in s.fks:
        if fk.child not in scoped or fk.parent in scoped:
            continue
        entry = s.entries[fk.child]
        stage = staging.staging_table(entry)
        match = sql.SQL(" AND ").join(
            sql.SQL("p.{} = s.{}").format(sql.Identifier(pc), sql.Identifier(cc))
            for pc, cc in zip(fk.parent_columns, fk.columns, strict=True)
        )
        query: sql.Composed = sql.SQL(
            "SELECT count(*) FROM {} s WHERE {} AND NOT EXISTS (SELECT 1 FROM {} p WHERE {})"
        ).format(stage, _not_null(fk.columns), fk.parent.ident, match)
        if fk.parent == AUTH_USERS and auth_copied:
            users = next(e for e in s.auth_entries if e.table == AUTH_USERS)
            query = sql.SQL("{} AND NOT EXISTS (SELECT 1 FROM {} p WHERE {})").format(
                query, staging.staging_table(users), match
            )
        count = _scalar(s.conn, query)
        if count:
            found = True
            if fk.parent != AUTH_USERS:
                fix = f"add {fk.parent} to the scope, or create those rows in the target first"
            elif s.auth_withheld:
                fix = f"pass {CREATE_AUTH_USERS} to create them from the snapshot"
            else:
                fix = "copy auth users (auth_users = true)"
            yield Finding(
                "outside references",
                ERROR,
                f"{text.count(count, 'snapshot row')} of {fk.child} "
                f"{'points' if count == 1 else 'point'} at {fk.parent} rows the target lacks "
                f"({fk}): {fix}",
            )
    if not found:
        yield Finding("outside references", OK, "every key leaving the scope finds its row")


def _unique_keys(
    conn: psycopg.Connection, staged: Collection[str]
) -> list[tuple[list[str], str | None]]:
    """The target's unique keys on auth.users (not the id) over staged plain columns.

    Each with its predicate: Supabase's email index covers only ``is_sso_user = false``,
    so an SSO user may share a password user's email; conflicts follow the real index.
    """
    rows = conn.execute(
        "SELECT array_agg(a.attname::text ORDER BY k.n), pg_get_expr(i.indpred, i.indrelid) "
        "FROM pg_index i CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(num, n) "
        "JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.num "
        "WHERE i.indrelid = 'auth.users'::regclass AND i.indisunique AND NOT i.indisprimary "
        "AND i.indisvalid AND 0 <> ALL (i.indkey::int2[]) GROUP BY i.indexrelid, i.indpred, "
        "i.indrelid ORDER BY i.indexrelid"
    ).fetchall()
    return [(list(cols), pred) for cols, pred in rows if set(cols) <= set(staged)]


def _same_value(column: str) -> sql.Composable:
    """``t.column = s.column``; emails compared case-insensitively, as Supabase Auth does.

    Auth finds a user by ``lower(email)``: ``Conflict@Example.com`` and
    ``conflict@example.com`` are one person to it, though the unique index takes both.
    """
    if column == "email":
        return sql.SQL("lower(t.{c}) = lower(s.{c})").format(c=sql.Identifier(column))
    return sql.SQL("t.{c} = s.{c}").format(c=sql.Identifier(column))


def _auth_conflicts(s: Session) -> Iterator[Finding]:
    """Snapshot users to create whose email or phone already belongs to another target user."""
    users = next((e for e in s.auth_entries if e.table == AUTH_USERS), None)
    if users is None:
        return
    stage = staging.staging_table(users)
    conflicts = []
    for columns, predicate in _unique_keys(s.conn, users.column_names):
        covered = sql.SQL(" WHERE {}").format(sql.SQL(predicate)) if predicate else sql.SQL("")
        same = sql.SQL(" AND ").join(_same_value(c) for c in columns)
        query = sql.SQL(
            "SELECT s.id, s.email, t.id FROM (SELECT * FROM {stage}{covered}) s "
            "JOIN (SELECT * FROM auth.users{covered}) t ON {same} AND t.id <> s.id "
            "WHERE NOT EXISTS (SELECT 1 FROM auth.users u WHERE u.id = s.id) ORDER BY s.id LIMIT 20"
        ).format(stage=stage, covered=covered, same=same)
        try:
            with s.conn.transaction():  # a predicate over a column the snapshot lacks fails
                rows = s.conn.execute(query).fetchall()
        except psycopg.Error:
            continue
        what = " and ".join(columns)
        for source_id, email, target_id in rows:
            conflicts.append(f"{source_id} ({mask_email(email)}) has the {what} of {target_id}")
    identities = next((e for e in s.auth_entries if e.table == AUTH_IDENTITIES), None)
    if identities is not None:
        rows = s.conn.execute(
            sql.SQL(
                "SELECT i.user_id, i.provider FROM {ids} i JOIN auth.identities t "
                "ON t.provider_id = i.provider_id AND t.provider = i.provider "
                "WHERE NOT EXISTS (SELECT 1 FROM auth.users u WHERE u.id = i.user_id) LIMIT 20"
            ).format(ids=staging.staging_table(identities))
        ).fetchall()
        for user_id, provider in rows:
            conflicts.append(f"{user_id}'s {provider} identity belongs to another target user")
    if conflicts:
        yield Finding(
            "auth users",
            ERROR,
            f"{text.count(len(conflicts), 'snapshot user')} cannot be created in {s.target.env}: "
            + "; ".join(conflicts)
            + ". Resolve them in either project (Authentication > Users), then apply again",
        )
    else:
        created = _scalar(
            s.conn,
            sql.SQL(
                "SELECT count(*) FROM {} s WHERE NOT EXISTS (SELECT 1 FROM auth.users u "
                "WHERE u.id = s.id)"
            ).format(stage),
        )
        yield Finding(
            "auth users",
            OK,
            f"{text.count(created, 'snapshot user')} will be created, "
            f"{'it does not conflict' if created == 1 else 'none conflict'}",
        )


def run_checks(
    s: Session,
    *,
    lock_holder: str | None,
    allow_cascades: Collection[str] = (),
    full: bool = False,
) -> PreflightReport:
    """Every check, in the order they are reported; stages and plans the apply when it can.

    A live description of the source (:func:`snapshot.take.describe`, the cutover's first
    step) has no files yet: the checks that need the snapshot's rows are left to the apply.
    """
    allowed = set(allow_cascades) | set(s.config.preflight_allow_cascades)
    live = s.snapshot.manifest.kind == LIVE
    findings: list[Finding] = []
    if not live:
        findings += _integrity(s)
    findings += _identity(s)
    findings += _scope(s)
    findings += _tooling(s)
    if lock_holder:
        findings.append(
            Finding(
                "one apply at a time",
                ERROR,
                f"another snapshot apply or rollback is running against {s.target.env} "
                f"({lock_holder}): wait for it to finish",
            )
        )
    else:
        findings.append(Finding("one apply at a time", OK, "no other apply or rollback runs"))
    findings += _schema(s)
    findings += _migrations(s)
    findings += _privileges(s)
    findings += _triggers(s)
    findings += _order(s)
    findings.append(_scripts(s))
    if live:
        findings += _closure(s, allowed)
        findings.append(
            Finding(
                "snapshot rows",
                OK,
                "outside references and auth user conflicts are checked by the apply, once the "
                "snapshot is taken and before any write",
            )
        )
    elif any(f.status == ERROR for f in findings):
        findings.append(
            Finding(
                "snapshot rows",
                WARNING,
                "scope closure, outside references, auth user conflicts and the plan are "
                "checked once the errors above are fixed (they need the snapshot staged)",
            )
        )
    else:
        from snapshot.apply import backup
        from snapshot.apply import plan as planning

        assert s.pg_restore is not None
        if s.backup_into is not None:
            # The plan records the target in the snapshot pg_dump then backs up while the
            # staged rows are compared; the apply copies what changed since under its lock.
            s.backup = backup.start(s, s.backup_into)
        matched = planning.record(s)
        staging.stage(
            s.conn,
            s.pg_restore,
            s.snapshot,
            [*s.entries.values(), *s.auth_entries],
            matched | s.withheld_tables,  # withheld auth users are never even loaded
        )
        if s.backup is not None:
            backup.dump(s.backup)
        s.staged = True
        s.plan = planning.prepare(s, matched, full=full, allowed=allowed)
        findings += _staged_rows(s)
        findings += _closure(s, allowed)
        findings += _outside_references(s)
        findings += _auth_conflicts(s)
        in_bulk, how = _key_checks(s, s.plan, allowed)
        findings += _plan_findings(s, s.plan, in_bulk=in_bulk)
        findings += how
    if s.auth_withheld:
        findings.append(Finding("auth users", WARNING, s.auth_withheld))
    return PreflightReport(s.action, s.target.env, s.snapshot.id, tuple(findings), s.plan)


def _staged_rows(s: Session) -> Iterator[Finding]:
    """The staged rows against the manifest: a swapped dump or an edited manifest stops here."""
    from snapshot.apply import rows as rowsets
    from snapshot.checksum import TableStats, kind_of, table_stats

    wrong = []
    entries = [*s.entries.values(), *s.auth_entries]
    for entry in entries:
        rows = s.row_sets.get(entry.table)
        if rows is not None:
            staged = rowsets.snapshot_stats(s.conn, rows)
        else:
            staged = table_stats(
                s.conn,
                staging.staging_table(entry),
                entry.column_names,
                kind=kind_of(entry.checksum),
            )
        if staged == TableStats(entry.rows, entry.checksum):
            continue
        if staged.rows != entry.rows:
            wrong.append(f"{entry.table} ({staged.rows:,} rows, the manifest says {entry.rows:,})")
        else:
            wrong.append(f"{entry.table} (its checksum differs)")
    if wrong:
        yield Finding(
            "snapshot integrity",
            ERROR,
            f"the rows in {s.snapshot.id}'s data.dump contradict its manifest: "
            f"{', '.join(wrong)}; the dump was replaced or the manifest edited: take a new "
            "snapshot",
        )
    else:
        yield Finding(
            "snapshot integrity",
            OK,
            f"the staged rows of {len(entries)} tables match the manifest's counts and checksums",
        )


def _scripts(s: Session) -> Finding:
    """Which pre, post and smoke scripts will run, from the user's folder or bundled."""
    from snapshot import scripts

    try:
        return Finding("scripts", OK, scripts.describe(s.config))
    except SnapshotError as exc:
        return Finding("scripts", ERROR, str(exc))


def _key_checks(s: Session, plan: Plan, allowed: Collection[str]) -> tuple[bool, list[Finding]]:
    """Whether a large change checks its foreign keys in bulk, and a finding saying how
    (a small one goes row by row, unsaid)."""
    from snapshot.apply import replica

    if s.block_readers or not replica.wanted(s, plan):
        return False, []
    why = replica.obstacle(s, allowed)
    if why is not None:
        detail = f"{plan.changes:,} rows to write, foreign keys checked row by row: {why}"
        return False, [Finding("plan", OK, detail)]
    detail = (
        f"{plan.changes:,} rows to write: their foreign keys are checked in bulk after the "
        "writes (session_replication_role = replica, the app's triggers set to fire always "
        "meanwhile); readers never wait"
    )
    return True, [Finding("plan", OK, detail)]


def _plan_findings(s: Session, plan: Plan, *, in_bulk: bool = False) -> Iterator[Finding]:
    """What the apply will write, and whom it affects, as findings.

    ``in_bulk``: the writes check foreign keys in bulk, so the deletes need no index.
    """
    tables = plan.tables
    counts = (
        f"{sum(t.inserts for t in tables):,} rows to insert, {sum(t.updates for t in tables):,} "
        f"to update, {sum(t.deletes for t in tables):,} to delete, "
        f"{sum(t.unchanged for t in tables):,} unchanged"
    )
    full = [t for t in tables if t.full]
    how = f"{len(tables) - len(full)} tables as a delta"
    if full:
        how += (
            f", {len(full)} replaced in full ({'; '.join(f'{t.table}: {t.reason}' for t in full)})"
        )
    yield Finding("plan", OK, f"{counts}: {how}")
    if plan.helper_indexes:
        use = (
            "checking foreign keys in bulk, this apply needs no index for them"
            if in_bulk
            else "the apply indexes them for its own use and drops the indexes after commit "
            "(DROP INDEX CONCURRENTLY: readers never wait)"
        )
        yield Finding(
            "plan",
            OK,
            f"{len(plan.helper_indexes)} foreign keys have no index and their parents lose "
            f"many rows: {use}; to index them for good: "
            + " ".join(
                f"CREATE INDEX CONCURRENTLY ON {fk.child} ({', '.join(map(quote, fk.columns))});"
                for fk in plan.helper_indexes
            ),
        )
    if plan.written_since is not None:
        lost = [w for w in plan.written_since if w.rows]
        if lost:
            total = sum(w.rows for w in lost)
            yield Finding(
                "written since",
                WARNING,
                f"{total:,} row{'' if total == 1 else 's'} written since the apply this "
                f"{s.action} undoes (by the app, or a later apply) will be thrown away: "
                + "; ".join(w.sentence() for w in lost)
                + f"; only its pre-{s.action} backup keeps them",
            )
        else:
            yield Finding(
                "written since", OK, f"no row written since the apply this {s.action} undoes"
            )
    people = plan.auth
    if people is None:
        return
    if people.create:
        yield Finding(
            "new logins",
            OK,
            f"{people.create_sentence(s.target.env)} (auth users are never updated)",
        )
    for trigger in people.triggers:
        outside = trigger.opaque or any(t not in s.order for t in trigger.writes)
        yield Finding(
            "auth triggers",
            WARNING if outside else OK,
            f"{trigger.sentence(s.order)}: it fires as the {people.create:,} snapshot users "
            f"are created; the report counts the rows it writes"
            + (" (rows written outside the scope stay)" if outside else ""),
        )
    if people.orphaned:
        setting = s.config.apply.orphaned_users
        status = ERROR if setting == "error" else WARNING
        fix = (
            '; [apply] orphaned_users = "error" in snapshot.toml refuses such applies'
            if status == WARNING
            else ": copy those users' rows to the source first, or set [apply] orphaned_users "
            '= "warn" in snapshot.toml to accept it'
        )
        yield Finding("orphaned users", status, people.orphaned_sentence(s.target.env) + fix)
