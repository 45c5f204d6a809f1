"""What the tool says reads right: counts agree with their nouns, progress with the tables,
prompts with what typing the name agrees to; and a cancelled apply leaves no trace."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from snapshot import text
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


# --- the small parts of sentences: no database needed ----------------------------------------


@pytest.mark.fast
@pytest.mark.parametrize(
    ("n", "noun", "plural", "said"),
    [
        (1, "row", None, "1 row"),
        (0, "row", None, "0 rows"),
        (26758, "row", None, "26,758 rows"),
        (1, "identity", "identities", "1 identity"),
        (2, "identity", "identities", "2 identities"),
    ],
)
def test_a_count_agrees_with_its_noun(n: int, noun: str, plural: str | None, said: str) -> None:
    assert text.count(n, noun, plural) == said


@pytest.mark.fast
@pytest.mark.parametrize(
    ("seconds", "said"), [(0.0123, "12 ms"), (0.9, "900 ms"), (1.0, "1.0 s"), (3.44, "3.4 s")]
)
def test_a_duration_reads_in_the_unit_people_use(seconds: float, said: str) -> None:
    assert text.duration(seconds) == said


@pytest.mark.fast
def test_a_path_is_shown_as_typed_from_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)

    assert text.display_path(tmp_path / "snapshots" / "prod") == "snapshots/prod"
    assert text.display_path(tmp_path.parent) == str(tmp_path.parent)
