"""What the database says about the scope: columns, foreign keys, sequences, and the apply order.

Every query here reads ``pg_catalog`` only; the session's pinned ``search_path``
(see :mod:`snapshot.db`) makes ``format_type`` schema-qualify user types, so column
fingerprints from two databases compare as text.
"""

from __future__ import annotations

import difflib
import heapq
import re
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import psycopg
from psycopg import sql

from snapshot import latency
from snapshot.errors import ConfigError, Refused
from snapshot.names import TableName, quote


@dataclass(frozen=True)
class Column:
    """One column as pg_dump sees it."""

    name: str
    type: str
    not_null: bool
    has_default: bool = False
    identity: str = ""  # "a" (ALWAYS), "d" (BY DEFAULT) or ""

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "type": self.type, "not_null": self.not_null}


@dataclass(frozen=True)
class TableShape:
    """The columns pg_dump writes for a table, and the generated ones it leaves out."""

    table: TableName
    columns: tuple[Column, ...]
    generated: tuple[str, ...]

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)

    @property
    def identity_always(self) -> bool:
        return any(c.identity == "a" for c in self.columns)


@dataclass(frozen=True)
class ForeignKey:
    """A foreign key from ``child`` to ``parent``."""

    name: str
    child: TableName
    columns: tuple[str, ...]
    parent: TableName
    parent_columns: tuple[str, ...]
    on_delete: str  # "a" no action, "r" restrict, "c" cascade, "n" set null, "d" set default
    deferrable: bool

    def __str__(self) -> str:
        return (
            f"{self.child}({', '.join(map(quote, self.columns))}) -> "
            f"{self.parent}({', '.join(map(quote, self.parent_columns))})"
        )


@dataclass(frozen=True)
class OwnedSequence:
    """A sequence owned by a column of a scoped table (serial or identity)."""

    sequence: TableName
    table: TableName
    column: str
    last_value: int
    is_called: bool
    increment: int
    start: int

    @property
    def next_value(self) -> int:
        """The value ``nextval`` returns next."""
        return self.last_value + self.increment if self.is_called else self.last_value

    def to_json(self) -> dict[str, Any]:
        return {
            "sequence": str(self.sequence),
            "table": str(self.table),
            "column": self.column,
            "last_value": self.last_value,
            "is_called": self.is_called,
            "increment": self.increment,
            "start": self.start,
        }


@dataclass(frozen=True)
class ServerInfo:
    """Identity and version of the server a session is connected to."""

    version: str
    version_num: int
    dbname: str
    user: str
    system_identifier: str | None

    @property
    def major(self) -> int:
        return self.version_num // 10000


def _table_arrays(tables: Iterable[TableName]) -> tuple[list[str], list[str]]:
    tables = list(tables)
    return [t.schema for t in tables], [t.name for t in tables]


def _some(tables: Sequence[TableName]) -> str:
    """The first three names, and how many more."""
    more = f" and {len(tables) - 3} more" if len(tables) > 3 else ""
    return ", ".join(map(str, tables[:3])) + more


# What a session tells of its server: version, its number, database, role, and whether the
# role may read the system identifier (catalog.server_info).
_IDENTITY = (
    "current_setting('server_version')",
    "current_setting('server_version_num')::int",
    "current_database()",
    "current_user",
    "has_function_privilege('pg_catalog.pg_control_system()', 'EXECUTE')",
)
_IDENTITY_COLUMNS = len(_IDENTITY)
IDENTITY = sql.SQL(", ").join(map(sql.SQL, _IDENTITY))
_identities: weakref.WeakKeyDictionary[psycopg.Connection, tuple[Any, ...]] = (
    weakref.WeakKeyDictionary()
)


def remember_identity(conn: psycopg.Connection, row: Sequence[Any] | None) -> None:
    """Keep :data:`IDENTITY` as a session read it with its settings (:func:`db.connect`),
    at the start of ``row``, for :func:`server_info`."""
    if row is not None:
        _identities[conn] = tuple(row[:_IDENTITY_COLUMNS])


def server_info(conn: psycopg.Connection) -> ServerInfo:
    """Version, database, role and (where the role may read it) the system identifier."""
    known = _identities.get(conn)  # read with the session's settings (db.connect)
    if known is None:
        started = time.monotonic()
        known = conn.execute(sql.SQL("SELECT {}").format(IDENTITY)).fetchone()
        latency.note(conn, time.monotonic() - started)
    version, num, dbname, user, readable = known or ("", 0, "", "", False)
    system_id: str | None = None
    if readable:
        row = conn.execute("SELECT system_identifier::text FROM pg_control_system()").fetchone()
        system_id = row[0] if row else None
    return ServerInfo(str(version).split()[0], int(num), str(dbname), str(user), system_id)


_SHAPES = """
SELECT n.nspname, c.relname, a.attname, format_type(a.atttypid, a.atttypmod),
       a.attnotnull, a.atthasdef, a.attidentity, a.attgenerated <> ''
FROM unnest(%s::text[], %s::text[]) AS w(nsp, rel)
JOIN pg_namespace n ON n.nspname = w.nsp
JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = w.rel AND c.relkind IN ('r', 'p')
JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY n.nspname, c.relname, a.attnum
"""


def table_shapes(
    conn: psycopg.Connection, tables: Sequence[TableName]
) -> dict[TableName, TableShape]:
    """The dumped columns of each table that exists; missing tables are absent from the result."""
    return table_shapes_later(conn, tables)()


def table_shapes_later(
    conn: psycopg.Connection, tables: Sequence[TableName]
) -> Callable[[], dict[TableName, TableShape]]:
    """:func:`table_shapes`, asked now and read when called (in the caller's pipeline)."""
    cursor = conn.execute(_SHAPES, _table_arrays(tables))

    def result() -> dict[TableName, TableShape]:
        columns: dict[TableName, list[Column]] = {}
        generated: dict[TableName, list[str]] = {}
        for nsp, rel, name, typ, notnull, hasdef, identity, is_generated in cursor.fetchall():
            table = TableName(nsp, rel)
            columns.setdefault(table, [])
            generated.setdefault(table, [])
            if is_generated:
                generated[table].append(name)
            else:
                columns[table].append(Column(name, typ, notnull, hasdef, identity))
        return {
            t: TableShape(t, tuple(columns[t]), tuple(generated[t])) for t in tables if t in columns
        }

    return result


# Row-level security applies to a role that neither bypasses it nor owns the table (an
# owner too when the table forces it). The tool's sessions set row_security = off, so a
# read RLS would filter fails instead of coming back short.
_HIDDEN_BY_RLS = """
SELECT n.nspname, c.relname
FROM unnest(%s::text[], %s::text[]) AS w(nsp, rel)
JOIN pg_namespace n ON n.nspname = w.nsp
JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = w.rel
JOIN pg_roles r ON r.rolname = current_user
WHERE c.relrowsecurity AND NOT r.rolsuper AND NOT r.rolbypassrls
  AND (c.relforcerowsecurity OR NOT pg_has_role(c.relowner, 'USAGE'))
ORDER BY 1, 2
"""


def hidden_by_row_security(
    conn: psycopg.Connection, tables: Sequence[TableName]
) -> list[TableName]:
    """Tables among ``tables`` whose rows row-level security would hide from this role."""
    return hidden_by_row_security_later(conn, tables)()


def hidden_by_row_security_later(
    conn: psycopg.Connection, tables: Sequence[TableName]
) -> Callable[[], list[TableName]]:
    """:func:`hidden_by_row_security`, asked now and read when called (in a pipeline)."""
    cursor = conn.execute(_HIDDEN_BY_RLS, _table_arrays(tables))
    return lambda: [TableName(nsp, rel) for nsp, rel in cursor.fetchall()]


def row_security_refusal(role: str, tables: Sequence[TableName]) -> str:
    """The sentence for :func:`hidden_by_row_security`'s tables: which, and the fix."""
    return (
        f"row-level security would hide rows of {_some(tables)} from {role}: run as the "
        f"tables' owner or a role with BYPASSRLS (ALTER ROLE {quote(role)} BYPASSRLS)"
    )


def require_readable(conn: psycopg.Connection, tables: Sequence[TableName], doing: str) -> None:
    """Refuse, naming them and the fix, to read tables row-level security would filter."""
    hidden = hidden_by_row_security(conn, tables)
    if hidden:
        row = conn.execute("SELECT current_user").fetchone()
        role = str(row[0]) if row else "this role"
        raise Refused(f"{doing}: {row_security_refusal(role, hidden)}")


_LEAVES = """
SELECT n.nspname, c.relname, ln.nspname, l.relname
FROM unnest(%s::text[], %s::text[]) AS w(nsp, rel)
JOIN pg_namespace n ON n.nspname = w.nsp
JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = w.rel AND c.relkind = 'p'
CROSS JOIN LATERAL pg_partition_tree(c.oid) AS tree
JOIN pg_class l ON l.oid = tree.relid AND tree.isleaf AND l.relkind = 'r'
JOIN pg_namespace ln ON ln.oid = l.relnamespace
ORDER BY 1, 2, 3, 4
"""


def leaf_partitions(
    conn: psycopg.Connection, tables: Sequence[TableName]
) -> dict[TableName, tuple[TableName, ...]]:
    """The partitions holding the rows of each partitioned table among ``tables``.

    pg_dump writes no data for a partitioned table itself: it is given these instead (with
    ``--load-via-partition-root``, so that their rows load back through the parent).
    """
    return leaf_partitions_later(conn, tables)()


def leaf_partitions_later(
    conn: psycopg.Connection, tables: Sequence[TableName]
) -> Callable[[], dict[TableName, tuple[TableName, ...]]]:
    """:func:`leaf_partitions`, asked now and read when called (in the caller's pipeline)."""
    cursor = conn.execute(_LEAVES, _table_arrays(tables))

    def result() -> dict[TableName, tuple[TableName, ...]]:
        leaves: dict[TableName, list[TableName]] = {}
        for nsp, rel, leaf_nsp, leaf in cursor.fetchall():
            leaves.setdefault(TableName(nsp, rel), []).append(TableName(leaf_nsp, leaf))
        return {table: tuple(parts) for table, parts in leaves.items()}

    return result


_RELKINDS = """
SELECT n.nspname, c.relname, c.relkind::text
FROM unnest(%s::text[], %s::text[]) AS w(nsp, rel)
JOIN pg_namespace n ON n.nspname = w.nsp
JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = w.rel
"""
_KINDS = {
    "v": "view",
    "m": "materialized view",
    "f": "foreign table",
    "S": "sequence",
    "i": "index",
    "I": "index",
    "c": "composite type",
}


def require_tables(
    conn: psycopg.Connection,
    tables: Sequence[TableName],
    where: str,
    fix: str = "fix [scope] tables in snapshot.toml",
) -> dict[TableName, TableShape]:
    """Like :func:`table_shapes`, but a missing table is a configuration error.

    ``fix`` says how to change the scope (:meth:`snapshot.config.Scope.fix`).
    """
    shapes = table_shapes(conn, tables)
    absent = [t for t in tables if t not in shapes]
    kinds = {
        TableName(nsp, rel): _KINDS.get(kind, "relation of another kind")
        for nsp, rel, kind in conn.execute(_RELKINDS, _table_arrays(absent))
    }
    if kinds:
        named = ", ".join(f"{t} is a {kind}" for t, kind in kinds.items())
        raise ConfigError(f"{where}: {named}, not a table: only tables' rows can be copied; {fix}")
    if absent:
        raise ConfigError(
            f"{where} has no table {missing_tables(conn, absent, tables)}: {fix}, or run the "
            "migrations that create it"
        )
    beside = partitions_beside_parents(conn, tables)
    if beside:
        raise ConfigError(partition_refusal(beside))
    return shapes


_TABLES_OF_SCHEMAS = """
SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = ANY(%s) AND c.relkind IN ('r', 'p')
"""


def missing_tables(
    conn: psycopg.Connection, tables: Sequence[TableName], scope: Iterable[TableName]
) -> str:
    """``public.qestions (did you mean public.questions?), public.x``: the first three absent
    tables (and how many more), each with the table of its schema it most resembles that
    the scope does not name already (a table the migrations never made resembles nothing)."""
    schemas = sorted({t.schema for t in tables})
    named_already = set(scope)
    present = [
        TableName(n, r)
        for n, r in conn.execute(_TABLES_OF_SCHEMAS, (schemas,))
        if TableName(n, r) not in named_already
    ]
    named = []
    for table in tables[:3]:
        same = {t.name: t for t in present if t.schema == table.schema}
        close = difflib.get_close_matches(table.name, list(same), n=1, cutoff=0.6)
        named.append(f"{table} (did you mean {same[close[0]]}?)" if close else str(table))
    more = f" and {len(tables) - 3} more" if len(tables) > 3 else ""
    return ", ".join(named) + more


# A foreign key declared on a partition (pg_dump of servers before 11 wrote them so; pagila's
# payment_p2022_01) is a key of the partitioned table above it: of the scoped one (the
# "covered" relations are each scoped table and every partition below it), else of the
# topmost one.
_FOREIGN_KEYS = """
WITH scoped AS (
  SELECT c.oid FROM unnest(%s::text[], %s::text[]) AS w(nsp, rel)
  JOIN pg_namespace n ON n.nspname = w.nsp
  JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = w.rel),
covered AS (
  SELECT oid, oid AS scoped FROM scoped
  UNION ALL
  SELECT t.relid, s.oid FROM scoped s CROSS JOIN LATERAL pg_partition_tree(s.oid) t
  WHERE t.level > 0 AND t.relid NOT IN (SELECT oid FROM scoped))
SELECT con.conname, cn.nspname, cc.relname, pn.nspname, pc.relname,
       ARRAY(SELECT a.attname FROM unnest(con.conkey) WITH ORDINALITY k(n, i)
             JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.n ORDER BY k.i),
       ARRAY(SELECT a.attname FROM unnest(con.confkey) WITH ORDINALITY k(n, i)
             JOIN pg_attribute a ON a.attrelid = con.confrelid AND a.attnum = k.n ORDER BY k.i),
       con.confdeltype, con.condeferrable
FROM pg_constraint con
LEFT JOIN covered ch ON ch.oid = con.conrelid
LEFT JOIN covered pa ON pa.oid = con.confrelid
JOIN pg_class cc ON cc.oid = coalesce(ch.scoped, pg_partition_root(con.conrelid), con.conrelid)
JOIN pg_namespace cn ON cn.oid = cc.relnamespace
JOIN pg_class pc ON pc.oid = coalesce(pa.scoped, pg_partition_root(con.confrelid), con.confrelid)
JOIN pg_namespace pn ON pn.oid = pc.relnamespace
WHERE con.contype = 'f' AND con.conparentid = 0
  AND (ch.oid IS NOT NULL OR pa.oid IS NOT NULL)
ORDER BY cn.nspname, cc.relname, con.conname
"""


def foreign_keys(conn: psycopg.Connection, tables: Sequence[TableName]) -> list[ForeignKey]:
    """Every foreign key with a scoped table on either side.

    A key declared on a partition is a key of the partitioned table above it (of the
    scoped one, else of the topmost): the same key declared on several partitions is one,
    named as on the first of them.
    """
    return foreign_keys_later(conn, tables)()


def foreign_keys_later(
    conn: psycopg.Connection, tables: Sequence[TableName]
) -> Callable[[], list[ForeignKey]]:
    """:func:`foreign_keys`, asked now and read when called (in the caller's pipeline); a
    table of ``tables`` that does not exist has none."""
    cursor = conn.execute(_FOREIGN_KEYS, _table_arrays(tables))

    def result() -> list[ForeignKey]:
        found: dict[tuple[Any, ...], ForeignKey] = {}
        for row in cursor.fetchall():
            fk = ForeignKey(
                name=row[0],
                child=TableName(row[1], row[2]),
                parent=TableName(row[3], row[4]),
                columns=tuple(row[5]),
                parent_columns=tuple(row[6]),
                on_delete=row[7],
                deferrable=row[8],
            )
            same = (fk.child, fk.columns, fk.parent, fk.parent_columns, fk.on_delete, fk.deferrable)
            found.setdefault(same, fk)
        return list(found.values())

    return result


_PARTITIONS_BESIDE_PARENTS = """
WITH scoped AS (
  SELECT c.oid FROM unnest(%s::text[], %s::text[]) AS w(nsp, rel)
  JOIN pg_namespace n ON n.nspname = w.nsp
  JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = w.rel)
SELECT pn.nspname, p.relname, an.nspname, a.relname
FROM scoped
JOIN pg_class p ON p.oid = scoped.oid JOIN pg_namespace pn ON pn.oid = p.relnamespace
JOIN pg_partition_ancestors(p.oid) AS up ON up.relid <> p.oid AND up.relid IN (SELECT * FROM scoped)
JOIN pg_class a ON a.oid = up.relid JOIN pg_namespace an ON an.oid = a.relnamespace
ORDER BY 1, 2
"""


def partition_refusal(beside: Mapping[TableName, TableName]) -> str:
    """The sentence for :func:`partitions_beside_parents`' first finding."""
    partition, parent = next(iter(beside.items()))
    return (
        f"{partition} is a partition of {parent}, which the scope holds with all its "
        f"partitions: name only {parent} in [scope] tables of snapshot.toml (its rows would "
        "count twice)"
    )


def partitions_beside_parents(
    conn: psycopg.Connection, tables: Sequence[TableName]
) -> dict[TableName, TableName]:
    """Tables among ``tables`` that are partitions of another of them, with that table.

    A partitioned table in the scope covers every partition below it: naming one of them
    too would take, count and apply its rows twice.
    """
    return partitions_beside_parents_later(conn, tables)()


def partitions_beside_parents_later(
    conn: psycopg.Connection, tables: Sequence[TableName]
) -> Callable[[], dict[TableName, TableName]]:
    """:func:`partitions_beside_parents`, asked now and read when called (in a pipeline)."""
    cursor = conn.execute(_PARTITIONS_BESIDE_PARENTS, _table_arrays(tables))

    def result() -> dict[TableName, TableName]:
        found: dict[TableName, TableName] = {}
        for nsp, rel, parent_nsp, parent in cursor.fetchall():
            found.setdefault(TableName(nsp, rel), TableName(parent_nsp, parent))
        return found

    return result


_INDEXED = """
SELECT EXISTS (
  SELECT 1 FROM pg_index i
  WHERE i.indrelid = %s::regclass AND i.indisvalid AND i.indpred IS NULL
    AND (SELECT array_agg(k ORDER BY k) FROM unnest(i.indkey[0:%s - 1]) k)
      = (SELECT array_agg(a.attnum ORDER BY a.attnum) FROM pg_attribute a
         WHERE a.attrelid = %s::regclass AND a.attname = ANY(%s)))
"""


def unindexed_foreign_keys(conn: psycopg.Connection, fks: Iterable[ForeignKey]) -> list[ForeignKey]:
    """Foreign keys whose columns lead no index of the child table (checks must scan).

    Every key's question in one round trip (a pipeline)."""
    asked = []
    with conn.pipeline():
        for fk in fks:
            child = str(fk.child.ident.as_string(conn))
            cursor = conn.execute(_INDEXED, (child, len(fk.columns), child, list(fk.columns)))
            asked.append((fk, cursor))
    result = []
    for fk, cursor in asked:
        row = cursor.fetchone()
        if row and not row[0]:
            result.append(fk)
    return result


def apply_order(tables: Sequence[TableName], fks: Iterable[ForeignKey]) -> tuple[TableName, ...]:
    """Parents before children (insert order); reverse it to delete.

    Self-references are satisfied within one INSERT statement and deferrable keys are
    checked at commit, so neither constrains the order. Ties keep the configured order.
    A cycle of non-deferrable keys has no valid order and is reported with its tables.
    """
    position = {t: i for i, t in enumerate(tables)}
    parents: dict[TableName, set[TableName]] = {t: set() for t in tables}
    for fk in fks:
        in_scope = fk.child in position and fk.parent in position
        if in_scope and fk.child != fk.parent and not fk.deferrable:
            parents[fk.child].add(fk.parent)
    children: dict[TableName, set[TableName]] = {t: set() for t in tables}
    for child, ps in parents.items():
        for parent in ps:
            children[parent].add(child)
    waiting = {t: len(ps) for t, ps in parents.items()}
    ready = [(position[t], t) for t, n in waiting.items() if n == 0]
    heapq.heapify(ready)
    order: list[TableName] = []
    while ready:
        _, table = heapq.heappop(ready)
        order.append(table)
        for child in children[table]:
            waiting[child] -= 1
            if waiting[child] == 0:
                heapq.heappush(ready, (position[child], child))
    if len(order) < len(tables):
        stuck = {t for t in tables if t not in order}
        cycle = _find_cycle(stuck, parents)
        raise Refused(
            "the foreign keys among "
            + " -> ".join(str(t) for t in cycle)
            + " form a cycle that no insert order satisfies: make one of them DEFERRABLE "
            "or take a table out of the scope"
        )
    return tuple(order)


def _find_cycle(stuck: set[TableName], parents: dict[TableName, set[TableName]]) -> list[TableName]:
    start = min(stuck)
    path = [start]
    seen = {start: 0}
    node = start
    while True:
        node = min(p for p in parents[node] if p in stuck)
        if node in seen:
            return [*path[seen[node] :], node]
        seen[node] = len(path)
        path.append(node)


# The app's own tables, as `snapshot init` proposes them: the public schema's tables and
# partitioned tables (their partitions come with them), not those an extension created.
# Schemas PostgreSQL, Supabase and its extensions manage: never the app's own data.
PLATFORM_SCHEMAS = (
    "pg_catalog", "information_schema", "pg_toast", "auth", "storage", "realtime", "_realtime",
    "extensions", "graphql", "graphql_public", "pgsodium", "pgsodium_masks", "vault",
    "supabase_functions", "supabase_migrations", "net", "cron", "pgbouncer", "_analytics",
    "pgmq", "pgtle", "repack", "topology", "tiger", "tiger_data",
)  # fmt: skip

_APP_TABLES = """
SELECT n.nspname, c.relname
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition
  AND n.nspname <> ALL(%s) AND n.nspname NOT LIKE 'pg\\_%%'
  AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                  AND d.objid = c.oid AND d.deptype = 'e')
  AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_namespace'::regclass
                  AND d.objid = n.oid AND d.deptype = 'e')
ORDER BY n.nspname <> 'public', n.nspname, c.relname
"""


def app_tables(conn: psycopg.Connection) -> list[TableName]:
    """The app's own tables, by name: the public schema's, then those of the app's other
    schemas (basejump keeps its own); partitions, extensions' tables, and the schemas
    PostgreSQL and Supabase manage (:data:`PLATFORM_SCHEMAS`) left out."""
    return [
        TableName(nsp, rel) for nsp, rel in conn.execute(_APP_TABLES, (list(PLATFORM_SCHEMAS),))
    ]


_OWNED_SEQUENCES = """
SELECT sn.nspname, sc.relname, tn.nspname, tc.relname, a.attname, s.seqincrement, s.seqstart
FROM pg_depend d
JOIN pg_class sc ON sc.oid = d.objid AND sc.relkind = 'S'
JOIN pg_namespace sn ON sn.oid = sc.relnamespace
JOIN pg_sequence s ON s.seqrelid = sc.oid
JOIN pg_class tc ON tc.oid = d.refobjid
JOIN pg_namespace tn ON tn.oid = tc.relnamespace
JOIN pg_attribute a ON a.attrelid = tc.oid AND a.attnum = d.refobjsubid
WHERE d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass
  AND d.deptype IN ('a', 'i')
  AND (tn.nspname, tc.relname) IN (SELECT * FROM unnest(%s::text[], %s::text[]))
ORDER BY tn.nspname, tc.relname, a.attname
"""


# Sequences a column default of a scoped table calls (``DEFAULT nextval('shared_seq')``)
# without the column owning them: other tables may draw from them too.
_DEFAULT_SEQUENCES = """
SELECT DISTINCT sn.nspname, sc.relname, tn.nspname, tc.relname, a.attname, s.seqincrement,
       s.seqstart
FROM pg_attrdef ad
JOIN pg_depend d ON d.classid = 'pg_attrdef'::regclass AND d.objid = ad.oid
  AND d.refclassid = 'pg_class'::regclass AND d.deptype = 'n'
JOIN pg_class sc ON sc.oid = d.refobjid AND sc.relkind = 'S'
JOIN pg_namespace sn ON sn.oid = sc.relnamespace
JOIN pg_sequence s ON s.seqrelid = sc.oid
JOIN pg_class tc ON tc.oid = ad.adrelid
JOIN pg_namespace tn ON tn.oid = tc.relnamespace
JOIN pg_attribute a ON a.attrelid = tc.oid AND a.attnum = ad.adnum
WHERE (tn.nspname, tc.relname) IN (SELECT * FROM unnest(%s::text[], %s::text[]))
  AND NOT EXISTS (
    SELECT 1 FROM pg_depend o
    WHERE o.classid = 'pg_class'::regclass AND o.objid = sc.oid
      AND o.refclassid = 'pg_class'::regclass AND o.deptype IN ('a', 'i'))
ORDER BY 3, 4, 5
"""


def owned_sequence_names(
    conn: psycopg.Connection, tables: Sequence[TableName]
) -> list[tuple[TableName, TableName, str, int, int]]:
    """(sequence, table, column, increment, start) of sequences owned by ``tables``' columns."""
    return _sequence_names(conn, _OWNED_SEQUENCES, tables)


def owned_sequence_names_later(
    conn: psycopg.Connection, tables: Sequence[TableName]
) -> Callable[[], list[SequenceName]]:
    """:func:`owned_sequence_names`, asked now and read when called (in a pipeline)."""
    cursor = conn.execute(_OWNED_SEQUENCES, _table_arrays(tables))
    return lambda: _names(cursor.fetchall())


def _sequence_names(
    conn: psycopg.Connection, query: str, tables: Sequence[TableName]
) -> list[tuple[TableName, TableName, str, int, int]]:
    return [
        (TableName(seq_nsp, seq_name), TableName(nsp, rel), column, int(inc), int(start))
        for seq_nsp, seq_name, nsp, rel, column, inc, start in conn.execute(
            query, _table_arrays(tables)
        ).fetchall()
    ]


SequenceName = tuple[TableName, TableName, str, int, int]  # sequence, table, column, inc, start

_MIGRATIONS_READABLE = (
    "SELECT to_regclass('supabase_migrations.schema_migrations') IS NOT NULL "
    "AND has_table_privilege('supabase_migrations.schema_migrations', 'SELECT')"
)
_MIGRATIONS = "SELECT version FROM supabase_migrations.schema_migrations ORDER BY version"


@dataclass(frozen=True)
class StateNames:
    """What a locked state is read from, found beforehand (a scoped table's columns and
    sequences cannot change while the apply holds its lock): the sequences the scope's
    columns own and those their defaults share, and whether the migration history is there.
    With them, :func:`read_state` reads the state in one round trip."""

    owned: tuple[SequenceName, ...]
    shared: tuple[SequenceName, ...]
    migrations: bool


def state_names(conn: psycopg.Connection, tables: Sequence[TableName]) -> StateNames:
    """:class:`StateNames` of ``tables``, in one round trip (a pipeline)."""
    with conn.pipeline():  # (read after it: a fetch inside costs a round trip of its own)
        later = state_names_later(conn, tables)
    return later()


def state_names_later(
    conn: psycopg.Connection, tables: Sequence[TableName]
) -> Callable[[], StateNames]:
    """:func:`state_names`, asked now and read when called (in the caller's pipeline)."""
    owned = conn.execute(_OWNED_SEQUENCES, _table_arrays(tables))
    shared = conn.execute(_DEFAULT_SEQUENCES, _table_arrays(tables))
    readable = conn.execute(_MIGRATIONS_READABLE)

    def result() -> StateNames:
        names = StateNames(tuple(_names(owned.fetchall())), tuple(_names(shared.fetchall())), False)
        row = readable.fetchone()
        return replace(names, migrations=bool(row and row[0]))

    return result


def _names(rows: Iterable[Sequence[Any]]) -> list[SequenceName]:
    return [
        (TableName(seq_nsp, seq_name), TableName(nsp, rel), str(column), int(inc), int(start))
        for seq_nsp, seq_name, nsp, rel, column, inc, start in rows
    ]


@dataclass(frozen=True)
class State:
    """Sequences (owned and shared, each with where it stands), the highest value of each
    sequence's column when asked, and the migration versions (None without a history)."""

    owned: list[OwnedSequence]
    shared: list[OwnedSequence]
    highest: dict[tuple[TableName, str], int | None]
    migrations: tuple[str, ...] | None


def read_state(conn: psycopg.Connection, names: StateNames, *, highest: bool = False) -> State:
    """The state of ``names``' sequences and migrations, in one round trip (a pipeline);
    with ``highest``, each increasing sequence's column's highest value too."""
    with conn.pipeline():
        later = read_state_later(conn, names, highest=highest)
    return later()


def read_state_later(
    conn: psycopg.Connection, names: StateNames, *, highest: bool = False
) -> Callable[[], State]:
    """:func:`read_state`, asked now and read when called (in the caller's pipeline)."""
    everything = [*names.owned, *names.shared]
    values = [
        conn.execute(sql.SQL("SELECT last_value, is_called FROM {}").format(q[0].ident))
        for q in everything
    ]
    tops = [
        (
            (table, column),
            conn.execute(
                sql.SQL("SELECT max({})::bigint FROM {}").format(
                    sql.Identifier(column), table.ident
                )
            ),
        )
        for _, table, column, increment, _ in (everything if highest else ())
        if increment > 0
    ]
    versions = conn.execute(_MIGRATIONS) if names.migrations else None

    def result() -> State:
        states = []
        for (sequence, table, column, increment, start), cursor in zip(
            everything, values, strict=True
        ):
            row = cursor.fetchone()
            last_value, is_called = row if row else (start, False)
            states.append(
                OwnedSequence(
                    sequence, table, column, int(last_value), bool(is_called), increment, start
                )
            )
        found: dict[tuple[TableName, str], int | None] = {}
        for column_of, cursor in tops:
            row = cursor.fetchone()
            found[column_of] = int(row[0]) if row and row[0] is not None else None
        migrations = tuple(str(r[0]) for r in versions.fetchall()) if versions else None
        return State(states[: len(names.owned)], states[len(names.owned) :], found, migrations)

    return result


def owned_sequences(conn: psycopg.Connection, tables: Sequence[TableName]) -> list[OwnedSequence]:
    """Sequences owned by columns of ``tables`` (serial, identity), with their state."""
    return _with_state(conn, owned_sequence_names(conn, tables))


def _with_state(
    conn: psycopg.Connection, names: Sequence[tuple[TableName, TableName, str, int, int]]
) -> list[OwnedSequence]:
    """Each sequence with where it stands (every one read in one round trip: a pipeline)."""
    with conn.pipeline():
        asked = [
            conn.execute(sql.SQL("SELECT last_value, is_called FROM {}").format(sequence.ident))
            for sequence, *_ in names
        ]
    result = []
    for (sequence, table, column, increment, start), cursor in zip(names, asked, strict=True):
        row = cursor.fetchone()
        last_value, is_called = row if row else (start, False)
        result.append(
            OwnedSequence(
                sequence, table, column, int(last_value), bool(is_called), increment, start
            )
        )
    return result


def migration_versions(conn: psycopg.Connection) -> tuple[str, ...] | None:
    """Supabase's applied migration versions, or None without a readable history table."""
    return applied_migrations(conn) if migrations_readable_later(conn)() else None


def migrations_readable_later(conn: psycopg.Connection) -> Callable[[], bool]:
    """Whether ``supabase_migrations.schema_migrations`` exists and may be read, asked now
    and read when called (in the caller's pipeline)."""
    cursor = conn.execute(_MIGRATIONS_READABLE)

    def result() -> bool:
        row = cursor.fetchone()
        return bool(row and row[0])

    return result


def applied_migrations(conn: psycopg.Connection) -> tuple[str, ...]:
    """The versions in ``supabase_migrations.schema_migrations`` (readable: see above)."""
    return tuple(
        str(r[0])
        for r in conn.execute(
            "SELECT version FROM supabase_migrations.schema_migrations ORDER BY version"
        )
    )


_ROW_KEYS = """
SELECT n.nspname, c.relname,
       ARRAY(SELECT a.attname FROM unnest(i.indkey::int2[]) WITH ORDINALITY k(n, o)
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.n ORDER BY k.o)
FROM unnest(%s::text[], %s::text[]) AS w(nsp, rel)
JOIN pg_namespace n ON n.nspname = w.nsp
JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = w.rel
JOIN pg_index i ON i.indrelid = c.oid
WHERE i.indisunique AND i.indisvalid AND i.indimmediate AND i.indpred IS NULL
  AND i.indexprs IS NULL AND NOT 0 = ANY (i.indkey::int2[])
  AND NOT EXISTS (SELECT 1 FROM unnest(i.indkey::int2[]) k(n) JOIN pg_attribute a
                  ON a.attrelid = i.indrelid AND a.attnum = k.n WHERE NOT a.attnotnull)
ORDER BY n.nspname, c.relname, i.indisprimary DESC, i.indnatts, i.indexrelid
"""


def row_keys(
    conn: psycopg.Connection, columns: Mapping[TableName, Sequence[str]]
) -> dict[TableName, tuple[str, ...]]:
    """The columns that identify a row of each table, where it has some.

    The primary key, else the narrowest unique index over NOT NULL columns (no predicate,
    no expression, not deferrable), among ``columns`` (what the snapshot holds). Tables
    without one are absent: an apply can only replace them in full.
    """
    return row_keys_later(conn, columns)()


def row_keys_later(
    conn: psycopg.Connection, columns: Mapping[TableName, Sequence[str]]
) -> Callable[[], dict[TableName, tuple[str, ...]]]:
    """:func:`row_keys`, asked now and read when called (in the caller's pipeline)."""
    cursor = conn.execute(_ROW_KEYS, _table_arrays(columns))

    def result() -> dict[TableName, tuple[str, ...]]:
        keys: dict[TableName, tuple[str, ...]] = {}
        for nsp, rel, names in cursor.fetchall():
            table = TableName(nsp, rel)
            if table not in keys and set(names) <= set(columns[table]):
                keys[table] = tuple(names)
        return keys

    return result


@dataclass(frozen=True)
class AppTrigger:
    """A trigger the app made on a scoped table (not one PostgreSQL made for a constraint).

    A trigger on a partition counts as one on its scoped root; a partition's clone of its
    parent's trigger is not listed again.
    """

    table: TableName
    name: str
    function: str  # as regprocedure prints it: public.set_updated_at()
    before_row: bool  # BEFORE ... FOR EACH ROW on INSERT or UPDATE: it sees NEW first
    language: str  # of its function: plpgsql, c (moddatetime, tsvector_update_trigger)...
    source: str  # the function's body and the trigger's arguments: the columns it names

    @property
    def may_rewrite(self) -> bool:
        """Whether it may change the row being written: a BEFORE ROW trigger whose function
        assigns to ``NEW``, or is written in a language whose code cannot be read here."""
        if not self.before_row:
            return False
        if self.language != "plpgsql":
            return True
        return _ASSIGNS_NEW.search(self.source) is not None

    def names_column(self, column: str) -> bool:
        """Whether the trigger's code or arguments name ``column`` (as a word, any case)."""
        return re.search(rf"(?<![\w$]){re.escape(column)}(?![\w$])", self.source, re.I) is not None


# A PL/pgSQL statement assigning to NEW or one of its fields (``NEW.updated_at := now();``,
# ``NEW = jsonb_populate_record(...)``, ``SELECT ... INTO NEW``), not a comparison
# (``IF NEW.status = 'published'``): an assignment starts a statement.
_ASSIGNS_NEW = re.compile(
    r"""(?:^|;|\bbegin|\bthen|\belse|\bloop|\bdeclare)\s*new\s*"""
    r"""(?:\.\s*(?:"(?:[^"]|"")+"|[\w$]+)\s*)?(?:\[[^\]]*\]\s*)?:?=(?!=)"""
    r"""|\binto\s+(?:strict\s+)?new\b""",
    re.I,
)


_APP_TRIGGERS = """
SELECT n.nspname, c.relname, t.tgname, t.tgfoid::regprocedure::text,
       (t.tgtype & 3) = 3 AND (t.tgtype & 64) = 0 AND (t.tgtype & 20) <> 0,
       l.lanname, coalesce(p.prosrc, '') || ' ' || encode(t.tgargs, 'escape')
FROM unnest(%s::text[], %s::text[]) AS w(nsp, rel)
JOIN pg_namespace n ON n.nspname = w.nsp
JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = w.rel
CROSS JOIN LATERAL (SELECT c.oid UNION SELECT relid FROM pg_partition_tree(c.oid)) AS part(relid)
JOIN pg_trigger t ON t.tgrelid = part.relid
JOIN pg_proc p ON p.oid = t.tgfoid
JOIN pg_language l ON l.oid = p.prolang
WHERE NOT t.tgisinternal AND t.tgparentid = 0 AND t.tgenabled IN ('O', 'A')
ORDER BY n.nspname, c.relname, t.tgname
"""


def app_triggers(conn: psycopg.Connection, tables: Sequence[TableName]) -> list[AppTrigger]:
    """The enabled app triggers on ``tables`` (and their partitions), by table and name."""
    return app_triggers_later(conn, tables)()


def app_triggers_later(
    conn: psycopg.Connection, tables: Sequence[TableName]
) -> Callable[[], list[AppTrigger]]:
    """:func:`app_triggers`, asked now and read when called (in the caller's pipeline)."""
    cursor = conn.execute(_APP_TRIGGERS, _table_arrays(tables))
    return lambda: [
        AppTrigger(TableName(nsp, rel), str(name), str(function), bool(before), str(lang), str(src))
        for nsp, rel, name, function, before, lang, src in cursor.fetchall()
    ]
