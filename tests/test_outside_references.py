"""Rows outside the scope that refer to it: found by check as the apply finds them, kept on
request, never deleted, nulled or blocked unasked; a full replace that puts every parent back.

A film-rental app like the public sample schemas: the content (films, inventory) is the
scope; prod's rentals and payments, its own history, are outside it and refer to inventory.
"""

from __future__ import annotations

import json
import re

import pytest

from tests.fix_apps import plain_app_pair
from tests.fix_db import Database
from tests.fix_project import Project

SCOPE = ["public.film", "public.inventory"]
OUTSIDE = ["public.rental", "public.payment", "public.review"]


def _config(checks: str = "auto") -> str:
    return (
        "[scope]\ntables = ['public.film', 'public.inventory']\nauth_users = false\n\n"
        f"[apply]\ninsert_as = {{}}\nforeign_key_checks = '{checks}'\n"
    )


def _schema(rule: str) -> str:
    return f"""
SET ROLE app_owner;
CREATE TABLE public.film (
    film_id int PRIMARY KEY, title text NOT NULL UNIQUE, rating text NOT NULL);
CREATE TABLE public.inventory (
    inventory_id int PRIMARY KEY, film_id int NOT NULL REFERENCES public.film, store int NOT NULL);
CREATE TABLE public.rental (
    rental_id int PRIMARY KEY,
    inventory_id int NOT NULL REFERENCES public.inventory ON DELETE {rule},
    customer text NOT NULL);
CREATE TABLE public.payment (
    payment_id int PRIMARY KEY, rental_id int REFERENCES public.rental ON DELETE CASCADE,
    amount numeric NOT NULL);
CREATE TABLE public.review (
    review_id int PRIMARY KEY, film_id int REFERENCES public.film ON DELETE SET NULL, body text);
RESET ROLE;
"""


def _filler(rule: str):
    def fill(db: Database, variant: str, size: int) -> None:
        # dev: 20 films and 60 copies; prod: 25 films (21-25 only in prod), 80 copies
        # (61-80 only in prod, some of them of films 21-25).
        films, copies = (20, 60) if variant == "dev" else (25, 80)
        db.execute(_schema(rule))
        db.execute(
            "INSERT INTO public.film SELECT i, 'film ' || i, %s FROM generate_series(1, %s) i",
            [variant, films],
        )
        db.execute(
            "INSERT INTO public.inventory SELECT i, 1 + (i * 7) %% %s, 1 + i %% 2 "
            "FROM generate_series(1, %s) i",
            [films, copies],
        )

    return fill


def _pair(
    project: Project, make_db, rule: str = "NO ACTION", checks: str = "auto"
) -> tuple[Database, Database]:
    dev, prod = plain_app_pair(project, make_db, _filler(rule), _config(checks))
    assert project.run("take", "dev").exit_code == 0
    return dev, prod


def _rent(prod: Database, copies: str) -> None:
    """Prod's own history: a rental of each of ``copies`` (a SQL set), each paid for."""
    prod.execute(
        "INSERT INTO public.rental SELECT 1000 + inventory_id, inventory_id, 'c' || inventory_id "
        f"FROM public.inventory WHERE inventory_id IN ({copies})"
    )
    prod.execute("INSERT INTO public.payment SELECT rental_id, rental_id, 2.5 FROM public.rental")


def _findings(result, check: str) -> list[tuple[str, str]]:
    return [
        (f["status"], f["detail"])
        for f in json.loads(result.stdout)["findings"]
        if f["check"] == check
    ]


def _swap_titles(dev: Database, prod: Database, project: Project) -> None:
    """Two films swap their (unique) titles in dev, and prod allows no title but a film's: no
    title can be moved aside for the swap (snapshot.apply.swaps), so the delta of public.film
    fails and the apply falls back to replacing film and inventory in full."""
    prod.execute("ALTER TABLE public.film ADD CHECK (title LIKE 'film %')")
    dev.execute(
        "UPDATE public.film SET title = 'swap' WHERE film_id = 1; "
        "UPDATE public.film SET title = 'film 1' WHERE film_id = 2; "
        "UPDATE public.film SET title = 'film 2' WHERE film_id = 1"
    )
    assert project.run("take", "dev").exit_code == 0


@pytest.mark.parametrize("checks", ["per-row", "bulk"])
@pytest.mark.parametrize("rule", ["NO ACTION", "RESTRICT", "CASCADE"])
def test_a_fallback_to_a_full_replace_is_not_refused_for_parents_it_puts_back(
    project: Project, make_db, rule: str, checks: str
) -> None:
    dev, prod = _pair(project, make_db, rule, checks)
    _swap_titles(dev, prod, project)
    # Only copies dev has too, none of films 1 and 2: row by row the rows rentals refer to,
    # and their films, stay in place and are updated, so a swap among them would still fail.
    _rent(prod, "SELECT i FROM generate_series(1, 60, 3) AS i WHERE i NOT IN (40, 43)")
    outside = prod.fingerprint(OUTSIDE)

    checked = project.run("check", "prod", "--json")
    applied = project.run("apply", "prod", "--yes")

    assert checked.exit_code == 0, checked.output
    assert applied.exit_code == 0, applied.output
    assert "replaced in full" in applied.stderr  # the fallback did happen
    assert prod.fingerprint(SCOPE) == dev.fingerprint(SCOPE)
    assert prod.fingerprint(OUTSIDE) == outside


HARM = {
    "NO ACTION": "deleting them would fail",
    "RESTRICT": "deleting them would fail",
    "CASCADE": "deleting them would delete those rows of public.rental too",
}


@pytest.mark.parametrize("full", [False, True])
@pytest.mark.parametrize("rule", ["NO ACTION", "RESTRICT", "CASCADE"])
def test_check_finds_the_parents_the_snapshot_lacks_and_the_apply_refuses_the_same(
    project: Project, make_db, rule: str, full: bool
) -> None:
    _dev, prod = _pair(project, make_db, rule)
    _rent(prod, "SELECT generate_series(55, 64)")  # 61-64 are copies dev lacks
    before = prod.fingerprint([*SCOPE, *OUTSIDE])
    flags = ["--full"] if full else []

    checked = project.run("check", "prod", "--json", *flags)
    applied = project.run("apply", "prod", "--yes", *flags)

    [(status, detail)] = [f for f in _findings(checked, "scope closure") if "public.rental" in f[1]]
    sentence = (
        f"public.rental(inventory_id) -> public.inventory(inventory_id) (on delete "
        f"{rule.lower()}): 4 rows of public.rental refer to 4 public.inventory rows "
        f"(inventory_id 61, 62, 63, 64) the snapshot lacks: {HARM[rule]}; keep them in prod "
        "with --keep-referenced (or [apply] keep_referenced = true), or put them back in dev "
        "and take a new snapshot"
    )
    assert checked.exit_code == 1 and status == "error"
    assert detail.startswith(sentence), detail
    assert applied.exit_code == 1
    assert sentence in applied.stderr
    assert "Traceback" not in applied.output
    assert prod.fingerprint([*SCOPE, *OUTSIDE]) == before


def _without(table: str, where: str) -> str:
    """A fingerprintable subquery: ``table``'s rows but those ``where`` selects."""
    return f"(SELECT * FROM {table} WHERE NOT ({where}))"


def _only(table: str, where: str) -> str:
    return f"(SELECT * FROM {table} WHERE {where})"


KEPT_COPIES = "inventory_id BETWEEN 61 AND 64"
KEPT_FILMS = "film_id = 24"  # prod's copy 64 is of film 24, which dev lacks


@pytest.mark.parametrize("checks", ["per-row", "bulk"])
def test_keep_referenced_keeps_what_outside_rows_need_and_says_so(
    project: Project, make_db, checks: str
) -> None:
    dev, prod = _pair(project, make_db, "NO ACTION", checks)
    _rent(prod, "SELECT generate_series(55, 64)")  # 61-64 are copies dev lacks
    outside = prod.fingerprint(OUTSIDE)
    before = prod.fingerprint(SCOPE)
    kept = prod.fingerprint(
        [_only("public.inventory", KEPT_COPIES), _only("public.film", KEPT_FILMS)]
    )

    checked = project.run("check", "prod", "--json", "--keep-referenced")
    applied = project.run("apply", "prod", "--yes", "--keep-referenced")

    assert checked.exit_code == 0, checked.output
    closure = _findings(checked, "scope closure")
    assert (
        "warning",
        "public.rental(inventory_id) -> public.inventory(inventory_id) (on delete "
        "no action): 4 rows of public.rental refer to 4 public.inventory rows (inventory_id "
        "61, 62, 63, 64) the snapshot lacks: kept as prod has them (--keep-referenced)",
    ) in closure
    assert (
        "warning",
        "1 public.film row (film_id 24) kept as prod has it, for kept rows of public.inventory",
    ) in closure
    plan = {t["table"]: t for t in json.loads(checked.stdout)["plan"]["tables"]}
    assert plan["public.inventory"]["kept"] == 4 and plan["public.film"]["kept"] == 1

    assert applied.exit_code == 0, applied.output
    assert prod.fingerprint(OUTSIDE) == outside
    assert (
        prod.fingerprint([_only("public.inventory", KEPT_COPIES), _only("public.film", KEPT_FILMS)])
        == kept
    )
    assert prod.fingerprint(
        [_without("public.inventory", KEPT_COPIES), _without("public.film", KEPT_FILMS)]
    ) == dev.fingerprint(
        [_without("public.inventory", KEPT_COPIES), _without("public.film", KEPT_FILMS)]
    )
    lines = {
        line.split()[0]: line for line in applied.stdout.splitlines() if line.startswith("public.")
    }
    assert " kept 4 " in lines["public.inventory"] and " kept 1 " in lines["public.film"]
    assert "0/2 tables match, 2 more match but for 5 rows kept for rows outside the scope" in (
        applied.stdout
    )
    assert (
        "kept: 4 public.inventory rows (inventory_id 61, 62, 63, 64) kept as prod has them, "
        "for public.rental" in applied.stderr + applied.stdout
    )

    verified = project.run("verify", "dev", "prod")
    assert verified.exit_code == 0, verified.output
    verdicts = {
        line.split()[0]: line for line in verified.stdout.splitlines() if line.startswith("public.")
    }
    assert (
        " kept 4 " in verdicts["public.inventory"]
        and "public.rental" in verdicts["public.inventory"]
    )
    assert " kept 1 " in verdicts["public.film"]
    assert "verify dev prod: 0/2 tables match, 2 more match but for 5 rows kept" in verified.stdout

    rolled = project.run("rollback", "prod", "--yes")
    assert rolled.exit_code == 0, rolled.output
    assert prod.fingerprint(SCOPE) == before
    assert prod.fingerprint(OUTSIDE) == outside


def test_a_second_apply_keeps_the_same_rows_writing_nothing_and_a_rollback_undoes_the_first(
    project: Project, make_db
) -> None:
    _dev, prod = _pair(project, make_db)
    _rent(prod, "SELECT generate_series(55, 64)")
    before = prod.fingerprint([*SCOPE, *OUTSIDE])
    assert project.run("apply", "prod", "--yes", "--keep-referenced").exit_code == 0
    after = prod.fingerprint([*SCOPE, *OUTSIDE])
    project.config(_config() + "keep_referenced = true\n")

    again = project.run("apply", "prod", "--yes", "--json")
    project.config(_config())
    refused = project.run("apply", "prod", "--yes")

    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["matches"] is True
    changes = json.loads(again.stdout)["changes"]
    assert [(t["insert"], t["update"], t["delete"], t["kept"]) for t in changes] == [
        (0, 0, 0, 1),
        (0, 0, 0, 4),
    ]
    assert refused.exit_code == 1 and "--keep-referenced" in refused.stderr
    assert prod.fingerprint([*SCOPE, *OUTSIDE]) == after

    # The second apply wrote nothing and kept no backup: rollback undoes the first.
    rolled = project.run("rollback", "prod", "--yes")
    assert rolled.exit_code == 0, rolled.output
    assert prod.fingerprint([*SCOPE, *OUTSIDE]) == before


@pytest.mark.parametrize("checks", ["per-row", "bulk"])
@pytest.mark.parametrize("rule", ["NO ACTION", "RESTRICT", "CASCADE"])
def test_a_full_replace_that_puts_every_referenced_parent_back_goes_through(
    project: Project, make_db, rule: str, checks: str
) -> None:
    dev, prod = _pair(project, make_db, rule, checks)
    _rent(prod, "SELECT generate_series(1, 60, 2)")  # copies dev has too, of most films
    prod.execute(  # films dev has too (SET NULL): a full replace must not null them out
        "INSERT INTO public.review SELECT film_id, film_id, 'ok' FROM public.film "
        "WHERE film_id <= 20"
    )
    prod.execute("UPDATE public.inventory SET store = 3 WHERE inventory_id % 4 = 1")
    outside = prod.fingerprint(OUTSIDE)

    checked = project.run("check", "prod", "--full", "--json")
    applied = project.run("apply", "prod", "--yes", "--full", "--json")

    assert checked.exit_code == 0, checked.output
    assert applied.exit_code == 0, applied.output
    assert {t["mode"] for t in json.loads(applied.stdout)["changes"]} == {"full"}
    if checks == "per-row":  # the rows rentals refer to stayed in place, updated
        assert re.search(r"updated +public.inventory +30 rows", applied.stderr), applied.stderr
    assert prod.fingerprint(SCOPE) == dev.fingerprint(SCOPE)
    assert prod.fingerprint(OUTSIDE) == outside


def test_a_rollback_keeps_rows_the_app_referred_to_since_the_apply_only_when_asked(
    project: Project, make_db
) -> None:
    dev, prod = _pair(project, make_db)
    dev.execute("INSERT INTO public.inventory VALUES (100, 1, 1), (101, 2, 1), (102, 3, 2)")
    assert project.run("take", "dev").exit_code == 0
    before = prod.fingerprint(SCOPE)
    assert project.run("apply", "prod", "--yes").exit_code == 0
    _rent(prod, "101")  # the app rents out a copy the apply brought
    outside = prod.fingerprint(OUTSIDE)
    applied = prod.fingerprint(SCOPE)

    refused = project.run("rollback", "prod", "--yes")
    assert refused.exit_code == 1
    assert (
        "public.rental(inventory_id) -> public.inventory(inventory_id) (on delete no action): "
        "1 row of public.rental refers to 1 public.inventory row (inventory_id 101) the "
        "snapshot lacks: deleting it would fail; keep it in prod with --keep-referenced"
    ) in refused.stderr
    assert "put it back" not in refused.stderr  # a backup is not changed in dev
    assert prod.fingerprint([*SCOPE, *OUTSIDE]) == {**applied, **outside}

    kept = project.run("rollback", "prod", "--yes", "--keep-referenced")
    assert kept.exit_code == 0, kept.output
    assert prod.fingerprint(OUTSIDE) == outside
    assert prod.fingerprint([_without("public.inventory", "inventory_id = 101")]) == {
        _without("public.inventory", "inventory_id = 101"): before["public.inventory"]
    }
    assert prod.fingerprint(["public.film"]) == {"public.film": before["public.film"]}
    assert int(prod.scalar("SELECT count(*) FROM public.inventory WHERE inventory_id = 101")) == 1
