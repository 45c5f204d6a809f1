"""Upgrading: snapshots an older version wrote, still in the archive, apply and roll back.

The fixture was written by commit 9da5539 (tests/fixtures/README.md): md5 checksums, no
``source_safe``, the manifest as it was then.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tests.fix_project import Project

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "archive-9da5539"
SNAPSHOT_ID = "dev/20261207T003855Z-upgrade-fixture"
SCOPE = ("users", "categories", "subcategories", "topics", "topic_edges")
TABLES = (*(f"public.{t}" for t in SCOPE), "auth.users", "auth.identities")
CONFIG = f"""
[scope]
tables = {json.dumps(list(SCOPE))}
auth_users = true
"""


def older_archive(project: Project) -> dict:
    """The fixture's archive as the project's own; its manifest."""
    shutil.copytree(FIXTURE, project.path / "snapshots")
    for path in (project.path / "snapshots").rglob("*"):
        path.chmod(0o700 if path.is_dir() else 0o600)
    project.config(CONFIG)
    return json.loads((project.path / "snapshots" / SNAPSHOT_ID / "manifest.json").read_text())


def test_a_snapshot_written_by_an_older_version_applies_and_rolls_back(
    project: Project, make_db
) -> None:
    manifest = older_archive(project)
    assert manifest["tables"][0]["checksum"].isalnum()  # md5-based: before the "h2:" checksums
    assert "source_safe" not in manifest
    dev, prod = make_db("dev"), make_db("empty")  # prod: the app's schema, no rows yet
    project.point("dev", dev)
    project.point("prod", prod)
    before = prod.fingerprint(TABLES)

    listed = project.run("list", "--json")
    assert listed.exit_code == 0, listed.stderr
    assert [s["id"] for s in json.loads(listed.stdout)] == [SNAPSHOT_ID]

    checked = project.run("check", "prod", "--json")
    assert checked.exit_code == 0, checked.stdout

    applied = project.run("apply", "prod", "--yes", "--json")
    assert applied.exit_code == 0, applied.stdout + applied.stderr
    counts = {f"{t['schema']}.{t['name']}": t["rows"] for t in manifest["tables"]}
    after = prod.fingerprint(TABLES)
    for table in TABLES[: len(SCOPE)]:
        assert after[table][0] == counts[table], table
    assert after != before

    rolled_back = project.run("rollback", "prod", "--yes", "--json")
    assert rolled_back.exit_code == 0, rolled_back.stdout + rolled_back.stderr
    restored = prod.fingerprint(TABLES)
    # Auth users the apply created stay (auth users are never deleted); the rest is as before.
    assert {t: v for t, v in restored.items() if not t.startswith("auth.")} == {
        t: v for t, v in before.items() if not t.startswith("auth.")
    }


def test_an_older_snapshot_is_listed_as_whole_not_damaged(project: Project, make_db) -> None:
    older_archive(project)
    project.point("dev", make_db("empty"))

    result = project.run("list")

    assert result.exit_code == 0, result.stderr
    assert SNAPSHOT_ID in result.stdout and "damaged" not in result.output
