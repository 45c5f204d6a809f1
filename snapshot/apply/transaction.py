"""The locked, all-or-nothing part of an apply: one REPEATABLE READ transaction.

1. let the pre-apply backup's pg_dump end (its download is never part of the writers'
   wait), lock the scope against writers (readers go on), then bring the plan up to the
   rows written since it was made, and write the backup's catch-up;
2. create the snapshot's auth users the target lacks (insert only);
3. the writes, attempt after attempt until they hold (:mod:`.attempt`);
4. sequences; the closing report;
5. commit when asked and every table matches: the backup sealed first, the keeper
   triggers dropped last. Otherwise roll back: nothing changed.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, replace

import psycopg
from psycopg import sql

from snapshot import catalog, text
from snapshot.apply import auth, backup, keepers, replica, sequences, since, write
from snapshot.apply import rows as rowsets
from snapshot.apply.attempt import Written, write_until_it_holds
from snapshot.apply.phases import Phases
from snapshot.apply.report import ApplyReport, AuthOutcome
from snapshot.apply.state import ApplyRun
from snapshot.archive import Snapshot
from snapshot.checksum import TableStats
from snapshot.config import duration_seconds
from snapshot.db import APP_SEARCH_PATH, use_app_search_path, use_tool_search_path
from snapshot.errors import ApplyFailed
from snapshot.names import AUTH_USERS, TableName

log = logging.getLogger(__name__)

LOCK_TRY = 0.2  # seconds one attempt waits for one table before letting go of them all


@dataclass(frozen=True)
class Finished:
    """What the transaction ended with: the report, the backup sealed when it committed, and
    the helper indexes to drop after it."""

    report: ApplyReport
    sealed: Snapshot | None
    helpers: tuple[sql.Identifier, ...]


def in_one_transaction(run: ApplyRun, phase: Phases, *, commit: bool) -> Finished:
    """Steps 1-5 of the module; commits only when ``commit`` and every table matches."""
    conn = run.conn
    assert run.plan is not None
    conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
    conn.read_only = False
    running = run.backup if commit else None
    sealed = None
    locked_at = time.monotonic()
    try:
        with conn.transaction() as tx:
            if running is not None:
                # The backup's download is over before the writers wait: under the lock only
                # what changed since its snapshot is read (backup.catch_up).
                with phase("backing up"):
                    backup.wait_for_dump(running)
            with phase("locking"):
                lock(run)
                locked_at = time.monotonic()
            with phase("reconciling"):
                before = reconcile(run, running)
            created = create_auth_users(run, phase)
            closing = _Closing(run, running)
            written = write_until_it_holds(run, phase, before, closing.ask)
            with phase("sequences"):
                state, missing, wrote = closing.answers()
                stand = state()
                # Sent with the next round trip: the backup's record, or on their own.
                restarts = sequences.restarts(run, stand)
            report = _report(run, phase, written, created, missing(), dry_run=not commit)
            keep = commit and report.matches
            # the app's search_path for the commit, sent with the backup's record when
            # nothing of the tool's runs between them (keeper triggers to drop)
            app_path = (
                []
                if written.held.tables or not keep
                else [sql.Composed([sql.SQL(APP_SEARCH_PATH)])]
            )
            if keep and running is not None:
                with phase("waiting for the backup"):
                    assert wrote is not None and running.state is not None
                    moved = bool(restarts) or tuple(stand.owned) != tuple(running.state.sequences)
                    sealed = backup.finish(
                        run, running, wrote(moved), first=restarts, then=app_path
                    )
                    running = run.backup = None
            else:
                sequences.send(run, restarts)
                app_path = []
            if not keep:
                raise psycopg.Rollback(tx)  # leaves the block, rolling back; nothing raised
            _commit(run, phase, written.held, path_sent=bool(app_path))
    finally:
        if running is not None:
            backup.abandon(running)
            run.backup = None
    phase.committed = keep
    if keep:
        log.info(
            "  committed: %s's writers go on (they waited %.1f s)",
            run.target.env,
            time.monotonic() - locked_at,
        )
    report = replace(report, committed=keep, phases=tuple(phase.done), notes=tuple(run.notes))
    return Finished(report, sealed if keep else None, written.helpers)


_Wrote = Callable[[bool], since.Wrote]  # since.wrote_later's answer


@dataclass
class _Closing:
    """What the transaction asks of the state the writes leave, in parity's round trip
    (:func:`.attempt.write_until_it_holds`): where the sequences stand, the snapshot's users
    still missing (for the report) and what the transaction wrote (for the backup)."""

    run: ApplyRun
    running: backup.Backup | None
    state: Callable[[], catalog.State] | None = None
    missing: Callable[[], int] | None = None
    wrote: _Wrote | None = None

    def ask(self) -> None:
        conn = self.run.conn
        self.state = catalog.read_state_later(conn, self.run.state_names(), highest=True)
        self.missing = auth.missing_users_later(self.run)
        self.wrote = since.wrote_later(self.run) if self.running is not None else None

    def answers(
        self,
    ) -> tuple[
        Callable[[], catalog.State], Callable[[], int], Callable[[bool], since.Wrote] | None
    ]:
        """The answers (asked on their own when no attempt asked them)."""
        if self.state is None or self.missing is None:
            with self.run.conn.pipeline():
                self.ask()
        assert self.state is not None and self.missing is not None
        return self.state, self.missing, self.wrote


def lock(run: ApplyRun) -> None:
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
    wait = min(LOCK_TRY, budget)
    deadline = time.monotonic() + budget
    # One simple query, one round trip: SET, not SELECT set_config() (a SELECT would fix
    # the transaction's snapshot before the locks, and rows committed while we wait for
    # them would be invisible to it); one LOCK for them all, children first (each lock's
    # wait bounded as above), in a savepoint a failed attempt rolls back to, releasing its
    # locks; then lock_timeout for the rest of the transaction.
    attempt = sql.SQL(
        "SET LOCAL lock_timeout = {wait}; SAVEPOINT snapshot_lock; "
        "LOCK TABLE {tables} IN EXCLUSIVE MODE; RELEASE SAVEPOINT snapshot_lock; "
        "SET LOCAL lock_timeout = {timeout}"
    ).format(
        wait=sql.Literal(f"{wait * 1000:.0f}ms"),
        tables=sql.SQL(", ").join(t.ident for t in reversed(run.order)),
        timeout=sql.Literal(timeout),
    )
    while True:
        try:
            run.conn.execute(attempt)
            break
        except psycopg.errors.LockNotAvailable:
            run.conn.execute("ROLLBACK TO SAVEPOINT snapshot_lock; RELEASE SAVEPOINT snapshot_lock")
            if time.monotonic() >= deadline:
                order = list(reversed(run.order))
                waiting = write.blocked_table(run.conn, order) or order[-1]
                holders = write.lock_holders(run.conn, [waiting])
                raise ApplyFailed(
                    f"could not lock {waiting} on {run.target.env} within {timeout}: "
                    f"{holders}; retry in a quieter moment or raise [apply] lock_timeout; "
                    "nothing was changed"
                ) from None
            time.sleep(random.uniform(0.02, 0.1))  # let the app's transaction finish
    log.info(
        "  %s: writers to the %d scoped tables wait from now until the commit; readers go on",
        run.target.env,
        len(run.order),
    )


def reconcile(run: ApplyRun, running: backup.Backup | None) -> dict[TableName, int]:
    """The plan brought up to the rows written since it was made; the backup's catch-up
    written; each table's rows now (the closing report's "target before")."""
    conn = run.conn
    # The backup's own records (backup.record_others) come up in the same round trips.
    followed = list(running.followed.values()) if running is not None else []
    counted: Callable[[], dict[TableName, TableStats]] | None = None
    state: Callable[[], catalog.State] | None = None
    caught: backup.CatchUp | None = None

    def ask(moved: Mapping[TableName, int]) -> None:
        """In the round trip that brings the records up: the records' stats, the deltas'
        counts for the plan, and the backup's sequences and catch-up (the rows ``moved``)."""
        nonlocal counted, state, caught
        stale = [r for t, r in run.row_sets.items() if t not in run.recorded]
        counted = rowsets.stats_later(conn, [*stale, *followed], rowsets.RECORD)
        run.counts_ahead = rowsets.counts_later(
            conn,
            [run.row_sets[t] for t in run.order if t in run.row_sets],
            {t: known.rows for t, known in run.recorded.items()},
        )
        if running is not None:
            state = catalog.read_state_later(conn, run.state_names())
            caught = backup.catch_up_later(run, running, moved)

    _compare_again(run, run.order, records=followed, then=ask)
    assert counted is not None
    known = {**run.recorded, **counted()}
    if running is not None:
        assert state is not None and caught is not None
        backup.describe(run, running, known, state())
        backup.catch_up(run, running, caught)
    return {t: known[t].rows if t in known else _count(conn, t) for t in run.order}


def create_auth_users(run: ApplyRun, phase: Phases) -> auth.Created:
    """The snapshot's auth users the target lacks, created (insert only); the rows the app's
    triggers on the auth tables wrote into the scope are compared again."""
    if not run.auth_entries:
        return auth.Created(0, 0)
    if _nobody_to_create(run):
        log.info(
            "  created 0 auth users: the plan found none to create and auth.users is as it was"
        )
        return auth.Created(0, 0)
    conn = run.conn
    with phase("creating auth users"), conn.pipeline():  # one round trip
        counters = replica.write_counters_later(conn)
        use_app_search_path(conn)  # auth.users' triggers are the app's code
        creating = auth.create_users_later(run)
        use_tool_search_path(conn)
        touched = _touched_later(run, counters)
    created = creating()
    if created.users:
        # The rows the app's triggers wrote, compared again, and the plan's counts with them.
        found = touched()
        run.counts_ahead = None

        def count(_moved: Mapping[TableName, int]) -> None:
            run.counts_ahead = rowsets.counts_later(
                conn,
                [run.row_sets[t] for t in run.order if t in run.row_sets],
                {t: known.rows for t, known in run.recorded.items()},
            )

        _compare_again(run, found, then=count)
    return created


def _nobody_to_create(run: ApplyRun) -> bool:
    """Whether the plan found no snapshot user the target lacks, and the target's auth.users
    has not changed since (the backup followed it to the lock): no user to create now."""
    running = run.backup
    people = run.plan.auth if run.plan is not None else None
    return (
        people is not None
        and people.create == 0
        and running is not None
        and running.moved is not None
        and AUTH_USERS in running.followed
        and AUTH_USERS not in running.moved
    )


def _commit(run: ApplyRun, phase: Phases, held: keepers.Keepers, *, path_sent: bool) -> None:
    """The last steps before the COMMIT (sent when the transaction's block ends); the app's
    search_path with them unless it was sent already (``path_sent``)."""
    if held.tables:
        with phase("dropping the keeper triggers"):
            keepers.release(run.conn, held, run.config.apply.lock_timeout, run.target.env)
    phase.current = "committing"
    if not path_sent:
        use_app_search_path(run.conn)  # deferred triggers fire at the commit
    # From the commit to the backup's publication, Ctrl-C waits (snapshot.apply.phases).
    phase.hold_interrupts()


def _report(
    run: ApplyRun,
    phase: Phases,
    written: Written,
    created: auth.Created,
    missing: int,
    *,
    dry_run: bool,
) -> ApplyReport:
    return ApplyReport(
        action=run.action,
        target=run.target.env,
        snapshot=run.snapshot.id,
        dry_run=dry_run,
        committed=False,
        tables=written.tables,
        auth=_auth_outcome(run, created, missing),
        backup=None,
        phases=tuple(phase.done),
        notes=tuple(run.notes),
        plan=written.plan,
        trigger_writes=written.undone,
    )


def _compare_again(
    run: ApplyRun,
    tables: Collection[TableName],
    *,
    records: Sequence[rowsets.RowSet] = (),
    then: Callable[[Mapping[TableName, int]], None] | None = None,
) -> int:
    """Rows written since the record was made, hashed and classified again; how many.
    ``records``: row sets whose record alone comes up; ``then`` asks the caller's questions
    in the round trip that brings them up, knowing which records are stale and given the
    rows moved per table (:func:`rowsets.reconcile`)."""
    sets = [run.row_sets[t] for t in tables if t in run.row_sets]

    def forget(moved: Mapping[TableName, int]) -> None:
        for rows in sets:
            if moved.get(rows.table):
                run.recorded.pop(rows.table, None)  # the record changed: its stats are stale

    def settle(moved: Mapping[TableName, int]) -> None:
        forget(moved)
        assert then is not None
        then(moved)

    found = rowsets.reconcile(
        run.conn, sets, run.horizon, records=records, then=settle if then is not None else None
    )
    forget(found)
    moved = sum(found.values())
    if moved:
        log.info("  %s changed since the plan was made: compared again", text.count(moved, "row"))
    return moved


def _touched_later(
    run: ApplyRun, before: Callable[[], dict[int, int]]
) -> Callable[[], list[TableName]]:
    """Scoped tables written since ``before`` (:func:`replica.write_counters_later`;
    partitioned ones always count): asked now (in the caller's pipeline), read when called."""
    after = replica.write_counters_later(run.conn)
    kinds = run.conn.execute(
        "SELECT t::oid, c.relkind FROM unnest(%s::regclass[]) WITH ORDINALITY AS w(t, i) "
        "JOIN pg_class c ON c.oid = w.t ORDER BY w.i",
        ([t.ident.as_string(run.conn) for t in run.order],),
    )

    def touched() -> list[TableName]:
        was, now = before(), after()
        return [
            table
            for table, (oid, kind) in zip(run.order, kinds.fetchall(), strict=True)
            if kind == "p" or now.get(oid, 0) != was.get(oid, 0)
        ]

    return touched


def _count(conn: psycopg.Connection, table: TableName) -> int:
    row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(table.ident)).fetchone()
    return int(row[0]) if row else 0


def _auth_outcome(run: ApplyRun, created: auth.Created, missing: int) -> AuthOutcome | None:
    """``missing``: the snapshot's users the target still lacks (auth.missing_users)."""
    users = next((e for e in run.auth_entries if e.table == AUTH_USERS), None)
    if users is None:
        return None
    return AuthOutcome(
        snapshot_users=users.rows,
        created_users=created.users,
        created_identities=created.identities,
        missing_after=missing,
        trigger_writes=created.writes,
    )
