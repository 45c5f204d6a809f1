"""Progress of long steps: table N of M, rows done of rows expected, rate and time left.

Each finished table is logged (``log.info``) as one plain line wherever output goes. On a
terminal the line also counts tables and rows and estimates the time left, and a step
that runs longer than :data:`HEARTBEAT` seconds says it is still running, so a person
watching a locked prod never sits in front of a silent screen. Nothing of this goes to
stdout, which carries the reports.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from collections.abc import Iterator

from snapshot import text

log = logging.getLogger(__name__)

HEARTBEAT = 5.0  # seconds of silence before saying a step is still running

_terminal = False


def enable(on_terminal: bool) -> None:
    """Turn the terminal extras on (the CLI: stderr is a terminal and not ``--quiet``)."""
    global _terminal
    _terminal = on_terminal


def _say(line: str) -> None:
    if _terminal:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f} s"
    return f"{seconds // 60:.0f} min {seconds % 60:02.0f} s"


class Meter:
    """Counts the tables and rows of one step (staging, writing) against what is expected."""

    def __init__(self, what: str, tables: int, rows: int) -> None:
        self.what = what
        self.tables = tables
        self.rows = rows
        self.tables_done = 0
        self.rows_done = 0
        self.started = time.monotonic()

    def done(self, verb: str, table: object, rows: int, seconds: float | None) -> None:
        """One table finished ``rows`` rows in ``seconds`` (None: not known, it went in a
        batch): log it, and on a terminal, count."""
        self.tables_done += 1
        self.rows_done += rows
        took = "" if seconds is None else text.duration(seconds)
        line = f"  {verb:<8} {table!s:<30} {rows:>10,} rows  {took:>8}".rstrip()
        if not _terminal:
            log.info(line)
            return
        elapsed = time.monotonic() - self.started
        rate = self.rows_done / elapsed if elapsed > 0 else 0.0
        left = max(self.rows - self.rows_done, 0)
        eta = f", about {_duration(left / rate)} left" if rate > 0 and left >= rate else ""
        _say(
            f"{line}   [{min(self.tables_done, self.tables)}/{self.tables} {self.what}: "
            f"{self.rows_done:,} of {self.rows:,} rows, {rate:,.0f} rows/s{eta}]"
        )


_meter: Meter | None = None


def begin(what: str, tables: int, rows: int) -> Meter:
    """Start counting a step; :func:`table_done` reports against it."""
    global _meter
    _meter = Meter(what, tables, rows)
    return _meter


def table_done(verb: str, table: object, rows: int, seconds: float | None) -> None:
    """Report a finished table to the current meter (a plain log line without one).

    ``seconds`` is None for a statement sent in a batch (its own time is not known)."""
    took = "" if seconds is None else text.duration(seconds)
    if _meter is None:
        log.info("  %-8s %-30s %10s rows  %8s", verb, table, f"{rows:,}", took)
    else:
        _meter.done(verb, table, rows, seconds)


@contextlib.contextmanager
def still_running(label: str) -> Iterator[None]:
    """On a terminal, say ``… still <label> (N s)`` every :data:`HEARTBEAT` seconds."""
    if not _terminal:
        yield
        return
    stop = threading.Event()
    started = time.monotonic()

    def beat() -> None:
        while not stop.wait(HEARTBEAT):
            _say(f"  … still {label} ({_duration(time.monotonic() - started)})")

    thread = threading.Thread(target=beat, name="snapshot-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
