"""``snapshot apply`` and ``rollback``: replace the target's scope with a snapshot, atomically.

The recipe, with every trigger and constraint on (no ``session_replication_role``, no
``DISABLE TRIGGER``), in one REPEATABLE READ transaction that commits only when the
target's checksums equal the snapshot's:

1. stage the snapshot's rows in temporary tables (before any lock is taken);
2. lock the scoped tables against writers; archive a pre-apply backup of exactly the
   locked state (pg_dump in the transaction's exported snapshot);
3. pre-scripts (default: every target question to ``draft``);
4. create the snapshot's auth users the target lacks, and their identities (insert only;
   done before the deletes, so rows a ``handle_new_user`` trigger adds are replaced too);
5. delete the scoped rows children first; insert the snapshot's rows parents first, with
   ``insert_as`` overrides (questions as drafts);
6. restart owned sequences at the snapshot's values;
7. post-scripts (default: questions get their snapshot status back);
8. parity: counts and checksums against the manifest; commit, or roll back and report.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from snapshot import archive, catalog, preflight, scripts, staging
from snapshot.archive import Snapshot
from snapshot.checksum import TableStats, table_stats
from snapshot.config import Config
from snapshot.environments import Connection
from snapshot.errors import ApplyFailed, Refused, ScriptFailed, SnapshotError
from snapshot.names import AUTH_IDENTITIES, AUTH_USERS, TableName
from snapshot.parity import TableParity, name_columns
from snapshot.session import Session, apply_lock_holder, open_session, release_apply_lock
from snapshot.take import DumpPlan, dump_in_snapshot, export_snapshot

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AuthOutcome:
    """What the apply did to auth users: it only ever creates them."""

    snapshot_users: int
    created_users: int
    created_identities: int
    missing_after: int

    def to_json(self) -> dict[str, Any]:
        return {
            "snapshot_users": self.snapshot_users,
            "created_users": self.created_users,
            "created_identities": self.created_identities,
            "missing_after": self.missing_after,
        }


@dataclass(frozen=True)
class ApplyReport:
    """The outcome of an apply or rollback (also of a dry run)."""

    action: str
    target: str
    snapshot: str
    dry_run: bool
    committed: bool
    tables: tuple[TableParity, ...]
    auth: AuthOutcome | None
    backup: str | None
    phases: tuple[tuple[str, float], ...]
    notes: tuple[str, ...] = ()

    @property
    def matches(self) -> bool:
        return all(t.match for t in self.tables) and (
            self.auth is None or self.auth.missing_after == 0
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "target": self.target,
            "snapshot": self.snapshot,
            "dry_run": self.dry_run,
            "committed": self.committed,
            "matches": self.matches,
            "backup": self.backup,
            "tables": [t.to_json() for t in self.tables],
            "auth": self.auth.to_json() if self.auth else None,
            "phases": [{"phase": p, "seconds": round(s, 3)} for p, s in self.phases],
            "notes": list(self.notes),
        }


@dataclass(frozen=True)
class ApplyPlan:
    """What an apply is about to do, shown to the user before confirming."""

    action: str
    target: Connection
    snapshot: Snapshot
    order: tuple[TableName, ...]
    dry_run: bool


Confirm = Callable[[ApplyPlan], bool]


class _Phases:
    """Names the phase running (for error messages) and times each one."""

    def __init__(self) -> None:
        self.current = "preparing"
        self.done: list[tuple[str, float]] = []

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self.current = name
        started = time.monotonic()
        log.info("%s…", name)
        yield
        self.done.append((name, time.monotonic() - started))


def settle_orphaned_backups(
    config: Config, target: Connection, conn: psycopg.Connection
) -> list[str]:
    """Resolve backups left sealed but unpublished by a process that died at commit time.

    If the target still holds exactly the backup's rows, its apply never committed and the
    backup is removed; otherwise the apply committed, and the backup is published.
    """
    notes = []
    for orphan in archive.orphaned_backups(config.archive, target.env):
        unchanged = all(
            table_stats(conn, e.table, e.column_names) == TableStats(e.rows, e.checksum)
            for e in orphan.manifest.scope_tables
        )
        if unchanged:
            archive.discard(orphan)
        else:
            published = archive.publish(orphan, orphan.manifest.label)
            notes.append(f"recovered backup {published.id} of an apply that committed")
            log.warning("recovered %s: its apply committed before the process died", published.id)
    return notes


# --- the steps -----------------------------------------------------------------------------


def _lock(run: Session) -> None:
    timeout = run.config.apply.lock_timeout
    run.conn.execute("SELECT set_config('lock_timeout', %s, true)", (timeout,))
    for table in run.order:
        try:
            run.conn.execute(sql.SQL("LOCK TABLE {} IN EXCLUSIVE MODE").format(table.ident))
        except psycopg.errors.LockNotAvailable:
            raise ApplyFailed(
                f"could not lock {table} on {run.target.env} within {timeout}: another session "
                "is writing to it (see pg_stat_activity); retry in a quieter moment or raise "
                "[apply] lock_timeout; nothing was changed"
            ) from None
    run.conn.execute("SELECT set_config('lock_timeout', '0', true)")


def _row_counts(run: Session) -> dict[TableName, int]:
    counts = {}
    for table in run.order:
        row = run.conn.execute(sql.SQL("SELECT count(*) FROM {}").format(table.ident)).fetchone()
        counts[table] = int(row[0]) if row else 0
    return counts


def _backup(run: Session, folder: Path) -> Snapshot:
    """Dump the locked state in this transaction's snapshot; sealed, published at commit."""
    assert run.pg_dump is not None
    plan = DumpPlan(run.target, run.info, run.pg_dump, run.config.scope, run.shapes)
    kind = f"pre-{run.action}"
    manifest = dump_in_snapshot(
        run.conn,
        plan,
        export_snapshot(run.conn),
        folder,
        kind=kind,
        label=kind,
        applies=run.snapshot.id,
    )
    return archive.seal(folder, manifest)


def _create_auth_users(run: Session) -> tuple[int, int]:
    users = next((e for e in run.auth_entries if e.table == AUTH_USERS), None)
    identities = next((e for e in run.auth_entries if e.table == AUTH_IDENTITIES), None)
    if users is None:
        return 0, 0
    conn = run.conn
    conn.execute("CREATE TEMP TABLE snapshot_created_users (id uuid PRIMARY KEY) ON COMMIT DROP")
    columns = sql.SQL(", ").join(map(sql.Identifier, users.column_names))
    created = conn.execute(
        sql.SQL(
            "WITH created AS (INSERT INTO auth.users ({cols}) SELECT {cols} FROM {stage} s "
            "WHERE NOT EXISTS (SELECT 1 FROM auth.users u WHERE u.id = s.id) RETURNING id) "
            "INSERT INTO pg_temp.snapshot_created_users SELECT id FROM created"
        ).format(cols=columns, stage=staging.staging_table(users))
    ).rowcount
    made_identities = 0
    if identities is not None and created:
        id_columns = sql.SQL(", ").join(map(sql.Identifier, identities.column_names))
        made_identities = conn.execute(
            sql.SQL(
                "INSERT INTO auth.identities ({cols}) SELECT {cols} FROM {stage} s "
                "WHERE s.user_id IN (SELECT id FROM pg_temp.snapshot_created_users)"
            ).format(cols=id_columns, stage=staging.staging_table(identities))
        ).rowcount
    log.info("  created %d auth users, %d identities", created, made_identities)
    return created, made_identities


def _helper_indexes(run: Session) -> list[sql.Identifier]:
    """Index foreign keys that have none, for the deletes' checks; dropped before commit.

    Deleting a parent row makes PostgreSQL look for referencing child rows; without an
    index each look scans the child table: quadratic. These indexes exist only inside the
    transaction. They are built before anything in it writes: an index built after this
    transaction updated its table is flagged ``indcheckxmin`` and useless until commit.
    """
    created: list[sql.Identifier] = []
    scoped = set(run.order)
    owned = {
        t
        for t in scoped
        if run.conn.execute(
            "SELECT pg_has_role(relowner, 'USAGE') FROM pg_class WHERE oid = %s::regclass",
            (t.ident.as_string(run.conn),),
        ).fetchone()
        == (True,)
    }
    for fk in catalog.unindexed_foreign_keys(run.conn, run.fks):
        if fk.child in owned and fk.parent in scoped and fk.child != fk.parent:
            name = f"snapshot_apply_fk_{len(created)}"
            run.conn.execute(
                sql.SQL("CREATE INDEX {} ON {} ({})").format(
                    sql.Identifier(name),
                    fk.child.ident,
                    sql.SQL(", ").join(map(sql.Identifier, fk.columns)),
                )
            )
            created.append(sql.Identifier(fk.child.schema, name))
    unusable = run.conn.execute(
        "SELECT indrelid::regclass::text FROM pg_index WHERE indcheckxmin "
        "AND indexrelid = ANY(%s::regclass[])",
        ([i.as_string(run.conn) for i in created],),
    ).fetchall()
    for (table,) in unusable:
        run.notes.append(
            f"the helper index on {table} cannot serve this transaction (a long-running "
            "session holds old row versions): deleting its parents may be slow"
        )
    if created:
        log.info("  indexed %d foreign keys for the deletes (dropped before commit)", len(created))
    return created


def _delete(run: Session) -> None:
    started = time.monotonic()
    for table in reversed(run.order):
        rows = run.conn.execute(sql.SQL("DELETE FROM {}").format(table.ident)).rowcount
        log.info("  deleted %-29s %10d rows  %6.1f s", table, rows, time.monotonic() - started)


def _insert(run: Session) -> None:
    started = time.monotonic()
    overrides = run.config.apply.insert_as
    for table in run.order:
        entry = run.entries[table]
        shape = run.shapes[table]
        types = {c.name: c.type for c in shape.columns}
        values = []
        for column in entry.column_names:
            override = next(
                (v for c, v in overrides.items() if c.table == table and c.column == column), None
            )
            values.append(
                sql.SQL("CAST({} AS {})").format(sql.Literal(override), sql.SQL(types[column]))
                if override is not None
                else sql.Identifier(column)
            )
        query = sql.SQL("INSERT INTO {} ({}) {}SELECT {} FROM {}").format(
            table.ident,
            sql.SQL(", ").join(map(sql.Identifier, entry.column_names)),
            sql.SQL("OVERRIDING SYSTEM VALUE ") if shape.identity_always else sql.SQL(""),
            sql.SQL(", ").join(values),
            staging.staging_table(entry),
        )
        rows = run.conn.execute(query).rowcount
        log.info("  inserted %-28s %10d rows  %6.1f s", table, rows, time.monotonic() - started)


def _restart_sequences(run: Session) -> int:
    """Restart each owned sequence at the snapshot's next value (never below the data)."""
    archived = {(s.table, s.column): s for s in run.snapshot.manifest.sequences}
    restarted = 0
    for current in catalog.owned_sequences(run.conn, run.order):
        snap = archived.get((current.table, current.column))
        if snap is None:
            run.notes.append(f"{current.sequence} is not in the snapshot: left as it was")
            continue
        value = snap.next_value
        if current.increment > 0:
            row = run.conn.execute(
                sql.SQL("SELECT max({})::bigint FROM {}").format(
                    sql.Identifier(current.column), current.table.ident
                )
            ).fetchone()
            highest = row[0] if row else None
            if highest is not None and highest >= value:
                value = highest + current.increment
                run.notes.append(f"{current.sequence} restarts at {value}, above its data")
        run.conn.execute(
            sql.SQL("ALTER SEQUENCE {} RESTART WITH {}").format(
                current.sequence.ident, sql.Literal(value)
            )
        )
        restarted += 1
    log.info("  restarted %d sequences", restarted)
    return restarted


def _parity(run: Session, before: Mapping[TableName, int]) -> list[TableParity]:
    results = []
    for table in run.config.scope.tables:
        entry = run.entries[table]
        ignored = tuple(c for c in run.config.ignored_columns(table) if c in entry.column_names)
        stage = staging.staging_table(entry)
        actual = table_stats(run.conn, table, entry.column_names, ignored)
        expected = (
            table_stats(run.conn, stage, entry.column_names, ignored)
            if ignored
            else TableStats(entry.rows, entry.checksum)
        )
        match = actual == expected
        columns: tuple[str, ...] = ()
        if not match:
            used = [c for c in entry.column_names if c not in ignored]
            columns = name_columns(run.conn, table, run.conn, stage, used)
        results.append(
            TableParity(
                table=table,
                source_rows=entry.rows,
                target_rows=actual.rows,
                match=match,
                target_rows_before=before[table],
                columns=columns,
                ignored=ignored,
            )
        )
    return results


def _auth_missing(run: Session) -> int:
    users = next((e for e in run.auth_entries if e.table == AUTH_USERS), None)
    if users is None:
        return 0
    row = run.conn.execute(
        sql.SQL(
            "SELECT count(*) FROM {} s "
            "WHERE NOT EXISTS (SELECT 1 FROM auth.users u WHERE u.id = s.id)"
        ).format(staging.staging_table(users))
    ).fetchone()
    return int(row[0]) if row else 0


# --- the whole -----------------------------------------------------------------------------


def run_apply(
    config: Config,
    target_env: str,
    snapshot: Snapshot,
    *,
    action: str = "apply",
    dry_run: bool = False,
    confirm: Confirm | None = None,
    pg_bin: Path | None = None,
    allow_cascades: Collection[str] = (),
) -> ApplyReport:
    """Apply ``snapshot`` to ``target_env`` (see the module docstring for the recipe).

    The preflight runs first, with the apply lock held; any error stops everything
    before the first write (:class:`PreflightFailed` carries its report).
    """
    phases = _Phases()
    with open_session(
        config, target_env, snapshot, action=action, pg_bin=pg_bin, backup=not dry_run
    ) as session:
        with phases("preflight"):
            holder = apply_lock_holder(session.conn)
            if holder is None and not dry_run:
                session.notes += settle_orphaned_backups(config, session.target, session.conn)
            checks = preflight.run_checks(
                session, lock_holder=holder, allow_cascades=allow_cascades
            )
        for finding in checks.findings:
            if finding.status == preflight.WARNING:
                log.warning("warning: %s: %s", finding.check, finding.detail)
        if not checks.ok:
            raise preflight.PreflightFailed(checks)
        plan = ApplyPlan(action, session.target, snapshot, session.order, dry_run)
        if confirm is not None and not confirm(plan):
            raise Refused(f"{action} to {target_env} cancelled: nothing was changed")
        return _execute(session, phases, dry_run)


def check(
    config: Config,
    target_env: str,
    snapshot: Snapshot,
    *,
    pg_bin: Path | None = None,
    allow_cascades: Collection[str] = (),
) -> preflight.PreflightReport:
    """The preflight alone (``snapshot check``): changes nothing."""
    with open_session(
        config, target_env, snapshot, action="apply", pg_bin=pg_bin, backup=True
    ) as session:
        holder = apply_lock_holder(session.conn)
        try:
            return preflight.run_checks(session, lock_holder=holder, allow_cascades=allow_cascades)
        finally:
            if holder is None:
                release_apply_lock(session.conn)


def _execute(run: Session, phases: _Phases, dry_run: bool) -> ApplyReport:
    env = run.target.env
    log.info(
        "%s %s to %s (%s)%s",
        run.action,
        run.snapshot.id,
        env,
        run.target.describe(),
        " as a dry run" if dry_run else "",
    )
    assert run.staged, "the preflight stages the snapshot"
    try:
        if dry_run:
            report, _ = _transaction(run, phases, None, commit=False)
            return report
        with archive.pending_snapshot(run.config.archive, env) as folder:
            report, backup = _transaction(run, phases, folder, commit=True)
            if not report.committed or backup is None:
                return report
            # Published only now: a backup never claims an apply that did not commit.
            published = archive.publish(backup, backup.manifest.label)
        return replace(report, backup=published.id)
    except ScriptFailed as exc:
        raise ScriptFailed(f"{exc}; rolled back, {env} is unchanged") from None
    except SnapshotError:
        raise
    except psycopg.OperationalError as exc:
        raise ApplyFailed(
            f"lost the connection to {env} while {phases.current} "
            f"({scripts.error_message(exc)}): the server rolls the transaction back, so "
            f"{env} is unchanged"
        ) from None
    except psycopg.Error as exc:
        raise ApplyFailed(
            f"{run.action} to {env} failed while {phases.current}: "
            f"{scripts.error_message(exc)}; rolled back, {env} is unchanged"
        ) from None


def _transaction(
    run: Session, phase: _Phases, folder: Path | None, *, commit: bool
) -> tuple[ApplyReport, Snapshot | None]:
    """The locked, all-or-nothing part; commits only when ``commit`` and parity holds."""
    conn = run.conn
    backup = None
    conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
    conn.read_only = False
    with conn.transaction() as tx:
        with phase("locking"):
            _lock(run)
            helpers = _helper_indexes(run)
        if folder is not None:
            with phase(f"backing up {run.target.env}"):
                backup = _backup(run, folder)
                before = {t.table: t.rows for t in backup.manifest.scope_tables}
        else:
            with phase("counting the target's rows"):
                before = _row_counts(run)
        with phase("pre-scripts"):
            scripts.run(conn, scripts.scripts(run.config, "pre"), "pre")
        created = (0, 0)
        if run.auth_entries:
            with phase("creating auth users"):
                created = _create_auth_users(run)
        with phase("deleting"):
            _delete(run)
            for index in helpers:
                conn.execute(sql.SQL("DROP INDEX {}").format(index))
        with phase("inserting"):
            _insert(run)
        with phase("sequences"):
            _restart_sequences(run)
        with phase("post-scripts"):
            scripts.run(conn, scripts.scripts(run.config, "post"), "post")
        with phase("verifying"):
            tables = tuple(_parity(run, before))
            auth = _auth_outcome(run, *created)
        report = ApplyReport(
            action=run.action,
            target=run.target.env,
            snapshot=run.snapshot.id,
            dry_run=not commit,
            committed=False,
            tables=tables,
            auth=auth,
            backup=None,
            phases=tuple(phase.done),
            notes=tuple(run.notes),
        )
        keep = commit and report.matches
        if not keep:
            raise psycopg.Rollback(tx)  # leaves the block, rolling back; nothing raised
        phase.current = "committing"
    return (replace(report, committed=True) if keep else report), backup


def _auth_outcome(run: Session, created_users: int, created_identities: int) -> AuthOutcome | None:
    users = next((e for e in run.auth_entries if e.table == AUTH_USERS), None)
    if users is None:
        return None
    return AuthOutcome(
        snapshot_users=users.rows,
        created_users=created_users,
        created_identities=created_identities,
        missing_after=_auth_missing(run),
    )
