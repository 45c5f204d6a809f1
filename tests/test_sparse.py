"""Sparse staging: a re-sync sends the server only the rows that differ (snapshot.sparse).

The local digest of every row of a real dump must be the one the server computes for the
same row (hostile text, arrays, json, bytea, floats, times, composite keys), and an apply
through the CLI that sends only the changed rows must end exactly as a full upload does,
with rollback exact, on tables keyed by text, by two columns, and partitioned.
"""

from __future__ import annotations

import json
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from snapshot import catalog, checksum, copytext, pgtools, sparse
from snapshot.db import SESSION_SETTINGS
from snapshot.names import TableName
from snapshot.staging import ScriptReader, parse_copy_header
from tests.fix_apps import plain_app_pair, resync_pair
from tests.fix_db import ALL_TABLES, SCOPE_TABLES, Database
from tests.fix_project import Project, take

SCHEMA = """
SET ROLE app_owner;
CREATE TYPE public.mood AS ENUM ('ok', 'a b', 'q"uote');
CREATE TABLE public.doc (
    slug text PRIMARY KEY, body text, tags text[], meta jsonb, raw json, blob bytea,
    score float8, amount numeric(12, 3), at timestamptz, day date, took interval,
    flag boolean, mood public.mood, addr inet, "Mixed Case" text, vec tsvector,
    spot point);
CREATE TABLE public.cell (
    x text NOT NULL, y int NOT NULL, value text, PRIMARY KEY (x, y));
CREATE TABLE public.reading (
    id bigint NOT NULL, at date NOT NULL, value numeric, PRIMARY KEY (id, at))
    PARTITION BY RANGE (at);
CREATE TABLE public.reading_2025 PARTITION OF public.reading
    FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
CREATE TABLE public.reading_2026 PARTITION OF public.reading
    FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
RESET ROLE;
"""
SCOPE = ["public.doc", "public.cell", "public.reading"]
HOSTILE = [
    "plain",
    "",
    "with space",
    'quote " inside',
    "back\\slash",
    "tab\there",
    "new\nline",
    "cr\rhere",
    "comma, and (parens)",
    "unicode: żółw 🐢",
    "\\N",
    "NULL",
    "vt\x0bff\x0c",
    " leading",
]


def _config(upload: str) -> str:
    tables = ", ".join(f"'{t}'" for t in SCOPE)
    return (
        f"[scope]\ntables = [{tables}]\nauth_users = false\n\n"
        f'[apply]\ninsert_as = {{}}\nupload = "{upload}"\n'
    )


def _fill(db: Database, variant: str, rows: int) -> None:
    db.execute(SCHEMA)
    with db.connect() as conn:
        for i in range(rows):
            text = HOSTILE[i % len(HOSTILE)]
            conn.execute(
                "INSERT INTO public.doc VALUES (%s, %s, %s, %s, %s, %s, %s, %s, "
                "'2025-03-01 10:00:00+02'::timestamptz + %s * interval '1 hour', "
                "'2025-01-01'::date + %s, %s * interval '1 min 2.5 s', %s, %s, %s, %s, "
                "to_tsvector('simple', %s), point(%s, 0.5))",
                [
                    f"slug {i} {text}",
                    None if i % 5 == 0 else f"{text} {variant if i % 3 == 0 else ''}",
                    [text, None, "x,y"],
                    json.dumps({"t": text, "n": i}),
                    json.dumps([text]),
                    text.encode(),
                    [0.1, 1e300, float("nan"), float("inf"), -0.0, 1 / 3][i % 6],
                    i / 7,
                    i,
                    i,
                    i,
                    i % 2 == 0,
                    ["ok", "a b", 'q"uote'][i % 3],
                    f"10.0.0.{i % 250}",
                    text,
                    text + " words",
                    i / 3,
                ],
            )
            conn.execute(
                "INSERT INTO public.cell VALUES (%s, %s, %s)",
                [text, i, None if i % 4 == 0 else f"{variant} {i}"],
            )
        conn.execute(
            "INSERT INTO public.reading SELECT i, DATE '2025-06-01' + i * 3, "
            "CASE WHEN i %% 9 = 0 THEN length(%s) ELSE i END FROM generate_series(1, %s) i",
            [variant, rows * 3],
        )


def _dump_rows(dump: Path) -> dict[str, list[bytes]]:
    """Per table, the local digest of every row of a real dump (snapshot.sparse)."""
    pg_restore = pgtools.find_tool("pg_restore", 15, None, "the test")
    found: dict[str, list[bytes]] = {}
    with pgtools.restore_script(pg_restore, dump) as stream:
        script = ScriptReader(stream)
        while header := script.next_header():
            table, _ = parse_copy_header(header)
            script.pump(_Digests(found.setdefault(str(table), [])))
    return found


class _Digests:
    """Each row's digest, made from its COPY line as sparse staging makes it (the dump's
    column order is the snapshot's)."""

    def __init__(self, into: list) -> None:
        self.into = into
        self.rest = b""

    def write(self, buffer: bytes) -> None:
        lines = (self.rest + buffer).split(b"\n")
        self.rest = lines.pop()
        self.into.extend(sparse.digest(line) for line in lines)


def test_every_row_of_a_real_dump_digests_as_the_server_digests_it(
    project: Project, make_db
) -> None:
    dev, _prod = plain_app_pair(project, make_db, _fill, _config("changed"))
    # dev's sessions default to another time zone: the dump still writes times in UTC
    dev.execute(f"ALTER DATABASE {dev.name} SET timezone = 'Asia/Kolkata'")
    take(project, "dev")
    (dump,) = project.path.glob("snapshots/dev/*/data.dump")
    local = _dump_rows(dump)
    with psycopg.connect(dev.app_url, autocommit=True) as conn:
        for name, value in SESSION_SETTINGS.items():
            conn.execute("SELECT set_config(%s, %s, false)", [name, value])
        for table in SCOPE:
            name = TableName.parse(table)
            shape = catalog.table_shapes(conn, [name])[name]
            line = sparse.line_sql("t", [(c.name, c.type) for c in shape.columns])
            server = conn.execute(
                sql.SQL("SELECT {} FROM {} AS t").format(sparse.digest_sql(line), name.ident)
            ).fetchall()
            expected = sorted(bytes(d) for (d,) in server)
            assert len(expected) > 20
            assert sorted(local[table]) == expected, table


def _apply(project: Project, *args: str) -> dict:
    take(project, "dev")
    result = project.run("apply", "prod", "--from", "dev", "--yes", "--json", *args)
    assert result.exit_code == 0, result.output
    # the rows that went up staged exactly the snapshot's rows: never staged again in full
    assert "did not add up" not in result.stderr, result.stderr
    return json.loads(result.stdout)


def _went_up(staged: sparse.Sparse, sent: list[bytes]) -> bytes:
    """The rows a filter let through: by COPY (``sent``) and held back for finish()."""
    held = b"".join(line + b"\n" for _, lines in staged.unsent for line in lines)
    return b"".join(sent) + held


def test_a_resync_sends_only_the_changed_rows_and_ends_as_a_full_upload_does(
    project: Project, make_db
) -> None:
    dev, prod = plain_app_pair(project, make_db, _fill, _config("changed"))
    first = _apply(project)
    assert dev.fingerprint(SCOPE) == prod.fingerprint(SCOPE)
    assert any(n.startswith("sent only the rows that differ") for n in first["notes"])

    # dev moves on: one row of each kind changes, one is added, one goes
    dev.execute("UPDATE public.doc SET body = 'edited\\there' WHERE slug = 'slug 6 new\nline'")
    dev.execute("UPDATE public.cell SET value = 'x' WHERE x = 'tab\there' AND y = 5")
    dev.execute("DELETE FROM public.cell WHERE x = 'comma, and (parens)' AND y = 8")
    dev.execute("INSERT INTO public.reading VALUES (9999, '2026-02-02', 1.5)")
    dev.execute("UPDATE public.reading SET value = -1 WHERE id = 3")
    before = prod.fingerprint(SCOPE)
    second = _apply(project)
    assert dev.fingerprint(SCOPE) == prod.fingerprint(SCOPE)
    sent = next(n for n in second["notes"] if n.startswith("sent only the rows that differ"))
    assert sent.startswith("sent only the rows that differ: 4 rows of "), sent
    written = {t["table"]: t for t in second["changes"]}
    assert written["public.cell"]["update"] == 1 and written["public.cell"]["delete"] == 1
    assert written["public.reading"]["insert"] == 1

    # Its way back is the snapshot's own dump (linked, not downloaded) and the difference:
    # the snapshot's keys that went up, and prod's versions of the rows the apply changed.
    newest = max(project.snapshots("prod"))
    applied = max(project.snapshots("dev"))
    assert (newest / "data.dump").stat().st_ino == (applied / "data.dump").stat().st_ino
    blocks = [
        line.split(" (")[0]
        for line in (newest / "catchup.copy").read_text().splitlines()
        if line.endswith("FROM stdin;")
    ]
    assert 'REMOVE "public"."cell"' in blocks and 'ADD "public"."cell"' in blocks
    assert not any(b.startswith("REPLACE") for b in blocks)

    result = project.run("rollback", "prod", "--yes")
    assert result.exit_code == 0, result.output
    assert prod.fingerprint(SCOPE) == before
    # and the rollback's own backup undoes it, exactly
    [undo] = [p for p in project.snapshots("prod") if p.name.endswith("pre-rollback")]
    result = project.run("rollback", "prod", "--to", f"prod/{undo.name}", "--yes")
    assert result.exit_code == 0, result.output
    assert prod.fingerprint(SCOPE) == dev.fingerprint(SCOPE)


def test_rows_past_the_limit_held_back_go_up_by_copy_and_end_the_same(
    project: Project, make_db, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a table's rows that go up are held back for finish()'s one round trip up to a limit;
    # past it, those held and the rest go by COPY (here: past two rows)
    monkeypatch.setattr(sparse, "UNSENT_AT_MOST", (2, 1 << 20))
    dev, prod = plain_app_pair(project, make_db, _fill, _config("changed"))
    _apply(project)
    dev.execute("UPDATE public.cell SET value = 'edited\\t\t\n' WHERE y < 5")
    dev.execute("UPDATE public.doc SET body = 'one' WHERE slug = 'slug 2 with space'")
    second = _apply(project)
    sent = next(n for n in second["notes"] if n.startswith("sent only the rows that differ"))
    assert sent.startswith("sent only the rows that differ: 6 rows of "), sent
    assert dev.fingerprint(SCOPE) == prod.fingerprint(SCOPE)


# COPY text lines, each with what COPY makes of it: octal and hex escapes, a backslash
# before a character that needs none, every control character COPY names, NULL and ''
ESCAPED_LINES = [
    b"1\ta\\b\tc",
    b"2\t\\101\\x42\\q\\\\\t\\N",
    b"3\t\\b\\f\\n\\r\\t\\v\t",
    b'4\t"quoted", (paren)\t \\x7',
    b"5\t\\N\t\\\\N",
]


def test_a_row_value_made_from_copy_text_holds_what_copy_loads(make_db) -> None:
    db = make_db("empty")
    columns = "id int, a text, b text"
    with psycopg.connect(db.app_url, autocommit=True) as conn:
        conn.execute(f"CREATE TEMP TABLE copied ({columns}); CREATE TEMP TABLE valued ({columns})")
        with conn.cursor() as cur, cur.copy("COPY copied FROM STDIN") as copy:
            copy.write(b"".join(line + b"\n" for line in ESCAPED_LINES))
        # and the hostile texts, as the server's COPY writes them
        conn.execute(
            "INSERT INTO copied SELECT 100 + i, t, reverse(t) FROM unnest(%s::text[]) "
            "WITH ORDINALITY AS u(t, i)",
            [HOSTILE],
        )
        with conn.cursor() as cur, cur.copy("COPY copied TO STDOUT") as copy:
            lines = b"".join(copy).splitlines()
        values = [copytext.row_literal(line.split(b"\t")).decode() for line in lines]
        conn.execute(
            "INSERT INTO valued SELECT (q.r).* FROM (SELECT CAST(u.l AS pg_temp.valued) AS r "
            "FROM unnest(%s::text[]) AS u(l) OFFSET 0) AS q",
            [values],
        )
        copied = conn.execute("SELECT * FROM copied ORDER BY id").fetchall()
        valued = conn.execute("SELECT * FROM valued ORDER BY id").fetchall()
    assert len(copied) == len(ESCAPED_LINES) + len(HOSTILE)
    assert copied[1] == (2, "AB" + "q\\", None)
    assert valued == copied


@pytest.mark.fast
def test_held_back_rows_past_the_limit_go_by_copy_in_order() -> None:
    same = [b"%d\tv" % i for i in range(sparse.SAMPLE)]  # the target's: the table is sparse
    new = [b"%d\tnew" % i for i in range(6)]
    staged = sparse.Sparse(
        TableName("public", "t"), 0, sql.Identifier("s"), sql.Identifier("r"), ("id",),
        ("id", "v"), {sparse.digest(r) for r in same},
    )  # fmt: skip
    sent: list[bytes] = []

    class Sink:
        def write(self, data: bytes) -> None:
            sent.append(data)

    limit = sparse.UNSENT_AT_MOST
    try:
        sparse.UNSENT_AT_MOST = (3, 1 << 20)
        lines = sparse.LineFilter(staged, ["id", "v"], Sink)
        lines.write(b"".join(r + b"\n" for r in same))
        for row in new:  # one a chunk: three held back, then a COPY for them and the rest
            lines.write(row + b"\n")
            assert bool(sent) == (row >= new[3])
        lines.close()
    finally:
        sparse.UNSENT_AT_MOST = limit
    assert staged.whole is False
    assert b"".join(sent) == b"".join(r + b"\n" for r in new)
    assert staged.unsent == [] and staged.uploaded == 6


def test_a_full_upload_and_a_sparse_one_stage_the_same_rows(project: Project, make_db) -> None:
    plain_app_pair(project, make_db, _fill, _config("all"))
    take(project, "dev")
    dry = project.run("apply", "prod", "--from", "dev", "--dry-run", "--json")
    assert dry.exit_code == 0, dry.output
    whole = json.loads(dry.stdout)
    assert not any(n.startswith("sent only") for n in whole["notes"])
    project.config(_config("changed"))
    dry = project.run("apply", "prod", "--from", "dev", "--dry-run", "--json")
    assert dry.exit_code == 0, dry.output
    assert json.loads(dry.stdout)["changes"] == whole["changes"]


@pytest.mark.fast
def test_a_dump_whose_columns_come_in_another_order_is_digested_in_the_snapshots() -> None:
    table = TableName("public", "t")
    target = {sparse.digest(b"x\t1"), sparse.digest(b"y\t2")}
    staged = sparse.Sparse(
        table, 0, sql.Identifier("s"), sql.Identifier("r"), ("id",), ("v", "id"), set(target)
    )
    sent: list[bytes] = []

    class Sink:
        def write(self, data: bytes) -> None:
            sent.append(data)

    lines = sparse.LineFilter(staged, ["id", "v"], Sink)
    lines.write(b"1\tx\n2\tchanged\n3\tnew\n")
    lines.close()
    # a few rows: held back for finish()'s round trip, no COPY opened
    assert sent == [] and staged.unsent == [(("id", "v"), [b"2\tchanged", b"3\tnew"])]
    # the target's row 2 is left: the snapshot changed it (removed from the staged rows)
    assert staged.target == {sparse.digest(b"y\t2")} and staged.sent == [b"2", b"3"]
    assert (staged.read, staged.uploaded) == (3, 2)


def test_a_table_whose_rows_mostly_differ_goes_up_whole_and_ends_the_same(
    project: Project, make_db
) -> None:
    # prod went its own way on every cell: sending "only what differs" would send them all
    # and make the server empty its copy of prod's rows first; the table goes up whole.
    dev, prod = plain_app_pair(project, make_db, _fill, _config("changed"))
    prod.execute("UPDATE public.cell SET value = 'prod ' || y")
    before = prod.fingerprint(SCOPE)
    take(project, "dev")

    result = project.run("apply", "prod", "--from", "dev", "--yes", "--json")

    assert result.exit_code == 0, result.output
    assert "public.cell: most rows differ from the target's, sent whole" in result.stderr
    assert "public.doc" not in result.stderr.split("sent whole")[0].splitlines()[-1]
    assert dev.fingerprint(SCOPE) == prod.fingerprint(SCOPE)
    rolled = project.run("rollback", "prod", "--yes")
    assert rolled.exit_code == 0, rolled.output
    assert prod.fingerprint(SCOPE) == before


@pytest.mark.fast
def test_the_first_rows_decide_whether_a_table_goes_up_whole() -> None:
    def filtered(target_rows: list[bytes], rows: list[bytes]) -> tuple[sparse.Sparse, bytes]:
        target = {sparse.digest(r) for r in target_rows}
        staged = sparse.Sparse(
            TableName("public", "t"), 0, sql.Identifier("s"), sql.Identifier("r"), ("id",),
            ("id", "v"), set(target),
        )  # fmt: skip
        sent: list[bytes] = []

        class Sink:
            def write(self, data: bytes) -> None:
                sent.append(data)

        lines = sparse.LineFilter(staged, ["id", "v"], Sink)
        for i in range(0, len(rows), 7):  # in chunks, as the archive comes
            lines.write(b"".join(r + b"\n" for r in rows[i : i + 7]))
        lines.close()
        return staged, _went_up(staged, sent)

    many = [b"%d\tv" % i for i in range(3 * sparse.SAMPLE)]
    # the target holds a fifth of the rows as they stand: every row goes up
    staged, sent = filtered(many[::5], many)
    assert staged.whole and sent == b"".join(r + b"\n" for r in many)
    assert (staged.read, staged.uploaded) == (len(many), len(many))
    # it holds every row but a few: only those go up
    staged, sent = filtered(many[:-3], many)
    assert staged.whole is False and sent == b"".join(r + b"\n" for r in many[-3:])
    assert (staged.read, staged.uploaded) == (len(many), 3)
    # a table smaller than the sample is decided on all of its rows
    staged, sent = filtered([], many[:10])
    assert staged.whole and staged.read == 10 and sent == b"".join(r + b"\n" for r in many[:10])
    # its first rows are the target's, one in twenty of the rest: once fewer than a third
    # of the rows read are, it goes up whole after all, the rows held back with the others
    # (each row once)
    more = [b"%d\tv" % i for i in range(4 * sparse.SAMPLE)]
    held = more[: sparse.SAMPLE] + more[sparse.SAMPLE :: 20]
    staged, sent = filtered(held, more)
    assert staged.whole
    assert sorted(sent.splitlines()) == sorted(more)
    assert (staged.read, staged.uploaded) == (len(more), len(more))
    # one in four of the rest: past its first rows more than a third of them stay the
    # target's, row after row (each chunk's rows counted as they are): it stays sparse
    quarter = more[: sparse.SAMPLE] + more[sparse.SAMPLE :: 4]
    staged, sent = filtered(quarter, more)
    assert staged.whole is False
    assert sorted(sent.splitlines()) == sorted(set(more) - set(quarter))
    # held back past the limit, it stays as it is
    limit = sparse.HOLD_AT_MOST
    try:
        sparse.HOLD_AT_MOST = 100
        staged, sent = filtered(held, more)
    finally:
        sparse.HOLD_AT_MOST = limit
    assert staged.whole is False
    assert sorted(sent.splitlines()) == sorted(set(more) - set(held))


def _row_texts(db: Database, table: str) -> set[str]:
    return {str(r[0]) for r in db.execute(f"SELECT t::text FROM {table} t")}


def test_auth_users_go_up_only_where_they_differ_and_are_created_as_before(
    project: Project, make_db
) -> None:
    # prod holds dev's rows, logins too; then dev gains a login (its trigger adds its
    # public.users row) and edits another's email
    dev, prod = resync_pair(project, make_db)
    dev.execute(
        "INSERT INTO auth.users (id, email, created_at) VALUES "
        "('00000000-0000-4000-8000-00000000abcd', 'new.login@example.com', now())"
    )
    [edited] = dev.execute("SELECT id, email FROM auth.users ORDER BY id DESC LIMIT 1")
    dev.execute("UPDATE auth.users SET email = 'edited@example.com' WHERE id = %s", [edited[0]])
    differ = {t: len(_row_texts(dev, t) - _row_texts(prod, t)) for t in ALL_TABLES}
    take(project, "dev")

    applied = _apply_bundled(project)

    # only the new login and the new public.users row went up: the edited login is one
    # prod holds (its key), and logins are created, never updated
    assert differ == {**dict.fromkeys(ALL_TABLES, 0), "auth.users": 2, "public.users": 1}
    sent = next(n for n in applied["notes"] if n.startswith("sent only the rows that differ"))
    assert sent.startswith("sent only the rows that differ: 2 rows of "), sent
    assert applied["auth"]["created_users"] == 1 and applied["auth"]["missing_after"] == 0
    # an auth user is created, never updated: prod's copy of the edited one stays
    assert prod.scalar("SELECT email FROM auth.users WHERE id = %s", [edited[0]]) == edited[1]
    assert dev.fingerprint(SCOPE_TABLES) == prod.fingerprint(SCOPE_TABLES)
    # its way back: prod's versions of what differs; the auth tables whole (their rows
    # prod holds were not compared)
    [backup] = project.snapshots("prod")
    blocks = [
        line.split(" (")[0]
        for line in (backup / "catchup.copy").read_text().splitlines()
        if line.endswith("FROM stdin;")
    ]
    assert 'REPLACE "auth"."users"' in blocks and 'ADD "public"."users"' not in blocks
    before = prod.fingerprint()
    rolled = project.run("rollback", "prod", "--yes")
    assert rolled.exit_code == 0, rolled.output
    # the scope as it was; the login the apply created stays (rollback never deletes logins)
    after = prod.fingerprint()
    assert after["auth.users"] == before["auth.users"]
    assert prod.scalar("SELECT count(*) FROM public.users WHERE id = %s", [NEW_LOGIN]) == 0


NEW_LOGIN = "00000000-0000-4000-8000-00000000abcd"


def _apply_bundled(project: Project) -> dict:
    result = project.run("apply", "prod", "--yes", "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.mark.fast
def test_by_key_only_rows_whose_key_the_target_lacks_go_up() -> None:
    # the target has key 1 (other values) and 3; the snapshot has 1, 2 and 4
    target = {sparse.digest(b"1"), sparse.digest(b"3")}
    staged = sparse.Sparse(
        TableName("auth", "users"), 0, sql.Identifier("s"), sql.Identifier("r"), ("id",),
        ("id", "email"), set(target), by_key=True,
    )  # fmt: skip
    sent: list[bytes] = []

    class Sink:
        def write(self, data: bytes) -> None:
            sent.append(data)

    lines = sparse.LineFilter(staged, ["email", "id"], Sink)
    lines.write(b"a@x\t1\nb@x\t2\nc@x\t4\n")
    lines.close()
    assert _went_up(staged, sent) == b"b@x\t2\nc@x\t4\n"
    # key 3 is the target's alone: removed from the staged rows; key 1 stays as it is
    assert staged.target == {sparse.digest(b"3")} and staged.sent == [b"2", b"4"]


@pytest.mark.parametrize("kind", [checksum.MD5, checksum.HASHTEXT])
def test_the_server_makes_a_tables_checksum_as_the_tool_does(make_db, kind: str) -> None:
    # a table whose record adds up is decided in the server (its digests never come down)
    db = make_db("empty")
    sums = "-9223372036854775808:123456789012345678901"
    with psycopg.connect(db.app_url, autocommit=True) as conn:
        made = checksum.checksum_sql(sql.Literal("1200"), sql.Literal(sums), kind)
        [(server,)] = conn.execute(sql.SQL("SELECT {}").format(made)).fetchall()
    assert server == checksum.digest(1200, sums, kind)
    assert server != checksum.digest(1201, sums, kind)
