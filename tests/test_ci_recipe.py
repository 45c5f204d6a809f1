"""The CI recipe in docs/ci/ works: its own steps, run as GitHub would run them, locally.

Everything but the install (the test runs the snapshot it tests) and the actions (checkout,
upload) runs as written, with the secrets pointing at two local databases.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

from tests.fix_db import SCOPE_TABLES
from tests.fix_project import Project

ROOT = Path(__file__).resolve().parent.parent
WORKFLOW = ROOT / "docs" / "ci" / "snapshot-to-staging.yml"


def steps() -> list[dict]:
    [job] = yaml.safe_load(WORKFLOW.read_text())["jobs"].values()
    return job["steps"]


def test_the_workflow_takes_dev_applies_to_staging_and_keeps_the_reports(
    project: Project, make_db
) -> None:
    dev, staging = make_db("dev"), make_db("prod")
    secrets = {"SNAPSHOT_DEV_DB_URL": dev.app_url, "SNAPSHOT_STAGING_DB_URL": staging.app_url}
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    ran = []
    for step in steps():
        if "run" not in step or step["name"] == "Install snapshot":
            continue
        step_env = {
            k: re.sub(r"\$\{\{ secrets\.(\w+) \}\}", lambda m: secrets[m.group(1)], v)
            for k, v in step.get("env", {}).items()
        }
        # GitHub's bash: bash --noprofile --norc -eo pipefail {0}
        done = subprocess.run(
            ["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", step["run"]],
            cwd=project.path,
            env={**env, **step_env},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, (step["name"], done.stderr)
        assert dev.app_url not in done.stderr + done.stdout  # no secret in the log
        ran.append(step["name"])

    assert ran == [
        "Env files from secrets",
        "Take dev",
        "Apply to staging",
        "Compare dev and staging",
    ]
    upload = steps()[-1]
    assert upload["uses"].startswith("actions/upload-artifact") and upload["if"] == "always()"
    reports = sorted(p.name for p in project.path.glob(upload["with"]["path"]))
    assert reports == ["apply-report.json", "take-report.json", "verify-report.json"]
    applied = json.loads((project.path / "apply-report.json").read_text())
    assert not applied.get("error")
    assert staging.fingerprint(SCOPE_TABLES) == dev.fingerprint(SCOPE_TABLES)
    assert (project.path / ".env.staging").stat().st_mode & 0o077 == 0
