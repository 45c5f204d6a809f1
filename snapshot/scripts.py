"""The user's SQL scripts in ``sql/``: found, ordered and run inside apply's transaction."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import psycopg

from snapshot.config import Config
from snapshot.db import APP_SEARCH_PATH, TOOL_SEARCH_PATH, error_message
from snapshot.errors import ConfigError, ScriptFailed
from snapshot.names import TableName
from snapshot.text import display_path

__all__ = ["ScriptFailed", "bundled_sql", "run", "scripts", "scripts_root"]

log = logging.getLogger(__name__)

PHASES = ("pre", "post", "smoke")


def bundled_sql() -> Path:
    """The ``sql/`` folder shipped with snapshot (in the wheel, or beside the package)."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "_sql", package.parent / "sql"):
        if (candidate / "pre").is_dir():
            return candidate
    raise ConfigError("snapshot's bundled sql/ folder is missing: reinstall snapshot")


def scripts_root(config: Config) -> Path:
    """The configured scripts folder; the bundled defaults when ``sql/`` is absent and unset."""
    if config.scripts.is_dir():
        return config.scripts
    if config.scripts_explicit:
        raise ConfigError(
            f"scripts folder {display_path(config.scripts)} does not exist: create it or fix "
            "scripts in snapshot.toml"
        )
    return bundled_sql()


def phase_folder(config: Config, phase: str) -> Path:
    """Where a phase's scripts come from: the user's ``sql/<phase>``, else the bundled one.

    Per phase: a ``sql/`` folder holding only ``smoke/`` keeps the bundled pre and post
    scripts (an empty ``sql/pre`` means "no pre-scripts").
    """
    folder = scripts_root(config) / phase
    return folder if folder.is_dir() else bundled_sql() / phase


def scripts(config: Config, phase: str) -> list[Path]:
    """The ``*.sql`` files of a phase, in name order."""
    folder = phase_folder(config, phase)
    return sorted(folder.glob("*.sql")) if folder.is_dir() else []


# What the bundled pre- and post-scripts act on: the question bank's questions. For a scope
# without it they return at once (each checks for itself, in SQL).
BUNDLED_SUBJECT = TableName("public", "questions")


def describe(config: Config) -> str:
    """Which scripts each phase runs, and from where (for ``check``)."""
    bundled = bundled_sql()
    idle = BUNDLED_SUBJECT not in config.scope.tables
    parts = []
    for phase in PHASES:
        folder = phase_folder(config, phase)
        names = ", ".join(p.name for p in scripts(config, phase)) or "none"
        where = "bundled" if folder.is_relative_to(bundled) else display_path(folder)
        if where == "bundled" and idle and phase != "smoke":
            where += f", nothing to do: {BUNDLED_SUBJECT} is not in the scope"
        parts.append(f"{phase}: {names} ({where})")
    return "; ".join(parts)


def run(conn: psycopg.Connection, files: list[Path], phase: str) -> None:
    """Run each file in the current transaction; a failure names the file."""
    for path in files:
        started = time.monotonic()
        # Scripts see the target's usual search path; the session's pinned one is restored.
        # One simple query, one round trip: the switch, the script, the switch back.
        script = path.read_text(encoding="utf-8")
        query = f"{APP_SEARCH_PATH};\n{script}\n;\n{TOOL_SEARCH_PATH}"
        try:
            cur = conn.execute(query.encode())
        except psycopg.Error as exc:
            raise ScriptFailed(
                f"{phase}-script {display_path(path)} failed: {error_message(exc)}"
            ) from None
        counts = [cur.rowcount]
        while cur.nextset():
            counts.append(cur.rowcount)
        rows = counts[1] if len(counts) > 2 else -1  # the script's first statement's
        affected = f", {rows} rows" if rows >= 0 else ""
        log.info("  %s-script %s%s  %.1f s", phase, path.name, affected, time.monotonic() - started)
