"""``snapshot cutover``: the runbook's database steps as one command.

preflight -> take SOURCE -> apply to TARGET -> guardrail smoke -> live verify. It stops at the
first step that fails and says what state everything is in and how to go back. Nothing
before the apply's commit changes the target; after it, the pre-apply backup is the way
back (``snapshot rollback TARGET --to <backup>``).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from snapshot import interrupts, preflight, text
from snapshot.apply import ApplyReport, Confirm, check, run_apply
from snapshot.config import Config
from snapshot.db import error_sentence
from snapshot.errors import SnapshotError
from snapshot.preflight import PreflightFailed, PreflightReport
from snapshot.smoke import SmokeReport, smoke
from snapshot.take import describe, take
from snapshot.verify import VerifyReport, verify

log = logging.getLogger(__name__)

STEPS = ("preflight", "take", "apply", "smoke", "verify")
OK, FAILED, SKIPPED = "ok", "failed", "skipped"


@dataclass(frozen=True)
class Step:
    """One line of the cutover's step table."""

    name: str
    status: str
    seconds: float
    detail: str

    def to_json(self) -> dict[str, Any]:
        return {
            "step": self.name,
            "status": self.status,
            "seconds": round(self.seconds, 2),
            "detail": self.detail,
        }


@dataclass
class CutoverReport:
    """Every step, the reports of those that ran, and where things stand."""

    source: str
    target: str
    steps: list[Step] = field(default_factory=list)
    preflight: PreflightReport | None = None
    snapshot: str | None = None
    apply: ApplyReport | None = None
    smoke: SmokeReport | None = None
    verify: VerifyReport | None = None
    state: str = ""
    undo: str | None = None
    failure: str | None = None
    exit_code: int = 0

    @property
    def ok(self) -> bool:
        return self.failure is None

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "target": self.target,
            "ok": self.ok,
            "state": self.state,
            "undo": self.undo,
            "failure": self.failure,
            "snapshot": self.snapshot,
            "steps": [s.to_json() for s in self.steps],
            "preflight": self.preflight.to_json() if self.preflight else None,
            "apply": self.apply.to_json() if self.apply else None,
            "smoke": self.smoke.to_json() if self.smoke else None,
            "verify": self.verify.to_json() if self.verify else None,
        }


class _StepFailed(Exception):
    """A step's own verdict (a report that says no), as opposed to an error raised in it."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@contextlib.contextmanager
def _step(report: CutoverReport, name: str, env: str, detail: Callable[[], str]) -> Iterator[None]:
    """Time one step on ``env`` (the database or databases it reads or writes); record it as
    ok, or as failed with the error's message."""
    log.info("cutover %s -> %s: %s", report.source, report.target, name)
    started = time.monotonic()
    try:
        yield
    except (SnapshotError, _StepFailed, psycopg.Error) as exc:
        message = (
            error_sentence(exc, env, f"running {name}")
            if isinstance(exc, psycopg.Error)
            else str(exc)
        )
        report.steps.append(Step(name, FAILED, time.monotonic() - started, message))
        report.failure = f"{name} failed: {message}"
        report.exit_code = exc.exit_code if isinstance(exc, SnapshotError | _StepFailed) else 1
        raise _Stop from None
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM/SIGHUP (snapshot.interrupts)
        message = interrupts.words(exc)
        report.steps.append(Step(name, FAILED, time.monotonic() - started, message))
        report.failure = f"{name} {message}"
        report.exit_code = interrupts.exit_code(exc)
        raise _Stop from None
    report.steps.append(Step(name, OK, time.monotonic() - started, detail()))


class _Stop(Exception):
    """Ends the cutover at the step that failed."""


def cutover(
    config: Config,
    source_env: str,
    target_env: str,
    *,
    confirm: Confirm | None = None,
    pg_bin: Path | None = None,
    allow_cascades: Collection[str] = (),
    unmasked: bool = False,
    auth_withheld: str = "",
) -> CutoverReport:
    """Run every step in order; the report says how far it got and where things stand.

    ``unmasked`` lets it take a source not marked safe; ``auth_withheld`` says why the
    apply creates no auth users (:mod:`snapshot.direction`).
    """
    report = CutoverReport(source_env, target_env)
    try:
        _run(report, config, confirm, pg_bin, allow_cascades, unmasked, auth_withheld)
    except _Stop:
        done = {s.name for s in report.steps}
        report.steps += [Step(name, SKIPPED, 0.0, "") for name in STEPS if name not in done]
    report.state, report.undo = _where_things_stand(report)
    return report


def _run(
    report: CutoverReport,
    config: Config,
    confirm: Confirm | None,
    pg_bin: Path | None,
    allow_cascades: Collection[str],
    unmasked: bool,
    auth_withheld: str,
) -> None:
    source, target = report.source, report.target
    either = f"{source} or {target}"

    with _step(report, "preflight", either, lambda: _preflight_detail(report)):
        live = describe(config, source, pg_bin=pg_bin)
        report.preflight = check(
            config,
            target,
            live,
            pg_bin=pg_bin,
            allow_cascades=allow_cascades,
            auth_withheld=auth_withheld,
        )
        if not report.preflight.ok:
            raise _StepFailed(_preflight_errors(report.preflight), report.preflight.exit_code)

    with _step(report, "take", source, lambda: f"{report.snapshot}"):
        snapshot = take(
            config, source, label="cutover", pg_bin=pg_bin, unmasked=unmasked, whole=True
        )
        report.snapshot = snapshot.id

    with _step(report, "apply", target, lambda: _apply_detail(report)):
        try:
            report.apply = run_apply(
                config,
                target,
                snapshot,
                confirm=confirm,
                pg_bin=pg_bin,
                allow_cascades=allow_cascades,
                auth_withheld=auth_withheld,
            )
        except PreflightFailed as exc:
            report.preflight = exc.report
            raise _StepFailed(_preflight_errors(exc.report), exc.report.exit_code) from None
        if not report.apply.committed:
            bad = ", ".join(str(t.table) for t in report.apply.tables if not t.match)
            raise _StepFailed(f"parity check failed for {bad or 'auth.users'}: rolled back")

    with _step(report, "smoke", target, lambda: _smoke_detail(report)):
        report.smoke = smoke(config, target)
        if not report.smoke.ok:
            raise _StepFailed(_smoke_detail(report))

    with _step(report, "verify", either, lambda: _verify_detail(report)):
        report.verify = verify(config, source, target)
        if not report.verify.matches:
            raise _StepFailed(_verify_detail(report))


def _preflight_detail(report: CutoverReport) -> str:
    assert report.preflight is not None
    warnings = sum(f.status == preflight.WARNING for f in report.preflight.findings)
    checks = text.count(len(report.preflight.findings), "check")
    return f"{checks}, no errors, {text.count(warnings, 'warning')}"


def _preflight_errors(checks: PreflightReport) -> str:
    names = list(dict.fromkeys(f.check for f in checks.errors))
    count = len(checks.errors)
    # The first error itself too: with -q or --json there is no table to look at.
    first = checks.errors[0].detail
    return (
        f"{count} error{'s' if count > 1 else ''} ({', '.join(names)}): see the table below; "
        f"the first: {first}"
    )


def _apply_detail(report: CutoverReport) -> str:
    assert report.apply is not None
    tables = report.apply.tables
    rows = sum(t.target_rows for t in tables)
    return f"{sum(t.match for t in tables)}/{len(tables)} tables match, {rows:,} rows; committed"


def _smoke_detail(report: CutoverReport) -> str:
    assert report.smoke is not None
    if report.smoke.broken:
        return f"guardrails that do not hold: {', '.join(report.smoke.broken)}"
    return report.smoke.summary


def _verify_detail(report: CutoverReport) -> str:
    assert report.verify is not None
    v = report.verify
    bad = [str(t.table) for t in v.tables if not t.match]
    if v.auth_users_missing:
        bad.append(f"auth.users ({v.auth_users_missing} missing)")
    if bad:
        return f"{report.target} differs from live {report.source} in {', '.join(bad)}"
    return f"{len(v.tables)}/{len(v.tables)} tables match live {report.source}"


def _where_things_stand(report: CutoverReport) -> tuple[str, str | None]:
    """A sentence on the state of both sides, and the command that undoes the cutover."""
    target = report.target
    committed = report.apply is not None and report.apply.committed
    if not committed:
        taken = f"; {report.snapshot} is archived" if report.snapshot else ""
        return f"nothing was changed: {target} is exactly as it was{taken}", None
    backup = report.apply.backup if report.apply else None
    undo: str | None = f"snapshot rollback {target}" + (f" --to {backup}" if backup else "")
    held = f"{target} now holds {report.snapshot} (committed, backup {backup})"
    if backup is None:  # it held those rows already: the apply wrote nothing, kept no backup
        held, undo = f"{target} already held {report.snapshot} (nothing written)", None
    if report.ok:
        return f"{held} and matches live {report.source}", undo
    failed = next(s.name for s in report.steps if s.status == FAILED)
    if failed == "verify":
        why = f"but live {report.source} has changed since the take, or {target} since the apply"
    elif report.smoke is not None and not report.smoke.broken and not report.smoke.tried:
        why = "but no guardrail was tested (every smoke check was skipped)"
    else:
        why = "but its guardrails do not hold"
    return f"{held}, {why}: check, then keep it or roll back", undo
