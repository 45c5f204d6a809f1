"""The archive folder: private and git-ignored wherever it lands, never the project folder,
swept of what killed processes left, and a full disk is one line that publishes nothing.

Each test runs the CLI the way a user types it, against real databases.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from tests.fix_apps import setup_pair
from tests.fix_project import Project, dead_pid, one_error_line, take


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_the_archive_stays_out_of_git_in_any_repository(project: Project, make_db) -> None:
    subprocess.run(["git", "init", "-q", str(project.path)], check=True)
    project.point("dev", make_db("empty"))

    take(project)

    ignore = project.path / "snapshots" / ".gitignore"
    assert ignore.read_text().splitlines()[-1] == "*"
    assert stat.S_IMODE((project.path / "snapshots").stat().st_mode) == 0o700
    status = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all"],
        cwd=project.path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert status.split() == ["??", ".env.local"]


def test_an_existing_archive_is_made_private_and_ignored(project: Project, make_db) -> None:
    archive = project.path / "snapshots"
    archive.mkdir(mode=0o755)
    archive.chmod(0o755)
    project.point("dev", make_db("empty"))

    take(project)

    assert stat.S_IMODE(archive.stat().st_mode) == 0o700
    assert (archive / ".gitignore").is_file()
    assert project.run("list", "--json").exit_code == 0


def test_an_archive_that_is_the_project_folder_is_refused(project: Project, make_db) -> None:
    project.point("dev", make_db("empty"))
    project.config('archive = "."\n')

    result = project.run("take", "dev")

    assert result.exit_code == 2
    assert "archive = '.' is the project folder or above it" in one_error_line(result)
    assert not (project.path / ".gitignore").exists()


def test_any_archive_write_sweeps_what_killed_processes_left(project: Project, make_db) -> None:
    _dev, _prod = setup_pair(project, make_db, dev_kind="empty")
    [published] = project.snapshots("dev")
    dead = dead_pid()
    prod_folder = project.path / "snapshots" / "prod"
    prod_folder.mkdir(mode=0o700)
    unsealed = prod_folder / f".tmp-20260101T000000-{dead}"
    unsealed.mkdir()
    (unsealed / "data.dump").write_bytes(b"half")
    sealed_take = prod_folder / f".tmp-20260101T000001-{dead}"
    shutil.copytree(published, sealed_take)
    # Our own pid, but the folder is older than this process: a reused pid owns nothing.
    reused = prod_folder / f".tmp-20200101T000000-{os.getpid()}"
    reused.mkdir()
    backup = prod_folder / f".tmp-20260101T000002-{dead}"
    shutil.copytree(published, backup)
    manifest = json.loads((backup / "manifest.json").read_text())
    (backup / "manifest.json").write_text(json.dumps({**manifest, "kind": "pre-apply"}))
    live = prod_folder / f".tmp-20990101T000000-{os.getpid()}"  # this process, writing now
    live.mkdir()

    take(project)  # writes dev's folder; sweeps every environment's

    assert not unsealed.exists() and not sealed_take.exists() and not reused.exists()
    assert backup.exists(), "a sealed backup is left for apply to settle"
    assert live.exists()


def _mount_tmpfs(folder: Path, kib: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={kib}k,mode=0700", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")


def _fill(folder: Path, leave: int) -> None:
    """Fill ``folder``'s file system until ``leave`` bytes stay free."""
    free = shutil.disk_usage(folder).free
    with (folder / ".filler").open("wb") as handle:
        handle.write(b"\0" * max(0, free - leave))


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_a_full_disk_while_sealing_is_one_line_and_publishes_nothing(
    project: Project, make_db
) -> None:
    dev = make_db("empty")
    project.point("dev", dev)
    take(project)  # on a roomy disk: how large are the dump and the manifest?
    [first] = project.snapshots("dev")
    dump, manifest = (first / "data.dump").stat().st_size, (first / "manifest.json").stat().st_size
    assert manifest > 8192, "the manifest must need more than the slack left below"
    shutil.rmtree(first)
    folder = project.path / "snapshots" / "dev"
    _mount_tmpfs(folder, 1024)
    try:
        _fill(folder, leave=dump + 4096)

        result = project.run("take", "dev")

        assert result.exit_code == 1
        line = one_error_line(result)
        assert "no space left in snapshots/dev: the snapshot's manifest needs" in line
        assert "KiB more" in line and "nothing was published" in line
        assert project.snapshots("dev") == []
    finally:
        subprocess.run(["umount", str(folder)], check=False)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_a_full_disk_during_the_pre_apply_backup_leaves_prod_unchanged(
    project: Project, make_db
) -> None:
    dev, prod = make_db("dev"), make_db("empty")
    project.point("dev", dev)
    project.point("prod", prod)
    take(project)
    take(project, "prod", "--unmasked")  # measure a backup-sized dump of prod
    [measure] = project.snapshots("prod")
    dump = (measure / "data.dump").stat().st_size
    shutil.rmtree(measure)
    folder = project.path / "snapshots" / "prod"
    original = prod.fingerprint()
    _mount_tmpfs(folder, 1024)
    try:
        _fill(folder, leave=dump + 4096)

        result = project.run("apply", "prod", "--yes")

        assert result.exit_code == 1
        line = one_error_line(result)
        assert "no space left in snapshots/prod: the snapshot's" in line
        assert prod.fingerprint() == original
        assert project.snapshots("prod") == []
    finally:
        subprocess.run(["umount", str(folder)], check=False)
