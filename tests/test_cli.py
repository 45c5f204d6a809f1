"""The command line itself: global options on either side of the command, -q that still
names a failure's cause, and --json that prints one document on stdout whatever happens."""

from __future__ import annotations

import json
import shutil

from snapshot import localpg
from tests.fix_apps import setup_pair
from tests.fix_project import Project, one_error_line


def test_global_options_work_after_the_command(project: Project, make_db) -> None:
    project.point("dev", make_db("empty"))
    config = project.path / "cfg" / "x.toml"
    config.parent.mkdir()
    config.write_text('archive = "archive"\n')

    verbose = project.run("take", "dev", "-v", "--config", str(config))
    listed = project.run("list", "--json", "--config", "cfg/x.toml", "-q")

    assert verbose.exit_code == 2  # cfg/.env.local: env files resolve beside the config
    assert "relative to the folder of" in one_error_line(verbose)
    assert "cfg/.env.local" in one_error_line(verbose)
    shutil.copy(project.path / ".env.local", config.parent / ".env.local")
    verbose = project.run("take", "dev", "-v", "--config", str(config))
    assert verbose.exit_code == 0, verbose.stderr
    assert "pg_dump --dbname=" in verbose.stderr  # -v after the command: debug output
    assert (config.parent / "archive" / "dev").is_dir()
    assert listed.exit_code == 0 and json.loads(listed.stdout) == []


def test_quiet_still_names_the_cause_of_a_preflight_failure(project: Project, make_db) -> None:
    _dev, prod = setup_pair(project, make_db)
    project.config('[scope]\ntables = ["users", "categories"]\n')
    original = prod.fingerprint()

    result = project.run("apply", "prod", "--yes", "-q")

    assert result.exit_code == 2  # the scope is configuration
    assert "scope: the snapshot covers another scope" in one_error_line(result)
    assert prod.fingerprint() == original


def test_json_failures_are_one_document_with_an_error(project: Project, make_db) -> None:
    port = localpg.free_port()
    project.env("dev", SUPABASE_DB_URL=f"postgresql://app_owner@127.0.0.1:{port}/x")

    unknown = project.run("env", "nosuch", "--json")
    unreachable = project.run("take", "dev", "--json")
    no_snapshot = project.run("check", "prod", "--json")
    usage = project.run("take", "--json")

    for result in (unknown, unreachable, no_snapshot, usage):
        assert result.exit_code in (1, 2)
        document = json.loads(result.stdout)
        assert document["error"] and document["error"] in result.stderr


def test_json_of_a_failing_check_is_the_report_with_an_error(project: Project, make_db) -> None:
    setup_pair(project, make_db)
    project.config('[scope]\ntables = ["users", "categories"]\n')

    result = project.run("check", "prod", "--json")

    assert result.exit_code == 2  # another scope than the snapshot's: configuration
    document = json.loads(result.stdout)
    assert document["ok"] is False and document["findings"]
    assert document["error"].startswith("preflight found 1 error")
