"""Large applies check foreign keys in bulk (snapshot.apply.replica), with the same result.

Each test builds a small app of its own (a self-referencing parent, a composite MATCH FULL
key, ON DELETE CASCADE / SET NULL, app triggers of every enabled state) and compares the
bulk path with the row-by-row one on identical targets: same rows, the same app triggers
fired the same number of times, the triggers' states unchanged, and where the bulk path
cannot prove its writes, a fallback the report names.
"""

from __future__ import annotations

import json

import pytest

from tests.fix_apps import plain_app_pair
from tests.fix_db import Database
from tests.fix_project import Project

SCHEMA = """
SET ROLE app_owner;
CREATE SEQUENCE public.fired;  -- counts the app trigger's calls (a sequence is no table)
CREATE TABLE public.country (code text PRIMARY KEY);
CREATE TABLE public.team (
    id int PRIMARY KEY, name text NOT NULL UNIQUE,
    parent_id int REFERENCES public.team (id) ON DELETE SET NULL);
CREATE TABLE public.member (
    id uuid PRIMARY KEY, team_id int NOT NULL REFERENCES public.team (id) ON DELETE CASCADE,
    name text NOT NULL, country text REFERENCES public.country (code),
    UNIQUE (team_id, name));
CREATE TABLE public.badge (
    id bigint PRIMARY KEY, team_id int, member_name text, label text NOT NULL,
    FOREIGN KEY (team_id, member_name) REFERENCES public.member (team_id, name)
        MATCH FULL ON UPDATE CASCADE);
CREATE FUNCTION public.count_and_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  PERFORM nextval('public.fired');
  IF NEW.name = 'forbidden' THEN
    RAISE EXCEPTION 'guardrail: forbidden name' USING ERRCODE = 'check_violation';
  END IF;
  RETURN NEW;
END $$;
CREATE FUNCTION public.refuse() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  RAISE EXCEPTION 'this trigger fires only on a replica';
END $$;
CREATE TRIGGER member_guard BEFORE INSERT OR UPDATE ON public.member
    FOR EACH ROW EXECUTE FUNCTION public.count_and_guard();
CREATE TRIGGER member_on_replica BEFORE INSERT ON public.member
    FOR EACH ROW EXECUTE FUNCTION public.refuse();
ALTER TABLE public.member ENABLE REPLICA TRIGGER member_on_replica;
CREATE TRIGGER badge_off BEFORE INSERT ON public.badge
    FOR EACH ROW EXECUTE FUNCTION public.refuse();
ALTER TABLE public.badge DISABLE TRIGGER badge_off;
CREATE TRIGGER team_always BEFORE INSERT ON public.team
    FOR EACH ROW EXECUTE FUNCTION public.count_and_guard();
ALTER TABLE public.team ENABLE ALWAYS TRIGGER team_always;
RESET ROLE;
"""
SCOPE = ["public.team", "public.member", "public.badge"]
TRIGGER_STATES = """
SELECT tgrelid::regclass::text, tgname, tgenabled FROM pg_trigger
WHERE NOT tgisinternal ORDER BY 1, 2
"""


def _config(checks: str) -> str:
    tables = ", ".join(f"'{t}'" for t in SCOPE)
    return (
        f"[scope]\ntables = [{tables}]\nauth_users = false\n\n"
        f'[apply]\ninsert_as = {{}}\nforeign_key_checks = "{checks}"\n'
    )


def _fill(db: Database, variant: str, teams: int) -> None:
    db.execute(SCHEMA)
    db.execute("INSERT INTO public.country VALUES ('NL'), ('FR'), ('JP')")
    db.execute(
        "INSERT INTO public.team SELECT i, %s || ' team ' || i, NULLIF(i / 3, 0) "
        "FROM generate_series(1, %s) i",
        [variant, teams],
    )
    db.execute(
        "INSERT INTO public.member SELECT md5(%s || i)::uuid, 1 + i %% %s, %s || '-m' || i, "
        "(ARRAY['NL', 'FR', 'JP', NULL])[1 + i %% 4] FROM generate_series(1, %s) i",
        [variant, teams, variant, teams * 4],
    )
    db.execute(
        "INSERT INTO public.badge SELECT i, CASE WHEN i % 5 = 0 THEN NULL ELSE m.team_id END, "
        "CASE WHEN i % 5 = 0 THEN NULL ELSE m.name END, 'b' || i "
        "FROM (SELECT row_number() OVER (ORDER BY name) i, * FROM public.member) m"
    )


def _fired(db: Database) -> int:
    row = db.execute("SELECT last_value, is_called FROM public.fired")[0]
    return int(row[0]) if row[1] else 0


def _triggers(db: Database) -> list[tuple]:
    return db.execute(TRIGGER_STATES)


def _details(checked) -> str:
    return " ".join(f["detail"] for f in json.loads(checked.stdout)["findings"])


def _apply(project: Project, checks: str, env: str = "prod"):
    project.config(_config(checks))
    return project.run("-v", "apply", env, "--from", "dev", "--yes")


def test_a_large_apply_in_bulk_ends_exactly_as_row_by_row(project: Project, make_db) -> None:
    dev, prod = plain_app_pair(project, make_db, _fill, _config("auto"))
    twin = make_db("empty")
    _fill(twin, "prod", 20)
    project.point("twin", twin)
    triggers = _triggers(prod)
    assert project.run("take", "dev").exit_code == 0
    checked = project.run("check", "prod", "--json")  # the plan says how keys are checked

    bulk = _apply(project, "auto")
    row_by_row = _apply(project, "per-row", "twin")

    assert checked.exit_code == 0, checked.output
    assert "foreign keys are checked in bulk after the writes" in _details(checked)
    # badge's key to member has no index: in bulk the deletes need none, and check says so
    assert "checking foreign keys in bulk, this apply needs no index for them" in (
        _details(checked)
    )
    assert "indexed 1 foreign keys for the deletes" in row_by_row.output
    assert "foreign keys for the deletes" not in bulk.output

    assert bulk.exit_code == 0, bulk.output
    assert row_by_row.exit_code == 0, row_by_row.output
    assert "foreign keys checked in bulk" in bulk.output
    assert "foreign keys checked row by row" not in bulk.output
    assert "foreign keys were checked row by row" not in bulk.output
    assert "foreign keys checked in bulk" not in row_by_row.output
    assert prod.fingerprint(SCOPE) == twin.fingerprint(SCOPE) == dev.fingerprint(SCOPE)
    # the app's triggers fired as often (REPLICA ones not at all: they raise), and are
    # back to their states: ORIGIN, REPLICA, DISABLED and ALWAYS
    assert _fired(prod) == _fired(twin) > _fired(dev)
    assert _triggers(prod) == _triggers(twin) == triggers
    assert {state for *_, state in triggers} == {"O", "R", "D", "A"}
    rolled = project.run("rollback", "prod", "--yes")
    assert rolled.exit_code == 0, rolled.output
    assert _triggers(prod) == triggers


def test_an_app_guardrail_refuses_in_bulk_as_row_by_row(project: Project, make_db) -> None:
    dev, prod = plain_app_pair(project, make_db, _fill, _config("auto"))
    dev.execute(  # past dev's own guardrail: the test's doing, not the tool's
        "ALTER TABLE public.member DISABLE TRIGGER member_guard; "
        "UPDATE public.member SET name = 'forbidden' WHERE name = 'dev-m7'; "
        "ALTER TABLE public.member ENABLE TRIGGER member_guard"
    )
    before = prod.fingerprint(SCOPE)
    assert project.run("take", "dev").exit_code == 0

    refused = _apply(project, "bulk")

    assert refused.exit_code == 1
    assert "guardrail: forbidden name" in refused.stderr
    assert "rolled back, prod is unchanged" in refused.stderr
    assert prod.fingerprint(SCOPE) == before


def test_a_trigger_writing_outside_the_scope_sends_the_writes_row_by_row(
    project: Project, make_db
) -> None:
    dev, prod = plain_app_pair(project, make_db, _fill, _config("auto"))
    prod.execute(
        "SET ROLE app_owner; "
        "CREATE TABLE public.audit (team_id int REFERENCES public.team (id), at text); "
        "CREATE FUNCTION public.audit_team() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "INSERT INTO public.audit VALUES (NEW.id, 'x'); RETURN NEW; END $$; "
        "CREATE TRIGGER team_audit AFTER INSERT ON public.team "
        "FOR EACH ROW EXECUTE FUNCTION public.audit_team(); RESET ROLE"
    )
    assert project.run("take", "dev").exit_code == 0

    applied = _apply(project, "auto")

    assert applied.exit_code == 0, applied.output
    assert "a trigger wrote to public.audit, outside the scope" in applied.output
    assert "note: foreign keys were checked row by row" in applied.output
    assert prod.fingerprint(SCOPE) == dev.fingerprint(SCOPE)
    # written once, by the row-by-row writes: the bulk attempt's rows were rolled back
    assert prod.execute("SELECT count(*) FROM public.audit")[0][0] == 30 - 20  # teams added


def test_a_key_followed_on_update_outside_the_scope_keeps_the_writes_row_by_row(
    project: Project, make_db
) -> None:
    dev, prod = plain_app_pair(project, make_db, _fill, _config("auto"))
    # prod holds dev's member 3 under the name dev gives member 33, and a table outside the
    # scope refers to it ON UPDATE CASCADE: row by row, the rename carries the reference to
    # "dev-m3", while the name it leaves goes to member 33 (so no reference is left
    # dangling: a check in bulk would find nothing wrong and miss the cascade)
    prod.execute(
        "INSERT INTO public.member VALUES (md5('dev3')::uuid, 4, 'dev-m33', NULL); "
        "SET ROLE app_owner; CREATE TABLE public.alias (team_id int, member_name text, "
        "FOREIGN KEY (team_id, member_name) REFERENCES public.member (team_id, name) "
        "ON UPDATE CASCADE); RESET ROLE; INSERT INTO public.alias VALUES (4, 'dev-m33')"
    )
    assert dev.execute(
        "SELECT id = md5('dev3')::uuid, team_id, name FROM public.member "
        "WHERE name IN ('dev-m3', 'dev-m33') ORDER BY name"
    ) == [(True, 4, "dev-m3"), (False, 4, "dev-m33")]
    assert project.run("take", "dev").exit_code == 0

    applied = _apply(project, "auto")

    assert applied.exit_code == 0, applied.output
    assert "public.alias refers to public.member ON UPDATE CASCADE, outside the scope" in (
        applied.output
    )
    assert "foreign keys checked in bulk" not in applied.output
    assert prod.fingerprint(SCOPE) == dev.fingerprint(SCOPE)
    assert prod.execute("SELECT * FROM public.alias") == [(4, "dev-m3")]


def test_a_trigger_error_in_bulk_of_any_sqlstate_is_tried_row_by_row(
    project: Project, make_db
) -> None:
    dev, prod = plain_app_pair(project, make_db, _fill, _config("auto"))
    # A team may not go while it has members, says a trigger with an invalid_parameter_value
    # (class 22) error. prod's team 99 goes, but its one member stays, moved to team 8: row
    # by row that member moves first; in bulk the team's delete comes first and fails.
    prod.execute(
        "INSERT INTO public.team VALUES (99, 'prod team 99', NULL); "
        "INSERT INTO public.member VALUES (md5('dev7')::uuid, 99, 'dev-m7', NULL); "
        "SET ROLE app_owner; "
        "CREATE FUNCTION public.keep_teams() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "IF EXISTS (SELECT FROM public.member WHERE team_id = OLD.id) THEN "
        "RAISE EXCEPTION 'team % has members', OLD.id USING ERRCODE = '22023'; END IF; "
        "RETURN OLD; END $$; "
        "CREATE TRIGGER keep_teams BEFORE DELETE ON public.team "
        "FOR EACH ROW EXECUTE FUNCTION public.keep_teams(); RESET ROLE"
    )
    assert project.run("take", "dev").exit_code == 0

    applied = _apply(project, "auto")

    assert applied.exit_code == 0, applied.output
    assert "in bulk, a write failed on public.team (team 99 has members)" in applied.output
    assert "tried first" not in applied.output  # no table replaced in full for it
    assert prod.fingerprint(SCOPE) == dev.fingerprint(SCOPE)


def test_a_role_that_may_not_use_replica_mode_writes_row_by_row(
    project: Project, make_db, server
) -> None:
    dev, prod = plain_app_pair(project, make_db, _fill, _config("auto"))
    assert project.run("take", "dev").exit_code == 0
    if server.major() < 15:
        pytest.skip("GRANT SET ON PARAMETER needs PostgreSQL 15")
    with server.connect() as conn:
        conn.execute("REVOKE SET ON PARAMETER session_replication_role FROM app_owner")
    try:
        checked = project.run("check", "prod", "--json")
        applied = _apply(project, "auto")
    finally:
        with server.connect() as conn:
            conn.execute("GRANT SET ON PARAMETER session_replication_role TO app_owner")

    assert "foreign keys checked row by row: prod's role may not write in replica mode" in (
        _details(checked)
    )
    assert applied.exit_code == 0, applied.output
    assert "may not write in replica mode" in applied.output
    assert "note:" not in applied.output  # the role's lasting property: no note each run
    assert prod.fingerprint(SCOPE) == dev.fingerprint(SCOPE)


def test_an_unknown_foreign_key_checks_value_is_one_line(project: Project, make_db) -> None:
    plain_app_pair(project, make_db, _fill, _config("sometimes"))

    result = project.run("check", "prod")

    assert result.exit_code == 2
    assert "[apply] foreign_key_checks must be one of 'auto', 'bulk', 'per-row'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_row_match_full_refuses_is_refused_in_bulk_too(project: Project, make_db) -> None:
    dev, prod = plain_app_pair(project, make_db, _fill, _config("auto"))
    # dev lost the key (a drifted schema), and holds a half-null reference MATCH FULL forbids
    dev.execute(
        "ALTER TABLE public.badge DROP CONSTRAINT badge_team_id_member_name_fkey; "
        "UPDATE public.badge SET member_name = NULL WHERE id = 1"
    )
    before = prod.fingerprint(SCOPE)
    triggers = _triggers(prod)
    assert project.run("take", "dev").exit_code == 0

    refused = _apply(project, "bulk")

    assert refused.exit_code == 1, refused.output
    assert "in bulk, rows of public.badge break badge_team_id_member_name_fkey" in refused.output
    assert 'violates foreign key constraint "badge_team_id_member_name_fkey"' in refused.stderr
    assert prod.fingerprint(SCOPE) == before
    assert _triggers(prod) == triggers
