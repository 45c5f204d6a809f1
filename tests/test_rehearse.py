"""`snapshot rehearse`: the whole cutover on two throwaway servers, and nothing left behind.

The cutover tests run the CLI as a separate process (signals are part of the promise) with
its own TMPDIR, so the servers it starts and the folders it leaves can be looked for
precisely; the last two run it in-process, on the binaries it is given.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from dotenv import dotenv_values

from snapshot import localpg
from snapshot.rehearse import PREFIX
from tests.fix_db import ROOT
from tests.fix_project import Project, one_error_line

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def tmpdir_base() -> Iterator[Path]:
    """A TMPDIR the server's OS user can traverse; swept and removed afterwards."""
    base = Path(tempfile.mkdtemp(prefix="snaptest-rehearse-", dir="/tmp"))
    base.chmod(0o711)
    yield base
    localpg.sweep(base, PREFIX, only_orphans=False)
    shutil.rmtree(base, ignore_errors=True)


def rehearse(base: Path, *args: str, **kw: object) -> subprocess.Popen[str]:
    env = {**os.environ, "TMPDIR": str(base)}
    return subprocess.Popen(
        [sys.executable, "-m", "snapshot", "rehearse", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,  # type: ignore[arg-type]
    )


def leftovers(base: Path) -> tuple[list[str], dict[int, str]]:
    """Rehearsal folders and running servers under ``base``."""
    return sorted(p.name for p in base.glob(f"{PREFIX}*")), localpg.postmasters(str(base))


def servers(base: Path) -> set[str]:
    """Data directories with a running server under ``base`` (a server's child process, just
    forked and not yet renamed, shows the same command line: count directories)."""
    return set(localpg.postmasters(str(base)).values())


def wait_for_servers(base: Path, count: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while len(servers(base)) < count:
        assert time.monotonic() < deadline, "the rehearsal servers did not start"
        time.sleep(0.05)


def test_rehearse_runs_the_cutover_then_the_rollback_and_leaves_nothing(
    tmpdir_base: Path,
) -> None:
    out, err = rehearse(tmpdir_base).communicate()

    assert "rehearsal passed" in out, err[-3000:]
    assert "cutover dev -> prod: done" in out
    assert "apply dev/" in out and "to prod: 16/16 tables match; committed" in out
    assert "rollback prod/" in out and "16/16 tables match; committed" in out
    assert "prod after the rollback, against prod/" in out
    assert "-before-rehearsal prod: 16/16 tables match" in out
    assert "servers stopped" in out
    assert sum("removed" in line for line in (out + err).splitlines()) == 1  # said once
    # verify reads dev and prod at once: one line per table, never the two interleaved
    assert re.search(r"^  public\.questions +dev +[\d,]+ rows +prod +[\d,]+ rows$", err, re.M)
    assert not re.search(r"^  dev +public\.", err, re.M)
    assert leftovers(tmpdir_base) == ([], {})


def test_kept_servers_answer_until_down_stops_them(tmpdir_base: Path) -> None:
    process = rehearse(tmpdir_base, "--keep", "--json")
    out, err = process.communicate()

    assert process.returncode == 0, err[-3000:]
    report = json.loads(out)
    assert report["ok"] and report["kept"]
    folders, _ = leftovers(tmpdir_base)
    assert len(folders) == 1 and len(servers(tmpdir_base)) == 2
    for name in ("dev", "prod"):
        assert report["urls"][name].startswith("postgresql://app_owner:***@127.0.0.1:")
        url = dotenv_values(report["env_files"][name])["SUPABASE_DB_URL"]
        assert url and "***" not in url
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT count(*) FROM public.questions").fetchone()[0] > 0
    # A new rehearsal's automatic sweep leaves kept servers alone.
    assert localpg.sweep(tmpdir_base, PREFIX, spare_kept=True) == 0

    down = rehearse(tmpdir_base, "--down")
    out, _ = down.communicate()

    assert down.returncode == 0 and out.strip() == "stopped 2 rehearsal servers"
    assert leftovers(tmpdir_base) == ([], {})


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_rehearsal_cleans_up(tmpdir_base: Path, signum: int) -> None:
    process = rehearse(tmpdir_base, "--scale", "3")
    wait_for_servers(tmpdir_base, 1)

    process.send_signal(signum)
    _out, err = process.communicate(timeout=60)

    assert process.returncode != 0
    assert "Traceback" not in err
    assert "stopped the rehearsal servers and removed" in err
    assert leftovers(tmpdir_base) == ([], {})


def test_servers_of_a_killed_rehearsal_are_stopped_by_the_next(tmpdir_base: Path) -> None:
    process = rehearse(tmpdir_base, "--scale", "3")
    wait_for_servers(tmpdir_base, 2)
    process.kill()
    process.communicate()
    folders, _ = leftovers(tmpdir_base)
    assert len(folders) == 1 and len(servers(tmpdir_base)) == 2

    out, err = rehearse(tmpdir_base).communicate()

    assert "stopped 2 server(s) that an earlier, killed rehearsal left running" in err
    assert "rehearsal passed" in out
    assert leftovers(tmpdir_base) == ([], {})


def test_rehearse_refuses_a_pg_bin_without_a_server(tmpdir_base: Path) -> None:
    env = {**os.environ, "TMPDIR": str(tmpdir_base)}
    result = subprocess.run(
        [sys.executable, "-m", "snapshot", "--pg-bin", "/usr/bin", "rehearse"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )

    assert result.returncode == 2
    assert result.stderr.startswith("Error: --pg-bin /usr/bin has no initdb")
    assert leftovers(tmpdir_base) == ([], {})


@pytest.mark.skipif(os.geteuid() != 0, reason="servers run as another user only as root")
def test_rehearse_runs_binaries_from_a_private_folder(project: Project, tmp_path: Path) -> None:
    """A clone in a 0700 folder: its .venv's embedded PostgreSQL is out of postgres' reach."""
    site = tmp_path / "clone" / ".venv" / "site-packages"
    site.parent.parent.mkdir(mode=0o700)
    install = localpg.embedded_bin().parent  # <site>/<package>/pginstall18
    package = install.parent
    shutil.copytree(install, site / package.name / install.name, symlinks=True)
    libs = package.parent / f"{package.name}.libs"  # the wheel's libpq, by relative rpath
    if libs.is_dir():
        shutil.copytree(libs, site / libs.name, symlinks=True)
    pg_bin = site / package.name / install.name / "bin"

    result = project.run("rehearse", "--pg-bin", str(pg_bin), "--json")

    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["restored"]["matches"] is True


def test_a_server_that_cannot_start_is_one_line(project: Project, tmp_path: Path) -> None:
    bin_dir = tmp_path / "broken" / "bin"
    bin_dir.mkdir(parents=True)
    for name in ("initdb", "postgres", "pg_ctl", "pg_dump"):
        (bin_dir / name).write_text("not a program\n")

    result = project.run("rehearse", "--pg-bin", str(bin_dir))

    assert result.exit_code == 1
    line = one_error_line(result)
    assert "cannot run" in line and str(bin_dir.parent) in line
