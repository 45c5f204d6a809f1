"""Rows outside the scope that refer to it: what the apply would take from under them, decided
once for ``check`` and the apply, and the parent rows kept for them when asked.

An outside row (prod's ``public.rental``, its own history) refers to a scoped parent row
(``public.inventory``) through a foreign key. However the parent table is written, a parent
row whose key the snapshot also holds, with the same referenced values, stays where the
outside rows find it: a delta updates it in place; a full replace row by row keeps it and
updates it (:mod:`.write`); a full replace in bulk deletes and inserts it again while no
foreign key acts, and proves every reference afterwards (:mod:`.replica`). Only a parent the
snapshot lacks (or holds with other referenced values) is taken away: deleting it would
fail (NO ACTION, RESTRICT), delete the outside rows (CASCADE) or null them out (SET NULL,
SET DEFAULT). That is the conflict, the same in every mode, counted by :func:`settle` and
judged by :func:`verdict` in the same words for check's finding and the apply's refusal.

A table without a key is replaced whole, and so are the scoped tables that refer to it: no
row of theirs can be kept in place, so every reference into them is a conflict.

With ``--keep-referenced`` (or ``[apply] keep_referenced``), :func:`settle` keeps those
parent rows as the target has them (``pg_temp._snapshot_k<n>``, the keys), with the scoped
parents they need in turn, and takes them out of the delta: the apply never writes them,
the plan counts them, parity expects them beside the snapshot's rows (:func:`expected`)
and the reports state them as kept, never as a match.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from snapshot import staging
from snapshot.apply import rows as rowsets
from snapshot.apply.rows import RowSet
from snapshot.apply.state import ApplyRun
from snapshot.catalog import ForeignKey
from snapshot.checksum import TableStats, table_stats
from snapshot.names import AUTH_TABLES, TableName, quote

log = logging.getLogger(__name__)

OK, WARNING, ERROR = "ok", "warning", "error"
SAMPLE = 5  # parent keys a sentence shows
DELETE_RULES = {
    "a": "no action",
    "r": "restrict",
    "c": "cascade",
    "n": "set null",
    "d": "set default",
}


@dataclass(frozen=True)
class Reference:
    """One foreign key from outside the scope into it, and the references the apply breaks."""

    fk: ForeignKey
    total: int  # outside rows that refer to the scope at all
    rows: int = 0  # ... to a parent row the apply takes away
    parents: int = 0  # those parent rows
    key: tuple[str, ...] = ()  # the parent's columns the sample shows
    sample: tuple[str, ...] = ()  # a few of their keys, as text
    whole: TableName | None = None  # a table without a key the parent is replaced with
    unreadable: bool = False  # the role may not read the outside table
    values: tuple[str, ...] = ()  # referenced columns besides the key an update may not change

    @property
    def name(self) -> str:
        """``schema.table.constraint``, as ``--allow-cascade`` takes it."""
        return f"{self.fk.child}.{quote(self.fk.name)}"

    @property
    def rule(self) -> str:
        return DELETE_RULES.get(self.fk.on_delete, self.fk.on_delete)

    def acknowledged(self, allowed: Collection[str]) -> bool:
        """Whether the user accepted this key's cascade or set-null (``--allow-cascade``)."""
        return self.fk.on_delete in ("c", "n", "d") and (
            self.name in allowed or f"{self.fk.child}.{self.fk.name}" in allowed
        )


@dataclass(frozen=True)
class Kept:
    """Rows of one scoped table the apply keeps as the target has them."""

    table: TableName
    rows: int
    key: tuple[str, ...]
    sample: tuple[str, ...]
    referenced_by: tuple[str, ...]  # the outside tables (or kept scoped rows) needing them

    def sentence(self, target: str) -> str:
        """``20 public.inventory rows (inventory_id 61, 62, …) kept for public.rental``."""
        return (
            f"{_rows(self.rows, str(self.table))} {_keys(self.key, self.sample, self.rows)} "
            f"kept as {target} has {'it' if self.rows == 1 else 'them'}, for "
            f"{', '.join(self.referenced_by)}"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "table": str(self.table),
            "rows": self.rows,
            "key": list(self.key),
            "sample": list(self.sample),
            "referenced_by": list(self.referenced_by),
        }


def _rows(count: int, table: str) -> str:
    return f"{count:,} {table} row{'' if count == 1 else 's'}"


def _of(count: int, table: TableName) -> str:
    """``3 rows of public.rental refer``."""
    return f"{count:,} row{'' if count == 1 else 's'} of {table} refer{'s' if count == 1 else ''}"


def _keys(key: Sequence[str], sample: Sequence[str], count: int) -> str:
    """``(inventory_id 61, 62, 63, …)``: the key columns and a few values."""
    more = ", …" if count > len(sample) else ""
    columns = ", ".join(map(quote, key))
    columns = f"({columns})" if len(key) > 1 else columns
    return f"({columns} {', '.join(sample)}{more})"


def outside_keys(run: ApplyRun) -> list[ForeignKey]:
    """Foreign keys from tables outside the scope (the auth tables apart) into it."""
    scoped = set(run.order)
    return [
        fk
        for fk in run.fks
        if fk.parent in scoped and fk.child not in scoped and fk.child not in AUTH_TABLES
    ]


def holding(run: ApplyRun) -> frozenset[TableName]:
    """Scoped tables whose rows outside rows may need in place: referred to from outside,
    directly or through the scoped tables that refer to them."""
    found = {fk.parent for fk in outside_keys(run)}
    frontier = list(found)
    while frontier:
        child = frontier.pop()
        for fk in run.fks:
            if fk.child == child and fk.parent in run.order and fk.parent not in found:
                found.add(fk.parent)
                frontier.append(fk.parent)
    return frozenset(found)


def _whole(run: ApplyRun, table: TableName) -> TableName | None:
    """A table without a key that ``table`` is replaced with (itself or a scoped ancestor)."""
    seen, frontier = {table}, [table]
    while frontier:
        current = frontier.pop()
        if current not in run.row_sets:
            return current
        for fk in run.fks:
            if fk.child == current and fk.parent in run.order and fk.parent not in seen:
                seen.add(fk.parent)
                frontier.append(fk.parent)
    return None


def _refer(fk: ForeignKey, child: str, parent: str) -> sql.Composable:
    return sql.SQL(" AND ").join(
        sql.SQL("{}.{} = {}.{}").format(
            sql.Identifier(child), sql.Identifier(c), sql.Identifier(parent), sql.Identifier(p)
        )
        for c, p in zip(fk.columns, fk.parent_columns, strict=True)
    )


def _lacks(
    run: ApplyRun, rows: RowSet, parent_columns: Sequence[str], alias: str
) -> sql.Composable:
    """``alias`` (a target row) is one the snapshot lacks, or holds with other values in
    ``parent_columns`` (the columns a foreign key refers to)."""
    columns = list(dict.fromkeys([*rows.key, *parent_columns]))
    same = sql.SQL(" AND ").join(
        sql.SQL("z.{c} = {a}.{c}").format(c=sql.Identifier(c), a=sql.Identifier(alias))
        for c in columns
    )
    return sql.SQL("NOT EXISTS (SELECT 1 FROM {} AS z WHERE {})").format(rows.stage, same)


def _text(columns: Sequence[str], alias: str) -> sql.Composable:
    """A key's value as text: the column's for one, the row's for several."""
    names = [sql.Identifier(alias, c) for c in columns]
    if len(names) == 1:
        return sql.SQL("{}::text").format(names[0])
    return sql.SQL("ROW({})::text").format(sql.SQL(", ").join(names))


def survey(run: ApplyRun, *, staged: bool = True) -> tuple[Reference, ...]:
    """Every foreign key from outside the scope, with the references the apply would break.

    ``staged=False`` (a live source, nothing staged yet): only the rows referring to the
    scope are counted.
    """
    return tuple(_survey_key(run, fk, staged) for fk in outside_keys(run))


def _survey_key(run: ApplyRun, fk: ForeignKey, staged: bool) -> Reference:
    present = sql.SQL(" AND ").join(
        sql.SQL("c.{} IS NOT NULL").format(sql.Identifier(c)) for c in fk.columns
    )
    try:
        with run.conn.transaction():  # a refused read must not end an open transaction
            total = _scalar(
                run.conn,
                sql.SQL("SELECT count(*) FROM {} AS c WHERE {}").format(fk.child.ident, present),
            )
            if not staged or not total:
                return Reference(fk, total)
            whole = _whole(run, fk.parent)
            rows = run.row_sets.get(fk.parent)
            values: tuple[str, ...] = ()
            if whole is not None or rows is None:
                key: tuple[str, ...] = fk.parent_columns
                lost: sql.Composable = sql.SQL("true")
            else:
                values = _values(run, fk, rows)
                key, lost = rows.key, _lacks(run, rows, values, "p")
            keys = sql.SQL(", ").join(sql.Identifier("p", c) for c in key)
            broken = sql.SQL("FROM {c} AS c JOIN {p} AS p ON {refer} WHERE {lost}").format(
                c=fk.child.ident, p=fk.parent.ident, refer=_refer(fk, "c", "p"), lost=lost
            )
            row = run.conn.execute(
                sql.SQL(
                    "SELECT count(*), coalesce(sum(n), 0) FROM "
                    "(SELECT count(*) AS n {} GROUP BY {}) AS x"
                ).format(broken, keys)
            ).fetchone()
            parents, referring = (int(row[0]), int(row[1])) if row else (0, 0)
            sample: tuple[str, ...] = ()
            if parents:
                sample = tuple(
                    str(r[0])
                    for r in run.conn.execute(
                        sql.SQL("SELECT {} {} GROUP BY {} ORDER BY {} LIMIT {}").format(
                            _text(key, "p"), broken, keys, keys, sql.Literal(SAMPLE)
                        )
                    )
                )
    except psycopg.errors.InsufficientPrivilege:
        return Reference(fk, 0, unreadable=True)
    return Reference(fk, total, referring, parents, key, sample, whole, values=values)


def _values(run: ApplyRun, fk: ForeignKey, rows: RowSet) -> tuple[str, ...]:
    """The referenced columns besides ``rows``' key whose change would break ``fk``.

    A key that follows its parent's change (ON UPDATE CASCADE, SET NULL, SET DEFAULT) lets
    the parent's row be updated in place, as the delta always did; otherwise an update of
    those columns fails, as a delete would.
    """
    extra = tuple(c for c in fk.parent_columns if c not in rows.key)
    if not extra:
        return ()
    row = run.conn.execute(
        "SELECT confupdtype FROM pg_constraint WHERE conrelid = %s::regclass AND conname = %s",
        (fk.child.ident.as_string(run.conn), fk.name),
    ).fetchone()
    return () if row and row[0] in ("c", "n", "d") else extra


def _scalar(conn: psycopg.Connection, query: sql.Composed) -> int:
    row = conn.execute(query).fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def verdict(
    run: ApplyRun, ref: Reference, allowed: Collection[str], *, staged: bool = True
) -> tuple[str, str]:
    """(status, sentence) for one foreign key from outside: check's finding, the apply's refusal.

    Run before anything is staged (a live source), only the count of references is known:
    the apply decides, before any write, once the snapshot is staged.
    """
    fk, target = ref.fk, run.target.env
    head = f"{fk} (on delete {ref.rule})"
    if ref.unreadable:
        return ERROR, (
            f"{head}: {run.info.user} may not read {fk.child} to count its rows; grant SELECT on it"
        )
    if not staged:
        return OK, (
            f"{head}: {_of(ref.total, fk.child)} to the scope; the apply counts, "
            "before any write, those whose parent the snapshot lacks"
        )
    if not ref.rows:
        spared = f" ({ref.total:,} refer{'s' if ref.total == 1 else ''} to rows it keeps)"
        spared = spared if ref.total else ""
        return OK, f"{head}: no row of {fk.child} refers to a row the snapshot lacks{spared}"
    them = "it" if ref.parents == 1 else "them"
    lacks = (
        f"{_of(ref.rows, fk.child)} to {_rows(ref.parents, str(fk.parent))} "
        f"{_keys(ref.key, ref.sample, ref.parents)}"
    )
    if ref.whole is not None:
        lacks += (
            f", every one of them: {ref.whole} has no primary key or unique key over NOT NULL "
            "columns, so it is replaced whole"
            + ("" if ref.whole == fk.parent else f" and {fk.parent} with it")
        )
    else:
        lacks += " the snapshot lacks"
        if ref.values:
            lacks += f" (or holds with other {', '.join(map(quote, ref.values))})"
    if ref.acknowledged(allowed):
        verb = "be deleted" if fk.on_delete == "c" else "lose their reference"
        return WARNING, f"{head}: {lacks}: those rows will {verb} (acknowledged)"
    if run.keep_referenced and ref.whole is None:
        return WARNING, f"{head}: {lacks}: kept as {target} has {them} (--keep-referenced)"
    columns = ", ".join(map(quote, fk.columns))
    harm = {
        "c": f"deleting {them} would delete those rows of {fk.child} too",
        "n": f"deleting {them} would null out those rows' {columns}",
        "d": f"deleting {them} would set those rows' {columns} to the default",
    }.get(fk.on_delete, f"deleting {them} would fail")
    choices = []
    if ref.whole is None:
        choices.append(
            f"keep {them} in {target} with --keep-referenced (or [apply] keep_referenced = true)"
        )
    else:
        choices.append(f"give {ref.whole} a primary key")
    if run.action == "apply":
        choices.append(
            f"put {them} back in {run.snapshot.manifest.environment} and take a new snapshot"
        )
    if fk.on_delete in ("c", "n", "d"):
        choices.append(f"accept it with --allow-cascade {ref.name}")
    return ERROR, f"{head}: {lacks}: {harm}; " + ", or ".join(choices)


def refusal(run: ApplyRun, refs: Sequence[Reference], allowed: Collection[str]) -> str | None:
    """The first error :func:`verdict` finds, or None."""
    for ref in refs:
        status, sentence = verdict(run, ref, allowed)
        if status == ERROR:
            return sentence
    return None


def kept_keys(rows: RowSet) -> sql.Identifier:
    """``pg_temp._snapshot_k<n>``: the keys of the rows kept in ``rows.table``."""
    return sql.Identifier("pg_temp", f"_snapshot_k{rows.number}")


def settle(run: ApplyRun, allowed: Collection[str]) -> tuple[Reference, ...]:
    """Survey the references from outside; with ``s.keep_referenced``, keep their parents.

    Call once the snapshot is staged and classified, and again under the lock before the
    writes (the target may have changed): the kept rows are made anew each time, in
    ``s.kept``, and taken out of the delta.
    """
    refs = survey(run)
    if run.keep_referenced:  # only _keep makes the tables of kept keys (a round trip)
        with run.conn.pipeline():
            for rows in run.row_sets.values():
                run.conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(kept_keys(rows)))
    run.kept = {}
    seeds = [
        r
        for r in refs
        if r.rows and r.whole is None and not r.acknowledged(allowed) and not r.unreadable
    ]
    if run.keep_referenced and seeds:
        run.kept = dict(_keep(run, seeds))
    return refs


def _keep(run: ApplyRun, seeds: Sequence[Reference]) -> Iterator[tuple[TableName, Kept]]:
    """Keep the parents of ``seeds``, then the scoped parents kept rows need, children first."""
    conn = run.conn
    needed_by: dict[TableName, list[str]] = {}
    for table in run.order:
        if table in run.row_sets:
            rows = run.row_sets[table]
            conn.execute(
                sql.SQL("CREATE TEMP TABLE {} AS SELECT {} FROM {} WITH NO DATA").format(
                    kept_keys(rows), rows.keys, table.ident
                )
            )
            conn.execute(
                sql.SQL("ALTER TABLE {} ADD PRIMARY KEY ({})").format(kept_keys(rows), rows.keys)
            )
    for ref in seeds:
        rows = run.row_sets[ref.fk.parent]
        _insert_kept(
            run,
            rows,
            sql.SQL("SELECT {} FROM {} AS c JOIN {} AS p ON {} WHERE {}").format(
                rowsets.key_columns(rows, "p"),
                ref.fk.child.ident,
                ref.fk.parent.ident,
                _refer(ref.fk, "c", "p"),
                _lacks(run, rows, ref.values, "p"),
            ),
        )
        needed_by.setdefault(ref.fk.parent, []).append(str(ref.fk.child))
    for table in reversed(run.order):  # children first: a table's kept rows are final here
        if table not in run.row_sets:
            continue
        child = run.row_sets[table]
        inward = [fk for fk in run.fks if fk.child == table and fk.parent in run.row_sets]
        for fk in sorted(inward, key=lambda k: k.parent != table):  # its own tree first
            parent = run.row_sets[fk.parent]
            query = sql.SQL(
                "SELECT {} FROM {} AS c JOIN {} AS k ON {} JOIN {} AS p ON {} WHERE {}"
            ).format(
                rowsets.key_columns(parent, "p"),
                table.ident,
                kept_keys(child),
                child.match("c", "k"),
                fk.parent.ident,
                _refer(fk, "c", "p"),
                _lacks(run, parent, fk.parent_columns, "p"),
            )
            added = new = _insert_kept(run, parent, query)
            while new and fk.parent == table:  # a tree: the parents' parents, until none is new
                new = _insert_kept(run, parent, query)
            if added and fk.parent != table:
                needed_by.setdefault(fk.parent, []).append(f"kept rows of {table}")
    for table in run.order:
        if table not in run.row_sets or not (count := _count(conn, kept_keys(run.row_sets[table]))):
            continue
        rows = run.row_sets[table]
        conn.execute(
            sql.SQL("DELETE FROM {} AS d USING {} AS k WHERE {}").format(
                rows.delta, kept_keys(rows), rows.match("d", "k")
            )
        )
        sample = tuple(
            str(r[0])
            for r in conn.execute(
                sql.SQL("SELECT {} FROM {} AS k ORDER BY {} LIMIT {}").format(
                    _text(rows.key, "k"), kept_keys(rows), rows.keys, sql.Literal(SAMPLE)
                )
            )
        )
        users = tuple(dict.fromkeys(needed_by.get(table, [])))
        log.info("  %s: %d rows kept for %s", table, count, ", ".join(users))
        yield table, Kept(table, count, rows.key, sample, users)


def _insert_kept(run: ApplyRun, rows: RowSet, query: sql.Composable) -> int:
    """Add the keys ``query`` selects to ``rows``' kept keys; how many were new."""
    return int(
        run.conn.execute(
            sql.SQL(
                "INSERT INTO {} SELECT DISTINCT * FROM ({}) AS x ON CONFLICT DO NOTHING"
            ).format(kept_keys(rows), query)
        ).rowcount
    )


def _count(conn: psycopg.Connection, table: sql.Identifier) -> int:
    return _scalar(conn, sql.SQL("SELECT count(*) FROM {}").format(table))


def expected(run: ApplyRun, table: TableName, ignored: Sequence[str], kind: str) -> TableStats:
    """What parity expects of a table with kept rows: the snapshot's rows but those kept,
    and the kept rows as the record saw them under the lock (the apply never writes them).

    With ``ignored`` columns, the kept rows are hashed as they are now instead.
    """
    rows = run.row_sets[table]
    kept = kept_keys(rows)
    if not ignored:
        row = run.conn.execute(
            sql.SQL(
                "SELECT count(*), "
                "coalesce(sum(h1$), 0)::text || ':' || coalesce(sum(h2$), 0)::text "
                "FROM (SELECT h1$, h2$ FROM {hashes} AS h WHERE NOT EXISTS "
                "(SELECT 1 FROM {kept} AS k WHERE {hk}) UNION ALL SELECT h1$, h2$ FROM {record} "
                "AS r WHERE EXISTS (SELECT 1 FROM {kept} AS k WHERE {rk})) AS x"
            ).format(
                hashes=rows.hashes,
                kept=kept,
                hk=rows.match("h", "k"),
                record=rows.record,
                rk=rows.match("r", "k"),
            )
        ).fetchone()
        assert row is not None
        return TableStats(int(row[0]), rows.digest(int(row[0]), str(row[1])))
    entry = run.entries[table]
    names = sql.SQL(", ").join(map(sql.Identifier, entry.column_names))
    both = sql.Identifier("pg_temp", f"_snapshot_e{rows.number}")
    run.conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(both))
    run.conn.execute(
        sql.SQL(
            "CREATE TEMP TABLE {both} AS SELECT {names} FROM {stage} AS z WHERE NOT EXISTS "
            "(SELECT 1 FROM {kept} AS k WHERE {zk}) UNION ALL SELECT {names} FROM {table} AS t "
            "WHERE EXISTS (SELECT 1 FROM {kept} AS k WHERE {tk})"
        ).format(
            both=both,
            names=names,
            stage=staging.staging_table(entry),
            kept=kept,
            zk=rows.match("z", "k"),
            table=table.ident,
            tk=rows.match("t", "k"),
        )
    )
    return table_stats(run.conn, both, entry.column_names, ignored, kind)
