"""Whether a process runs and since when: what tells a killed run's leftovers from a live one's."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from snapshot import processes


def test_a_reaped_child_is_gone_and_this_process_runs() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert not processes.alive(child.pid)
    assert processes.alive(os.getpid())


def test_a_process_started_now_says_so_and_a_gone_one_says_nothing() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(5)"])
    try:
        started = processes.started_at(child.pid)
        assert started is not None and abs(started - time.time()) < 5
        ours = processes.start_ticks(os.getpid())
        theirs = processes.start_ticks(child.pid)
        assert ours is not None and theirs is not None and theirs >= ours
    finally:
        child.kill()
        child.wait()
    assert processes.start_ticks(child.pid) is None and processes.started_at(child.pid) is None
