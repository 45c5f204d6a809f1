"""Throwaway local PostgreSQL servers, for the rehearsal (and the tests).

Each server lives in a private folder (0700) holding its data directory, its Unix socket
and its log, and listens on a free port of 127.0.0.1. initdb and pg_ctl refuse to run as
root, so as root the server runs as the ``postgres`` OS user when it exists, else as
``nobody``; the folder is given to that user. A process that dies without stopping its
servers leaves them behind: :func:`sweep` stops every server under a base folder whose
owning process is gone, using the pid in ``postmaster.pid``.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import pwd
import secrets
import shutil
import signal
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from snapshot import DISTRIBUTION, pgtools, processes
from snapshot.errors import ConfigError, SnapshotError

log = logging.getLogger(__name__)

OWNER_FILE = "owner.pid"
KEPT_FILE = "kept"  # in a base folder: servers left running on purpose (rehearse --keep)
FAST_SETTINGS = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "listen_addresses": "127.0.0.1",
    "max_connections": "40",
    "shared_buffers": "128MB",
}


def embedded_bin(major: int | None = None) -> Path:
    """The bin folder of an installed embedded PostgreSQL server (the newest, or of ``major``)."""
    found = [(m, b) for m, b in pgtools.bundled_bins() if (b / "initdb").exists()]
    matching = [f for f in found if major is None or f[0] == major]
    if not matching:
        wanted = f"PostgreSQL {major}" if major else "PostgreSQL"
        raise ConfigError(
            f"no embedded {wanted} is installed: install snapshot with its rehearse extra "
            f"(pipx install --force '{DISTRIBUTION}[rehearse]', or uv tool install "
            f"'{DISTRIBUTION}[rehearse]'), or pass --pg-bin with a server's bin folder"
        )
    return max(matching)[1]


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _server_user() -> pwd.struct_passwd | None:
    """The account to run the server as: None when we are not root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise SnapshotError("running as root, but there is no postgres or nobody user to run a server")


def give_to_server_user(*paths: Path) -> None:
    """Make ``paths`` belong to the account servers run as (a no-op when not root)."""
    user = _server_user()
    if user is not None:
        for path in paths:
            os.chown(path, user.pw_uid, user.pw_gid)


class ServerFailed(SnapshotError):
    """A throwaway server could not be created or started."""


def _run(program: Path, *args: str, env: Mapping[str, str], user: pwd.struct_passwd | None) -> None:
    """Run a server program to its end as ``user`` (:func:`snapshot.pgtools.run`); one that
    cannot even be started (missing, or out of the server user's reach) is a
    :class:`ServerFailed` naming it, never a traceback."""
    try:
        pgtools.run(program, *args, env=env, user=user)
    except pgtools.CannotStart as exc:
        raise ServerFailed(str(exc)) from None


def _why_server_user_cannot_run(program: Path, user: pwd.struct_passwd) -> str | None:
    """None when ``user`` can run ``program --version``; otherwise the reason."""
    try:
        pgtools.run(program, "--version", env={"PATH": "/usr/bin:/bin"}, user=user)
    except pgtools.CannotStart as exc:
        return str(exc)
    except pgtools.ProgramFailed as exc:
        return f"{program} exited with {exc.returncode}"
    return None


def _open_up(root: Path) -> None:
    """Let every user read the tree and run what its owner may run (a clone made with umask 077)."""
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():
            continue
        mode = path.stat().st_mode
        extra = 0o555 if path.is_dir() or mode & 0o100 else 0o444
        os.chmod(path, mode | extra)


def server_binaries(bin_dir: Path, folder: Path) -> Path:
    """``bin_dir``, or a copy of its installation in ``folder`` the server user can run.

    As root, servers run as the ``postgres`` (else ``nobody``) user, who cannot reach
    binaries inside a private folder (a clone in root's 0700 home, or in ``mktemp -d``):
    then the installation (``bin_dir``'s parent: bin, lib, share) is copied into
    ``folder``, which that user owns, and removed with it. A wheel's shared libraries
    (``<package>.libs`` beside the package, found through a relative rpath) come along,
    in the same relative place.
    """
    user = _server_user()
    if user is None or _why_server_user_cannot_run(bin_dir / "postgres", user) is None:
        return bin_dir
    install = bin_dir.parent
    package = install.parent
    copy = folder / "pginstall" / package.name / install.name
    wheel_libs = package.parent / f"{package.name}.libs"
    log.info(
        "the %s user cannot run %s (in a private folder?): copying %s to %s",
        user.pw_name,
        bin_dir / "postgres",
        install,
        copy,
    )
    try:
        shutil.copytree(
            install, copy, symlinks=True, ignore=shutil.ignore_patterns("include", "doc", "man")
        )
        if wheel_libs.is_dir():
            shutil.copytree(wheel_libs, copy.parent.parent / wheel_libs.name, symlinks=True)
        _open_up(folder / "pginstall")
    except OSError as exc:
        raise ServerFailed(
            f"the {user.pw_name} user cannot reach {install}, and copying it to {copy} failed "
            f"({exc.strerror or exc}): install snapshot outside a private folder"
        ) from None
    copied = copy / bin_dir.name
    reason = _why_server_user_cannot_run(copied / "postgres", user)
    if reason is not None:
        raise ServerFailed(
            f"the {user.pw_name} user cannot run the PostgreSQL server of {install}, not even "
            f"copied into {folder}: {reason}"
        )
    return copied


@dataclass(frozen=True)
class LocalServer:
    """A running throwaway server."""

    name: str
    bin_dir: Path
    folder: Path
    port: int
    password: str | None = None

    @property
    def data_dir(self) -> Path:
        return self.folder / "data"

    @property
    def log_file(self) -> Path:
        return self.folder / "server.log"

    def url(
        self, dbname: str = "postgres", user: str = "postgres", password: str | None = None
    ) -> str:
        """A postgresql:// URL on 127.0.0.1 (password included only when given)."""
        secret = f":{quote(password, safe='')}" if password else ""
        return f"postgresql://{quote(user, safe='')}{secret}@127.0.0.1:{self.port}/{dbname}"

    def pg_ctl(self, *args: str) -> None:
        """Run pg_ctl on this server's data directory, as the server's user."""
        _run(
            self.bin_dir / "pg_ctl",
            "-D",
            str(self.data_dir),
            *args,
            env=os.environ,
            user=_server_user(),
        )

    def stop(self) -> None:
        """Stop the server (fast shutdown); kill it if pg_ctl cannot."""
        try:
            self.pg_ctl("-m", "fast", "-w", "-t", "30", "stop")
        except pgtools.ProgramFailed:
            _kill_postmaster(self.data_dir)


def start(
    bin_dir: Path,
    folder: Path,
    name: str,
    *,
    password: str | None = None,
    settings: Mapping[str, str] | None = None,
    hba: str | None = None,
) -> LocalServer:
    """initdb and start a server in ``folder/name`` (trust auth unless ``password`` is given)."""
    user = _server_user()
    home = folder / name
    home.mkdir(mode=0o700, parents=True)
    (home / OWNER_FILE).write_text(owner_stamp(os.getpid()))
    give_to_server_user(folder, home, home / OWNER_FILE)
    server = LocalServer(name, bin_dir, home, free_port(), password)
    initdb = [
        "-D",
        str(server.data_dir),
        "-U",
        "postgres",
        "-E",
        "UTF8",
        "--no-locale",
        "--no-sync",
    ]
    pwfile = home / "pwfile"
    if password:
        pwfile.write_text(password + "\n")
        give_to_server_user(pwfile)
        initdb += ["--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={pwfile}"]
    else:
        initdb += ["--auth=trust"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    try:
        _run(bin_dir / "initdb", *initdb, env=env, user=user)
    except pgtools.ProgramFailed as exc:
        lines = exc.stderr.strip().splitlines() or [f"exit {exc.returncode}"]
        raise ServerFailed(f"initdb failed for the {name} server: {lines[-1]}") from None
    except ServerFailed as exc:
        raise ServerFailed(f"the {name} server could not be created: {exc}") from None
    finally:
        pwfile.unlink(missing_ok=True)
    if hba is not None:
        (server.data_dir / "pg_hba.conf").write_text(hba)
    conf = {**FAST_SETTINGS, **(settings or {}), "port": str(server.port)}
    conf["unix_socket_directories"] = f"'{home}'"
    with (server.data_dir / "postgresql.auto.conf").open("a") as handle:
        for key, value in conf.items():
            quoted = value if value.startswith("'") else f"'{value}'"
            handle.write(f"{key} = {quoted}\n")
    try:
        server.pg_ctl("-l", str(server.log_file), "-w", "-t", "60", "start")
    except pgtools.ProgramFailed:
        log_text = server.log_file.read_text(errors="replace") if server.log_file.exists() else ""
        tail = log_text.strip().splitlines()[-3:] or ["no log written"]
        raise ServerFailed(f"the {name} server did not start: {' / '.join(tail)}") from None
    except ServerFailed as exc:
        raise ServerFailed(f"the {name} server did not start: {exc}") from None
    log.debug("started %s server on port %d in %s", name, server.port, home)
    return server


def _is_postgres(pid: int) -> bool:
    """Whether ``pid`` is a postgres process (a stale pid file may name a reused pid)."""
    cmdline = Path(f"/proc/{pid}/cmdline")
    if not cmdline.parent.exists():
        return processes.alive(pid)
    with contextlib.suppress(OSError):
        return b"postgres" in cmdline.read_bytes()
    return False


def _stop_pid(pid: int) -> None:
    """Immediate shutdown (SIGQUIT) of a postmaster; SIGKILL when it lingers."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGQUIT)
        for _ in range(100):
            os.kill(pid, 0)
            time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)


def _kill_postmaster(data_dir: Path) -> None:
    pid_file = data_dir / "postmaster.pid"
    with contextlib.suppress(FileNotFoundError, ValueError, IndexError):
        pid = int(pid_file.read_text().splitlines()[0])
        if _is_postgres(pid):
            _stop_pid(pid)


def postmasters(path_prefix: str) -> dict[int, str]:
    """Running postmasters whose data directory starts with ``path_prefix``: pid -> directory.

    Read from /proc, so that a server whose folder or pid file is gone is found too.
    """
    found = {}
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = [a.decode(errors="replace") for a in cmdline.read_bytes().split(b"\0")]
        except OSError:
            continue
        if not args or not args[0].endswith("postgres"):
            continue
        for flag, value in itertools.pairwise(args):
            if flag == "-D" and value.startswith(path_prefix):
                found[int(cmdline.parent.name)] = value
    return found


def stop_servers(folder: Path) -> int:
    """Stop every server whose data directory lies in ``folder``; returns how many."""
    pids = set(postmasters(f"{folder}/"))
    for pid_file in folder.glob("*/data/postmaster.pid"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            pids.add(int(pid_file.read_text().splitlines()[0]))
    running = [pid for pid in pids if _is_postgres(pid)]
    for pid in running:
        _stop_pid(pid)
    return len(running)


def owner_stamp(pid: int) -> str:
    """``pid start-time``: names a process in a way a reused pid cannot match."""
    return f"{pid} {_start_time(pid)}".strip()


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks, as :func:`owner_stamp` writes it, or ""."""
    ticks = processes.start_ticks(pid)
    return "" if ticks is None else str(ticks)


def _owner_alive(stamp: str) -> bool:
    parts = stamp.split()
    if not parts or not parts[0].isdigit():
        return False
    pid = int(parts[0])
    if pid == os.getpid():
        return True
    if not processes.alive(pid):
        return False
    return len(parts) < 2 or _start_time(pid) in ("", parts[1])


def claim(folder: Path) -> None:
    """Mark ``folder`` as this process's, so that :func:`sweep` leaves it alone while we run."""
    (folder / OWNER_FILE).write_text(owner_stamp(os.getpid()))


def sweep(base: Path, prefix: str, *, only_orphans: bool = True, spare_kept: bool = False) -> int:
    """Stop servers (and remove folders) under ``base/prefix*``; returns how many were stopped.

    With ``only_orphans``, folders whose owning process still runs are left alone (a pid
    reused by another process does not count: the owner's start time must match too); with
    ``spare_kept``, so are folders marked with :data:`KEPT_FILE`.
    """
    stopped = 0
    for folder in sorted(base.glob(f"{prefix}*")):
        if not folder.is_dir():
            continue
        if spare_kept and (folder / KEPT_FILE).exists():
            continue
        owners = [*folder.glob(OWNER_FILE), *folder.glob(f"*/{OWNER_FILE}")]
        if only_orphans:
            if any(_owner_alive(p.read_text()) for p in owners):
                continue
            if not owners and time.time() - folder.stat().st_mtime < 10:
                continue  # just created by a process that has not claimed it yet
        stopped += stop_servers(folder)
        shutil.rmtree(folder, ignore_errors=True)
    # Servers whose folder was removed under them (an interrupted start, say): orphans.
    for pid, data_dir in postmasters(str(base / prefix)).items():
        if not Path(data_dir).exists():
            _stop_pid(pid)
            stopped += 1
    return stopped


def new_password() -> str:
    """A random password for a throwaway server."""
    return secrets.token_urlsafe(18)
