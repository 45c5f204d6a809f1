"""Auth users: who becomes a login in the target, and whose app rows an apply removes,
said before asking and after committing; the second can be made an error."""

from __future__ import annotations

import json

from tests.fix_apps import apply
from tests.fix_db import SCOPE_TABLES, Database
from tests.fix_project import Project, at_a_terminal


def _ids(db: Database, query: str) -> set[str]:
    return {str(r[0]) for r in db.execute(query)}


def _pair(project: Project, make_db) -> tuple[Database, Database, set[str]]:
    """dev and prod, 2 of dev's new users unconfirmed, 3 of prod's own users recently active.

    Returns the prod users that keep their login but lose their app rows (computed here,
    independently of the tool: referenced by prod's public.users, absent from dev).
    """
    dev, prod = make_db("dev"), make_db("prod")
    dev_only = sorted(
        _ids(dev, "SELECT id FROM auth.users") - _ids(prod, "SELECT id FROM auth.users")
    )
    dev.execute(
        "UPDATE auth.users SET email_confirmed_at = NULL, phone_confirmed_at = NULL "
        "WHERE id = ANY(%s::uuid[])",
        [dev_only[:2]],
    )
    orphans = (
        _ids(prod, "SELECT id FROM public.users")
        - _ids(dev, "SELECT id FROM auth.users")
        - _ids(dev, "SELECT id FROM public.users")
    )
    prod.execute(
        "UPDATE auth.users SET last_sign_in_at = now() - interval '1 hour' "
        "WHERE id = ANY(%s::uuid[])",
        [sorted(orphans)[:3]],
    )
    project.point("dev", dev)
    project.point("prod", prod)
    assert project.run("take", "dev").exit_code == 0
    return dev, prod, orphans


def _finding(result, check: str) -> dict:
    [found] = [f for f in json.loads(result.stdout)["findings"] if f["check"] == check]
    return found


def test_check_and_apply_count_orphaned_users_and_new_logins(project: Project, make_db) -> None:
    _dev, prod, orphans = _pair(project, make_db)
    emails = [r[0] for r in prod.execute("SELECT email FROM auth.users WHERE email IS NOT NULL")]

    checked = project.run("check", "prod", "--json")
    applied = apply(project)

    assert checked.exit_code == 0, checked.output
    orphaned = _finding(checked, "orphaned users")
    assert orphaned["status"] == "warning"
    assert orphaned["detail"].startswith(
        f"{len(orphans)} prod users will keep their login but lose their profile and activity"
    )
    assert ": 3 signed in within the last 7 days (" in orphaned["detail"]
    assert '[apply] orphaned_users = "error"' in orphaned["detail"]
    assert not any(email in checked.stdout for email in emails)  # masked
    sample = orphaned["detail"].split(" days (", 1)[1].removesuffix("…)").split("…)")[0]
    masked = sample.split(", ")
    assert len(masked) > 1 and len(set(masked)) == len(masked), masked  # told apart
    logins = _finding(checked, "new logins")
    assert logins["status"] == "ok"
    assert "snapshot users will become logins in prod, 2 of them unconfirmed" in logins["detail"]
    assert applied.exit_code == 0, applied.output
    assert f"note: {len(orphans)} prod users kept their login but lost their profile" in (
        applied.stdout
    )
    # what was announced happened: their logins stay, their app rows are gone
    assert _ids(prod, "SELECT id FROM auth.users") >= orphans
    assert not _ids(prod, "SELECT id FROM public.users") & orphans


def test_orphaned_users_can_be_made_an_error(project: Project, make_db) -> None:
    _dev, prod, orphans = _pair(project, make_db)
    project.config('[apply]\norphaned_users = "error"\n')
    original = prod.fingerprint([*SCOPE_TABLES, "auth.users"])

    checked = project.run("check", "prod", "--json")
    applied = apply(project)

    assert checked.exit_code == 1
    assert _finding(checked, "orphaned users")["status"] == "error"
    assert applied.exit_code == 1
    assert f"{len(orphans)} prod users will keep their login" in " ".join(applied.stdout.split())
    assert prod.fingerprint([*SCOPE_TABLES, "auth.users"]) == original


def test_the_plan_is_shown_before_the_question(project: Project, make_db) -> None:
    _dev, prod, orphans = _pair(project, make_db)
    original = prod.fingerprint()

    refused = at_a_terminal(project, ["apply", "prod"], "no\n")

    assert refused.returncode == 1
    plan = refused.stderr
    assert "insert" in plan and "update" in plan and "delete" in plan and "unchanged" in plan
    assert "public.question_attempts" in plan
    assert "snapshot users will become logins in prod" in plan
    assert f"{len(orphans)} prod users will keep their login" in plan
    assert "dev/" in plan  # which snapshot
    assert "Type prod to apply" in plan
    assert prod.fingerprint() == original


def _sso_pair(project: Project, make_db, sso: bool) -> tuple[Database, Database, str]:
    """A dev-only user given the email of a prod user, as an SSO user or not."""
    dev, prod = make_db("dev"), make_db("prod")
    dev_only = sorted(
        _ids(dev, "SELECT id FROM auth.users") - _ids(prod, "SELECT id FROM auth.users")
    )[0]
    dev_emails = _ids(dev, "SELECT email FROM auth.users WHERE email IS NOT NULL")
    email = sorted(
        _ids(prod, "SELECT email FROM auth.users WHERE NOT is_sso_user AND email IS NOT NULL")
        - dev_emails
    )[0]
    dev.execute(
        "UPDATE auth.users SET email = %s, is_sso_user = %s WHERE id = %s",
        [email, sso, dev_only],
    )
    project.point("dev", dev)
    project.point("prod", prod)
    assert project.run("take", "dev").exit_code == 0
    return dev, prod, dev_only


def test_an_sso_user_may_share_a_password_users_email(project: Project, make_db) -> None:
    # Supabase's unique email index covers only is_sso_user = false: the database accepts it.
    _dev, prod, sso_user = _sso_pair(project, make_db, sso=True)

    checked = project.run("check", "prod", "--json")
    applied = apply(project)

    assert checked.exit_code == 0, checked.output
    assert _finding(checked, "auth users")["status"] == "ok"
    assert applied.exit_code == 0, applied.output
    assert prod.scalar("SELECT is_sso_user FROM auth.users WHERE id = %s", [sso_user]) is True


def test_a_password_user_with_a_taken_email_is_a_conflict(project: Project, make_db) -> None:
    _dev, prod, user = _sso_pair(project, make_db, sso=False)
    original = prod.fingerprint([*SCOPE_TABLES, "auth.users"])

    checked = project.run("check", "prod", "--json")

    assert checked.exit_code == 1
    found = _finding(checked, "auth users")
    assert found["status"] == "error"
    assert f"{user} (" in found["detail"] and "has the email of" in found["detail"]
    assert prod.fingerprint([*SCOPE_TABLES, "auth.users"]) == original


def test_a_unique_key_whose_predicate_the_snapshot_cannot_read_leaves_the_others_checked(
    project: Project, make_db
) -> None:
    # prod's auth.users has a column dev lacks, read by a unique key's predicate: that key
    # cannot be asked about the staged users (they lack the column), the email key still is.
    _dev, prod, user = _sso_pair(project, make_db, sso=False)
    prod.execute(
        "ALTER TABLE auth.users ADD COLUMN banned boolean; "
        "CREATE UNIQUE INDEX users_phone_unbanned ON auth.users (phone) WHERE banned IS NOT TRUE"
    )

    checked = project.run("check", "prod", "--json")

    assert checked.exit_code == 1, checked.output
    found = _finding(checked, "auth users")
    assert f"{user} (" in found["detail"] and "has the email of" in found["detail"]
    assert "phone" not in found["detail"]


def test_an_email_taken_in_another_case_is_a_conflict(project: Project, make_db) -> None:
    # Supabase Auth finds users by lower(email): dev's Conflict@Example.com would be a second
    # account for prod's conflict@example.com, though the unique index takes both.
    dev, prod = make_db("dev"), make_db("prod")
    dev_only = _ids(dev, "SELECT id FROM auth.users") - _ids(prod, "SELECT id FROM auth.users")
    user = sorted(dev_only)[0]
    dev.execute("UPDATE auth.users SET email = 'Conflict@Example.com' WHERE id = %s", [user])
    prod.execute(
        "INSERT INTO auth.users (id, email) VALUES (md5('conflict')::uuid, 'conflict@example.com')"
    )
    project.point("dev", dev)
    project.point("prod", prod)
    assert project.run("take", "dev").exit_code == 0
    original = prod.fingerprint()

    checked = project.run("check", "prod", "--json")
    applied = apply(project)

    assert checked.exit_code == 1, checked.output
    found = _finding(checked, "auth users")
    assert found["status"] == "error"
    owner = prod.scalar("SELECT md5('conflict')::uuid")
    assert f"{user} (C***@Example.com [" in found["detail"]
    assert f"has the email of {owner}" in found["detail"]
    assert "onflict@" not in checked.stdout  # masked
    assert applied.exit_code == 1, applied.output
    assert "auth users" in applied.stderr.strip().splitlines()[-1]
    assert prod.fingerprint() == original


# An app's second sign-up trigger, writing a table outside the scope; unqualified names, found
# through the function's own search_path.
SIGNUP_LOG = """
CREATE TABLE public.signup_log (user_id uuid PRIMARY KEY, source text NOT NULL);
CREATE FUNCTION public.log_signup() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER
SET search_path = public AS $$
BEGIN
  -- a comment that names no table: UPDATE nothing
  INSERT INTO signup_log (user_id, source) VALUES (NEW.id, 'trigger');
  RETURN NEW;
END
$$;
CREATE TRIGGER log_signup AFTER INSERT ON auth.users
    FOR EACH ROW EXECUTE FUNCTION public.log_signup();
"""


def test_the_app_triggers_creating_users_fires_are_named_before_and_counted_after(
    project: Project, make_db
) -> None:
    dev, prod = make_db("dev"), make_db("prod")
    prod.execute(SIGNUP_LOG)
    project.point("dev", dev)
    project.point("prod", prod)
    assert project.run("take", "dev").exit_code == 0
    created = _ids(dev, "SELECT id FROM auth.users") - _ids(prod, "SELECT id FROM auth.users")
    assert created

    checked = project.run("check", "prod", "--json")
    shown = project.run("check", "prod")
    applied = apply(project)

    triggers = [
        (f["status"], f["detail"])
        for f in json.loads(checked.stdout)["findings"]
        if f["check"] == "auth triggers"
    ]
    count = f"{len(created):,}"
    assert triggers == [
        (
            "warning",
            "log_signup on auth.users runs public.log_signup(), which writes public.signup_log "
            f"(outside the scope): it fires as the {count} snapshot users are created; the "
            "report counts the rows it writes (rows written outside the scope stay)",
        ),
        (
            "ok",
            "on_auth_user_created on auth.users runs public.handle_new_user(), which writes "
            f"public.users (in the scope): it fires as the {count} snapshot users are created; "
            "the report counts the rows it writes",
        ),
    ]
    assert "auth trigger: log_signup on auth.users runs public.log_signup(), which writes " in (
        shown.stdout
    )
    assert applied.exit_code == 0, applied.output
    assert (
        f"auth triggers wrote public.signup_log: {count} rows inserted (outside the scope: "
        "they stay)" in applied.stdout
    )
    assert (
        f"auth triggers wrote public.users: {count} rows inserted (in the scope: then made "
        "equal to the snapshot)" in applied.stdout
    )
    assert _ids(prod, "SELECT user_id FROM public.signup_log") == created
    assert prod.fingerprint(SCOPE_TABLES) == dev.fingerprint(SCOPE_TABLES)
