"""Rows that trade unique values apply as a delta: swaps, chains, cycles, a composite key,
a key referenced by another table's foreign key, an inserted row taking a value another
row gives up; with an ``updated_at`` trigger and rows outside the scope referring in.

Every case starts from a prod equal to dev, changes dev the way an app would (through a
temporary value), and applies: the tables stay deltas, only the rows that differ get a new
row version, prod ends equal to dev, outside rows are untouched, and a rollback gives back
prod's rows exactly.
"""

from __future__ import annotations

import json

import pytest

from tests.fix_apps import plain_app_pair
from tests.fix_db import Database
from tests.fix_project import Project

SCOPE = ["public.team", "public.item"]
OUTSIDE = ["public.visit"]


def _schema(rule: str) -> str:
    return f"""
SET ROLE app_owner;
CREATE FUNCTION public.touch() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN NEW.updated_at := now(); RETURN NEW; END $$;
CREATE FUNCTION public.guard_item() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF NEW.label = 'FORBIDDEN' THEN RAISE EXCEPTION 'guardrail: item % refused', NEW.id; END IF;
  RETURN NEW;
END $$;
CREATE TABLE public.team (
    id int PRIMARY KEY, slug text NOT NULL UNIQUE, name text NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now());
CREATE TRIGGER team_touch BEFORE UPDATE ON public.team
    FOR EACH ROW EXECUTE FUNCTION public.touch();
CREATE TABLE public.item (
    id int PRIMARY KEY,
    team_slug text NOT NULL REFERENCES public.team (slug) ON UPDATE CASCADE,
    pos int NOT NULL CHECK (pos > 0), label text NOT NULL,
    UNIQUE (team_slug, pos));
CREATE TRIGGER item_guard BEFORE INSERT OR UPDATE ON public.item
    FOR EACH ROW EXECUTE FUNCTION public.guard_item();
CREATE TABLE public.visit (
    id int PRIMARY KEY, team_id int NOT NULL REFERENCES public.team ON DELETE {rule},
    at text NOT NULL);
RESET ROLE;
"""


def _config(checks: str) -> str:
    return (
        "[scope]\ntables = ['public.team', 'public.item']\nauth_users = false\n\n"
        f"[apply]\ninsert_as = {{}}\nforeign_key_checks = '{checks}'\n"
    )


def _filler(rule: str):
    def fill(db: Database, variant: str, size: int) -> None:
        db.execute(_schema(rule))
        with db.connect() as conn:  # the same rows on both sides, written as of old
            conn.execute("SET session_replication_role = replica")
            conn.execute(
                "INSERT INTO public.team SELECT i, 'team-' || i, 'Team ' || i, "
                "'2025-01-01'::timestamptz + i * interval '1 day' FROM generate_series(1, 30) i"
            )
            conn.execute(
                "INSERT INTO public.item SELECT 10 * t + p, 'team-' || t, p, 'item ' || p "
                "FROM generate_series(1, 30) t, generate_series(1, 4) p"
            )

    return fill


# What dev does, as its app would: through temporary values, its triggers on.
CHANGES = {
    "swap": "UPDATE public.team SET slug = 'moving' WHERE id = 3;"
    "UPDATE public.team SET slug = 'team-3' WHERE id = 4;"
    "UPDATE public.team SET slug = 'team-4' WHERE id = 3;",
    "chain": "UPDATE public.team SET slug = 'team-6b' WHERE id = 6;"
    "UPDATE public.team SET slug = 'team-6' WHERE id = 5;",
    "cycle": "UPDATE public.team SET slug = 'moving' WHERE id = 7;"
    "UPDATE public.team SET slug = 'team-7' WHERE id = 8;"
    "UPDATE public.team SET slug = 'team-8' WHERE id = 9;"
    "UPDATE public.team SET slug = 'team-9' WHERE id = 7;",
    "composite rotated": "UPDATE public.item SET pos = pos + 100 WHERE team_slug = 'team-1';"
    "UPDATE public.item SET pos = CASE pos WHEN 101 THEN 2 WHEN 102 THEN 3 WHEN 103 THEN 1 "
    "ELSE 4 END WHERE team_slug = 'team-1';",
    "insert takes a deleted row's value": "UPDATE public.item SET team_slug = 'team-11', "
    "pos = pos + 4 WHERE team_slug = 'team-10';"
    "DELETE FROM public.team WHERE id = 10;"
    "INSERT INTO public.team VALUES (31, 'team-10', 'Team 31');",
    "insert takes an updated row's value": "UPDATE public.team SET slug = 'team-12-old' "
    "WHERE id = 12; INSERT INTO public.team VALUES (32, 'team-12', 'Team 32');",
    "plain edits": "UPDATE public.team SET name = name || ' (edited)' WHERE id BETWEEN 20 AND 24;",
}


def _differing(dev: Database, prod: Database, table: str) -> set[int]:
    """Keys whose rows differ between dev and prod (the oracle: row text by key)."""
    rows = {db: dict(db.execute(f"SELECT id, t::text FROM {table} t")) for db in (dev, prod)}
    keys = set(rows[dev]) | set(rows[prod])
    return {k for k in keys if rows[dev].get(k) != rows[prod].get(k)}


def _versions(db: Database, table: str) -> dict[int, str]:
    return dict(db.execute(f"SELECT id, xmin::text FROM {table}"))


def _rewritten(before: dict[int, str], after: dict[int, str]) -> set[int]:
    """Keys given a new row version, inserted or deleted."""
    return {k for k in set(before) | set(after) if before.get(k) != after.get(k)}


def _pair(project: Project, make_db, rule: str, checks: str) -> tuple[Database, Database]:
    dev, prod = plain_app_pair(project, make_db, _filler(rule), _config(checks))
    prod.execute("INSERT INTO public.visit SELECT i, i, 'visit ' || i FROM generate_series(1, 9) i")
    prod.execute(
        "INSERT INTO public.visit SELECT 100 + i, i, 'again' FROM generate_series(11, 30) i"
    )
    return dev, prod


@pytest.mark.parametrize("checks", ["per-row", "bulk"])
@pytest.mark.parametrize("rule", ["NO ACTION", "RESTRICT", "CASCADE"])
def test_rows_trading_unique_values_apply_as_a_delta_writing_only_them(
    project: Project, make_db, rule: str, checks: str
) -> None:
    dev, prod = _pair(project, make_db, rule, checks)
    dev.execute("".join(CHANGES.values()))
    assert project.run("take", "dev").exit_code == 0
    before, outside = prod.fingerprint(SCOPE), prod.fingerprint(OUTSIDE)
    differing = {t: _differing(dev, prod, t) for t in SCOPE}
    versions = {t: _versions(prod, t) for t in SCOPE}

    checked = project.run("check", "prod", "--json")
    applied = project.run("apply", "prod", "--yes", "--json")

    assert checked.exit_code == 0, checked.output
    assert applied.exit_code == 0, applied.output
    assert "tried first" not in applied.output, applied.stderr
    # Row by row the removed team waits for its items to move (and holds its slug until
    # then), and items follow their team's slug (ON UPDATE CASCADE); in bulk neither.
    teams, items = (7, 3) if checks == "per-row" else (6, 27)
    assert f"public.team: {teams} rows hold unique values other rows take" in applied.stderr
    assert f"public.item: {items} rows hold unique values other rows take" in applied.stderr
    report = json.loads(applied.stdout)
    changes = {t["table"]: t for t in report["changes"]}
    assert {t: c["mode"] for t, c in changes.items()} == dict.fromkeys(SCOPE, "delta")
    # updated_at, rewritten by the app's trigger on every write, counted once a row
    [touched] = report["trigger_rewrites"]
    assert (touched["table"], touched["triggers"]) == ("public.team", ["team_touch"])
    assert touched["rows"] == changes["public.team"]["update"]
    for table in SCOPE:
        counts = changes[table]
        assert counts["insert"] + counts["update"] + counts["delete"] == len(differing[table])
        assert _rewritten(versions[table], _versions(prod, table)) == differing[table], table
    assert prod.fingerprint(SCOPE) == dev.fingerprint(SCOPE)
    assert prod.fingerprint(OUTSIDE) == outside

    rolled = project.run("rollback", "prod", "--yes")
    assert rolled.exit_code == 0, rolled.output
    assert prod.fingerprint(SCOPE) == before
    assert prod.fingerprint(OUTSIDE) == outside
    again = project.run("apply", "prod", "--yes", "--json")
    assert again.exit_code == 0, again.output
    assert prod.fingerprint(SCOPE) == dev.fingerprint(SCOPE)


@pytest.mark.parametrize("case", [c for c in CHANGES if c != "plain edits"])
def test_each_kind_of_trade_alone_is_a_delta(project: Project, make_db, case: str) -> None:
    dev, prod = _pair(project, make_db, "NO ACTION", "per-row")
    dev.execute(CHANGES[case])
    assert project.run("take", "dev").exit_code == 0
    differing = {t: _differing(dev, prod, t) for t in SCOPE}
    versions = {t: _versions(prod, t) for t in SCOPE}

    applied = project.run("apply", "prod", "--yes", "--json")

    assert applied.exit_code == 0, applied.output
    assert "tried first" not in applied.output, applied.stderr
    modes = {t["table"]: t["mode"] for t in json.loads(applied.stdout)["changes"]}
    assert modes == dict.fromkeys(SCOPE, "delta")
    for table in SCOPE:
        assert _rewritten(versions[table], _versions(prod, table)) == differing[table], table
    assert prod.fingerprint(SCOPE) == dev.fingerprint(SCOPE)


@pytest.mark.parametrize("checks", ["per-row", "bulk"])
def test_a_failure_after_the_values_moved_leaves_prod_unchanged(
    project: Project, make_db, checks: str
) -> None:
    dev, prod = _pair(project, make_db, "NO ACTION", checks)
    dev.execute(CHANGES["swap"] + CHANGES["cycle"])
    with dev.connect() as conn:  # a row prod's guardrail refuses, written after the swaps
        conn.execute("SET session_replication_role = replica")
        conn.execute("UPDATE public.item SET label = 'FORBIDDEN' WHERE id = 301")
    assert project.run("take", "dev").exit_code == 0
    before = prod.fingerprint([*SCOPE, *OUTSIDE])

    applied = project.run("apply", "prod", "--yes")

    assert applied.exit_code == 1, applied.output
    assert "guardrail: item 301 refused" in applied.stderr
    assert prod.fingerprint([*SCOPE, *OUTSIDE]) == before


def test_a_full_replace_holding_rows_for_outside_references_trades_their_values_too(
    project: Project, make_db
) -> None:
    # --full, row by row: the teams visits refer to stay in place and are updated, so the
    # swap, chain and cycle among them are trades between rows held in place.
    dev, prod = _pair(project, make_db, "RESTRICT", "per-row")
    dev.execute("".join(CHANGES.values()))
    assert project.run("take", "dev").exit_code == 0
    before, outside = prod.fingerprint(SCOPE), prod.fingerprint(OUTSIDE)

    applied = project.run("apply", "prod", "--yes", "--full", "--json")

    assert applied.exit_code == 0, applied.output
    assert "public.team: 6 rows hold unique values other rows take" in applied.stderr
    assert {t["mode"] for t in json.loads(applied.stdout)["changes"]} == {"full"}
    assert prod.fingerprint(SCOPE) == dev.fingerprint(SCOPE)
    assert prod.fingerprint(OUTSIDE) == outside
    rolled = project.run("rollback", "prod", "--yes")
    assert rolled.exit_code == 0, rolled.output
    assert prod.fingerprint(SCOPE) == before


def test_keys_on_an_expression_and_on_a_nullable_column_trade_values_as_a_delta(
    project: Project, make_db
) -> None:
    dev, prod = _pair(project, make_db, "NO ACTION", "per-row")
    for db in (dev, prod):
        with db.connect() as conn:  # the same on both sides: updated_at as it was
            conn.execute("SET session_replication_role = replica")
            conn.execute(
                "CREATE UNIQUE INDEX team_name_lower ON public.team (lower(name));"
                "ALTER TABLE public.team ADD COLUMN code text UNIQUE;"
                "UPDATE public.team SET code = 'c' || id WHERE id <= 10"
            )
    dev.execute(  # names swapped (a key on an expression); codes in a cycle (nullable)
        "UPDATE public.team SET name = 'x' WHERE id = 21;"
        "UPDATE public.team SET name = 'team 21' WHERE id = 22;"
        "UPDATE public.team SET name = 'TEAM 22' WHERE id = 21;"
        "UPDATE public.team SET code = NULL WHERE id = 1;"
        "UPDATE public.team SET code = 'c1' WHERE id = 2;"
        "UPDATE public.team SET code = 'c2' WHERE id = 3;"
        "UPDATE public.team SET code = 'c3' WHERE id = 1;"
    )
    assert project.run("take", "dev").exit_code == 0
    differing = _differing(dev, prod, "public.team")
    versions = _versions(prod, "public.team")

    applied = project.run("apply", "prod", "--yes", "--json")

    assert applied.exit_code == 0, applied.output
    assert "tried first" not in applied.output, applied.stderr
    assert {t["mode"] for t in json.loads(applied.stdout)["changes"]} == {"delta"}
    assert "public.team: 5 rows hold unique values other rows take" in applied.stderr
    assert _rewritten(versions, _versions(prod, "public.team")) == differing == {1, 2, 3, 21, 22}
    assert prod.fingerprint(SCOPE) == dev.fingerprint(SCOPE)


PAGES = """
SET ROLE app_owner;
CREATE TABLE public.page (
    id int PRIMARY KEY, parent_id int REFERENCES public.page, path text NOT NULL UNIQUE);
RESET ROLE;
INSERT INTO public.page SELECT i, CASE WHEN i > 1 THEN 1 END, 'p' || i FROM generate_series(1, 20) i;
"""


def test_a_self_referencing_table_inserts_first_and_still_trades_values(
    project: Project, make_db
) -> None:
    # A self-referencing table inserts before it updates (a row may move under a new one):
    # the new page takes the path page 5 gives up, and page 6 moves under the new page.
    dev, prod = plain_app_pair(
        project,
        make_db,
        lambda db, _variant, _size: db.execute(PAGES),
        "[scope]\ntables = ['public.page']\nauth_users = false\n\n[apply]\ninsert_as = {}\n",
    )
    dev.execute(
        "UPDATE public.page SET path = 'p5-old' WHERE id = 5;"
        "INSERT INTO public.page VALUES (100, 5, 'p5');"
        "UPDATE public.page SET parent_id = 100 WHERE id = 6;"
    )
    assert project.run("take", "dev").exit_code == 0
    versions = _versions(prod, "public.page")

    applied = project.run("apply", "prod", "--yes", "--json")

    assert applied.exit_code == 0, applied.output
    assert "tried first" not in applied.output, applied.stderr
    assert "public.page: 1 rows hold unique values other rows take" in applied.stderr
    assert [t["mode"] for t in json.loads(applied.stdout)["changes"]] == ["delta"]
    assert _rewritten(versions, _versions(prod, "public.page")) == {5, 6, 100}
    assert prod.fingerprint(["public.page"]) == dev.fingerprint(["public.page"])
