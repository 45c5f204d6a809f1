"""The apply order comes from the catalog's foreign keys, not from a list."""

from __future__ import annotations

import pytest

from snapshot import catalog
from snapshot.catalog import ForeignKey
from snapshot.db import connect
from snapshot.environments import Connection
from snapshot.errors import Refused
from snapshot.names import TableName
from tests.fix_db import SCOPE


def fk(child: str, parent: str, deferrable: bool = False) -> ForeignKey:
    return ForeignKey(
        f"{child}_{parent}",
        TableName("public", child),
        ("x",),
        TableName("public", parent),
        ("id",),
        "a",
        deferrable,
    )


def names(*tables: str) -> list[TableName]:
    return [TableName("public", t) for t in tables]


@pytest.mark.fast
def test_parents_come_first_and_ties_keep_the_configured_order() -> None:
    order = catalog.apply_order(names("c", "b", "a", "d"), [fk("c", "b"), fk("b", "a")])
    assert [t.name for t in order] == [
        "a",
        "b",
        "c",
        "d",
    ]  # of the ready ones, first configured first


@pytest.mark.fast
def test_self_references_and_repeated_references_do_not_block() -> None:
    order = catalog.apply_order(
        names("edges", "topics"),
        [fk("topics", "topics"), fk("edges", "topics"), fk("edges", "topics")],
    )
    assert [t.name for t in order] == ["topics", "edges"]


@pytest.mark.fast
def test_a_deferrable_key_breaks_a_cycle() -> None:
    order = catalog.apply_order(names("a", "b"), [fk("a", "b"), fk("b", "a", deferrable=True)])
    assert [t.name for t in order] == ["b", "a"]


@pytest.mark.fast
def test_a_cycle_is_reported_with_its_tables() -> None:
    with pytest.raises(
        Refused, match=r"public\.a -> public\.b -> public\.c -> public\.a form a cycle"
    ):
        catalog.apply_order(
            names("a", "b", "c", "d"), [fk("a", "b"), fk("b", "c"), fk("c", "a"), fk("d", "a")]
        )


def test_the_app_schema_orders_parents_before_children(make_db) -> None:
    db = make_db("empty")
    conn = connect(Connection("t", "test", "127.0.0.1", db.server.port, "app_owner", db.name))
    with conn:
        tables = [TableName("public", t) for t in reversed(SCOPE)]
        fks = catalog.foreign_keys(conn, tables)
        order = catalog.apply_order(tables, fks)
        position = {t: i for i, t in enumerate(order)}
        scoped = [
            f for f in fks if f.child in position and f.parent in position and f.child != f.parent
        ]
        assert len(scoped) >= 20
        assert all(position[f.parent] < position[f.child] for f in scoped)
        composite = [
            f for f in fks if f.child.name == "user_playlist_progress" and len(f.columns) == 2
        ]
        assert composite and composite[0].parent_columns == ("playlist_id", "position")
        unindexed = {str(f) for f in catalog.unindexed_foreign_keys(conn, fks)}
        assert "public.question_attempts(question_id) -> public.questions(id)" in unindexed
        assert not any(s.startswith("public.question_topics(question_id)") for s in unindexed)
