"""Judging a fault trial: what it left in the target and the archive, and what the user saw.

Everything is read without the tool's own checksums: an md5 over every row's text (like
the tests' ``Database.fingerprint``), the catalog, ``pg_locks``, ``snapshot list --json``
plus each listed file's sha256. The app's own rows are accounted for apart: its attempts
are left out of the fingerprint, and each write the server acknowledged must be where the
outcome says it should be.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from click.testing import CliRunner
from faultlab import COMMIT, WRITER_MARK, AppWriter, Lab, Project, Run
from psycopg import sql
from tabulate import tabulate

from snapshot import archive, catalog
from snapshot.cli import cli
from snapshot.config import DEFAULT_TABLES
from snapshot.errors import ArchiveError
from snapshot.manifest import MANIFEST
from snapshot.names import TableName

SCOPE = tuple(TableName("public", t) for t in DEFAULT_TABLES)
CHECKED = (*(str(t) for t in SCOPE), "auth.users", "auth.identities")
WRITER_TABLE = "public.question_attempts"  # where the app's attempts go (scoped)
HELPER_PREFIX = "snapshot_apply_fk_"

Fingerprint = dict[str, tuple[int, str]]


@dataclass
class Trial:
    """One fault injected, and everything observed about its outcome."""

    fault: str
    number: int
    aimed: str = ""
    hit: str = ""
    landed: bool = True
    state: str = "?"
    saw: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    left: list[str] = field(default_factory=list)  # what the next run settled
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems


# --- what the target and the archive hold --------------------------------------------------


@dataclass(frozen=True)
class TargetState:
    """What the target holds after a trial, read without the tool."""

    fingerprint: Fingerprint
    helper_indexes: tuple[str, ...]
    stray_objects: tuple[str, ...]
    advisory_locks: tuple[str, ...]
    sequences_behind: tuple[str, ...]
    app_rows: frozenset[int]  # n of every public.app_log row
    app_attempts: frozenset[int]  # n of every attempt the app wrote that is still there


def fingerprint(conn: psycopg.Connection) -> Fingerprint:
    """Rows and an md5 over every row's text (sorted), per checked table; the app's own
    attempts left out (accounted for separately)."""
    conn.execute("SET TimeZone = 'UTC'")
    conn.execute("SET extra_float_digits = 1")
    result = {}
    for table in CHECKED:
        where = (
            sql.SQL(" WHERE NOT coalesce(t.client_info ? {}, false)").format(
                sql.Literal(WRITER_MARK)
            )
            if table == WRITER_TABLE
            else sql.SQL("")
        )
        row = conn.execute(
            sql.SQL(
                "SELECT count(*), md5(coalesce(string_agg(t::text, E'\\n' ORDER BY t::text), ''))"
                " FROM {} t{}"
            ).format(TableName.parse(table).ident, where)
        ).fetchone()
        assert row is not None
        result[table] = (int(row[0]), str(row[1]))
    return result


def inspect_target(lab: Lab) -> TargetState:
    with lab.connect() as conn:
        helpers = tuple(
            r[0]
            for r in conn.execute(
                "SELECT relname FROM pg_class WHERE relname LIKE %s",
                (HELPER_PREFIX.replace("_", "\\_") + "%",),
            )
        )
        stray = tuple(
            f"{r[0]}.{r[1]} ({r[2]})"
            for r in conn.execute(
                "SELECT n.nspname, c.relname, c.relkind FROM pg_class c "
                "JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE c.relname LIKE 'snapshot\\_%%' AND c.relpersistence <> 't' "
                "AND c.relname NOT LIKE %s",
                (HELPER_PREFIX.replace("_", "\\_") + "%",),
            )
        )
        locks = tuple(
            f"pid {r[0]} ({r[1]})"
            for r in conn.execute(
                "SELECT l.pid, coalesce(a.application_name, '?') FROM pg_locks l "
                "LEFT JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory' "
                "AND l.database = (SELECT oid FROM pg_database WHERE datname = 'prod')"
            )
        )
        behind = []
        for seq in catalog.owned_sequences(conn, SCOPE):
            row = conn.execute(
                sql.SQL("SELECT max({})::bigint FROM {}").format(
                    sql.Identifier(seq.column), seq.table.ident
                )
            ).fetchone()
            highest = row[0] if row else None
            if highest is not None and seq.next_value <= highest:
                behind.append(f"{seq.sequence} gives {seq.next_value}, data reaches {highest}")
        app_rows = frozenset(int(r[0]) for r in conn.execute("SELECT n FROM public.app_log"))
        attempts = frozenset(
            int(r[0])
            for r in conn.execute(
                "SELECT (client_info ->> %s)::int FROM public.question_attempts "
                "WHERE client_info ? %s",
                (WRITER_MARK, WRITER_MARK),
            )
        )
        prints = fingerprint(conn)
    return TargetState(prints, helpers, stray, locks, tuple(behind), app_rows, attempts)


def listed(project: Project) -> tuple[list[dict[str, Any]], list[str]]:
    """``snapshot list --json``, and what is wrong with what it lists (missing or altered
    files, damaged manifests)."""
    result = CliRunner().invoke(cli, ["--config", str(project.config), "list", "--json"])
    if result.exit_code != 0:
        return [], [f"snapshot list failed: {result.output.strip()[-200:]}"]
    entries = json.loads(result.stdout)
    problems = []
    good = []
    for entry in entries:
        if "damaged" in entry:
            problems.append(f"listed a damaged snapshot {entry['id']}: {entry['damaged']}")
            continue
        try:
            archive.verify_files(archive.read_snapshot(Path(entry["path"])))
        except ArchiveError as exc:
            problems.append(f"listed a half-written snapshot: {exc}")
            continue
        good.append(entry)
    return good, problems


def hidden_folders(folder: Path) -> list[str]:
    """Temporary (``.tmp-*``) folders under an archive folder, sealed ones marked."""
    if not folder.is_dir():
        return []
    found = []
    for path in sorted(folder.glob(".tmp-*")):
        if not (path / MANIFEST).is_file():
            found.append(path.name)
            continue
        try:
            archive.read_snapshot(path)
            found.append(f"{path.name} (sealed)")
        except ArchiveError:
            size = (path / MANIFEST).stat().st_size
            found.append(f"{path.name} (manifest.json of {size} bytes, unreadable)")
    return found


def scope_sums(entry: dict[str, Any], skip: str | None = None) -> dict[str, tuple[int, str]]:
    """A listed snapshot's scoped tables: rows and checksum (``skip``: one left out)."""
    return {
        name: (t["rows"], t["checksum"])
        for name, t in entry["tables"].items()
        if not t["auth"] and name != skip
    }


def created(entry: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(entry["created"])


def utc_now() -> datetime:
    return datetime.now(UTC)


# --- judging --------------------------------------------------------------------------------


def what_user_saw(run: Run) -> str:
    if run.killed:
        return "killed"
    if run.committed:
        return "committed"
    code = run.proc.returncode
    if run.traceback:
        return f"exit {code} with a traceback"
    if code == 0:
        return "exit 0"
    if run.error is None:
        return f"exit {code}, no reason"
    return run.error


def judge_runs(runs: list[Run], state: str, trial: Trial) -> None:
    """A failed run says why (and nothing false); a committed one left the target applied."""
    someone_committed = any(r.committed for r in runs)
    for run in runs:
        trial.saw.append(what_user_saw(run))
        if run.killed:
            continue
        code = run.proc.returncode
        if run.traceback:
            trial.problems.append(f"{' '.join(run.args)} printed a traceback")
        if code != 0 and run.error is None:
            trial.problems.append(f"{' '.join(run.args)} exited {code} without an Error: line")
        if run.committed and state != "applied":
            trial.problems.append(f"{' '.join(run.args)} reported a commit, the target is {state}")
        lied = code != 0 and "unchanged" in (run.error or "") and state == "applied"
        if lied and not someone_committed:
            trial.problems.append(
                f"{' '.join(run.args)} said the target is unchanged, but it was changed"
            )


def judge_app(writer: AppWriter, target: TargetState, state: str, runs: list[Run]) -> list[str]:
    """Every acknowledged write of the app is accounted for."""
    problems = []
    acked = set(writer.acked)
    possible = acked | writer.in_doubt
    lost = acked - target.app_rows
    if lost:
        problems.append(f"app_log lost {len(lost)} acknowledged writes (e.g. n={min(lost)})")
    if target.app_rows - possible:
        problems.append("app_log holds rows the app never wrote")
    if target.app_attempts - possible:
        problems.append("question_attempts holds app rows the app never wrote")
    if target.app_attempts - target.app_rows:
        problems.append("app attempts without their app_log row (one transaction wrote both)")
    started = min(r.t0 for r in runs)
    ended = max(r.t0 + (r.ended or 0) for r in runs)
    if state == "before":
        gone = acked - target.app_attempts
        if gone:
            problems.append(f"{len(gone)} acknowledged app attempts vanished, nothing applied")
    if state == "applied":
        early = {n for n, t in writer.acked.items() if t < started} & target.app_attempts
        late = {n for n, t in writer.acked.items() if t > ended} - target.app_attempts
        if early:
            problems.append(f"{len(early)} app attempts written before the apply survived it")
        if late:
            problems.append(f"{len(late)} app attempts written after the apply are gone")
    if writer.errors.get("UniqueViolation"):
        problems.append("the app hit duplicate keys (a sequence below its data)")
    return problems


def inspect_leftovers(target: TargetState, trial: Trial, *, settled: bool) -> None:
    where = "after the next apply" if settled else "after the fault"
    if target.advisory_locks:
        trial.problems.append(f"advisory lock held {where}: {', '.join(target.advisory_locks)}")
    if target.stray_objects:
        trial.problems.append(f"snapshot objects left {where}: {', '.join(target.stray_objects)}")
    if target.sequences_behind:
        trial.problems.append(f"sequences below the data {where}: {target.sequences_behind}")
    if target.helper_indexes:
        if settled:
            trial.problems.append(f"helper indexes left {where}: {target.helper_indexes}")
        else:
            trial.left.append("helper indexes")


# --- the table ------------------------------------------------------------------------------


def _count(values: list[str]) -> str:
    counted = Counter(values)
    return "; ".join(f"{v} ×{k}" if k > 1 else v for v, k in counted.most_common())


def gist(message: str) -> str:
    """An error line reduced to what tells outcomes apart, for counting: no details in
    parentheses, ids, ports or advice ("lost the connection to prod while …")."""
    text = message.removeprefix("Error: ")
    text = re.sub(r" \([^()]*\)", "", text)
    text = re.sub(r"\b\w+/\d{8}T\d{6}Z\S*", "ID", text)
    text = re.sub(r"@[\w.]+:\d+/", "@…/", text)
    text = re.sub(r" while [a-z -]+", " while …", text)
    parts = [p.strip() for p in re.split(r"[:;] ", text)]
    keep = 2 if len(parts[0]) < 20 and len(parts) > 1 else 1
    cause = " (deadlock detected)" if "deadlock detected" in message else ""
    return ": ".join(parts[:keep]) + cause


def _where(hits: list[str]) -> str:
    """Where the faults landed, in short: the phases hit, counted when there are many."""
    places = {h.split(" (")[0].split(", in ")[0].removeprefix("second started in ") for h in hits}
    if len(places) <= 3:
        return ", ".join(sorted(places))
    return f"{len(places)} phases" + (", commit included" if COMMIT in places else "")


def render(trials: dict[str, list[Trial]], skipped: dict[str, str]) -> str:
    rows = []
    for name, done in trials.items():
        states = Counter(t.state for t in done)
        intact = states["before"] + states["applied"]
        landed = sum(t.landed for t in done)
        hits = _where([t.hit for t in done if t.landed])
        saw = _count([gist(s) for t in done for s in t.saw])
        left = _count([what for t in done for what in t.left]) or "nothing"
        failed = sum(not t.ok for t in done)
        rows.append(
            (
                name,
                f"{len(done)} ({landed} landed)",
                f"{intact}/{len(done)} ({states['before']} before, {states['applied']} applied)",
                saw,
                hits,
                left,
                "ok" if not failed else f"{failed} FAILED",
            )
        )
    for name, why in skipped.items():
        rows.append((name, "0", "-", f"not possible here: {why}", "", "", "skipped"))
    headers = (
        "fault",
        "trials",
        "target intact",
        "what the user saw",
        "landed in",
        "left for the next run",
        "result",
    )
    return tabulate(rows, headers=headers, maxcolwidths=[None, 10, 14, 44, 22, 24, None])
