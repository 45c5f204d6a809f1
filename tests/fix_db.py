"""Real databases for the tests: one server named by one DSN, a fresh database per test.

The server comes from ``--test-dsn`` or ``SNAPSHOT_TEST_DSN`` (default: libpq's PG*
variables, else ``postgresql://postgres@127.0.0.1:5432/postgres``). It must allow a
superuser, which creates the templates; the tool itself runs as ``app_owner``, a
non-superuser owning the app tables like Supabase's ``postgres`` role.

The server is asked for only when a selected test needs it (its fixtures use
:func:`server`): then an unreachable one stops the run at once with one clear message
instead of hundreds of failures, and its version is shown after collection. The fast tier
(``-m fast``) needs none, and a test marked fast that asks for a server is a usage error.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

ROOT = Path(__file__).resolve().parent.parent
SQL = ROOT / "sql"
SCHEMA_FILES = sorted((SQL / "schema").glob("*.sql"))
APP_ROLE = "app_owner"
PREFIX = f"snaptest_{os.getpid()}_"
_counter = itertools.count()

# The bundled app's 16 tables (sql/schema), written out here rather than read from the tool's
# own default (snapshot.config.DEFAULT_TABLES): the tests' oracle stays independent of it.
SCOPE = (
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
SCOPE_TABLES = tuple(f"public.{t}" for t in SCOPE)
ALL_TABLES = (*SCOPE_TABLES, "auth.users", "auth.identities")
# The fixtures behind every test that needs the shared server, and behind those that start
# servers of their own: neither belongs in the fast tier.
SERVER_FIXTURE = "server"
NOT_FAST = (SERVER_FIXTURE, "server_base")


def default_dsn() -> str:
    if os.environ.get("SNAPSHOT_TEST_DSN"):
        return os.environ["SNAPSHOT_TEST_DSN"]
    params = {
        "host": os.environ.get("PGHOST", "127.0.0.1"),
        "port": os.environ.get("PGPORT", "5432"),
        "user": os.environ.get("PGUSER", "postgres"),
        "dbname": os.environ.get("PGDATABASE", "postgres"),
    }
    return make_conninfo("", **params)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--test-dsn",
        default=default_dsn(),
        help="Superuser connection to the PostgreSQL server the tests create databases on "
        "(default: SNAPSHOT_TEST_DSN, else PG* variables, else postgres@127.0.0.1:5432).",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "fast: needs no database server (the shared one or a throwaway one) and no network; "
        "`scripts/test -m fast` runs only these, in seconds",
    )


@pytest.hookimpl(trylast=True)  # after -m and -k have deselected
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        needs = sorted(set(getattr(item, "fixturenames", ())) & set(NOT_FAST))
        if needs and item.get_closest_marker("fast"):
            raise pytest.UsageError(
                f"{item.nodeid} is marked fast but uses {', '.join(needs)}: the fast tier "
                "runs without a database server; remove the mark"
            )
    wanted = any(SERVER_FIXTURE in getattr(item, "fixturenames", ()) for item in items)
    if wanted and not config.getoption("collectonly"):
        server_version(config)


def server_version(config: pytest.Config) -> str:
    """The test server's version, asked once; an unreachable server ends the run here."""
    known: str | None = getattr(config, "_snapshot_server", None)
    if known is not None:
        return known
    dsn = config.getoption("--test-dsn")
    try:
        with psycopg.connect(dsn, connect_timeout=5) as conn:
            row = conn.execute("SHOW server_version").fetchone()
    except psycopg.Error as exc:
        pytest.exit(
            f"cannot reach the test PostgreSQL server ({dsn}): {str(exc).strip()}\n"
            "Start it (scripts/test does) or point --test-dsn / SNAPSHOT_TEST_DSN at one; "
            "the fast tier (-m fast) needs none.",
            returncode=3,
        )
    assert row is not None
    config._snapshot_server = str(row[0])  # type: ignore[attr-defined]
    return str(row[0])


def pytest_report_collectionfinish(config: pytest.Config) -> list[str]:
    if config.get_verbosity() < 0:  # -q: no header either
        return []
    version = getattr(config, "_snapshot_server", None)
    if version is None:
        return ["PostgreSQL server: not needed by the selected tests"]
    return [f"PostgreSQL server: {version} ({config.getoption('--test-dsn')})"]


@dataclass(frozen=True)
class Server:
    """The test server, reached as a superuser."""

    dsn: str

    @property
    def port(self) -> int:
        """The TCP port the server listens on (5432 unless the DSN says otherwise)."""
        return int(conninfo_to_dict(self.dsn).get("port") or 5432)

    def major(self) -> int:
        """The server's major version."""
        with self.connect() as conn:
            return int(conn.info.server_version) // 10000

    def connect(self, dbname: str | None = None, **kw: object) -> psycopg.Connection:
        params = conninfo_to_dict(self.dsn)
        if dbname:
            params["dbname"] = dbname
        return psycopg.connect(make_conninfo("", **params), autocommit=True, **kw)  # type: ignore[arg-type]

    def url(self, dbname: str, user: str | None = None) -> str:
        """A postgresql:// URL for ``dbname`` (as ``user``), for env files."""
        params = conninfo_to_dict(self.dsn)
        host = params.get("host", "127.0.0.1")
        port = params.get("port", "5432")
        user = user or params.get("user", "postgres")
        if str(host).startswith("/"):
            return f"postgresql://{user}@/{dbname}?host={host}&port={port}"
        return f"postgresql://{user}@{host}:{port}/{dbname}"

    def run_sql_files(self, dbname: str, files: Sequence[Path], settings: str = "") -> None:
        with self.connect(dbname) as conn:
            if settings:
                conn.execute(settings)
            for path in files:
                conn.execute(path.read_text(encoding="utf-8"))  # type: ignore[arg-type]

    def create_database(self, name: str, template: str | None = None) -> None:
        with self.connect() as conn:
            query = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
            if template:
                query = sql.SQL("{} TEMPLATE {}").format(query, sql.Identifier(template))
            conn.execute(query)

    def drop_database(self, name: str) -> None:
        with self.connect() as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@dataclass(frozen=True)
class Database:
    """A fresh database on the test server, dropped after the test."""

    server: Server
    name: str

    @property
    def app_url(self) -> str:
        """URL as the app's owner role (what the tool connects as)."""
        return self.server.url(self.name, APP_ROLE)

    def connect(self) -> psycopg.Connection:
        """A superuser session, for setting up and inspecting."""
        return self.server.connect(self.name)

    def execute(self, query: str, params: Sequence[object] | None = None) -> list[tuple]:
        with self.connect() as conn:
            cur = conn.execute(query, params)  # type: ignore[arg-type]
            return cur.fetchall() if cur.description else []

    def scalar(self, query: str, params: Sequence[object] | None = None) -> object:
        return self.execute(query, params)[0][0]

    def wait_until_gone(self, pid: int) -> None:
        """Wait for backend ``pid`` to end (a killed client's session the server rolls back)."""
        deadline = time.monotonic() + 30
        while self.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", [pid]):
            assert time.monotonic() < deadline, f"backend {pid} is still there"
            time.sleep(0.05)

    def fingerprint(self, tables: Sequence[str] = ALL_TABLES) -> dict[str, tuple[int, str]]:
        """Row count and an md5 over every row's full text (generated columns too), sorted.

        Independent of the tool's own checksum: the tests' oracle for "unchanged".
        """
        result = {}
        with self.connect() as conn:
            conn.execute("SET TimeZone = 'UTC'; SET extra_float_digits = 1")
            for table in tables:
                count, digest = conn.execute(
                    f"SELECT count(*), md5(coalesce(string_agg(t::text, E'\\n' ORDER BY t::text), ''))"
                    f" FROM {table} t"
                ).fetchone()
                result[table] = (count, digest)
        return result


def _drop_leftovers(server: Server) -> None:
    """Drop databases of earlier test runs whose process is gone."""
    with server.connect() as conn:
        names = [
            r[0]
            for r in conn.execute(
                "SELECT datname FROM pg_database WHERE datname LIKE 'snaptest\\_%'"
            )
        ]
    for name in names:
        pid = name.split("_")[1]
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            server.drop_database(name)


class Templates:
    """Template databases built once per session: empty schema, dev data, prod data."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self._built: dict[str, str] = {}

    def get(self, kind: str) -> str:
        if kind not in self._built:
            name = f"{PREFIX}tpl_{kind}"
            self.server.create_database(name)
            files = list(SCHEMA_FILES)
            settings = ""
            if kind.startswith(("dev", "prod")):
                variant, _, scale = kind.partition("x")
                files += [SQL / "seed" / "10_generator.sql", SQL / "seed" / f"20_{variant}.sql"]
                settings = f"SET seed.scale = {int(scale or 1)}"
            self.server.run_sql_files(name, files, settings)
            with self.server.connect(name) as conn:
                conn.execute("VACUUM ANALYZE")
            self._built[kind] = name
        return self._built[kind]

    def drop_all(self) -> None:
        for name in self._built.values():
            self.server.drop_database(name)


@pytest.fixture(scope="session")
def server(request: pytest.FixtureRequest) -> Server:
    server_version(request.config)  # already asked after collection, unless asked for late
    return Server(request.config.getoption("--test-dsn"))


@pytest.fixture(scope="session")
def templates(server: Server) -> Iterator[Templates]:
    _drop_leftovers(server)
    built = Templates(server)
    yield built
    built.drop_all()


@pytest.fixture
def make_db(server: Server, templates: Templates) -> Iterator:
    """``make_db("dev")`` -> a fresh database from a template ("empty", "dev", "prod", "devx5")."""
    created: list[str] = []

    def make(kind: str = "dev") -> Database:
        name = f"{PREFIX}{next(_counter)}"
        server.create_database(name, templates.get(kind))
        created.append(name)
        return Database(server, name)

    yield make
    for name in created:
        server.drop_database(name)
