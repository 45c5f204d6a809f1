"""`snapshot verify SOURCE TARGET`: two live databases, one scope, exit 1 on any difference."""

from __future__ import annotations

import json

import pytest

from tests.fix_db import SCOPE, Database
from tests.fix_project import Project


def twins(project: Project, make_db, server) -> tuple[Database, Database]:
    """dev, and prod as an exact copy of it."""
    dev = make_db("dev")
    prod = make_db("empty")
    server.drop_database(prod.name)
    server.create_database(prod.name, dev.name)
    project.point("dev", dev)
    project.point("prod", prod)
    return dev, prod


def test_identical_databases_verify(project: Project, make_db, server) -> None:
    twins(project, make_db, server)

    result = project.run("verify", "dev", "prod")

    assert result.exit_code == 0, result.output
    assert "verify dev prod: 16/16 tables match" in result.stdout
    assert "auth.users: 0 dev users missing in prod" in result.stdout


@pytest.mark.parametrize("table", SCOPE)
def test_one_row_difference_in_any_scoped_table_fails(
    project: Project, make_db, server, table: str
) -> None:
    _dev, prod = twins(project, make_db, server)
    with prod.connect() as conn:
        conn.execute("SET session_replication_role = replica")  # the test, not the tool
        conn.execute(
            f"DELETE FROM public.{table} WHERE ctid = (SELECT min(ctid) FROM public.{table})"
        )

    result = project.run("verify", "dev", "prod", "--json")

    assert result.exit_code == 1
    report = json.loads(result.stdout)
    bad = [t["table"] for t in report["tables"] if not t["match"]]
    assert bad == [f"public.{table}"]
    assert f"prod differs from dev in public.{table}" in result.stderr


def test_a_changed_value_is_named_by_column(project: Project, make_db, server) -> None:
    _dev, prod = twins(project, make_db, server)
    prod.execute("UPDATE public.answers SET explanation = 'changed' WHERE id = 3")

    result = project.run("verify", "dev", "prod")

    assert result.exit_code == 1
    assert "differs in explanation" in result.stdout


def test_missing_auth_users_fail_verify(project: Project, make_db, server) -> None:
    _dev, prod = twins(project, make_db, server)
    prod.execute(
        "ALTER TABLE public.users DROP CONSTRAINT users_id_fkey; "
        "DELETE FROM auth.users WHERE id IN (SELECT id FROM auth.users ORDER BY id LIMIT 3)"
    )

    result = project.run("verify", "dev", "prod")

    assert result.exit_code == 1
    assert "auth.users: 3 dev users missing in prod" in result.stdout


def test_verify_refuses_comparing_a_database_with_itself(project: Project, make_db) -> None:
    dev = make_db("dev")
    project.point("dev", dev)
    project.point("prod", dev)

    result = project.run("verify", "dev", "prod")

    assert result.exit_code == 2
    assert "are the same database" in result.stderr
