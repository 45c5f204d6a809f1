"""Masked takes: a snapshot of an environment not marked safe, with no real person in it.

The recipe, as :mod:`snapshot.take` runs it:

1. :func:`plan_masks` resolves the rules of ``[masking]`` (and the auth defaults,
   :data:`.rules.AUTH_RULES`) against the source's catalog: each rule's column exists and
   can be masked so; a rule on a column other columns reference by foreign key is given
   to them too (so joins and keys still hold); columns under a unique index get the unique
   form of their fakes. Columns that look personal and have no rule stop the take
   (:mod:`.personal`).
2. pg_dump writes every scoped table, but the masked tables' data is left out
   (``--exclude-table-data``);
3. :mod:`snapshot.beside`, in the same exported snapshot, writes the masked tables' rows
   with ``COPY (SELECT <masked expressions> ...) TO STDOUT`` into :data:`MASKED_FILE`, as
   ``REPLACE`` blocks staging reads like a backup's catch-up, the manifest's checksums
   summed from the same reading (:meth:`TableMask.select`). The fakes are made on the
   server (:mod:`.fakes`): no unmasked value of a masked column reaches this process, the
   archive or its temporary files.

The key comes from an environment variable and is set for the transaction only, as a query
parameter; the manifest records the rules and the key's fingerprint
(:class:`snapshot.manifest.Masking`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import psycopg
from psycopg import sql

from snapshot import catalog
from snapshot.catalog import Column, TableShape
from snapshot.errors import ConfigError
from snapshot.masking import fakes, personal
from snapshot.masking.rules import AUTH_RULES, KEEP, MaskingSettings, Rule, fingerprint
from snapshot.names import TableName, quote

MASKED_FILE = "masked.copy"

_UNIQUE_COLUMNS = """
SELECT DISTINCT a.attname
FROM pg_index i
JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum > 0 AND (
  a.attnum = ANY (i.indkey::int2[])
  OR EXISTS (  -- a column an expression index reads
    SELECT 1 FROM pg_depend d
    WHERE d.classid = 'pg_class'::regclass AND d.objid = i.indexrelid
      AND d.refobjid = i.indrelid AND d.refobjsubid = a.attnum))
WHERE i.indisunique AND i.indrelid = %s::regclass
"""


@dataclass(frozen=True)
class TableMask:
    """How one table's rows are written in a masked snapshot."""

    table: TableName
    columns: tuple[Column, ...]  # every column pg_dump would write, in its order
    rules: Mapping[str, Rule]  # the masked ones (keep rules left out)
    unique: frozenset[str]
    partitioned: bool

    def select(self, source: sql.Composable | None = None) -> sql.Composable:
        """The query giving the table's rows masked, columns named as the table's; those of
        ``source`` (a subset's kept rows, :mod:`snapshot.subset`) when given.

        The keyed hash of each column that needs one is computed once per row, in an inner
        query kept apart from the outer one (``OFFSET 0``), then read by its expression.
        """
        inner: list[sql.Composable] = [sql.Identifier(c.name) for c in self.columns]
        outer: list[sql.Composable] = []
        for i, column in enumerate(self.columns):
            rule = self.rules.get(column.name)
            if rule is None:
                outer.append(sql.Identifier("s", column.name))
                continue
            h = None
            if fakes.needs_hash(rule, column.type):
                alias = f"snapshot$h{i}"
                inner.append(
                    sql.SQL("{} AS {}").format(
                        fakes.key_hash(sql.Identifier(column.name)), sql.Identifier(alias)
                    )
                )
                h = sql.Identifier("s", alias)
            expression = fakes.masked(rule, column.name, column.type, column.name in self.unique, h)
            outer.append(sql.SQL("{} AS {}").format(expression, sql.Identifier(column.name)))
        if source is None:
            only = sql.SQL("") if self.partitioned else sql.SQL("ONLY ")
            source = sql.SQL("{}{}").format(only, self.table.ident)
        return sql.SQL("SELECT {} FROM (SELECT {} FROM {} OFFSET 0) AS s").format(
            sql.SQL(", ").join(outer), sql.SQL(", ").join(inner), source
        )


@dataclass(frozen=True)
class Masks:
    """A masked take's plan: the tables it masks, every rule applied, the key's fingerprint."""

    tables: Mapping[TableName, TableMask]
    rules: tuple[tuple[str, str], ...]  # ("public.users.email", "email"), keep rules too
    key_fingerprint: str
    key: str  # set in the take's transaction (set_key); never written anywhere

    def __repr__(self) -> str:  # never show the key in a traceback or a log
        return f"Masks(tables={list(self.tables)}, key_fingerprint={self.key_fingerprint!r})"


def column_text(table: TableName, column: str) -> str:
    """``public.users.email``: a column as rules and reports name it."""
    return f"{table}.{quote(column)}"


def plan_masks(
    conn: psycopg.Connection,
    shapes: Mapping[TableName, TableShape],
    partitioned: Sequence[TableName],
    settings: MaskingSettings,
    key: str,
    env_name: str,
) -> Masks:
    """Resolve and check the rules against the source's catalog (see the module, step 1)."""
    rules, unique = _resolve(conn, shapes, settings)
    suspects = personal.find(conn, shapes, set(rules), skip_auth=settings.auth)
    if suspects:
        raise ConfigError(personal.refusal(env_name, suspects))
    tables = {}
    for table, shape in shapes.items():
        masked = {c: r for (t, c), r in rules.items() if t == table and r.kind != KEEP}
        if masked:
            tables[table] = TableMask(
                table, shape.columns, masked, unique[table], table in partitioned
            )
    described = tuple(sorted((column_text(t, c), r.describe()) for (t, c), r in rules.items()))
    return Masks(tables, described, fingerprint(key), key)


def unruled_columns(
    conn: psycopg.Connection, tables: Sequence[TableName], settings: MaskingSettings
) -> list[personal.Suspect]:
    """The columns of ``tables`` that look personal and have no rule: what would stop a
    masked take (``check`` lists them, with a suggested rule each)."""
    shapes = catalog.table_shapes(conn, tables)
    rules, _ = _resolve(conn, shapes, settings)
    return personal.find(conn, shapes, set(rules), skip_auth=settings.auth)


def _resolve(
    conn: psycopg.Connection, shapes: Mapping[TableName, TableShape], settings: MaskingSettings
) -> tuple[dict[tuple[TableName, str], Rule], dict[TableName, frozenset[str]]]:
    """Every rule that applies (the auth defaults, ``[masking]``, the columns that follow a
    masked key), checked against the catalog; and the columns under a unique index."""
    rules: dict[tuple[TableName, str], Rule] = {}
    if settings.auth:
        for table, defaults in AUTH_RULES.items():
            if table in shapes:
                present = set(shapes[table].column_names)
                rules.update({(table, c): r for c, r in defaults.items() if c in present})
    for (table, column), rule in settings.columns.items():
        if table not in shapes:
            continue  # an auth table while auth_users is off
        shape = shapes[table]
        where = f"[masking.columns] {column_text(table, column)}"
        if column in shape.generated:
            raise ConfigError(
                f"{where}: the column is generated, never dumped: mask the columns it is "
                "computed from"
            )
        if column not in shape.column_names:
            raise ConfigError(f"{where}: {table} has no column {column!r}")
        rules[(table, column)] = rule
    rules = _follow_foreign_keys(conn, shapes, rules)
    unique = {
        table: frozenset(row[0] for row in conn.execute(_UNIQUE_COLUMNS, [str(table)]))
        for table in {t for t, _ in rules}
    }
    for (table, column), rule in rules.items():
        col = next(c for c in shapes[table].columns if c.name == column)
        why = fakes.check_rule(rule, column, col.type, col.not_null, column in unique[table])
        if why:
            raise ConfigError(
                f"[masking.columns] {column_text(table, column)} = {rule.describe()}: the "
                f"column {why}; choose another rule"
            )
    return rules, unique


def _follow_foreign_keys(
    conn: psycopg.Connection,
    shapes: Mapping[TableName, TableShape],
    rules: Mapping[tuple[TableName, str], Rule],
) -> dict[tuple[TableName, str], Rule]:
    """``rules`` plus the same rule on every column that references a masked one, so the
    fakes still match; a masked column referencing one masked otherwise is refused."""
    result = dict(rules)
    fks = [fk for fk in catalog.foreign_keys(conn, list(shapes)) if fk.child in shapes]
    changed = True
    while changed:
        changed = False
        for fk in fks:
            for child_col, parent_col in zip(fk.columns, fk.parent_columns, strict=True):
                parent = result.get((fk.parent, parent_col))
                child = result.get((fk.child, child_col))
                parent_masked = parent is not None and parent.kind != KEEP
                child_masked = child is not None and child.kind != KEEP
                if parent_masked and child is None:
                    assert parent is not None
                    result[(fk.child, child_col)] = parent
                    changed = True
                elif (parent_masked or child_masked) and parent != child:
                    raise ConfigError(
                        f"[masking.columns] {column_text(fk.child, child_col)} references "
                        f"{column_text(fk.parent, parent_col)} (foreign key {fk.name}) but is "
                        "masked otherwise: give both the same rule, or neither"
                    )
    return result


def set_key(conn: psycopg.Connection, masks: Masks) -> None:
    """Make the key readable to the fakes, for this transaction only, as a query parameter."""
    conn.execute("SELECT set_config(%s, %s, true)", [fakes.KEY_SETTING, masks.key])
