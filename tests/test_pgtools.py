"""The one runner of PostgreSQL's programs: stdout back, a failure as ProgramFailed or CannotStart."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from snapshot import pgtools
from tests.fix_servers import system_bin


def test_run_returns_what_the_program_printed() -> None:
    out = pgtools.run(system_bin() / "pg_dump", "--version", env=os.environ)
    assert out.startswith("pg_dump (PostgreSQL) ")


def test_a_failing_program_keeps_its_exit_status_and_stderr() -> None:
    with pytest.raises(pgtools.ProgramFailed) as failed:
        pgtools.run(
            system_bin() / "pg_dump",
            "--schema-only",
            "--dbname=postgresql://nobody@127.0.0.1:1/none",
            env=os.environ,
        )
    assert failed.value.returncode == 1
    assert "Connection refused" in failed.value.stderr
    assert str(failed.value).startswith("pg_dump failed: ")


def test_a_killed_program_says_by_which_signal() -> None:
    with pytest.raises(pgtools.ProgramFailed) as failed:
        pgtools.run(Path("/bin/sh"), "-c", "kill -KILL $$", env=os.environ)
    assert failed.value.returncode == -9
    assert str(failed.value) == "sh failed: killed by signal 9"


def test_a_missing_program_cannot_start(tmp_path: Path) -> None:
    with pytest.raises(pgtools.CannotStart) as failed:
        pgtools.run(tmp_path / "pg_dump", "--version", env=os.environ)
    assert str(failed.value) == (
        f"cannot run {tmp_path / 'pg_dump'}: missing, or not an executable program for this user"
    )
