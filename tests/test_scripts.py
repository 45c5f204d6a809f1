"""scripts/: the wrappers a Node project calls from package.json in place of the old npm commands."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from tests.fix_apps import apply, setup_pair
from tests.fix_db import ROOT, SCOPE_TABLES
from tests.fix_project import Project

NPM_DB = ROOT / "scripts" / "npm-db"


def npm_db(project: Project, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(NPM_DB), *args], cwd=project.path, capture_output=True, text=True, check=False
    )


def test_npm_sync_verify_and_smoke_run_in_the_callers_folder(project: Project, make_db) -> None:
    dev, prod = make_db("dev"), make_db("prod")
    project.point("dev", dev)
    project.point("prod", prod)

    differs = npm_db(project, "verify:dev-prod")
    synced = npm_db(project, "sync:dev-prod", "--yes")
    verified = npm_db(project, "verify:dev-prod")
    smoked = npm_db(project, "smoke:guardrail:prod")

    assert differs.returncode == 1 and "Error: prod differs from dev" in differs.stderr
    assert synced.returncode == 0, synced.stderr[-2000:]
    assert "16/16 tables match; committed" in synced.stdout
    assert [p.name.endswith("-sync") for p in project.snapshots("dev")] == [True]
    assert verified.returncode == 0 and "verify dev prod: 16/16 tables match" in verified.stdout
    assert smoked.returncode == 0 and "smoke prod: 3/3 guardrails hold" in smoked.stdout
    assert prod.fingerprint(SCOPE_TABLES) == dev.fingerprint(SCOPE_TABLES)


@pytest.mark.fast
def test_npm_db_names_the_commands_it_knows(project: Project) -> None:
    result = npm_db(project, "db:push")

    assert result.returncode == 2
    assert result.stderr.startswith("npm-db: unknown command 'db:push': use sync:dev-prod")


def test_a_sql_folder_with_only_smoke_checks_keeps_the_bundled_pre_and_post(
    project: Project, make_db
) -> None:
    dev, prod = setup_pair(project, make_db)
    shutil.copytree(ROOT / "sql" / "smoke", project.path / "sql" / "smoke")

    checked = project.run("check", "prod", "--json")
    applied = apply(project)
    smoked = project.run("smoke", "prod")

    assert checked.exit_code == 0, checked.output
    [detail] = [
        f["detail"] for f in json.loads(checked.stdout)["findings"] if f["check"] == "scripts"
    ]
    assert "pre: 010_questions_to_draft.sql (bundled)" in detail
    assert "post: 010_restore_question_status.sql (bundled)" in detail
    assert "smoke: 010_publish_without_topic_links.sql" in detail and "(sql/smoke)" in detail
    assert applied.exit_code == 0, applied.output  # the guardrails let the apply through
    assert prod.fingerprint(SCOPE_TABLES) == dev.fingerprint(SCOPE_TABLES)
    assert smoked.exit_code == 0, smoked.output


def test_npm_sync_json_is_one_document(project: Project, make_db) -> None:
    dev, prod = make_db("empty"), make_db("empty")
    project.point("dev", dev)
    project.point("prod", prod)

    synced = subprocess.run(
        [str(ROOT / "scripts" / "npm-db"), "sync:dev-prod", "--json", "--yes"],
        cwd=project.path,
        capture_output=True,
        text=True,
    )

    assert synced.returncode == 0, synced.stderr
    document = json.loads(synced.stdout)
    assert document["take"]["environment"] == "dev"
    assert document["apply"]["committed"] is True and "error" not in document


def test_npm_refusal_without_a_terminal_never_advises_marking_prod_safe(
    project: Project, make_db
) -> None:
    setup_pair(project, make_db, dev_kind="empty")

    refused = subprocess.run(
        [str(ROOT / "scripts" / "npm-db"), "sync:dev-prod"],
        cwd=project.path,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "npm_lifecycle_event": "db:sync:dev-prod"},
    )

    assert refused.returncode == 2
    assert "npm run db:sync:dev-prod -- --yes" in refused.stderr
    assert "safe" not in refused.stderr
