"""Whether a process still runs, and since when: how a killed run's leftovers are told apart.

The archive's hidden folders and the rehearsal's throwaway servers each name the process
that owns them. A pid alone can be reused by an unrelated process after its owner died, so
the owner's start time (from ``/proc``) is compared as well where it is known.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (one of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def start_ticks(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks since boot (field 22 of /proc/PID/stat); None
    where unknown."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rpartition(")")[2].split()[19])
    return None


def started_at(pid: int) -> float | None:
    """When ``pid`` started, in seconds since the epoch; None where unknown."""
    ticks = start_ticks(pid)
    if ticks is None:
        return None
    try:
        boot = next(
            int(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime ")
        )
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    return boot + ticks / os.sysconf("SC_CLK_TCK")
