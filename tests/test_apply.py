"""`snapshot apply` and `rollback`: atomic, guardrail-safe, verified before commit."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import psycopg
import pytest

from snapshot import localpg
from snapshot.scripts import bundled_sql
from tests.fix_apps import apply, setup_pair
from tests.fix_db import ALL_TABLES, SCOPE_TABLES, SQL, Database
from tests.fix_project import Project

GUARDRAIL_TRIGGERS = ("questions_publish_guardrail", "question_topics_unlink_guardrail")


def assert_guardrails_hold(db: Database) -> None:
    """Both guardrail triggers are installed, enabled, and refuse what they must."""
    enabled = dict(
        db.execute(
            "SELECT tgname, tgenabled FROM pg_trigger WHERE tgname = ANY(%s)",
            [list(GUARDRAIL_TRIGGERS)],
        )
    )
    assert enabled == dict.fromkeys(GUARDRAIL_TRIGGERS, "O")
    with db.connect() as conn:
        published, topic = conn.execute(
            "SELECT question_id, topic_id FROM public.question_topics qt JOIN public.questions q "
            "ON q.id = qt.question_id WHERE q.status = 'published' LIMIT 1"
        ).fetchone()
        with pytest.raises(psycopg.errors.CheckViolation, match="cannot unlink topic"):
            conn.execute(
                "DELETE FROM public.question_topics WHERE question_id = %s AND topic_id = %s",
                (published, topic),
            )
        with pytest.raises(psycopg.errors.CheckViolation, match="without topic links"):
            conn.execute(
                "INSERT INTO public.questions (subcategory_id, status, title, body) "
                "VALUES (1, 'published', 'x', 'y')"
            )


def test_apply_makes_the_target_equal_to_the_snapshot(project: Project, make_db) -> None:
    dev, prod = setup_pair(project, make_db)
    assert prod.fingerprint(SCOPE_TABLES) != dev.fingerprint(SCOPE_TABLES)

    result = apply(project)

    assert result.exit_code == 0, result.output
    assert prod.fingerprint(SCOPE_TABLES) == dev.fingerprint(SCOPE_TABLES)
    assert "16/16 tables match; committed" in result.stdout
    for table in SCOPE_TABLES:
        # table, mode, insert, update, delete, unchanged, snapshot, before, after, checksum
        assert re.search(
            rf"^{re.escape(table)}\s+(delta|full)(\s+[\d,]+){{7}}\s+match", result.stdout, re.M
        ), table
    # Progress per phase and per table went to stderr.
    for phase in (
        "preflight",
        "staged   public.questions",
        "locking",
        "backing up prod",
        "pre-scripts",
        "deleting",
        "inserting",
        "post-scripts",
        "verifying",
    ):
        assert phase in result.stderr
    assert_guardrails_hold(prod)


def test_sequences_follow_the_snapshot_and_new_rows_insert(project: Project, make_db) -> None:
    dev, prod = setup_pair(project, make_db)

    assert apply(project).exit_code == 0

    sequences = [
        r[0]
        for r in dev.execute(
            "SELECT format('%I.%I', schemaname, sequencename) FROM pg_sequences WHERE schemaname = 'public'"
        )
    ]
    assert len(sequences) == 7
    for seq in sequences:
        assert prod.scalar(f"SELECT nextval('{seq}')") == dev.scalar(f"SELECT nextval('{seq}')"), (
            seq
        )
    user = prod.scalar("SELECT id FROM public.users LIMIT 1")
    with prod.connect() as conn:
        conn.execute("INSERT INTO public.categories (slug, name) VALUES ('new', 'New')")
        conn.execute(
            "INSERT INTO public.subcategories (category_id, slug, name) VALUES (1, 'new', 'New')"
        )
        conn.execute(
            "INSERT INTO public.topics (subcategory_id, slug, name) VALUES (1, 'new-topic', 'New')"
        )
        question = conn.execute(
            "INSERT INTO public.questions (subcategory_id, title, body) VALUES (1, 'q', 'b') RETURNING id"
        ).fetchone()[0]
        conn.execute(
            "INSERT INTO public.answers (question_id, position, body) VALUES (%s, 1, 'a')",
            (question,),
        )
        conn.execute(
            "INSERT INTO public.content_revisions (question_id, revision, diff) VALUES (%s, 1, '{}')",
            (question,),
        )
        conn.execute(
            "INSERT INTO public.question_attempts (user_id, question_id, is_correct) VALUES (%s, %s, true)",
            (user, question),
        )


def test_auth_users_are_created_never_touched(project: Project, make_db) -> None:
    dev, prod = setup_pair(project, make_db)
    before = {r[0]: r[1] for r in prod.execute("SELECT id, u::text FROM auth.users u")}
    identities_before = {
        r[0]: r[1] for r in prod.execute("SELECT id, i::text FROM auth.identities i")
    }
    dev_ids = {r[0] for r in dev.execute("SELECT id FROM auth.users")}
    assert (
        prod.scalar(
            "SELECT count(*) FROM pg_trigger WHERE tgname = 'on_auth_user_created' AND tgenabled = 'O'"
        )
        == 1
    )

    result = apply(project)

    assert result.exit_code == 0, result.output
    after = {r[0]: r[1] for r in prod.execute("SELECT id, u::text FROM auth.users u")}
    # Every target auth user is byte for byte as it was (dev has other metadata for them).
    assert {k: after[k] for k in before} == before
    created = set(after) - set(before)
    assert created == dev_ids - set(before) and len(created) == 50
    # Created users are dev's, with their identities.
    dev_rows = {r[0]: r[1] for r in dev.execute("SELECT id, u::text FROM auth.users u")}
    assert {k: after[k] for k in created} == {k: dev_rows[k] for k in created}
    identities = {r[0]: r[1] for r in prod.execute("SELECT id, i::text FROM auth.identities i")}
    assert {k: identities[k] for k in identities_before} == identities_before
    assert (
        prod.scalar("SELECT count(*) FROM auth.identities WHERE user_id = ANY(%s)", [list(created)])
        == 50
    )
    assert "auth.users: 200 in the snapshot, 50 created (50 identities), 0 missing" in result.stdout
    # handle_new_user added public.users rows for them; the apply replaced them with dev's.
    assert prod.fingerprint(["public.users"]) == dev.fingerprint(["public.users"])


def test_pre_apply_backup_holds_the_replaced_state(
    project: Project, make_db, restore_bin: Path
) -> None:
    _dev, prod = setup_pair(project, make_db)
    original = prod.fingerprint()

    result = apply(project)

    assert result.exit_code == 0
    [backup] = project.snapshots("prod")
    assert backup.name.endswith("-pre-apply")
    manifest = json.loads((backup / "manifest.json").read_text())
    assert manifest["kind"] == "pre-apply" and manifest["applies"].startswith("dev/")
    assert {t["table"]: t["rows"] for t in manifest["tables"]} == {
        t: original[t][0] for t in ALL_TABLES
    }
    assert f"backup: prod/{backup.name}" in result.stdout
    restored = make_db("empty")
    import subprocess

    subprocess.run(
        [
            str(restore_bin / "pg_restore"),
            "--data-only",
            "--disable-triggers",
            "-d",
            restored.server.url(restored.name),
            str(backup / "data.dump"),
        ],
        check=True,
        capture_output=True,
    )
    assert restored.fingerprint() == original


def test_rollback_restores_the_exact_pre_apply_state(project: Project, make_db) -> None:
    _dev, prod = setup_pair(project, make_db)
    original = prod.fingerprint(SCOPE_TABLES)
    auth_before = {r[0]: r[1] for r in prod.execute("SELECT id, u::text FROM auth.users u")}
    assert apply(project).exit_code == 0
    assert prod.fingerprint(SCOPE_TABLES) != original

    result = project.run("rollback", "prod", "--yes")

    assert result.exit_code == 0, result.output
    assert prod.fingerprint(SCOPE_TABLES) == original
    auth_after = {r[0]: r[1] for r in prod.execute("SELECT id, u::text FROM auth.users u")}
    assert {k: auth_after[k] for k in auth_before} == auth_before  # created users stay
    assert "rollback prod/" in result.stdout and "16/16 tables match; committed" in result.stdout
    assert_guardrails_hold(prod)
    labels = sorted(p.name.split("-", 1)[1] for p in project.snapshots("prod"))
    assert labels == ["pre-apply", "pre-rollback"]


def test_rollback_refuses_a_snapshot_of_another_database(project: Project, make_db) -> None:
    _dev, prod = setup_pair(project, make_db)
    [snapshot] = project.snapshots("dev")
    original = prod.fingerprint()

    result = project.run("rollback", "prod", "--yes", "--to", f"dev/{snapshot.name}")

    assert result.exit_code == 1
    table = " ".join(result.stdout.split())
    assert "was taken from dev" in table and "not from prod" in table
    assert "Error: preflight found 1 error for rollback" in result.stderr
    assert prod.fingerprint() == original


def test_dry_run_changes_nothing(project: Project, make_db) -> None:
    _dev, prod = setup_pair(project, make_db)
    original = prod.fingerprint()
    sequences = prod.execute("SELECT sequencename, last_value FROM pg_sequences ORDER BY 1")

    result = project.run("apply", "prod", "--dry-run")

    assert result.exit_code == 0, result.output
    assert "16/16 tables match; dry run, rolled back: nothing changed" in result.stdout
    assert prod.fingerprint() == original
    assert prod.execute("SELECT sequencename, last_value FROM pg_sequences ORDER BY 1") == sequences
    assert project.snapshots("prod") == []
    assert "backing up" not in result.stderr


def test_apply_json_is_machine_readable(project: Project, make_db) -> None:
    setup_pair(project, make_db)

    result = apply(project, "--json")

    report = json.loads(result.stdout)
    assert report["committed"] and report["matches"] and report["backup"].startswith("prod/")
    assert len(report["tables"]) == 16 and all(t["match"] for t in report["tables"])
    assert report["auth"]["created_users"] == 50
    assert [p["phase"] for p in report["phases"]][:3] == ["preflight", "backing up", "locking"]


def test_a_database_is_never_synced_onto_itself(project: Project, make_db) -> None:
    dev = make_db("dev")
    project.point("dev", dev)
    project.point("prod", dev)  # a copy-paste slip: prod's env file points at dev
    assert project.run("take", "dev").exit_code == 0
    original = dev.fingerprint()

    result = apply(project)

    assert result.exit_code == 1
    table = " ".join(result.stdout.split())  # the detail column wraps
    assert f"was taken from prod itself (connection 127.0.0.1:{dev.server.port}/" in table
    assert "Error: preflight found 1 error for apply dev/" in result.stderr
    assert "staged public." not in result.stderr  # stopped before staging anything
    assert dev.fingerprint() == original


def test_same_project_ref_is_refused(project: Project, make_db) -> None:
    dev, prod = make_db("dev"), make_db("prod")
    project.env("dev", SUPABASE_DB_URL=dev.app_url, SUPABASE_PROJECT_REF="abcdefghijklmnopqrst")
    project.env("prod", SUPABASE_DB_URL=prod.app_url, SUPABASE_PROJECT_REF="abcdefghijklmnopqrst")
    assert project.run("take", "dev").exit_code == 0
    original = prod.fingerprint()

    result = apply(project)

    assert result.exit_code == 1
    assert "project ref abcdefghijklmnopqrst" in " ".join(result.stdout.split())
    assert prod.fingerprint() == original


def test_non_interactive_apply_without_yes_is_refused(project: Project, make_db) -> None:
    _dev, prod = setup_pair(project, make_db)
    original = prod.fingerprint()

    result = project.run("apply", "prod")

    assert result.exit_code == 2
    assert "refusing to change prod without confirmation" in result.stderr
    assert prod.fingerprint() == original and project.snapshots("prod") == []


def test_safe_environments_need_no_confirmation(project: Project, make_db) -> None:
    dev, prod = make_db("dev"), make_db("prod")
    project.point("dev", dev)
    project.point("prod", prod)
    project.config("[environments.staging]\nsafe = true\n[environments.prod]\nsafe = true\n")
    project.env("staging", SUPABASE_DB_URL=prod.app_url)
    assert project.run("take", "dev").exit_code == 0

    result = project.run("apply", "prod")  # dev -> prod, the usual way, onto a safe prod
    other = project.run("apply", "staging", "--from", "dev")  # a safe target, another way

    assert result.exit_code == 0, result.output
    assert dev.fingerprint(SCOPE_TABLES) == prod.fingerprint(SCOPE_TABLES)
    assert other.exit_code == 2
    assert "dev -> staging is not the usual direction (dev -> prod)" in other.stderr


def test_an_updated_at_trigger_a_script_fires_leaves_no_trace(project: Project, make_db) -> None:
    dev, prod = setup_pair(project, make_db)
    prod.execute(
        "CREATE FUNCTION public.touch() RETURNS trigger LANGUAGE plpgsql AS $$ "
        "BEGIN NEW.updated_at := now(); RETURN NEW; END $$; "
        "CREATE TRIGGER touch BEFORE UPDATE ON public.user_preferences FOR EACH ROW EXECUTE FUNCTION public.touch()"
    )
    scripts = project.path / "sql"
    (scripts / "pre").mkdir(parents=True)
    (scripts / "post").mkdir()
    for phase in ("pre", "post"):
        for f in (SQL / phase).glob("*.sql"):
            (scripts / phase / f.name).write_text(f.read_text())
    (scripts / "post" / "020_touch.sql").write_text(
        "UPDATE public.user_preferences SET theme = theme;\n"
    )

    applied = apply(project)

    assert applied.exit_code == 0, applied.output
    assert "tried first" not in applied.output
    assert re.search(
        r"public\.user_preferences: trigger touch wrote updated_at into [\d,]+ rows", applied.stdout
    )
    assert prod.fingerprint(SCOPE_TABLES) == dev.fingerprint(SCOPE_TABLES)

    # [parity] ignore_columns still leaves a column out of the comparison, and says so.
    project.config('[parity]\nignore_columns = ["user_preferences.updated_at"]\n')
    accepted = apply(project)

    assert accepted.exit_code == 0, accepted.output
    assert re.search(r"public\.user_preferences .* match\s+ignores updated_at", accepted.stdout)


def test_lock_timeout_gives_up_cleanly(project: Project, make_db) -> None:
    _dev, prod = setup_pair(project, make_db)
    project.config('[apply]\nlock_timeout = "500ms"\n')
    original = prod.fingerprint()
    with prod.connect() as writer:
        writer.autocommit = False
        writer.execute("UPDATE public.topics SET name = name WHERE id = 1")

        result = apply(project)

        writer.rollback()
    assert result.exit_code == 1
    assert "could not lock public.topics on prod within 500ms" in result.stderr
    assert prod.fingerprint() == original and project.snapshots("prod") == []


@pytest.mark.parametrize("source_fixture", ["pg16"])
def test_a_newer_major_source_applies_to_an_older_target(
    project: Project, make_db, request: pytest.FixtureRequest, source_fixture: str
) -> None:
    source: localpg.LocalServer = request.getfixturevalue(source_fixture)
    major = int(source_fixture[2:])
    prod = make_db("prod")
    if prod.server.major() >= major:
        pytest.skip(f"the test server is not older than PostgreSQL {major}")
    project.env("dev", SUPABASE_DB_URL=source.url("app", user="app_owner"))
    project.point("prod", prod)
    bin_dir = str(localpg.embedded_bin(major))
    assert project.run("--pg-bin", bin_dir, "take", "dev").exit_code == 0

    result = project.run("--pg-bin", bin_dir, "apply", "prod", "--yes")

    assert result.exit_code == 0, result.output
    with psycopg.connect(source.url("app")) as conn:
        conn.execute("SET TimeZone = 'UTC'; SET extra_float_digits = 1")
        expected = {}
        for table in SCOPE_TABLES:
            expected[table] = conn.execute(
                f"SELECT count(*), md5(coalesce(string_agg(t::text, E'\\n' ORDER BY t::text), '')) FROM {table} t"
            ).fetchone()
    assert prod.fingerprint(SCOPE_TABLES) == {k: tuple(v) for k, v in expected.items()}


def test_a_snapshot_with_md5_checksums_still_applies_and_rolls_back(
    project: Project, make_db
) -> None:
    # Snapshots and backups written before the faster row hash carry md5 checksums: whatever
    # is compared with them is computed the same way.
    from snapshot import checksum
    from snapshot.names import TableName

    dev, prod = setup_pair(project, make_db)
    original = prod.fingerprint()
    [taken] = project.snapshots("dev")
    path = taken / "manifest.json"
    manifest = json.loads(path.read_text())
    assert all(t["checksum"].startswith("h2:") for t in manifest["tables"])
    with psycopg.connect(dev.app_url) as conn:
        conn.execute("SET TimeZone = 'UTC'; SET extra_float_digits = 1")
        for table in manifest["tables"]:
            columns = [c["name"] for c in table["columns"]]
            name = TableName(table["schema"], table["name"])
            stats = checksum.table_stats(conn, name, columns, kind=checksum.MD5)
            assert stats.rows == table["rows"]
            table["checksum"] = stats.checksum
    path.write_text(json.dumps(manifest, indent=2))

    applied = apply(project)

    assert applied.exit_code == 0, applied.output  # staged rows and parity against md5
    assert prod.fingerprint(SCOPE_TABLES) == dev.fingerprint(SCOPE_TABLES)
    [backup] = project.snapshots("prod")
    kinds = {
        t["name"]: checksum.kind_of(t["checksum"])
        for t in json.loads((backup / "manifest.json").read_text())["tables"]
    }
    assert kinds["questions"] == checksum.MD5  # the applied snapshot's, from its record
    rolled = project.run("rollback", "prod", "--yes")
    assert rolled.exit_code == 0, rolled.output
    assert prod.fingerprint(SCOPE_TABLES) == {t: original[t] for t in SCOPE_TABLES}


def test_parity_finds_the_rows_the_apply_wrote_by_their_transaction_id(
    project: Project, make_db
) -> None:
    # Parity after a delta hashes only the rows this apply wrote (found by xmin) and
    # subtracts the versions they replaced: the counts add up, no table needs the slow path.
    dev, prod = setup_pair(project, make_db)
    assert apply(project).exit_code == 0
    dev.execute(
        "UPDATE public.answers SET body = body || ' (edited)' WHERE id % 10 = 3;"
        "DELETE FROM public.user_question_progress WHERE attempts % 7 = 1;"
        "INSERT INTO public.question_attempts (user_id, question_id, is_correct) "
        "SELECT user_id, question_id, NOT is_correct FROM public.question_attempts "
        "WHERE id % 10 = 1;"
        "UPDATE public.questions SET body = body || ' (edited)' WHERE id % 10 = 2;"
    )
    assert project.run("take", "dev").exit_code == 0

    result = project.run("-v", "apply", "prod", "--yes", "--json")

    assert result.exit_code == 0, result.output
    assert prod.fingerprint(SCOPE_TABLES) == dev.fingerprint(SCOPE_TABLES)
    changes = {t["table"]: t for t in json.loads(result.stdout)["changes"]}
    assert changes["public.answers"]["update"] > 0
    assert changes["public.user_question_progress"]["delete"] > 0
    assert all(t["mode"] == "delta" for t in changes.values())
    assert "matching every row with the record" not in result.stderr


def test_block_readers_gives_the_same_prod_with_its_foreign_keys_and_guardrails_intact(
    project: Project, make_db
) -> None:
    dev, prod = setup_pair(project, make_db)
    keys = "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) FROM pg_constraint "
    keys += "WHERE contype = 'f' ORDER BY 1, 2"
    before = prod.execute(keys)

    result = apply(project, "--block-readers")

    assert result.exit_code == 0, result.output
    assert prod.fingerprint(SCOPE_TABLES) == dev.fingerprint(SCOPE_TABLES)
    assert prod.execute(keys) == before
    assert "foreign keys were checked in bulk; readers of 16 tables" in " ".join(
        result.output.split()
    )
    assert_guardrails_hold(prod)


def test_scripts_read_which_tables_the_plan_leaves_unchanged(project: Project, make_db) -> None:
    dev, prod = setup_pair(project, make_db)
    assert apply(project).exit_code == 0  # prod now holds dev's rows
    dev.execute("UPDATE public.answers SET body = body || ' (edited)' WHERE id = 1")
    assert project.run("take", "dev").exit_code == 0
    prod.execute("CREATE TABLE public.seen (unchanged text[], full_replace text[])")
    prod.execute("GRANT INSERT ON public.seen TO app_owner")
    pre = project.path / "sql" / "pre"
    pre.mkdir(parents=True)
    shutil.copy(bundled_sql() / "pre" / "010_questions_to_draft.sql", pre)
    (pre / "020_seen.sql").write_text(
        "INSERT INTO public.seen SELECT current_setting('snapshot.unchanged')::text[], "
        "current_setting('snapshot.full_replace')::text[];"
    )
    questions = prod.execute("SELECT id, xmin::text FROM public.questions ORDER BY id")

    result = apply(project)

    assert result.exit_code == 0, result.output
    [(unchanged, full)] = prod.execute("SELECT unchanged, full_replace FROM public.seen")
    assert full == []
    assert set(unchanged) == set(SCOPE_TABLES) - {"public.answers"}
    # No link changed: the bundled pre-script drafted no question (none was written).
    assert prod.execute("SELECT id, xmin::text FROM public.questions ORDER BY id") == questions
