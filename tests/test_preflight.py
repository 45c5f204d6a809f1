"""The preflight refuses an unsafe apply before it touches anything, and says exactly why."""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from snapshot import localpg
from snapshot.session import ADVISORY_KEY
from tests.fix_apps import apply, setup_pair
from tests.fix_db import PREFIX, SCOPE, Database
from tests.fix_project import Project


def findings(result) -> list[dict]:
    return json.loads(result.stdout)["findings"]


def statuses(result, check: str) -> list[tuple[str, str]]:
    return [(f["status"], f["detail"]) for f in findings(result) if f["check"] == check]


def test_a_ready_target_passes_every_check(project: Project, make_db) -> None:
    setup_pair(project, make_db)

    result = project.run("check", "prod", "--json")

    assert result.exit_code == 0, result.output
    checks = {f["check"] for f in findings(result)}
    assert checks >= {
        "snapshot integrity",
        "identity",
        "scope",
        "tooling",
        "one apply at a time",
        "schema",
        "privileges",
        "foreign keys",
        "outside references",
        "auth users",
    }
    # prod's own sign-ups (users the snapshot lacks) lose their app rows: said, not refused
    [(check, detail)] = [(f["check"], f["detail"]) for f in findings(result) if f["status"] != "ok"]
    assert check == "orphaned users"
    assert detail.startswith("20 prod users will keep their login but lose their profile")
    assert ("ok", "50 snapshot users will be created, none conflict") in statuses(
        result, "auth users"
    )


def test_an_altered_archive_byte_is_refused_naming_the_file(project: Project, make_db) -> None:
    _dev, prod = setup_pair(project, make_db)
    [snapshot] = project.snapshots("dev")
    dump = snapshot / "data.dump"
    data = bytearray(dump.read_bytes())
    data[len(data) // 2] ^= 0xFF
    dump.write_bytes(bytes(data))
    original = prod.fingerprint()

    checked = project.run("check", "prod")
    applied = apply(project)

    assert checked.exit_code == 1 and applied.exit_code == 1
    for result in (checked, applied):
        assert "data.dump does not match its sha256 in the manifest" in " ".join(
            result.stdout.split()
        )
        assert "Error: preflight found 1 error" in result.stderr
    assert prod.fingerprint() == original and project.snapshots("prod") == []


def test_an_unreadable_manifest_format_is_refused(project: Project, make_db) -> None:
    _dev, prod = setup_pair(project, make_db)
    [snapshot] = project.snapshots("dev")
    manifest = json.loads((snapshot / "manifest.json").read_text())
    manifest["format"] = 99
    (snapshot / "manifest.json").write_text(json.dumps(manifest))
    original = prod.fingerprint()

    result = project.run("check", "prod", "--snapshot", f"dev/{snapshot.name}")

    assert result.exit_code == 1
    assert "manifest format 99 is not one this version reads" in result.stderr
    assert prod.fingerprint() == original


@pytest.mark.parametrize(
    ("change", "status", "message"),
    [
        (
            "ALTER TABLE public.answers DROP COLUMN explanation",
            "error",
            "public.answers lacks column explanation",
        ),
        (
            "ALTER TABLE public.topics ALTER COLUMN name TYPE varchar(200)",
            "error",
            "name is character varying(200), the snapshot's is text",
        ),
        (
            "ALTER TABLE public.playlists ADD COLUMN region text NOT NULL DEFAULT 'eu'",
            "warning",
            "public.playlists has an extra column region (it gets its default)",
        ),
        (
            "ALTER TABLE public.playlists ADD COLUMN region text; "
            "UPDATE public.playlists SET region = 'eu'; "
            "ALTER TABLE public.playlists ALTER COLUMN region SET NOT NULL",
            "error",
            "has an extra NOT NULL column region without a default",
        ),
        (
            "ALTER TABLE public.answers ALTER COLUMN explanation SET NOT NULL",
            "warning",
            "explanation is NOT NULL here but nullable in the snapshot",
        ),
    ],
)
def test_schema_drift_is_listed_table_by_table(
    project: Project, make_db, change: str, status: str, message: str
) -> None:
    _dev, prod = setup_pair(project, make_db)
    if "SET NOT NULL" in change and "explanation" in change:
        prod.execute("UPDATE public.answers SET explanation = '' WHERE explanation IS NULL")
    prod.execute(change)
    original = prod.fingerprint()

    result = project.run("check", "prod", "--json")

    found = statuses(result, "schema")
    assert any(s == status and message in d for s, d in found), found
    assert result.exit_code == (1 if status == "error" else 0)
    assert prod.fingerprint() == original


def _migrations(db: Database, versions: list[str]) -> None:
    db.execute(
        "CREATE SCHEMA supabase_migrations; "
        "CREATE TABLE supabase_migrations.schema_migrations (version text PRIMARY KEY, name text); "
        "GRANT USAGE ON SCHEMA supabase_migrations TO app_owner; "
        "GRANT SELECT ON supabase_migrations.schema_migrations TO app_owner"
    )
    for version in versions:
        db.execute("INSERT INTO supabase_migrations.schema_migrations VALUES (%s, 'm')", [version])


def test_migration_history_differences_are_named(project: Project, make_db) -> None:
    dev, prod = make_db("dev"), make_db("prod")
    _migrations(dev, ["20260101000000", "20260301000000", "20260401000000"])
    _migrations(prod, ["20260101000000", "20260201000000"])
    project.point("dev", dev)
    project.point("prod", prod)
    assert project.run("take", "dev").exit_code == 0

    result = project.run("check", "prod", "--json")

    assert result.exit_code == 0  # a warning: the catalog comparison decides
    [(status, detail)] = statuses(result, "migrations")
    assert status == "warning"
    assert "prod lacks 20260301000000, 20260401000000 (applied in dev)" in detail
    assert "dev lacked 20260201000000 (applied in prod)" in detail


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ("RESTRICT", "deleting them would fail; keep them in prod with --keep-referenced"),
        ("NO ACTION", "deleting them would fail"),
        ("CASCADE", "deleting them would delete those rows of public.notifications too"),
        ("SET NULL", "deleting them would null out those rows' playlist_id"),
    ],
)
def test_outside_tables_referencing_the_scope_are_refused(
    project: Project, make_db, rule: str, message: str
) -> None:
    _dev, prod = setup_pair(project, make_db)
    prod.execute(
        "SET ROLE app_owner; CREATE TABLE public.notifications (id int PRIMARY KEY, playlist_id uuid "
        f"REFERENCES public.playlists (id) ON DELETE {rule}); "
        # every playlist of prod is one the snapshot lacks: the apply deletes them
        "INSERT INTO public.notifications SELECT row_number() OVER (), id FROM public.playlists LIMIT 7"
    )
    original = prod.fingerprint([*prod.fingerprint(), "public.notifications"])

    result = project.run("check", "prod", "--json")
    applied = apply(project)

    [(status, detail)] = statuses(result, "scope closure")
    assert status == "error" and message in detail
    assert "7 rows of public.notifications refer to 7 public.playlists rows (id " in detail
    assert "add public.notifications to the scope" not in detail  # that would delete prod's
    assert result.exit_code == 1 and applied.exit_code == 1
    assert "scope closure" in applied.stdout and "nothing was changed" in applied.stderr
    assert prod.fingerprint([*original]) == original


def test_acknowledged_cascades_go_through(project: Project, make_db) -> None:
    _dev, prod = setup_pair(project, make_db)
    prod.execute(
        "SET ROLE app_owner; CREATE TABLE public.notifications (id int PRIMARY KEY, playlist_id uuid "
        "REFERENCES public.playlists (id) ON DELETE CASCADE); "
        # every playlist of prod is one the snapshot lacks: the apply deletes them
        "INSERT INTO public.notifications SELECT row_number() OVER (), id FROM public.playlists LIMIT 7"
    )
    name = "public.notifications.notifications_playlist_id_fkey"
    ids = [str(r[0]) for r in prod.execute("SELECT playlist_id FROM public.notifications")]
    sample = ", ".join(sorted(ids)[:5])

    flagged = project.run("check", "prod", "--json", "--allow-cascade", name)
    project.config(f'[preflight]\nallow_cascades = ["{name}"]\n')
    applied = apply(project)

    assert flagged.exit_code == 0
    assert statuses(flagged, "scope closure") == [
        (
            "warning",
            "public.notifications(playlist_id) -> public.playlists(id) (on delete cascade): "
            "7 rows of public.notifications refer to 7 public.playlists rows (id "
            + sample
            + ", …) the snapshot lacks: those rows will be deleted (acknowledged)",
        )
    ]
    assert applied.exit_code == 0, applied.output
    assert prod.scalar("SELECT count(*) FROM public.notifications") == 0


def test_a_rollback_accepts_the_cascades_it_is_told_to(project: Project, make_db) -> None:
    dev, prod = setup_pair(project, make_db)
    for db in (dev, prod):
        db.execute(
            "SET ROLE app_owner; CREATE TABLE public.notifications (id int PRIMARY KEY, "
            "playlist_id uuid REFERENCES public.playlists (id) ON DELETE SET NULL)"
        )
    name = "public.notifications.notifications_playlist_id_fkey"
    before = prod.fingerprint(SCOPE)  # auth users the apply creates stay: never deleted
    assert project.run("take", "dev").exit_code == 0
    assert project.run("apply", "prod", "--yes").exit_code == 0
    # The app goes on: its notifications now refer to playlists the rollback removes.
    prod.execute(
        "INSERT INTO public.notifications SELECT row_number() OVER (), id FROM public.playlists "
        "LIMIT 5"
    )

    refused = project.run("rollback", "prod", "--yes")
    accepted = project.run("rollback", "prod", "--yes", "--allow-cascade", name)

    assert refused.exit_code == 1, refused.output
    assert f"--allow-cascade {name}" in refused.stderr
    assert accepted.exit_code == 0, accepted.output
    assert prod.fingerprint(SCOPE) == before
    assert prod.scalar("SELECT count(*) FROM public.notifications WHERE playlist_id IS NULL") == 5


def test_scope_rows_pointing_at_missing_outside_rows_are_refused(project: Project, make_db) -> None:
    dev, prod = make_db("dev"), make_db("prod")
    for db, regions in ((dev, 3), (prod, 1)):
        db.execute(
            "SET ROLE app_owner; CREATE TABLE public.regions (id int PRIMARY KEY); "
            f"INSERT INTO public.regions SELECT generate_series(1, {regions}); "
            "ALTER TABLE public.users ADD COLUMN region_id int REFERENCES public.regions (id)"
        )
    dev.execute(
        "UPDATE public.users SET region_id = 1 + get_byte(decode(md5(id::text), 'hex'), 0) % 3"
    )
    project.point("dev", dev)
    project.point("prod", prod)
    assert project.run("take", "dev").exit_code == 0
    expected = dev.scalar("SELECT count(*) FROM public.users WHERE region_id > 1")
    original = prod.fingerprint()

    result = project.run("check", "prod", "--json")

    [(status, detail)] = statuses(result, "outside references")
    assert status == "error"
    assert (
        f"{expected:,} snapshot rows of public.users point at public.regions rows the target lacks"
        in detail
    )
    assert result.exit_code == 1 and prod.fingerprint() == original


def test_auth_users_whose_email_or_phone_is_taken_are_refused(project: Project, make_db) -> None:
    dev, prod = setup_pair(project, make_db)
    # dev's user 160 is missing in prod; prod gets another user with its email and phone.
    email, phone = dev.execute(
        "SELECT email, phone FROM auth.users WHERE id = md5('user-160')::uuid"
    )[0]
    prod.execute(
        "INSERT INTO auth.users (id, email, phone) VALUES (md5('intruder')::uuid, %s, %s)",
        [email, phone],
    )
    original = prod.fingerprint()

    result = project.run("check", "prod", "--json")
    applied = apply(project)

    [(status, detail)] = statuses(result, "auth users")
    assert status == "error"
    intruder = prod.scalar("SELECT md5('intruder')::uuid")
    assert re.search(
        rf"\(u\*\*\*@example\.com \[[0-9a-f]{{4}}\]\) has the email of {intruder}", detail
    )
    assert "has the phone of" in detail
    assert email not in result.stdout  # masked
    assert applied.exit_code == 1 and prod.fingerprint() == original


@pytest.fixture
def weak_role(server) -> Iterator[str]:
    """A login role of this test's own, with no privilege yet (dropped afterwards)."""
    name = f"snapshot_weak_{os.getpid()}"
    with server.connect() as conn:
        conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(name)))
    yield name
    with server.connect() as conn:
        mine = conn.execute(
            "SELECT datname FROM pg_database WHERE starts_with(datname, %s)", [PREFIX]
        ).fetchall()
        for db in mine:
            with contextlib.suppress(psycopg.Error), server.connect(db[0]) as other:
                other.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(name)))
        conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))


READ_ONLY = (
    "GRANT USAGE ON SCHEMA auth TO {role}; GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role}; "
    "GRANT SELECT ON ALL TABLES IN SCHEMA auth TO {role}"
)


def test_a_read_only_role_gets_advice_that_works_as_printed(
    project: Project, make_db, server, weak_role: str
) -> None:
    _dev, prod = setup_pair(project, make_db)
    prod.execute(READ_ONLY.format(role=weak_role))
    project.env("prod", SUPABASE_DB_URL=prod.server.url(prod.name, weak_role))
    original = prod.fingerprint()

    result = project.run("check", "prod", "--json")
    applied = apply(project)

    assert result.exit_code == 1 and result.stdout, result.output
    advice = " ".join(d for _, d in statuses(result, "privileges"))
    assert f'GRANT INSERT, UPDATE, DELETE ON "public"."questions" TO {weak_role};' in advice
    assert f'GRANT INSERT ON "auth"."users" TO {weak_role};' in advice
    assert "row-level security would hide rows" in advice
    # PostgreSQL refuses ALTER SEQUENCE ... OWNER TO for a sequence linked to its table
    assert "OWNER TO" not in advice
    assert "may not restart the sequences of public." in advice
    assert applied.exit_code == 1 and prod.fingerprint() == original

    # Run as printed (the superuser's part too), the advice makes the apply possible.
    for statement in re.findall(r"(GRANT [^;]+;|ALTER ROLE \S+ BYPASSRLS)", advice):
        prod.execute(statement)
    rechecked = project.run("check", "prod", "--json")
    assert rechecked.exit_code == 0, rechecked.output
    assert statuses(rechecked, "privileges")[0][0] == "ok"


@pytest.mark.parametrize("command", ["take", "verify"])
def test_a_role_row_level_security_filters_is_told_which_table_and_the_fix(
    project: Project, make_db, weak_role: str, command: str
) -> None:
    dev, prod = setup_pair(project, make_db)
    dev.execute(READ_ONLY.format(role=weak_role))
    project.env("dev", SUPABASE_DB_URL=dev.server.url(dev.name, weak_role))
    taken = project.snapshots()
    before = dev.fingerprint(), prod.fingerprint()

    result = project.run(*(["take", "dev"] if command == "take" else ["verify", "dev", "prod"]))

    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    [line] = result.stderr.strip().splitlines()[-1:]
    assert line.startswith("Error: cannot "), line
    # three tables named, and how many more (verify reads no auth.identities)
    assert re.search(r"would hide rows of auth\.\w+, \w+\.\w+, \w+\.\w+ and 1[45] more", line)
    assert f"ALTER ROLE {weak_role} BYPASSRLS" in line, line
    assert "query would be affected" not in result.output
    assert project.snapshots() == taken
    assert (dev.fingerprint(), prod.fingerprint()) == before


def test_a_running_apply_is_reported(project: Project, make_db) -> None:
    _dev, prod = setup_pair(project, make_db)
    original = prod.fingerprint()
    with prod.connect() as other:
        other.execute("SELECT pg_advisory_lock(%s)", [ADVISORY_KEY])
        pid = other.info.backend_pid

        result = project.run("check", "prod", "--json")
        applied = apply(project)

    [(status, detail)] = statuses(result, "one apply at a time")
    assert status == "error" and f"backend pid {pid}" in detail
    assert applied.exit_code == 1 and "one apply at a time" in applied.stdout
    assert prod.fingerprint() == original


def test_a_pg_restore_older_than_the_snapshot_is_refused(
    project: Project, make_db, pg16: localpg.LocalServer, pg_bin: Path
) -> None:
    prod = make_db("prod")
    project.env("dev", SUPABASE_DB_URL=pg16.url("app", user="app_owner"))
    project.point("prod", prod)
    assert project.run("--pg-bin", str(localpg.embedded_bin(16)), "take", "dev").exit_code == 0
    original = prod.fingerprint()

    result = project.run("--pg-bin", str(pg_bin), "check", "prod", "--json")

    tooling = statuses(result, "tooling")
    assert any(s == "error" and "needs pg_restore 16 or newer" in d for s, d in tooling)
    assert result.exit_code == 2 and prod.fingerprint() == original  # an installation problem


def test_smoke_reports_each_guardrail_holding(project: Project, make_db) -> None:
    prod = make_db("prod")
    project.point("prod", prod)
    original = prod.fingerprint()

    result = project.run("smoke", "prod")

    assert result.exit_code == 0, result.output
    assert "smoke prod: 3/3 guardrails hold" in result.stdout
    assert prod.fingerprint() == original  # always rolled back


def test_smoke_fails_when_a_guardrail_was_removed(project: Project, make_db) -> None:
    prod = make_db("prod")
    project.point("prod", prod)
    prod.execute("DROP TRIGGER question_topics_unlink_guardrail ON public.question_topics")
    original = prod.fingerprint()

    result = project.run("smoke", "prod", "--json")

    assert result.exit_code == 1
    report = json.loads(result.stdout)
    status = {r["check"]: r["status"] for r in report["results"]}
    assert status == {
        "010_publish_without_topic_links": "holds",
        "020_insert_published_question": "holds",
        "030_unlink_topic_from_published": "DOES NOT HOLD",
    }
    assert "guardrails of prod do not hold: 030_unlink_topic_from_published" in result.stderr
    assert prod.fingerprint() == original


# An app that is not ours: uuid keys, no title, text statuses, its own guardrail wording
# (the same contract: no published question without topic links).
BARE = """
DROP TABLE public.question_topics, public.questions, public.topics CASCADE;
"""
OTHER_APP = (
    BARE
    + """
SET ROLE app_owner;
CREATE TABLE public.topics (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), name text);
CREATE TABLE public.questions (id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    status text NOT NULL DEFAULT 'draft', body text NOT NULL,
    topic_hint uuid NOT NULL REFERENCES public.topics (id));
CREATE TABLE public.question_topics (
    question_id uuid NOT NULL REFERENCES public.questions (id) ON DELETE CASCADE,
    topic_id uuid NOT NULL REFERENCES public.topics (id), PRIMARY KEY (question_id, topic_id));
CREATE FUNCTION public.publish_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF NEW.status = 'published' AND NOT EXISTS (
      SELECT 1 FROM public.question_topics WHERE question_id = NEW.id) THEN
    RAISE EXCEPTION 'question % cannot go live without topic links', NEW.id;
  END IF;
  RETURN NEW;
END $$;
CREATE TRIGGER publish_guard BEFORE INSERT OR UPDATE OF status ON public.questions
    FOR EACH ROW EXECUTE FUNCTION public.publish_guard();
CREATE FUNCTION public.unlink_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF EXISTS (SELECT 1 FROM public.questions WHERE id = OLD.question_id
             AND status = 'published') THEN
    RAISE EXCEPTION 'cannot unlink topic from a live question';
  END IF;
  RETURN OLD;
END $$;
CREATE TRIGGER unlink_guard BEFORE DELETE ON public.question_topics
    FOR EACH ROW EXECUTE FUNCTION public.unlink_guard();
INSERT INTO public.topics (name) SELECT 'topic ' || i FROM generate_series(1, 3) i;
INSERT INTO public.questions (status, body, topic_hint)
    SELECT 'draft', 'q' || i, (SELECT min(id::text)::uuid FROM public.topics)
    FROM generate_series(1, 4) i;
INSERT INTO public.question_topics SELECT q.id, t.id FROM public.questions q, public.topics t;
UPDATE public.questions SET status = 'published';
RESET ROLE;
"""
)


def test_bundled_smoke_checks_work_on_an_app_that_is_not_ours(project: Project, make_db) -> None:
    prod = make_db("empty")
    prod.execute(OTHER_APP)
    project.point("prod", prod)
    original = prod.fingerprint(["public.questions", "public.question_topics"])

    result = project.run("smoke", "prod", "--json")

    assert result.exit_code == 0, result.output
    status = {r["check"]: r["status"] for r in json.loads(result.stdout)["results"]}
    assert status == dict.fromkeys(
        [
            "010_publish_without_topic_links",
            "020_insert_published_question",
            "030_unlink_topic_from_published",
        ],
        "holds",
    )
    assert prod.fingerprint(["public.questions", "public.question_topics"]) == original


def test_bundled_smoke_checks_skip_what_an_app_lacks(project: Project, make_db) -> None:
    prod = make_db("empty")
    prod.execute(BARE)
    project.point("prod", prod)

    result = project.run("smoke", "prod", "--json")

    results = json.loads(result.stdout)["results"]
    assert [r["status"] for r in results] == ["skipped"] * 3
    assert all("absent here" in r["detail"] for r in results)
    assert json.loads(result.stdout)["ok"] is False
    # Nothing tested is no pass, and says so rather than "0/3 guardrails hold".
    assert result.exit_code == 1, result.output
    table = project.run("smoke", "prod")
    assert table.exit_code == 1, table.output
    assert table.stdout.strip().endswith(
        "smoke prod: nothing tested: all 3 checks skipped (what they check is absent in prod)"
    )
    assert table.stderr.strip().splitlines()[-1] == (
        "Error: smoke prod is no pass: nothing tested: all 3 checks skipped (what they check "
        "is absent in prod)"
    )


def test_check_shows_migrations_and_scope_closure_when_clean(project: Project, make_db) -> None:
    setup_pair(project, make_db, dev_kind="empty")

    result = project.run("check", "prod", "--json")

    statuses = {f["check"]: f["status"] for f in json.loads(result.stdout)["findings"]}
    assert statuses["migrations"] == "ok" and statuses["scope closure"] == "ok"
