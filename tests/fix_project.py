"""A project folder to run the CLI in, the way a user would, and what to read back from it.

``project`` is a fresh working folder (the current directory during the test) with no
snapshot settings from the environment; :class:`Project` writes its env files and
``snapshot.toml``, runs the CLI in-process (CliRunner) or as a process of its own (when
signals or a terminal matter), and lists the archive it leaves. :func:`sample_manifest` is
a manifest as ``take`` writes one, made in memory for the fast tests of what reads them.
"""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from snapshot.catalog import Column, OwnedSequence
from snapshot.cli import cli
from snapshot.manifest import DatabaseIdentity, Manifest, TableEntry
from snapshot.names import TableName
from snapshot.scope import Scope
from tests.fix_db import Database


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
    for name in (
        "SNAPSHOT_CONFIG",
        "PG_BIN",
        "SUPABASE_ACCESS_TOKEN",
        "SUPABASE_API_URL",
        "SNAPSHOT_MASK_KEY",
    ):
        monkeypatch.delenv(name, raising=False)
    yield Project(tmp_path)


def take(project: Project, env: str = "dev", *args: str) -> None:
    """``snapshot take ENV``, which must succeed."""
    result = project.run("take", env, *args)
    assert result.exit_code == 0, result.stderr


def one_error_line(result: Result) -> str:
    """The single ``Error:`` line a failure prints, last on stderr, with no traceback anywhere."""
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    errors = [ln for ln in lines if ln.startswith("Error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    assert "\t" not in errors[0]
    return errors[0]


def at_a_terminal(
    project: Project, args: list[str], answer: str
) -> subprocess.CompletedProcess[str]:
    """Run the CLI with a terminal on stdin and type ``answer`` once it asks ("Type ...").

    Its stderr holds everything it wrote, the question included.
    """
    main, terminal = pty.openpty()
    try:
        process = project.spawn(*args, stdin=terminal)
        assert process.stderr is not None
        seen = ""
        deadline = time.monotonic() + 120
        while "Type " not in seen:
            assert time.monotonic() < deadline, seen
            ready, _, _ = select.select([process.stderr], [], [], 1)
            if ready:
                chunk = os.read(process.stderr.fileno(), 65536).decode()
                assert chunk, f"it ended before asking: {seen}"
                seen += chunk
        os.write(main, answer.encode())
        out, err = process.communicate(timeout=120)
    finally:
        os.close(main)
        os.close(terminal)
    return subprocess.CompletedProcess(process.args, process.returncode, out, seen + err)


def dead_pid() -> int:
    """The pid of a process that has ended: what a killed writer leaves in folder names."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def unpublish(backup: Path) -> None:
    """Put a published backup back in the state of a process killed right after its commit."""
    stamp = backup.name[: len("20261124T101500")]  # also "…Z.2-pre-apply" (same second)
    backup.rename(backup.with_name(f".tmp-{stamp}-{dead_pid()}"))


def sample_manifest(
    env: str = "dev", kind: str = "take", created: str = "2026-12-01T10:00:00+00:00", **changes
) -> Manifest:
    """A manifest as ``take`` writes one (a plain table, a quoted one, auth users, a sequence),
    made in memory: for tests of what reads manifests that need no database and no dump."""
    users, posts = TableName("public", "users"), TableName("public", "Post")
    fields: dict = {
        "environment": env,
        "kind": kind,
        "created": created,
        "label": None,
        "project_ref": None,
        "server_version": "15.10",
        "pg_dump_version": "15.10",
        "database": DatabaseIdentity("127.0.0.1", 5432, f"app_{env}", "7450000000000000001"),
        "scope": Scope((users, posts)),
        "tables": (
            TableEntry(users, 3, "h2:" + "1" * 32, (Column("id", "bigint", True),)),
            TableEntry(
                posts,
                2,
                "h2:" + "2" * 32,
                (Column("id", "text", True), Column("Title", "text", False)),
                generated=("search",),
            ),
            TableEntry(
                TableName("auth", "users"),
                2,
                "h2:" + "3" * 32,
                (Column("id", "uuid", True),),
                auth=True,
            ),
        ),
        "sequences": (
            OwnedSequence(TableName("public", "users_id_seq"), users, "id", 3, True, 1, 1),
        ),
        "migrations": ("20261101000000",),
        "files": {"data.dump": {"sha256": "0" * 64, "bytes": 2048}},
        "source_safe": env == "dev",
    }
    return Manifest(**{**fields, **changes})
