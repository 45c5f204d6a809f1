"""`snapshot rollback` says what it throws away: the rows written since the apply it undoes,
counted per table in its plan, prompt, dry run, JSON and report; an apply that wrote nothing
leaves no backup to roll back to."""

from __future__ import annotations

import json

from tests.fix_apps import apply, setup_pair
from tests.fix_db import SCOPE_TABLES, Database
from tests.fix_project import Project, at_a_terminal


def test_an_apply_that_writes_nothing_keeps_no_backup_and_rollback_undoes_the_one_before(
    project: Project, make_db
) -> None:
    _dev, prod = setup_pair(project, make_db)
    before = prod.fingerprint(SCOPE_TABLES)
    assert apply(project).exit_code == 0
    [backup] = project.snapshots("prod")
    applied = prod.fingerprint()

    again = apply(project)

    assert again.exit_code == 0, again.output
    assert "wrote nothing (prod already held its rows): no pre-apply backup was kept" in (
        again.stderr
    )
    assert "undo with" not in again.stdout
    assert project.snapshots("prod") == [backup]
    assert prod.fingerprint() == applied

    rolled = project.run("rollback", "prod", "--yes")

    assert rolled.exit_code == 0, rolled.output
    assert f"rollback prod/{backup.name} to prod" in rolled.stdout
    assert prod.fingerprint(SCOPE_TABLES) == before


def _preferences(db: Database) -> set[str]:
    return {str(r[0]) for r in db.execute("SELECT user_id FROM public.user_preferences")}


def _app_writes_since(prod: Database, held_before: set[str]) -> None:
    """After the apply, the app inserts an attempt, renames a category and drops a user's
    preferences (a row ``held_before`` the apply too)."""
    prod.execute(
        "INSERT INTO public.question_attempts (user_id, question_id, is_correct) "
        "SELECT u.id, q.id, true FROM public.users u, public.questions q LIMIT 1"
    )
    prod.execute("UPDATE public.categories SET name = name || ' (renamed)' WHERE id = 1")
    [user, *_] = sorted(_preferences(prod) & held_before)
    prod.execute("DELETE FROM public.user_preferences WHERE user_id = %s", [user])


def test_rollback_counts_the_rows_written_since_the_apply_before_it_throws_them_away(
    project: Project, make_db
) -> None:
    _dev, prod = setup_pair(project, make_db)
    before = prod.fingerprint(SCOPE_TABLES)
    held = _preferences(prod)
    assert apply(project).exit_code == 0
    _app_writes_since(prod, held)
    since = prod.fingerprint()

    dry = project.run("rollback", "prod", "--dry-run", "--json")
    checked = project.run("rollback", "prod", "--dry-run")
    asked = at_a_terminal(project, ["rollback", "prod"], "no\n")

    assert dry.exit_code == 0, dry.output
    assert prod.fingerprint() == since
    plan = json.loads(dry.stdout)
    assert plan["dry_run"] is True
    lost = {
        w["table"]: (w["inserted_since"], w["updated_since"], w["deleted_since"])
        for w in plan["written_since"]
        if w["inserted_since"] or w["updated_since"] or w["deleted_since"]
    }
    assert lost == {
        "public.categories": (0, 1, 0),
        "public.question_attempts": (1, 0, 0),
        "public.user_preferences": (0, 0, 1),
    }
    assert (
        "3 rows written since the apply this rollback undoes (by the app, or a later apply) "
        "will be thrown away: public.user_preferences: 1 deleted since (inserted again); "
        "public.categories: 1 written since (put back); public.question_attempts: 1 "
        "inserted since (deleted); only its pre-rollback backup keeps them"
    ) in checked.stderr
    assert "written since the apply, thrown away: public.question_attempts: 1 inserted" in (
        checked.stdout
    )
    assert asked.returncode == 1, asked.stderr
    assert "Type prod to roll prod back, throwing away the 3 rows written since the apply" in (
        asked.stderr
    )
    assert "written since the apply, thrown away: public.categories: 1 written since" in (
        asked.stderr
    )
    assert prod.fingerprint() == since

    rolled = project.run("rollback", "prod", "--yes")

    assert rolled.exit_code == 0, rolled.output
    assert "written since the apply, thrown away: public.user_preferences: 1 deleted" in (
        rolled.stdout
    )
    assert prod.fingerprint(SCOPE_TABLES) == before


def test_a_rollback_with_nothing_written_since_says_so(project: Project, make_db) -> None:
    setup_pair(project, make_db)
    assert apply(project).exit_code == 0

    dry = project.run("rollback", "prod", "--dry-run", "--json")

    assert dry.exit_code == 0, dry.output
    assert all(
        w["inserted_since"] + w["updated_since"] + w["deleted_since"] == 0
        for w in json.loads(dry.stdout)["written_since"]
    )


def test_after_a_full_apply_the_rows_it_wrote_are_its_own_not_written_since(
    project: Project, make_db
) -> None:
    # Every row a full apply wrote (every table replaced, in bulk) carries one of the ids
    # recorded beside its backup: none may be missed, or the rollback would count it as
    # written since and throw it away as the app's.
    setup_pair(project, make_db)
    assert apply(project, "--full").exit_code == 0

    dry = project.run("rollback", "prod", "--dry-run", "--json")

    assert dry.exit_code == 0, dry.output
    counted = json.loads(dry.stdout)["written_since"]
    assert counted
    assert all(w["inserted_since"] + w["updated_since"] + w["deleted_since"] == 0 for w in counted)
