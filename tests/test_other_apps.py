"""An app built otherwise than the bundled one, end to end through the CLI: Prisma's way.

PascalCase quoted names, text (cuid) and uuid keys, an enum and a domain, ``bytea``,
``numeric``, ``timestamp(3)``, arrays, ``jsonb``, an ``interval``, a generated column, an
``IDENTITY ALWAYS`` key, Prisma's implicit many-to-many table (no primary key, a unique
index over two NOT NULL columns), a table whose only unique key allows NULLs (so it has no
usable key), a composite key holding an enum, and ``ON UPDATE CASCADE`` foreign keys.
"""

from __future__ import annotations

import json
import re

import psycopg
import pytest

from tests.fix_apps import plain_app_pair
from tests.fix_db import Database
from tests.fix_project import Project

SCHEMA = """
SET ROLE app_owner;
CREATE TYPE public."Role" AS ENUM ('USER', 'ADMIN');
CREATE DOMAIN public.email AS text CHECK (VALUE LIKE '%@%');
CREATE TABLE public."User" (
    id text PRIMARY KEY, email public.email NOT NULL UNIQUE,
    role public."Role" NOT NULL DEFAULT 'USER', "order" int, "user" text, avatar bytea,
    balance numeric(12, 2), "createdAt" timestamp(3) NOT NULL DEFAULT now(),
    "updatedAt" timestamp(3) NOT NULL);
CREATE TABLE public."Post" (
    id uuid PRIMARY KEY,
    "authorId" text NOT NULL REFERENCES public."User" (id) ON DELETE CASCADE ON UPDATE CASCADE,
    title text NOT NULL, tags text[], meta jsonb, took interval,
    words int GENERATED ALWAYS AS (length(title)) STORED);
CREATE TABLE public."Tag" (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY, name text NOT NULL);
CREATE TABLE public."_PostToTag" (
    "A" uuid NOT NULL REFERENCES public."Post" (id) ON DELETE CASCADE ON UPDATE CASCADE,
    "B" int NOT NULL REFERENCES public."Tag" (id) ON DELETE CASCADE ON UPDATE CASCADE);
CREATE UNIQUE INDEX "_PostToTag_AB_unique" ON public."_PostToTag" ("A", "B");
CREATE INDEX "_PostToTag_B_index" ON public."_PostToTag" ("B");
CREATE TABLE public."Setting" (key text UNIQUE, value text);
CREATE TABLE public."Seen" (
    "userId" text NOT NULL REFERENCES public."User" (id) ON UPDATE CASCADE,
    role public."Role" NOT NULL, at timestamptz NOT NULL, PRIMARY KEY ("userId", role));
RESET ROLE;
"""
SCOPE = [
    'public."User"',
    'public."Post"',
    'public."Tag"',
    'public."_PostToTag"',
    'public."Setting"',
    'public."Seen"',
]


def _config(scope: list[str], insert_as: str = "{}") -> str:
    tables = ", ".join(f"'{t}'" for t in scope)
    return f"[scope]\ntables = [{tables}]\nauth_users = false\n\n[apply]\ninsert_as = {insert_as}\n"


CONFIG = _config(SCOPE)


def _fill(db: Database, variant: str, users: int) -> None:
    db.execute(SCHEMA)
    db.execute(
        "INSERT INTO public.\"User\" SELECT 'c' || md5(%s || i), 'u' || i || '@x.io', "
        "CASE WHEN i %% 5 = 0 THEN 'ADMIN' ELSE 'USER' END::public.\"Role\", i, %s, "
        "decode(md5(%s || i), 'hex'), i * 1.5, '2026-01-01'::timestamp + i * interval '1.001 s', "
        "'2026-02-01' FROM generate_series(1, %s) i",
        [variant, variant, variant, users],
    )
    db.execute(
        'INSERT INTO public."Post" (id, "authorId", title, tags, meta, took) '
        "SELECT md5(%s || 'p' || i)::uuid, 'c' || md5(%s || (1 + i %% %s)), 'post ' || i, "
        "ARRAY['a', 'b' || i], jsonb_build_object('i', i, 'n', NULL), i * interval '1 min' "
        "FROM generate_series(1, %s) i",
        [variant, variant, users, users * 3],
    )
    db.execute("INSERT INTO public.\"Tag\" (name) SELECT 'tag ' || i FROM generate_series(1, 5) i")
    db.execute(
        'INSERT INTO public."_PostToTag" SELECT p.id, t.id FROM public."Post" p, public."Tag" t '
        "WHERE (hashtext(p.id::text) + t.id) % 3 = 0"
    )
    db.execute(
        "INSERT INTO public.\"Setting\" VALUES ('a', %s), ('b', NULL), (NULL, 'x')", [variant]
    )
    db.execute(
        'INSERT INTO public."Seen" SELECT id, role, \'2026-03-01\'::timestamptz FROM public."User"'
    )


def _applied_cleanly_and_rolls_back(
    project: Project, applied, dev: Database, prod: Database, scope: list[str], before: dict
) -> None:
    """The apply committed with no table falling back to a full replace; rollback undoes it."""
    assert applied.exit_code == 0, applied.output
    assert "tried first" not in applied.output
    assert prod.fingerprint(scope) == dev.fingerprint(scope)
    rolled = project.run("rollback", "prod", "--yes")
    assert rolled.exit_code == 0, rolled.output
    assert prod.fingerprint(scope) == before


def _modes(result) -> dict[str, str]:
    return {t["table"]: t["mode"] for t in json.loads(result.stdout)["changes"]}


@pytest.mark.parametrize("checks", ["per-row", "bulk"])
def test_a_prisma_style_app_applies_re_syncs_verifies_and_rolls_back(
    project: Project, make_db, checks: str
) -> None:
    config = f'{CONFIG}foreign_key_checks = "{checks}"\n'
    dev, prod = plain_app_pair(project, make_db, _fill, config)
    assert project.run("take", "dev").exit_code == 0

    first = project.run("apply", "prod", "--yes", "--json")

    assert first.exit_code == 0, first.output
    assert prod.fingerprint(SCOPE) == dev.fingerprint(SCOPE)
    keyed = dict.fromkeys(SCOPE, "delta") | {'public."Setting"': "full"}  # NULL-able unique key
    assert _modes(first) == keyed

    # A re-sync: dev edits bytea, numeric, arrays and jsonb, renames a user's key (cascading
    # to its posts and its Seen rows), unlinks a tag and adds one; prod edits some titles.
    dev.execute(
        'UPDATE public."User" SET avatar = NULL, balance = balance + 0.01 WHERE "order" % 4 = 0'
    )
    dev.execute('UPDATE public."User" SET id = id || \'x\' WHERE "order" = 3')
    dev.execute('DELETE FROM public."_PostToTag" WHERE "B" = 2')
    dev.execute(
        "UPDATE public.\"Post\" SET tags = tags || ARRAY['new'], meta = meta || '{\"e\": 1}' "
        "WHERE title LIKE '%1'"
    )
    dev.execute("INSERT INTO public.\"Tag\" (name) VALUES ('six')")
    prod.execute("UPDATE public.\"Post\" SET title = title || ' (prod)' WHERE title LIKE '%2'")
    assert project.run("take", "dev").exit_code == 0
    before = prod.fingerprint(SCOPE)

    resync = project.run("apply", "prod", "--yes", "--json")

    assert resync.exit_code == 0, resync.output
    assert prod.fingerprint(SCOPE) == dev.fingerprint(SCOPE)
    assert _modes(resync)['public."Tag"'] == "delta"
    if checks == "per-row":
        # The renamed key's email moves from one row to another while the old row waits for
        # its posts to move: that delta cannot apply cleanly, so "User" and what references
        # it are replaced in full, and the report says so.
        assert _modes(resync)['public."User"'] == "full"
        assert "tried first" in " ".join(resync.output.split())
    else:
        # In bulk no row waits for its children: the old row goes first, the delta applies.
        assert _modes(resync)['public."User"'] == "delta"
        assert "tried first" not in resync.output
    assert project.run("verify", "dev", "prod").exit_code == 0

    rolled = project.run("rollback", "prod", "--yes")

    assert rolled.exit_code == 0, rolled.output
    assert prod.fingerprint(SCOPE) == before


def test_an_app_without_its_own_sql_folder_applies_with_the_bundled_scripts_doing_nothing(
    project: Project, make_db
) -> None:
    # A new project as a user starts it: snapshot.toml and the env files, no sql/ folder, so
    # the bundled pre/post scripts (written for the question bank) are the ones that run.
    dev, prod = plain_app_pair(project, make_db, _fill, CONFIG)
    for phase in ("pre", "post"):
        (project.path / "sql" / phase).rmdir()
    (project.path / "sql").rmdir()
    before = prod.fingerprint(SCOPE)
    assert project.run("take", "dev").exit_code == 0

    checked = project.run("check", "prod", "--json")
    applied = project.run("apply", "prod", "--yes")

    assert checked.exit_code == 0, checked.output
    [scripts] = [
        f["detail"] for f in json.loads(checked.stdout)["findings"] if f["check"] == "scripts"
    ]
    assert "010_questions_to_draft.sql (bundled" in scripts
    assert "public.questions is not in the scope" in scripts
    # No script failed and forced a full replace; rollback restores prod.
    _applied_cleanly_and_rolls_back(project, applied, dev, prod, SCOPE, before)


GUARDED = """
SET ROLE app_owner;
CREATE TYPE public."PostStatus" AS ENUM ('DRAFT', 'PUBLISHED');
CREATE TABLE public."User" (id uuid PRIMARY KEY, "displayName" text NOT NULL);
CREATE TABLE public."Post" (
    id text PRIMARY KEY,
    "authorId" uuid NOT NULL REFERENCES public."User" (id) ON DELETE CASCADE,
    "Status" public."PostStatus" NOT NULL DEFAULT 'DRAFT', title text NOT NULL,
    "parentId" text REFERENCES public."Post" (id));
CREATE TABLE public."Tag" (id serial PRIMARY KEY, label text NOT NULL UNIQUE);
CREATE TABLE public."PostTag" (
    "postId" text NOT NULL REFERENCES public."Post" (id) ON DELETE CASCADE,
    "tagId" int NOT NULL REFERENCES public."Tag" (id), PRIMARY KEY ("postId", "tagId"));
-- The app's guardrails, written as apps often are: table names unqualified, no search_path
-- of their own, so they find their tables only through the session's path.
CREATE FUNCTION public.guard_publish() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF NEW."Status" = 'PUBLISHED' AND NOT EXISTS (
      SELECT 1 FROM "PostTag" WHERE "postId" = NEW.id) THEN
    RAISE EXCEPTION 'post % cannot be PUBLISHED without tags', NEW.id;
  END IF;
  RETURN NEW;
END $$;
CREATE TRIGGER "Post_guard" BEFORE INSERT OR UPDATE ON public."Post"
  FOR EACH ROW EXECUTE FUNCTION public.guard_publish();
CREATE FUNCTION public.guard_untag() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF EXISTS (SELECT 1 FROM "Post" WHERE id = OLD."postId" AND "Status" = 'PUBLISHED') THEN
    RAISE EXCEPTION 'cannot untag published post %', OLD."postId";
  END IF;
  RETURN OLD;
END $$;
CREATE TRIGGER "PostTag_guard" BEFORE DELETE ON public."PostTag"
  FOR EACH ROW EXECUTE FUNCTION public.guard_untag();
RESET ROLE;
"""
GUARDED_SCOPE = ['public."User"', 'public."Post"', 'public."Tag"', 'public."PostTag"']


def _fill_guarded(db: Database, variant: str, users: int) -> None:
    db.execute(GUARDED)
    db.execute(
        "INSERT INTO public.\"User\" SELECT md5(%s || i)::uuid, 'user ' || i "
        "FROM generate_series(1, %s) i",
        [variant, users],
    )
    db.execute("INSERT INTO public.\"Tag\" (label) SELECT 'tag' || i FROM generate_series(1, 6) i")
    db.execute(
        "INSERT INTO public.\"Post\" SELECT 'p' || i, md5(%s || (1 + i %% %s))::uuid, 'DRAFT', "
        "%s || ' title ' || i, CASE WHEN i > 10 THEN 'p' || (i %% 10 + 1) END "
        "FROM generate_series(1, %s) i",
        [variant, users, variant, users * 6],
    )
    db.execute(
        "INSERT INTO public.\"PostTag\" SELECT 'p' || i, 1 + (i + length(%s)) %% 6 "
        "FROM generate_series(1, %s) i WHERE i %% 7 <> 0",
        [variant, users * 6],
    )
    db.execute(
        'UPDATE public."Post" SET "Status" = \'PUBLISHED\' WHERE id IN '
        '(SELECT "postId" FROM public."PostTag") AND hashtext(id || %s) %% 3 <> 0',
        [variant],
    )


def test_an_app_with_its_own_guardrails_and_scripts_applies_and_rolls_back(
    project: Project, make_db
) -> None:
    # Another app's guardrails (no PUBLISHED post without tags, no untagging a PUBLISHED
    # post) as unqualified trigger functions, and the user's own scripts and insert_as for
    # them: a quoted enum column, the staged rows read as pg_temp."snapshot_Post".
    config = _config(GUARDED_SCOPE, insert_as='{ \'public."Post"."Status"\' = "DRAFT" }')
    dev, prod = plain_app_pair(project, make_db, _fill_guarded, config)
    sql_folder = project.path / "sql"
    (sql_folder / "pre" / "010_draft.sql").write_text(
        'UPDATE "Post" SET "Status" = \'DRAFT\' WHERE "Status" <> \'DRAFT\';\n'
    )
    (sql_folder / "post" / "010_restore.sql").write_text(
        'UPDATE "Post" AS p SET "Status" = s."Status" FROM pg_temp."snapshot_Post" AS s '
        'WHERE p.id = s.id AND p."Status" IS DISTINCT FROM s."Status";\n'
    )
    published = 'SELECT count(*) FROM public."Post" WHERE "Status" = \'PUBLISHED\''
    assert int(dev.scalar(published)) > 0
    before = prod.fingerprint(GUARDED_SCOPE)
    assert project.run("take", "dev").exit_code == 0

    checked = project.run("check", "prod", "--json")
    applied = project.run("apply", "prod", "--yes", "--json")

    assert checked.exit_code == 0, checked.output
    # prod's users all go: the unindexed "authorId" gets a helper index, and the hint to
    # index it for good must run as printed (the camelCase column quoted).
    hints = " ".join(f["detail"] for f in json.loads(checked.stdout)["findings"])
    assert 'CREATE INDEX CONCURRENTLY ON public."Post" ("authorId");' in hints
    _applied_cleanly_and_rolls_back(project, applied, dev, prod, GUARDED_SCOPE, before)


PARTITIONED = """
SET ROLE app_owner;
CREATE TABLE public."Device" (id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, label text);
CREATE TABLE public."Event" (
    id bigint NOT NULL,
    "deviceId" bigint NOT NULL REFERENCES public."Device" (id) ON DELETE CASCADE,
    "createdAt" timestamptz NOT NULL, payload jsonb, PRIMARY KEY (id, "createdAt"))
  PARTITION BY RANGE ("createdAt");
CREATE TABLE public."Event_2026_01" PARTITION OF public."Event"
  FOR VALUES FROM ('2026-01-01') TO ('2026-02-01');
CREATE TABLE public."Event_2026_02" PARTITION OF public."Event"
  FOR VALUES FROM ('2026-02-01') TO ('2026-03-01') PARTITION BY HASH (id);
CREATE TABLE public."Event_2026_02_a" PARTITION OF public."Event_2026_02"
  FOR VALUES WITH (MODULUS 2, REMAINDER 0);
CREATE TABLE public."Event_2026_02_b" PARTITION OF public."Event_2026_02"
  FOR VALUES WITH (MODULUS 2, REMAINDER 1);
CREATE TABLE public."Event_rest" PARTITION OF public."Event" DEFAULT;
CREATE TABLE public."Archive" (id bigint, note text) PARTITION BY LIST (id);
RESET ROLE;
"""
PARTITIONED_SCOPE = ['public."Device"', 'public."Event"', 'public."Archive"']


def _fill_partitioned(db: Database, variant: str, devices: int) -> None:
    db.execute(PARTITIONED)
    db.execute(
        'INSERT INTO public."Device" (label) SELECT %s || i FROM generate_series(1, %s) i',
        [variant, devices],
    )
    db.execute(
        'INSERT INTO public."Event" SELECT i, 1 + i %% %s, '
        "'2026-01-01'::timestamptz + i * interval '3 hours' + length(%s::text) * interval '1 min', "
        "jsonb_build_object('v', %s::text, 'i', i) FROM generate_series(1, %s) i",
        [devices, variant, variant, devices * 30],
    )


def test_partitioned_tables_take_apply_re_sync_and_roll_back(project: Project, make_db) -> None:
    # pg_dump writes no data for a partitioned table itself; its partitions (two levels
    # here, and a default one) hold the rows, and a partitioned table may have none at all.
    dev, prod = plain_app_pair(project, make_db, _fill_partitioned, _config(PARTITIONED_SCOPE))
    before = prod.fingerprint(PARTITIONED_SCOPE)
    taken = project.run("take", "dev")
    assert taken.exit_code == 0, taken.output

    applied = project.run("apply", "prod", "--yes")

    assert applied.exit_code == 0, applied.output
    first = prod.fingerprint(PARTITIONED_SCOPE)
    assert first == dev.fingerprint(PARTITIONED_SCOPE) != before
    assert int(prod.scalar('SELECT count(*) FROM public."Event_2026_02_b"')) > 0

    # A re-sync that moves rows from one partition to another (an update of the key).
    dev.execute(
        'UPDATE public."Event" SET "createdAt" = "createdAt" + interval \'31 days\' '
        "WHERE id % 10 = 0"
    )
    assert project.run("take", "dev").exit_code == 0
    resynced = project.run("apply", "prod", "--yes")
    assert resynced.exit_code == 0, resynced.output
    assert prod.fingerprint(PARTITIONED_SCOPE) == dev.fingerprint(PARTITIONED_SCOPE)

    rolled = project.run("rollback", "prod", "--yes")
    assert rolled.exit_code == 0, rolled.output
    assert prod.fingerprint(PARTITIONED_SCOPE) == first


TYPED = """
SET ROLE app_owner;
CREATE TYPE public.mood AS ENUM ('calm', 'busy');
CREATE TABLE public.allowed (v text PRIMARY KEY);
-- A domain whose CHECK calls a function naming its table unqualified: it finds it only
-- through the session's search path, as the app's own sessions have it.
CREATE FUNCTION public.is_allowed(t text) RETURNS bool LANGUAGE sql STABLE
  AS $$SELECT EXISTS (SELECT 1 FROM allowed WHERE v = t)$$;
CREATE DOMAIN public.allowed_text AS text CHECK (VALUE IS NULL OR public.is_allowed(VALUE));
CREATE DOMAIN public.small AS int CHECK (VALUE >= 0);
CREATE TABLE public.item (
    id int PRIMARY KEY, mood public.mood, tag public.allowed_text, size public.small);
RESET ROLE;
"""
TYPED_SCOPE = ["public.allowed", "public.item"]


def _fill_typed(db: Database, variant: str, rows: int) -> None:
    db.execute(TYPED)
    db.execute("INSERT INTO public.allowed VALUES ('red'), ('blue')")
    db.execute(
        "INSERT INTO public.item SELECT i, 'calm', CASE WHEN i %% 2 = 0 THEN 'red' END, i "
        "FROM generate_series(1, %s) i",
        [rows if variant == "dev" else rows // 2],
    )


def test_domains_and_enums_round_trip(project: Project, make_db) -> None:
    dev, prod = plain_app_pair(project, make_db, _fill_typed, _config(TYPED_SCOPE))
    before = prod.fingerprint(TYPED_SCOPE)
    assert project.run("take", "dev").exit_code == 0

    applied = project.run("apply", "prod", "--yes")

    _applied_cleanly_and_rolls_back(project, applied, dev, prod, TYPED_SCOPE, before)


def _fill_xml(db: Database, variant: str, rows: int) -> None:
    try:
        db.execute("SELECT xmlparse(content '<a/>')")
    except psycopg.errors.FeatureNotSupported:
        pytest.skip("this server is built without xml support")
    db.execute("SET ROLE app_owner; CREATE TABLE public.page (id int PRIMARY KEY, doc xml)")
    db.execute(
        # a fragment, not a document: it loads back only with xmloption = content
        "INSERT INTO public.page SELECT i, xmlparse(content %s || ' ' || i || ' <a/><b/>') "
        "FROM generate_series(1, %s) i",
        [variant, rows],
    )
    # sessions of this database parse xml as documents unless told otherwise
    db.execute(f"ALTER DATABASE {db.name} SET xmloption = document")


def test_xml_fragments_round_trip_where_sessions_default_to_documents(
    project: Project, make_db
) -> None:
    dev, prod = plain_app_pair(project, make_db, _fill_xml, _config(["public.page"]))
    before = prod.fingerprint(["public.page"])
    assert project.run("take", "dev").exit_code == 0

    applied = project.run("apply", "prod", "--yes")

    _applied_cleanly_and_rolls_back(project, applied, dev, prod, ["public.page"], before)


@pytest.mark.parametrize(
    ("change_dev", "change_prod", "words"),
    [
        (
            "ALTER TYPE public.mood ADD VALUE 'sleepy';"
            "UPDATE public.item SET mood = 'sleepy' WHERE id = 3",
            "",
            ["invalid input value for enum", '"sleepy"', "column mood"],
        ),
        (
            "",
            "ALTER DOMAIN public.small DROP CONSTRAINT small_check; "
            "ALTER DOMAIN public.small ADD CONSTRAINT small_check CHECK (VALUE >= 10) NOT VALID",
            ['violates check constraint "small_check"'],
        ),
    ],
    ids=["enum label prod lacks", "stricter domain check in prod"],
)
def test_a_target_whose_types_refuse_the_snapshots_rows_is_one_line_and_unchanged(
    project: Project, make_db, change_dev: str, change_prod: str, words: list[str]
) -> None:
    dev, prod = plain_app_pair(project, make_db, _fill_typed, _config(TYPED_SCOPE))
    for db, change in ((dev, change_dev), (prod, change_prod)):
        for statement in filter(None, change.split(";")):  # a new enum label commits first
            db.execute(statement)
    before = prod.fingerprint(TYPED_SCOPE)
    assert project.run("take", "dev").exit_code == 0

    for args in (
        ("check", "prod"),
        ("apply", "prod", "--yes"),
        ("apply", "prod", "--yes", "--json"),
    ):
        result = project.run(*args)
        assert result.exit_code == 1, result.output
        assert "Traceback" not in result.output
        line = result.stderr.strip().splitlines()[-1]
        assert line.startswith("Error: the target cannot hold"), result.stderr
        assert "rows of public.item" in line and "run the migrations" in line, line
        for word in words:
            assert word in line, line
        if "--json" in args:
            assert "cannot hold" in json.loads(result.stdout)["error"]
        assert prod.fingerprint(TYPED_SCOPE) == before


def test_a_changed_row_the_target_refuses_is_named_when_only_changed_rows_go_up(
    project: Project, make_db
) -> None:
    # Only the rows that differ go up, with the other statements of one round trip; when
    # the server refuses one, they go again by COPY, whose error names the row and column.
    config = _config(TYPED_SCOPE) + 'upload = "changed"\n'
    dev, prod = plain_app_pair(project, make_db, _fill_typed, config)
    dev.execute("ALTER TYPE public.mood ADD VALUE 'sleepy'")
    dev.execute("UPDATE public.item SET mood = 'sleepy' WHERE id = 3")
    before = prod.fingerprint(TYPED_SCOPE)
    assert project.run("take", "dev").exit_code == 0

    result = project.run("apply", "prod", "--yes")

    assert result.exit_code == 1, result.output
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("Error: the target cannot hold"), result.stderr
    for word in ("rows of public.item", "invalid input value for enum", '"sleepy"', "column mood"):
        assert word in line, line
    assert "Traceback" not in result.output
    assert prod.fingerprint(TYPED_SCOPE) == before


# An app's check deferred to the commit, its function naming its tables unqualified (no
# search_path of its own): it fires when the apply commits, and finds them only through the
# path the app's own sessions have.
AT_COMMIT = """
SET ROLE app_owner;
CREATE TABLE public.ledger (id int PRIMARY KEY, amount int NOT NULL);
CREATE TABLE public.total (id int PRIMARY KEY, sum int NOT NULL);
CREATE FUNCTION public.check_total() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF (SELECT coalesce(sum(amount), 0) FROM ledger) <> (SELECT sum FROM total WHERE id = 1) THEN
    RAISE EXCEPTION 'the ledger does not add up to its total';
  END IF;
  RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER ledger_adds_up AFTER INSERT OR UPDATE OR DELETE ON public.ledger
  DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION public.check_total();
RESET ROLE;
"""


def _fill_at_commit(db: Database, variant: str, rows: int) -> None:
    db.execute(AT_COMMIT)
    db.execute("INSERT INTO public.total VALUES (1, %s)", [rows * (rows + 1) // 2])
    db.execute("INSERT INTO public.ledger SELECT i, i FROM generate_series(1, %s) i", [rows])


@pytest.mark.parametrize("upload", ["all", "changed"])
def test_a_check_deferred_to_the_commit_finds_its_tables_through_the_apps_path(
    project: Project, make_db, upload: str
) -> None:
    scope = ["public.total", "public.ledger"]
    config = _config(scope) + f'upload = "{upload}"\n'
    dev, prod = plain_app_pair(project, make_db, _fill_at_commit, config)
    assert project.run("take", "dev").exit_code == 0

    result = project.run("apply", "prod", "--yes")

    assert result.exit_code == 0, result.output
    assert prod.fingerprint(scope) == dev.fingerprint(scope)


DEFERRABLE = """
SET ROLE app_owner;
CREATE TABLE public.account (id int PRIMARY KEY, owner_id int NOT NULL, name text);
CREATE TABLE public.person (
    id int PRIMARY KEY, account_id int NOT NULL REFERENCES public.account (id), name text);
-- A cycle: what check asks for ("make one of them DEFERRABLE"), left INITIALLY IMMEDIATE.
ALTER TABLE public.account ADD FOREIGN KEY (owner_id) REFERENCES public.person (id)
  DEFERRABLE INITIALLY IMMEDIATE;
CREATE TABLE public.note (
    id int PRIMARY KEY,
    person_id int REFERENCES public.person (id) DEFERRABLE INITIALLY IMMEDIATE, body text);
RESET ROLE;
"""
DEFERRABLE_SCOPE = ["public.account", "public.person", "public.note"]


def _fill_deferrable(db: Database, variant: str, rows: int) -> None:
    db.execute(DEFERRABLE)
    first = 1 if variant == "dev" else rows // 2  # prod shares some ids, lacks others
    ids = f"generate_series({first}, {first + rows}) i"
    db.execute(  # one simple query: the accounts' owners come in the same transaction
        f"BEGIN; SET CONSTRAINTS ALL DEFERRED;"
        f"INSERT INTO public.account SELECT i, i, '{variant}' || i FROM {ids};"
        f"INSERT INTO public.person SELECT i, i, '{variant}' || i FROM {ids};"
        f"INSERT INTO public.note SELECT i, i, '{variant}' FROM {ids}; COMMIT"
    )


@pytest.mark.parametrize("full", [False, True], ids=["delta", "full"])
def test_deferrable_initially_immediate_keys_are_checked_at_the_end(
    project: Project, make_db, full: bool
) -> None:
    dev, prod = plain_app_pair(project, make_db, _fill_deferrable, _config(DEFERRABLE_SCOPE))
    before = prod.fingerprint(DEFERRABLE_SCOPE)
    assert project.run("take", "dev").exit_code == 0
    checked = project.run("check", "prod")
    assert checked.exit_code == 0, checked.output

    applied = project.run("apply", "prod", "--yes", *(["--full"] if full else []))

    _applied_cleanly_and_rolls_back(project, applied, dev, prod, DEFERRABLE_SCOPE, before)


SHARED_SEQUENCE = """
SET ROLE app_owner;
CREATE SEQUENCE public.ticket_seq;
CREATE TABLE public.ticket (id int PRIMARY KEY DEFAULT nextval('public.ticket_seq'), v text);
-- outside the scope, drawing from the same sequence
CREATE TABLE public.ticket_archive (
    id int PRIMARY KEY DEFAULT nextval('public.ticket_seq'), v text);
RESET ROLE;
"""


def _fill_shared_sequence(db: Database, variant: str, rows: int) -> None:
    db.execute(SHARED_SEQUENCE)
    db.execute(
        "INSERT INTO public.ticket (v) SELECT %s FROM generate_series(1, %s)",
        [variant, rows * 5 if variant == "dev" else rows],
    )


@pytest.mark.parametrize("ahead", [False, True], ids=["behind the data", "ahead of it"])
def test_a_sequence_a_default_shares_ends_above_the_data_and_never_moves_down(
    project: Project, make_db, ahead: bool
) -> None:
    dev, prod = plain_app_pair(project, make_db, _fill_shared_sequence, _config(["public.ticket"]))
    if ahead:  # the table outside the scope took ids far beyond the snapshot's
        prod.execute("SELECT setval('public.ticket_seq', 1000)")
    assert project.run("take", "dev").exit_code == 0

    applied = project.run("apply", "prod", "--yes")

    assert applied.exit_code == 0, applied.output
    assert prod.fingerprint(["public.ticket"]) == dev.fingerprint(["public.ticket"])
    highest = int(prod.scalar("SELECT max(id) FROM public.ticket"))
    assert highest == 150
    following = int(prod.scalar("SELECT nextval('public.ticket_seq')"))
    assert following == (1001 if ahead else 151)
    prod.execute("INSERT INTO public.ticket (v) VALUES ('app')")  # no collision
    prod.execute("INSERT INTO public.ticket_archive (v) VALUES ('app')")
    if not ahead:
        assert (
            "public.ticket_seq (the default of public.ticket.id, owned by no column, so not in "
            "the snapshot) restarts at 151, above the data"
        ) in " ".join(applied.output.split())


# pagila's way: a partitioned payment table whose foreign keys and indexes were declared on
# each partition (as pg_dump of older servers writes them), not on the table itself.
PAGILA = """
SET ROLE app_owner;
CREATE TABLE public.staff (staff_id int PRIMARY KEY, name text NOT NULL);
CREATE TABLE public.customer (customer_id int PRIMARY KEY, name text NOT NULL);
CREATE TABLE public.rental (
    rental_id int PRIMARY KEY,
    customer_id int NOT NULL REFERENCES public.customer (customer_id),
    rented timestamptz NOT NULL);
CREATE TABLE public.payment (
    payment_id int NOT NULL, customer_id int NOT NULL, staff_id int NOT NULL, rental_id int,
    amount numeric(5, 2) NOT NULL, payment_date timestamptz NOT NULL,
    PRIMARY KEY (payment_date, payment_id))
  PARTITION BY RANGE (payment_date);
DO $$
DECLARE m int;
BEGIN
  FOR m IN 1..4 LOOP
    EXECUTE format(
      'CREATE TABLE public.payment_p2022_%1$s PARTITION OF public.payment
         FOR VALUES FROM (%2$L) TO (%3$L);
       ALTER TABLE public.payment_p2022_%1$s
         ADD CONSTRAINT payment_p2022_%1$s_customer_id_fkey FOREIGN KEY (customer_id)
           REFERENCES public.customer (customer_id),
         ADD CONSTRAINT payment_p2022_%1$s_rental_id_fkey FOREIGN KEY (rental_id)
           REFERENCES public.rental (rental_id),
         ADD CONSTRAINT payment_p2022_%1$s_staff_id_fkey FOREIGN KEY (staff_id)
           REFERENCES public.staff (staff_id);
       CREATE INDEX idx_fk_payment_p2022_%1$s_customer_id
         ON public.payment_p2022_%1$s (customer_id);
       CREATE INDEX idx_fk_payment_p2022_%1$s_rental_id ON public.payment_p2022_%1$s (rental_id);',
      lpad(m::text, 2, '0'), make_date(2022, m, 1), make_date(2022, m + 1, 1));
  END LOOP;
END $$;
RESET ROLE;
"""
# staff stays outside: the partitions' keys to it leave the scope, those to customer and
# rental stay inside it
PAGILA_SCOPE = ["public.customer", "public.rental", "public.payment"]


def _fill_pagila(db: Database, variant: str, customers: int) -> None:
    db.execute(PAGILA)
    db.execute("INSERT INTO public.staff VALUES (1, 'Mike'), (2, 'Jon')")
    db.execute(
        "INSERT INTO public.customer SELECT i, %s || ' customer ' || i "
        "FROM generate_series(1, %s) i",
        [variant, customers],
    )
    db.execute(
        "INSERT INTO public.rental SELECT i, 1 + i %% %s, "
        "'2022-01-01'::timestamptz + i * interval '17 hours' FROM generate_series(1, %s) i",
        [customers, customers * 3],
    )
    db.execute(
        "INSERT INTO public.payment SELECT r.rental_id, r.customer_id, 1 + r.rental_id %% 2, "
        "r.rental_id, (r.rental_id %% 9 + length(%s)) * 0.99, r.rented + interval '1 day' "
        "FROM public.rental r",
        [variant],
    )


def test_keys_declared_on_partitions_are_keys_of_the_partitioned_table(
    project: Project, make_db
) -> None:
    dev, prod = plain_app_pair(project, make_db, _fill_pagila, _config(PAGILA_SCOPE))
    before = prod.fingerprint(PAGILA_SCOPE)
    taken = project.run("take", "dev", "--json")
    assert taken.exit_code == 0, taken.output
    rows = {t: v["rows"] for t, v in json.loads(taken.stdout)["tables"].items()}
    assert rows["public.payment"] == int(dev.scalar("SELECT count(*) FROM public.payment")) == 90
    assert json.loads(taken.stdout)["rows"] == 30 + 90 + 90  # each row counted once

    checked = project.run("check", "prod", "--json")

    assert checked.exit_code == 0, checked.output
    findings = json.loads(checked.stdout)["findings"]
    closure = " ".join(f["detail"] for f in findings if f["check"] == "scope closure")
    assert "payment_p2022" not in closure
    orders = " ".join(f["detail"] for f in findings if f["check"] == "foreign keys")
    assert "public.customer … public.payment" in orders

    applied = project.run("apply", "prod", "--yes", "--json")

    assert applied.exit_code == 0, applied.output
    assert _modes(applied) == dict.fromkeys(PAGILA_SCOPE, "delta")
    # one progress line for the table, not one per partition's block of the dump
    assert len(re.findall(r"staged +public\.payment ", applied.stderr)) == 1, applied.stderr
    first = prod.fingerprint(PAGILA_SCOPE)
    assert first == dev.fingerprint(PAGILA_SCOPE)

    # A re-sync: dev deletes rentals (their payments first), moves payments to another
    # partition and changes amounts; prod's own edits are overwritten.
    # (18 rentals go: enough for a helper index, were the partitions' own ones not there)
    dev.execute("DELETE FROM public.payment WHERE rental_id % 5 = 0")
    dev.execute("DELETE FROM public.rental WHERE rental_id % 5 = 0")
    dev.execute(
        "UPDATE public.payment SET payment_date = payment_date + interval '31 days', "
        "amount = amount + 1 WHERE payment_id % 7 = 0"
    )
    prod.execute("UPDATE public.payment SET amount = 0 WHERE payment_id % 5 = 0")
    assert project.run("take", "dev").exit_code == 0
    edited = prod.fingerprint(PAGILA_SCOPE)
    planned = project.run("check", "prod", "--json")
    assert json.loads(planned.stdout)["plan"]["helper_indexes"] == []

    resynced = project.run("apply", "prod", "--yes", "--json")

    assert resynced.exit_code == 0, resynced.output
    assert _modes(resynced) == dict.fromkeys(PAGILA_SCOPE, "delta")
    assert prod.fingerprint(PAGILA_SCOPE) == dev.fingerprint(PAGILA_SCOPE)
    verified = project.run("verify", "dev", "prod", "--json")
    assert verified.exit_code == 0, verified.output
    assert {t["table"]: t["source_rows"] for t in json.loads(verified.stdout)["tables"]}[
        "public.payment"
    ] == int(dev.scalar("SELECT count(*) FROM public.payment"))

    rolled = project.run("rollback", "prod", "--yes")

    assert rolled.exit_code == 0, rolled.output
    assert prod.fingerprint(PAGILA_SCOPE) == edited
    assert project.run("rollback", "prod", "--to", _backup_of(project, 0), "--yes").exit_code == 0
    assert prod.fingerprint(PAGILA_SCOPE) == before


def _backup_of(project: Project, index: int) -> str:
    """The id of the index-th pre-apply backup of prod, oldest first."""
    backups = [p for p in project.snapshots("prod") if p.name.endswith("-pre-apply")]
    return f"prod/{backups[index].name}"


@pytest.mark.parametrize("command", ["take", "verify", "check"])
def test_a_partition_named_beside_its_partitioned_table_is_refused(
    project: Project, make_db, command: str
) -> None:
    scope = [*PAGILA_SCOPE, "public.payment_p2022_02"]
    dev, prod = plain_app_pair(project, make_db, _fill_pagila, _config(PAGILA_SCOPE))
    if command == "check":  # a snapshot of the scope as it was, then the partition added
        assert project.run("take", "dev").exit_code == 0
    taken = project.snapshots()
    project.config(_config(scope))
    before = prod.fingerprint(PAGILA_SCOPE), dev.fingerprint(PAGILA_SCOPE)

    result = project.run(
        *{"take": ["take", "dev"], "verify": ["verify", "dev", "prod"]}.get(
            command, ["check", "prod"]
        )
    )

    assert result.exit_code == 2, result.output  # the scope is configuration, in every command
    assert "Traceback" not in result.output
    line = result.stderr.strip().splitlines()[-1]
    assert "public.payment_p2022_02 is a partition of public.payment" in line, line
    assert "name only public.payment" in line, line
    assert project.snapshots() == taken
    assert (prod.fingerprint(PAGILA_SCOPE), dev.fingerprint(PAGILA_SCOPE)) == before


def test_a_partitioned_table_outside_the_scope_is_named_by_its_own_name(
    project: Project, make_db
) -> None:
    scope = ["public.customer", "public.rental"]
    _, prod = plain_app_pair(project, make_db, _fill_pagila, _config(scope))
    prod.execute("DELETE FROM public.payment")  # nothing outside refers to prod's rentals
    assert project.run("take", "dev").exit_code == 0

    checked = project.run("check", "prod", "--json")

    assert checked.exit_code == 0, checked.output
    findings = json.loads(checked.stdout)["findings"]
    closure = [f["detail"] for f in findings if f["check"] == "scope closure"]
    # one finding per key of public.payment, not one per partition declaring it
    assert len(closure) == 2 and all("row of public.payment refers" in d for d in closure), closure
    assert "payment_p2022" not in " ".join(d.split(":")[0] for d in closure), closure
