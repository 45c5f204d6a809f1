"""``snapshot apply`` and ``rollback``: make the target's scope equal a snapshot, atomically,
writing only the rows that differ.

Every app trigger fires and every constraint holds (no ``DISABLE TRIGGER``; a large change
checks its foreign keys in bulk instead of row by row, :mod:`.replica`) and everything
happens in one REPEATABLE READ transaction that commits only when every row of every
scoped table matches the snapshot. The recipe:

Before any lock (the target's writers go on):
  1. preflight (:mod:`snapshot.preflight`): integrity, identity, schema, privileges, scope
     closure...;
  2. plan (:mod:`.plan`): the pre-apply backup's snapshot exported (:mod:`.backup`), the
     target's rows recorded in it; the snapshot's rows staged in temporary tables (tables
     the record shows prod already holds are copied from prod inside the server); then
     pg_dump started in the exported snapshot (the backup runs in the background and is
     joined before the commit) while both sides are compared row by row, every row
     classified (insert, update, delete, unchanged), each table written as a delta or
     replaced in full; shown before the confirmation.
Under the lock (writers wait, readers go on):
  3. once pg_dump holds its own locks, lock the scope;
  4. reconcile the plan with rows written since the record (:mod:`.rows`); copy them into
     the backup beside pg_dump's file;
  5. create the snapshot's auth users the target lacks (:mod:`.auth`), insert only;
  6. in a savepoint: pre-scripts, the writes (:mod:`.write`; foreign keys checked in bulk
     after them when the change is large, :mod:`.replica`), post-scripts, parity
     (:mod:`.proof`). A table whose delta cannot be applied cleanly is replaced in full
     instead, within the same transaction, and the report says so;
  7. sequences (:mod:`.sequences`); the backup joined; commit. Or roll back: nothing changed.
"""

from __future__ import annotations

import contextlib
import logging
import random
import signal
import threading
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from snapshot import archive, interrupts, preflight, progress, scripts, text
from snapshot.apply import auth, backup, constraints, keepers, proof, replica, sequences, write
from snapshot.apply import plan as planning
from snapshot.apply import rows as rowsets
from snapshot.apply.backup import settle_orphaned_backups
from snapshot.apply.plan import Plan
from snapshot.apply.report import ApplyPlan, ApplyReport, AuthOutcome, Confirm
from snapshot.archive import Snapshot
from snapshot.config import Config, duration_seconds
from snapshot.db import cancelled_message, connect, use_app_search_path, use_tool_search_path
from snapshot.environments import resolve_connection
from snapshot.errors import ApplyFailed, Interrupted, Refused, ScriptFailed, SnapshotError
from snapshot.names import AUTH_USERS, TableName
from snapshot.parity import TableParity
from snapshot.session import Session, apply_lock_holder, open_session, release_apply_lock

__all__ = [
    "ApplyPlan",
    "ApplyReport",
    "AuthOutcome",
    "Confirm",
    "check",
    "run_apply",
    "settle_backups",
]

log = logging.getLogger(__name__)

ATTEMPTS = 3  # the delta, then the failing tables in full, then everything in full
Progress = Callable[[str], None]


class _Phases:
    """Names the phase running (for error messages) and times each one."""

    def __init__(self, progress: Progress | None = None) -> None:
        self.current = "preparing"
        self.done: list[tuple[str, float]] = []
        self.committed = False
        self._progress = progress
        self._held: list[int] = []
        self._previous: dict[int, Any] = {}

    def hold_interrupts(self) -> None:
        """Record SIGINT (and SIGTERM, SIGHUP) instead of acting on it, until
        :meth:`release_interrupts`."""
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, *interrupts.TERMINATING):
                self._previous[signum] = signal.signal(signum, lambda n, _f: self._held.append(n))

    def release_interrupts(self, *, raise_held: bool = True) -> None:
        """Act on a signal held back (as Ctrl-C or :class:`Terminated`), once it is safe to."""
        if not self._previous:
            return
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}
        if self._held and raise_held:
            held = self._held[0]
            raise KeyboardInterrupt if held == signal.SIGINT else interrupts.Terminated(held)

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self.current = name
        started = time.monotonic()
        log.info("%s…", name)
        if self._progress:
            self._progress(name)
        yield
        self.done.append((name, time.monotonic() - started))


class _Guard(Exception):
    """Rows of these tables ended other than the snapshot's, or a write failed, where the app
    has triggers and no keeper held the tables: the same attempt again, with keepers."""

    def __init__(self, tables: Collection[TableName], why: str) -> None:
        super().__init__(why)
        self.tables = tuple(tables)
        self.why = why


class _Retry(Exception):
    """A delta that did not apply cleanly: these tables go in full on the next attempt."""

    def __init__(self, tables: Collection[TableName], why: str) -> None:
        super().__init__(why)
        self.tables = tuple(tables)
        self.why = why


# --- before the lock -----------------------------------------------------------------------


def run_apply(
    config: Config,
    target_env: str,
    snapshot: Snapshot,
    *,
    action: str = "apply",
    dry_run: bool = False,
    full: bool = False,
    confirm: Confirm | None = None,
    pg_bin: Path | None = None,
    allow_cascades: Collection[str] = (),
    progress: Progress | None = None,
    block_readers: bool = False,
    keep_referenced: bool = False,
    auth_withheld: str = "",
) -> ApplyReport:
    """Apply ``snapshot`` to ``target_env`` (see the module docstring for the recipe).

    The preflight runs first, with the apply lock held; any error stops everything before
    the first write (:class:`PreflightFailed` carries its report). ``full`` replaces every
    table in full instead of writing only what differs; ``block_readers`` checks the scope's
    own foreign keys in bulk (:mod:`.constraints`), making readers wait until the commit;
    ``keep_referenced`` (or ``[apply] keep_referenced``) keeps the rows the snapshot lacks
    that rows outside the scope refer to (:mod:`.outside`); ``auth_withheld`` says why the
    snapshot's auth users are not created (:mod:`snapshot.direction`).
    """
    phases = _Phases(progress)
    with (
        open_session(
            config,
            target_env,
            snapshot,
            action=action,
            pg_bin=pg_bin,
            backup=not dry_run,
            auth_withheld=auth_withheld,
        ) as session,
        contextlib.ExitStack() as cleanup,
    ):
        session.block_readers = block_readers
        session.keep_referenced = keep_referenced or config.apply.keep_referenced
        if not dry_run:
            session.backup_into = cleanup.enter_context(
                archive.pending_snapshot(config.archive, session.target.env)
            )
            cleanup.callback(_abandon_backup, session)
        with phases("preflight"):
            holder = apply_lock_holder(session.conn)
            if holder is None and not dry_run:
                session.notes += settle_orphaned_backups(config, session.target, session.conn)
                session.notes += _sweep_helper_indexes(session)
            checks = preflight.run_checks(
                session, lock_holder=holder, allow_cascades=allow_cascades, full=full
            )
        for finding in checks.findings:
            if finding.status == preflight.WARNING:
                log.warning("warning: %s: %s", finding.check, finding.detail)
        if not checks.ok:
            raise preflight.PreflightFailed(checks)
        assert session.plan is not None, "the preflight plans the apply once it has staged"
        if auth_withheld:
            session.notes.append(f"auth users: {auth_withheld}")
        proposal = ApplyPlan(action, session.target, snapshot, session.plan, dry_run, auth_withheld)
        if confirm is not None and not confirm(proposal):
            raise Refused(f"{action} to {target_env} cancelled: nothing was changed")
        allowed = set(allow_cascades) | set(config.preflight_allow_cascades)
        return _execute(session, phases, dry_run, allowed)


def check(
    config: Config,
    target_env: str,
    snapshot: Snapshot,
    *,
    pg_bin: Path | None = None,
    allow_cascades: Collection[str] = (),
    full: bool = False,
    keep_referenced: bool = False,
    auth_withheld: str = "",
) -> preflight.PreflightReport:
    """The preflight and the plan alone (``snapshot check``): changes nothing."""
    with open_session(
        config,
        target_env,
        snapshot,
        action="apply",
        pg_bin=pg_bin,
        backup=True,
        auth_withheld=auth_withheld,
    ) as session:
        session.keep_referenced = keep_referenced or config.apply.keep_referenced
        holder = apply_lock_holder(session.conn)
        try:
            return preflight.run_checks(
                session, lock_holder=holder, allow_cascades=allow_cascades, full=full
            )
        finally:
            if holder is None:
                release_apply_lock(session.conn)


SETTLE_WAIT = 10.0  # seconds settle_backups waits for the apply lock to be free


def settle_backups(config: Config, target_env: str, others: Collection[str] = ()) -> list[str]:
    """Publish or discard the pre-apply backups a killed apply left sealed but unlisted.

    Rollback runs this before it chooses the newest backup: an apply that committed and
    died before publishing its backup must be the one rolled back, not the one before.
    ``others``: archive folders of other names of the same database, settled too.
    """
    folders = [target_env, *others]
    if not any(archive.orphaned_backups(config.archive, f) for f in folders):
        return []
    target = resolve_connection(config.environment(target_env))
    with contextlib.closing(connect(target)) as conn:
        # The session of an apply that just ended may hold the lock a moment longer; one
        # that goes on running settles them itself, and choosing a backup before it has
        # would pick the one before it: refuse then.
        deadline = time.monotonic() + SETTLE_WAIT
        while (holder := apply_lock_holder(conn)) is not None:
            if time.monotonic() >= deadline:
                raise Refused(
                    f"another snapshot apply or rollback is running against {target_env} "
                    f"({holder}): wait for it to finish; nothing was changed"
                )
            time.sleep(0.2)
        try:
            return [
                note
                for folder in folders
                for note in settle_orphaned_backups(config, replace(target, env=folder), conn)
            ]
        finally:
            release_apply_lock(conn)


# --- under the lock ------------------------------------------------------------------------


def _execute(run: Session, phases: _Phases, dry_run: bool, allowed: Collection[str]) -> ApplyReport:
    env = run.target.env
    log.info(
        "%s %s to %s (%s)%s",
        run.action,
        run.snapshot.id,
        env,
        run.target.describe(),
        " as a dry run" if dry_run else "",
    )
    try:
        if dry_run:
            report, _, helpers = _transaction(run, phases, None, allowed, commit=False)
            return _after_commit(run, report, helpers)
        folder = run.backup_into
        assert folder is not None and run.backup is not None, "the preflight started the backup"
        try:
            report, sealed, helpers = _transaction(run, phases, folder, allowed, commit=True)
        except psycopg.OperationalError as exc:
            if phases.current != "committing":
                raise
            # The COMMIT was sent and the answer lost: it may have committed. Keep the
            # sealed backup; the next run asks the server (by transaction id) and
            # publishes or removes it.
            archive.keep_pending(folder)
            raise ApplyFailed(
                f"lost the connection to {env} while committing "
                f"({scripts.error_message(exc)}): whether the {run.action} committed is "
                f"unknown; its pre-apply backup is kept and the next apply or rollback "
                f"settles it; 'snapshot verify {run.snapshot.id} {env}' shows which"
            ) from None
        if not report.committed or sealed is None:
            return _after_commit(run, report, helpers)
        # Published only now: a backup never claims an apply that did not commit.
        published = archive.publish(sealed, sealed.manifest.label)
        phases.release_interrupts()
        return _after_commit(run, replace(report, backup=published.id), helpers)
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM/SIGHUP (snapshot.interrupts)
        stopped, code = interrupts.words(exc), interrupts.exit_code(exc)
        if phases.committed:
            raise Interrupted(
                f"{stopped} after the commit: {env} holds {run.snapshot.id}; undo "
                f"with: snapshot rollback {env}",
                code,
            ) from None
        raise Interrupted(
            f"{stopped} while {phases.current}: rolled back, {env} is unchanged", code
        ) from None
    except ScriptFailed as exc:
        raise ScriptFailed(f"{exc}; rolled back, {env} is unchanged") from None
    except SnapshotError:
        raise
    except psycopg.errors.LockNotAvailable:
        related = {*run.order, *(fk.child for fk in run.fks if fk.parent in run.order)}
        raise ApplyFailed(
            f"{run.action} to {env} waited longer than [apply] lock_timeout "
            f"({run.config.apply.lock_timeout}) for a lock while {phases.current}: "
            f"{write.lock_holders(run.conn, related, readers=run.block_readers)}; rolled back, "
            f"{env} is unchanged"
        ) from None
    except psycopg.errors.QueryCanceled as exc:
        raise ApplyFailed(
            f"{cancelled_message(exc, env, phases.current)}; rolled back, {env} is unchanged"
        ) from None
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
    finally:
        phases.release_interrupts(raise_held=False)


LOCK_TRY = 0.2  # seconds one attempt waits for one table before letting go of them all


def _lock(run: Session) -> None:
    """Lock the scope against writers; the transaction's snapshot is taken after this.

    All or nothing: an attempt locks every table (children first), each wait bounded by
    :data:`LOCK_TRY`; when one cannot be had, the attempt lets go of every lock it took
    and tries again, until ``[apply] lock_timeout`` has passed. Holding some tables while
    waiting long for another would deadlock with an app that writes a child row (its
    foreign-key check then locks the parent's row): the app would get the error.
    Afterwards ``lock_timeout`` stays set for the whole transaction: every other lock the
    apply waits for (rows, sequences, rows of referencing tables) is bounded by it.
    """
    timeout = run.config.apply.lock_timeout
    budget = duration_seconds(timeout)
    attempt = min(LOCK_TRY, budget)
    deadline = time.monotonic() + budget
    # SET, not SELECT set_config(): a SELECT would fix the transaction's snapshot before
    # the locks, and rows committed while we wait for them would be invisible to it.
    run.conn.execute(
        sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(f"{attempt * 1000:.0f}ms"))
    )
    while True:
        waiting = run.order[-1]
        try:
            with run.conn.transaction():  # a savepoint: a failed attempt releases its locks
                for waiting in reversed(run.order):
                    run.conn.execute(
                        sql.SQL("LOCK TABLE {} IN EXCLUSIVE MODE").format(waiting.ident)
                    )
            break
        except psycopg.errors.LockNotAvailable:
            if time.monotonic() >= deadline:
                holders = write.lock_holders(run.conn, [waiting])
                raise ApplyFailed(
                    f"could not lock {waiting} on {run.target.env} within {timeout}: "
                    f"{holders}; retry in a quieter moment or raise [apply] lock_timeout; "
                    "nothing was changed"
                ) from None
            time.sleep(random.uniform(0.02, 0.1))  # let the app's transaction finish
    run.conn.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(timeout)))


def _reconcile(run: Session, tables: Collection[TableName]) -> int:
    moved = 0
    for table in tables:
        if table in run.row_sets:
            if moving := rowsets.reconcile(run.conn, run.row_sets[table], run.horizon):
                run.recorded.pop(table, None)  # the record changed: its stats are stale
            moved += moving
    if moved:
        log.info("  %s changed since the plan was made: compared again", text.count(moved, "row"))
    return moved


def _touched(run: Session, before: dict[int, int]) -> list[TableName]:
    """Scoped tables written since ``before`` (partitioned ones always count)."""
    after = replica.write_counters(run.conn)
    touched = []
    for table in run.order:
        oid, kind = run.conn.execute(
            "SELECT oid, relkind FROM pg_class WHERE oid = %s::regclass",
            (table.ident.as_string(run.conn),),
        ).fetchone() or (0, "")
        if kind == "p" or after.get(oid, 0) != before.get(oid, 0):
            touched.append(table)
    return touched


def _abandon_backup(run: Session) -> None:
    """Stop a pre-apply backup the apply did not finish (refused, failed, interrupted)."""
    if run.backup is not None:
        backup.abandon(run.backup)
        run.backup = None


def _transaction(
    run: Session, phase: _Phases, folder: Path | None, allowed: Collection[str], *, commit: bool
) -> tuple[ApplyReport, Snapshot | None, list[sql.Identifier]]:
    """The locked, all-or-nothing part; commits only when ``commit`` and parity holds.

    Returns the report, the sealed backup (when committed) and the helper indexes to drop.
    """
    conn = run.conn
    assert run.plan is not None
    conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
    conn.read_only = False
    running = run.backup if folder is not None else None
    sealed = None
    helpers: list[sql.Identifier] = []
    locked = time.monotonic()
    try:
        with conn.transaction() as tx:
            with phase("locking"):
                if running is not None:
                    backup.wait_for_dump(running, to_end=run.block_readers)
                _lock(run)
                locked = time.monotonic()
                log.info(
                    "  %s: writers to the %d scoped tables wait from now until the commit; "
                    "readers go on",
                    run.target.env,
                    len(run.order),
                )
            with phase("reconciling"):
                _reconcile(run, run.order)
                known = {
                    t: run.recorded.get(t) or rowsets.record_stats(conn, r)
                    for t, r in run.row_sets.items()
                }
                if running is not None:
                    backup.describe(run, running, {**known, **backup.follow_up(run, running)})
                    backup.catch_up(run, running)
                before = {t: known[t].rows if t in known else _count(conn, t) for t in run.order}
            created = auth.Created(0, 0)
            if run.auth_entries:
                with phase("creating auth users"):
                    counters = replica.write_counters(conn)
                    use_app_search_path(conn)  # auth.users' triggers are the app's code
                    created = auth.create_users(run)
                    use_tool_search_path(conn)
                    if created.users:
                        _reconcile(run, _touched(run, counters))
            plan, tables, held, trigger_writes = _attempts(run, phase, allowed, before, helpers)
            with phase("sequences"):
                sequences.restart(run)
            report = ApplyReport(
                action=run.action,
                target=run.target.env,
                snapshot=run.snapshot.id,
                dry_run=not commit,
                committed=False,
                tables=tuple(tables),
                auth=_auth_outcome(run, created),
                backup=None,
                phases=tuple(phase.done),
                notes=tuple(run.notes),
                plan=plan,
                trigger_writes=trigger_writes,
            )
            keep = commit and report.matches
            if keep and running is not None:
                with phase("waiting for the backup"):
                    sealed = backup.finish(run, running)
                    running = run.backup = None
            if not keep:
                raise psycopg.Rollback(tx)  # leaves the block, rolling back; nothing raised
            if held.tables:
                with phase("dropping the keeper triggers"):
                    keepers.release(conn, held, run.config.apply.lock_timeout, run.target.env)
            phase.current = "committing"
            use_app_search_path(conn)  # deferred triggers fire at the commit
            # From the commit to the backup's publication, Ctrl-C waits: the outcome is then
            # certain (committed with its backup listed, or rolled back), never in between.
            phase.hold_interrupts()
    finally:
        if running is not None:
            _abandon_backup(run)
    phase.committed = keep
    if keep:
        log.info(
            "  committed: %s's writers go on (they waited %.1f s)",
            run.target.env,
            time.monotonic() - locked,
        )
    report = replace(report, committed=keep, phases=tuple(phase.done), notes=tuple(run.notes))
    return report, sealed if keep else None, helpers


def _after_commit(run: Session, report: ApplyReport, helpers: list[sql.Identifier]) -> ApplyReport:
    """Drop the helper indexes (already gone after a rollback); nothing here can fail it.

    After the commit nothing can undo the apply, so a failure here (a lost connection, a
    lock not had) is a note, never an error that would call the target unchanged.
    """
    if not helpers:
        return report
    try:
        left = write.drop_helper_indexes(run.conn, helpers, run.config.apply.lock_timeout)
    except psycopg.Error as exc:
        left = [h.as_string() for h in helpers]
        log.warning("could not drop the helper indexes: %s", scripts.error_message(exc))
    if report.committed and left:
        return replace(report, notes=(*report.notes, _left_behind(left)))
    return report


def _sweep_helper_indexes(run: Session) -> list[str]:
    """Drop helper indexes a killed apply left behind (it committed, then died)."""
    leftovers = write.leftover_helper_indexes(run.conn, run.order)
    if not leftovers:
        return []
    left = write.drop_helper_indexes(run.conn, leftovers, run.config.apply.lock_timeout)
    dropped = len(leftovers) - len(left)
    notes = [f"dropped {dropped} helper indexes an earlier apply left behind"] if dropped else []
    return notes + ([_left_behind(left)] if left else [])


def _left_behind(indexes: Collection[str]) -> str:
    return (
        f"could not drop the apply's helper indexes {', '.join(indexes)} without waiting "
        "longer than lock_timeout: harmless, the next apply drops them (or run DROP INDEX "
        "CONCURRENTLY)"
    )


def _count(conn: psycopg.Connection, table: TableName) -> int:
    row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(table.ident)).fetchone()
    return int(row[0]) if row else 0


def _attempts(
    run: Session,
    phase: _Phases,
    allowed: Collection[str],
    before: dict[TableName, int],
    helpers: list[sql.Identifier],
) -> tuple[Plan, list[TableParity], keepers.Keepers, tuple[keepers.UndoneWrites, ...]]:
    """Pre-scripts, writes, post-scripts and parity, in a savepoint; fall back to full.

    ``helpers`` gathers the helper indexes made for row-by-row deletes (dropped after the
    commit; those of an attempt rolled back are gone already). Returns the plan written,
    each table's parity, the keeper triggers (dropped right before the commit) and what
    the app's triggers wrote that they undid.
    """
    assert run.plan is not None
    conn = run.conn
    forced = {t.table: t.reason for t in run.plan.tables if t.full}
    kept_columns = {t: run.entries[t].column_names for t in run.order}
    numbers = {t: i for i, t in enumerate(run.config.scope.tables)}
    guarded: set[TableName] = set()  # tables the app's triggers were found to write
    held = keepers.Keepers()
    attempt = 0
    while attempt < ATTEMPTS:
        attempt += 1
        plan = replace(planning.decide(run, forced), auth=run.plan.auth)
        last = attempt == ATTEMPTS or len(plan.full_tables) == len(run.order)
        in_bulk = _in_bulk(run, plan, allowed)
        try:
            with conn.transaction():
                if not in_bulk:
                    # Before anything in the attempt writes (see create_helper_indexes).
                    helpers += write.create_helper_indexes(run, run.plan.helper_indexes)
                write.plan_settings(conn, plan)
                # Deferrable keys are checked at the commit, once every row is in (the insert
                # order counts on it: catalog.apply_order), INITIALLY IMMEDIATE ones too.
                conn.execute("SET CONSTRAINTS ALL DEFERRED")
                with phase("placing the keeper triggers"):
                    held = keepers.hold(
                        conn, run.order, run.shapes, kept_columns, numbers, also=guarded
                    )
                with phase("pre-scripts"):
                    scripts.run(conn, scripts.scripts(run.config, "pre"), "pre")
                plan = write.guard_outside(run, plan, allowed)
                dropped = constraints.scope_foreign_keys(run) if run.block_readers else []
                if dropped:
                    with phase("dropping foreign keys"):
                        constraints.drop(conn, dropped)
                if in_bulk:
                    _write_in_bulk(run, phase, plan)
                else:
                    _passes(run, phase, plan)
                if dropped:
                    with phase("checking foreign keys in bulk"):
                        constraints.add_back(conn, dropped)
                with phase("post-scripts"):
                    scripts.run(conn, scripts.scripts(run.config, "post"), "post")
                trigger_writes = keepers.writes(conn, held)
                with phase("verifying"):
                    tables = proof.parity(run, plan, before)
                failed = [t for t in tables if not t.match and t.table not in plan.full_tables]
                if unguarded := keepers.guard(held, [t.table for t in failed]):
                    details = "; ".join(f"{t.table} {t.detail}" for t in failed)
                    raise _Guard(unguarded, f"it did not match ({details})")
                if failed and not last:
                    details = "; ".join(f"{t.table} {t.detail}" for t in failed)
                    raise _Retry([t.table for t in failed], f"it did not match ({details})")
                if dropped:
                    run.notes.append(_blocked_readers(dropped))
                return plan, tables, held, trigger_writes
        except _Guard as found:
            attempt -= 1  # the same attempt again, the app's triggers' writes undone
            guarded.update(found.tables)
            log.info(
                "  %s: %s; the app's triggers write there: again, with keepers",
                ", ".join(map(str, found.tables)),
                found.why,
            )
        except _Retry as retry:
            _fall_back(run, forced, retry.tables, retry.why)
        except replica.NotHere as exc:
            attempt -= 1  # the same attempt again, row by row
            run.row_by_row = str(exc)
            run.notes.append(f"foreign keys were checked row by row: in bulk, {exc}")
            log.warning("  writing again, row by row: in bulk, %s", exc)
        except write.TableFailed as exc:
            if unguarded := keepers.guard(held, [exc.table]):
                guarded.update(unguarded)
                attempt -= 1  # the same attempt again, with keepers on the table
                log.info(
                    "  %s: %s; the app has triggers on the scope: again, with keepers",
                    exc.table,
                    scripts.error_message(exc.error),
                )
                continue
            if last:
                raise exc.error from None
            why = f"it failed: {scripts.error_message(exc.error)}"
            broken = [exc.table] if exc.table not in plan.full_tables else list(run.order)
            _fall_back(run, forced, broken, why)
        except ScriptFailed as exc:
            if last:
                raise
            _fall_back(run, forced, list(run.order), f"a script failed on it ({exc})")
    raise AssertionError("unreachable: the last attempt returns or raises")


def _in_bulk(run: Session, plan: Plan, allowed: Collection[str]) -> bool:
    """Whether this attempt writes with foreign keys checked in bulk (:mod:`.replica`)."""
    if run.block_readers or run.row_by_row or not replica.wanted(run, plan):
        return False
    if why := replica.obstacle(run, allowed):
        run.row_by_row = why
        log.info("  foreign keys checked row by row: %s", why)
        return False
    return True


def _write_in_bulk(run: Session, phase: _Phases, plan: Plan) -> None:
    """The writes in replica mode, then every key they touched proven in bulk.

    Raises :class:`replica.NotHere` when that cannot be kept: the attempt is then rolled
    back and made again row by row.
    """
    before = replica.write_counters(run.conn)
    state = replica.enter(run)
    try:
        _passes(run, phase, plan, spare=False)
    except write.TableFailed as exc:
        if replica.same_row_by_row(exc.error):
            raise
        error = scripts.error_message(exc.error)
        raise replica.NotHere(f"a write failed on {exc.table} ({error})") from None
    with phase("checking foreign keys"):
        replica.leave(run, state, before)


def _passes(run: Session, phase: _Phases, plan: Plan, *, spare: bool = True) -> None:
    """The three passes of :mod:`.write`, with the app's search_path for its triggers.

    ``spare=False`` deletes every row the snapshot lacks in the first pass: with no
    foreign key acting per row, a parent need not wait for its children to move.
    """
    progress.begin("writes", *write.expected_writes(plan))
    use_app_search_path(run.conn)  # a trigger may name its tables unqualified
    with phase("deleting"):
        done = write.delete_first(run, plan, spare=spare)
    with phase("inserting and updating"):
        write.insert_and_update(run, plan, done)
    with phase("deleting what waited"):
        write.delete_last(run, plan, done)
    use_tool_search_path(run.conn)


def _blocked_readers(dropped: Collection[constraints.ForeignKeyDefinition]) -> str:
    tables = sorted({str(t) for fk in dropped for t in (fk.child, fk.parent)})
    return (
        f"--block-readers: {len(dropped)} foreign keys were checked in bulk; readers of "
        f"{len(tables)} tables ({', '.join(tables)}) waited from the writes until the commit"
    )


def _fall_back(
    run: Session, forced: dict[TableName, str], tables: Collection[TableName], why: str
) -> None:
    """Mark ``tables`` (and the tables that reference them) for a full replace."""
    fresh = [t for t in tables if t not in forced]
    for table in fresh:
        forced[table] = f"the delta was tried first and {why}"
    for table in planning.descendants(fresh, run.fks, run.order) - set(forced):
        forced[table] = f"references {', '.join(map(str, fresh))}, replaced in full"
    names = ", ".join(map(str, fresh)) or "every table"
    run.notes.append(f"{names}: the delta was tried first and {why}; replaced in full")
    log.warning("%s: the delta did not apply cleanly (%s): replacing in full", names, why)


def _auth_outcome(run: Session, created: auth.Created) -> AuthOutcome | None:
    users = next((e for e in run.auth_entries if e.table == AUTH_USERS), None)
    if users is None:
        return None
    return AuthOutcome(
        snapshot_users=users.rows,
        created_users=created.users,
        created_identities=created.identities,
        missing_after=auth.missing_users(run),
        trigger_writes=created.writes,
    )
