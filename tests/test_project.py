"""The project root: found from any folder below it (as npm finds package.json), so every
command reads the same env files, config and archive there; a command that finds nothing
names the folders it searched."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.fix_apps import setup_pair
from tests.fix_db import ROOT
from tests.fix_project import Project, one_error_line


def test_commands_find_the_project_from_a_subfolder(
    project: Project, make_db, monkeypatch: pytest.MonkeyPatch
) -> None:
    project.point("dev", make_db("empty"))
    deep = project.path / "app" / "src"
    deep.mkdir(parents=True)
    monkeypatch.chdir(deep)

    env = project.run("env", "dev", "--json")
    taken = project.run("take", "dev", "--json")

    assert env.exit_code == 0, env.stderr
    assert json.loads(env.stdout)["env_file"] == str(project.path / ".env.local")
    assert taken.exit_code == 0, taken.stderr
    assert Path(json.loads(taken.stdout)["path"]).parent == project.path / "snapshots" / "dev"
    assert not (deep / "snapshots").exists()


def test_init_from_a_subfolder_writes_the_project_root(
    project: Project, make_db, monkeypatch: pytest.MonkeyPatch
) -> None:
    project.point("dev", make_db("empty"))
    deep = project.path / "web" / "pages"
    deep.mkdir(parents=True)
    monkeypatch.chdir(deep)

    written = project.run("init")
    again = project.run("init")
    taken = project.run("take", "dev")

    config = project.path / "snapshot.toml"
    assert written.exit_code == 0 and written.stdout.strip() == f"wrote {config}"
    assert again.exit_code == 2 and f"{config} already exists" in again.stderr
    assert taken.exit_code == 0, taken.stderr
    assert project.snapshots("dev") and not (deep / "snapshot.toml").exists()


def test_rollback_from_below_the_app_finds_the_backup_npm_made(
    project: Project, make_db, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sync through scripts/npm-db in the app, undone from the checkout inside it."""
    _dev, prod = setup_pair(project, make_db, dev_kind="empty")
    before = prod.fingerprint()
    synced = subprocess.run(
        [str(ROOT / "scripts" / "npm-db"), "sync:dev-prod", "--yes"],
        cwd=project.path,
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "PG_BIN"},
    )
    assert synced.returncode == 0, synced.stderr
    assert prod.fingerprint() != before
    checkout = project.path / "tools" / "snapshot"
    checkout.mkdir(parents=True)
    shutil.copy(ROOT / ".env.rehearsal-dev", checkout)  # a checkout's own files are no marker
    monkeypatch.chdir(checkout)

    result = project.run("rollback", "prod", "--yes")

    assert result.exit_code == 0, result.stderr
    assert prod.fingerprint() == before


@pytest.mark.fast
def test_not_found_errors_name_the_folder_searched(project: Project) -> None:
    env = project.run("take", "dev")
    backup = project.run("rollback", "prod", "--yes")
    project.env("dev", SUPABASE_DB_URL="postgresql://nobody@127.0.0.1:1/none")
    snapshot = project.run("apply", "prod", "--yes")

    assert env.exit_code == 2
    assert f"no snapshot.toml, .env.local or .env.production in {project.path}" in (
        one_error_line(env)
    )
    assert backup.exit_code == 2 and "no pre-apply backup of 'prod' in snapshots/prod" in (
        one_error_line(backup)
    )
    assert snapshot.exit_code == 2
    assert "there is no take snapshot of 'dev' in snapshots/dev" in one_error_line(snapshot)
