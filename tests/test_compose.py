"""docker-compose.yml: the same rehearsal in containers, checked without a Docker engine.

The compose file must mount the very SQL files the embedded rehearsal loads, in the same
order; run the way the postgres image's entrypoint runs them (psql, ON_ERROR_STOP), they must
give a pair of databases that `snapshot cutover` takes through, with the env files that
ship beside the compose file.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from dotenv import dotenv_values
from psycopg.conninfo import conninfo_to_dict

from snapshot import pgtools
from snapshot.errors import ConfigError
from snapshot.rehearse import schema_files, seed_files
from tests.fix_db import PREFIX, ROOT, SCOPE_TABLES, SQL, Database, Server
from tests.fix_project import Project

INIT_DIR = "/docker-entrypoint-initdb.d/"
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def init_files(service: str) -> list[Path]:
    """The host files a service runs at first start, in the entrypoint's (name) order."""
    mounts = []
    for volume in COMPOSE["services"][service]["volumes"]:
        source, target, *_ = volume.split(":")
        if target.startswith(INIT_DIR):
            mounts.append((target, (ROOT / source).resolve()))
    return [source for _, source in sorted(mounts)]


@pytest.mark.fast
@pytest.mark.parametrize("service", ["dev", "prod"])
def test_compose_mounts_the_sql_the_rehearsal_loads(service: str) -> None:
    assert init_files(service) == [*schema_files(SQL), *seed_files(SQL, service)]


@pytest.mark.fast
def test_compose_env_files_point_at_the_published_ports() -> None:
    for service in ("dev", "prod"):
        [port] = COMPOSE["services"][service]["ports"]
        host, host_port, _ = port.split(":")
        url = dotenv_values(ROOT / f".env.rehearsal-{service}")["SUPABASE_DB_URL"]
        assert url == f"postgresql://app_owner@{host}:{host_port}/postgres"


def entrypoint_init(db: Database, files: list[Path], psql: Path) -> None:
    """What docker-entrypoint.sh does with *.sql files: psql -v ON_ERROR_STOP=1 -f FILE."""
    params = conninfo_to_dict(db.server.dsn)
    for path in files:
        subprocess.run(
            [
                str(psql),
                "-v",
                "ON_ERROR_STOP=1",
                "--no-password",
                "--no-psqlrc",
                "--quiet",
                "--host",
                str(params.get("host", "127.0.0.1")),
                "--port",
                str(params.get("port", "5432")),
                "--username",
                str(params.get("user", "postgres")),
                "--dbname",
                db.name,
                "-f",
                str(path),
            ],
            check=True,
            capture_output=True,
        )


@pytest.fixture
def blank_pair(server: Server) -> Iterator[tuple[Database, Database]]:
    """Two databases with nothing in them (no template): what a fresh container starts with."""
    names = [f"{PREFIX}compose_dev", f"{PREFIX}compose_prod"]
    for name in names:
        server.drop_database(name)
        server.create_database(name)
    yield Database(server, names[0]), Database(server, names[1])
    for name in names:
        server.drop_database(name)


def test_compose_init_gives_a_pair_that_cutover_takes_through(
    project: Project, blank_pair: tuple[Database, Database]
) -> None:
    try:  # PATH's (Debian's psql is a wrapper that fails without a cluster), else bundled
        psql = pgtools.find_tool("psql", 1, None, "the compose test").path
    except ConfigError:
        pytest.skip("psql is not installed")
    dev, prod = blank_pair
    entrypoint_init(dev, init_files("dev"), Path(psql))
    entrypoint_init(prod, init_files("prod"), Path(psql))
    project.env("rehearsal-dev", SUPABASE_DB_URL=dev.app_url)
    project.env("rehearsal-prod", SUPABASE_DB_URL=prod.app_url)
    tables = list(SCOPE_TABLES)
    assert prod.fingerprint(tables) != dev.fingerprint(tables)

    result = project.run("cutover", "rehearsal-dev", "rehearsal-prod", "--yes", "--unmasked")

    assert result.exit_code == 0, result.output
    assert prod.fingerprint(tables) == dev.fingerprint(tables)
