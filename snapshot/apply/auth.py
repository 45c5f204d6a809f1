"""Auth users: the snapshot's users the target lacks are created (insert only, never an
update or a delete), and the target's own users whose app rows the apply removes are
counted, so that nobody learns of it from a support ticket.

Auth users are never deleted, so a user who signed up in the target alone keeps the login
but loses every scoped row that refers to it (``public.users`` and what hangs off it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from snapshot import staging, text
from snapshot.archive import TableEntry
from snapshot.names import AUTH_IDENTITIES, AUTH_USERS
from snapshot.preflight import mask_email
from snapshot.session import Session

log = logging.getLogger(__name__)

RECENT = "7 days"
SAMPLE = 5


@dataclass(frozen=True)
class AuthPlan:
    """Auth users the apply creates, and target users whose app rows it removes."""

    create: int
    unconfirmed: int
    orphaned: int = 0  # target users who keep their login but lose their app rows
    orphaned_recent: int = 0  # ... of them signed in within the last 7 days
    orphaned_sample: tuple[str, ...] = ()  # masked emails
    profile_tables: tuple[str, ...] = ()

    def orphaned_sentence(self, target: str, *, done: bool = False) -> str:
        """``270 prod users will keep their login but lose ...``, or "" when there are none.

        ``done``: in the past tense, for the report of an apply that committed.
        """
        if not self.orphaned:
            return ""
        sample = f" ({', '.join(self.orphaned_sample)}…)" if self.orphaned_sample else ""
        verbs = "kept their login but lost" if done else "will keep their login but lose"
        return (
            f"{text.count(self.orphaned, f'{target} user')} {verbs} their profile and "
            f"activity (their rows in {', '.join(self.profile_tables)} and what refers to "
            f"them): {self.orphaned_recent:,} signed in within the last {RECENT}{sample}"
        )

    def create_sentence(self, target: str) -> str:
        """``50 snapshot users will become logins in prod, 3 of them unconfirmed``."""
        unconfirmed = f", {self.unconfirmed:,} of them unconfirmed" if self.unconfirmed else ""
        logins = f"will become {'a login' if self.create == 1 else 'logins'}"
        return f"{text.count(self.create, 'snapshot user')} {logins} in {target}{unconfirmed}"

    def to_json(self) -> dict[str, Any]:
        return {
            "create": self.create,
            "unconfirmed": self.unconfirmed,
            "orphaned": self.orphaned,
            "orphaned_recent": self.orphaned_recent,
            "orphaned_sample": list(self.orphaned_sample),
            "profile_tables": list(self.profile_tables),
        }


def _entry(s: Session, table: Any) -> TableEntry | None:
    return next((e for e in s.auth_entries if e.table == table), None)


def _scalar(conn: psycopg.Connection, query: sql.Composed) -> int:
    row = conn.execute(query).fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def auth_plan(s: Session) -> AuthPlan | None:
    """Who the apply creates, and whom it leaves without app rows (None: auth not copied)."""
    users = _entry(s, AUTH_USERS)
    if users is None:
        return None
    stage = staging.staging_table(users)
    missing = sql.SQL("NOT EXISTS (SELECT 1 FROM auth.users AS u WHERE u.id = s.id)")
    create = _scalar(
        s.conn, sql.SQL("SELECT count(*) FROM {} AS s WHERE {}").format(stage, missing)
    )
    confirmed = [c for c in ("email_confirmed_at", "phone_confirmed_at") if c in users.column_names]
    unconfirmed = 0
    if confirmed:
        none = sql.SQL(" AND ").join(
            sql.SQL("s.{} IS NULL").format(sql.Identifier(c)) for c in confirmed
        )
        unconfirmed = _scalar(
            s.conn,
            sql.SQL("SELECT count(*) FROM {} AS s WHERE {} AND {}").format(stage, missing, none),
        )
    return _orphans(s, AuthPlan(create, unconfirmed), stage)


def _orphans(s: Session, plan: AuthPlan, users_stage: sql.Identifier) -> AuthPlan:
    """Target users, absent from the snapshot, left with no row in a scoped table after it.

    A user counts when some scoped table refers to them today (``public.users.id``, say)
    and the snapshot's copy of every such table refers to them nowhere.
    """
    keys = [fk for fk in s.fks if fk.parent == AUTH_USERS and fk.child in s.order]
    keys = [fk for fk in keys if len(fk.columns) == 1]
    if not keys:
        return plan
    have_now = sql.SQL(" UNION ").join(
        sql.SQL("SELECT {c} AS id FROM {t} WHERE {c} IS NOT NULL").format(
            c=sql.Identifier(fk.columns[0]), t=fk.child.ident
        )
        for fk in keys
    )
    keep = sql.SQL(" UNION ").join(
        sql.SQL("SELECT {c} AS id FROM {t} WHERE {c} IS NOT NULL").format(
            c=sql.Identifier(fk.columns[0]), t=staging.staging_table(s.entries[fk.child])
        )
        for fk in keys
    )
    recent: sql.Composable = sql.SQL("false")
    if "last_sign_in_at" in s.shapes[AUTH_USERS].column_names:
        recent = sql.SQL("u.last_sign_in_at > now() - interval {}").format(sql.Literal(RECENT))
    rows = s.conn.execute(
        sql.SQL(
            "SELECT count(*), count(*) FILTER (WHERE {recent}), "
            "(array_agg(u.email ORDER BY u.last_sign_in_at DESC NULLS LAST, u.id))[1:{n}] "
            "FROM auth.users AS u WHERE u.id IN ({now}) AND u.id NOT IN ({keep}) "
            "AND NOT EXISTS (SELECT 1 FROM {stage} AS s WHERE s.id = u.id)"
        ).format(recent=recent, n=sql.Literal(SAMPLE), now=have_now, keep=keep, stage=users_stage)
    ).fetchone()
    if not rows or not rows[0]:
        return plan
    tables = tuple(dict.fromkeys(str(fk.child) for fk in keys))
    sample = tuple(mask_email(e) for e in (rows[2] or ()))
    return AuthPlan(plan.create, plan.unconfirmed, int(rows[0]), int(rows[1]), sample, tables)


def create_users(s: Session) -> tuple[int, int]:
    """Insert the snapshot's auth users the target lacks, and their identities."""
    users = _entry(s, AUTH_USERS)
    if users is None:
        return 0, 0
    identities = _entry(s, AUTH_IDENTITIES)
    conn = s.conn
    conn.execute("DROP TABLE IF EXISTS pg_temp.snapshot_created_users")
    conn.execute("CREATE TEMP TABLE snapshot_created_users (id uuid PRIMARY KEY) ON COMMIT DROP")
    columns = sql.SQL(", ").join(map(sql.Identifier, users.column_names))
    created = conn.execute(
        sql.SQL(
            "WITH created AS (INSERT INTO auth.users ({cols}) SELECT {cols} FROM {stage} s "
            "WHERE NOT EXISTS (SELECT 1 FROM auth.users u WHERE u.id = s.id) RETURNING id) "
            "INSERT INTO pg_temp.snapshot_created_users SELECT id FROM created"
        ).format(cols=columns, stage=staging.staging_table(users))
    ).rowcount
    made_identities = 0
    if identities is not None and created:
        id_columns = sql.SQL(", ").join(map(sql.Identifier, identities.column_names))
        made_identities = conn.execute(
            sql.SQL(
                "INSERT INTO auth.identities ({cols}) SELECT {cols} FROM {stage} s "
                "WHERE s.user_id IN (SELECT id FROM pg_temp.snapshot_created_users)"
            ).format(cols=id_columns, stage=staging.staging_table(identities))
        ).rowcount
    log.info(
        "  created %s, %s",
        text.count(created, "auth user"),
        text.count(made_identities, "identity", "identities"),
    )
    return created, made_identities


def missing_users(s: Session) -> int:
    """Snapshot users still absent from the target (0 after a successful apply)."""
    users = _entry(s, AUTH_USERS)
    if users is None:
        return 0
    return _scalar(
        s.conn,
        sql.SQL(
            "SELECT count(*) FROM {} s "
            "WHERE NOT EXISTS (SELECT 1 FROM auth.users u WHERE u.id = s.id)"
        ).format(staging.staging_table(users)),
    )
