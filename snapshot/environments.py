"""From an environment name to a connection: env files, Supabase hosts, the session pooler.

Resolution order: ``SUPABASE_DB_URL`` when present (local databases, the rehearsal, CI);
otherwise the project ref and ``SUPABASE_DB_PASSWORD`` give the direct host
``db.<ref>.supabase.co`` when it answers, else the Supavisor session pooler, whose host is
configured or discovered from the Management API (never guessed from a region name).
"""

from __future__ import annotations

import io
import ipaddress
import json
import logging
import os
import re
import socket
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlparse

from dotenv import dotenv_values
from dotenv.parser import parse_stream
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from snapshot.config import EnvironmentConfig
from snapshot.errors import ConfigError
from snapshot.text import display_path

log = logging.getLogger(__name__)

DIRECT_PROBE_SECONDS = 3.0
API_TIMEOUT_SECONDS = 10.0
DEFAULT_API_URL = "https://api.supabase.com"
TRANSACTION_POOLER_PORT = 6543
WEAK_SSLMODES = {"disable", "allow", "prefer"}
_REF = re.compile(r"^[a-z0-9][a-z0-9-]{1,62}$")
_SUPABASE_HOST = re.compile(r"^([a-z0-9-]+)\.supabase\.(?:co|in|net)$")
_DIRECT_HOST = re.compile(r"^db\.([a-z0-9-]+)\.supabase\.(?:co|in|net)$")


@dataclass(frozen=True)
class Connection:
    """A resolved database connection; the password never leaves through str() or repr()."""

    env: str
    source: str
    host: str | None
    port: int | None
    user: str | None
    dbname: str | None
    options: Mapping[str, str] = field(default_factory=dict)
    password: str | None = field(default=None, repr=False)
    project_ref: str | None = None
    route: str = "url"
    note: str = ""
    session: Mapping[str, str] = field(default_factory=dict)
    password_from: str = "SUPABASE_DB_PASSWORD"  # where to fix a refused password
    safe: bool = False  # the environment is marked safe (snapshot.direction)

    def conninfo(self) -> str:
        """A libpq connection string without the password (safe to show and to pass as argv)."""
        params: dict[str, Any] = {
            "host": self.host,
            "port": self.port,
            "user": self.user,
            "dbname": self.dbname,
            **self.options,
        }
        return make_conninfo("", **{k: v for k, v in params.items() if v not in (None, "")})

    def describe(self) -> str:
        """``user@host:port/dbname`` for messages."""
        host = self.host or "local socket"
        port = f":{self.port}" if self.port else ""
        return f"{self.user or ''}{'@' if self.user else ''}{host}{port}/{self.dbname or ''}"

    def masked_url(self) -> str:
        """The connection as a URL with the password replaced by ``****``."""
        user = quote(self.user or "", safe="")
        secret = ":****" if self.password else ""
        host = self.host or ""
        if host.startswith("/"):
            query = {"host": host, **self.options}
            host = ""
        else:
            query = dict(self.options)
            if ":" in host:
                host = f"[{host}]"
        port = f":{self.port}" if self.port else ""
        auth = f"{user}{secret}@" if user else ""
        qs = "&".join(f"{k}={quote(str(v), safe='/')}" for k, v in query.items())
        return f"postgresql://{auth}{host}{port}/{quote(self.dbname or '')}" + (
            f"?{qs}" if qs else ""
        )

    def child_env(self) -> dict[str, str]:
        """Environment for pg_dump/pg_restore: the caller's, plus the password as PGPASSWORD."""
        env = {k: v for k, v in os.environ.items() if k not in ("PGPASSWORD", "PGPASSFILE")}
        if self.password:
            env["PGPASSWORD"] = self.password
        return env

    @property
    def endpoint(self) -> tuple[str, int, str]:
        """(host, port, dbname) as connected: what "the same connection target" means."""
        host = self.host or "/var/run/postgresql"
        if host in ("localhost", "::1") or host.startswith("127."):
            host = "127.0.0.1"
        return host, self.port or 5432, self.dbname or self.user or ""


def read_env_file(env: EnvironmentConfig) -> dict[str, str]:
    """The variables of the environment's env file (the process environment stays untouched).

    A line python-dotenv cannot parse is refused, naming the file and line (never its text,
    which may hold a password): going on without it would connect somewhere else.
    """
    path = env.env_file
    if not path.is_file():
        where = f" ({env.origin})" if env.origin else ""
        raise ConfigError(
            f"environment {env.name!r} needs {display_path(path)}, which does not exist{where}: "
            "create it with SUPABASE_DB_URL, or SUPABASE_PROJECT_REF and SUPABASE_DB_PASSWORD"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise ConfigError(f"cannot read {display_path(path)} ({reason})") from None
    for binding in parse_stream(io.StringIO(text)):
        if binding.error:
            raise ConfigError(
                f"{display_path(path)} line {binding.original.line} is not a KEY=value line "
                "python-dotenv can read: fix it (quote values with spaces or '#', comment "
                "lines start with '#')"
            )
    values = dotenv_values(stream=io.StringIO(text))
    return {k: v for k, v in values.items() if v is not None and v != ""}


def is_local_host(host: str | None) -> bool:
    """True for Unix sockets and loopback addresses, which need no TLS."""
    if not host or host.startswith("/") or host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _ref_from_host(host: str | None, user: str | None) -> str | None:
    if user and user.startswith("postgres."):
        return user.split(".", 1)[1]
    match = _DIRECT_HOST.match(host or "")
    return match.group(1) if match else None


def project_ref(values: Mapping[str, str], source: str) -> str | None:
    """The ref in SUPABASE_PROJECT_REF, SUPABASE_PROJECT_ID or NEXT_PUBLIC_SUPABASE_URL."""
    named = {
        name: values[name].strip()
        for name in ("SUPABASE_PROJECT_REF", "SUPABASE_PROJECT_ID")
        if values.get(name)
    }
    url = values.get("NEXT_PUBLIC_SUPABASE_URL")
    if url:
        match = _SUPABASE_HOST.match(urlparse(url).hostname or "")
        if match:
            named["NEXT_PUBLIC_SUPABASE_URL"] = match.group(1)
    refs = set(named.values())
    if len(refs) > 1:
        listed = ", ".join(f"{k}={v}" for k, v in named.items())
        raise ConfigError(
            f"{source} names two different projects ({listed}): make them agree, "
            "so a sync cannot target the wrong project"
        )
    if not refs:
        return None
    ref = refs.pop()
    if not _REF.match(ref):
        raise ConfigError(f"{source}: {ref!r} is not a Supabase project ref (lowercase letters)")
    return ref


def _check_sslmode(options: Mapping[str, str], host: str | None, source: str) -> None:
    mode = options.get("sslmode")
    if mode in WEAK_SSLMODES and not is_local_host(host):
        raise ConfigError(
            f"{source} asks for sslmode={mode} towards {host}: the password would cross the "
            "network unencrypted; remove it (snapshot uses sslmode=require)"
        )


def _refuse_transaction_pooler(host: str | None, port: int | None, source: str) -> None:
    if port == TRANSACTION_POOLER_PORT and host and "pooler.supabase" in host:
        raise ConfigError(
            f"{source} points at Supabase's transaction pooler (port 6543), which breaks "
            "pg_dump (no session state, no exported snapshots): use port 5432, the session pooler"
        )


def _from_url(env: EnvironmentConfig, values: Mapping[str, str], source: str) -> Connection:
    url = values["SUPABASE_DB_URL"]
    _scheme, separator, rest = url.partition("://")
    authority = re.split(r"[/?]", rest, maxsplit=1)[0] if separator else ""
    if authority.count("@") > 1:  # libpq would read a piece of the password as the host
        raise ConfigError(
            f"SUPABASE_DB_URL in {source} has more than one '@' before its host: an '@' in the "
            "password must be percent-encoded, as %40"
        )
    try:
        params = {k: str(v) for k, v in conninfo_to_dict(url).items() if v is not None}
    except Exception as exc:  # psycopg raises ProgrammingError with the libpq reason
        reason = str(exc).replace(url, "<SUPABASE_DB_URL>")
        raise ConfigError(f"SUPABASE_DB_URL in {source} is not a libpq URL: {reason}") from None
    password = params.pop("password", None)
    password_from = "the password in SUPABASE_DB_URL"
    if not password:
        password = values.get("SUPABASE_DB_PASSWORD")
        password_from = (
            "SUPABASE_DB_PASSWORD"
            if password
            else "SUPABASE_DB_URL (it has no password; add one, or SUPABASE_DB_PASSWORD)"
        )
    host = params.pop("host", None)
    port_text = params.pop("port", None)
    try:
        port = int(port_text) if port_text else None
    except ValueError:
        raise ConfigError(f"SUPABASE_DB_URL in {source} has a bad port {port_text!r}") from None
    user = params.pop("user", None)
    dbname = params.pop("dbname", None)
    options = {k: str(v) for k, v in params.items()}
    _refuse_transaction_pooler(host, port, source)
    _check_sslmode(options, host, source)
    if not is_local_host(host):
        options.setdefault("sslmode", "require")
    if host and "pooler.supabase" in host:
        options.setdefault("gssencmode", "disable")
    ref = project_ref(values, source) or _ref_from_host(host, user)
    return Connection(
        env=env.name,
        source=source,
        host=host,
        port=port,
        user=user,
        dbname=dbname,
        options=options,
        password=password,
        project_ref=ref,
        route="url",
        session=env.session,
        password_from=password_from,
        safe=env.safe,
    )


def _ssl_options(env: EnvironmentConfig) -> dict[str, str]:
    if env.ssl_root_cert:
        if not env.ssl_root_cert.is_file():
            raise ConfigError(
                f"ssl_root_cert {env.ssl_root_cert} does not exist: download Supabase's CA "
                "certificate from the dashboard (Database settings, SSL)"
            )
        return {"sslmode": "verify-full", "sslrootcert": str(env.ssl_root_cert)}
    return {"sslmode": "require"}


def probe_tcp(host: str, port: int, timeout: float = DIRECT_PROBE_SECONDS) -> str | None:
    """None when ``host:port`` accepts a TCP connection within ``timeout``, else the reason."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except socket.gaierror as exc:
        return f"cannot resolve {host} ({exc.strerror})"
    except TimeoutError:
        return f"no answer from {host}:{port} within {timeout:g} s"
    except OSError as exc:
        return f"{host}:{port} unreachable ({exc.strerror or exc})"


def discover_pooler(ref: str, token: str, api_url: str) -> tuple[str, int, str, str]:
    """Ask the Management API for the project's session pooler: (host, port, user, dbname)."""
    url = f"{api_url.rstrip('/')}/v1/projects/{ref}/config/database/pooler"
    request = urllib.request.Request(
        url, headers={"Authorization": f"Bearer {token}", "Accept": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=API_TIMEOUT_SECONDS) as response:
            payload = json.load(response)
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            raise ConfigError(
                f"the Management API refused SUPABASE_ACCESS_TOKEN (HTTP {exc.code}): create a "
                "personal access token at https://supabase.com/dashboard/account/tokens"
            ) from None
        if exc.code == 404:
            raise ConfigError(
                f"the Management API does not know project {ref!r} (HTTP 404): check the ref"
            ) from None
        raise ConfigError(f"the Management API answered HTTP {exc.code} for {url}") from None
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ConfigError(
            f"cannot reach the Management API at {api_url} ({reason}): set pooler_host in "
            "snapshot.toml instead"
        ) from None
    except ValueError:
        raise ConfigError(f"the Management API sent something that is not JSON ({url})") from None
    entries = payload if isinstance(payload, list) else [payload]
    primary = [e for e in entries if isinstance(e, dict) and e.get("database_type") == "PRIMARY"]
    if not primary or not primary[0].get("db_host"):
        raise ConfigError(
            f"the Management API lists no PRIMARY pooler for project {ref!r}: set pooler_host "
            "in snapshot.toml"
        )
    entry = primary[0]
    port = int(entry.get("db_port") or 5432)
    if port == TRANSACTION_POOLER_PORT:
        port = 5432  # same host, session mode
    return (
        str(entry["db_host"]),
        port,
        str(entry.get("db_user") or f"postgres.{ref}"),
        str(entry.get("db_name") or "postgres"),
    )


def _pooler(
    env: EnvironmentConfig, values: Mapping[str, str], ref: str, source: str
) -> tuple[str, int, str, str] | str:
    """The session pooler's (host, port, user, dbname), or why it could not be determined."""
    configured = env.pooler_host or values.get("SUPABASE_POOLER_HOST")
    if configured:
        host, _, port_text = configured.partition(":")
        port = int(port_text) if port_text.isdigit() else 5432
        _refuse_transaction_pooler(host, port, source)
        return host, port, f"postgres.{ref}", "postgres"
    token = values.get("SUPABASE_ACCESS_TOKEN") or os.environ.get("SUPABASE_ACCESS_TOKEN")
    if token:
        api_url = (
            values.get("SUPABASE_API_URL") or os.environ.get("SUPABASE_API_URL") or DEFAULT_API_URL
        )
        return discover_pooler(ref, token, api_url)
    return (
        "no pooler host is configured: set pooler_host in snapshot.toml (copy it from the "
        f"dashboard's Connect dialog) or SUPABASE_ACCESS_TOKEN in {source} to discover it"
    )


class NoRoute(ConfigError):
    """A project ref whose direct host does not answer, with no pooler to fall back on."""

    def __init__(self, env: str, ref: str, note: str, advice: str) -> None:
        super().__init__(f"{env}: {note + '; ' if note else ''}{advice}")
        self.env, self.ref, self.note, self.advice = env, ref, note, advice


def _direct_host_note(reason: str, ref: str, source: str) -> str:
    """Why the direct host was passed over: a name that does not resolve is not IPv6."""
    if reason.startswith("cannot resolve"):
        return (
            f"direct host {reason}: check the project ref {ref!r} in {source} (a mistyped "
            "or deleted project's host does not resolve)"
        )
    return f"direct host {reason}; it is IPv6-only without the IPv4 add-on"


def resolve_connection(env: EnvironmentConfig) -> Connection:
    """Resolve an environment to a connection, probing the direct host in ``auto`` mode."""
    values = read_env_file(env)
    source = display_path(env.env_file)
    if values.get("SUPABASE_DB_URL"):
        return _from_url(env, values, source)
    ref = project_ref(values, source)
    if ref is None:
        raise ConfigError(
            f"{source} has neither SUPABASE_DB_URL nor a project ref: add SUPABASE_PROJECT_REF "
            "(or NEXT_PUBLIC_SUPABASE_URL=https://<ref>.supabase.co)"
        )
    password = values.get("SUPABASE_DB_PASSWORD")
    if not password:
        raise ConfigError(
            f"{source} lacks SUPABASE_DB_PASSWORD: add the database password from the "
            "dashboard (Project Settings, Database)"
        )
    ssl = _ssl_options(env)
    direct_host = f"db.{ref}.supabase.co"
    note = ""
    if env.connection in ("auto", "direct"):
        reason = probe_tcp(direct_host, 5432) if env.connection == "auto" else None
        if reason is None:
            return Connection(
                env.name,
                source,
                direct_host,
                5432,
                "postgres",
                "postgres",
                ssl,
                password,
                ref,
                "direct",
                "direct host answered" if env.connection == "auto" else "connection = direct",
                env.session,
                safe=env.safe,
            )
        note = _direct_host_note(reason, ref, source)
        log.info("%s: %s: trying the session pooler", env.name, note)
    try:
        pooler = _pooler(env, values, ref, source)
    except ConfigError as exc:
        if not note:  # connection = pooler: nothing was tried before, the error is the story
            raise
        # The direct host failed and so did the way to the pooler (no network, say): no
        # route, and `snapshot env` still shows what it knows.
        raise NoRoute(env.name, ref, note, str(exc)) from None
    if isinstance(pooler, str):
        raise NoRoute(env.name, ref, note, pooler)
    host, port, user, dbname = pooler
    options = {**ssl, "gssencmode": "disable"}
    return Connection(
        env.name,
        source,
        host,
        port,
        user,
        dbname,
        options,
        password,
        ref,
        "pooler",
        f"{note}; session pooler" if note else "connection = pooler",
        env.session,
        safe=env.safe,
    )
