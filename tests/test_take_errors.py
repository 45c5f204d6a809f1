"""Bad input to `snapshot take`: one clear line, the right exit code, nothing written."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from snapshot import localpg
from tests.fix_db import Database
from tests.fix_project import Project

Setup = Callable[[Project, Database], list[str]]


def _no_env_file(project: Project, db: Database) -> list[str]:
    return ["take", "dev"]


def _no_variables(project: Project, db: Database) -> list[str]:
    project.env("dev", SUPABASE_DB_PASSWORD="secret")
    return ["take", "dev"]


def _no_password(project: Project, db: Database) -> list[str]:
    project.env("dev", SUPABASE_PROJECT_REF="abcdefghijklmnopqrst")
    return ["take", "dev"]


def _refs_disagree(project: Project, db: Database) -> list[str]:
    project.env(
        "dev",
        SUPABASE_PROJECT_REF="abcdefghijklmnopqrst",
        NEXT_PUBLIC_SUPABASE_URL="https://zyxwvutsrqponmlkjihg.supabase.co",
        SUPABASE_DB_PASSWORD="secret",
    )
    return ["take", "dev"]


def _transaction_pooler(project: Project, db: Database) -> list[str]:
    project.env(
        "dev",
        SUPABASE_DB_URL="postgresql://postgres.abcdefghijklmnopqrst:secret@"
        "aws-0-eu-central-1.pooler.supabase.com:6543/postgres",
    )
    return ["take", "dev"]


def _plaintext_to_remote(project: Project, db: Database) -> list[str]:
    project.env(
        "dev",
        SUPABASE_DB_URL="postgresql://postgres:secret@db.example.com/postgres?sslmode=disable",
    )
    return ["take", "dev"]


def _unencoded_at(project: Project, db: Database) -> list[str]:
    project.env(
        "dev", SUPABASE_DB_URL="postgresql://postgres:secret@w0rd@db.example.com:5432/postgres"
    )
    return ["take", "dev"]


def _unreachable(project: Project, db: Database) -> list[str]:
    project.env(
        "dev", SUPABASE_DB_URL=f"postgresql://app_owner@127.0.0.1:{localpg.free_port()}/{db.name}"
    )
    return ["take", "dev"]


def _unknown_table(project: Project, db: Database) -> list[str]:
    project.point("dev", db)
    project.config('[scope]\ntables = ["users", "notifications"]\n')
    return ["take", "dev"]


def _view_in_scope(project: Project, db: Database) -> list[str]:
    db.execute("CREATE VIEW public.active_users AS SELECT * FROM public.users")
    project.point("dev", db)
    project.config('[scope]\ntables = ["users", "active_users"]\n')
    return ["take", "dev"]


def _staging_name_shared(project: Project, db: Database) -> list[str]:
    project.point("dev", db)
    project.config('[scope]\ntables = ["users", "public.auth_users"]\n')
    return ["take", "dev"]


def _table_twice(project: Project, db: Database) -> list[str]:
    project.point("dev", db)
    project.config('[scope]\ntables = ["users", "public.users"]\n')
    return ["take", "dev"]


def _auth_in_scope(project: Project, db: Database) -> list[str]:
    project.point("dev", db)
    project.config('[scope]\ntables = ["users", "auth.users"]\n')
    return ["take", "dev"]


def _unknown_setting(project: Project, db: Database) -> list[str]:
    project.point("dev", db)
    project.config('[scope]\ntabels = ["users"]\n')
    return ["take", "dev"]


def _bad_toml(project: Project, db: Database) -> list[str]:
    project.point("dev", db)
    project.config("[scope]\ntables = [\n")
    return ["take", "dev"]


def _archive_not_writable(project: Project, db: Database) -> list[str]:
    project.point("dev", db)
    (project.path / "blocker").write_text("a file where a folder should be")
    project.config('archive = "blocker/snapshots"\n')
    return ["take", "dev"]


def _bad_label(project: Project, db: Database) -> list[str]:
    project.point("dev", db)
    return ["take", "dev", "--label", "../escape"]


def _missing_config(project: Project, db: Database) -> list[str]:
    project.point("dev", db)
    return ["--config", "nowhere.toml", "take", "dev"]


CASES: dict[str, tuple[Setup, int, str]] = {
    "missing env file": (
        _no_env_file,
        2,
        "environment 'dev' needs .env.local, which does not exist",
    ),
    "missing variables": (_no_variables, 2, "has neither SUPABASE_DB_URL nor a project ref"),
    "missing password": (_no_password, 2, "lacks SUPABASE_DB_PASSWORD"),
    "refs disagree": (_refs_disagree, 2, "names two different projects"),
    "transaction pooler": (
        _transaction_pooler,
        2,
        "transaction pooler (port 6543), which breaks pg_dump",
    ),
    "plaintext to remote": (_plaintext_to_remote, 2, "sslmode=disable towards db.example.com"),
    "unencoded @ in the password": (
        _unencoded_at,
        2,
        "has more than one '@' before its host: an '@' in the password must be percent-encoded, "
        "as %40",
    ),
    "unreachable host": (_unreachable, 1, "cannot connect to app_owner@127.0.0.1:"),
    "unknown table": (_unknown_table, 2, "has no table public.notifications: fix [scope] tables"),
    "view in scope": (_view_in_scope, 2, "public.active_users is a view, not a table"),
    "table named twice": (_table_twice, 2, "table public.users is named twice"),
    "staging name shared": (
        _staging_name_shared,
        2,
        "public.auth_users and auth.users would share pg_temp.snapshot_auth_users",
    ),
    "auth table in scope": (_auth_in_scope, 2, "auth tables are copied by 'auth_users = true'"),
    "unknown setting": (_unknown_setting, 2, "unknown setting 'tabels' in [scope]"),
    "bad toml": (_bad_toml, 2, "is not valid TOML"),
    "archive not writable": (_archive_not_writable, 2, "is not writable"),
    "bad label": (_bad_label, 2, "label '../escape' is not usable"),
    "missing config": (_missing_config, 2, "config file nowhere.toml does not exist"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_and_writes_nothing(project: Project, make_db, case: str) -> None:
    setup, code, message = CASES[case]
    db = make_db("empty")
    args = setup(project, db)

    result = project.run(*args)

    assert result.exit_code == code, result.output
    assert result.stdout == ""
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("Error: ") and message in lines[-1], result.stderr
    assert sum(ln.startswith("Error") for ln in lines) == 1
    assert "Traceback" not in result.stderr and "secret" not in result.stderr
    assert project.snapshots() == []
    assert not list(project.path.glob("snapshots/*/.tmp-*"))


def test_missing_auth_schema_asks_to_turn_auth_copying_off(project: Project, server) -> None:
    name = f"snaptest_{__import__('os').getpid()}_plain"
    server.drop_database(name)
    server.create_database(name)
    try:
        with server.connect(name) as conn:
            conn.execute("CREATE TABLE public.users (id int primary key)")
        project.env("dev", SUPABASE_DB_URL=server.url(name))
        project.config('[scope]\ntables = ["users"]\n')

        refused = project.run("take", "dev")
        project.config('[scope]\ntables = ["users"]\nauth_users = false\n')
        taken = project.run("take", "dev")
    finally:
        server.drop_database(name)

    assert refused.exit_code == 2
    assert (
        "has no auth.users, auth.identities: it is not a Supabase database; set auth_users = false"
        in refused.stderr
    )
    assert taken.exit_code == 0, taken.stderr


def test_pg_dump_older_than_the_server_is_refused_naming_both(
    project: Project, pg16: localpg.LocalServer, pg_bin: Path
) -> None:
    project.env("dev", SUPABASE_DB_URL=pg16.url("app"))

    result = project.run("--pg-bin", str(pg_bin), "take", "dev")

    assert result.exit_code == 2
    assert "dev (PostgreSQL 16." in result.stderr
    assert "needs pg_dump 16 or newer; found only pg_dump 15." in result.stderr
    assert "apt install postgresql-client-16" in result.stderr
    assert project.snapshots() == []


def test_a_new_enough_pg_dump_is_found_for_a_newer_server(
    project: Project, pg16: localpg.LocalServer
) -> None:
    project.env("dev", SUPABASE_DB_URL=pg16.url("app", user="app_owner"))

    result = project.run("--pg-bin", str(localpg.embedded_bin(16)), "take", "dev", "--json")

    assert result.exit_code == 0, result.stderr
    assert '"server_version": "16.' in result.stdout and '"pg_dump_version": "16.' in result.stdout
