"""Safe in every direction: prod's people never reach dev unasked, and any direction but
dev -> prod is confirmed by a person."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from snapshot import direction
from snapshot.config import parse_config
from snapshot.errors import ConfigError
from tests.fix_apps import NEW_USER, prod_snapshot
from tests.fix_db import SCOPE_TABLES
from tests.fix_project import Project, at_a_terminal, one_error_line


def test_prod_is_taken_masked_or_explicitly_unmasked(project: Project, make_db) -> None:
    project.point("prod", make_db("prod"))

    refused = project.run("take", "prod")  # masked (tests/test_masking.py), but no key is set

    assert refused.exit_code == 2
    assert one_error_line(refused) == (
        "Error: refusing to take prod: it is not marked safe, so its snapshot is masked, and "
        "the masking key $SNAPSHOT_MASK_KEY is not set; set it to a long random secret the "
        "team keeps (the same one gives the same fakes in every take), or pass --unmasked to "
        "take it as it is"
    )
    assert not (project.path / "snapshots").exists()

    taken = project.run("take", "prod", "--unmasked", "--json")

    assert taken.exit_code == 0, taken.output
    manifest = json.loads((Path(json.loads(taken.stdout)["path"]) / "manifest.json").read_text())
    assert manifest["source_safe"] is False


def test_reversed_arguments_copy_nothing_of_prod_into_dev(project: Project, make_db) -> None:
    dev, prod = make_db("dev"), make_db("prod")
    prod_snapshot(project, dev, prod)
    before = dev.fingerprint()  # the scope, auth.users and auth.identities

    implicit = project.run("apply", "dev")  # dev has no usual source: it is never guessed
    named = project.run("apply", "dev", "--from", "prod", "--yes")
    cutover = project.run("cutover", "prod", "dev", "--yes")
    checked = project.run("check", "dev", "--from", "prod")

    assert implicit.exit_code == 2
    assert one_error_line(implicit) == "Error: which snapshot should go to dev? pass --from ENV"
    for refused in (named, checked):
        assert refused.exit_code == 2
        line = one_error_line(refused)
        assert line.startswith("Error: refusing to apply prod/")
        assert (
            "to dev: prod is not marked safe and dev is, so it would copy real people's data "
            "(logins, password hashes, personal columns) into dev; pass --unmasked" in line
        )
    assert cutover.exit_code == 2
    assert one_error_line(cutover).startswith("Error: refusing to take prod: it is not marked safe")
    assert dev.fingerprint() == before
    assert project.snapshots("dev") == [] and len(project.snapshots("prod")) == 1


def test_an_unmasked_apply_creates_auth_users_only_when_asked(project: Project, make_db) -> None:
    # prod: dev's data, one question edited, and one person who signed up in prod alone.
    dev, prod = make_db("dev"), make_db("dev")
    prod.execute("UPDATE public.questions SET title = title || ' (prod)' WHERE id = 1")
    prod.execute(
        "INSERT INTO auth.users (id, email, encrypted_password) "
        "VALUES (%s, 'person@prod.example', '$2a$10$hash')",
        [NEW_USER],
    )
    prod_snapshot(project, dev, prod)
    before = dev.fingerprint()

    unasked = project.run("apply", "dev", "--from", "prod", "--unmasked", "--yes", "--json")

    assert unasked.exit_code == 1, unasked.output
    findings = {f["check"]: f for f in json.loads(unasked.stdout)["findings"]}
    assert findings["auth users"] == {
        "check": "auth users",
        "status": "warning",
        "detail": "none created: the snapshot comes from prod, which is not marked safe; pass "
        "--create-auth-users to create its users in dev",
    }
    refs = findings["outside references"]
    assert refs["status"] == "error"
    assert refs["detail"].startswith("1 snapshot row of public.users points at auth.users rows")
    assert refs["detail"].endswith("pass --create-auth-users to create them from the snapshot")
    assert dev.fingerprint() == before

    asked = project.run(
        "apply", "dev", "--from", "prod", "--unmasked", "--create-auth-users", "--yes"
    )

    assert asked.exit_code == 0, asked.output
    assert dev.fingerprint(SCOPE_TABLES) == prod.fingerprint(SCOPE_TABLES)
    assert dev.scalar("SELECT count(*) FROM auth.users WHERE id = %s", [NEW_USER]) == 1


def test_an_unmasked_apply_says_it_created_no_auth_users(project: Project, make_db) -> None:
    dev, prod = make_db("dev"), make_db("dev")
    prod.execute("UPDATE public.questions SET title = title || ' (prod)' WHERE id = 1")
    prod_snapshot(project, dev, prod)
    auth_before = dev.fingerprint(("auth.users", "auth.identities"))

    result = project.run("apply", "dev", "--from", "prod", "--unmasked", "--yes", "--json")

    assert result.exit_code == 0, result.output
    note = (
        "auth users: none created: the snapshot comes from prod, which is not marked safe; "
        "pass --create-auth-users to create its users in dev"
    )
    assert note in json.loads(result.stdout)["notes"]
    assert f"note: {note}" in result.stderr
    assert dev.fingerprint(SCOPE_TABLES) == prod.fingerprint(SCOPE_TABLES)
    assert dev.fingerprint(("auth.users", "auth.identities")) == auth_before
    # Rolling dev back to its own backup is never refused.
    undo = project.run("rollback", "dev", "--yes")
    assert undo.exit_code == 0, undo.output


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(lambda m: m.pop("source_safe"), id="an older manifest of prod"),
        pytest.param(
            lambda m: (m.pop("source_safe"), m.update(environment="gone")), id="unknown source"
        ),
    ],
)
def test_a_manifest_without_the_record_falls_back_to_not_safe(
    project: Project, make_db, edit
) -> None:
    dev, prod = make_db("dev"), make_db("prod")
    snapshot = prod_snapshot(project, dev, prod)
    path = snapshot / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))
    before = dev.fingerprint()

    result = project.run("apply", "dev", "--snapshot", f"prod/{snapshot.name}", "--yes")

    assert result.exit_code == 2
    assert "is not marked safe and dev is" in one_error_line(result)
    assert dev.fingerprint() == before


def test_an_unusual_direction_asks_even_onto_a_safe_target(project: Project, make_db) -> None:
    dev, prod = make_db("dev"), make_db("dev")
    prod.execute("UPDATE public.questions SET title = title || ' (prod)' WHERE id = 1")
    prod_snapshot(project, dev, prod)
    before = dev.fingerprint()
    args = ["apply", "dev", "--from", "prod", "--unmasked"]

    scripted = project.run(*args)
    asked = at_a_terminal(project, args, "no\n")

    assert scripted.exit_code == 2
    assert one_error_line(scripted) == (
        "Error: refusing to change dev without confirmation: prod -> dev is not the usual "
        "direction (dev -> prod), and there is no terminal to ask in; pass --yes to confirm "
        "from a script"
    )
    assert asked.returncode == 1, asked.stderr
    assert "warning: prod -> dev is not the usual direction (dev -> prod)" in asked.stderr
    assert "Type dev to apply prod's snapshot to dev: " in asked.stderr
    assert "apply to dev cancelled: nothing was changed" in asked.stderr
    assert dev.fingerprint() == before


# --- which directions are allowed, and with what: no database needed -------------------------


@pytest.mark.fast
@pytest.mark.parametrize(
    ("source", "target", "flags", "usual", "withheld"),
    [
        ("dev", "prod", {}, True, ""),
        ("prod", "prod", {}, False, ""),  # onto a target not marked safe: nothing to withhold
        ("prod", "dev", {"unmasked": True}, False, "pass --create-auth-users to create"),
        ("prod", "dev", {"unmasked": True, "create_auth_users": True}, False, ""),
    ],
)
def test_the_direction_of_an_apply_is_decided_from_what_is_marked_safe(
    tmp_path: Path, source: str, target: str, flags: dict, usual: bool, withheld: str
) -> None:
    config = parse_config({}, None, tmp_path)  # dev safe, prod not; prod's usual source: dev
    options = {"unmasked": False, "create_auth_users": False, **flags}

    decided = direction.decide(
        config, source, source == "dev", target, what=f"{source}/x", **options
    )

    assert decided.usual is usual
    assert withheld in decided.auth_withheld and bool(decided.auth_withheld) is bool(withheld)
    if not usual:
        assert decided.unusual_sentence() == (
            f"{source} -> {target} is not the usual direction (dev -> prod)"
        )


@pytest.mark.fast
def test_prod_onto_a_safe_target_is_refused_unless_unmasked(tmp_path: Path) -> None:
    config = parse_config({}, None, tmp_path)

    with pytest.raises(ConfigError) as caught:
        direction.decide(
            config, "prod", False, "dev", what="prod/x", unmasked=False, create_auth_users=False
        )

    assert "refusing to apply prod/x to dev: prod is not marked safe and dev is" in str(
        caught.value
    )
