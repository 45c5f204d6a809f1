"""``snapshot smoke``: prove the guardrails hold, in a transaction that is always rolled back.

Each ``sql/smoke/*.sql`` file tries something a guardrail must refuse, and names the
refusal in a header line ``-- expect-error: <text of the error message>``. The check holds
when the script fails with that message; a script that succeeds means the guardrail does
not hold. A script may raise ``skip: <reason>`` when the database has nothing to try on.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from snapshot import scripts
from snapshot.config import Config
from snapshot.db import connect
from snapshot.environments import resolve_connection
from snapshot.errors import ConfigError
from snapshot.text import display_path

log = logging.getLogger(__name__)

HOLDS, BROKEN, SKIPPED, FAILED = "holds", "DOES NOT HOLD", "skipped", "error"
EXPECT = "-- expect-error:"


@dataclass(frozen=True)
class SmokeResult:
    """One guardrail check."""

    check: str
    description: str
    status: str
    detail: str

    def to_json(self) -> dict[str, str]:
        return {
            "check": self.check,
            "description": self.description,
            "status": self.status,
            "detail": self.detail,
        }


@dataclass(frozen=True)
class SmokeReport:
    """Every guardrail check against one environment."""

    target: str
    results: tuple[SmokeResult, ...]

    @property
    def broken(self) -> tuple[str, ...]:
        """The checks whose guardrail does not hold (or could not be tried)."""
        return tuple(r.check for r in self.results if r.status not in (HOLDS, SKIPPED))

    @property
    def tried(self) -> int:
        """How many checks were tried (not skipped)."""
        return sum(r.status != SKIPPED for r in self.results)

    @property
    def ok(self) -> bool:
        """Every check tried holds, and at least one was tried: nothing tested is no pass."""
        return not self.broken and self.tried > 0

    @property
    def summary(self) -> str:
        """``2/2 guardrails hold, 1 skipped``: the skipped ones (absent here) apart."""
        held = sum(r.status == HOLDS for r in self.results)
        skipped = sum(r.status == SKIPPED for r in self.results)
        tried = len(self.results) - skipped
        if skipped and not tried:
            which = "its one check" if skipped == 1 else f"all {skipped} checks"
            return f"nothing tested: {which} skipped (what they check is absent in {self.target})"
        return f"{held}/{tried} guardrails hold" + (f", {skipped} skipped" if skipped else "")

    @property
    def failure(self) -> str | None:
        """The error line when the smoke is no pass: guardrails that do not hold, or why
        nothing counts."""
        if self.broken:
            return f"guardrails of {self.target} do not hold: {', '.join(self.broken)}"
        if not self.ok:
            return f"smoke {self.target} is no pass: {self.summary}"
        return None

    def to_json(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "ok": self.ok,
            "summary": self.summary,
            "results": [r.to_json() for r in self.results],
        }


def _header(path: Path) -> tuple[str, str]:
    """(description, expected error text) from a smoke script's comment lines."""
    description, expected = "", ""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith(EXPECT):
            expected = line[len(EXPECT) :].strip()
        elif line.startswith("--") and not description:
            description = line[2:].strip()
        elif line.strip() and not line.startswith("--"):
            break
    if not expected:
        raise ConfigError(
            f"{display_path(path)} has no '{EXPECT} <message>' line: say which error the "
            "guardrail must raise"
        )
    return description, expected


def _try(conn: psycopg.Connection, path: Path, expected: str) -> tuple[str, str]:
    try:
        with conn.transaction() as savepoint:
            scripts.run(conn, [path], "smoke")
            raise psycopg.Rollback(savepoint)  # undo what the script managed to do
    except scripts.ScriptFailed as exc:
        message = str(exc).split(" failed: ", 1)[-1]
        if message.startswith("skip:"):
            return SKIPPED, message[5:].strip()
        if expected in message:
            return HOLDS, f"refused: {message}"
        return FAILED, f"failed for another reason: {message}"
    return BROKEN, f"the script succeeded: nothing refused it (expected '{expected}')"


def smoke(config: Config, target_env: str) -> SmokeReport:
    """Run every smoke check against ``target_env``; nothing is ever committed."""
    files = scripts.scripts(config, "smoke")
    if not files:
        folder = display_path(scripts.phase_folder(config, "smoke"))
        raise ConfigError(f"there are no smoke checks in {folder}: add *.sql files there")
    checks = [(path, *_header(path)) for path in files]
    target = resolve_connection(config.environment(target_env))
    results = []
    with contextlib.closing(connect(target)) as conn, conn.transaction(force_rollback=True):
        for path, description, expected in checks:
            status, detail = _try(conn, path, expected)
            log.info("  %s: %s", path.name, status)
            results.append(SmokeResult(path.stem, description, status, detail))
    return SmokeReport(target_env, tuple(results))
