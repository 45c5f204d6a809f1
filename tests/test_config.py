"""`snapshot init` and snapshot.toml: the defaults are the user's, and they round-trip."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from snapshot.config import load_config, parse_config
from snapshot.errors import ConfigError
from snapshot.init import Proposal, render_config
from snapshot.names import TableName
from tests.fix_db import PREFIX, SCOPE_TABLES, Database, Server
from tests.fix_project import Project


@pytest.mark.fast
def test_init_without_dev_writes_the_bundled_template_and_says_why(project: Project) -> None:
    result = project.run("init")

    assert result.exit_code == 0, result.output
    why = "could not read dev (environment 'dev' needs .env.local, which does not exist"
    assert why in " ".join(result.stderr.split())
    assert "`snapshot init` could not read dev (environment 'dev' needs .env.local" in (
        (project.path / "snapshot.toml").read_text()
    )
    written = load_config(project.path / "snapshot.toml")
    defaults = parse_config({}, None, project.path)  # no snapshot.toml at all
    assert [str(t) for t in written.scope.tables] == list(SCOPE_TABLES)
    assert written.scope == defaults.scope
    assert written.apply == defaults.apply
    assert written.archive == project.path / "snapshots"
    assert written.environments["prod"].env_file == project.path / ".env.production"
    assert written.environments["dev"].safe and not written.environments["prod"].safe
    assert written.scripts_explicit is False  # the bundled scripts until sql/ exists
    assert written.retention is None and written.pg_bin is None


@pytest.mark.fast
def test_init_refuses_to_overwrite(project: Project) -> None:
    project.config("archive = 'mine'\n")

    result = project.run("init")

    assert result.exit_code == 2
    assert "snapshot.toml already exists" in result.stderr
    assert (project.path / "snapshot.toml").read_text() == "archive = 'mine'\n"
    assert project.run("init", "--force").exit_code == 0


def test_other_environments_use_their_own_env_file(project: Project, make_db) -> None:
    db = make_db("empty")
    project.env("staging", SUPABASE_DB_URL=db.app_url)
    project.config('[environments.qa]\nenv_file = "config/qa.env"\n')
    (project.path / "config").mkdir()
    project.env("qa", file="config/qa.env", SUPABASE_DB_URL=db.app_url)

    staging = project.run("env", "staging", "--json")
    qa = project.run("env", "qa", "--json")

    assert json.loads(staging.stdout)["env_file"].endswith(".env.staging")
    assert json.loads(qa.stdout)["answers"] is True


@pytest.fixture
def bare_db(server: Server) -> Iterator[Callable[[str], Database]]:
    """``bare_db(schema)``: a database holding only ``schema`` (no auth, no bundled app)."""
    created: list[str] = []

    def make(schema: str) -> Database:
        name = f"{PREFIX}bare_{len(created)}"
        server.drop_database(name)
        server.create_database(name, "template0")
        created.append(name)
        db = Database(server, name)
        db.execute("GRANT CREATE ON SCHEMA public TO app_owner")
        db.execute(schema)
        return db

    yield make
    for name in created:
        server.drop_database(name)


# A blog: its own tables (a quoted one, a partitioned one), no questions, no auth schema.
BLOG = """
SET ROLE app_owner;
CREATE TABLE public.post (
    id int PRIMARY KEY, author_id int NOT NULL, title text NOT NULL, status text NOT NULL);
CREATE TABLE public.comment (
    id int PRIMARY KEY, post_id int NOT NULL REFERENCES public.post (id) ON DELETE CASCADE,
    body text NOT NULL);
CREATE TABLE public.author (id int PRIMARY KEY, name text NOT NULL);
ALTER TABLE public.post ADD FOREIGN KEY (author_id) REFERENCES public.author (id);
CREATE TABLE public."Tag" (id int PRIMARY KEY, label text NOT NULL);
CREATE TABLE public.post_tag (
    post_id int REFERENCES public.post (id) ON DELETE CASCADE,
    tag_id int REFERENCES public."Tag" (id), PRIMARY KEY (post_id, tag_id));
CREATE TABLE public.visit (post_id int NOT NULL REFERENCES public.post (id), at date NOT NULL)
  PARTITION BY RANGE (at);
CREATE TABLE public.visit_2026 PARTITION OF public.visit
  FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
RESET ROLE;
"""


def _blog(bare_db: Callable[[str], Database], variant: str, posts: int) -> Database:
    db = bare_db(BLOG)
    db.execute(
        "INSERT INTO public.author SELECT i, %s || i FROM generate_series(1, 5) i", [variant]
    )
    db.execute(
        "INSERT INTO public.post SELECT i, 1 + i %% 5, %s || ' post ' || i, 'draft' "
        "FROM generate_series(1, %s) i",
        [variant, posts],
    )
    db.execute(
        "INSERT INTO public.comment SELECT i, 1 + i %% %s, 'nice' FROM generate_series(1, 40) i",
        [posts],
    )
    db.execute("INSERT INTO public.\"Tag\" SELECT i, 'tag' || i FROM generate_series(1, 4) i")
    db.execute(
        "INSERT INTO public.post_tag SELECT i, 1 + i %% 4 FROM generate_series(1, %s) i", [posts]
    )
    db.execute(
        "INSERT INTO public.visit SELECT 1 + i %% %s, date '2026-03-01' + i "
        "FROM generate_series(1, 30) i",
        [posts],
    )
    return db


BLOG_TABLES = [
    "public.author",
    "public.post",
    "public.comment",
    'public."Tag"',
    "public.post_tag",
    "public.visit",
]


def test_init_reads_an_app_unlike_the_bundled_one_and_its_config_works_unedited(
    project: Project, bare_db
) -> None:
    dev, prod = _blog(bare_db, "dev", 12), _blog(bare_db, "prod", 8)
    project.point("dev", dev)
    project.point("prod", prod)
    # Before init the scope is the bundled example app's: take says so, and what to do.
    before_init = project.run("take", "dev")
    assert before_init.exit_code == 2, before_init.output
    line = before_init.stderr.strip().splitlines()[-1]
    assert "has no table public.users, public.user_preferences, public.categories and 13 more" in (
        line
    )
    assert "there is no snapshot.toml" in line and "run 'snapshot init'" in line, line

    written = project.run("init")

    assert written.exit_code == 0, written.output
    assert written.stdout.strip() == f"wrote {project.path / 'snapshot.toml'}"
    assert "read dev (app_owner@" in written.stderr and "6 of its tables" in written.stderr
    config = load_config(project.path / "snapshot.toml")
    scope = [str(t) for t in config.scope.tables]
    assert sorted(scope) == sorted(BLOG_TABLES)  # the partition is its table's
    for parent, child in [("author", "post"), ("post", "comment"), ('"Tag"', "post_tag")]:
        assert scope.index(f"public.{parent}") < scope.index(f"public.{child}"), scope
    assert config.scope.auth_users is False
    assert dict(config.apply.insert_as) == {}  # no questions.status here
    text = (project.path / "snapshot.toml").read_text()
    assert "parents before children by their foreign keys" in text
    assert "dev has no auth.users and auth.identities" in text

    taken = project.run("take", "dev")
    checked = project.run("check", "prod")
    applied = project.run("apply", "prod", "--yes")

    assert taken.exit_code == 0, taken.output
    assert checked.exit_code == 0, checked.output
    assert applied.exit_code == 0, applied.output
    assert prod.fingerprint(BLOG_TABLES) == dev.fingerprint(BLOG_TABLES)


def test_init_proposes_the_tables_of_an_apps_own_schema_not_the_platforms(
    project: Project, bare_db
) -> None:
    # basejump keeps its tables in a schema of its own; Supabase's own schemas (storage...)
    # and what an extension made are not the app's data.
    dev = bare_db(
        "CREATE SCHEMA basejump AUTHORIZATION app_owner; CREATE SCHEMA storage; "
        "CREATE TABLE storage.objects (id int PRIMARY KEY); "
        "SET ROLE app_owner; "
        "CREATE TABLE basejump.accounts (id int PRIMARY KEY, name text); "
        "CREATE TABLE basejump.invitations (id int PRIMARY KEY, "
        "account_id int REFERENCES basejump.accounts (id)); "
        "CREATE TABLE public.notes (id int PRIMARY KEY, body text); RESET ROLE;"
    )
    project.point("dev", dev)

    written = project.run("init")

    assert written.exit_code == 0, written.output
    scope = [str(t) for t in load_config(project.path / "snapshot.toml").scope.tables]
    assert scope == ["public.notes", "basejump.accounts", "basejump.invitations"]


def test_init_gives_the_bundled_app_its_guardrail_settings(project: Project, make_db) -> None:
    project.point("dev", make_db("dev"))

    written = project.run("init")

    assert written.exit_code == 0, written.output
    config = load_config(project.path / "snapshot.toml")
    defaults = parse_config({}, None, project.path)
    assert set(config.scope.tables) == set(defaults.scope.tables)
    assert config.scope.auth_users is True
    assert config.apply == defaults.apply  # questions go in as drafts
    assert {str(c): v for c, v in config.apply.insert_as.items()} == {
        "public.questions.status": "draft"
    }
    text = (project.path / "snapshot.toml").read_text()
    assert "parents before children by their foreign keys" in text  # read from dev


@pytest.mark.parametrize(
    ("setting", "name", "column"),
    [
        ('[apply]\ninsert_as = { "questions.status" = "draft" }', "[apply] insert_as", "status"),
        (
            '[parity]\nignore_columns = ["questions.updated_at"]',
            "[parity] ignore_columns",
            "updated_at",
        ),
    ],
)
def test_a_setting_naming_a_table_outside_the_scope_says_how_to_fix_it(
    project: Project, make_db, setting: str, name: str, column: str
) -> None:
    project.point("dev", make_db("dev"))
    project.config(f'[scope]\ntables = ["users"]\n\n{setting}\n')

    result = project.run("take", "dev")

    assert result.exit_code == 2, result.output
    [line] = result.stderr.strip().splitlines()
    assert line == (
        f"Error: {name} names public.questions.{column}, but public.questions is not in "
        f"[scope] tables: remove it from {name}, or add public.questions to [scope] tables"
    ), line
    assert project.snapshots() == []


def test_init_config_runs_the_bundled_scripts_until_sql_exists(project: Project, make_db) -> None:
    prod = make_db("prod")
    project.point("prod", prod)
    assert project.run("init").exit_code == 0

    result = project.run("smoke", "prod")

    assert result.exit_code == 0, result.stderr
    assert "3/3 guardrails hold" in result.stdout


# --- what init writes, config reads back; mistakes in the file: no database needed -----------


@pytest.mark.fast
def test_a_proposal_of_awkward_names_is_written_so_that_it_reads_back(tmp_path: Path) -> None:
    # init (snapshot.init) writes the file, the configuration (snapshot.config) reads it:
    # every name a database can hold must survive the trip between the two.
    tables = (
        TableName("public", "plain"),
        TableName("public", "User"),
        TableName("public", "it's"),
        TableName("public", "order"),
        TableName("App Data", "Ünïcode"),
    )
    proposal = Proposal(
        tables,
        auth_users=False,
        insert_as={'public."User".status': "draft", "public.plain.kind": "it's"},
        read_from="dev (db.example)",
        key_order=False,
    )
    path = tmp_path / "snapshot.toml"
    path.write_text(render_config(proposal), encoding="utf-8")

    config = load_config(path)

    assert config.scope.tables == tables and config.scope.auth_users is False
    assert {str(c): v for c, v in config.apply.insert_as.items()} == {
        'public."User".status': "draft",
        "public.plain.kind": "it's",
    }
    assert "by name (their foreign keys form a cycle" in path.read_text()


@pytest.mark.fast
@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"scope": {"tabels": []}}, "unknown setting 'tabels' in [scope]: did you mean tables?"),
        ({"scope": {"tables": []}}, "[scope].tables is empty: name at least one table"),
        (
            {"scope": {"tables": ["users", "public.users"]}},
            "table public.users is named twice in [scope].tables",
        ),
        ({"scope": {"tables": ["auth.users"]}}, "auth tables are copied by 'auth_users = true'"),
        (
            {"environments": {"dev": {"safe": "false"}}},
            "[environments.dev] safe must be true or false, not 'false': write it without quotes",
        ),
        (
            {"environments": {"prod": {"connection": "tunnel"}}},
            "[environments.prod] connection must be one of auto, direct, pooler",
        ),
        ({"apply": {"lock_timeout": "0"}}, "lock_timeout must be more than 0"),
        ({"apply": {"foreign_key_checks": "sometimes"}}, "foreign_key_checks must be one of"),
        ({"apply": {"upload": "some"}}, "[apply] upload must be one of 'auto', 'changed', 'all'"),
        ({"apply": {"orphaned_users": "ignore"}}, 'orphaned_users must be "warn" or "error"'),
        (
            {"parity": {"ignore_columns": ["posts.body"]}},
            "names public.posts.body, but public.posts is not in [scope] tables",
        ),
        ({"session": {"statement_timeout": "soon"}}, "[session] statement_timeout must be"),
        ({"retention": {"keep": 0}}, "[retention] keep must be a whole number of at least 1"),
        ({"archive": ".."}, "archive = '..' is the project folder or above it"),
    ],
)
def test_a_mistake_in_snapshot_toml_is_one_sentence_naming_the_setting(
    tmp_path: Path, data: dict, message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(data, tmp_path / "snapshot.toml", tmp_path)

    assert message in str(caught.value)
