"""``snapshot.toml``: the one scope, the environments and the apply settings.

Every command reads the same :class:`Config`, so the tables that ``take`` archives, ``apply``
replaces and ``verify`` compares are one list by construction. This module reads and checks
the file; the commented file ``init`` writes is made in :mod:`snapshot.init`.
"""

from __future__ import annotations

import difflib
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from snapshot.archive import archived_environments
from snapshot.errors import ConfigError
from snapshot.masking.rules import DEFAULT_KEY_ENV, MaskingSettings, parse_rule
from snapshot.names import AUTH_TABLES, TableName, quote, split_dotted
from snapshot.project import CONFIG_FILE, ProjectRoot, find_root
from snapshot.scope import Scope
from snapshot.subset.rules import SubsetRule, SubsetSettings
from snapshot.text import display_path

__all__ = ["CONFIG_FILE", "Config", "load_config"]

DEFAULT_TABLES = (
    "users",
    "user_preferences",
    "categories",
    "subcategories",
    "topics",
    "questions",
    "answers",
    "question_topics",
    "topic_edges",
    "content_revisions",
    "question_attempts",
    "user_question_progress",
    "user_topic_progress",
    "playlists",
    "playlist_items",
    "user_playlist_progress",
)

DEFAULT_ENV_FILES = {"dev": ".env.local", "prod": ".env.production"}
DEFAULT_SAFE = {"dev": True, "prod": False}
# The usual direction: the environment whose snapshots a target gets by default (apply prod
# applies dev's newest). Any other direction is confirmed by a person (snapshot.direction).
DEFAULT_SOURCES = {"prod": "dev"}
DEFAULT_INSERT_AS = {"questions.status": "draft"}
CONNECTION_MODES = ("auto", "direct", "pooler")
# Time limits of snapshot's own sessions, whatever the server or role sets (Supabase gives
# every role a 2-minute statement_timeout): "0" is no limit. transaction_timeout exists
# from PostgreSQL 17 and is only set there.
DEFAULT_SESSION_LIMITS = {
    "statement_timeout": "0",
    "idle_in_transaction_session_timeout": "0",
    "transaction_timeout": "0",
}
_DURATION = re.compile(r"^\d+\s*(us|ms|s|min|h|d)?$")


@dataclass(frozen=True)
class EnvironmentConfig:
    """How to reach one environment: its env file and connection preferences."""

    name: str
    env_file: Path
    safe: bool = False
    connection: str = "auto"
    pooler_host: str | None = None
    ssl_root_cert: Path | None = None
    session: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_SESSION_LIMITS))
    origin: str = ""  # why env_file resolves where it does, for "does not exist" messages


@dataclass(frozen=True)
class ColumnRef:
    """A column of a scoped table, e.g. ``public.questions.status``."""

    table: TableName
    column: str

    def __str__(self) -> str:
        return f"{self.table}.{quote(self.column)}"

    @classmethod
    def parse(cls, text: str, where: str) -> ColumnRef:
        """``table.column`` (in public) or ``schema.table.column``; ``where`` names the setting."""
        return _parse_column(text, where)


FOREIGN_KEY_CHECKS = ("auto", "bulk", "per-row")
UPLOADS = ("auto", "changed", "all")  # [apply] upload


@dataclass(frozen=True)
class ApplySettings:
    """Knobs of the apply recipe."""

    lock_timeout: str = "10s"
    insert_as: Mapping[ColumnRef, str] = field(default_factory=dict)
    ignore_columns: tuple[ColumnRef, ...] = ()
    orphaned_users: str = "warn"  # target users left without app rows: "warn" or "error"
    # "auto": large writes check foreign keys in bulk (snapshot.apply.replica); "bulk"
    # whenever it can; "per-row": always row by row
    foreign_key_checks: str = "auto"
    # keep the target's rows that rows outside the scope refer to and the snapshot lacks
    # (snapshot.apply.outside), instead of refusing the apply
    keep_referenced: bool = False
    # what goes up to the server when staging a table the target does not already hold:
    # "changed" rows only (snapshot.sparse), "all" of them, or "auto": changed rows only when
    # the server is further than a local network away
    upload: str = "auto"


@dataclass(frozen=True)
class Config:
    """Everything a command needs to know before it connects anywhere."""

    path: Path | None
    base_dir: Path
    archive: Path
    scripts: Path
    scripts_explicit: bool
    scope: Scope
    environments: Mapping[str, EnvironmentConfig]
    apply: ApplySettings
    preflight_allow_cascades: tuple[str, ...] = ()
    session: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_SESSION_LIMITS))
    origin: str = ""  # why relative paths resolve from base_dir, for messages
    pg_bin: Path | None = None
    retention: int | None = None
    masking: MaskingSettings = field(default_factory=MaskingSettings)
    subset: SubsetSettings = field(default_factory=SubsetSettings)

    def environment(self, name: str) -> EnvironmentConfig:
        """The named environment; a name without a section uses ``.env.<name>``.

        A name that is neither configured nor has its env file is refused, with the known
        environment it most resembles (``prdo``: did you mean prod?).
        """
        if name in self.environments:
            return self.environments[name]
        _check_env_name(name)
        env_file = self.base_dir / f".env.{name}"
        if not env_file.is_file() and name not in self.environment_names():
            raise ConfigError(self.unknown_environment(name))  # archived only: say the file
        return EnvironmentConfig(
            name=name, env_file=env_file, session=self.session, origin=self.origin
        )

    def environment_names(self) -> list[str]:
        """Environments this project knows: configured, with an env file, or archived."""
        names = set(self.environments)
        taken = {e.env_file.name for e in self.environments.values()}
        if self.base_dir.is_dir():
            for path in self.base_dir.glob(".env.*"):
                name = path.name.removeprefix(".env.")
                if path.name not in taken and name and all(c.isalnum() or c in "-_" for c in name):
                    names.add(name)
        names.update(archived_environments(self.archive))
        return sorted(names)

    def require_known(self, name: str) -> None:
        """Refuse an environment name this project does not know (a typo, most likely)."""
        _check_env_name(name)
        if name not in self.environment_names():
            raise ConfigError(self.unknown_environment(name))

    def unknown_environment(self, name: str) -> str:
        """The sentence for an unknown environment: where it was looked for, what is close."""
        known = self.environment_names()
        close = difflib.get_close_matches(name, [k for k in known if k != name], n=1, cutoff=0.6)
        hint = f"did you mean {close[0]}? " if close else ""
        where = display_path(self.base_dir / f".env.{name}")
        return (
            f"unknown environment {name!r}: {hint}known: {', '.join(known) or 'none'}; "
            f"{name} needs [environments.{name}] in snapshot.toml or {where} ({self.origin})"
        )

    def default_source(self, target: str) -> str | None:
        """The environment whose snapshots ``target`` gets by default (dev for prod), if any."""
        return DEFAULT_SOURCES.get(target)

    def ignored_columns(self, table: TableName) -> tuple[str, ...]:
        """Columns of ``table`` that parity ignores."""
        return tuple(c.column for c in self.apply.ignore_columns if c.table == table)


def _check_env_name(name: str) -> None:
    if not name or not all(c.isalnum() or c in "-_" for c in name):
        raise ConfigError(f"{name!r} is not an environment name: use letters, digits, '-' or '_'")


def _parse_column(text: str, where: str) -> ColumnRef:
    what = "a column: write 'table.column' or 'schema.table.column'"
    try:
        parts = split_dotted(text, what)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if len(parts) == 2:
        return ColumnRef(TableName("public", parts[0]), parts[1])
    if len(parts) == 3:
        return ColumnRef(TableName(parts[0], parts[1]), parts[2])
    raise ConfigError(f"{where}: {text!r} is not {what}")


def _expect(value: Any, kind: type | tuple[type, ...], where: str, what: str) -> Any:
    """``value`` when it is of ``kind``; else one line naming the setting, what it must be
    and what it is (``[environments.dev] safe must be true or false, not 'false'``)."""
    if not isinstance(value, kind):
        shown = (
            repr(value)
            if isinstance(value, str | int | float | bool)
            else _TOML_KINDS.get(type(value), type(value).__name__)
        )
        quoted = isinstance(value, str) and value.lower() in ("true", "false") and kind is bool
        hint = ": write it without quotes" if quoted else ""
        raise ConfigError(f"{where} must be {what}, not {shown}{hint}")
    return value


_TOML_KINDS: dict[type, str] = {dict: "a table", list: "a list"}


def _check_keys(section: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(section) - allowed)
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(allowed), n=1, cutoff=0.6)
        hint = f"did you mean {close[0]}? " if close else ""
        raise ConfigError(
            f"unknown setting {unknown[0]!r} in {where}: {hint}known: {', '.join(sorted(allowed))}"
        )


def _parse_scope(data: Mapping[str, Any], where: str) -> Scope:
    _check_keys(data, {"tables", "auth_users"}, where)
    raw = _expect(data.get("tables", list(DEFAULT_TABLES)), list, f"{where}.tables", "a list")
    if not raw:
        raise ConfigError(f"{where}.tables is empty: name at least one table")
    tables: list[TableName] = []
    for item in raw:
        table = TableName.parse(_expect(item, str, f"{where}.tables", "a list of strings"))
        if table in tables:
            raise ConfigError(f"table {table} is named twice in {where}.tables: keep one")
        if table.schema == "auth":
            raise ConfigError(
                f"{where}.tables names {table}: auth tables are copied by 'auth_users = true', "
                "insert-only; remove it from the list"
            )
        tables.append(table)
    auth = _expect(data.get("auth_users", True), bool, f"{where}.auth_users", "true or false")
    staged: dict[str, TableName] = {}
    for table in [*tables, *(AUTH_TABLES if auth else ())]:
        other = staged.setdefault(table.staging, table)
        if other != table:
            raise ConfigError(
                f"{other} and {table} would share pg_temp.{quote(table.staging)}, the temporary "
                f"table an apply stages each in and scripts read it by: {where}.tables cannot "
                "hold both; take one of them with a second config (snapshot --config FILE)"
            )
    return Scope(tuple(tables), auth)


def _parse_session(data: Mapping[str, Any]) -> dict[str, str]:
    """``[session]``: time limits for snapshot's own sessions (milliseconds, or '10s', '5min')."""
    _check_keys(data, set(DEFAULT_SESSION_LIMITS), "[session]")
    limits = dict(DEFAULT_SESSION_LIMITS)
    for key, value in data.items():
        text = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
        if not isinstance(text, str) or not _DURATION.match(text.strip()):
            raise ConfigError(
                f'[session] {key} must be a duration such as "0" (no limit), 30000 (ms) or '
                f'"10min", not {value!r}'
            )
        limits[key] = text.strip()
    return limits


def _parse_environments(
    data: Mapping[str, Any], base_dir: Path, session: Mapping[str, str]
) -> dict[str, EnvironmentConfig]:
    envs = {
        name: EnvironmentConfig(name, base_dir / file, DEFAULT_SAFE[name], session=session)
        for name, file in DEFAULT_ENV_FILES.items()
    }
    for name, section in data.items():
        where = f"[environments.{name}]"
        _expect(section, dict, where, "a table")
        _check_keys(
            section, {"env_file", "safe", "connection", "pooler_host", "ssl_root_cert"}, where
        )
        default_file = DEFAULT_ENV_FILES.get(name, f".env.{name}")
        mode = _expect(section.get("connection", "auto"), str, f"{where} connection", "a string")
        if mode not in CONNECTION_MODES:
            raise ConfigError(f"{where} connection must be one of {', '.join(CONNECTION_MODES)}")
        cert = _expect(section.get("ssl_root_cert", ""), str, f"{where} ssl_root_cert", "a path")
        env_file = _expect(
            section.get("env_file", default_file), str, f"{where} env_file", "a path"
        )
        safe = section.get("safe", DEFAULT_SAFE.get(name, False))
        envs[name] = EnvironmentConfig(
            name=name,
            env_file=base_dir / env_file,
            safe=_expect(safe, bool, f"{where} safe", "true or false"),
            connection=mode,
            pooler_host=_expect(
                section.get("pooler_host"), (str, type(None)), f"{where} pooler_host", "a host"
            ),
            ssl_root_cert=base_dir / cert if cert else None,
            session=session,
        )
    return envs


_UNITS = {"ms": 0.001, "s": 1.0, "min": 60.0, "h": 3600.0, "d": 86400.0}


def duration_seconds(text: str) -> float:
    """A PostgreSQL time setting (``"10s"``, ``"500ms"``, ``"2min"``, bare milliseconds)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|min|h|d)?\s*", str(text))
    if not match:
        raise ConfigError(
            f'{text!r} is not a duration: write it as PostgreSQL does ("10s", "500ms", "2min")'
        )
    return float(match.group(1)) * _UNITS[match.group(2) or "ms"]


def _parse_apply(
    apply: Mapping[str, Any], parity: Mapping[str, Any], scope: Scope
) -> ApplySettings:
    _check_keys(
        apply,
        {
            "lock_timeout",
            "insert_as",
            "orphaned_users",
            "foreign_key_checks",
            "keep_referenced",
            "upload",
        },
        "[apply]",
    )
    upload = _expect(apply.get("upload", "auto"), str, "[apply] upload", "text")
    if upload not in UPLOADS:
        raise ConfigError(
            f"[apply] upload must be one of {', '.join(map(repr, UPLOADS))}, not {upload!r}"
        )
    keep = _expect(
        apply.get("keep_referenced", False), bool, "[apply] keep_referenced", "true/false"
    )
    checks = _expect(
        apply.get("foreign_key_checks", "auto"), str, "[apply] foreign_key_checks", "text"
    )
    if checks not in FOREIGN_KEY_CHECKS:
        raise ConfigError(
            f"[apply] foreign_key_checks must be one of {', '.join(map(repr, FOREIGN_KEY_CHECKS))}"
            f", not {checks!r}"
        )
    orphaned = _expect(apply.get("orphaned_users", "warn"), str, "[apply] orphaned_users", "text")
    if orphaned not in ("warn", "error"):
        raise ConfigError('[apply] orphaned_users must be "warn" or "error"')
    _check_keys(parity, {"ignore_columns"}, "[parity]")
    insert_as_raw = _expect(
        apply.get("insert_as", DEFAULT_INSERT_AS), dict, "[apply] insert_as", "a table"
    )
    insert_as = {
        _parse_column(k, "[apply] insert_as"): str(_expect(v, str, "[apply] insert_as", "text"))
        for k, v in insert_as_raw.items()
    }
    if "insert_as" not in apply:  # the built-in default applies where its table is scoped
        insert_as = {c: v for c, v in insert_as.items() if c.table in scope.tables}
    ignore = _expect(parity.get("ignore_columns", []), list, "[parity] ignore_columns", "a list")
    lock_timeout = _expect(apply.get("lock_timeout", "10s"), str, "[apply] lock_timeout", "text")
    try:
        if duration_seconds(lock_timeout) <= 0:
            raise ConfigError(
                "[apply] lock_timeout must be more than 0: without it, a lock waits forever"
            )
    except ConfigError as exc:
        raise ConfigError(f"[apply] lock_timeout: {exc}") from None
    return ApplySettings(
        lock_timeout=lock_timeout,
        insert_as=insert_as,
        orphaned_users=orphaned,
        foreign_key_checks=checks,
        keep_referenced=keep,
        upload=upload,
        ignore_columns=tuple(_parse_column(c, "[parity] ignore_columns") for c in ignore),
    )


def _parse_retention(data: Mapping[str, Any]) -> int | None:
    """``[retention] keep = N``: the newest N snapshots kept per environment and kind."""
    _check_keys(data, {"keep"}, "[retention]")
    if "keep" not in data:
        return None
    keep = data["keep"]
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ConfigError(f"[retention] keep must be a whole number of at least 1, not {keep!r}")
    return int(keep)


def _parse_masking(data: Mapping[str, Any] | None, scope: Scope) -> MaskingSettings:
    """``[masking]``: the key's variable, whether auth is masked, and the rules per column
    (``None``: no such section)."""
    if data is None:
        return MaskingSettings()
    _check_keys(data, {"key_env", "auth", "columns"}, "[masking]")
    key_env = _expect(data.get("key_env", DEFAULT_KEY_ENV), str, "[masking] key_env", "a name")
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key_env):
        raise ConfigError(f"[masking] key_env must name an environment variable, not {key_env!r}")
    auth = _expect(data.get("auth", True), bool, "[masking] auth", "true or false")
    raw = _expect(data.get("columns", {}), dict, "[masking.columns]", "a table")
    columns = {}
    for text, value in raw.items():
        where = f"[masking.columns] {text!r}"
        column = _parse_column(text, "[masking.columns]")
        if column.table not in scope.tables and not (
            scope.auth_users and column.table in AUTH_TABLES
        ):
            raise ConfigError(
                f"{where} names a column of {column.table}, which is not in [scope] tables: "
                f"remove the rule, or add {column.table} to [scope] tables"
            )
        columns[(column.table, column.column)] = parse_rule(value, where)
    return MaskingSettings(columns=columns, key_env=key_env, auth=auth, configured=True)


def _parse_subset(data: Mapping[str, Any], scope: Scope) -> SubsetSettings:
    """``[subset]``: per table a ``where`` clause, a ``percent``, or both (see docs/subsets.md).

    The clause is SQL checked against the source when a take starts
    (:func:`snapshot.subset.plan_subset`); here only its form."""
    _check_keys(data, {"tables"}, "[subset]")
    raw = _expect(data.get("tables", {}), dict, "[subset.tables]", "a table")
    tables = {}
    for text, value in raw.items():
        where = f"[subset.tables] {text!r}"
        table = TableName.parse(text)
        if table not in scope.tables and not (scope.auth_users and table in AUTH_TABLES):
            raise ConfigError(
                f"{where} is not in [scope] tables: remove its rule, or add {table} to "
                "[scope] tables"
            )
        if table in tables:
            raise ConfigError(f"{where} names {table} twice: keep one rule")
        rule = _expect(value, dict, where, 'a table such as { percent = 10 } or { where = "..." }')
        _check_keys(rule, {"where", "percent"}, where)
        if not rule:
            raise ConfigError(f'{where} is empty: give it a percent = 10 or a where = "..."')
        clause = _expect(rule.get("where"), (str, type(None)), f"{where} where", "SQL text")
        if clause is not None and not clause.strip():
            raise ConfigError(f"{where} where is empty: write a condition, or remove it")
        percent = rule.get("percent")
        if percent is not None and (
            isinstance(percent, bool)
            or not isinstance(percent, int | float)
            or not 0 < percent <= 100
        ):
            raise ConfigError(
                f"{where} percent must be a number more than 0 and at most 100, not {percent!r}"
            )
        tables[table] = SubsetRule(
            where=clause.strip() if clause else None,
            percent=float(percent) if percent is not None else None,
        )
    return SubsetSettings(tables)


def parse_config(
    data: Mapping[str, Any], path: Path | None, base_dir: Path, origin: str = ""
) -> Config:
    """Validate a parsed ``snapshot.toml`` (or ``{}`` for the defaults)."""
    _check_keys(
        data,
        {
            "archive",
            "scripts",
            "pg_bin",
            "scope",
            "environments",
            "apply",
            "parity",
            "preflight",
            "session",
            "retention",
            "masking",
            "subset",
        },
        str(CONFIG_FILE),
    )
    pre = _expect(data.get("preflight", {}), dict, "[preflight]", "a table")
    _check_keys(pre, {"allow_cascades"}, "[preflight]")
    allow = _expect(pre.get("allow_cascades", []), list, "[preflight] allow_cascades", "a list")
    scope = _parse_scope(_expect(data.get("scope", {}), dict, "[scope]", "a table"), "[scope]")
    if path is None and "scope" not in data:
        scope = replace(scope, configured=False)
    session = _parse_session(_expect(data.get("session", {}), dict, "[session]", "a table"))
    envs = _parse_environments(
        _expect(data.get("environments", {}), dict, "[environments]", "a table"), base_dir, session
    )
    envs = {name: replace(env, origin=origin) for name, env in envs.items()}
    settings = _parse_apply(
        _expect(data.get("apply", {}), dict, "[apply]", "a table"),
        _expect(data.get("parity", {}), dict, "[parity]", "a table"),
        scope,
    )
    settings_columns = [
        *(("[apply] insert_as", c) for c in settings.insert_as),
        *(("[parity] ignore_columns", c) for c in settings.ignore_columns),
    ]
    for setting, column in settings_columns:
        if column.table not in scope.tables:
            raise ConfigError(
                f"{setting} names {column}, but {column.table} is not in [scope] tables: "
                f"remove it from {setting}, or add {column.table} to [scope] tables"
            )
    archive = _expect(data.get("archive", "snapshots"), str, "archive", "a path")
    archive_dir = (base_dir / archive).resolve()
    if archive_dir == base_dir.resolve() or archive_dir in base_dir.resolve().parents:
        raise ConfigError(
            f"archive = {archive!r} is the project folder or above it: name a folder of its "
            "own (snapshot makes it private and git-ignored)"
        )
    scripts = _expect(data.get("scripts", "sql"), str, "scripts", "a path")
    pg_bin = _expect(data.get("pg_bin", ""), str, "pg_bin", "a path")
    retention = _parse_retention(_expect(data.get("retention", {}), dict, "[retention]", "a table"))
    masking = _parse_masking(
        _expect(data.get("masking"), (dict, type(None)), "[masking]", "a table"), scope
    )
    subset = _parse_subset(_expect(data.get("subset", {}), dict, "[subset]", "a table"), scope)
    return Config(
        path=path,
        base_dir=base_dir,
        archive=base_dir / archive,
        scripts=base_dir / scripts,
        scripts_explicit="scripts" in data,
        scope=scope,
        environments=envs,
        apply=settings,
        preflight_allow_cascades=tuple(str(a) for a in allow),
        session=session,
        origin=origin,
        pg_bin=base_dir / pg_bin if pg_bin else None,
        retention=retention,
        masking=masking,
        subset=subset,
    )


def load_config(path: Path | None = None, cwd: Path | None = None) -> Config:
    """Read ``path``, else the project's ``snapshot.toml``; with neither, the user's defaults.

    The project is the nearest folder at or above ``cwd`` holding ``snapshot.toml`` or an
    env file (:func:`snapshot.project.find_root`); relative paths resolve from it, or from
    the folder of an explicit ``path``.
    """
    if path is None:
        root: ProjectRoot = find_root(cwd or Path.cwd())
        if root.config is None:
            return parse_config({}, None, root.folder, root.describe())
        path, origin = root.config, root.describe()
    else:
        origin = f"env files and the archive resolve relative to the folder of {path}"
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist: run 'snapshot init'") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a folder: name the .toml file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    return parse_config(data, path, path.resolve().parent, origin)
