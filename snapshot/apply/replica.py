"""Large writes with foreign keys checked once per key, in bulk, readers never waiting.

Row by row, every written child row looks up its parent and every deleted parent looks for
children: on a first apply or any large change that is most of the write time (raw
``pg_restore`` pays it too). When the change is large (``[apply] foreign_key_checks =
"auto"``: at least a tenth of the scope's rows) and the role may, the writes run with
``session_replication_role = replica`` (and the deletes need no helper indexes):

* PostgreSQL then skips the foreign keys' per-row checks and actions; every other trigger
  on the scoped tables (guardrails, ``updated_at``, audits) is set ``ENABLE ALWAYS`` for the
  transaction, so the app's triggers all fire as they would have (``ENABLE REPLICA`` ones
  are disabled, as they would not have fired), and set back before the commit. Constraints
  that are not triggers (primary and unique keys, checks, not null) hold as always;
* after the writes every foreign key from or to a table they wrote is checked with one
  anti-join, using the key's own equality operators and MATCH rule, with
  ``row_security`` off (a policy hiding rows stops the check instead of fooling it).

It is a proof, not a shortcut: the scope is locked EXCLUSIVE from before the
transaction's snapshot to the commit, so no other session can insert a child of, or delete
the parent of, a row this check has seen (its own foreign-key check or action must lock
the scoped table's rows, and waits). Anything it cannot prove, or any surprise, rolls the
attempt back and it is made again row by row, the report saying why: a row a key would
refuse (an orphan, or a cascade the per-row writes would have done), a trigger that wrote
to a table outside the scope, a trigger's error. A role that may not set the parameter
(plain PostgreSQL needs ``GRANT SET ON PARAMETER session_replication_role``; Supabase's
``postgres`` may set it) or alter the triggers writes row by row from the start, as do
deferrable unique keys and app triggers (their events would still be pending when the
triggers are set back, which ``ALTER TABLE`` refuses, and they are meant to fire at the
commit), rules, partitioned tables, foreign keys not yet validated, and keys from outside
the scope that follow a changed key (``ON UPDATE CASCADE``, ``SET NULL``, ``SET DEFAULT``):
an anti-join proves a reference finds a parent, not that it should have moved to another.

In bulk, the first pass deletes every row the snapshot lacks: with no foreign key acting
per row, a parent need not wait for its children to move (sparing it takes anti-joins
whose row estimates collapse, and the plans with them, without the helper indexes).

``ALTER TABLE ... ENABLE ALWAYS TRIGGER`` takes SHARE ROW EXCLUSIVE, weaker than the
EXCLUSIVE lock the apply already holds: readers go on. It runs in replica mode, so the
database's event triggers (PostgREST's schema reload on Supabase) do not fire.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from snapshot.apply.plan import Plan
from snapshot.apply.state import ApplyRun
from snapshot.db import error_message
from snapshot.names import TableName

log = logging.getLogger(__name__)

AUTO_SHARE = 0.1  # "auto": in bulk when the writes reach a tenth of the scope's rows


class NotHere(Exception):
    """The bulk writes could not be kept (not proven, or refused): write row by row."""


def same_row_by_row(error: psycopg.Error) -> bool:
    """Whether ``error`` would fail the row-by-row writes just the same.

    Keys, NOT NULL and bad values met by the apply's own statement are checked by the same
    code in both modes; an error raised inside a function (a trigger, whatever its
    SQLSTATE) may have seen what only the per-row writes do.
    """
    state = error.sqlstate or ""
    same = state in ("23502", "23505", "23P01") or state.startswith("22")
    return same and not error.diag.context


@dataclass(frozen=True)
class _Trigger:
    table: TableName
    name: str
    enabled: str  # "O" fires on origin (the default), "R" on replica only


@dataclass(frozen=True)
class BulkWrites:
    """The state a bulk write changed, to put back before the commit."""

    triggers: tuple[_Trigger, ...]


def wanted(run: ApplyRun, plan: Plan) -> bool:
    """Whether ``[apply] foreign_key_checks`` asks for the bulk path on this plan."""
    mode = run.config.apply.foreign_key_checks
    if mode != "auto":
        return mode == "bulk"
    rows = sum(t.target_rows + t.inserts for t in plan.tables)
    return plan.changes > 0 and plan.changes >= AUTO_SHARE * rows


_OBSTACLES = """
SELECT format('%%s is partitioned or a partition', c.oid::regclass)
FROM pg_class c WHERE c.oid = ANY(%(oids)s::regclass[]) AND (c.relkind = 'p' OR c.relispartition)
UNION ALL
SELECT format('%%s has the rule %%I', r.ev_class::regclass, r.rulename)
FROM pg_rewrite r WHERE r.ev_class = ANY(%(oids)s::regclass[]) AND r.ev_type <> '1'
UNION ALL
SELECT format('%%s has the deferrable key %%I', k.conrelid::regclass, k.conname)
FROM pg_constraint k
WHERE k.conrelid = ANY(%(oids)s::regclass[]) AND k.contype IN ('p', 'u', 'x') AND k.condeferrable
UNION ALL
SELECT CASE WHEN t.tgdeferrable
  THEN format('%%s has the deferred trigger %%I', t.tgrelid::regclass, t.tgname)
  ELSE format('the role does not own %%s, so it may not set its trigger %%I to fire always',
              t.tgrelid::regclass, t.tgname) END
FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
WHERE t.tgrelid = ANY(%(oids)s::regclass[]) AND NOT t.tgisinternal
  AND (t.tgdeferrable OR (t.tgenabled IN ('O', 'R') AND NOT pg_has_role(c.relowner, 'USAGE')))
UNION ALL
SELECT format('%%s refers to %%s ON UPDATE %%s, outside the scope: row by row it follows '
              'a changed key, which a check in bulk cannot do', k.conrelid::regclass,
              k.confrelid::regclass,
              CASE k.confupdtype WHEN 'c' THEN 'CASCADE' WHEN 'n' THEN 'SET NULL'
                                 ELSE 'SET DEFAULT' END)
FROM pg_constraint k
WHERE k.contype = 'f' AND k.confrelid = ANY(%(oids)s::regclass[])
  AND NOT k.conrelid = ANY(%(oids)s::regclass[])
  AND k.confupdtype IN ('c', 'n', 'd')
UNION ALL
SELECT CASE WHEN NOT k.convalidated
  THEN format('the foreign key %%I on %%s is not validated', k.conname, k.conrelid::regclass)
  ELSE format('the role may not read %%s, which the foreign key %%I joins',
              o.oid::regclass, k.conname) END
FROM pg_constraint k
JOIN pg_class o ON o.oid IN (k.conrelid, k.confrelid)
WHERE k.contype = 'f'
  AND (k.conrelid = ANY(%(oids)s::regclass[]) OR k.confrelid = ANY(%(oids)s::regclass[]))
  AND (NOT k.convalidated OR NOT has_table_privilege(o.oid, 'SELECT'))
LIMIT 1
"""

_TRIGGERS = """
SELECT n.nspname, c.relname, t.tgname, t.tgenabled
FROM pg_trigger t
JOIN pg_class c ON c.oid = t.tgrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE t.tgrelid = ANY(SELECT unnest(%s::regclass[])::oid) AND NOT t.tgisinternal
  AND t.tgenabled IN ('O', 'R')
ORDER BY n.nspname, c.relname, t.tgname
"""


def _names(run: ApplyRun) -> list[str]:
    """The scoped tables' names, for ``%s::regclass[]``."""
    return [t.ident.as_string(run.conn) for t in run.order]


def choose(run: ApplyRun, plan: Plan) -> tuple[bool, str | None]:
    """Whether ``plan``'s writes check their foreign keys in bulk; when not, why (None when
    there is nothing to say: a change too small for it, or ``--block-readers``).

    The one rule ``check`` reports and the apply follows, attempt after attempt.
    """
    if run.block_readers:
        return False, None
    if run.row_by_row:
        return False, run.row_by_row
    if not wanted(run, plan):
        return False, None
    why = obstacle(run, run.options.allowed)
    return why is None, why


def obstacle(run: ApplyRun, allowed_cascades: Collection[str]) -> str | None:
    """Why the scope must be written row by row whatever the change, or None.

    Asked once an apply, before its lock (by the staged checks): under the lock it costs
    six round trips of the writers' wait. The answer reads the catalog and the role's
    rights; should either change before the lock, the bulk path still proves itself
    (:func:`enter` and :func:`leave` raise :class:`NotHere`, and the writes go row by row).
    """
    if run.bulk_obstacle is None:
        run.bulk_obstacle = _obstacle(run, allowed_cascades) or ""
    return run.bulk_obstacle or None


def _obstacle(run: ApplyRun, allowed_cascades: Collection[str]) -> str | None:
    scoped = set(run.order)
    for fk in run.fks:
        name = f"{fk.child}.{fk.name}"
        if fk.parent in scoped and fk.child not in scoped and name in allowed_cascades:
            return f"--allow-cascade {name} asks for the cascade the per-row writes do"
    row = run.conn.execute(_OBSTACLES, {"oids": _names(run)}).fetchone()
    if row:
        return str(row[0])
    try:  # one simple query, one round trip (psycopg's transaction() would cost three)
        run.conn.execute("BEGIN; SET LOCAL session_replication_role = replica; ROLLBACK")
    except psycopg.errors.InsufficientPrivilege as exc:
        if run.conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            run.conn.execute("ROLLBACK")  # the refused SET left the transaction failed
        return (
            f"{run.target.env}'s role may not write in replica mode ({error_message(exc)};"
            " on plain PostgreSQL: GRANT SET ON PARAMETER session_replication_role TO it)"
        )
    return None


def enter(run: ApplyRun) -> BulkWrites:
    """Switch the transaction to replica writes; the app's triggers made to fire all the same.

    Raises :class:`NotHere` when it cannot (the caller's savepoint undoes the rest).
    """
    conn = run.conn
    triggers = tuple(
        _Trigger(TableName(str(schema), str(table)), str(name), str(enabled))
        for schema, table, name, enabled in conn.execute(_TRIGGERS, (_names(run),))
    )
    try:
        with conn.pipeline():  # one round trip
            conn.execute("SET LOCAL session_replication_role = replica")
            _alter(conn, triggers, {"O": "ENABLE ALWAYS", "R": "DISABLE"})
    except psycopg.errors.QueryCanceled:
        raise
    except psycopg.OperationalError:
        raise
    except psycopg.Error as exc:  # e.g. deferred events the pre-scripts left pending
        raise NotHere(f"replica mode could not start ({error_message(exc)})") from None
    log.info(
        "  writing with session_replication_role = replica, %d app triggers set to fire "
        "always (%d replica-only ones off); foreign keys checked in bulk after the writes",
        sum(t.enabled == "O" for t in triggers),
        sum(t.enabled == "R" for t in triggers),
    )
    return BulkWrites(triggers)


_WRITTEN = """
SELECT s.relid, s.n_tup_ins + s.n_tup_upd + s.n_tup_del, format('%s', s.relid::regclass)
FROM pg_stat_xact_user_tables s JOIN pg_class c ON c.oid = s.relid
WHERE c.relpersistence <> 't'
"""


def write_counters(conn: psycopg.Connection) -> dict[int, int]:
    """Rows this transaction has written so far, per table (inserts + updates + deletes)."""
    return write_counters_later(conn)()


def write_counters_later(conn: psycopg.Connection) -> Callable[[], dict[int, int]]:
    """:func:`write_counters`, asked now and read when called (in a pipeline)."""
    cursor = conn.execute(_WRITTEN)
    return lambda: {int(oid): int(n) for oid, n, _ in cursor.fetchall()}


def _named_counters_later(conn: psycopg.Connection) -> Callable[[], dict[int, tuple[int, str]]]:
    """:func:`write_counters_later`, each table's count with its name."""
    cursor = conn.execute(_WRITTEN)
    return lambda: {int(oid): (int(n), str(name)) for oid, n, name in cursor.fetchall()}


def leave(run: ApplyRun, state: BulkWrites, before: dict[int, int]) -> None:
    """Prove every foreign key the writes could have broken, then put the triggers back.

    ``before`` are the :func:`write_counters` from before the writes: every table written
    since has each of its keys checked, and one outside the scope stops the bulk path (its
    own triggers and keys did not run). Raises :class:`NotHere` on anything not proven.
    """
    conn = run.conn
    try:
        # Two round trips: what was written, the keys and row_security off; then every
        # key's check, and (should none fail) row_security, the triggers and the role back.
        # A failed check rolls the attempt back, and the settings with it.
        with conn.pipeline():
            scoped = conn.execute("SELECT unnest(%s::regclass[])::oid", (_names(run),))
            counters = _named_counters_later(conn)
            row_security = conn.execute("SHOW row_security")
            conn.execute("SET LOCAL row_security = off")
            every_key = _keys_later(conn, _names(run))
        in_scope = {int(r[0]) for r in scoped.fetchall()}
        written: set[int] = set()
        outside: list[str] = []
        for oid, (rows, name) in counters().items():
            if rows == before.get(oid, 0):
                continue
            if oid in in_scope:
                written.add(oid)
            else:
                outside.append(name)
        if outside:
            raise NotHere(
                f"a trigger wrote to {', '.join(outside)}, outside the scope, whose own checks "
                "would not have run"
            )
        keys = [key for key in every_key() if key.oids & written]
        setting = row_security.fetchone()
        with conn.pipeline():
            asked = [(key, [conn.execute(q) for q in key.violation]) for key in keys]
            conn.execute(
                "SELECT set_config('row_security', %s, true)", (setting[0] if setting else "on",)
            )
            _alter(conn, state.triggers, {"O": "ENABLE", "R": "ENABLE REPLICA"})
            conn.execute("SET LOCAL session_replication_role = origin")
        for key, cursors in asked:
            if any(cursor.fetchone() for cursor in cursors):
                raise NotHere(f"rows of {key.child} break {key.name} (or need its cascade)")
    except psycopg.errors.QueryCanceled:
        raise
    except psycopg.OperationalError:
        raise
    except psycopg.Error as exc:
        raise NotHere(f"the bulk check could not run ({error_message(exc)})") from None
    log.info("  %d foreign keys checked in bulk", len(keys))


def _alter(conn: psycopg.Connection, triggers: Sequence[_Trigger], how: dict[str, str]) -> None:
    by_table: dict[TableName, list[_Trigger]] = {}
    for trigger in triggers:
        by_table.setdefault(trigger.table, []).append(trigger)
    for table, found in by_table.items():
        conn.execute(
            sql.SQL("ALTER TABLE {} {}").format(
                table.ident,
                sql.SQL(", ").join(
                    sql.SQL("{} TRIGGER {}").format(sql.SQL(how[t.enabled]), sql.Identifier(t.name))
                    for t in found
                ),
            )
        )


@dataclass(frozen=True)
class _Key:
    name: str
    child: str
    violation: tuple[sql.Composed, ...]  # each returns a row when some row breaks the key
    oids: frozenset[int] = frozenset()  # the child's and the parent's


# One row per foreign key from or to the written tables, its columns paired with the
# operator its own per-row check uses (conpfeqop: parent's type on the left).
_KEYS = """
SELECT k.conrelid, k.confrelid, k.conname, k.confmatchtype,
       cn.nspname, c.relname, c.relkind = 'p',
       pn.nspname, p.relname, p.relkind = 'p',
       array_agg(ca.attname ORDER BY x.i), array_agg(pa.attname ORDER BY x.i),
       array_agg(opn.nspname ORDER BY x.i), array_agg(op.oprname ORDER BY x.i)
FROM pg_constraint k
JOIN pg_class c ON c.oid = k.conrelid JOIN pg_namespace cn ON cn.oid = c.relnamespace
JOIN pg_class p ON p.oid = k.confrelid JOIN pg_namespace pn ON pn.oid = p.relnamespace
CROSS JOIN LATERAL unnest(k.conkey, k.confkey, k.conpfeqop) WITH ORDINALITY AS x(ck, pk, eq, i)
JOIN pg_attribute ca ON ca.attrelid = k.conrelid AND ca.attnum = x.ck
JOIN pg_attribute pa ON pa.attrelid = k.confrelid AND pa.attnum = x.pk
JOIN pg_operator op ON op.oid = x.eq JOIN pg_namespace opn ON opn.oid = op.oprnamespace
CROSS JOIN (SELECT array_agg(t::oid) AS oids FROM unnest(%s::regclass[]) AS t) AS w
WHERE k.contype = 'f' AND k.conparentid = 0
  AND (k.conrelid = ANY(w.oids) OR k.confrelid = ANY(w.oids))
GROUP BY k.oid, k.conname, k.confmatchtype, cn.nspname, c.relname, c.relkind,
         pn.nspname, p.relname, p.relkind
ORDER BY cn.nspname, c.relname, k.conname
"""


def _keys_later(conn: psycopg.Connection, names: list[str]) -> Callable[[], list[_Key]]:
    """Every foreign key from or to the tables ``names``, asked now (in the caller's
    pipeline) and read when called."""
    cursor = conn.execute(_KEYS, (names,))
    return lambda: [_key(row) for row in cursor.fetchall()]


def _key(row: Sequence[Any]) -> _Key:
    """One row of :data:`_KEYS` as the queries that prove the key."""
    child_oid, parent_oid = int(row[0]), int(row[1])
    name, match, cs, ct, c_part, ps, pt, p_part, ccols, pcols, opschemas, ops = row[2:]
    child = TableName(str(cs), str(ct))
    parent = TableName(str(ps), str(pt))
    refer = sql.SQL(" AND ").join(
        sql.SQL("p.{} OPERATOR({}.{}) c.{}").format(
            sql.Identifier(pc), sql.Identifier(o_s), sql.SQL(o), sql.Identifier(cc)
        )
        for cc, pc, o_s, o in zip(ccols, pcols, opschemas, ops, strict=True)
    )
    # IS NOT NULL per column, not num_nulls() = 0: the planner estimates that as rare
    # and probes the parent's index row by row instead of one hash anti-join.
    present = sql.SQL(" AND ").join(
        sql.SQL("c.{} IS NOT NULL").format(sql.Identifier(c)) for c in ccols
    )
    checks = [
        sql.SQL("{} AND NOT EXISTS (SELECT FROM {} {} AS p WHERE {})").format(
            present, sql.SQL("" if p_part else "ONLY"), parent.ident, refer
        )
    ]
    if match == "f":  # MATCH FULL: all null or none
        checks.append(
            sql.SQL("num_nulls({}) NOT IN (0, {})").format(
                sql.SQL(", ").join(sql.SQL("c.{}").format(sql.Identifier(c)) for c in ccols),
                sql.Literal(len(ccols)),
            )
        )
    violation = tuple(
        sql.SQL("SELECT 1 FROM {} {} AS c WHERE {} LIMIT 1").format(
            sql.SQL("" if c_part else "ONLY"), child.ident, check
        )
        for check in checks
    )
    return _Key(str(name), str(child), violation, frozenset((child_oid, parent_oid)))
