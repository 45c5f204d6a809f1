"""The delta apply ends where a full replace ends, on the cases that make deltas hard.

Each case starts from a prod equal to dev, changes dev, and applies the new snapshot twice:
as a delta to one copy of prod and with ``--full`` to another. Both must equal dev, row for
row; where a table's delta cannot be applied cleanly the report says it was replaced in full.
"""

from __future__ import annotations

import json

import pytest

from tests.fix_apps import TEAMS_CONFIG, TEAMS_SCOPE, take_teams_dev, teams_db
from tests.fix_db import Database
from tests.fix_project import Project


def team(i: int) -> str:
    return f"md5('team{i}')::uuid"


# case: (dev changes, tables the delta must replace in full because it cannot apply cleanly)
CASES: dict[str, tuple[str, set[str]]] = {
    "child re-pointed to a new parent": (
        f"INSERT INTO public.\"Team\" VALUES ({team(7)}, 'team-7', '{{}}');"
        f'UPDATE public.node SET "teamId" = {team(7)} WHERE id IN (5, 6);',
        set(),
    ),
    "parent removed, its children kept under another": (
        f'UPDATE public.node SET "teamId" = {team(1)} WHERE "teamId" = {team(2)};'
        f'UPDATE public.member SET "teamId" = {team(1)}, rank = rank + 1000 '
        f'WHERE "teamId" = {team(2)};'
        f'DELETE FROM public."Team" WHERE id = {team(2)};',
        set(),
    ),
    "unique keys swapped between rows": (
        f"UPDATE public.\"Team\" SET slug = 'moving' WHERE id = {team(3)};"
        f"UPDATE public.\"Team\" SET slug = 'team-3' WHERE id = {team(4)};"
        f"UPDATE public.\"Team\" SET slug = 'team-4' WHERE id = {team(3)};",
        set(),  # moved aside first (snapshot.apply.swaps): a delta still
    ),
    "unique keys rotated among rows and taken by a new row": (
        f"UPDATE public.\"Team\" SET slug = 'moving' WHERE id = {team(1)};"
        f"UPDATE public.\"Team\" SET slug = 'team-1' WHERE id = {team(2)};"
        f"UPDATE public.\"Team\" SET slug = 'team-2' WHERE id = {team(6)};"
        f"UPDATE public.\"Team\" SET slug = 'team-6' WHERE id = {team(1)};"
        f'UPDATE public.member SET rank = rank + 100 WHERE "teamId" = {team(3)};'
        f'UPDATE public.member SET rank = rank - 94 WHERE "teamId" = {team(3)};'
        f"UPDATE public.\"Team\" SET slug = 'team-5-old' WHERE id = {team(5)};"
        "INSERT INTO public.\"Team\" VALUES (md5('team8')::uuid, 'team-5', '{}');",
        set(),
    ),
    "self-referencing tree re-parented": (
        "INSERT INTO public.node VALUES (41, NULL, md5('team1')::uuid, 'new root');"
        "UPDATE public.node SET parent_id = 41 WHERE id IN (1, 2, 3);"
        "UPDATE public.node SET parent_id = 2 WHERE id BETWEEN 10 AND 20;"
        "DELETE FROM public.node WHERE id = 40;",
        set(),
    ),
    "cascade parent removed with its children": (
        f'DELETE FROM public."Team" WHERE id = {team(5)};',  # cascades to members in dev too
        set(),
    ),
    "table without a key": (
        "DELETE FROM public.event_log WHERE note LIKE 'event 1%';"
        "INSERT INTO public.event_log VALUES ('event new', '{\"new\": true}');",
        {"public.event_log"},
    ),
    "json values edited": (
        f'UPDATE public."Team" SET meta = \'{{"n": 1, "edited": [1, 2]}}\' WHERE id = {team(1)};'
        "UPDATE public.event_log SET payload = '{\"i\":  3}' WHERE note = 'event 3';",
        {"public.event_log"},
    ),
    "trigger rewrites rows on update": (
        # edited twice in dev (edits = 2); writing the row once in prod would make edits 1,
        # but what the trigger writes does not stay: the delta ends with the snapshot's 2
        "UPDATE public.stamped SET body = body || ' (edited)' WHERE id <= 5;"
        "UPDATE public.stamped SET body = body || '!' WHERE id <= 5;",
        set(),
    ),
}


def _apply(project: Project, prod: Database, *args: str):
    project.point("prod", prod)
    return project.run("apply", "prod", "--yes", *args)


@pytest.mark.parametrize("case", CASES)
def test_a_delta_ends_where_a_full_replace_ends(project: Project, make_db, case: str) -> None:
    changes, replaced = CASES[case]
    dev, by_delta, by_full = teams_db(make_db), teams_db(make_db), teams_db(make_db)
    by_bulk = teams_db(make_db)
    dev.execute(changes)
    take_teams_dev(project, dev)

    delta = _apply(project, by_delta, "--json")
    full = _apply(project, by_full, "--full")
    bulk = _apply(project, by_bulk, "--block-readers")

    assert delta.exit_code == 0, delta.output
    assert full.exit_code == 0, full.output
    assert bulk.exit_code == 0, bulk.output
    assert "--block-readers: 3 foreign keys were checked in bulk" in " ".join(
        bulk.output.split()
    ), bulk.output
    expected = dev.fingerprint(TEAMS_SCOPE)
    assert by_delta.fingerprint(TEAMS_SCOPE) == expected
    assert by_full.fingerprint(TEAMS_SCOPE) == expected
    assert by_bulk.fingerprint(TEAMS_SCOPE) == expected
    assert _foreign_keys(by_bulk) == _foreign_keys(by_full)  # added back exactly
    changes = json.loads(delta.stdout)["changes"]
    modes = {t["table"]: t["mode"] for t in changes}
    assert replaced <= {t for t, mode in modes.items() if mode == "full"}, modes
    assert "delta" in modes.values(), "the tables the change does not reach stay deltas"
    for table in replaced:
        [reason] = [t["reason"] for t in changes if t["table"] == table]
        assert reason, f"{table} is replaced in full without saying why"


def test_an_unchanged_snapshot_writes_nothing(project: Project, make_db) -> None:
    dev, prod = teams_db(make_db), teams_db(make_db)
    take_teams_dev(project, dev)
    before = prod.fingerprint(TEAMS_SCOPE)
    versions = "SELECT ctid::text, xmin::text FROM {} ORDER BY 1"
    xmins = {t: prod.execute(versions.format(t)) for t in ("public.node", "public.event_log")}

    result = _apply(project, prod, "--json")

    assert result.exit_code == 0, result.output
    changes = json.loads(result.stdout)["changes"]
    # the table without a key holds the snapshot's rows already: it is not rewritten either
    assert {t["table"]: t["mode"] for t in changes} == dict.fromkeys(TEAMS_SCOPE, "delta")
    assert [(t["insert"], t["update"], t["delete"]) for t in changes] == [(0, 0, 0)] * 5
    assert {t: prod.execute(versions.format(t)) for t in xmins} == xmins
    assert prod.fingerprint(TEAMS_SCOPE) == before
    # An apply that wrote nothing keeps no backup to roll back to.
    assert project.snapshots("prod") == []
    assert "this apply wrote nothing" in " ".join(result.stderr.split())


def _foreign_keys(db: Database) -> list[tuple[str, str, str]]:
    return db.execute(
        "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) FROM pg_constraint "
        "WHERE contype = 'f' ORDER BY 1, 2"
    )


# A pre-script's trigger moves a member to no team while the foreign keys are dropped (a
# trigger's write to a key that an action moves stays: see snapshot.apply.keepers).
ORPHAN = """
CREATE FUNCTION public.orphan_member() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  UPDATE public.member SET "teamId" = '00000000-0000-0000-0000-000000000000'
  WHERE id = (SELECT min(id) FROM public.member);
  RETURN NEW;
END $$;
CREATE TRIGGER orphan_member AFTER INSERT ON public.node
  FOR EACH ROW EXECUTE FUNCTION public.orphan_member();
"""


def test_a_row_breaking_a_foreign_key_fails_the_bulk_check_and_changes_nothing(
    project: Project, make_db
) -> None:
    dev, prod = teams_db(make_db), teams_db(make_db)
    dev.execute(CASES["self-referencing tree re-parented"][0])  # inserts a node
    project.point("dev", dev)
    project.config(TEAMS_CONFIG)
    (project.path / "sql" / "pre").mkdir(parents=True)
    (project.path / "sql" / "post").mkdir(parents=True)
    (project.path / "sql" / "pre" / "010_orphan.sql").write_text(ORPHAN)
    assert project.run("take", "dev").exit_code == 0
    before, keys = prod.fingerprint(TEAMS_SCOPE), _foreign_keys(prod)

    result = _apply(project, prod, "--block-readers")

    assert result.exit_code == 1, result.output
    line = " ".join(result.stderr.split())
    assert "while checking foreign keys in bulk" in line
    assert "member" in line and "rolled back, prod is unchanged" in line
    assert prod.fingerprint(TEAMS_SCOPE) == before
    assert _foreign_keys(prod) == keys
    assert prod.execute("SELECT count(*) FROM pg_trigger WHERE tgname = 'orphan_member'") == [(0,)]
