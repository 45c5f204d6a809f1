"""One database, one history: whatever name an apply ran under, rollback finds its backup."""

from __future__ import annotations

import json

from tests.fix_apps import setup_pair
from tests.fix_db import Database
from tests.fix_project import Project, unpublish


def _two_names_two_applies(project: Project, make_db) -> tuple[Database, dict, dict]:
    """prod and production reach one database; an apply under each, dev changed between.

    Returns prod, and its fingerprints before the first apply and after it.
    """
    dev, prod = setup_pair(project, make_db)
    project.env("production", SUPABASE_DB_URL=prod.app_url)
    before = prod.fingerprint()
    first = project.run("apply", "prod", "--yes")
    assert first.exit_code == 0, first.output
    after_first = prod.fingerprint()
    dev.execute("UPDATE public.categories SET name = name || ' (second)'")
    assert project.run("take", "dev").exit_code == 0
    second = project.run("apply", "production", "--from", "dev", "--yes")
    assert second.exit_code == 0, second.output
    assert prod.fingerprint() != after_first
    return prod, before, after_first


def test_rollback_restores_the_newest_backup_of_the_database_under_any_name(
    project: Project, make_db
) -> None:
    prod, _before, after_first = _two_names_two_applies(project, make_db)
    [newest] = project.snapshots("production")

    result = project.run("rollback", "prod", "--yes")

    assert result.exit_code == 0, result.output
    assert prod.fingerprint() == after_first  # one apply undone, not two
    assert f"rollback production/{newest.name} to prod" in result.stdout
    assert (
        f"production/{newest.name} is the newest backup of prod's database: prod and "
        "production are one database" in result.stderr
    )


def test_list_shows_which_names_are_one_database(project: Project, make_db) -> None:
    _two_names_two_applies(project, make_db)

    listed = project.run("list")
    document = json.loads(project.run("list", "--json").stdout)

    assert listed.exit_code == 0, listed.output
    assert "prod and production are one database (database snaptest_" in listed.stdout
    same = {entry["id"].split("/")[0]: entry["same_database_as"] for entry in document}
    assert same == {"dev": [], "prod": ["production"], "production": ["prod"]}


def test_a_newer_backup_of_an_unknown_database_is_refused_naming_both(
    project: Project, make_db
) -> None:
    prod, _before, _after_first = _two_names_two_applies(project, make_db)
    [older] = project.snapshots("prod")
    [newest] = project.snapshots("production")
    path = newest / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["database"]["system_identifier"] = None  # as a server that hides it writes
    manifest["project_ref"] = None
    path.write_text(json.dumps(manifest))
    current = prod.fingerprint()

    result = project.run("rollback", "prod", "--yes")

    assert result.exit_code == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"Error: cannot tell which backup to restore: production/{newest.name} is newer than "
        f"prod/{older.name}, but its manifest does not say which database it came from; pass "
        f"--to prod/{older.name} or --to production/{newest.name}"
    )
    assert prod.fingerprint() == current


def test_a_backup_left_unlisted_under_the_other_name_is_settled_and_restored(
    project: Project, make_db
) -> None:
    # The apply under production committed, then died before listing its backup.
    prod, _before, after_first = _two_names_two_applies(project, make_db)
    [newest] = project.snapshots("production")
    unpublish(newest)

    result = project.run("rollback", "prod", "--yes")

    assert result.exit_code == 0, result.output
    assert f"recovered backup production/{newest.name} of an apply that committed" in (
        result.stderr
    )
    assert prod.fingerprint() == after_first  # one apply undone, not two
