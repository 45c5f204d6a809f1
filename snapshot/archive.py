"""The snapshot archive: ``<archive>/<env>/<UTC time>[-label]/`` folders, their lifecycle.

Each folder holds a dump and its manifest (:mod:`snapshot.manifest`). A snapshot is
written into a hidden pending folder, sealed (its files hashed into the manifest, all
synced) and published by one rename, so a failed or killed take never leaves something that
``list`` or ``apply`` could pick; what killed processes leave is swept by the next command
that writes. Lookup by id, listing and the environments an archive holds are here too, so
the folder layout is known in one module. Folders are 0700, files 0600.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import hashlib
import logging
import os
import re
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from snapshot import processes
from snapshot.errors import ArchiveError, ConfigError
from snapshot.manifest import MANIFEST, Manifest, manifest_text, read_manifest, write_manifest
from snapshot.text import display_path

# A pre-apply backup's rows written between its pg_dump and the lock (snapshot.staging).
CATCH_UP_FILE = "catchup.copy"
PRE_APPLY = "pre-apply"
_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,47}$")
_TMP_PREFIX = ".tmp-"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Snapshot:
    """A complete snapshot in the archive."""

    path: Path
    manifest: Manifest

    @property
    def id(self) -> str:
        return f"{self.manifest.environment}/{self.path.name}"

    @property
    def dump_path(self) -> Path:
        return self.path / self.manifest.dump_file


def utc_now() -> datetime:
    return datetime.now(UTC)


def _private_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)


def check_label(label: str | None) -> str | None:
    """A label becomes part of a folder name: letters, digits, '.', '_' and '-' only."""
    if label is None:
        return None
    if not _LABEL.match(label) or label == PRE_APPLY:
        raise ConfigError(
            f"label {label!r} is not usable: use up to 48 letters, digits, '.', '_' or '-' "
            f"(and not {PRE_APPLY!r})"
        )
    return label


GITIGNORE = ".gitignore"
GITIGNORE_TEXT = (
    "# Created by snapshot: this archive holds database dumps (auth users' password hashes\n"
    "# among them). Never commit it.\n"
    "*\n"
)


def protect(archive: Path) -> None:
    """Create the archive folder private (0700), with a ``.gitignore`` of ``*`` inside.

    The archive often lands inside an app's repository (``scripts/npm-db`` runs there), whose
    own ``.gitignore`` knows nothing of it: like pytest's cache, it ignores itself.
    """
    archive.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(archive, 0o700)
    ignore = archive / GITIGNORE
    if not ignore.exists():
        fd = os.open(ignore, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(GITIGNORE_TEXT)


def env_dir(archive: Path, env: str) -> Path:
    """The archive folder of one environment, created private and checked writable."""
    folder = archive / env
    try:
        protect(archive)
        _private_dir(folder)
        probe = folder / f"{_TMP_PREFIX}probe-{os.getpid()}"
        probe.touch(mode=0o600)
        probe.unlink()
    except OSError as exc:
        raise ConfigError(
            f"archive folder {display_path(folder)} is not writable ({exc.strerror or exc}): "
            "fix its permissions or set archive in snapshot.toml"
        ) from None
    return folder


def check_writable(archive: Path, env: str) -> None:
    """Refuse an unwritable archive before any work (:func:`env_dir`), leaving no empty
    folder behind for a command that then fails or is cancelled."""
    made = not (archive / env).exists()
    env_dir(archive, env)
    if made:
        _remove_if_empty(archive / env)


def _remove_if_empty(folder: Path) -> None:
    with contextlib.suppress(OSError):
        folder.rmdir()  # only ever an empty one


# .tmp-<UTC time>-<pid>[.n] (a snapshot being written) and .pruning-<pid>-<name> (one being
# deleted): the writer's pid and, for .tmp, when it began.
_PENDING = re.compile(r"^\.tmp-(?P<time>\d{8}T\d{6})-(?P<pid>\d+)(?:\.\d+)?$")
_PRUNING_PREFIX = ".pruning-"
_PID_REUSE_SLACK = 5.0  # seconds: /proc's boot time is rounded


def _stale(entry: Path) -> bool:
    """Whether no running process can own this hidden folder.

    Its process is gone, or the pid now belongs to a process started after the folder was
    made (a pid reused after a reboot or a long time).
    """
    if entry.name.startswith(_PRUNING_PREFIX):
        pid_text = entry.name.removeprefix(_PRUNING_PREFIX).split("-", 1)[0]
        return pid_text.isdigit() and not processes.alive(int(pid_text))
    match = _PENDING.match(entry.name)
    if match is None:
        return False
    pid = int(match["pid"])
    if not processes.alive(pid):
        return True
    created = datetime.strptime(match["time"], "%Y%m%dT%H%M%S").replace(tzinfo=UTC).timestamp()
    started = processes.started_at(pid)
    return started is not None and started > created + _PID_REUSE_SLACK


def _orphans(folder: Path) -> Iterator[Path]:
    """Temporary folders whose writing process no longer runs."""
    for entry in folder.glob(f"{_TMP_PREFIX}*"):
        if entry.is_dir() and not entry.is_symlink() and _stale(entry):
            yield entry


def _is_backup(snapshot: Snapshot) -> bool:
    return snapshot.manifest.kind.startswith("pre-")


def sweep_stale(folder: Path) -> None:
    """Remove what killed processes left in one environment's folder.

    Half-written snapshots go, and so do complete takes that were never published. A
    complete pre-apply (or pre-rollback) backup stays: its process may have died at commit
    time, and only apply can tell (:func:`orphaned_backups`, settled by the next apply or
    rollback). Folders a prune was deleting go too.
    """
    for entry in _orphans(folder):
        try:
            if _is_backup(read_snapshot(entry)):
                continue
        except ArchiveError:
            pass  # unsealed, or its manifest half-written: not a snapshot
        log.info("removing %s, left by a process that no longer runs", entry)
        shutil.rmtree(entry, ignore_errors=True)
    for entry in folder.glob(f"{_PRUNING_PREFIX}*"):
        if entry.is_dir() and not entry.is_symlink() and _stale(entry):
            shutil.rmtree(entry, ignore_errors=True)


def sweep_archive(archive: Path) -> None:
    """:func:`sweep_stale` in every environment's folder: any command that writes calls it."""
    if not archive.is_dir():
        return
    for folder in sorted(archive.iterdir()):
        if folder.is_dir() and not folder.is_symlink() and not folder.name.startswith("."):
            with contextlib.suppress(OSError):
                sweep_stale(folder)


def orphaned_backups(archive: Path, env: str) -> list[Snapshot]:
    """Sealed but unpublished backups of ``env`` whose process died."""
    folder = archive / env
    if not folder.is_dir():
        return []
    found = []
    for entry in _orphans(folder):
        with contextlib.suppress(ArchiveError):
            snapshot = read_snapshot(entry)
            if _is_backup(snapshot):
                found.append(snapshot)
    return found


def remove(snapshot: Snapshot) -> None:
    """Delete a published snapshot: first out of sight (renamed hidden), then from disk.

    A prune killed halfway leaves a hidden folder the next sweep removes, never a
    visible snapshot with files missing.
    """
    hidden = snapshot.path.with_name(f"{_PRUNING_PREFIX}{os.getpid()}-{snapshot.path.name}")
    snapshot.path.rename(hidden)
    shutil.rmtree(hidden, ignore_errors=True)


def discard(snapshot: Snapshot) -> None:
    """Delete a snapshot folder."""
    shutil.rmtree(snapshot.path, ignore_errors=True)


@contextlib.contextmanager
def pending_snapshot(archive: Path, env: str) -> Iterator[Path]:
    """A private temporary folder for a snapshot being written; removed unless published."""
    folder = env_dir(archive, env)
    sweep_archive(archive)
    tmp = folder / f"{_TMP_PREFIX}{utc_now():%Y%m%dT%H%M%S}-{os.getpid()}"
    suffix = 0
    while tmp.exists():
        suffix += 1
        tmp = tmp.with_name(f"{tmp.name}.{suffix}")
    _private_dir(tmp)
    try:
        yield tmp
    finally:
        if tmp in _KEPT:
            _KEPT.discard(tmp)  # left for the next run to settle (see keep_pending)
        elif tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
            _remove_if_empty(folder)  # a cancelled or failed first apply leaves no trace


_KEPT: set[Path] = set()


def keep_pending(folder: Path) -> None:
    """Leave a sealed pending folder in place when its owner exits (an apply whose commit
    outcome is unknown): the next apply or rollback settles it as an orphaned backup."""
    _KEPT.add(folder)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def human_size(size: int) -> str:
    """``512 B``, ``3.4 MiB``: a size for people."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def write_file(folder: Path, name: str, text: str, what: str) -> None:
    """Write a small private file into a snapshot folder; a full disk is one clear line."""
    try:
        fd = os.open(folder / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        (folder / name).unlink(missing_ok=True)
        raise no_space(folder, len(text.encode()), what) from None


def no_space(folder: Path, needed: int | None, what: str = "manifest") -> ArchiveError:
    """The one line for a full disk: where, how much was needed (when known), how much is free."""
    try:
        free = f", {human_size(shutil.disk_usage(folder).free)} free"
    except OSError:
        free = ""
    need = f"needs {human_size(needed)} more" if needed is not None else "does not fit"
    return ArchiveError(
        f"no space left in {display_path(folder.parent)}: the snapshot's {what} {need}{free}; "
        "nothing was published: free some space ('snapshot prune') or set archive in "
        "snapshot.toml to a larger disk"
    )


def seal(
    folder: Path, manifest: Manifest, known: Mapping[str, Mapping[str, Any]] | None = None
) -> Snapshot:
    """Hash the folder's files into the manifest, write it and sync it all to disk.

    ``known``: files whose hash and size are known already (a hard link to a sealed
    snapshot's file, verified when it was read): they are not read again.
    A full disk is an :class:`ArchiveError` naming the folder and the space needed; the
    half-written manifest is removed, so the folder stays unsealed and is swept later.
    """
    files = {}
    known = known or {}
    written = []
    for path in sorted(p for p in folder.iterdir() if p.is_file() and p.name != MANIFEST):
        os.chmod(path, 0o600)
        if path.name in known and path.stat().st_size == known[path.name]["bytes"]:
            files[path.name] = dict(known[path.name])
        else:
            written.append(path)
    # The files go to disk while they are hashed (pg_dump leaves the syncing to this).
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        synced = pool.map(_fsync, written)
        for path in written:
            files[path.name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
        list(synced)  # a failed sync raises here
    manifest = replace(manifest, files=dict(sorted(files.items())))
    try:
        write_manifest(folder, manifest)
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise no_space(folder, len(manifest_text(manifest).encode())) from None
    return Snapshot(folder, manifest)


def publish(sealed: Snapshot, suffix: str | None) -> Snapshot:
    """Rename a sealed folder to its dated name, atomically: from now on list and apply see it."""
    created = datetime.fromisoformat(sealed.manifest.created)
    base = f"{created:%Y%m%dT%H%M%S}Z"
    final = sealed.path.parent / (f"{base}-{suffix}" if suffix else base)
    counter = 1
    while final.exists():
        counter += 1
        name = f"{base}.{counter}"
        final = sealed.path.parent / (f"{name}-{suffix}" if suffix else name)
    sealed.path.rename(final)
    _fsync(final.parent)
    return Snapshot(final, sealed.manifest)


def read_snapshot(path: Path) -> Snapshot:
    """Load a snapshot folder's manifest; any defect is an :class:`ArchiveError` saying which."""
    return Snapshot(path, read_manifest(path))


@dataclass(frozen=True)
class Damaged:
    """A snapshot folder whose manifest cannot be read: listed as such, never applied."""

    path: Path
    reason: str

    @property
    def id(self) -> str:
        return f"{self.path.parent.name}/{self.path.name}"


def _read_entry(path: Path) -> Snapshot:
    if path.is_symlink():
        raise ArchiveError(
            f"{path} is a symbolic link to {os.readlink(path)}: snapshots must be folders "
            "inside the archive"
        )
    return read_snapshot(path)


def archived_environments(archive: Path) -> list[str]:
    """The environments an archive holds a folder for (hidden folders are not environments)."""
    if not archive.is_dir():
        return []
    return sorted(p.name for p in archive.iterdir() if p.is_dir() and not p.name.startswith("."))


def scan_archive(
    archive: Path, env: str | None = None, *, verify: bool = False
) -> tuple[list[Snapshot], list[Damaged]]:
    """Complete snapshots (newest first) and damaged ones; temporary folders are skipped.

    One unreadable manifest never stops the others from being listed or applied. With
    ``verify`` (``snapshot list``), a snapshot whose files do not match the sha256 in its
    manifest is damaged too.
    """
    if not archive.is_dir():
        return [], []
    names = [env] if env else archived_environments(archive)
    found: list[Snapshot] = []
    damaged: list[Damaged] = []
    for folder in (archive / name for name in names):
        if not folder.is_dir() or folder.name.startswith("."):
            continue
        for path in sorted(folder.iterdir()):
            if path.name.startswith(".") or not (path.is_dir() or path.is_symlink()):
                continue
            try:
                snapshot = _read_entry(path)
                if verify:
                    verify_files(snapshot)
                found.append(snapshot)
            except ArchiveError as exc:
                damaged.append(Damaged(path, str(exc)))
    found.sort(key=lambda s: (s.manifest.created, s.path.name), reverse=True)
    return found, damaged


def list_snapshots(archive: Path, env: str | None = None) -> list[Snapshot]:
    """Complete snapshots, newest first; temporary and damaged folders are skipped."""
    return scan_archive(archive, env)[0]


def find_snapshot(archive: Path, ref: str) -> Snapshot:
    """A snapshot by id (``env/name``) or by name alone when that is unambiguous.

    A damaged snapshot named exactly is reported as such, not as missing. An id is never a
    path: anything but ``NAME`` or ``ENV/NAME`` of plain folder names is refused.
    """
    parts = ref.split("/")
    if not 1 <= len(parts) <= 2 or any(not p or p.startswith(".") or "\\" in p for p in parts):
        raise ConfigError(
            f"{ref!r} is not a snapshot id: give ENV/NAME or NAME as 'snapshot list' prints them"
        )
    env, _, name = ref.rpartition("/")
    exact = archive / env / name
    if env and (exact.is_symlink() or exact.is_dir()):
        return _read_entry(exact)
    matches = [
        s
        for s in list_snapshots(archive, env or None)
        if s.path.name == name or (not env and s.id == ref)
    ]
    if not matches:
        raise ConfigError(f"no snapshot {ref!r} in {archive}: see 'snapshot list'")
    if len(matches) > 1:
        ids = ", ".join(s.id for s in matches)
        raise ConfigError(f"snapshot {ref!r} is ambiguous ({ids}): give ENV/NAME")
    return matches[0]


def newest_snapshot(archive: Path, env: str, kind: str | None = None) -> Snapshot:
    """The newest snapshot of ``env`` (of the given kind)."""
    for snapshot in list_snapshots(archive, env):
        if kind is None or snapshot.manifest.kind == kind:
            return snapshot
    if kind == PRE_APPLY:
        raise ConfigError(
            f"there is no pre-apply backup of {env!r} in {display_path(archive / env)}: no apply "
            "to it was made from this archive (each apply writes one); run from the project "
            "that applied, or pass --to with a snapshot id"
        )
    what = f"{kind} snapshot" if kind else "snapshot"
    raise ConfigError(
        f"there is no {what} of {env!r} in {display_path(archive / env)}: run 'snapshot take {env}'"
    )


def verify_files(snapshot: Snapshot) -> None:
    """Every file the manifest lists is present with its recorded sha256, and nothing else."""
    for name, entry in snapshot.manifest.files.items():
        path = snapshot.path / name
        if not path.is_file():
            raise ArchiveError(f"{snapshot.id}: {name} is missing: the snapshot is incomplete")
        if path.stat().st_size != int(entry["bytes"]) or sha256_file(path) != entry["sha256"]:
            raise ArchiveError(
                f"{snapshot.id}: {name} does not match its sha256 in the manifest: "
                "the file was altered or truncated; take a new snapshot"
            )
    if snapshot.manifest.dump_file not in snapshot.manifest.files:
        raise ArchiveError(f"{snapshot.id}: the manifest does not list its dump file")
