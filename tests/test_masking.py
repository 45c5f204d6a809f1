"""Prod to dev, safely: a take of prod is masked on the server, applies to dev as any snapshot,
and no real person's value reaches the archive or dev."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from snapshot.masking.rules import PASSWORD, PASSWORD_HASH
from tests.fix_db import SCOPE_TABLES, Database
from tests.fix_project import Project

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


def masked_values(folder: Path, prod: Database, project: Project) -> dict:
    return json.loads((folder / "manifest.json").read_text())["masking"]


def test_a_masked_take_applies_to_dev_with_no_original_left(
    project: Project, masked_pair, tmp_path: Path
) -> None:
    dev, prod = masked_pair
    originals = personal_prod(prod)

    folder = take_masked(project)

    manifest = json.loads((folder / "manifest.json").read_text())
    masking = manifest["masking"]
    assert masking["rules"]["public.users.email"] == "email"
    assert masking["rules"]["auth.users.encrypted_password"] == f"the bcrypt hash of {PASSWORD!r}"
    assert len(masking["key_fingerprint"]) == 16
    archived = b"".join(p.read_bytes() for p in folder.rglob("*") if p.is_file())
    assert KEY.encode() not in archived
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
