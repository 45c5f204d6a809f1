"""Ctrl-C, SIGTERM and SIGHUP: one way to stop, whatever stopped it.

SIGTERM (``kill``, a CI runner's timeout, systemd) and SIGHUP (a closed terminal) are raised
as :class:`Terminated`, a ``KeyboardInterrupt``, so every cleanup written for Ctrl-C (the
apply's rollback, take's unpublished folder, the rehearsal's servers) runs for them too.
Only the words and the exit code differ: 130 for Ctrl-C, 128 + the signal's number for
the others (143 for SIGTERM), as shells report them.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from types import FrameType

TERMINATING = (signal.SIGTERM, signal.SIGHUP)


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where Ctrl-C would have been."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def words(exc: BaseException) -> str:
    """``interrupted (Ctrl-C)`` or ``terminated (SIGTERM)``: what stopped the command."""
    if isinstance(exc, Terminated):
        return f"terminated ({signal.Signals(exc.signum).name})"
    return "interrupted (Ctrl-C)"


def exit_code(exc: BaseException) -> int:
    """130 for Ctrl-C; 128 + the signal's number for SIGTERM (143) and SIGHUP (129)."""
    return 128 + (exc.signum if isinstance(exc, Terminated) else signal.SIGINT)


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated(signum)


@contextlib.contextmanager
def termination_as_interrupt() -> Iterator[None]:
    """While inside, SIGTERM and SIGHUP raise :class:`Terminated` (main thread only)."""
    if os.name != "posix":
        yield
        return
    try:
        previous = {s: signal.signal(s, _raise_terminated) for s in TERMINATING}
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
