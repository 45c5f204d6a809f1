"""The checks that need the snapshot staged: run once the apply has prepared (:mod:`.prepare`).

``snapshot check`` and ``apply`` make the same preparation and then these checks, so a check
that says ready is followed by an apply that finds nothing new before its lock: the staged
rows against the manifest, the references from outside the scope judged against the plan
(:mod:`.outside`), the snapshot's references leaving the scope, auth user conflicts, how
large writes check their foreign keys, and the plan itself, as findings.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from typing import Any, LiteralString

import psycopg
from psycopg import sql

from snapshot import staging, text
from snapshot.apply import outside, replica
from snapshot.apply import rows as rowsets
from snapshot.apply.auth import mask_email
from snapshot.apply.plan import Plan
from snapshot.apply.state import ApplyRun
from snapshot.checksum import TableStats, kind_of, table_stats_later
from snapshot.direction import CREATE_AUTH_USERS
from snapshot.manifest import TableEntry
from snapshot.names import AUTH_IDENTITIES, AUTH_USERS, TableName, quote
from snapshot.preflight import ERROR, OK, WARNING, Finding


def staged_checks(run: ApplyRun) -> list[Finding]:
    """Every check that needs the snapshot staged and the apply planned, in report order."""
    assert run.plan is not None, "the apply prepares before these checks"
    users = next((e for e in run.auth_entries if e.table == AUTH_USERS), None)
    with run.conn.pipeline():  # their first questions in one round trip
        integrity = _staged_rows_later(run)
        references = _outside_references_later(run)
        keys = _unique_keys_later(run.conn, users.column_names) if users is not None else None
    findings = [*integrity(), *_closure(run), *references()]
    findings += _auth_conflicts(run, keys() if keys is not None else [])
    in_bulk, how = _key_checks(run, run.plan)
    findings += _plan_findings(run, run.plan, in_bulk=in_bulk)
    return findings + how


def first_look(run: ApplyRun) -> list[Finding]:
    """Before the source is even taken (the cutover's first look): the references from
    outside the scope, counted only; the apply judges them once the snapshot is staged."""
    return list(_closure(run, staged=False))


def _scalar(
    conn: psycopg.Connection, query: LiteralString | sql.Composed, params: tuple[Any, ...] = ()
) -> Any:
    row = conn.execute(query, params).fetchone()
    return row[0] if row else None


def _not_null(columns: tuple[str, ...]) -> sql.Composable:
    return sql.SQL(" AND ").join(
        sql.SQL("{} IS NOT NULL").format(sql.Identifier(c)) for c in columns
    )


def _closure(run: ApplyRun, *, staged: bool = True) -> Iterator[Finding]:
    """Foreign keys from outside the scope into it: the rows the apply would take from under
    them, judged as the apply judges them (:mod:`snapshot.apply.outside`).

    Before anything is staged (the cutover's first look at a live source) the references
    are only counted: the apply decides once the snapshot is staged, before any write.
    """
    refs = run.outside if staged else outside.survey(run, staged=False)
    if not refs:
        yield Finding("scope closure", OK, "no foreign key from outside the scope refers to it")
    for ref in refs:
        status, detail = outside.verdict(run, ref, run.options.allowed, staged=staged)
        yield Finding("scope closure", status, detail)
    direct = {ref.fk.parent for ref in refs if ref.rows}
    for kept in run.kept.values():
        if kept.table not in direct:
            yield Finding("scope closure", WARNING, kept.sentence(run.target.env))


def _outside_references_later(run: ApplyRun) -> Callable[[], list[Finding]]:
    """Snapshot rows that point at rows outside the scope the target lacks: asked now (in
    the caller's pipeline), judged when called."""
    scoped = set(run.order)
    auth_copied = any(e.table == AUTH_USERS for e in run.auth_entries)
    asked = []
    for fk in run.fks:
        if fk.child not in scoped or fk.parent in scoped:
            continue
        entry = run.entries[fk.child]
        stage = staging.staging_table(entry)
        match = sql.SQL(" AND ").join(
            sql.SQL("p.{} = s.{}").format(sql.Identifier(pc), sql.Identifier(cc))
            for pc, cc in zip(fk.parent_columns, fk.columns, strict=True)
        )
        query: sql.Composed = sql.SQL(
            "SELECT count(*) FROM {} s WHERE {} AND NOT EXISTS (SELECT 1 FROM {} p WHERE {})"
        ).format(stage, _not_null(fk.columns), fk.parent.ident, match)
        if fk.parent == AUTH_USERS and auth_copied:
            users = next(e for e in run.auth_entries if e.table == AUTH_USERS)
            query = sql.SQL("{} AND NOT EXISTS (SELECT 1 FROM {} p WHERE {})").format(
                query, staging.staging_table(users), match
            )
        asked.append((fk, run.conn.execute(query)))

    def judged() -> list[Finding]:
        findings = []
        for fk, cursor in asked:
            row = cursor.fetchone()
            count = int(row[0]) if row else 0
            if not count:
                continue
            if fk.parent != AUTH_USERS:
                fix = f"add {fk.parent} to the scope, or create those rows in the target first"
            elif run.auth_withheld:
                fix = f"pass {CREATE_AUTH_USERS} to create them from the snapshot"
            else:
                fix = "copy auth users (auth_users = true)"
            findings.append(
                Finding(
                    "outside references",
                    ERROR,
                    f"{text.count(count, 'snapshot row')} of {fk.child} "
                    f"{'points' if count == 1 else 'point'} at {fk.parent} rows the target "
                    f"lacks ({fk}): {fix}",
                )
            )
        return findings or [
            Finding("outside references", OK, "every key leaving the scope finds its row")
        ]

    return judged


_Keys = list[tuple[list[str], str | None]]


def _unique_keys_later(conn: psycopg.Connection, staged: Collection[str]) -> Callable[[], _Keys]:
    """The target's unique keys on auth.users (not the id) over staged plain columns, asked
    now (in the caller's pipeline) and read when called.

    Each with its predicate: Supabase's email index covers only ``is_sso_user = false``,
    so an SSO user may share a password user's email; conflicts follow the real index.
    """
    cursor = conn.execute(
        "SELECT array_agg(a.attname::text ORDER BY k.n), pg_get_expr(i.indpred, i.indrelid) "
        "FROM pg_index i CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(num, n) "
        "JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.num "
        "WHERE i.indrelid = 'auth.users'::regclass AND i.indisunique AND NOT i.indisprimary "
        "AND i.indisvalid AND 0 <> ALL (i.indkey::int2[]) GROUP BY i.indexrelid, i.indpred, "
        "i.indrelid ORDER BY i.indexrelid"
    )
    return lambda: [
        (list(cols), pred) for cols, pred in cursor.fetchall() if set(cols) <= set(staged)
    ]


def _same_value(column: str) -> sql.Composable:
    """``t.column = s.column``; emails compared case-insensitively, as Supabase Auth does.

    Auth finds a user by ``lower(email)``: ``Conflict@Example.com`` and
    ``conflict@example.com`` are one person to it, though the unique index takes both.
    """
    if column == "email":
        return sql.SQL("lower(t.{c}) = lower(s.{c})").format(c=sql.Identifier(column))
    return sql.SQL("t.{c} = s.{c}").format(c=sql.Identifier(column))


def _auth_conflicts(run: ApplyRun, keys: _Keys) -> Iterator[Finding]:
    """Snapshot users to create whose email or phone already belongs to another target user
    (``keys``: the target's unique keys on auth.users, :func:`_unique_keys_later`)."""
    users = next((e for e in run.auth_entries if e.table == AUTH_USERS), None)
    if users is None:
        return
    stage = staging.staging_table(users)
    questions: list[tuple[str, sql.Composed]] = []
    for columns, predicate in keys:
        covered = sql.SQL(" WHERE {}").format(sql.SQL(predicate)) if predicate else sql.SQL("")
        same = sql.SQL(" AND ").join(_same_value(c) for c in columns)
        # OFFSET 0 keeps the LIMIT from choosing the join: with no conflict (the usual
        # case) a nested loop over lower(email) compares every pair (6 s for 9,000 users);
        # a hash join reads each side once.
        query = sql.SQL(
            "SELECT * FROM (SELECT s.id, s.email, t.id AS other FROM "
            "(SELECT * FROM {stage}{covered}) s "
            "JOIN (SELECT * FROM auth.users{covered}) t ON {same} AND t.id <> s.id "
            "WHERE NOT EXISTS (SELECT 1 FROM auth.users u WHERE u.id = s.id) OFFSET 0) AS found "
            "ORDER BY id LIMIT 20"
        ).format(stage=stage, covered=covered, same=same)
        questions.append((" and ".join(columns), query))
    identities = next((e for e in run.auth_entries if e.table == AUTH_IDENTITIES), None)
    taken = (
        sql.SQL(
            "SELECT i.user_id, i.provider FROM {ids} i JOIN auth.identities t "
            "ON t.provider_id = i.provider_id AND t.provider = i.provider "
            "WHERE NOT EXISTS (SELECT 1 FROM auth.users u WHERE u.id = i.user_id) LIMIT 20"
        ).format(ids=staging.staging_table(identities))
        if identities is not None
        else None
    )
    creating = sql.SQL(
        "SELECT count(*) FROM {} s WHERE NOT EXISTS (SELECT 1 FROM auth.users u WHERE u.id = s.id)"
    ).format(stage)
    found, identity_rows, created = _ask_auth(run.conn, questions, taken, creating)
    conflicts = [
        f"{source_id} ({mask_email(email)}) has the {what} of {target_id}"
        for what, rows in found
        for source_id, email, target_id in rows
    ]
    conflicts += [
        f"{user_id}'s {provider} identity belongs to another target user"
        for user_id, provider in identity_rows
    ]
    if conflicts:
        yield Finding(
            "auth users",
            ERROR,
            f"{text.count(len(conflicts), 'snapshot user')} cannot be created in {run.target.env}: "
            + "; ".join(conflicts)
            + ". Resolve them in either project (Authentication > Users), then apply again",
        )
    else:
        yield Finding(
            "auth users",
            OK,
            f"{text.count(created, 'snapshot user')} will be created, "
            f"{'it does not conflict' if created == 1 else 'none conflict'}",
        )


_Rows = list[tuple[Any, ...]]


def _ask_auth(
    conn: psycopg.Connection,
    questions: Sequence[tuple[str, sql.Composed]],
    taken: sql.Composed | None,
    creating: sql.Composed,
) -> tuple[list[tuple[str, _Rows]], _Rows, int]:
    """The auth checks' answers: conflicts per unique key, identities taken, users to create.

    One round trip (a pipeline) in the preparation's autocommit session. A unique key whose
    predicate reads a column the snapshot lacks fails its question: then they are asked one
    at a time, that key's skipped (:func:`_tolerant`).
    """
    if conn.autocommit and conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE:
        try:
            with conn.pipeline():
                asked = [(what, conn.execute(query)) for what, query in questions]
                ids = conn.execute(taken) if taken is not None else None
                count = conn.execute(creating)
            row = count.fetchone()
            return (
                [(what, cursor.fetchall()) for what, cursor in asked],
                ids.fetchall() if ids is not None else [],
                int(row[0]) if row else 0,
            )
        except psycopg.OperationalError:
            raise
        except psycopg.Error:
            pass  # asked again one at a time, below
    found = []
    for what, query in questions:
        try:  # a predicate over a column the snapshot lacks fails
            found.append((what, _tolerant(conn, query)))
        except psycopg.Error:
            continue
    identity_rows = conn.execute(taken).fetchall() if taken is not None else []
    return found, identity_rows, int(_scalar(conn, creating) or 0)


def _tolerant(conn: psycopg.Connection, query: sql.Composed) -> list[tuple[Any, ...]]:
    """``query``'s rows, its failure leaving the session as it was: outside a transaction
    (the preparation's autocommit session) a statement is its own, one round trip; inside
    one, in a savepoint."""
    if conn.autocommit and conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE:
        return conn.execute(query).fetchall()
    with conn.transaction():
        return conn.execute(query).fetchall()


def _staged_rows_later(run: ApplyRun) -> Callable[[], Iterator[Finding]]:
    """The staged rows against the manifest: a swapped dump or an edited manifest stops
    here. Every table's statistics asked now (in the caller's pipeline), judged when called."""
    entries = [*run.entries.values(), *run.auth_entries]
    hashed_later = rowsets.stats_later(run.conn, list(run.row_sets.values()), rowsets.SNAPSHOT)
    others = {
        entry.table: table_stats_later(
            run.conn,
            staging.staging_table(entry),
            entry.column_names,
            kind=kind_of(entry.checksum),
        )
        for entry in entries
        if entry.table not in run.row_sets
    }
    return lambda: _judge_staged_rows(run, entries, hashed_later(), others)


def _judge_staged_rows(
    run: ApplyRun,
    entries: Sequence[TableEntry],
    hashed: Mapping[TableName, TableStats],
    others: Mapping[TableName, Callable[[], TableStats]],
) -> Iterator[Finding]:
    wrong = []
    by_key = {t for t, changes in run.sparse.items() if changes.by_key}
    for entry in entries:
        staged = hashed[entry.table] if entry.table in hashed else others[entry.table]()
        if staged == TableStats(entry.rows, entry.checksum):
            continue
        if entry.table in by_key and staged.rows == entry.rows:
            continue  # the target's own versions of the logins it has (sparse.Sparse.by_key)
        if staged.rows != entry.rows:
            wrong.append(f"{entry.table} ({staged.rows:,} rows, the manifest says {entry.rows:,})")
        else:
            wrong.append(f"{entry.table} (its checksum differs)")
    if wrong:
        yield Finding(
            "snapshot integrity",
            ERROR,
            f"the rows in {run.snapshot.id}'s data.dump contradict its manifest: "
            f"{', '.join(wrong)}; the dump was replaced or the manifest edited: take a new "
            "snapshot",
        )
    else:
        yield Finding(
            "snapshot integrity",
            OK,
            f"the staged rows of {len(entries)} tables match the manifest's counts and checksums",
        )


def _key_checks(run: ApplyRun, plan: Plan) -> tuple[bool, list[Finding]]:
    """Whether a large change checks its foreign keys in bulk, and a finding saying how
    (a small one goes row by row, unsaid)."""
    in_bulk, why = replica.choose(run, plan)
    if in_bulk:
        detail = (
            f"{plan.changes:,} rows to write: their foreign keys are checked in bulk after the "
            "writes (session_replication_role = replica, the app's triggers set to fire always "
            "meanwhile); readers never wait"
        )
        return True, [Finding("plan", OK, detail)]
    if why is None:
        return False, []
    detail = f"{plan.changes:,} rows to write, foreign keys checked row by row: {why}"
    return False, [Finding("plan", OK, detail)]


def _plan_findings(run: ApplyRun, plan: Plan, *, in_bulk: bool = False) -> Iterator[Finding]:
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
                f"{run.action} undoes (by the app, or a later apply) will be thrown away: "
                + "; ".join(w.sentence() for w in lost)
                + f"; only its pre-{run.action} backup keeps them",
            )
        else:
            yield Finding(
                "written since", OK, f"no row written since the apply this {run.action} undoes"
            )
    people = plan.auth
    if people is None:
        return
    if people.create:
        yield Finding(
            "new logins",
            OK,
            f"{people.create_sentence(run.target.env)} (auth users are never updated)",
        )
    for trigger in people.triggers:
        outside = trigger.opaque or any(t not in run.order for t in trigger.writes)
        yield Finding(
            "auth triggers",
            WARNING if outside else OK,
            f"{trigger.sentence(run.order)}: it fires as the {people.create:,} snapshot users "
            f"are created; the report counts the rows it writes"
            + (" (rows written outside the scope stay)" if outside else ""),
        )
    if people.orphaned:
        setting = run.config.apply.orphaned_users
        status = ERROR if setting == "error" else WARNING
        fix = (
            '; [apply] orphaned_users = "error" in snapshot.toml refuses such applies'
            if status == WARNING
            else ": copy those users' rows to the source first, or set [apply] orphaned_users "
            '= "warn" in snapshot.toml to accept it'
        )
        yield Finding("orphaned users", status, people.orphaned_sentence(run.target.env) + fix)
