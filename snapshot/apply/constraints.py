"""``apply --block-readers``: the scope's own foreign keys checked once, in bulk, not per row.

Row by row, every inserted or updated child row looks up its parent and every deleted
parent row looks for children: on a large full replace that is most of the time. With
``--block-readers`` the foreign keys whose two tables are both in the scope (and whose
child table the apply's role owns) are dropped inside the transaction, before the writes,
and added back with their exact definition after them: ``ALTER TABLE ... ADD CONSTRAINT``
checks every row with one join. A row that breaks one fails the apply, which rolls back
with the constraints as they were (DDL is transactional). Foreign keys from outside the
scope, or to the auth tables, stay and check row by row.

The price, and why it is only ever asked for: ``ALTER TABLE`` takes ACCESS EXCLUSIVE
locks, so readers of those tables wait from the drop until the commit (the default apply
never makes readers wait). The report says so.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import psycopg
from psycopg import sql

from snapshot.apply.state import ApplyRun
from snapshot.names import TableName

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ForeignKeyDefinition:
    """A foreign key as the catalog defines it, to drop and add back unchanged."""

    name: str
    child: TableName
    parent: TableName
    definition: str  # pg_get_constraintdef: columns, references, actions, deferral, NOT VALID


_SCOPE_FOREIGN_KEYS = """
SELECT c.conname, cn.nspname, cc.relname, pn.nspname, pc.relname, pg_get_constraintdef(c.oid)
FROM pg_constraint c
JOIN pg_class cc ON cc.oid = c.conrelid
JOIN pg_namespace cn ON cn.oid = cc.relnamespace
JOIN pg_class pc ON pc.oid = c.confrelid
JOIN pg_namespace pn ON pn.oid = pc.relnamespace
WHERE c.contype = 'f' AND c.conparentid = 0 AND cc.relkind = 'r'
  AND pg_has_role(cc.relowner, 'USAGE')
ORDER BY cn.nspname, cc.relname, c.conname
"""


def scope_foreign_keys(run: ApplyRun) -> list[ForeignKeyDefinition]:
    """The foreign keys with both tables in the scope, on child tables the role owns."""
    scope = set(run.order)
    found = []
    for name, child_schema, child, parent_schema, parent, definition in run.conn.execute(
        _SCOPE_FOREIGN_KEYS
    ):
        fk = ForeignKeyDefinition(
            str(name),
            TableName(str(child_schema), str(child)),
            TableName(str(parent_schema), str(parent)),
            str(definition),
        )
        if fk.child in scope and fk.parent in scope:
            found.append(fk)
    return found


def drop(conn: psycopg.Connection, fks: Sequence[ForeignKeyDefinition]) -> None:
    """Drop ``fks`` inside the running transaction (readers of their tables wait from now)."""
    for fk in fks:
        conn.execute(
            sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(
                fk.child.ident, sql.Identifier(fk.name)
            )
        )
    log.info("  dropped %d foreign keys inside the transaction (--block-readers)", len(fks))


def add_back(conn: psycopg.Connection, fks: Sequence[ForeignKeyDefinition]) -> None:
    """Add ``fks`` back exactly as they were: each checks every row of its child at once."""
    for fk in fks:
        # The definition is the server's own text (pg_get_constraintdef), quoted by it.
        conn.execute(
            sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} {}").format(
                fk.child.ident, sql.Identifier(fk.name), sql.SQL(fk.definition)
            )
        )
    log.info("  checked %d foreign keys in bulk", len(fks))
