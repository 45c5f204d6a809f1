"""An app whose triggers write into the rows it stores: the commonest pattern of real apps.

Every table sets ``updated_at``/``last_update`` on update (a PL/pgSQL trigger, and the
``moddatetime`` extension's); a SaaS starter's triggers fill ``created_by``/``updated_by``
and ``invited_by_user_id`` from the API caller (NULL in the tool's session, and NOT NULL on
invitations), a film table keeps a tsvector by trigger, a child's trigger touches its parent
(a nested write), and a guardrail refuses a forbidden title. The apply fires every trigger
(the guardrail still refuses) but what they write does not stay: every scoped column ends
equal to the snapshot, a second apply writes nothing, and rollback is exact.
"""

from __future__ import annotations

import json

import psycopg
import pytest

from tests.fix_apps import plain_app_pair
from tests.fix_db import Database
from tests.fix_project import Project

SCHEMA = """
DO $$
BEGIN
  IF EXISTS (SELECT FROM pg_available_extensions WHERE name = 'moddatetime') THEN
    CREATE EXTENSION IF NOT EXISTS moddatetime SCHEMA public;
  END IF;
END
$$;
SET ROLE app_owner;
DO $$
BEGIN
  -- Where the contrib extension is not installed, the same trigger in PL/pgSQL.
  IF to_regproc('public.moddatetime') IS NULL THEN
    CREATE FUNCTION public.moddatetime() RETURNS trigger LANGUAGE plpgsql AS $f$
    BEGIN
      NEW := jsonb_populate_record(NEW, jsonb_build_object(TG_ARGV[0], now()));
      RETURN NEW;
    END $f$;
  END IF;
END
$$;
CREATE FUNCTION public.current_uid() RETURNS uuid LANGUAGE sql STABLE
  AS $$ SELECT nullif(current_setting('request.jwt.claim.sub', true), '')::uuid $$;
CREATE FUNCTION public.set_timestamps() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF TG_OP = 'INSERT' THEN NEW.created_at := now(); END IF;
  NEW.updated_at := now();
  RETURN NEW;
END $$;
CREATE FUNCTION public.set_user_tracking() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF TG_OP = 'INSERT' THEN NEW.created_by := public.current_uid(); END IF;
  NEW.updated_by := public.current_uid();
  RETURN NEW;
END $$;
CREATE FUNCTION public.set_invitation_details() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  NEW.invited_by_user_id := public.current_uid();
  NEW.account_name := (SELECT name FROM public.accounts WHERE id = NEW.account_id);
  RETURN NEW;
END $$;
CREATE FUNCTION public.film_last_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  NEW.last_update := now();
  RETURN NEW;
END $$;
CREATE FUNCTION public.film_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF NEW.title = 'FORBIDDEN' THEN
    RAISE EXCEPTION 'guardrail: film % may not be called FORBIDDEN', NEW.film_id;
  END IF;
  RETURN NEW;
END $$;
CREATE FUNCTION public.touch_film() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  UPDATE public.film SET last_update = now() WHERE film_id = NEW.film_id;
  RETURN NULL;
END $$;

CREATE TABLE public.accounts (
    id uuid PRIMARY KEY, name text NOT NULL, slug text NOT NULL UNIQUE,
    created_by uuid, updated_by uuid, created_at timestamptz, updated_at timestamptz);
CREATE TRIGGER set_accounts_timestamp BEFORE INSERT OR UPDATE ON public.accounts
  FOR EACH ROW EXECUTE FUNCTION public.set_timestamps();
CREATE TRIGGER set_accounts_user_tracking BEFORE INSERT OR UPDATE ON public.accounts
  FOR EACH ROW EXECUTE FUNCTION public.set_user_tracking();

CREATE TABLE public.invitations (
    id uuid PRIMARY KEY,
    account_id uuid NOT NULL REFERENCES public.accounts (id) ON DELETE CASCADE,
    invited_by_user_id uuid NOT NULL, account_name text, token text NOT NULL,
    created_at timestamptz, updated_at timestamptz);
CREATE TRIGGER set_invitations_timestamp BEFORE INSERT OR UPDATE ON public.invitations
  FOR EACH ROW EXECUTE FUNCTION public.set_timestamps();
CREATE TRIGGER trigger_set_invitation_details BEFORE INSERT ON public.invitations
  FOR EACH ROW EXECUTE FUNCTION public.set_invitation_details();

-- A counter cache the app keeps by an AFTER trigger: a nested write into a table that has
-- no BEFORE trigger of its own.
CREATE TABLE public.team_stats (
    account_id uuid PRIMARY KEY REFERENCES public.accounts (id) ON DELETE CASCADE,
    invites int NOT NULL DEFAULT 0);
CREATE FUNCTION public.count_invite() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  UPDATE public.team_stats SET invites = invites + 1 WHERE account_id = NEW.account_id;
  RETURN NULL;
END $$;
CREATE TRIGGER invitations_counted AFTER INSERT ON public.invitations
  FOR EACH ROW EXECUTE FUNCTION public.count_invite();

CREATE TABLE public.film (
    film_id int PRIMARY KEY, title text NOT NULL, description text,
    fulltext tsvector NOT NULL, rental_rate numeric(4, 2),
    last_update timestamptz NOT NULL DEFAULT now());
CREATE TRIGGER last_updated BEFORE UPDATE ON public.film
  FOR EACH ROW EXECUTE FUNCTION public.film_last_update();
CREATE TRIGGER film_fulltext_trigger BEFORE INSERT OR UPDATE ON public.film
  FOR EACH ROW EXECUTE FUNCTION tsvector_update_trigger(fulltext, 'pg_catalog.english', title, description);
CREATE TRIGGER film_guard BEFORE INSERT OR UPDATE ON public.film
  FOR EACH ROW EXECUTE FUNCTION public.film_guard();

CREATE TABLE public.film_note (
    id int PRIMARY KEY, film_id int NOT NULL REFERENCES public.film (film_id),
    body text NOT NULL);
CREATE TRIGGER film_note_touches_film AFTER INSERT OR UPDATE ON public.film_note
  FOR EACH ROW EXECUTE FUNCTION public.touch_film();

CREATE TABLE public.tags (
    id int PRIMARY KEY, label text NOT NULL, updated_at timestamptz NOT NULL DEFAULT now());
CREATE TRIGGER tags_moddatetime BEFORE UPDATE ON public.tags
  FOR EACH ROW EXECUTE PROCEDURE public.moddatetime(updated_at);
RESET ROLE;
"""
SCOPE = [
    "public.accounts",
    "public.team_stats",
    "public.invitations",
    "public.film",
    "public.film_note",
    "public.tags",
]
CONFIG = (
    "[scope]\ntables = ["
    + ", ".join(f"'{t}'" for t in SCOPE)
    + "]\nauth_users = false\n\n[apply]\ninsert_as = {}\n"
)


def _fill(db: Database, variant: str, rows: int) -> None:
    """Rows as the app made them over time: written with the triggers off, values explicit.

    Keys overlap between dev and prod; about a third of the shared rows differ.
    """
    db.execute(SCHEMA)
    with db.connect() as conn:
        conn.execute("SET session_replication_role = replica")
        conn.execute(
            "INSERT INTO public.accounts SELECT md5('a' || i)::uuid, %(v)s || ' team ' || i, "
            "'team-' || i, md5('u' || i)::uuid, md5('u' || (i + 1))::uuid, "
            "'2025-01-01'::timestamptz + i * interval '1 day', "
            "'2025-06-01'::timestamptz + (i + length(%(v)s)) * interval '1 hour' "
            "FROM generate_series(1, %(n)s) i",
            {"v": variant if variant == "prod" else "same", "n": rows},
        )
        conn.execute(
            "INSERT INTO public.invitations SELECT md5('i' || i)::uuid, md5('a' || (1 + i %% %(n)s))::uuid, "
            "md5('u' || i)::uuid, 'team ' || i, %(v)s || md5('t' || i), "
            "'2025-02-01'::timestamptz + i * interval '1 min', '2025-02-02'::timestamptz "
            "FROM generate_series(CASE WHEN %(v)s = 'dev' THEN 1 ELSE 3 END, %(n)s) i",
            {"v": variant, "n": rows},
        )
        conn.execute(
            "INSERT INTO public.team_stats SELECT a.id, count(i.id) FROM public.accounts a "
            "LEFT JOIN public.invitations i ON i.account_id = a.id GROUP BY a.id"
        )
        conn.execute(
            "INSERT INTO public.film SELECT i, 'film ' || i, "
            "CASE WHEN i %% 3 = 0 THEN %(v)s ELSE 'a' END || ' story', "
            "to_tsvector('english', 'film ' || i || ' ' || "
            "CASE WHEN i %% 3 = 0 THEN %(v)s ELSE 'a' END || ' story'), "
            "(i %% 5) + 0.99, '2022-02-15 10:00:00+00'::timestamptz + i * interval '1 s' "
            "FROM generate_series(1, %(n)s + CASE WHEN %(v)s = 'dev' THEN 5 ELSE 0 END) i",
            {"v": variant, "n": rows},
        )
        conn.execute(
            "INSERT INTO public.film_note SELECT i, 1 + i %% %(n)s, %(v)s || ' note ' || (i %% 2) "
            "FROM generate_series(1, %(n)s) i",
            {"v": variant, "n": rows},
        )
        conn.execute(
            "INSERT INTO public.tags SELECT i, CASE WHEN i %% 4 = 0 THEN %(v)s ELSE 'tag' END || i, "
            "'2024-01-01'::timestamptz + i * interval '1 day' FROM generate_series(1, %(n)s) i",
            {"v": variant, "n": rows},
        )


def _changes(result) -> int:
    return sum(
        t["insert"] + t["update"] + t["delete"] for t in json.loads(result.stdout)["changes"]
    )


@pytest.mark.parametrize("checks", ["per-row", "bulk"])
def test_values_the_apps_triggers_write_do_not_stay_and_rollback_is_exact(
    project: Project, make_db, checks: str
) -> None:
    dev, prod = plain_app_pair(project, make_db, _fill, CONFIG)
    project.config(CONFIG + f'foreign_key_checks = "{checks}"\n')
    before = prod.fingerprint(SCOPE)
    assert project.run("take", "dev").exit_code == 0

    checked = project.run("check", "prod", "--json")
    applied = project.run("apply", "prod", "--yes", "--json")

    assert checked.exit_code == 0, checked.output
    assert applied.exit_code == 0, applied.output
    assert "tried first" not in applied.output
    assert prod.fingerprint(SCOPE) == dev.fingerprint(SCOPE)
    rewrites = {
        (r["table"], tuple(r["columns"])): r for r in json.loads(applied.stdout)["trigger_rewrites"]
    }
    film = rewrites[("public.film", ("last_update",))]
    assert film["triggers"] == ["last_updated"] and film["rows"] > 0
    accounts = rewrites[
        ("public.accounts", ("created_by", "updated_by", "created_at", "updated_at"))
    ]
    assert set(accounts["triggers"]) == {"set_accounts_timestamp", "set_accounts_user_tracking"}
    invitations = next(r for (t, _), r in rewrites.items() if t == "public.invitations")
    assert "trigger_set_invitation_details" in invitations["triggers"]
    assert "invited_by_user_id" in invitations["columns"]
    # The counter cache's nested updates: undone (its rows are the snapshot's).
    stats = next(r for (t, _), r in rewrites.items() if t == "public.team_stats")
    assert stats["nested_updates_undone"] > 0
    findings = [f["detail"] for f in json.loads(checked.stdout)["findings"]]
    assert any("public.film: film_fulltext_trigger, last_updated" in f for f in findings), findings
    rolled = project.run("rollback", "prod", "--yes")
    assert rolled.exit_code == 0, rolled.output
    assert prod.fingerprint(SCOPE) == before
    # Applied again, then the same snapshot once more: nothing differs, nothing is written.
    assert project.run("apply", "prod", "--yes").exit_code == 0
    again = project.run("apply", "prod", "--yes", "--json")
    assert again.exit_code == 0, again.output
    assert _changes(again) == 0
    assert json.loads(again.stdout)["trigger_rewrites"] == []
    assert prod.fingerprint(SCOPE) == dev.fingerprint(SCOPE)


def test_a_re_sync_writes_only_the_rows_that_changed(project: Project, make_db) -> None:
    dev, prod = plain_app_pair(project, make_db, _fill, CONFIG)
    assert project.run("take", "dev").exit_code == 0
    assert project.run("apply", "prod", "--yes").exit_code == 0
    with dev.connect() as conn:  # three films edited in dev, by the app (its triggers on)
        conn.execute("UPDATE public.film SET rental_rate = 9.99 WHERE film_id IN (2, 4, 6)")
    assert project.run("take", "dev").exit_code == 0

    resync = project.run("apply", "prod", "--yes", "--json")

    assert resync.exit_code == 0, resync.output
    assert _changes(resync) == 3
    assert prod.fingerprint(SCOPE) == dev.fingerprint(SCOPE)


def test_a_guardrail_trigger_still_refuses_and_prod_is_unchanged(project: Project, make_db) -> None:
    dev, prod = plain_app_pair(project, make_db, _fill, CONFIG)
    with dev.connect() as conn:
        conn.execute("SET session_replication_role = replica")
        conn.execute("UPDATE public.film SET title = 'FORBIDDEN' WHERE film_id = 3")
    before = prod.fingerprint(SCOPE)
    assert project.run("take", "dev").exit_code == 0

    applied = project.run("apply", "prod", "--yes")

    assert applied.exit_code == 1
    assert "guardrail: film 3 may not be called FORBIDDEN" in applied.stderr
    assert prod.fingerprint(SCOPE) == before


def test_a_reader_idle_on_a_kept_table_fails_the_apply_by_name_and_changes_nothing(
    project: Project, make_db
) -> None:
    # The keeper triggers go with DROP TRIGGER, which waits for every reader: a session idle
    # in a transaction that read public.film holds it until [apply] lock_timeout.
    _dev, prod = plain_app_pair(project, make_db, _fill, CONFIG)
    project.config(CONFIG + 'lock_timeout = "1s"\n')
    before = prod.fingerprint(SCOPE)
    assert project.run("take", "dev").exit_code == 0
    reader = psycopg.connect(prod.app_url, application_name="idle reader")
    try:
        reader.execute("SELECT count(*) FROM public.film")
        applied = project.run("apply", "prod", "--yes")
    finally:
        reader.close()

    assert applied.exit_code == 1
    line = " ".join(applied.stderr.split())
    assert "could not drop the apply's keeper triggers" in line
    assert "'idle reader'" in line and "rolled back, prod is unchanged" in line
    assert prod.fingerprint(SCOPE) == before


def test_check_warns_when_the_role_may_not_keep_a_tables_trigger_writes(
    project: Project, make_db
) -> None:
    _dev, prod = plain_app_pair(project, make_db, _fill, CONFIG)
    prod.execute("ALTER TABLE public.tags OWNER TO postgres")
    prod.execute("GRANT SELECT, INSERT, UPDATE, DELETE ON public.tags TO app_owner")
    assert project.run("take", "dev").exit_code == 0

    checked = project.run("check", "prod", "--json")

    assert checked.exit_code == 0, checked.output
    warnings = [
        f["detail"] for f in json.loads(checked.stdout)["findings"] if f["status"] == "warning"
    ]
    assert any("GRANT TRIGGER ON public.tags TO app_owner;" in w for w in warnings), warnings
