"""Auth users: the snapshot's users the target lacks are created (insert only, never an
update or a delete), and the target's own users whose app rows the apply removes are
counted, so that nobody learns of it from a support ticket.

Auth users are never deleted, so a user who signed up in the target alone keeps the login
but loses every scoped row that refers to it (``public.users`` and what hangs off it).

Creating a user fires the app's own triggers on ``auth.users`` and ``auth.identities``
(Supabase's sign-up pattern: ``handle_new_user()`` writing ``public.users`` or profiles),
and those may write tables outside the scope, where the apply's parity never looks. The
plan names each such trigger, its function and the tables its source can be seen to write
(:func:`auth_triggers`); the apply counts what the triggers really wrote, per table, from
the transaction's own statistics (:class:`Created`), and the reports say so.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from snapshot import staging, text
from snapshot.apply.since import xact_writes_later
from snapshot.apply.state import ApplyRun
from snapshot.errors import SnapshotError
from snapshot.manifest import TableEntry
from snapshot.names import AUTH_IDENTITIES, AUTH_TABLES, AUTH_USERS, TableName, split_dotted

log = logging.getLogger(__name__)


def mask_email(email: str | None) -> str:
    """``j***@example.com [3fa1]``: enough to tell users apart, not to harvest addresses.

    The tag is a short hash of the whole address (lower-cased, as Supabase Auth compares
    them): two samples with one domain and initial still differ, and the same person's
    address gets the same tag on either side.
    """
    if not email:
        return "-"
    local, _, domain = email.partition("@")
    tag = hashlib.sha256(email.strip().lower().encode()).hexdigest()[:4]
    masked = f"{local[:1]}***@{domain}" if domain else f"{email[:1]}***"
    return f"{masked} [{tag}]"


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
    triggers: tuple[AuthTrigger, ...] = ()  # the app's triggers creating users fires

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
            "triggers": [t.to_json() for t in self.triggers],
        }


@dataclass(frozen=True)
class AuthTrigger:
    """One of the app's triggers that creating auth users fires."""

    table: TableName  # auth.users or auth.identities
    name: str
    function: str  # public.handle_new_user()
    writes: tuple[TableName, ...]  # the tables its function's source writes
    opaque: bool = False  # not SQL or PL/pgSQL: what it writes cannot be seen

    def sentence(self, scope: tuple[TableName, ...]) -> str:
        """``on_auth_user_created on auth.users runs public.handle_new_user(), which writes
        public.users (in the scope)``."""
        if self.opaque:
            what = "whose source cannot be read for the tables it writes"
        elif not self.writes:
            what = "which writes no table its source names (calls to other functions aside)"
        else:
            where = [
                f"{t} ({'in the scope' if t in scope else 'outside the scope'})"
                for t in self.writes
            ]
            what = f"which writes {', '.join(where)}"
        return f"{self.name} on {self.table} runs {self.function}, {what}"

    def to_json(self) -> dict[str, Any]:
        return {
            "table": str(self.table),
            "trigger": self.name,
            "function": self.function,
            "writes": [str(t) for t in self.writes],
            "opaque": self.opaque,
        }


@dataclass(frozen=True)
class TriggerWrites:
    """Rows the app's triggers wrote into one table while the apply created auth users."""

    table: TableName
    inserted: int
    updated: int
    deleted: int
    in_scope: bool

    def sentence(self) -> str:
        """``150 rows inserted into public.profiles (outside the scope: they stay)``."""
        parts = [
            f"{n:,} row{'' if n == 1 else 's'} {verb}"
            for n, verb in (
                (self.inserted, "inserted"),
                (self.updated, "updated"),
                (self.deleted, "deleted"),
            )
            if n
        ]
        where = (
            "in the scope: then made equal to the snapshot"
            if self.in_scope
            else "outside the scope: they stay"
        )
        return f"{self.table}: {', '.join(parts)} ({where})"

    def to_json(self) -> dict[str, Any]:
        return {
            "table": str(self.table),
            "inserted": self.inserted,
            "updated": self.updated,
            "deleted": self.deleted,
            "in_scope": self.in_scope,
        }


@dataclass(frozen=True)
class Created:
    """What creating the snapshot's auth users did."""

    users: int
    identities: int
    writes: tuple[TriggerWrites, ...] = ()  # what the app's triggers wrote meanwhile


def _entry(run: ApplyRun, table: Any) -> TableEntry | None:
    return next((e for e in run.auth_entries if e.table == table), None)


def _scalar(conn: psycopg.Connection, query: sql.Composed) -> int:
    row = conn.execute(query).fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def auth_plan_later(run: ApplyRun) -> Callable[[], AuthPlan | None]:
    """Who the apply creates, and whom it leaves without app rows (None: auth not copied):
    the questions asked now (in the caller's pipeline), the plan made when called."""
    users = _entry(run, AUTH_USERS)
    if users is None:
        return lambda: None
    stage = staging.staging_table(users)
    missing = sql.SQL("NOT EXISTS (SELECT 1 FROM auth.users AS u WHERE u.id = s.id)")
    confirmed = [c for c in ("email_confirmed_at", "phone_confirmed_at") if c in users.column_names]
    none: sql.Composable = sql.SQL("false")
    if confirmed:
        none = sql.SQL(" AND ").join(
            sql.SQL("s.{} IS NULL").format(sql.Identifier(c)) for c in confirmed
        )
    counted = run.conn.execute(
        sql.SQL("SELECT count(*), count(*) FILTER (WHERE {}) FROM {} AS s WHERE {}").format(
            none, stage, missing
        )
    )
    orphans = _orphans_later(run, stage)

    def plan() -> AuthPlan:
        row = counted.fetchone()
        create, unconfirmed = (int(row[0]), int(row[1])) if row else (0, 0)
        triggers = auth_triggers(run) if create else ()
        return orphans(AuthPlan(create, unconfirmed, triggers=triggers))

    return plan


def _orphans_later(run: ApplyRun, users_stage: sql.Identifier) -> Callable[[AuthPlan], AuthPlan]:
    """Target users, absent from the snapshot, left with no row in a scoped table after it:
    asked now, added to the plan given when called.

    A user counts when some scoped table refers to them today (``public.users.id``, say)
    and the snapshot's copy of every such table refers to them nowhere.
    """
    keys = [fk for fk in run.fks if fk.parent == AUTH_USERS and fk.child in run.order]
    keys = [fk for fk in keys if len(fk.columns) == 1]
    if not keys:
        return lambda plan: plan
    have_now = sql.SQL(" UNION ").join(
        sql.SQL("SELECT {c} AS id FROM {t} WHERE {c} IS NOT NULL").format(
            c=sql.Identifier(fk.columns[0]), t=fk.child.ident
        )
        for fk in keys
    )
    keep = sql.SQL(" UNION ").join(
        sql.SQL("SELECT {c} AS id FROM {t} WHERE {c} IS NOT NULL").format(
            c=sql.Identifier(fk.columns[0]), t=staging.staging_table(run.entries[fk.child])
        )
        for fk in keys
    )
    recent: sql.Composable = sql.SQL("false")
    if "last_sign_in_at" in run.shapes[AUTH_USERS].column_names:
        recent = sql.SQL("u.last_sign_in_at > now() - interval {}").format(sql.Literal(RECENT))
    cursor = run.conn.execute(
        sql.SQL(
            "SELECT count(*), count(*) FILTER (WHERE {recent}), "
            "(array_agg(u.email ORDER BY u.last_sign_in_at DESC NULLS LAST, u.id))[1:{n}] "
            "FROM auth.users AS u WHERE u.id IN ({now}) AND u.id NOT IN ({keep}) "
            "AND NOT EXISTS (SELECT 1 FROM {stage} AS s WHERE s.id = u.id)"
        ).format(recent=recent, n=sql.Literal(SAMPLE), now=have_now, keep=keep, stage=users_stage)
    )
    tables = tuple(dict.fromkeys(str(fk.child) for fk in keys))

    def added(plan: AuthPlan) -> AuthPlan:
        rows = cursor.fetchone()
        if not rows or not rows[0]:
            return plan
        sample = tuple(mask_email(e) for e in (rows[2] or ()))
        return AuthPlan(
            plan.create, plan.unconfirmed, int(rows[0]), int(rows[1]), sample, tables, plan.triggers
        )

    return added


def create_users_later(run: ApplyRun) -> Callable[[], Created]:
    """Insert the snapshot's auth users the target lacks, and their identities, counting
    what the app's triggers wrote meanwhile: every statement sent now (in the caller's
    pipeline), the outcome read when called."""
    users = _entry(run, AUTH_USERS)
    if users is None:
        return lambda: Created(0, 0)
    identities = _entry(run, AUTH_IDENTITIES)
    conn = run.conn
    columns = sql.SQL(", ").join(map(sql.Identifier, users.column_names))
    before_later = xact_writes_later(conn)
    conn.execute("DROP TABLE IF EXISTS pg_temp.snapshot_created_users")
    conn.execute("CREATE TEMP TABLE snapshot_created_users (id uuid PRIMARY KEY) ON COMMIT DROP")
    users_cursor = conn.execute(
        sql.SQL(
            "WITH created AS (INSERT INTO auth.users ({cols}) SELECT {cols} FROM {stage} s "
            "WHERE NOT EXISTS (SELECT 1 FROM auth.users u WHERE u.id = s.id) RETURNING id) "
            "INSERT INTO pg_temp.snapshot_created_users SELECT id FROM created"
        ).format(cols=columns, stage=staging.staging_table(users))
    )
    identities_cursor = None
    if identities is not None:  # those of the users just created (none: no row)
        id_columns = sql.SQL(", ").join(map(sql.Identifier, identities.column_names))
        identities_cursor = conn.execute(
            sql.SQL(
                "INSERT INTO auth.identities ({cols}) SELECT {cols} FROM {stage} s "
                "WHERE s.user_id IN (SELECT id FROM pg_temp.snapshot_created_users)"
            ).format(cols=id_columns, stage=staging.staging_table(identities))
        )
    after_later = xact_writes_later(conn)
    return lambda: _created(run, before_later(), after_later(), users_cursor, identities_cursor)


def _created(
    run: ApplyRun,
    before: Mapping[TableName, tuple[int, int, int]],
    after: Mapping[TableName, tuple[int, int, int]],
    users_cursor: psycopg.Cursor[Any],
    identities_cursor: psycopg.Cursor[Any] | None,
) -> Created:
    created = users_cursor.rowcount
    made_identities = identities_cursor.rowcount if identities_cursor is not None else 0
    log.info(
        "  created %s, %s",
        text.count(created, "auth user"),
        text.count(made_identities, "identity", "identities"),
    )
    own = {AUTH_USERS: created, AUTH_IDENTITIES: made_identities}
    writes = []
    for table, (inserted, updated, deleted) in sorted(after.items()):
        was = before.get(table, (0, 0, 0))
        done = (inserted - was[0] - own.get(table, 0), updated - was[1], deleted - was[2])
        if any(done):
            writes.append(TriggerWrites(table, *done, in_scope=table in run.order))
    for w in writes:
        log.info("  the app's triggers on the auth tables wrote %s", w.sentence())
    return Created(created, made_identities, tuple(writes))


def missing_users_later(run: ApplyRun) -> Callable[[], int]:
    """Snapshot users still absent from the target (0 after a successful apply), asked now
    and read when called (in the caller's pipeline)."""
    users = _entry(run, AUTH_USERS)
    if users is None:
        return lambda: 0
    cursor = run.conn.execute(
        sql.SQL(
            "SELECT count(*) FROM {} s "
            "WHERE NOT EXISTS (SELECT 1 FROM auth.users u WHERE u.id = s.id)"
        ).format(staging.staging_table(users))
    )

    def result() -> int:
        row = cursor.fetchone()
        return int(row[0]) if row else 0

    return result


# The app's triggers that fire when the apply inserts into an auth table: enabled for an
# ordinary session (origin or always), on INSERT (tgtype bit 2), statement or row level.
_TRIGGERS = """
SELECT n.nspname, c.relname, t.tgname, t.tgfoid::regprocedure::text, l.lanname, p.prosrc,
       coalesce((SELECT substr(o, length('search_path=') + 1) FROM unnest(p.proconfig) AS o
                 WHERE o LIKE 'search\\_path=%%'), '')
FROM pg_trigger t
JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_proc p ON p.oid = t.tgfoid JOIN pg_language l ON l.oid = p.prolang
WHERE t.tgrelid = ANY(%s::regclass[]) AND NOT t.tgisinternal AND t.tgenabled IN ('O', 'A')
  AND t.tgtype & 4 <> 0
ORDER BY n.nspname, c.relname, t.tgname
"""
# A statement writing a table in a function's source, and the table's name as written.
_NAME = r'(?:"(?:[^"]|"")+"|[a-z_][a-z0-9_$]*)'
_WRITES = re.compile(
    r"\b(?:insert\s+into|update|delete\s+from|merge\s+into|truncate(?:\s+table)?)\s+"
    rf"(?:only\s+)?({_NAME}(?:\s*\.\s*{_NAME})?)",
    re.IGNORECASE,
)
_COMMENTS = re.compile(r"--[^\n]*|/\*.*?\*/", re.DOTALL)


def auth_triggers(run: ApplyRun) -> tuple[AuthTrigger, ...]:
    """The app's triggers on the auth tables the apply inserts into, and what they write.

    What a function writes is read from its source (SQL and PL/pgSQL): the tables named
    after INSERT INTO, UPDATE, DELETE FROM, MERGE INTO and TRUNCATE that exist, unqualified
    names looked up in the function's own search_path, else the app's. Functions it calls
    are not followed: the counts after the apply are the truth.
    """
    tables = [e.table.ident.as_string(run.conn) for e in run.auth_entries if e.table in AUTH_TABLES]
    if not tables:
        return ()
    row = run.conn.execute(
        "SELECT reset_val FROM pg_settings WHERE name = 'search_path'"
    ).fetchone()
    app_path = str(row[0]) if row else "public"
    found = []
    for schema, table, name, function, language, source, path in run.conn.execute(
        _TRIGGERS, (tables,)
    ).fetchall():
        if language not in ("plpgsql", "sql"):
            found.append(AuthTrigger(TableName(schema, table), name, function, (), opaque=True))
            continue
        schemas = _schemas(run, path or app_path)
        written = dict.fromkeys(
            t
            for m in _WRITES.finditer(_COMMENTS.sub(" ", source))
            if (t := _resolve(run, m.group(1), schemas)) is not None
        )
        found.append(AuthTrigger(TableName(schema, table), name, function, tuple(written)))
    return tuple(found)


def _schemas(run: ApplyRun, path: str) -> list[str]:
    """The schemas of a ``search_path`` value, ``$user`` as the session's role."""
    schemas = []
    for part in path.split(","):
        part = part.strip()
        if part in ("", "''", '""'):
            continue
        if part.strip('"') == "$user":
            schemas.append(run.info.user)
            continue
        try:
            schemas += split_dotted(part, "a schema")
        except SnapshotError:
            continue
    return schemas


def _resolve(run: ApplyRun, written: str, schemas: list[str]) -> TableName | None:
    """The table a name in a function's source means, if it exists."""
    try:
        parts = split_dotted(written, "a table name")
    except SnapshotError:
        return None
    candidates = [tuple(parts)] if len(parts) == 2 else [(schema, parts[0]) for schema in schemas]
    for schema, name in candidates:
        row = run.conn.execute(
            "SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = %s AND c.relname = %s AND c.relkind IN ('r', 'p', 'f', 'v')",
            (schema, name),
        ).fetchone()
        if row:
            return TableName(schema, name)
    return None
