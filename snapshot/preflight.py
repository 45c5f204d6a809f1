"""The preflight: every condition that would make an apply fail halfway, or succeed while
destroying data outside the scope, found before the first write and reported in one table.

``snapshot check`` runs it alone; apply and rollback run it first and stop on any error.
Each finding is ok, warning or error, and every error says what to do about it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from snapshot import archive, catalog, text
from snapshot.dump import LIVE, identity
from snapshot.errors import SnapshotError
from snapshot.manifest import same_database
from snapshot.names import TableName, quote
from snapshot.session import Session


class Plan(Protocol):
    """The apply's plan (:class:`snapshot.apply.plan.Plan`), as a report carries it: the
    preflight itself knows nothing of the apply."""

    def to_json(self) -> dict[str, Any]: ...


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


def _identity(session: Session) -> Iterator[Finding]:
    m = session.snapshot.manifest
    here = identity(session.target, session.info)
    same = same_database(m.database, m.project_ref, here, session.target.project_ref)
    if session.action == "apply" and same and m.kind == LIVE:  # the cutover's source, live
        yield Finding(
            "identity",
            ERROR,
            f"{m.environment} and {session.target.env} are one database ({'; '.join(same)}): a "
            f"cutover would copy it onto itself; check the env files of both",
        )
    elif session.action == "apply" and same:
        yield Finding(
            "identity",
            ERROR,
            f"{session.snapshot.id} was taken from {session.target.env} itself "
            f"({'; '.join(same)}): check the env files; to restore its own snapshot use "
            f"'snapshot rollback {session.target.env} --to {session.snapshot.id}'",
        )
    elif session.action != "apply" and not same:
        yield Finding(
            "identity",
            ERROR,
            f"{session.snapshot.id} was taken from {m.environment} ({m.database.host}:"
            f"{m.database.port}/{m.database.dbname}), not from {session.target.env}: use 'snapshot "
            f"apply {session.target.env} --snapshot {session.snapshot.id}'",
        )
    else:
        where = f"{m.database.host}:{m.database.port}/{m.database.dbname}"
        relation = "another database" if session.action == "apply" else "this database"
        yield Finding("identity", OK, f"{session.snapshot.id} comes from {relation} ({where})")


def _integrity(session: Session) -> Iterator[Finding]:
    try:
        archive.verify_files(session.snapshot)
    except SnapshotError as exc:
        yield Finding("snapshot integrity", ERROR, str(exc))
        return
    files = session.snapshot.manifest.files
    match = "matches its" if len(files) == 1 else "match their"
    yield Finding("snapshot integrity", OK, f"{text.count(len(files), 'file')} {match} sha256")


def _scope(session: Session, asked: _Answers) -> Iterator[Finding]:
    beside = asked.beside
    if beside:
        yield Finding("scope", ERROR, catalog.partition_refusal(beside))
        return
    configured = set(session.config.scope.tables)
    archived = set(session.snapshot.manifest.scope.tables)
    unknown = configured - archived  # the session read the catalog for the snapshot's tables
    found = catalog.table_shapes(session.conn, sorted(unknown, key=str)) if unknown else {}
    here = {*session.shapes, *found}
    absent = [t for t in session.config.scope.tables if t not in here]
    if absent:
        yield Finding(
            "scope",
            ERROR,
            f"{session.target.env} has no table "
            f"{catalog.missing_tables(session.conn, absent, session.config.scope.tables)}: "
            f"{session.config.scope.fix('fix [scope] tables in snapshot.toml')}, or run the "
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


def _tooling(session: Session) -> Iterator[Finding]:
    for name, tool in (("pg_restore", session.pg_restore), ("pg_dump", session.pg_dump)):
        if name in session.problems:
            yield Finding("tooling", ERROR, session.problems[name])
        elif tool is not None:
            yield Finding("tooling", OK, f"{name} {tool.version} ({tool.path})")


def _schema(session: Session) -> Iterator[Finding]:
    problems = 0
    for entry in session.snapshot.manifest.tables:
        shape = session.shapes.get(entry.table)
        if shape is None and entry.table in session.config.scope.tables:
            problems += 1  # the scope check names it: a missing scope table is configuration
            continue
        if shape is None:
            problems += 1
            yield Finding(
                "schema",
                ERROR,
                f"{entry.table} is missing in {session.target.env}: run the migrations that "
                "create it",
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
        count = len(session.snapshot.manifest.tables)
        yield Finding("schema", OK, f"{count} tables have the snapshot's columns and types")


def _migrations(session: Session, asked: _Answers) -> Iterator[Finding]:
    source = session.snapshot.manifest.migrations
    here = catalog.applied_migrations(session.conn) if asked.migrations_readable else None
    if source is None and here is None:
        yield Finding("migrations", OK, "neither side has supabase_migrations.schema_migrations")
        return
    env, other = session.snapshot.manifest.environment, session.target.env
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


def _privilege_checks(session: Session) -> list[tuple[TableName, str]]:
    """The tables the apply writes and the privileges it needs on each."""
    checks = [(t, "SELECT, INSERT, UPDATE, DELETE") for t in session.order]
    return checks + [
        (e.table, "SELECT, INSERT") for e in session.auth_entries if e.table in session.shapes
    ]


_LACKING = (
    "SELECT w.i, p.p FROM unnest(%s::text[], %s::text[]) WITH ORDINALITY AS w(t, ps, i) "
    "CROSS JOIN LATERAL unnest(string_to_array(w.ps, ', ')) WITH ORDINALITY AS p(p, n) "
    "WHERE NOT has_table_privilege(w.t, p.p) ORDER BY w.i, p.n"
)


def _privileges(session: Session, asked: _Answers) -> Iterator[Finding]:
    conn = session.conn
    role = session.info.user
    grants: list[str] = []
    names = [table.ident.as_string(conn) for table, _ in _privilege_checks(session)]
    lacking: dict[int, list[str]] = {}
    for i, privilege in asked.lacking:  # one question for every table and privilege
        lacking.setdefault(int(i) - 1, []).append(str(privilege))
    for i, missing in sorted(lacking.items()):
        grants.append(f"GRANT {', '.join(missing)} ON {names[i]} TO {quote(role)};")
    unreadable = asked.hidden
    if not asked.temp:
        grants.append(f"GRANT TEMP ON DATABASE {quote(session.info.dbname)} TO {quote(role)};")
    if grants:
        yield Finding(
            "privileges",
            ERROR,
            f"{role} lacks what apply needs; run as the owner: " + " ".join(grants),
        )
    owners = _sequence_owners(session, asked.sequences)
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


def _triggers(session: Session, asked: _Answers) -> Iterator[Finding]:
    """The app's triggers that may write into the rows they fire on, and whether the apply
    can keep what they write from staying (:mod:`snapshot.apply.keepers`)."""
    rewriting = [t for t in asked.triggers if t.may_rewrite]
    if not rewriting:
        return
    tables = sorted({t.table for t in rewriting})
    denied = {t for t in tables if t in asked.no_trigger}
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
            f"{session.info.user} may not create triggers on {table} (it neither owns it nor has "
            "TRIGGER), so what the app's triggers write there would stay and fail the parity "
            f"check: GRANT TRIGGER ON {table} TO {session.info.user};",
        )


def _sequence_owners(
    session: Session, sequences: Sequence[catalog.SequenceName]
) -> dict[str, list[TableName]]:
    """The tables whose sequences (serial, identity) the role may not restart, by owner.

    The apply restarts them with ALTER SEQUENCE (transactional, unlike setval), which takes
    the sequence's owner: the owner of its table, as PostgreSQL keeps them together.
    """
    owners: dict[str, list[TableName]] = {}
    if not sequences:
        return owners
    rows = session.conn.execute(  # every sequence's owner in one round trip
        "SELECT w.i, CASE WHEN NOT pg_has_role(c.relowner, 'USAGE') "
        "THEN pg_get_userbyid(c.relowner) END "
        "FROM unnest(%s::regclass[]) WITH ORDINALITY AS w(s, i) JOIN pg_class c ON c.oid = w.s "
        "ORDER BY w.i",
        ([seq.ident.as_string(session.conn) for seq, *_ in sequences],),
    ).fetchall()
    for i, owner in rows:
        table = sequences[int(i) - 1][1]
        if owner is not None and table not in owners.setdefault(str(owner), []):
            owners[str(owner)].append(table)
    return {owner: tables for owner, tables in owners.items() if tables}


def _order(session: Session) -> Iterator[Finding]:
    if "order" in session.problems:
        yield Finding("foreign keys", ERROR, session.problems["order"])
    elif session.order:
        inner = [f for f in session.fks if f.child in session.order and f.parent in session.order]
        yield Finding(
            "foreign keys",
            OK,
            f"{len(inner)} keys inside the scope; insert order {session.order[0]} … "
            f"{session.order[-1]}",
        )


@dataclass(frozen=True)
class _Answers:
    """What the checks ask the catalog, asked together (:func:`_ask`)."""

    beside: dict[TableName, TableName]  # scoped partitions of scoped tables
    migrations_readable: bool
    lacking: list[tuple[Any, ...]]  # (check number, privilege) the role lacks
    hidden: list[TableName]  # row-level security would hide their rows
    temp: bool  # may the role create temporary tables
    sequences: list[catalog.SequenceName]  # owned by the scope's columns
    triggers: list[catalog.AppTrigger]
    no_trigger: frozenset[TableName]  # scope tables the role may not create triggers on


def _ask(session: Session) -> _Answers:
    """Every catalog question of the checks below, in one round trip (a pipeline)."""
    conn = session.conn
    checks = _privilege_checks(session)
    order = [t.ident.as_string(conn) for t in session.order]
    with conn.pipeline():
        beside = catalog.partitions_beside_parents_later(conn, session.config.scope.tables)
        readable = catalog.migrations_readable_later(conn)
        lacking = conn.execute(
            _LACKING,
            ([t.ident.as_string(conn) for t, _ in checks], [wanted for _, wanted in checks]),
        )
        hidden = catalog.hidden_by_row_security_later(conn, [t for t, _ in checks])
        temp = conn.execute("SELECT has_database_privilege(current_database(), 'TEMP')")
        sequences = catalog.owned_sequence_names_later(conn, session.order)
        triggers = catalog.app_triggers_later(conn, session.order)
        refused = conn.execute(
            "SELECT i FROM unnest(%s::regclass[]) WITH ORDINALITY AS w(t, i) "
            "WHERE NOT has_table_privilege(t, 'TRIGGER')",
            (order,),
        )
    may_temp = temp.fetchone()
    return _Answers(
        beside=beside(),
        migrations_readable=readable(),
        lacking=lacking.fetchall(),
        hidden=hidden(),
        temp=bool(may_temp and may_temp[0]),
        sequences=sequences(),
        triggers=triggers(),
        no_trigger=frozenset(session.order[int(r[0]) - 1] for r in refused.fetchall()),
    )


def run_checks(session: Session, *, lock_holder: str | None) -> list[Finding]:
    """The checks that need nothing staged, in the order they are reported.

    The checks that need the snapshot's rows (its integrity against the manifest, the
    scope's closure, outside references, auth user conflicts, the plan) are the apply's, made
    once it has staged them (:mod:`snapshot.apply.staged_checks`).
    """
    live = session.snapshot.manifest.kind == LIVE
    findings: list[Finding] = []
    if not live:
        findings += _integrity(session)
    findings += _identity(session)
    asked = _ask(session)
    findings += _scope(session, asked)
    findings += _tooling(session)
    if lock_holder:
        findings.append(
            Finding(
                "one apply at a time",
                ERROR,
                f"another snapshot apply or rollback is running against {session.target.env} "
                f"({lock_holder}): wait for it to finish",
            )
        )
    else:
        findings.append(Finding("one apply at a time", OK, "no other apply or rollback runs"))
    findings += _schema(session)
    findings += _migrations(session, asked)
    findings += _privileges(session, asked)
    findings += _triggers(session, asked)
    findings += _order(session)
    findings.append(_scripts(session))
    return findings


def rows_left_for_later(*, live: bool) -> Finding:
    """What the staged checks would have said, when they cannot run yet.

    ``live``: the cutover's first look at a source not taken yet; else errors above stop it.
    """
    if live:
        return Finding(
            "snapshot rows",
            OK,
            "outside references and auth user conflicts are checked by the apply, once the "
            "snapshot is taken and before any write",
        )
    return Finding(
        "snapshot rows",
        WARNING,
        "scope closure, outside references, auth user conflicts and the plan are "
        "checked once the errors above are fixed (they need the snapshot staged)",
    )


def _scripts(session: Session) -> Finding:
    """Which pre, post and smoke scripts will run, from the user's folder or bundled."""
    from snapshot import scripts

    try:
        return Finding("scripts", OK, scripts.describe(session.config))
    except SnapshotError as exc:
        return Finding("scripts", ERROR, str(exc))
