"""Prod to dev, safely: a take of prod is masked on the server, applies to dev as any snapshot,
and no real person's value reaches the archive or dev."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from snapshot.config import parse_config
from snapshot.errors import ConfigError
from snapshot.manifest import Manifest
from snapshot.masking.rules import PASSWORD, PASSWORD_HASH, Rule
from snapshot.names import TableName
from tests.fix_db import SCOPE_TABLES, Database
from tests.fix_project import Project, one_error_line, sample_manifest

KEY = "a-long-random-team-secret-0001"
OTHER_KEY = "another-long-random-secret-0002"

RULES = """
[masking.columns]
"users.email" = "email"
"users.display_name" = "name"
"users.bio" = "text"
"users.avatar_url" = "null"
"""

# People only prod has: distinctive values to search for afterwards.
PEOPLE = [
    ("Quentin Marmaduke", "quentin.marmaduke@realmail.test", "+31612345678"),
    ("Ottilie Wraxall", "ottilie.wraxall@realmail.test", "+31687654321"),
    ("Bartholomew Pennywhistle", "b.pennywhistle@realmail.test", None),
]


def personal_prod(prod: Database) -> list[str]:
    """Give prod's first users real-looking people, in auth and in the app, and return every
    original value (emails, names, phones, password hashes) that must not leave it."""
    ids = [
        r[0]
        for r in prod.execute("SELECT id FROM public.users ORDER BY id LIMIT %s", [len(PEOPLE)])
    ]
    originals = []
    for user_id, (name, email, phone) in zip(ids, PEOPLE, strict=True):
        secret = f"$2a$10$realhash{user_id.hex[:20]}"
        prod.execute(
            "UPDATE auth.users SET email = %s, phone = %s, encrypted_password = %s, "
            "raw_user_meta_data = jsonb_build_object('display_name', %s::text, 'email', %s::text)"
            " WHERE id = %s",
            [email, phone, secret, name, email, user_id],
        )
        prod.execute(
            "UPDATE auth.identities SET identity_data = jsonb_build_object('sub', user_id::text, "
            "'email', %s::text, 'full_name', %s::text) WHERE user_id = %s",
            [email, name, user_id],
        )
        prod.execute(
            "UPDATE public.users SET email = %s, display_name = %s, "
            "bio = 'Write to me at ' || %s::text WHERE id = %s",
            [email, name, email, user_id],
        )
        originals += [email, name, secret, *([phone] if phone else [])]
    return originals


@pytest.fixture
def masked_pair(project: Project, make_db, monkeypatch: pytest.MonkeyPatch):
    dev, prod = make_db("empty"), make_db("prod")  # an empty dev: every auth user is created
    project.point("dev", dev)
    project.point("prod", prod)
    project.config(RULES)
    monkeypatch.setenv("SNAPSHOT_MASK_KEY", KEY)
    return dev, prod


def take_masked(project: Project) -> Path:
    taken = project.run("take", "prod", "--json")
    assert taken.exit_code == 0, taken.output
    return Path(json.loads(taken.stdout)["path"])


def archive_bytes(folder: Path, restore_bin: Path) -> bytes:
    """Every byte of a snapshot folder, the dump's compressed data as pg_restore reads it."""
    script = subprocess.run(
        [str(restore_bin / "pg_restore"), "--data-only", "--file=-", str(folder / "data.dump")],
        check=True,
        capture_output=True,
    ).stdout
    return script + b"".join(p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file())


def manifest_of(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def test_a_masked_take_applies_to_dev_with_no_original_left(
    project: Project, masked_pair, restore_bin: Path
) -> None:
    dev, prod = masked_pair
    originals = personal_prod(prod)

    dev_before = dev.fingerprint(SCOPE_TABLES)
    folder = take_masked(project)

    manifest = json.loads((folder / "manifest.json").read_text())
    masking = manifest["masking"]
    assert masking["rules"]["public.users.email"] == "email"
    assert masking["rules"]["auth.users.encrypted_password"] == f"the bcrypt hash of {PASSWORD!r}"
    assert len(masking["key_fingerprint"]) == 16
    archived = archive_bytes(folder, restore_bin)
    assert KEY.encode() not in archived
    assert b"realmail" not in archived and b"$2a$10$realhash" not in archived
    for value in originals:
        assert value.encode() not in archived, value

    applied = project.run("apply", "dev", "--from", "prod", "--yes", "--json")

    assert applied.exit_code == 0, applied.output
    assert "masked" in applied.stderr + applied.stdout
    for value in originals:
        for table in ("public.users", "auth.users", "auth.identities"):
            found = dev.scalar(
                f"SELECT count(*) FROM {table} t WHERE t::text LIKE %s", [f"%{value}%"]
            )
            assert found == 0, (value, table)
    # Joins on a masked column still join; the same email masks the same in both tables.
    assert dev.scalar(
        "SELECT count(*) FROM public.users u JOIN auth.users a ON a.id = u.id "
        "WHERE u.email IS DISTINCT FROM a.email"
    ) == prod.scalar(
        "SELECT count(*) FROM public.users u JOIN auth.users a ON a.id = u.id "
        "WHERE u.email IS DISTINCT FROM a.email"
    )
    # Unique columns stay unique; the password is the documented one.
    assert dev.scalar("SELECT count(DISTINCT email) = count(email) FROM auth.users")
    assert dev.scalar("SELECT count(DISTINCT phone) = count(phone) FROM auth.users")
    assert dev.scalar(
        "SELECT bool_and(encrypted_password = %s) FROM auth.users u "
        "WHERE u.id IN (SELECT id FROM public.users)",
        [PASSWORD_HASH],
    )
    # Every foreign key holds: the apply committed with constraints on; the rows are prod's.
    assert dev.scalar("SELECT count(*) FROM public.question_attempts") == prod.scalar(
        "SELECT count(*) FROM public.question_attempts"
    )
    same = [t for t in SCOPE_TABLES if t != "public.users"]
    assert dev.fingerprint(same) == prod.fingerprint(same)

    rolled = project.run("rollback", "dev", "--yes")
    assert rolled.exit_code == 0, rolled.output
    assert dev.fingerprint(SCOPE_TABLES) == dev_before
    # Nowhere in the archive (dev's pre-apply and pre-rollback backups too) is a real person.
    everything = b"".join(archive_bytes(folder, restore_bin) for folder in project.snapshots())
    assert len(project.snapshots()) == 3
    for value in originals:
        assert value.encode() not in everything, value


def test_the_same_key_masks_the_same_in_every_take_another_key_otherwise(
    project: Project, masked_pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    _dev, prod = masked_pair
    personal_prod(prod)

    first, second = take_masked(project), take_masked(project)
    verbose = project.run("-v", "take", "prod")  # every log line: the key is in none
    assert verbose.exit_code == 0 and KEY not in verbose.output
    assert f"masked (key {manifest_of(first)['masking']['key_fingerprint']})" in verbose.stderr
    monkeypatch.setenv("SNAPSHOT_MASK_KEY", OTHER_KEY)
    other = take_masked(project)

    def masked_checksums(folder: Path) -> dict[str, str]:
        manifest = manifest_of(folder)
        masked = set(manifest["masking"]["tables"])
        return {t["table"]: t["checksum"] for t in manifest["tables"] if t["table"] in masked}

    assert set(masked_checksums(first)) == {"public.users", "auth.users", "auth.identities"}
    assert masked_checksums(first) == masked_checksums(second)
    assert (first / "masked.copy").read_bytes() == (second / "masked.copy").read_bytes()
    differ = masked_checksums(other)
    assert all(differ[t] != c for t, c in masked_checksums(first).items())
    assert (
        manifest_of(first)["masking"]["key_fingerprint"]
        == (manifest_of(second)["masking"]["key_fingerprint"])
    )
    assert (
        manifest_of(other)["masking"]["key_fingerprint"]
        != (manifest_of(first)["masking"]["key_fingerprint"])
    )


def test_emails_in_arrays_and_json_are_masked_and_still_join(
    project: Project, masked_pair, restore_bin: Path
) -> None:
    dev, prod = masked_pair
    originals = personal_prod(prod)
    for db in (dev, prod):
        db.execute("ALTER TABLE public.users ADD COLUMN alt_emails text[]")
        db.execute("ALTER TABLE public.users ADD COLUMN last_ip inet")
    prod.execute(
        "UPDATE public.users SET alt_emails = ARRAY[email, 'x@realmail.test'], "
        "last_ip = '203.0.113.7'"
    )
    prod.execute(
        "UPDATE public.user_preferences p SET settings = settings || "
        "jsonb_build_object('contact', u.email) FROM public.users u WHERE u.id = p.user_id"
    )
    project.config(
        RULES
        + """"users.alt_emails" = "email"
"users.last_ip" = "ip"
"user_preferences.settings" = "json"
"""
    )

    folder = take_masked(project)

    archived = archive_bytes(folder, restore_bin)
    for value in [*originals, "x@realmail.test", "203.0.113.7"]:
        assert value.encode() not in archived, value
    applied = project.run("apply", "dev", "--from", "prod", "--yes")
    assert applied.exit_code == 0, applied.output
    # An email masks the same in a text column, an array and a JSON document.
    assert dev.scalar(
        "SELECT count(*) FROM public.users u JOIN public.user_preferences p ON p.user_id = u.id "
        "WHERE u.email = u.alt_emails[1] AND p.settings ->> 'contact' = u.email"
    ) == prod.scalar(
        "SELECT count(*) FROM public.users u JOIN public.user_preferences p ON p.user_id = u.id "
        "WHERE p.settings ? 'contact'"
    )
    assert dev.scalar("SELECT count(DISTINCT last_ip) FROM public.users") == 1


def shape(document: object) -> object:
    """A JSON document with every string replaced by ``"<string>"``: its keys, nesting, array
    lengths and other values, what masking keeps."""
    if isinstance(document, dict):
        return {k: shape(v) for k, v in document.items()}
    if isinstance(document, list):
        return [shape(v) for v in document]
    return "<string>" if isinstance(document, str) else document


def strings_at(document: object, path: tuple[object, ...]) -> object:
    for step in path:
        document = document[step]  # type: ignore[index]
    return document


def test_json_is_masked_at_every_depth_keeping_its_shape(
    project: Project, masked_pair, restore_bin: Path
) -> None:
    dev, prod = masked_pair
    originals = personal_prod(prod)
    first = PEOPLE[0][1]  # public.users.email of the user whose settings these are
    second, third = "second.person@realmail.test", "third.person@realmail.test"
    document = {
        "contact": first,  # depth 1
        "score": 12.5,
        "beta": True,
        "gone": None,
        "backup": [{"email": second, "primary": False}],  # depth 3, in an array of objects
        "aliases": {"home": [third, second, 7]},  # depth 3, in an object of arrays
        "org": {"teams": [{"members": [{"email": first, "age": 41}, 7, None, []]}], "ids": [1]},
    }  # org.teams[0].members[0].email: depth 6
    user_id = prod.scalar(
        "SELECT p.user_id FROM public.user_preferences p JOIN public.users u ON u.id = p.user_id "
        "WHERE u.email = %s",
        [first],
    )
    prod.execute(
        "UPDATE public.user_preferences SET settings = %s WHERE user_id = %s",
        [json.dumps(document), user_id],
    )
    project.config(RULES + '"user_preferences.settings" = "json"\n')

    folder, again = take_masked(project), take_masked(project)

    assert (folder / "masked.copy").read_bytes() == (again / "masked.copy").read_bytes()
    archived = archive_bytes(folder, restore_bin)
    for value in [*originals, second, third, "realmail"]:
        assert value.encode() not in archived, value
    applied = project.run("apply", "dev", "--from", "prod", "--yes")
    assert applied.exit_code == 0, applied.output
    masked = dev.scalar(
        "SELECT settings FROM public.user_preferences WHERE user_id = %s", [user_id]
    )
    assert shape(masked) == shape(document)
    firsts = {
        strings_at(masked, p) for p in [("contact",), ("org", "teams", 0, "members", 0, "email")]
    }
    seconds = {strings_at(masked, p) for p in [("backup", 0, "email"), ("aliases", "home", 1)]}
    [first_fake], [second_fake] = firsts, seconds  # the same email, the same fake
    third_fake = strings_at(masked, ("aliases", "home", 0))
    assert len({first_fake, second_fake, third_fake}) == 3
    assert all(str(f).endswith("@example.com") for f in (first_fake, second_fake, third_fake))
    assert first_fake == dev.scalar("SELECT email FROM public.users WHERE id = %s", [user_id])
    assert (
        dev.scalar(
            "SELECT count(*) FROM public.user_preferences t WHERE t::text LIKE '%%realmail%%'"
        )
        == 0
    )


def test_a_personal_column_without_a_rule_refuses_the_take(project: Project, masked_pair) -> None:
    _dev, prod = masked_pair
    prod.execute("ALTER TABLE public.answers ADD COLUMN reviewer text")
    prod.execute("UPDATE public.answers SET reviewer = 'someone@realmail.test' WHERE id % 7 = 0")
    project.config(RULES.replace('"users.bio" = "text"\n', ""))

    refused = project.run("take", "prod")

    assert refused.exit_code == 2
    assert one_error_line(refused) == (
        "Error: refusing to take prod: 2 columns look personal and have no masking rule: "
        "'public.users.bio' = \"text\" (its name); 'public.answers.reviewer' = \"email\" "
        "(sampled values: 500 of 500 hold an email); add a rule for each under "
        '[masking.columns] in snapshot.toml ("keep" takes one as it is), as \'snapshot '
        "check' suggests"
    )
    assert project.snapshots("prod") == []

    project.config(
        RULES + '"answers.reviewer" = "keep"\n'
    )  # an explicit keep is a rule: the column is taken as it is
    kept = take_masked(project)
    assert manifest_of(kept)["masking"]["rules"]["public.answers.reviewer"] == "keep"


def test_a_rule_on_a_key_follows_it_into_every_referencing_column(
    project: Project, masked_pair
) -> None:
    dev, prod = masked_pair
    project.config(RULES + '"auth.users.id" = "hash"\n')

    folder = take_masked(project)
    applied = project.run("apply", "dev", "--from", "prod", "--yes")

    rules = manifest_of(folder)["masking"]["rules"]
    for column in ("public.users.id", "auth.identities.user_id", "public.questions.author_id"):
        assert rules[column] == "hash", column
    assert applied.exit_code == 0, applied.output  # with every foreign key on
    ids = "SELECT id FROM auth.users"
    assert not set(dev.execute(ids)) & set(prod.execute(ids))
    joined = (
        "SELECT count(*) FROM public.question_attempts a JOIN public.users u ON u.id = a.user_id "
        "JOIN auth.users au ON au.id = u.id"
    )
    assert dev.scalar(joined) == prod.scalar(joined) > 0

    project.config(RULES + '"public.users.id" = "hash"\n')
    refused = project.run("take", "prod")
    assert refused.exit_code == 2
    assert one_error_line(refused).startswith(
        "Error: [masking.columns] public.users.id references auth.users.id (foreign key "
    )


def test_quoted_names_and_partitioned_tables_are_masked_as_named(
    project: Project, masked_pair
) -> None:
    dev, prod = masked_pair
    for db in (dev, prod):
        db.execute(
            'CREATE TABLE public."Contact" (id int PRIMARY KEY, "Email Address" text UNIQUE); '
            "CREATE TABLE public.visits (id int, at date NOT NULL, ip inet) PARTITION BY RANGE (at);"
            " CREATE TABLE public.visits_2026 PARTITION OF public.visits "
            "FOR VALUES FROM ('2026-01-01') TO ('2027-01-01'); "
            'GRANT ALL ON public."Contact", public.visits, public.visits_2026 TO app_owner'
        )
    prod.execute(
        """INSERT INTO public."Contact" SELECT i, 'c' || i || '@realmail.test' """
        "FROM generate_series(1, 40) i"
    )
    prod.execute(
        "INSERT INTO public.visits SELECT i, date '2026-03-01' + i, ('198.51.100.' || i)::inet "
        "FROM generate_series(1, 40) i"
    )
    tables = ", ".join(f"'{t}'" for t in (*SCOPE_TABLES, 'public."Contact"', "public.visits"))
    project.config(
        f"[scope]\ntables = [{tables}]\n"
        + RULES
        + """'public."Contact"."Email Address"' = "email"
"visits.ip" = "ip"
"visits.at" = { kind = "date", days = 3 }
"""
    )

    take_masked(project)
    applied = project.run("apply", "dev", "--from", "prod", "--yes")

    assert applied.exit_code == 0, applied.output
    assert dev.scalar("""SELECT count(DISTINCT "Email Address") FROM public."Contact" """) == 40
    assert (
        dev.scalar(
            """SELECT count(*) FROM public."Contact" WHERE "Email Address" LIKE '%realmail%'"""
        )
        == 0
    )
    assert dev.scalar("SELECT count(*) FROM public.visits WHERE ip << '10.0.0.0/8'") == 40
    assert (
        dev.scalar(
            "SELECT count(*) FROM public.visits WHERE at BETWEEN '2026-02-26' AND '2026-04-13'"
        )
        == 40
    )


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        (
            '"users.handle" = "name"',
            "[masking.columns] public.users.handle = name: the column is character varying(20) "
            "under a unique index: its fakes (up to 30 characters) would be cut and could "
            "collide; choose another rule",
        ),
        (
            '"users.handle" = { value = "x" }',
            "[masking.columns] public.users.handle = value 'x': the column is under a unique "
            "index: one fixed value would repeat; choose another rule",
        ),
        (
            '"users.created_at" = "null"',
            "[masking.columns] public.users.created_at = null: the column is NOT NULL: it "
            "cannot be null; choose another rule",
        ),
        (
            '"users.emial" = "email"',
            "[masking.columns] public.users.emial: public.users has no column 'emial'",
        ),
    ],
)
def test_a_rule_the_column_cannot_take_is_refused_in_one_line(
    project: Project, masked_pair, rule: str, message: str
) -> None:
    _dev, prod = masked_pair
    prod.execute("ALTER TABLE public.users ADD COLUMN handle varchar(20) UNIQUE")
    project.config(RULES + rule + "\n")

    refused = project.run("take", "prod")

    assert refused.exit_code == 2
    assert one_error_line(refused) == f"Error: {message}"


def test_check_lists_the_columns_a_masked_take_would_refuse_with_a_rule_each(
    project: Project, masked_pair
) -> None:
    project.config("[masking]\n")  # the team masks, with no rule yet
    assert project.run("take", "dev").exit_code == 0

    unruled = project.run("check", "prod", "--json")

    assert unruled.exit_code == 0, unruled.output
    [found] = [
        f for f in json.loads(unruled.stdout)["findings"] if f["check"] == "personal columns"
    ]
    assert found["status"] == "warning"
    assert found["detail"] == (
        "3 columns of prod look personal and have no masking rule, so a take of prod refuses: "
        "add under [masking.columns] in snapshot.toml: 'public.users.email' = \"email\" (its "
        "name); 'public.users.display_name' = \"name\" (its name); 'public.users.bio' = "
        '"text" (its name)'
    )

    project.config(RULES)
    ruled = project.run("check", "prod", "--json")
    [found] = [f for f in json.loads(ruled.stdout)["findings"] if f["check"] == "personal columns"]
    assert found["status"] == "ok"


def test_list_marks_masked_and_unmasked_takes(project: Project, masked_pair) -> None:
    take_masked(project)
    assert project.run("take", "prod", "--unmasked").exit_code == 0
    assert project.run("take", "dev").exit_code == 0

    listed = project.run("list", "--json")
    shown = project.run("list")

    people = {(s["environment"], s["people"]) for s in json.loads(listed.stdout)}
    assert people == {("prod", "masked"), ("prod", "unmasked"), ("dev", "")}
    assert "people" in shown.stdout.splitlines()[0]
    assert sum(" masked" in line for line in shown.stdout.splitlines()) == 1
    assert sum(" unmasked" in line for line in shown.stdout.splitlines()) == 1


@pytest.mark.fast
def test_rules_are_read_from_snapshot_toml(tmp_path: Path) -> None:
    config = parse_config(
        {
            "masking": {
                "key_env": "TEAM_MASK_KEY",
                "columns": {
                    "users.email": "email",
                    "public.users.bio": {"value": "redacted"},
                    "users.created_at": {"kind": "date", "days": 7},
                    "auth.users.phone": "keep",
                },
            }
        },
        None,
        tmp_path,
    )

    users = TableName("public", "users")
    assert config.masking.key_env == "TEAM_MASK_KEY" and config.masking.auth
    assert config.masking.columns == {
        (users, "email"): Rule("email"),
        (users, "bio"): Rule("value", value="redacted"),
        (users, "created_at"): Rule("date", days=7),
        (TableName("auth", "users"), "phone"): Rule("keep"),
    }


@pytest.mark.fast
@pytest.mark.parametrize(
    ("masking", "message"),
    [
        (
            {"columns": {"users.email": "scramble"}},
            "[masking.columns] 'users.email' is 'scramble': write one of email, name, phone, "
            'address, text, ip, json, date, hash, null, keep, or { value = "..." }',
        ),
        (
            {"columns": {"users.bio": {"value": 3}}},
            "[masking.columns] 'users.bio' value must be text (quoted), not 3",
        ),
        (
            {"columns": {"users.created_at": {"kind": "date", "days": 0}}},
            "[masking.columns] 'users.created_at' days must be a whole number of at least 1",
        ),
        (
            {"columns": {"posts.body": "text"}},
            "[masking.columns] 'posts.body' names a column of public.posts, which is not in "
            "[scope] tables",
        ),
        ({"columns": {"email": "email"}}, "[masking.columns]: 'email' is not a column"),
        ({"key_env": "MY KEY"}, "[masking] key_env must name an environment variable"),
        ({"rules": {}}, "unknown setting 'rules' in [masking]"),
    ],
)
def test_a_bad_rule_is_one_clear_line(tmp_path: Path, masking: dict, message: str) -> None:
    with pytest.raises(ConfigError) as refused:
        parse_config({"masking": masking}, None, tmp_path)

    assert str(refused.value).startswith(message), str(refused.value)
    assert "\n" not in str(refused.value)


@pytest.mark.fast
def test_the_manifest_records_the_rules_and_the_key_fingerprint_not_the_key() -> None:
    from snapshot.manifest import Masking
    from snapshot.masking.rules import fingerprint

    masking = Masking(
        (("public.users.email", "email"),), fingerprint(KEY), "masked.copy", ("public.users",)
    )
    manifest = sample_manifest()
    data = {**manifest.to_json(), "masking": masking.to_json()}

    assert Manifest.from_json(data).masking == masking
    assert KEY not in json.dumps(data)
    assert fingerprint(KEY) != fingerprint(OTHER_KEY)


def test_a_masked_snapshot_applies_alike_when_only_the_changed_rows_go_up(
    project: Project, make_db, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Sparse staging (snapshot.sparse) leaves the masked tables to their masked.copy rows:
    # a dev that already holds most rows ends as a full upload makes it, and rolls back.
    prod, whole, changed = make_db("prod"), make_db("dev"), make_db("dev")
    project.point("prod", prod)
    monkeypatch.setenv("SNAPSHOT_MASK_KEY", KEY)
    project.config(RULES)
    take_masked(project)
    before = changed.fingerprint(SCOPE_TABLES)
    for db, upload in ((whole, "all"), (changed, "changed")):
        project.point("dev", db)
        project.config(RULES + f'\n[apply]\nupload = "{upload}"\n')
        applied = project.run("apply", "dev", "--from", "prod", "--yes", "--json")
        assert applied.exit_code == 0, applied.output
    assert changed.fingerprint(SCOPE_TABLES) == whole.fingerprint(SCOPE_TABLES)
    rolled = project.run("rollback", "dev", "--yes")
    assert rolled.exit_code == 0, rolled.output
    assert changed.fingerprint(SCOPE_TABLES) == before
