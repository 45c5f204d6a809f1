"""``snapshot apply`` and ``rollback``: make the target's scope equal a snapshot, atomically,
writing only the rows that differ.

Every app trigger fires and every constraint holds (no ``DISABLE TRIGGER``; a large change
checks its foreign keys in bulk instead of row by row, :mod:`.replica`; what the app's
triggers write does not stay, :mod:`.keepers`) and everything happens in one REPEATABLE
READ transaction that commits only when every row of every scoped table matches the
snapshot. ``check`` and ``apply`` read one recipe:

1. open: connect, read the catalog (:mod:`snapshot.session`);
2. preflight: the checks that need nothing staged (:mod:`snapshot.preflight`);
3. prepare: backup started, target recorded, snapshot staged, plan made, no lock taken
   (:mod:`.prepare`);
4. staged checks: what the plan found (:mod:`.staged_checks`); ``check`` stops here;
5. confirm: the plan shown, the question asked, nothing held open meanwhile;
6. the transaction: lock, reconcile, auth users, the writes until they hold, commit
   (:mod:`.transaction`, :mod:`.attempt`); the backup published, helper indexes dropped.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Collection
from dataclasses import replace
from pathlib import Path

import psycopg
from psycopg import sql

from snapshot import archive, interrupts, masking, preflight
from snapshot.apply import backup, staged_checks, write
from snapshot.apply.backup import settle_orphaned_backups
from snapshot.apply.phases import Phases, Progress
from snapshot.apply.prepare import prepare
from snapshot.apply.report import ApplyPlan, ApplyReport, AuthOutcome, Confirm
from snapshot.apply.state import ApplyRun, Options
from snapshot.apply.transaction import Finished, in_one_transaction
from snapshot.archive import Snapshot
from snapshot.config import Config
from snapshot.db import connect, error_message, error_sentence
from snapshot.dump import LIVE
from snapshot.environments import resolve_connection
from snapshot.errors import ApplyFailed, Interrupted, Refused, ScriptFailed, SnapshotError
from snapshot.masking import personal
from snapshot.names import AUTH_TABLES
from snapshot.preflight import Finding, PreflightFailed, PreflightReport
from snapshot.session import (
    apply_lock_holder,
    apply_lock_holder_later,
    open_session,
    release_apply_lock,
)

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

    Any preflight or staged-check error stops everything before the first write
    (:class:`PreflightFailed` carries its report). ``full`` replaces every table in full
    instead of writing only what differs; ``block_readers`` checks the scope's own foreign
    keys in bulk (:mod:`.constraints`), making readers wait until the commit;
    ``keep_referenced`` (or ``[apply] keep_referenced``) keeps the rows the snapshot lacks
    that rows outside the scope refer to (:mod:`.outside`); ``auth_withheld`` says why the
    snapshot's auth users are not created (:mod:`snapshot.direction`). ``confirm`` is asked
    with the plan; while it waits, nothing is held open on the target.
    """
    phases = Phases(progress)
    options = _options(config, dry_run, full, block_readers, keep_referenced, allow_cascades)
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
        run = ApplyRun(session, options)
        if not dry_run:
            run.backup_into = cleanup.enter_context(
                archive.pending_snapshot(config.archive, session.target.env)
            )
            cleanup.callback(_abandon_backup, run)
        asking = confirm is not None
        if not dry_run and not asking:
            run.exporter_ahead = backup.connect_ahead(session.target)
            cleanup.callback(backup.drop_ahead, run)
        with phases("preflight"):
            # With a question to ask, the first preparation starts no backup: its exported
            # snapshot would be held open while the person decides.
            checks = _check(run, settle=not dry_run, backup=not asking, keep_lock=not asking)
        for finding in checks.findings:
            if finding.status == preflight.WARNING:
                log.warning("warning: %s: %s", finding.check, finding.detail)
        if not checks.ok:
            raise PreflightFailed(checks)
        if auth_withheld:
            run.notes.append(f"auth users: {auth_withheld}")
        if snapshot.manifest.masking is not None:
            run.notes.append(snapshot.manifest.masking.describe())
        if snapshot.manifest.subset is not None:
            run.notes.append(snapshot.manifest.subset.describe())
        if confirm is not None:
            _ask(run, confirm)
            with phases("preparing again"):
                _prepare_again(run)
        return _execute(run, phases)


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
) -> PreflightReport:
    """The preflight, the preparation and the staged checks alone (``snapshot check``):
    the apply's own steps up to its question; changes nothing."""
    options = _options(config, False, full, False, keep_referenced, allow_cascades)
    with open_session(
        config,
        target_env,
        snapshot,
        action="apply",
        pg_bin=pg_bin,
        backup=True,
        auth_withheld=auth_withheld,
    ) as session:
        report = _check(ApplyRun(session, options), settle=False, backup=False, keep_lock=False)
        if session.target.safe or not report.ok:  # errors first: they stop the apply
            return report
        # A target not marked safe is a source of masked takes too: what would stop one.
        scope = config.scope
        suspects = masking.unruled_columns(
            session.conn,
            [*scope.tables, *(AUTH_TABLES if scope.auth_users else ())],
            config.masking,
        )
        # A warning where the team masks ([masking] is set); otherwise said, not judged.
        configured = config.masking.configured
        status = preflight.WARNING if suspects and configured else preflight.OK
        found = Finding("personal columns", status, personal.listing(target_env, suspects))
        return replace(report, findings=(*report.findings, found))


def _options(
    config: Config,
    dry_run: bool,
    full: bool,
    block_readers: bool,
    keep_referenced: bool,
    allow_cascades: Collection[str],
) -> Options:
    return Options(
        dry_run=dry_run,
        full=full,
        block_readers=block_readers,
        keep_referenced=keep_referenced or config.apply.keep_referenced,
        allowed=frozenset(allow_cascades) | frozenset(config.preflight_allow_cascades),
    )


def _check(run: ApplyRun, *, settle: bool, backup: bool, keep_lock: bool) -> PreflightReport:
    """Steps 2-4 of the recipe: the preflight, then (when it found no error) the
    preparation and the staged checks.

    ``settle``: first publish or discard backups a killed apply left, and drop its helper
    indexes. ``backup``: start the pre-apply backup with the preparation. ``keep_lock``:
    keep the apply lock, when it was free, for the apply that follows (a check, or an apply
    about to ask its question, lets it go).
    """
    session = run.session
    with session.conn.pipeline():  # the lock and the helper indexes left behind: one trip
        holding = apply_lock_holder_later(session.conn)
        leftovers = write.leftover_helper_indexes_later(session.conn, run.order) if settle else None
    holder = holding()
    try:
        if holder is None and leftovers is not None:
            run.notes += settle_orphaned_backups(session.config, session.target, session.conn)
            run.notes += _sweep_helper_indexes(run, leftovers())
        findings = preflight.run_checks(session, lock_holder=holder)
        if session.snapshot.manifest.kind == LIVE:
            findings += staged_checks.first_look(run)
            findings.append(preflight.rows_left_for_later(live=True))
        elif any(f.status == preflight.ERROR for f in findings):
            findings.append(preflight.rows_left_for_later(live=False))
        else:
            folder, run.backup_into = run.backup_into, (run.backup_into if backup else None)
            run.plan = prepare(run)
            run.backup_into = folder
            findings += staged_checks.staged_checks(run)
        if session.auth_withheld:
            findings.append(Finding("auth users", preflight.WARNING, session.auth_withheld))
        if session.snapshot.manifest.masking is not None:
            masked = session.snapshot.manifest.masking.describe()
            findings.append(Finding("masking", preflight.OK, masked))
        if session.snapshot.manifest.subset is not None:
            cut = session.snapshot.manifest.subset.describe()
            findings.append(Finding("subset", preflight.OK, cut))
    finally:
        if holder is None and not keep_lock:
            release_apply_lock(session.conn)
    return PreflightReport(
        session.action, session.target.env, session.snapshot.id, tuple(findings), run.plan
    )


def _ask(run: ApplyRun, confirm: Confirm) -> None:
    """Show the plan and ask; nothing is held on the target meanwhile (no lock, no open
    transaction, no exported snapshot): the work starts once the answer is yes."""
    assert run.plan is not None
    proposal = ApplyPlan(
        run.action,
        run.target,
        run.snapshot,
        run.plan,
        run.options.dry_run,
        run.session.auth_withheld,
    )
    if not confirm(proposal):
        raise Refused(f"{run.action} to {run.target.env} cancelled: nothing was changed")


def _prepare_again(run: ApplyRun) -> None:
    """After the question: the apply lock taken again, the backup started, the target
    recorded again in its snapshot and the plan made again (rows the app wrote while the
    person decided are in it; those written later are reconciled under the lock)."""
    holder = apply_lock_holder(run.conn)
    if holder is not None:
        raise Refused(
            f"another snapshot apply or rollback started against {run.target.env} while you "
            f"decided ({holder}): wait for it to finish; nothing was changed"
        )
    run.plan = prepare(run)


def _abandon_backup(run: ApplyRun) -> None:
    """Stop a pre-apply backup the apply did not finish (refused, failed, interrupted)."""
    if run.backup is not None:
        backup.abandon(run.backup)
        run.backup = None


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


# --- the transaction, and what it ended with ---------------------------------------------


def _execute(run: ApplyRun, phases: Phases) -> ApplyReport:
    """Step 6: the transaction, then the backup published and the helper indexes dropped;
    every failure turned into one sentence saying what state the target is in."""
    env = run.target.env
    dry_run = run.options.dry_run
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
            return _after_commit(run, in_one_transaction(run, phases, commit=False))
        folder = run.backup_into
        assert folder is not None and run.backup is not None, "the preparation started it"
        try:
            finished = in_one_transaction(run, phases, commit=True)
        except psycopg.OperationalError as exc:
            if phases.current != "committing":
                raise
            # The COMMIT was sent and the answer lost: it may have committed. Keep the
            # sealed backup; the next run asks the server (by transaction id) and
            # publishes or removes it.
            archive.keep_pending(folder)
            raise ApplyFailed(
                f"lost the connection to {env} while committing "
                f"({error_message(exc)}): whether the {run.action} committed is "
                f"unknown; its pre-apply backup is kept and the next apply or rollback "
                f"settles it; 'snapshot verify {run.snapshot.id} {env}' shows which"
            ) from None
        if not finished.report.committed or finished.sealed is None:
            return _after_commit(run, finished)
        # Published only now: a backup never claims an apply that did not commit.
        published = archive.publish(finished.sealed, finished.sealed.manifest.label)
        phases.release_interrupts()
        return _after_commit(
            run, replace(finished, report=replace(finished.report, backup=published.id))
        )
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
    except psycopg.Error as exc:
        limit = lock_holders = None
        if isinstance(exc, psycopg.errors.LockNotAvailable):
            related = {*run.order, *(fk.child for fk in run.fks if fk.parent in run.order)}
            limit = f"[apply] lock_timeout ({run.config.apply.lock_timeout})"
            lock_holders = write.lock_holders(run.conn, related, readers=run.block_readers)
        raise ApplyFailed(
            error_sentence(
                exc,
                env,
                phases.current,
                unchanged=True,
                lock_limit=limit or "its lock_timeout",
                lock_holders=lock_holders,
            )
        ) from None
    finally:
        phases.release_interrupts(raise_held=False)


def _after_commit(run: ApplyRun, finished: Finished) -> ApplyReport:
    """Drop the helper indexes (already gone after a rollback); nothing here can fail it.

    After the commit nothing can undo the apply, so a failure here (a lost connection, a
    lock not had) is a note, never an error that would call the target unchanged.
    """
    report, helpers = finished.report, finished.helpers
    if not helpers:
        return report
    try:
        left = write.drop_helper_indexes(run.conn, helpers, run.config.apply.lock_timeout)
    except psycopg.Error as exc:
        left = [h.as_string() for h in helpers]
        log.warning("could not drop the helper indexes: %s", error_message(exc))
    if report.committed and left:
        return replace(report, notes=(*report.notes, _left_behind(left)))
    return report


def _sweep_helper_indexes(run: ApplyRun, leftovers: Collection[sql.Identifier]) -> list[str]:
    """Drop the helper indexes a killed apply left behind (it committed, then died):
    ``leftovers`` (:func:`write.leftover_helper_indexes_later`)."""
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
