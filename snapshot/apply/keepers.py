"""The app's triggers fire on every row the apply writes; what they write does not stay.

Real apps keep columns by trigger: ``updated_at = now()`` (PL/pgSQL or ``moddatetime``),
``created_by = auth.uid()`` (NULL in the tool's session, and often NOT NULL), a tsvector, a
child's trigger touching its parent. Left alone, every row the apply writes would end with
the apply's time and no author instead of the snapshot's values (or fail on NOT NULL),
parity would fail, the same snapshot applied twice would write again, and a rollback would
not be exact. Turning the triggers off is no answer: guardrails are triggers too.

So for the length of one attempt (made in its savepoint, dropped before the commit), each
scoped table the app has triggers on gets *keeper* triggers. BEFORE ROW triggers fire in
name order, so around the app's own:

* the first (its name sorts before every app trigger's) notes the values the statement
  writes, the snapshot's columns of ``NEW``, in a setting of the transaction;
* the last (its name sorts after them) puts those values back into ``NEW``, and counts the
  rows and columns an app trigger had changed.

A row whose unique values are moved aside before it is written (:mod:`.swaps`) is written
twice; what the app's triggers write is put back both times but counted once, while
:data:`~snapshot.apply.swaps.UNCOUNTED` is on.

The app's triggers still see every row and may refuse it: a guardrail still stops the
apply. Statements the app's triggers run themselves (an AFTER trigger touching a parent)
are undone too: a nested UPDATE leaves the row's values as they were (but for the keys a
foreign key's action moves: those actions are integrity, not the app), a nested INSERT into
the scope is skipped. A table with no BEFORE trigger of the app gets only that guard, whose
``WHEN (pg_trigger_depth() > 0)`` costs nothing on the apply's own writes.

Creating a trigger takes SHARE ROW EXCLUSIVE (readers go on); dropping one takes ACCESS
EXCLUSIVE, so :func:`release` runs last, right before the commit, each wait bounded: readers
wait for the commit at most. Both run with ``session_replication_role = replica`` where the
role may set it, so the database's event triggers (PostgREST's schema reload on Supabase)
do not fire for them.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from snapshot import catalog
from snapshot.apply.swaps import UNCOUNTED
from snapshot.apply.write import lock_holders
from snapshot.catalog import AppTrigger, TableShape
from snapshot.config import duration_seconds
from snapshot.errors import ApplyFailed
from snapshot.names import MAX_IDENTIFIER_BYTES, TableName

log = logging.getLogger(__name__)

FIRST = " snapshot: note the values written"  # a space sorts before any name an app uses
LAST = "~snapshot: put back the values written"  # and a tilde after any ASCII one
STASH = "snapshot.kept_"  # + trigger depth: the values the statement at that depth writes
SAMPLE = 1000  # rows per table whose changed columns are read (all are counted and kept)


@dataclass(frozen=True)
class Keeper:
    """The keeper triggers of one table, and the app triggers they surround."""

    table: TableName
    number: int  # names its temporary type, functions and counters
    columns: tuple[str, ...]  # the snapshot's columns: the values kept
    first: str | None  # None: no app BEFORE trigger to undo, only the nested guard
    last: str
    rewriting: tuple[AppTrigger, ...]  # the app's BEFORE ROW INSERT/UPDATE triggers on it

    def setting(self, what: str) -> str:
        """The name of one of its counters (a setting of the transaction)."""
        return f"snapshot.{what}_{self.number}"


@dataclass(frozen=True)
class Keepers:
    """The keepers one attempt made; ``missing`` names tables it could not keep, and why.

    ``triggered``: the scoped tables the app has triggers on (any kind): when none has,
    nothing but the apply writes into the scope.
    """

    tables: tuple[Keeper, ...] = ()
    missing: tuple[str, ...] = ()
    triggered: frozenset[TableName] = frozenset()
    wanted: frozenset[TableName] = frozenset()  # kept, or meant to be (see ``missing``)

    @property
    def kept(self) -> frozenset[TableName]:
        return frozenset(k.table for k in self.tables)


@dataclass(frozen=True)
class UndoneWrites:
    """What the app's triggers wrote into one table during the apply, all of it undone."""

    table: TableName
    triggers: tuple[str, ...]  # the app triggers that may have written ``columns``
    columns: tuple[str, ...]
    rows: int  # rows the apply wrote whose ``columns`` a trigger changed
    nested_updates: int  # rows the app's triggers updated by statements of their own
    nested_inserts: int  # rows they inserted so (skipped)

    def sentence(self) -> str:
        parts = []
        if self.rows:
            who = ", ".join(self.triggers) or "the app's triggers"
            plural = "s" if len(self.triggers) > 1 else ""
            parts.append(
                f"trigger{plural} {who} wrote {', '.join(self.columns)} into {_rows(self.rows)}"
            )
        if self.nested_updates:
            parts.append(f"the app's triggers updated {_rows(self.nested_updates)} of it")
        if self.nested_inserts:
            parts.append(f"the app's triggers inserted {_rows(self.nested_inserts)} into it")
        return f"{self.table}: {'; '.join(parts)}: undone, the snapshot's values kept"

    def to_json(self) -> dict[str, Any]:
        return {
            "table": str(self.table),
            "triggers": list(self.triggers),
            "columns": list(self.columns),
            "rows": self.rows,
            "nested_updates_undone": self.nested_updates,
            "nested_inserts_skipped": self.nested_inserts,
        }


def _rows(count: int) -> str:
    return f"{count:,} row{'' if count == 1 else 's'}"


def survey(
    conn: psycopg.Connection, tables: Sequence[TableName]
) -> Callable[[], tuple[list[AppTrigger], list[TableName]]]:
    """The app's triggers on ``tables``, and the tables among those the role may not keep
    (it may not create triggers on them: it neither owns them nor has TRIGGER). Asked now,
    read when called (in the caller's pipeline)."""
    refused = conn.execute(
        "SELECT i FROM unnest(%s::regclass[]) WITH ORDINALITY AS w(t, i) "
        "WHERE NOT has_table_privilege(t, 'TRIGGER')",
        ([t.ident.as_string(conn) for t in tables],),
    )
    triggers = catalog.app_triggers_later(conn, tables)

    def result() -> tuple[list[AppTrigger], list[TableName]]:
        found = triggers()
        denied = [tables[int(r[0]) - 1] for r in refused.fetchall()]
        with_triggers = {t.table for t in found}
        return found, [t for t in denied if t in with_triggers]

    return result


@dataclass(frozen=True)
class Survey:
    """What the catalog says about the scope's tables, for :func:`hold`."""

    found: list[AppTrigger]  # the app's triggers
    denied: list[TableName]  # tables with app triggers the role may not keep
    actions: dict[TableName, frozenset[str]]  # columns foreign keys' actions write into
    names: dict[TableName, tuple[str, str] | None]  # the keepers' names, where they fit


def ask(conn: psycopg.Connection, tables: Sequence[TableName]) -> Callable[[], Survey]:
    """Every catalog question :func:`hold` needs, asked now (in the caller's pipeline: with
    the attempt's first statements), read when called: which app triggers each table has and
    may the role keep it, the columns foreign keys write into (ON DELETE/UPDATE actions),
    and the names its BEFORE ROW triggers leave free."""
    surveyed = survey(conn, tables)
    acting = conn.execute(_ACTION_COLUMNS, ([t.ident.as_string(conn) for t in tables],))
    named = _names(conn, tables)

    def result() -> Survey:
        found, denied = surveyed()
        actions = {tables[int(i) - 1]: frozenset(map(str, c)) for i, c in acting.fetchall()}
        return Survey(found, denied, actions, named())

    return result


def hold(
    conn: psycopg.Connection,
    asked: Survey,
    tables: Sequence[TableName],
    shapes: Mapping[TableName, TableShape],
    columns: Mapping[TableName, Sequence[str]],
    numbers: Mapping[TableName, int],
    *,
    also: Collection[TableName] = (),
) -> Keepers:
    """Put keepers on the scoped tables whose app triggers may rewrite rows, and on ``also``.

    ``asked``: what :func:`ask` found. ``columns`` are the snapshot's columns of each table
    (what is kept), ``numbers`` name each table's temporary objects. A table whose triggers
    only check (a guardrail that raises) gets none: its lock is never taken. ``also`` names
    tables found to be written by the app's triggers all the same (an earlier attempt's
    parity; see :func:`guard`).
    """
    found, denied = asked.found, asked.denied
    wanted = {t.table for t in found if t.may_rewrite} | set(also)
    missing = [
        f"{t}: the role may not create triggers on it (GRANT TRIGGER ON {t} TO the role)"
        for t in tables
        if t in wanted and t in denied
    ]
    kept = [t for t in tables if t in wanted and t not in denied]
    all_names, actions = asked.names, asked.actions
    keepers = []
    for table in kept:
        before = tuple(t for t in found if t.table == table and t.before_row)
        names = all_names[table]
        if names is None:
            missing.append(f"{table}: its triggers' names leave no room to fire before and after")
            continue
        first, last = names
        keepers.append(
            Keeper(
                table,
                numbers[table],
                tuple(columns[table]),
                first if before else None,
                last,
                before,
            )
        )
    if keepers:
        ddl = [
            _definition(conn, k, shapes[k.table], actions.get(k.table, frozenset()))
            for k in keepers
        ]
        _quietly(conn, sql.SQL("; ").join(ddl))
        log.info(
            "  keepers on %s: the app's triggers fire on every write; what they write does not "
            "stay",
            ", ".join(str(k.table) for k in keepers),
        )
    for reason in missing:
        log.warning("  warning: values the app's triggers write may stay in %s", reason)
    return Keepers(
        tuple(keepers), tuple(missing), frozenset(t.table for t in found), frozenset(wanted)
    )


def guard(keepers: Keepers, tables: Collection[TableName]) -> list[TableName]:
    """Of ``tables`` (whose rows ended other than the snapshot's), those to try again with
    keepers: the app has triggers on the scope, and keepers were not meant for these yet."""
    if not keepers.triggered:
        return []
    return [t for t in tables if t not in keepers.wanted]


_BEFORE_ROW_NAMES = """
SELECT w.i, t.tgname FROM unnest(%s::regclass[]) WITH ORDINALITY AS w(t, i)
CROSS JOIN LATERAL (SELECT w.t::oid UNION SELECT relid FROM pg_partition_tree(w.t)) AS p(relid)
JOIN pg_trigger t ON t.tgrelid = p.relid WHERE (t.tgtype & 3) = 3
"""


def _names(
    conn: psycopg.Connection, tables: Sequence[TableName]
) -> Callable[[], dict[TableName, tuple[str, str] | None]]:
    """Per table, the first and last keeper's names: sorting before and after every BEFORE
    ROW trigger of the table (PostgreSQL fires them in the byte order of their names); None
    when no name fits. Asked now, read when called."""
    names_of = [t.ident.as_string(conn) for t in tables]
    cursor = conn.execute(_BEFORE_ROW_NAMES, (names_of,))

    def result() -> dict[TableName, tuple[str, str] | None]:
        others: dict[TableName, list[bytes]] = {t: [] for t in tables}
        for i, trigger in cursor.fetchall():
            others[tables[int(i) - 1]].append(str(trigger).encode())
        names: dict[TableName, tuple[str, str] | None] = {}
        for table, taken in others.items():
            first, last = FIRST.encode(), LAST.encode()
            while taken and min(taken) <= first:
                first = b" " + first
            if taken and max(taken) >= last:
                last = max(taken) + b"~"
            fits = max(len(first), len(last)) <= MAX_IDENTIFIER_BYTES
            names[table] = (first.decode(), last.decode()) if fits else None
        return names

    return result


_ACTION_COLUMNS = """
SELECT w.i, array_agg(DISTINCT a.attname::text)
FROM unnest(%s::regclass[]) WITH ORDINALITY AS w(t, i)
CROSS JOIN LATERAL (SELECT w.t::oid UNION SELECT relid FROM pg_partition_tree(w.t)) AS p(relid)
JOIN pg_constraint k ON k.conrelid = p.relid
JOIN pg_attribute a ON a.attrelid = k.conrelid AND a.attnum = ANY(k.conkey)
WHERE k.contype = 'f'
  AND (k.confdeltype IN ('c', 'n', 'd') OR k.confupdtype IN ('c', 'n', 'd'))
GROUP BY w.i
"""


def _definition(
    conn: psycopg.Connection, keeper: Keeper, shape: TableShape, actions: Collection[str]
) -> sql.Composed:
    """The temporary type, counters and functions of one table's keepers, and the triggers.

    The values travel from the first keeper to the last as text in a setting of the
    transaction (one per trigger depth: a trigger's own statements run one deeper), read
    back as a temporary type of the snapshot's columns; rows are compared by their binary
    image (``*=``), which needs no equality operator (``json`` has none). The counters are
    temporary sequences: made in the attempt's savepoint, they vanish with it.
    """
    n = keeper.number
    types = {c.name: c.type for c in shape.columns}
    kept_type = sql.Identifier("pg_temp", f"snapshot_kept_{n}")
    note = sql.Identifier("pg_temp", f"snapshot_note_{n}")
    put_back = sql.Identifier("pg_temp", f"snapshot_put_back_{n}")
    columns = [sql.Identifier(c) for c in keeper.columns]
    stash = sql.SQL("{} || pg_trigger_depth()").format(sql.Literal(STASH))

    def row(alias: str, names: Sequence[sql.Identifier] = columns) -> sql.Composed:
        return sql.SQL("ROW({})").format(
            sql.SQL(", ").join(sql.SQL("{}.{}").format(sql.SQL(alias), c) for c in names)
        )

    def count(what: str) -> sql.Composed:
        return sql.SQL("PERFORM nextval({});").format(sql.Literal(_counter(keeper, what)))

    # A nested UPDATE: every kept column keeps the row's old value, but for the keys a
    # foreign key's action moves (an integrity action, not the app's). Rare: compared as
    # text (two row constructors would be compared column by column, and ``*=`` needs rows).
    stays = [sql.Identifier(c) for c in keeper.columns if c not in actions]
    nested = sql.SQL(
        "IF TG_OP = 'INSERT' THEN {count_inserts} RETURN NULL; END IF; "
        "IF {new_row}::text IS DISTINCT FROM {old_row}::text THEN {count_updates} {restore} "
        "END IF; "
        "RETURN NEW;"
    ).format(
        count_inserts=count("nested_inserts"),
        new_row=row("NEW", stays) if stays else sql.SQL("ROW(1)"),
        old_row=row("OLD", stays) if stays else sql.SQL("ROW(1)"),
        count_updates=count("nested_updates"),
        restore=sql.SQL(" ").join(sql.SQL("NEW.{c} := OLD.{c};").format(c=c) for c in stays),
    )
    statements: list[sql.Composable] = [
        sql.SQL("CREATE TEMP SEQUENCE IF NOT EXISTS {}").format(
            sql.Identifier(_counter(keeper, what))
        )
        for what in ("rows", "nested_updates", "nested_inserts")
    ]
    if keeper.first is None:
        body = nested
        declare: sql.Composable = sql.SQL("")
    else:
        flags = sql.SQL(" || ").join(
            sql.SQL(
                "CASE WHEN NEW.{c}::text IS DISTINCT FROM kept.{c}::text THEN '1' ELSE '0' END"
            ).format(c=c)
            for c in columns
        )
        # Which columns changed is read from the first rows only (SAMPLE): comparing every
        # column of every row as text would cost as much again as keeping them.
        body = sql.SQL(
            "IF pg_trigger_depth() > 1 THEN {nested} END IF; "
            "kept := current_setting({stash})::{kept_type}; "
            "IF NOT ({new_row}::{kept_type} *= kept) THEN "
            "IF current_setting({uncounted}, true) IS DISTINCT FROM 'on' THEN "
            "IF nextval({rows}) <= {sample} THEN "
            "changed := {flags}; "
            "seen := coalesce(nullif(current_setting({cols}, true), ''), repeat('0', {width})); "
            "changed := (changed::varbit | seen::varbit)::text; "
            "IF changed <> seen THEN PERFORM set_config({cols}, changed, true); END IF; "
            "END IF; END IF; "
            "{restore} END IF; "
            "RETURN NEW;"
        ).format(
            nested=nested,
            stash=stash,
            kept_type=kept_type,
            uncounted=sql.Literal(UNCOUNTED),
            new_row=row("NEW"),
            rows=sql.Literal(_counter(keeper, "rows")),
            sample=sql.Literal(SAMPLE),
            flags=flags,
            cols=sql.Literal(keeper.setting("columns")),
            width=sql.Literal(len(columns)),
            restore=sql.SQL(" ").join(sql.SQL("NEW.{c} := kept.{c};").format(c=c) for c in columns),
        )
        declare = sql.SQL("DECLARE kept {}; changed text; seen text; ").format(kept_type)
        statements += [
            sql.SQL("DROP TYPE IF EXISTS {}").format(kept_type),
            sql.SQL("CREATE TYPE {} AS ({})").format(
                kept_type,
                sql.SQL(", ").join(
                    sql.SQL("{} {}").format(c, sql.SQL(types[name]))
                    for c, name in zip(columns, keeper.columns, strict=True)
                ),
            ),
            sql.SQL(
                "CREATE OR REPLACE FUNCTION {note}() RETURNS trigger LANGUAGE plpgsql AS {body}"
            ).format(
                note=note,
                body=sql.Literal(
                    sql.SQL("BEGIN PERFORM set_config({stash}, {row}::text, true); RETURN NEW; END")
                    .format(stash=stash, row=row("NEW"))
                    .as_string(conn)
                ),
            ),
            sql.SQL(
                "CREATE TRIGGER {name} BEFORE INSERT OR UPDATE ON {table} "
                "FOR EACH ROW EXECUTE FUNCTION {note}()"
            ).format(name=sql.Identifier(keeper.first), table=keeper.table.ident, note=note),
        ]
    statements += [
        sql.SQL(
            "CREATE OR REPLACE FUNCTION {put_back}() RETURNS trigger LANGUAGE plpgsql AS {body}"
        ).format(
            put_back=put_back,
            body=sql.Literal(
                sql.SQL("{declare}BEGIN {body} END")
                .format(declare=declare, body=body)
                .as_string(conn)
            ),
        ),
        sql.SQL(
            "CREATE TRIGGER {name} BEFORE INSERT OR UPDATE ON {table} FOR EACH ROW {when}"
            "EXECUTE FUNCTION {put_back}()"
        ).format(
            name=sql.Identifier(keeper.last),
            table=keeper.table.ident,
            when=sql.SQL("WHEN (pg_trigger_depth() > 0) " if keeper.first is None else ""),
            put_back=put_back,
        ),
    ]
    return sql.SQL("; ").join(statements)


def _counter(keeper: Keeper, what: str) -> str:
    """The temporary sequence counting ``what`` for one table (rows, nested_updates...)."""
    return f"snapshot_{what}_{keeper.number}"


def _quietly(conn: psycopg.Connection, ddl: sql.Composed) -> None:
    """Run ``ddl`` with the database's event triggers off where the role may turn them off."""
    try:
        with conn.transaction():
            conn.execute("SET LOCAL session_replication_role = replica")
            conn.execute(ddl)
            conn.execute("SET LOCAL session_replication_role = origin")
        return
    except psycopg.errors.InsufficientPrivilege:
        pass
    with conn.transaction():
        conn.execute(ddl)


def writes(conn: psycopg.Connection, keepers: Keepers) -> tuple[UndoneWrites, ...]:
    """What the app's triggers wrote and the keepers undid, per table (read before parity)."""
    if not keepers.tables:
        return ()
    counts = sql.SQL(", ").join(
        sql.SQL("(SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM {})").format(
            sql.Identifier("pg_temp", _counter(keeper, what))
        )
        for keeper in keepers.tables
        for what in ("rows", "nested_updates", "nested_inserts")
    )
    values = conn.execute(sql.SQL("SELECT {}").format(counts)).fetchone() or ()
    flags = conn.execute(
        "SELECT coalesce(current_setting(s, true), '') FROM unnest(%s::text[]) "
        "WITH ORDINALITY AS u(s, i) ORDER BY i",
        ([k.setting("columns") for k in keepers.tables],),
    ).fetchall()
    found = []
    for i, keeper in enumerate(keepers.tables):
        rows, updates, inserts = (int(v) for v in values[3 * i : 3 * i + 3])
        if not (rows or updates or inserts):
            continue
        changed = str(flags[i][0])
        columns = tuple(c for c, flag in zip(keeper.columns, changed, strict=False) if flag == "1")
        rewriting = [t for t in keeper.rewriting if t.may_rewrite] or list(keeper.rewriting)
        named = [t.name for t in rewriting if any(t.names_column(c) for c in columns)]
        found.append(
            UndoneWrites(
                keeper.table,
                tuple(named or (t.name for t in rewriting)) if rows else (),
                columns,
                rows,
                updates,
                inserts,
            )
        )
    return tuple(found)


TRY_DROP = 0.1  # seconds one attempt waits for the tables' locks before letting go of them all


def release(conn: psycopg.Connection, keepers: Keepers, lock_timeout: str, env: str) -> None:
    """Drop the keeper triggers, right before the commit (their functions die with the session).

    ``DROP TRIGGER`` takes ACCESS EXCLUSIVE: all the tables at once or none, each try bounded
    by :data:`TRY_DROP`, so readers never queue behind a long wait; for as long as ``[apply]
    lock_timeout``, after which the apply fails and rolls back (nothing changed).
    """
    if not keepers.tables:
        return
    drops = sql.SQL("; ").join(
        sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(sql.Identifier(name), k.table.ident)
        for k in keepers.tables
        for name in (k.first, k.last)
        if name is not None
    )
    deadline = time.monotonic() + duration_seconds(lock_timeout)
    conn.execute(
        sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(f"{TRY_DROP * 1000:.0f}ms"))
    )
    while True:
        try:
            _quietly(conn, drops)
            break
        except psycopg.errors.LockNotAvailable:
            if time.monotonic() >= deadline:
                tables = [k.table for k in keepers.tables]
                holders = lock_holders(conn, tables, readers=True)
                raise ApplyFailed(
                    f"could not drop the apply's keeper triggers on "
                    f"{', '.join(map(str, tables))} within {lock_timeout} (DROP TRIGGER waits "
                    f"for every reader): {holders}; rolled back, {env} is unchanged: retry in a "
                    "quieter moment or raise [apply] lock_timeout"
                ) from None
            time.sleep(random.uniform(0.02, 0.1))
    conn.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(lock_timeout)))
