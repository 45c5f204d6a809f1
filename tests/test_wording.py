"""What the tool says reads right: counts agree with their nouns, progress with the tables,
prompts with what typing the name agrees to; and a cancelled apply leaves no trace."""

from __future__ import annotations

import re

from tests.fix_apps import NEW_USER, prod_snapshot, setup_pair
from tests.fix_project import Project, at_a_terminal


def test_one_of_a_thing_is_singular(project: Project, make_db) -> None:
    dev, prod = make_db("dev"), make_db("dev")
    prod.execute(
        "INSERT INTO auth.users (id, email) VALUES (%s, 'person@prod.example')", [NEW_USER]
    )
    prod_snapshot(project, dev, prod)

    checked = project.run("check", "dev", "--from", "prod", "--unmasked")

    assert checked.exit_code == 1
    flat = " ".join(checked.stdout.split())
    assert "1 snapshot row of public.users points at auth.users rows" in flat
    assert re.search(r"to dev: not ready \(1 error, 1 warning\)$", checked.stdout.strip())
    assert "1 file matches its sha256" in flat
    assert "preflight found 1 error:" in checked.stderr


def test_take_counts_tables_and_rows_as_the_table_does(project: Project, make_db) -> None:
    project.point("dev", make_db("dev"))

    taken = project.run("take", "dev")

    assert taken.exit_code == 0, taken.output
    assert "taking dev: 16 tables and auth users/identities from " in taken.stderr
    lines = {ln.split()[0]: ln for ln in taken.stderr.splitlines() if ln.startswith("  ")}
    assert re.search(r"\s1,000 rows\s+\d+ ms$", lines["public.questions"])
    assert re.search(r"\s10,000 rows\s+\d+(\.\d)? m?s$", lines["public.question_attempts"])
    assert all(not ln.endswith(" 0.0 s") for ln in lines.values())
    assert re.search(r"\(26,758 rows\)$", taken.stderr.strip().splitlines()[-1])


def test_a_cancelled_apply_leaves_no_folder_and_rollback_asks_in_words(
    project: Project, make_db
) -> None:
    setup_pair(project, make_db)

    asked = at_a_terminal(project, ["apply", "prod"], "no\n")

    assert asked.returncode == 1, asked.stderr
    assert "Type prod to apply dev's snapshot to prod: " in asked.stderr
    assert "apply to prod cancelled: nothing was changed" in asked.stderr
    assert not (project.path / "snapshots" / "prod").exists()

    assert project.run("apply", "prod", "--yes").exit_code == 0
    asked = at_a_terminal(project, ["rollback", "prod"], "no\n")

    assert asked.returncode == 1, asked.stderr
    assert "Type prod to roll prod back: " in asked.stderr
    assert "rollback to prod cancelled: nothing was changed" in asked.stderr
