"""The writes, tried in a savepoint until they hold: one attempt, and what the next one changes.

One attempt, inside the transaction and the lock: the keeper triggers (:mod:`.keepers`), the
pre-scripts, the writes (row by row, or with foreign keys checked in bulk: :mod:`.replica`),
the post-scripts, and parity (:mod:`.proof`). When it does not hold, its savepoint is rolled
back and the next attempt changes one thing:

* rows the app's triggers wrote ended other than the snapshot's, on tables no keeper held:
  the same writes again, with keepers on those tables;
* the bulk check could not prove the writes: the same writes again, row by row;
* a table's delta did not apply cleanly (a write failed, a script failed, parity did not
  match): that table, and the tables that refer to it, are replaced in full.

Only the last kind counts towards :data:`ATTEMPTS` (the others happen once per table or per
apply); the last attempt's failure is the apply's.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field, replace

import psycopg
from psycopg import sql
from psycopg.pq import TransactionStatus

from snapshot import progress, scripts
from snapshot.apply import constraints, keepers, proof, replica, write
from snapshot.apply import plan as planning
from snapshot.apply.phases import Phases
from snapshot.apply.plan import Plan
from snapshot.apply.state import ApplyRun
from snapshot.db import error_message, use_app_search_path, use_tool_search_path
from snapshot.errors import ScriptFailed
from snapshot.names import TableName
from snapshot.parity import TableParity

log = logging.getLogger(__name__)

ATTEMPTS = 3  # the delta, then the failing tables in full, then everything in full


@dataclass(frozen=True)
class Course:
    """How an attempt writes: the tables replaced in full (and why), those given keepers
    beyond the ones their triggers called for, and how many fallbacks led here."""

    forced: Mapping[TableName, str] = field(default_factory=dict)
    guarded: frozenset[TableName] = frozenset()
    fallbacks: int = 0


@dataclass(frozen=True)
class Written:
    """What the attempt that held wrote, for the transaction to commit or roll back."""

    plan: Plan
    tables: tuple[TableParity, ...]
    held: keepers.Keepers  # the keeper triggers, dropped right before the commit
    undone: tuple[keepers.UndoneWrites, ...]  # what the app's triggers wrote, undone
    helpers: tuple[sql.Identifier, ...]  # helper indexes, dropped after the commit


@dataclass(frozen=True)
class Again:
    """An attempt that did not hold, rolled back: the course of the next one."""

    course: Course


def write_until_it_holds(
    run: ApplyRun,
    phase: Phases,
    before: Mapping[TableName, int],
    closing: Callable[[], None] | None = None,
) -> Written:
    """Attempts until one holds or the last fails (see the module); the one that held.

    ``before``: each table's rows under the lock, for the closing report. ``closing``: the
    caller's questions about the state the writes leave, asked with each attempt's parity
    (in its round trip); the answers the caller reads are the last attempt's, the one that
    held.
    """
    assert run.plan is not None
    course = Course(forced={t.table: t.reason for t in run.plan.tables if t.full})
    while True:
        outcome = attempt(run, phase, course, before, closing)
        if isinstance(outcome, Written):
            return outcome
        course = outcome.course


def attempt(
    run: ApplyRun,
    phase: Phases,
    course: Course,
    before: Mapping[TableName, int],
    closing: Callable[[], None] | None = None,
) -> Written | Again:
    """One attempt in a savepoint: what it wrote, or how the next one should go.

    Raises what fails the last attempt (a write, a script, a refusal): nothing stays.
    """
    assert run.plan is not None
    conn = run.conn
    plan = replace(planning.decide(run, course.forced), auth=run.plan.auth)
    last = course.fallbacks == ATTEMPTS - 1 or len(plan.full_tables) == len(run.order)
    in_bulk = _in_bulk(run, plan)
    held = keepers.Keepers()
    outcome: Written | Again
    try:
        with _savepoint(conn):
            with conn.pipeline():  # the attempt's first round trip
                conn.execute(sql.SQL("SAVEPOINT {}").format(_SAVEPOINT))
                # Helper indexes before anything in the attempt writes (create_helper_indexes).
                helpers = (
                    ()
                    if in_bulk
                    else tuple(write.create_helper_indexes(run, run.plan.helper_indexes))
                )
                write.plan_settings(conn, plan)
                # Deferrable keys are checked at the commit, once every row is in (the
                # insert order counts on it: catalog.apply_order), INITIALLY IMMEDIATE too.
                conn.execute("SET CONSTRAINTS ALL DEFERRED")
                asked = keepers.ask(conn, run.order)
            with phase("placing the keeper triggers"):
                held = _hold(run, asked(), course.guarded)
            with phase("pre-scripts"):
                scripts.run(conn, scripts.scripts(run.config, "pre"), "pre")
            plan = write.guard_outside(run, plan, run.options.allowed)
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
            undone = keepers.writes(conn, held)
            with phase("verifying"):
                tables = tuple(proof.parity(run, plan, before, closing))
            failed = [t for t in tables if not t.match and t.table not in plan.full_tables]
            details = "; ".join(f"{t.table} {t.detail}" for t in failed)
            if unguarded := keepers.guard(held, [t.table for t in failed]):
                outcome = _guard(course, unguarded, f"it did not match ({details})")
            elif failed and not last:
                failing = [t.table for t in failed]
                outcome = _fall_back(run, course, failing, f"it did not match ({details})")
            else:
                if dropped:
                    run.notes.append(_blocked_readers(dropped))
                outcome = Written(plan, tables, held, undone, helpers)
            if isinstance(outcome, Again):
                _roll_back(conn)  # its writes go: the next attempt starts clean
    except replica.NotHere as exc:
        run.row_by_row = str(exc)
        run.notes.append(f"foreign keys were checked row by row: in bulk, {exc}")
        log.warning("  writing again, row by row: in bulk, %s", exc)
        return Again(course)
    except write.TableFailed as exc:
        if unguarded := keepers.guard(held, [exc.table]):
            return _guard(course, unguarded, error_message(exc.error))
        if last:
            raise exc.error from None
        broken = [exc.table] if exc.table not in plan.full_tables else list(run.order)
        return _fall_back(run, course, broken, f"it failed: {error_message(exc.error)}")
    except ScriptFailed as exc:
        if last:
            raise
        return _fall_back(run, course, list(run.order), f"a script failed on it ({exc})")
    return outcome


_SAVEPOINT = sql.Identifier("snapshot_attempt")


@contextlib.contextmanager
def _savepoint(conn: psycopg.Connection) -> Iterator[None]:
    """The attempt's savepoint, set by the block's first statement (sent with the attempt's
    first round trip, where psycopg's own would cost one to enter and one to leave), rolled
    back when the block raises. Once an attempt holds it is never released: the commit ends
    it with the transaction, and a rolled back attempt releases it (:func:`_roll_back`)."""
    try:
        yield
    except BaseException:
        if conn.info.transaction_status in (TransactionStatus.INTRANS, TransactionStatus.INERROR):
            with contextlib.suppress(psycopg.Error):  # a lost connection says so itself
                _roll_back(conn)
        raise


def _roll_back(conn: psycopg.Connection) -> None:
    """Undo the attempt: back to its savepoint, which then goes."""
    conn.execute(
        sql.SQL("ROLLBACK TO SAVEPOINT {sp}; RELEASE SAVEPOINT {sp}").format(sp=_SAVEPOINT)
    )


def _hold(run: ApplyRun, asked: keepers.Survey, guarded: Collection[TableName]) -> keepers.Keepers:
    """The keeper triggers of this attempt (:mod:`.keepers`)."""
    return keepers.hold(
        run.conn,
        asked,
        run.order,
        run.shapes,
        {t: run.entries[t].column_names for t in run.order},
        {t: i for i, t in enumerate(run.config.scope.tables)},
        also=guarded,
    )


def _guard(course: Course, tables: Collection[TableName], why: str) -> Again:
    """The same attempt again, with keepers on ``tables`` (the app's triggers write there)."""
    log.info(
        "  %s: %s; the app's triggers write there: again, with keepers",
        ", ".join(map(str, tables)),
        why,
    )
    return Again(replace(course, guarded=course.guarded | frozenset(tables)))


def _fall_back(run: ApplyRun, course: Course, tables: Collection[TableName], why: str) -> Again:
    """The next attempt replaces ``tables`` (and the tables that refer to them) in full."""
    forced = dict(course.forced)
    fresh = [t for t in tables if t not in forced]
    for table in fresh:
        forced[table] = f"the delta was tried first and {why}"
    for table in planning.descendants(fresh, run.fks, run.order) - set(forced):
        forced[table] = f"references {', '.join(map(str, fresh))}, replaced in full"
    names = ", ".join(map(str, fresh)) or "every table"
    run.notes.append(f"{names}: the delta was tried first and {why}; replaced in full")
    log.warning("%s: the delta did not apply cleanly (%s): replacing in full", names, why)
    return Again(replace(course, forced=forced, fallbacks=course.fallbacks + 1))


def _in_bulk(run: ApplyRun, plan: Plan) -> bool:
    """Whether this attempt writes with foreign keys checked in bulk (:func:`replica.choose`);
    an obstacle keeps the rest of the apply row by row."""
    in_bulk, why = replica.choose(run, plan)
    if why and not run.row_by_row:
        run.row_by_row = why
        log.info("  foreign keys checked row by row: %s", why)
    return in_bulk


def _write_in_bulk(run: ApplyRun, phase: Phases, plan: Plan) -> None:
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
        error = error_message(exc.error)
        raise replica.NotHere(f"a write failed on {exc.table} ({error})") from None
    with phase("checking foreign keys"):
        replica.leave(run, state, before)


def _passes(run: ApplyRun, phase: Phases, plan: Plan, *, spare: bool = True) -> None:
    """The three passes of :mod:`.write`, with the app's search_path for its triggers.

    ``spare=False`` deletes every row the snapshot lacks in the first pass: with no
    foreign key acting per row, a parent need not wait for its children to move.

    Two round trips in all (a pipeline, in a savepoint): pass 1 with the question pass 2
    needs, then passes 2 and 3 (pass 3 needs pass 1's counts). When a statement fails, the
    server's error does not say which table it wrote, so the passes are rolled back and run
    again one statement at a time, which finds the table (and raises
    :class:`write.TableFailed` for the attempt to fall back on).
    """
    progress.begin("writes", *write.expected_writes(plan))
    conn = run.conn
    try:
        with contextlib.ExitStack() as pipeline:
            pipeline.enter_context(conn.pipeline())
            # psycopg's own savepoint would cost a round trip to enter and one to leave; this
            # one goes when the attempt's savepoint is released or rolled back
            conn.execute("SAVEPOINT snapshot_writes")
            use_app_search_path(conn)  # a trigger may name its tables unqualified
            with phase("deleting"):
                done, steps, unique = write.delete_first(run, plan, spare=spare)
                deleted = write.send_steps(conn, steps, batched=True)
                keys = unique()  # the first round trip: pass 1, and the question pass 2 needs
                write.deleted(done, steps, deleted())
            with phase("inserting and updating"):  # and deleting the parents that waited
                written = write.insert_and_update(run, plan, done, keys, batched=True)
                last = write.delete_last(run, plan, done, batched=True)
                use_tool_search_path(conn)
                pipeline.close()  # the second round trip: passes 2 and 3
            written()
            last()
    except (psycopg.errors.QueryCanceled, psycopg.OperationalError):
        raise
    except psycopg.Error as exc:
        conn.execute("ROLLBACK TO SAVEPOINT snapshot_writes")
        log.info("  a write failed (%s): once more, one statement at a time", error_message(exc))
        progress.begin("writes", *write.expected_writes(plan))
        use_app_search_path(conn)
        with phase("deleting"):
            done, steps, unique = write.delete_first(run, plan, spare=spare)
            write.deleted(done, steps, write.send_steps(conn, steps, batched=False)())
        with phase("inserting and updating"):
            write.insert_and_update(run, plan, done, unique(), batched=False)()
        with phase("deleting what waited"):
            write.delete_last(run, plan, done, batched=False)()
        use_tool_search_path(conn)


def _blocked_readers(dropped: Collection[constraints.ForeignKeyDefinition]) -> str:
    tables = sorted({str(t) for fk in dropped for t in (fk.child, fk.parent)})
    return (
        f"--block-readers: {len(dropped)} foreign keys were checked in bulk; readers of "
        f"{len(tables)} tables ({', '.join(tables)}) waited from the writes until the commit"
    )
