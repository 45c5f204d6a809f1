"""Progress on a terminal: writers told they wait, table N of M, rows, rate and time left;
plain per-table lines elsewhere, and never on stdout."""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys

from tests.fix_apps import apply, setup_pair
from tests.fix_project import Project


def _run_on_terminal(project: Project, *args: str) -> tuple[int, str, str]:
    """Run the CLI with stderr on a terminal; returns (exit code, stdout, terminal text)."""
    main, terminal = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "snapshot", *args],
        cwd=project.path,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=terminal,
        text=True,
    )
    os.close(terminal)
    seen = bytearray()
    while True:
        ready, _, _ = select.select([main], [], [], 120)
        if not ready:
            break
        try:
            chunk = os.read(main, 65536)
        except OSError:  # the terminal closes when the process ends
            break
        if not chunk:
            break
        seen += chunk
    out, _ = process.communicate(timeout=120)
    os.close(main)
    return process.returncode, out, seen.decode("utf-8", "replace").replace("\r\n", "\n")


def test_a_terminal_sees_tables_rows_rate_and_time_left(project: Project, make_db) -> None:
    setup_pair(project, make_db)

    code, out, screen = _run_on_terminal(project, "apply", "prod", "--yes")

    assert code == 0, screen
    assert "prod: writers to the 16 scoped tables wait from now until the commit" in screen
    counters = re.findall(r"\[(\d+)/(\d+) writes: ([\d,]+) of ([\d,]+) rows, [\d,]+ rows/s", screen)
    assert counters, screen
    last_done, total = counters[-1][0], counters[-1][1]
    assert last_done == total  # every statement counted
    assert counters[-1][2] == counters[-1][3]  # every row expected was written
    # 18 tables in the dump (16 scoped, 2 auth); those prod already holds are not staged.
    [held] = re.findall(r"recorded 16 tables \((\d+) already hold the snapshot's rows\)", screen)
    assert re.search(rf"\[\d+/{18 - int(held)} staged: ", screen), screen
    assert "committed: prod's writers go on (they waited" in screen
    assert "writes:" not in out and "staged:" not in out  # progress never on stdout


def test_without_a_terminal_each_table_is_one_plain_line(project: Project, make_db) -> None:
    setup_pair(project, make_db)

    result = apply(project)

    assert result.exit_code == 0, result.output
    assert "writes:" not in result.stderr and "rows/s" not in result.stderr
    assert re.search(
        # no time of its own: the pass's statements go in one round trip
        r"^  inserted public\.answers +[\d,]+ rows$",
        result.stderr,
        re.M,
    )
