"""A new user's first five minutes, as on a fresh machine: an empty folder holding only an
app's env files, one install command (this checkout, as `pip install` of a local path would
get it from the package index), then `snapshot init`, `snapshot env dev`, `snapshot take dev`,
and the old npm commands through `snapshot-npm-db`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from snapshot import DISTRIBUTION
from tests.fix_project import Project

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(900)
def test_one_install_command_then_init_env_take_in_an_empty_app_folder(
    project: Project, make_db, tmp_path_factory: pytest.TempPathFactory
) -> None:
    dev, prod = make_db("dev"), make_db("dev")  # prod: equal to dev, so verify passes
    app = project.path
    project.point("dev", dev)
    project.point("prod", prod)
    assert sorted(p.name for p in app.iterdir()) == [".env.local", ".env.production"]

    venv = tmp_path_factory.mktemp("fresh") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    index = subprocess.run(  # the install needs the package index (build backend, dependencies)
        [str(venv / "bin" / "pip"), "index", "versions", "sh"],
        capture_output=True,
        text=True,
    )
    if index.returncode != 0:
        pytest.skip("the package index is unreachable (no network): nothing to install from")
    # What a user would type, with a local path in place of the published name.
    installed = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "--quiet", f"{ROOT}[rehearse]"],
        capture_output=True,
        text=True,
    )
    assert installed.returncode == 0, installed.stderr
    shown = subprocess.run(
        [str(venv / "bin" / "pip"), "show", DISTRIBUTION], capture_output=True, text=True
    )
    assert shown.returncode == 0 and f"Name: {DISTRIBUTION}" in shown.stdout

    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SNAPSHOT_", "PG", "VIRTUAL_ENV", "PYTHON"))
    }
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}/usr/bin{os.pathsep}/bin"

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [str(venv / "bin" / args[0]), *args[1:]],
            cwd=app,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert "Traceback" not in done.stderr, done.stderr
        return done

    inited = run("snapshot", "init")
    assert inited.returncode == 0, inited.stderr
    assert "wrote" in inited.stdout and (app / "snapshot.toml").is_file()

    reached = run("snapshot", "env", "dev")
    assert reached.returncode == 0, reached.stderr
    assert "yes: PostgreSQL" in reached.stdout

    taken = run("snapshot", "take", "dev", "--json")
    assert taken.returncode == 0, taken.stderr
    archived = json.loads(taken.stdout)
    assert archived["environment"] == "dev" and not archived.get("error")
    assert len(project.snapshots("dev")) == 1

    # The old npm commands come with the install, as snapshot-npm-db.
    verified = run("snapshot-npm-db", "verify:dev-prod")
    assert verified.returncode == 0, verified.stderr
