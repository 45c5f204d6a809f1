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
from io import BytesIO
from pathlib import Path

import pytest
from psycopg import sql

from snapshot.archive import archived_environments
from snapshot.config import parse_config
from snapshot.copytext import block_later, write_block
from snapshot.errors import ArchiveError
from snapshot.manifest import FORMAT_VERSION, MANIFEST, read_manifest, write_manifest
from snapshot.names import TableName
from tests.fix_apps import setup_pair
from tests.fix_project import Project, dead_pid, one_error_line, sample_manifest, take


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


# --- the manifest and the environments the archive holds: no database needed ----------------


@pytest.mark.fast
def test_a_manifest_reads_back_as_it_was_written(tmp_path: Path) -> None:
    written = sample_manifest(label="before-cutover", applies="dev/20261201T100000Z")

    write_manifest(tmp_path, written)

    assert read_manifest(tmp_path) == written
    assert stat.S_IMODE((tmp_path / MANIFEST).stat().st_mode) == 0o600
    data = json.loads((tmp_path / MANIFEST).read_text())
    assert data["format"] == FORMAT_VERSION and data["dump"] == {
        "file": "data.dump",
        "format": "custom",
    }
    assert [(t["schema"], t["name"], t["table"]) for t in data["tables"]][1] == (
        "public",
        "Post",
        'public."Post"',
    )


@pytest.mark.fast
def test_a_manifest_is_never_written_over_another(tmp_path: Path) -> None:
    write_manifest(tmp_path, sample_manifest())

    with pytest.raises(FileExistsError):
        write_manifest(tmp_path, sample_manifest(kind="pre-apply"))

    assert read_manifest(tmp_path).kind == "take"


@pytest.mark.fast
@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda folder: None, "has no manifest.json: it is not a complete snapshot"),
        (lambda folder: (folder / MANIFEST).write_text("{"), "is not valid JSON"),
        (lambda folder: (folder / MANIFEST).write_text("[]"), "is not a manifest"),
        (
            lambda folder: _rewrite(folder, format=FORMAT_VERSION + 1),
            f"manifest format {FORMAT_VERSION + 1} is not one this version reads",
        ),
        (lambda folder: _rewrite(folder, tables=None), "garbles a field"),
        (lambda folder: _rewrite(folder, scope={}), "lacks 'tables'"),
    ],
)
def test_a_manifest_that_cannot_be_believed_is_refused_saying_why(
    tmp_path: Path, damage, reason: str
) -> None:
    damage(tmp_path)

    with pytest.raises(ArchiveError) as caught:
        read_manifest(tmp_path)

    assert reason in str(caught.value)


def _rewrite(folder: Path, **changes: object) -> None:
    (folder / MANIFEST).write_text(json.dumps({**sample_manifest().to_json(), **changes}))


@pytest.mark.fast
def test_the_environments_an_archive_holds_are_its_visible_folders(tmp_path: Path) -> None:
    archive = tmp_path / "snapshots"
    assert archived_environments(archive) == []
    for name in ("staging", "prod", ".tmp-20260101T000000-1"):
        (archive / name).mkdir(parents=True)
    (archive / ".gitignore").write_text("*\n")
    (archive / "notes.txt").write_text("not an environment\n")

    assert archived_environments(archive) == ["prod", "staging"]
    # the configuration knows an archived environment without an env file or a section
    assert parse_config({}, None, tmp_path).environment_names() == ["dev", "prod", "staging"]


def test_a_block_asked_in_a_pipeline_is_the_block_copy_writes(make_db) -> None:
    # The keys an apply deleted are asked with the record's other questions (a COPY would
    # cost a round trip of its own) and written as COPY text: byte for byte what COPY
    # writes, escapes, NULLs and output functions (t, not true; inet without /32) included.
    db = make_db("empty")
    columns = ["t", "b", "a", "n", "d", "j", "x"]
    with db.connect() as conn:
        conn.execute(
            "CREATE TABLE public.k (t text, b boolean, a inet, n numeric, d timestamptz, "
            "j jsonb, x text[], PRIMARY KEY (t, b, a))"
        )
        conn.execute(
            "INSERT INTO public.k VALUES "
            "(E'tab\\there', true, '10.0.0.1', 1.50, '2026-01-02 03:04:05+02', "
            "'{\"k\": \"v\\\\n\"}', ARRAY['a b', NULL, E'c\\\\d']), "
            "(E'new\\nline\\rcr', false, '10.0.0.0/8', NULL, NULL, NULL, NULL), "
            "(E'back\\\\slash \u00e9\u00e8', true, '::1', -0.0, 'infinity', '[]', '{}'), "
            "('', false, '192.168.1.1/32', 'NaN', '1999-12-31 23:59:59.999999+00', 'null', "
            "ARRAY[E'\\t'])"
        )
        query = sql.SQL("SELECT t, b, a, n, d, j, x FROM public.k ORDER BY t, b, a")
        table = TableName("public", "k")
        copied = BytesIO()
        write_block(conn, copied, "DELETED", table, columns, query)
        with conn.pipeline():
            later = block_later(conn, "DELETED", table, columns, query)
        piped = BytesIO()
        written = later(piped)

    assert written == 4
    assert piped.getvalue() == copied.getvalue()
    assert b"\\t" in piped.getvalue() and b"\\N" in piped.getvalue()
