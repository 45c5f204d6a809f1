"""The fault campaign's laboratory: a throwaway server, the databases, and observed runs.

``bench/faults.py`` drives it and ``bench/faultcheck.py`` judges what it observes. Here:

* :func:`open_lab`: a private PostgreSQL server (one fault stops it with ``pg_ctl stop -m
  immediate``, so never the shared one) holding ``dev``, a diverged ``prod`` template built
  by ``bench/run.py``'s ``build``, and ``public.app_log``, a table outside the scope that
  the app writes to;
* :class:`Run`: the CLI started as a user would, its stderr read line by line with the time
  each line appeared, and its archive folder watched for the backup's seal and publication,
  so a fault can be aimed at a phase;
* :class:`AppWriter`: the app, writing to a scoped table and an unscoped one throughout,
  keeping a record of every write the server acknowledged;
* :func:`mount_small`: a tmpfs too small for what the archive must hold.

The server is durable like a real one (fsync and synchronous_commit on): a commit waits for
its WAL to reach the disk, which gives the commit a real duration to aim at, and an
immediate stop loses nothing that was acknowledged.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from psycopg import sql
from run import build  # bench/run.py, beside this file

from snapshot import localpg
from snapshot.manifest import MANIFEST

PREFIX = "snapshot-faults-"
LAB_APP = "fault-lab"  # application_name of the lab's own sessions (never "snapshot…")
WRITER_APP = "fault-app"
WRITER_MARK = "fault_app"  # key in client_info of the rows the app writes
# Marks a run's timeline gets from watching its archive folder: the backup sealed (in its
# hidden folder, just before the commit) and published (renamed into place, after it).
SEALED = "[backup sealed]"
PUBLISHED = "[backup published]"
COMMIT = "commit"  # from SEALED to PUBLISHED: commit, helper indexes dropped, publish
# Durable (see above), and checkpointing often so that crash recovery stays short.
SETTINGS = {
    "fsync": "on",
    "synchronous_commit": "on",
    "full_page_writes": "on",
    "checkpoint_timeout": "30s",
    "max_wal_size": "256MB",
}


def system_bin() -> Path:
    """The newest installed server binaries, else the embedded package's."""
    for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (candidate / "initdb").exists() and (candidate / "pg_dump").exists():
            return candidate
    return localpg.embedded_bin()


# --- runs of the CLI -------------------------------------------------------------------------


@dataclass(frozen=True)
class Segment:
    """A stretch of a reference run: from an anchor line (None: the start) to the next."""

    name: str
    anchor: str | None
    start: float
    duration: float


class Run:
    """The CLI as a separate process; stderr lines are kept with the moment they appeared."""

    def __init__(
        self, args: Sequence[str], cwd: Path, env: dict[str, str], watch: Path | None = None
    ) -> None:
        self.args = tuple(args)
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "snapshot", *args],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[tuple[float, str]] = []
        self.stdout = ""
        self.killed = False
        self.ended: float | None = None
        self._changed = threading.Condition()
        self._readers = [
            threading.Thread(target=self._read_stderr, daemon=True),
            threading.Thread(target=self._read_stdout, daemon=True),
        ]
        if watch is not None:
            self._readers.append(threading.Thread(target=self._watch, args=(watch,), daemon=True))
        for reader in self._readers:
            reader.start()

    def _add(self, line: str) -> None:
        with self._changed:
            self.lines.append((time.monotonic() - self.t0, line))
            self._changed.notify_all()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._add(line.rstrip("\n"))
        with self._changed:
            self._changed.notify_all()

    def _watch(self, folder: Path) -> None:
        """Add :data:`SEALED` and :data:`PUBLISHED` to the lines as the backup gets there."""
        sealed = False
        while self.proc.poll() is None:
            with contextlib.suppress(OSError):
                pending = [p for p in folder.glob(".tmp-*") if (p / MANIFEST).exists()]
                if pending and not sealed:
                    sealed = True
                    self._add(SEALED)
                elif sealed and not pending:
                    self._add(PUBLISHED)
                    return
            time.sleep(0.001)

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        self.stdout = self.proc.stdout.read()

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_line(self, text: str, timeout: float = 300) -> float | None:
        """When a stderr line equal to ``text`` appeared (offset), or None if the run ended."""
        deadline = time.monotonic() + timeout
        seen = 0
        with self._changed:
            while True:
                for offset, line in self.lines[seen:]:
                    if line == text:
                        return offset
                seen = len(self.lines)
                if not self._readers[0].is_alive() or time.monotonic() > deadline:
                    return None
                self._changed.wait(0.05)

    def sleep_until(self, offset: float) -> None:
        time.sleep(max(0.0, self.t0 + offset - time.monotonic()))

    def kill(self) -> bool:
        """SIGKILL the CLI (not its children: they die with it); False if it had ended."""
        if not self.alive:
            return False
        self.proc.send_signal(signal.SIGKILL)
        self.killed = True
        return True

    def wait(self, timeout: float = 600) -> int:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
            self.lines.append((time.monotonic() - self.t0, f"(hung for {timeout:.0f} s: killed)"))
        for reader in self._readers:
            reader.join(10)
        if self.ended is None:
            self.ended = time.monotonic() - self.t0
        return code

    def phase(self, at: float | None = None) -> str:
        """The last phase line printed before ``at`` (default: all of them)."""
        name = "start"
        for offset, line in self.lines:
            if at is not None and offset > at:
                break
            if _is_anchor(line):
                name = segment_name(line)
        return name

    @property
    def error(self) -> str | None:
        errors = [line for _, line in self.lines if line.startswith("Error: ")]
        return errors[-1] if errors else None

    @property
    def traceback(self) -> bool:
        return any(line.startswith("Traceback") for _, line in self.lines)

    @property
    def committed(self) -> bool:
        return self.proc.returncode == 0 and "tables match; committed" in self.stdout

    @property
    def notes(self) -> list[str]:
        return [line for _, line in self.lines if line.startswith(("note: ", "recovered "))]

    def timeline(self) -> list[Segment]:
        """This (finished) run cut at its phase lines, for aiming faults at a phase."""
        marks: list[tuple[str, str | None, float]] = [("start", None, 0.0)]
        for offset, line in self.lines:
            if _is_anchor(line):
                marks.append((segment_name(line), line, offset))
        end = self.ended if self.ended is not None else time.monotonic() - self.t0
        return [
            Segment(name, anchor, start, (marks[i + 1][2] if i + 1 < len(marks) else end) - start)
            for i, (name, anchor, start) in enumerate(marks)
        ]


def _is_anchor(line: str) -> bool:
    return line in (SEALED, PUBLISHED) or (line.endswith("…") and not line.startswith(" "))


def segment_name(line: str) -> str:
    """The segment a phase line (or an archive mark) starts."""
    return {SEALED: COMMIT, PUBLISHED: "after publish"}.get(line, line.rstrip("…"))


def dump_child(pid: int) -> int | None:
    """The pid of the archive-writing pg_dump (it has ``--snapshot=``) started by ``pid``."""
    with contextlib.suppress(OSError):
        for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            with contextlib.suppress(OSError):
                cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
                if b"pg_dump" in cmdline and b"--snapshot=" in cmdline:
                    return int(child)
    return None


def running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, finished but not yet reaped, does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def wait_dump(run: Run, timeout: float = 120) -> tuple[int, float] | None:
    """The run's pg_dump child and when it appeared, or None if the run ended first."""
    deadline = time.monotonic() + timeout
    while run.alive and time.monotonic() < deadline:
        pid = dump_child(run.proc.pid)
        if pid is not None:
            return pid, time.monotonic() - run.t0
        time.sleep(0.002)
    return None


# --- the app ---------------------------------------------------------------------------------


class AppWriter(threading.Thread):
    """The app: one small transaction after another, each inserting one attempt (scoped,
    marked in ``client_info``) and one ``public.app_log`` row (outside the scope).

    ``acked`` maps each write the server acknowledged to the moment it did; a write whose
    COMMIT got no answer (the connection died) is ``in_doubt``.
    """

    def __init__(self, url: str, pairs: Sequence[tuple[str, int]]) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.pairs = pairs
        self.acked: dict[int, float] = {}
        self.in_doubt: set[int] = set()
        self.errors: Counter[str] = Counter()
        self._stop_event = threading.Event()

    def run(self) -> None:
        conn: psycopg.Connection | None = None
        n = 0
        while not self._stop_event.is_set():
            if conn is None or conn.closed:
                try:
                    conn = psycopg.connect(self.url, application_name=WRITER_APP, connect_timeout=3)
                except psycopg.OperationalError:
                    self.errors["cannot connect"] += 1
                    time.sleep(0.1)
                    continue
            n += 1
            user, question = self.pairs[n % len(self.pairs)]
            try:
                conn.execute(
                    "INSERT INTO public.question_attempts (user_id, question_id, is_correct, "
                    "client_info) VALUES (%s, %s, true, jsonb_build_object(%s::text, %s::int))",
                    (user, question, WRITER_MARK, n),
                )
                conn.execute("INSERT INTO public.app_log (n) VALUES (%s)", (n,))
            except psycopg.Error as exc:  # not written: a deadlock, a lost connection…
                self._failed(conn, exc)
                continue
            try:
                conn.commit()
            except psycopg.Error as exc:
                if conn.closed:  # the answer to COMMIT was lost: written or not
                    self.in_doubt.add(n)
                self._failed(conn, exc)
                continue
            self.acked[n] = time.monotonic()
            time.sleep(0.005)
        _drop(conn)

    def _failed(self, conn: psycopg.Connection, exc: psycopg.Error) -> None:
        self.errors["connection lost" if conn.closed else type(exc).__name__] += 1
        if conn.closed:
            time.sleep(0.1)
        else:
            with contextlib.suppress(psycopg.Error):
                conn.rollback()

    def stop(self) -> None:
        self._stop_event.set()
        self.join(30)


def _drop(conn: psycopg.Connection | None) -> None:
    if conn is not None:
        with contextlib.suppress(Exception):
            conn.close()


# --- the lab ---------------------------------------------------------------------------------


@dataclass
class Project:
    """A working folder with env files and a snapshot.toml, where the CLI runs."""

    path: Path
    env: dict[str, str]

    @property
    def config(self) -> Path:
        return self.path / "snapshot.toml"

    def archive(self, env: str) -> Path:
        return self.path / "snapshots" / env

    def spawn(self, *args: str) -> Run:
        """Start the CLI; a run that writes to prod's archive has it watched."""
        watch = self.archive("prod") if "prod" in args else None
        return Run(args, self.path, self.env, watch)

    def run(self, *args: str, timeout: float = 600) -> Run:
        started = self.spawn(*args)
        started.wait(timeout)
        return started


@dataclass
class Lab:
    """The throwaway server and what the trials share."""

    server: localpg.LocalServer
    base: Path
    bin_dir: Path
    scale: int
    writer_pairs: list[tuple[str, int]] = field(default_factory=list)
    # [apply] upload of every project: "changed" stages sparsely and backs up by difference,
    # as over a network (the local server is too near for "auto" to choose it)
    upload: str = "auto"
    _projects: int = 0
    _retired: int = 0

    @property
    def dsn(self) -> str:
        return f"host=127.0.0.1 port={self.server.port} user=postgres dbname=postgres"

    def connect(self, dbname: str = "prod") -> psycopg.Connection:
        return psycopg.connect(
            host="127.0.0.1",
            port=self.server.port,
            user="postgres",
            dbname=dbname,
            autocommit=True,
            application_name=LAB_APP,
            connect_timeout=10,
        )

    def app_url(self, dbname: str) -> str:
        return self.server.url(dbname, "app_owner")

    def copy_database(self, source: str, name: str) -> None:
        with self.connect("postgres") as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
            conn.execute(
                sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                    sql.Identifier(name), sql.Identifier(source)
                )
            )

    def reset_prod(self, template: str) -> None:
        """prod as the template holds it (the diverged dataset, or it after an apply).

        The old prod is renamed away rather than dropped: DROP DATABASE forces a checkpoint,
        seconds on a durable server. The renamed ones go twenty at a time.
        """
        self._retired += 1
        with self.connect("postgres") as conn:
            if conn.execute("SELECT 1 FROM pg_database WHERE datname = 'prod'").fetchone():
                for _ in range(50):
                    conn.execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = 'prod' AND pid <> pg_backend_pid()"
                    )
                    try:
                        conn.execute(f"ALTER DATABASE prod RENAME TO retired_{self._retired}")
                        break
                    except psycopg.errors.ObjectInUse:
                        time.sleep(0.1)
            if self._retired % 20 == 0:
                for (name,) in conn.execute(
                    "SELECT datname FROM pg_database WHERE datname LIKE 'retired\\_%'"
                ).fetchall():
                    conn.execute(sql.SQL("DROP DATABASE {}").format(sql.Identifier(name)))
            conn.execute(
                sql.SQL("CREATE DATABASE prod TEMPLATE {}").format(sql.Identifier(template))
            )

    def project(self, name: str) -> Project:
        self._projects += 1
        path = self.base / "projects" / f"{self._projects:03d}-{name}"
        path.mkdir(parents=True)
        (path / ".env.local").write_text(f"SUPABASE_DB_URL={self.app_url('dev')}\n")
        (path / ".env.production").write_text(f"SUPABASE_DB_URL={self.app_url('prod')}\n")
        # The default scope and scripts; environments dev and prod from their env files.
        (path / "snapshot.toml").write_text(
            f'archive = "snapshots"\n\n[apply]\nupload = "{self.upload}"\n'
        )
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("PG", "SNAPSHOT_", "SUPABASE_"))
        }
        env["PG_BIN"] = str(self.bin_dir)
        return Project(path, env)

    def build(self, scale: int) -> None:
        """dev and the prod template from sql/ (as bench/run.py does), plus the app's log."""
        build(self.dsn, "dev", "dev", scale)
        build(self.dsn, "prod_before", "prod", scale)
        with self.connect("prod_before") as conn:
            conn.execute(
                "SET ROLE app_owner; CREATE TABLE public.app_log (id bigserial PRIMARY KEY, "
                "n integer NOT NULL, at timestamptz NOT NULL DEFAULT clock_timestamp())"
            )
        with self.connect("dev") as dev, self.connect("prod_before") as prod:
            # The app's attempts point at users and questions both datasets hold, so that
            # they stay valid whichever side of the apply they land on.
            common = {str(r[0]) for r in dev.execute("SELECT id FROM public.users")} & {
                str(r[0]) for r in prod.execute("SELECT id FROM public.users")
            }
            questions = [
                int(r[0])
                for r in prod.execute("SELECT id FROM public.questions ORDER BY id LIMIT 50")
            ]
        users = sorted(common)[:50]
        self.writer_pairs = [(u, q) for u, q in zip(users, questions, strict=False)]

    def wait_quiet(self, timeout: float = 30) -> list[str]:
        """Wait until no snapshot session (or pg_dump's) is left on prod; those still there."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                with self.connect() as conn:
                    left = [
                        f"pid {pid} ({app}, {state}: {query[:60]})"
                        for pid, app, state, query in conn.execute(
                            "SELECT pid, application_name, state, query FROM pg_stat_activity "
                            "WHERE datname = 'prod' AND application_name LIKE 'snapshot%%'"
                        )
                    ]
            except psycopg.OperationalError:
                left = ["(the server does not answer)"]
            if not left or time.monotonic() > deadline:
                return left
            time.sleep(0.1)


@contextlib.contextmanager
def open_lab(bin_dir: Path, scale: int, upload: str = "auto") -> Iterator[Lab]:
    """Start the lab's server and build its databases; everything is removed afterwards."""
    stopped = localpg.sweep(Path(tempfile.gettempdir()), PREFIX)
    if stopped:
        print(f"stopped {stopped} server(s) an earlier, killed campaign left", file=sys.stderr)
    base = Path(tempfile.mkdtemp(prefix=PREFIX))
    localpg.claim(base)
    localpg.give_to_server_user(base)
    server = localpg.start(bin_dir, base, "target", settings=SETTINGS)
    try:
        lab = Lab(server, base, bin_dir, scale, upload=upload)
        lab.build(scale)
        yield lab
    finally:
        for mount in sorted(base.glob("projects/*/snapshots/*")):
            if os.path.ismount(mount):
                subprocess.run(["umount", "-l", str(mount)], check=False)
        server.stop()
        localpg.stop_servers(base)
        shutil.rmtree(base, ignore_errors=True)


# --- a full disk -----------------------------------------------------------------------------


def mount_small(folder: Path, size: int) -> str | None:
    """Mount a tmpfs of ``size`` bytes (rounded up to pages) on ``folder``; why not, or None."""
    folder.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={max(size, 4096)},mode=0700", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        return (result.stderr or result.stdout).strip() or f"mount exited {result.returncode}"
    return None


def unmount_keeping(folder: Path) -> None:
    """Unmount the tmpfs on ``folder``, keeping what it holds (now on the ordinary disk)."""
    keep = folder.with_name(folder.name + ".kept")
    shutil.copytree(folder, keep, symlinks=True)
    subprocess.run(["umount", str(folder)], check=True)
    shutil.rmtree(folder)
    keep.rename(folder)


def can_mount(base: Path) -> str | None:
    """Why a small tmpfs cannot be mounted here, or None when it can."""
    probe = base / "mount-probe"
    why = mount_small(probe, 8192)
    if why is None:
        subprocess.run(["umount", str(probe)], check=False)
    with contextlib.suppress(OSError):
        probe.rmdir()
    return why
