"""Throwaway servers for what the shared test server cannot show, and server binaries.

* ``tls_server``: the system's PostgreSQL with TLS and scram passwords, playing a Supabase
  pooler or a password-protected host (wrong password, sslmode=require, special characters).
* ``pg16``: PostgreSQL 16 from the embedded package, a source newer than the 15 target.
* ``pg_bin``, ``restore_bin``: the system's binaries (else the bundled pg_restore), for tests
  that need a particular pg_dump or must load the tool's dumps themselves.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from snapshot import localpg
from snapshot.pgtools import bundled_bins
from tests.fix_db import SCHEMA_FILES, SQL, Server

POOLER_REF = "abcdefghijklmnopqrst"
POOLER_PASSWORD = "p@ss:w/rd%20 with 'quotes' & \"more\""


def system_bin() -> Path:
    for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (candidate / "initdb").exists():
            return candidate
    pytest.skip("no PostgreSQL server binaries in /usr/lib/postgresql")


@pytest.fixture(scope="session")
def server_base() -> Iterator[Path]:
    """A private folder in /tmp (reachable by the postgres OS user), swept afterwards."""
    base = Path(tempfile.mkdtemp(prefix="snaptest-servers-"))
    localpg.give_to_server_user(base)
    yield base
    localpg.sweep(base.parent, base.name, only_orphans=False)
    shutil.rmtree(base, ignore_errors=True)


def _self_signed(folder: Path) -> dict[str, str]:
    if not shutil.which("openssl"):
        pytest.skip("openssl is needed to make a test certificate")
    key, crt = folder / "server.key", folder / "server.crt"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
            "-keyout",
            str(key),
            "-out",
            str(crt),
        ],
        check=True,
        capture_output=True,
    )
    os.chmod(key, 0o600)
    localpg.give_to_server_user(key, crt)
    return {"ssl": "on", "ssl_cert_file": str(crt), "ssl_key_file": str(key)}


@pytest.fixture(scope="session")
def tls_server(server_base: Path) -> Iterator[localpg.LocalServer]:
    folder = server_base / "tls"
    folder.mkdir(mode=0o700)
    localpg.give_to_server_user(folder)
    settings = _self_signed(folder)
    hba = (
        "local all all trust\n"
        "hostnossl all all 127.0.0.1/32 reject\n"
        "hostssl all all 127.0.0.1/32 scram-sha-256\n"
    )
    server = localpg.start(
        system_bin(), folder, "pg", password="superuser-secret", settings=settings, hba=hba
    )
    with psycopg.connect(server.url(password="superuser-secret"), autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                sql.Identifier(f"postgres.{POOLER_REF}"), sql.Literal(POOLER_PASSWORD)
            )
        )
    yield server
    server.stop()


@pytest.fixture(scope="session")
def pg16(server_base: Path) -> Iterator[localpg.LocalServer]:
    """PostgreSQL 16 holding the app schema and the dev dataset in database ``app``."""
    try:
        bin_dir = localpg.embedded_bin(16)
    except Exception as exc:
        pytest.skip(f"no embedded PostgreSQL 16: {exc}")
    server = start_with_dev_data(bin_dir, server_base / "v16")
    yield server
    server.stop()


def start_with_dev_data(bin_dir: Path, folder: Path) -> localpg.LocalServer:
    """A server from ``bin_dir`` in ``folder`` (made here) with the app and dev data in ``app``.

    As root the server runs as another user, who cannot reach a venv inside a private folder
    (a clone in ``mktemp -d``): the installation is then copied where it can, as the
    rehearsal does.
    """
    folder.mkdir(mode=0o700)
    localpg.give_to_server_user(folder)
    server = localpg.start(localpg.server_binaries(bin_dir, folder), folder, "pg")
    with psycopg.connect(server.url(), autocommit=True) as conn:
        conn.execute("CREATE DATABASE app")
    with psycopg.connect(server.url("app"), autocommit=True) as conn:
        for path in [*SCHEMA_FILES, SQL / "seed" / "10_generator.sql", SQL / "seed" / "20_dev.sql"]:
            conn.execute(path.read_text())  # type: ignore[arg-type]
    return server


@pytest.fixture
def pg_bin() -> Path:
    """The system server's binaries, for tests that need a specific pg_dump."""
    for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (candidate / "pg_dump").exists():
            return candidate
    pytest.skip("no /usr/lib/postgresql/*/bin")


@pytest.fixture
def restore_bin(server: Server) -> Path:
    """A pg_restore to load the tool's dumps into the test server with: the system's when it is
    as new as the server, else the bundled one (the test server is the bundled one on a machine
    without a system PostgreSQL, or with SNAPSHOT_TEST_EMBEDDED=1).
    """
    for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (candidate / "pg_restore").exists() and int(candidate.parent.name) >= server.major():
            return candidate
    bundled = bundled_bins()
    if not bundled:
        pytest.skip("no pg_restore: neither /usr/lib/postgresql/*/bin nor a bundled PostgreSQL")
    return bundled[0][1]
