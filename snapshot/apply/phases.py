"""The phases of an apply: named (for error messages), timed, shown; and the commit window.

From the commit to the backup's publication, Ctrl-C (and SIGTERM, SIGHUP) waits: the
outcome is then certain (committed with its backup listed, or rolled back), never in
between.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from snapshot import interrupts

log = logging.getLogger(__name__)

Progress = Callable[[str], None]


class Phases:
    """Names the phase running (for error messages) and times each one."""

    def __init__(self, progress: Progress | None = None) -> None:
        self.current = "preparing"
        self.done: list[tuple[str, float]] = []
        self.committed = False
        self._progress = progress
        self._held: list[int] = []
        self._previous: dict[int, Any] = {}

    def hold_interrupts(self) -> None:
        """Record SIGINT (and SIGTERM, SIGHUP) instead of acting on it, until
        :meth:`release_interrupts`."""
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, *interrupts.TERMINATING):
                self._previous[signum] = signal.signal(signum, lambda n, _f: self._held.append(n))

    def release_interrupts(self, *, raise_held: bool = True) -> None:
        """Act on a signal held back (as Ctrl-C or :class:`Terminated`), once it is safe to."""
        if not self._previous:
            return
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}
        if self._held and raise_held:
            held = self._held[0]
            raise KeyboardInterrupt if held == signal.SIGINT else interrupts.Terminated(held)

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self.current = name
        started = time.monotonic()
        log.info("%s…", name)
        if self._progress:
            self._progress(name)
        yield
        self.done.append((name, time.monotonic() - started))
