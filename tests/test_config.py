"""`snapshot init` and snapshot.toml: the defaults are the user's, and they round-trip."""

from __future__ import annotations

import json

from snapshot.config import DEFAULT_TABLES, load_config, parse_config
from tests.conftest import Project


def test_init_writes_a_config_equal_to_the_defaults(project: Project) -> None:
    result = project.run("init")

    assert result.exit_code == 0, result.output
    written = load_config(project.path / "snapshot.toml")
    defaults = parse_config({}, None, project.path)  # no snapshot.toml at all
    assert [str(t) for t in written.scope.tables] == [f"public.{t}" for t in DEFAULT_TABLES]
    assert written.scope == defaults.scope
    assert written.apply == defaults.apply
    assert written.archive == project.path / "snapshots"
    assert written.environments["prod"].env_file == project.path / ".env.production"
    assert written.environments["dev"].safe and not written.environments["prod"].safe
    assert written.scripts_explicit is False  # the bundled scripts until sql/ exists
    assert written.retention is None and written.pg_bin is None


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
