"""Shared fixtures: the test server, fresh databases, and a project folder to run the CLI in."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from click.testing import CliRunner, Result

from snapshot.cli import cli
from snapshot.pgtools import bundled_bins
from tests.fix_db import (  # noqa: F401  (fixtures)
    Database,
    Server,
    default_dsn,
    make_db,
    server,
    templates,
)
from tests.fix_servers import pg16, server_base, tls_server  # noqa: F401  (fixtures)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--test-dsn",
        default=default_dsn(),
        help="Superuser connection to the PostgreSQL server the tests create databases on "
        "(default: SNAPSHOT_TEST_DSN, else PG* variables, else postgres@127.0.0.1:5432).",
    )


def pytest_sessionstart(session: pytest.Session) -> None:
    dsn = session.config.getoption("--test-dsn")
    try:
        with psycopg.connect(dsn, connect_timeout=5) as conn:
            session.config._snapshot_server = conn.execute("SHOW server_version").fetchone()[0]  # type: ignore[attr-defined,index]
    except psycopg.Error as exc:
        pytest.exit(
            f"cannot reach the test PostgreSQL server ({dsn}): {str(exc).strip()}\n"
            "Start it (scripts/test does) or point --test-dsn / SNAPSHOT_TEST_DSN at one.",
            returncode=3,
        )


def pytest_report_header(config: pytest.Config) -> str:
    version = getattr(config, "_snapshot_server", "?")
    return f"PostgreSQL server: {version} ({config.getoption('--test-dsn')})"


@dataclass
class Project:
    """A working folder with env files and (optionally) a snapshot.toml, where the CLI runs."""

    path: Path

    def env(self, name: str, file: str | None = None, **variables: str) -> Path:
        target = self.path / (
            file or {"dev": ".env.local", "prod": ".env.production"}.get(name, f".env.{name}")
        )
        quoted = {
            k: '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"' for k, v in variables.items()
        }
        target.write_text("".join(f"{k}={v}\n" for k, v in quoted.items()), encoding="utf-8")
        return target

    def point(self, name: str, db: Database) -> None:
        """Make environment ``name`` reach ``db`` as the app owner."""
        self.env(name, SUPABASE_DB_URL=db.app_url)

    def config(self, text: str) -> Path:
        path = self.path / "snapshot.toml"
        path.write_text(text, encoding="utf-8")
        return path

    def run(self, *args: str, input: str | None = None) -> Result:
        """Run the CLI in-process, as a user would type it."""
        return CliRunner().invoke(cli, list(args), input=input, catch_exceptions=False)

    def spawn(self, *args: str, **kw: object) -> subprocess.Popen[str]:
        """Start the CLI as a separate process (for kill tests)."""
        return subprocess.Popen(
            [sys.executable, "-m", "snapshot", *args],
            cwd=self.path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            **kw,  # type: ignore[arg-type]
        )

    def snapshots(self, env: str | None = None) -> list[Path]:
        root = self.path / "snapshots"
        folders = [root / env] if env else [p for p in root.glob("*") if p.is_dir()]
        return sorted(
            p for f in folders if f.is_dir() for p in f.iterdir() if not p.name.startswith(".")
        )


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Project]:
    monkeypatch.chdir(tmp_path)
    for name in ("SNAPSHOT_CONFIG", "PG_BIN", "SUPABASE_ACCESS_TOKEN", "SUPABASE_API_URL"):
        monkeypatch.delenv(name, raising=False)
    yield Project(tmp_path)


def plain_app_pair(
    project: Project, new_db, fill: Callable[[Database, str, int], None], config: str
) -> tuple[Database, Database]:
    """A dev and a smaller, different prod of another app, filled by ``fill`` (variant, size).

    The project points at both, with ``config`` and empty script folders: these apps have no
    guardrails to step around.
    """
    dev, prod = new_db("empty"), new_db("empty")  # new_db: the make_db fixture
    fill(dev, "dev", 30)
    fill(prod, "prod", 20)
    project.point("dev", dev)
    project.point("prod", prod)
    project.config(config)
    for phase in ("pre", "post"):
        (project.path / "sql" / phase).mkdir(parents=True)
    return dev, prod


def table_names(names: Sequence[str]) -> list[str]:
    return [n if "." in n else f"public.{n}" for n in names]


@pytest.fixture
def pg_bin() -> Path:
    """The system server's binaries, for tests that need a specific pg_dump."""
    for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (candidate / "pg_dump").exists():
            return candidate
    pytest.skip("no /usr/lib/postgresql/*/bin")


@pytest.fixture
def restore_bin() -> Path:
    """A pg_restore to load the tool's dumps into the test server with: the system's, else the
    bundled one (on a machine without a system PostgreSQL the test server is the bundled one).
    """
    for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (candidate / "pg_restore").exists():
            return candidate
    bundled = bundled_bins()
    if not bundled:
        pytest.skip("no pg_restore: neither /usr/lib/postgresql/*/bin nor a bundled PostgreSQL")
    return bundled[0][1]


__all__ = ["Project", "os"]
