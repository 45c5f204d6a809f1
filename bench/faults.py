"""A fault campaign: break snapshot's take, apply and rollback on purpose, and judge what is left.

    .venv/bin/python bench/faults.py [--trials 10] [--scale 1] [--seed 1] [--faults a,b] [--short]
                                     [--upload changed] [--prod near]

On a throwaway server (bench/faultlab.py) holding dev and a diverged prod built from sql/,
each trial resets prod, runs the CLI as a user would and injects one fault:

  kill-apply           SIGKILL of ``snapshot apply`` in a phase of a measured apply (commit too)
  kill-rollback        SIGKILL of ``snapshot rollback`` the same way
  kill-pg-dump-take    SIGKILL of the pg_dump child of ``snapshot take``
  kill-pg-dump-backup  SIGKILL of the pg_dump child writing the pre-apply backup
  terminate-backend    pg_terminate_backend() of the apply's sessions (its own and pg_dump's)
  server-restart       the target's server stopped with ``pg_ctl stop -m immediate``, restarted
  disk-full-take       the archive on a tmpfs too small for the snapshot
  disk-full-backup     the archive on a tmpfs too small for the pre-apply backup
  concurrent-apply     a second ``snapshot apply`` started while one runs
  app-writer           the app writing to a scoped and an unscoped table throughout the apply

Faults are aimed at moments of a clean reference apply, cut into phases at its stderr
lines ending in "…" and at the backup's seal and publication in the archive (the "commit"
phase lies between them). Trial n of a fault aims at a random moment of the n-th phase of
a shuffled order that starts with the riskiest one (the commit; for a second apply, the
first one's writes); pg_dump is killed at a random moment of its measured life; the tmpfs
gets a random size below what the archive needs (the first trial, one page short). The app
(:class:`faultlab.AppWriter`) writes throughout every apply and rollback trial unless
``--no-app``. ``--short`` (CI) runs one trial of each fault.

After each trial the target must be exactly as before or exactly as applied (an md5 over
every row of the 16 tables and auth.users/identities, the app's own rows accounted for
apart: every acknowledged write present in ``public.app_log``, its attempts gone only if
the apply committed after them); a failed run must print an ``Error:`` line and no
traceback, and must not say "unchanged" of a target it changed; no advisory lock, stray
``snapshot_*`` object or sequence below its data; ``snapshot list --json`` lists only
complete snapshots (files checked against their sha256); a committed apply has its
pre-apply backup listed once settled. Then the next apply (or take) must succeed, 16/16,
leaving no helper index and no hidden folder (bench/faultcheck.py judges all this).

Prints a table per fault, then each failed trial with where its fault was aimed and what
it left; everything goes to bench/results/faults-<time>.json too. Exit 1 when any trial
breaks a promise.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import faultcheck
import faultlab
from faultcheck import (
    WRITER_TABLE,
    Trial,
    inspect_leftovers,
    judge_app,
    judge_runs,
    render,
    what_user_saw,
)
from faultlab import COMMIT, AppWriter, Lab, Project, Run, Segment

ROOT = Path(__file__).resolve().parent.parent
SHORT_TRIALS = 1
# The phase the first trial of a fault aims at (the commit unless named here): the one
# --short must not miss. A second apply meets the first best while it writes.
FIRST_AIM = {"concurrent-apply": "inserting and updating"}
PAGE = 4096


@dataclass
class Injected:
    """What an injection did: the runs it started (all ended) and where the fault landed."""

    runs: list[Run]
    aimed: str
    hit: str
    landed: bool
    notes: list[str] = field(default_factory=list)


@dataclass
class References:
    """A clean take, apply and rollback, measured: the states trials are judged against."""

    dev: faultcheck.Fingerprint
    before: faultcheck.Fingerprint
    applied: faultcheck.Fingerprint
    rolled: faultcheck.Fingerprint
    snapshot_sums: dict[str, tuple[int, str]]
    before_sums: dict[str, tuple[int, str]]
    snapshot: Path
    backup: Path
    timelines: dict[str, list[Segment]]
    dump_life: dict[str, float]
    space: dict[str, int]
    base: str = "prod_before"  # the template every trial's prod starts from


@dataclass
class Campaign:
    lab: Lab
    refs: References
    seed: int
    app: bool
    mount_problem: str | None
    _orders: dict[str, list[Segment]] = field(default_factory=dict)

    def rng(self, fault: str, number: int) -> random.Random:
        return random.Random(f"{self.seed}/{fault}/{number}")

    def segment(self, fault: str, action: str, number: int) -> Segment:
        """The phase trial ``number`` aims at: the riskiest first, then the others shuffled."""
        if fault not in self._orders:
            segments = self.refs.timelines[action]
            if fault == "terminate-backend":
                segments = [s for s in segments if s.anchor is not None]  # no session yet
            first = FIRST_AIM.get(fault, COMMIT)
            others = [s for s in segments if s.name != first]
            random.Random(f"{self.seed}/{fault}").shuffle(others)
            self._orders[fault] = [s for s in segments if s.name == first] + others
        order = self._orders[fault]
        return order[number % len(order)]


# --- measuring the reference runs ------------------------------------------------------------


def observe_dump(run: Run) -> float:
    """How long the run's archive-writing pg_dump lived (0 if none was seen)."""
    found = faultlab.wait_dump(run)
    if found is None:
        return 0.0
    pid, _ = found
    began = time.monotonic()
    while faultlab.running(pid):
        time.sleep(0.002)
    return time.monotonic() - began


def needed_space(folder: Path) -> int:
    """Bytes a tmpfs needs to hold a snapshot folder (its files rounded up to pages)."""
    return sum(-(-p.stat().st_size // PAGE) * PAGE for p in folder.iterdir())


def _sums(entry: dict[str, Any]) -> dict[str, tuple[int, str]]:
    return faultcheck.scope_sums(entry, skip=WRITER_TABLE)


# --prod near: prod as dev's snapshot left it, then about 1% changed (a weekly re-sync's
# target; with --upload changed its pre-apply backup is the snapshot's dump plus the
# difference). The app's rows (faultlab.AppWriter) stay valid: no user or question goes.
NEAR = """
SET ROLE app_owner;
UPDATE public.answers SET body = body || ' (prod)' WHERE id % 97 = 0;
UPDATE public.user_question_progress SET attempts = attempts + 1
  WHERE hashtext(user_id::text || question_id::text) % 50 = 0;
DELETE FROM public.question_attempts WHERE id % 101 = 0;
UPDATE public.playlists SET title = title || ' (prod)' WHERE hashtext(id::text) % 13 = 0;
"""


def prepare(lab: Lab, near: bool = False) -> References:
    """Take and apply once without faults, timing each phase (with ``near``, apply again
    onto prod as the first apply left it and then changed about 1%: that one is measured)."""
    project = lab.project("reference")
    take = project.spawn("take", "dev")
    take_life = observe_dump(take)
    _require(take, "take dev")
    entries, problems = faultcheck.listed(project)
    assert entries and not problems, problems
    snapshot = Path(entries[0]["path"])
    with lab.connect("dev") as conn:
        dev = faultcheck.fingerprint(conn)

    base = "prod_before"
    measured = _reference_apply(lab, project, base)
    if near:
        base = "prod_near"
        with lab.connect() as conn:
            conn.execute(NEAR)
        lab.copy_database("prod", base)
        measured = _reference_apply(lab, project, base)
    apply, backup_life, before, applied, entries, backup_entry = measured
    backup = Path(backup_entry["path"])

    # A rollback runs the apply's phases; it restores the scope and keeps the auth users
    # the apply created. (Measured separately, it would cost the setup another apply.)
    timelines = {"apply": apply.timeline(), "rollback": apply.timeline()}
    rolled = {t: (before[t] if t.startswith("public.") else applied[t]) for t in before}
    if applied == before:
        sys.exit("the reference apply changed nothing: the datasets do not differ")
    snapshot_entry = next(e for e in entries if e["kind"] == "take")
    return References(
        dev=dev,
        before=before,
        applied=applied,
        rolled=rolled,
        snapshot_sums=_sums(snapshot_entry),
        before_sums=_sums(backup_entry),
        snapshot=snapshot,
        backup=backup,
        timelines=timelines,
        dump_life={"take": take_life, "backup": backup_life},
        space={"take": needed_space(snapshot), "backup": needed_space(backup)},
        base=base,
    )


def _reference_apply(
    lab: Lab, project: Project, base: str
) -> tuple[
    Run, float, faultcheck.Fingerprint, faultcheck.Fingerprint, list[dict[str, Any]], dict[str, Any]
]:
    """One clean ``apply prod`` from the template ``base``, measured: the run, its backup's
    pg_dump life, prod before and after, the archive's entries and the backup's own; prod
    as it left it becomes the ``prod_applied`` template."""
    lab.reset_prod(base)
    with lab.connect() as conn:
        before = faultcheck.fingerprint(conn)
    started = faultcheck.utc_now()
    apply = project.spawn("apply", "prod", "--yes")
    backup_life = observe_dump(apply)
    _require(apply, f"apply prod (from {base})")
    with lab.connect() as conn:
        applied = faultcheck.fingerprint(conn)
    entries, _ = faultcheck.listed(project)
    backup_entry = next(
        e for e in entries if e["kind"] == "pre-apply" and faultcheck.created(e) >= started
    )
    lab.wait_quiet()
    lab.copy_database("prod", "prod_applied")
    return apply, backup_life, before, applied, entries, backup_entry


def _require(run: Run, what: str) -> None:
    code = run.wait()
    if code != 0:
        tail = "\n".join(line for _, line in run.lines[-15:])
        sys.exit(f"the reference {what} failed (exit {code}); no fault injected yet:\n{tail}")


# --- injections --------------------------------------------------------------------------------


def _aim(c: Campaign, fault: str, action: str, number: int, run: Run) -> tuple[float | None, str]:
    """Wait for the aimed moment of ``run``; its offset (None: the run ended first), and where."""
    segment = c.segment(fault, action, number)
    offset = c.rng(fault, number).uniform(0, segment.duration)
    aimed = f"{segment.name} +{offset:.2f}s"
    at = 0.0 if segment.anchor is None else run.wait_line(segment.anchor)
    if at is None:
        return None, aimed
    run.sleep_until(at + offset)
    return time.monotonic() - run.t0, aimed


def _command(action: str) -> tuple[str, ...]:
    return (action, "prod", "--yes")


def kill_snapshot(c: Campaign, fault: str, action: str, project: Project, n: int) -> Injected:
    run = project.spawn(*_command(action))
    moment, aimed = _aim(c, fault, action, n, run)
    landed = moment is not None and run.kill()
    run.wait()
    hit = run.phase(moment) if landed else "missed: the run had ended"
    return Injected([run], aimed, hit, landed)


def terminate_backend(c: Campaign, fault: str, action: str, project: Project, n: int) -> Injected:
    run = project.spawn(*_command(action))
    moment, aimed = _aim(c, fault, action, n, run)
    ended: list[str] = []
    if moment is not None and run.alive:
        with c.lab.connect() as conn:
            ended = [
                str(r[0])
                for r in conn.execute(
                    "SELECT application_name FROM pg_stat_activity WHERE datname = 'prod' "
                    "AND application_name LIKE 'snapshot%%' AND pg_terminate_backend(pid)"
                )
            ]
    run.wait()
    landed = bool(ended)
    hit = f"{run.phase(moment)} ({', '.join(sorted(ended))})" if landed else "missed"
    return Injected([run], aimed, hit, landed)


def server_restart(c: Campaign, fault: str, action: str, project: Project, n: int) -> Injected:
    with c.lab.connect() as conn:
        conn.execute("CHECKPOINT")  # the crash recovery replays this trial's WAL only
    run = project.spawn(*_command(action))
    moment, aimed = _aim(c, fault, action, n, run)
    landed = moment is not None and run.alive
    down = c.rng(fault, n).uniform(0, 1.0)
    c.lab.server.pg_ctl("-m", "immediate", "-w", "stop")
    time.sleep(down)
    c.lab.server.pg_ctl("-l", str(c.lab.server.log_file), "-w", "-t", "60", "start")
    run.wait()
    hit = f"{run.phase(moment)} (down {down:.2f}s)" if landed else "missed: the run had ended"
    return Injected([run], aimed, hit, landed)


def kill_pg_dump(c: Campaign, fault: str, n: int, run: Run, life: float) -> tuple[str, str, bool]:
    """SIGKILL ``run``'s pg_dump at a random moment of its measured ``life``."""
    offset = c.rng(fault, n).uniform(0, 0.9 * life)
    aimed = f"pg_dump +{offset:.2f}s of {life:.2f}s"
    found = faultlab.wait_dump(run)
    if found is None:
        return aimed, "missed: no pg_dump seen", False
    pid, at = found
    run.sleep_until(at + offset)
    phase = run.phase()
    if not faultlab.running(pid):
        return aimed, "missed: pg_dump had finished", False
    os.kill(pid, signal.SIGKILL)
    return aimed, f"pg_dump (apply in {phase})" if phase != "start" else "pg_dump", True


def kill_backup_dump(c: Campaign, fault: str, action: str, project: Project, n: int) -> Injected:
    run = project.spawn(*_command(action))
    aimed, hit, landed = kill_pg_dump(c, fault, n, run, c.refs.dump_life["backup"])
    run.wait()
    return Injected([run], aimed, hit, landed)


def concurrent_apply(c: Campaign, fault: str, action: str, project: Project, n: int) -> Injected:
    first = project.spawn(*_command(action))
    moment, aimed = _aim(c, fault, action, n, first)
    landed = moment is not None and first.alive
    second = project.spawn(*_command(action))
    first.wait()
    second.wait()
    hit = f"second started in {first.phase(moment)}" if landed else "missed: the first had ended"
    return Injected([first, second], aimed, hit, landed)


def app_writer(c: Campaign, fault: str, action: str, project: Project, n: int) -> Injected:
    run = project.spawn(*_command(action))
    run.wait()
    return Injected([run], "throughout", "the whole apply", True)


def disk_full_backup(c: Campaign, fault: str, action: str, project: Project, n: int) -> Injected:
    size = _small_size(c, fault, n, c.refs.space["backup"])
    folder = project.archive("prod")
    why = faultlab.mount_small(folder, size)
    if why is not None:
        raise NotPossible(f"cannot mount a tmpfs: {why}")
    run = project.spawn(*_command(action))
    run.wait()
    faultlab.unmount_keeping(folder)  # what the full disk holds stays, for the next apply
    aimed = f"tmpfs {size // 1024} KiB of {c.refs.space['backup'] // 1024} needed"
    return Injected([run], aimed, f"{_filling(run)}, in {run.phase()}", True)


def _filling(run: Run) -> str:
    """What was being written when the disk filled up, from the error."""
    error = run.error or ""
    if "pg_dump failed" in error:
        return "pg_dump's output"
    named = re.search(r"the snapshot's (.+?) needs", error)
    return f"the {named.group(1)}" if named else "not reached"


def _small_size(c: Campaign, fault: str, n: int, needed: int) -> int:
    """A size below ``needed``: trial 0 one page short, the others spread below it."""
    pages = needed // PAGE
    if n == 0:
        return (pages - 1) * PAGE
    return max(1, int(c.rng(fault, n).uniform(0, pages - 1))) * PAGE


class NotPossible(Exception):
    """The fault cannot be injected on this machine."""


Injection = Callable[[Campaign, str, str, Project, int], Injected]


@dataclass(frozen=True)
class Fault:
    name: str
    action: str  # "apply", "rollback" or "take"
    inject: Injection | None = None


FAULTS = {
    f.name: f
    for f in (
        Fault("kill-apply", "apply", kill_snapshot),
        Fault("kill-rollback", "rollback", kill_snapshot),
        Fault("kill-pg-dump-take", "take"),
        Fault("kill-pg-dump-backup", "apply", kill_backup_dump),
        Fault("terminate-backend", "apply", terminate_backend),
        Fault("server-restart", "apply", server_restart),
        Fault("disk-full-take", "take"),
        Fault("disk-full-backup", "apply", disk_full_backup),
        Fault("concurrent-apply", "apply", concurrent_apply),
        Fault("app-writer", "apply", app_writer),
    )
}


def settle(c: Campaign, project: Project, trial: Trial) -> None:
    """The next apply succeeds, 16/16, and leaves the target and the archive clean."""
    hidden = [h for env in ("dev", "prod") for h in faultcheck.hidden_folders(project.archive(env))]
    nxt = project.run("apply", "prod", "--yes")
    if not nxt.committed or "16/16 tables match" not in nxt.stdout:
        trial.problems.append(f"the next apply failed: {what_user_saw(nxt)}")
    notes = [n for n in nxt.notes if "orphaned users" not in n]
    trial.notes += [f"next apply: {n}" for n in notes]
    recovered = any("recovered" in n for n in notes)
    for folder in hidden:
        if folder.endswith("(sealed)"):
            trial.left.append(
                "sealed backup, published" if recovered else "sealed backup, discarded"
            )
        else:
            trial.left.append("half-written folder")
    left = c.lab.wait_quiet()
    if left:
        trial.problems.append(f"sessions still open 30 s after the next apply: {left}")
    after = faultcheck.inspect_target(c.lab)
    if after.fingerprint != c.refs.applied:
        trial.problems.append("after the next apply the target is not the snapshot")
    inspect_leftovers(after, trial, settled=True)
    _, listing = faultcheck.listed(project)
    trial.problems += listing
    for env in ("dev", "prod"):
        hidden = faultcheck.hidden_folders(project.archive(env))
        if hidden:
            trial.problems.append(f"hidden folders left in {env} after the next run: {hidden}")


def target_trial(c: Campaign, fault: Fault, n: int) -> Trial:
    """An apply or rollback with a fault injected, judged, then settled by the next apply."""
    trial = Trial(fault.name, n)
    lab, refs = c.lab, c.refs
    rollback = fault.action == "rollback"
    lab.reset_prod("prod_applied" if rollback else refs.base)
    project = lab.project(f"{fault.name}-{n}")
    shutil.copytree(refs.snapshot, project.archive("dev") / refs.snapshot.name)
    if rollback:
        shutil.copytree(refs.backup, project.archive("prod") / refs.backup.name)
    pre, goal = (refs.applied, refs.rolled) if rollback else (refs.before, refs.applied)
    pre_sums = refs.snapshot_sums if rollback else refs.before_sums
    writer = None
    if c.app or fault.name == "app-writer":
        writer = AppWriter(lab.server.url("prod"), lab.writer_pairs)
        writer.start()
        time.sleep(0.05)
    started = faultcheck.utc_now()
    assert fault.inject is not None
    try:
        injected = fault.inject(c, fault.name, fault.action, project, n)
    finally:
        if writer is not None:
            writer.stop()
    trial.aimed, trial.hit, trial.landed = injected.aimed, injected.hit, injected.landed
    trial.notes += injected.notes
    left = lab.wait_quiet()
    if left:
        trial.problems.append(f"sessions still open 30 s after the runs ended: {left}")
    target = faultcheck.inspect_target(lab)
    prints = target.fingerprint
    trial.state = "before" if prints == pre else "applied" if prints == goal else "neither"
    if trial.state == "neither":
        differ = [t for t in prints if prints[t] != pre[t] and prints[t] != goal[t]]
        trial.problems.append(f"target neither before nor applied: {', '.join(differ) or '?'}")
    judge_runs(injected.runs, trial.state, trial)
    if writer is not None:
        trial.problems += judge_app(writer, target, trial.state, injected.runs)
        trial.notes += [f"app: {k} ×{v}" for k, v in writer.errors.items()]
    inspect_leftovers(target, trial, settled=False)
    _, listing = faultcheck.listed(project)
    trial.problems += listing

    settling = faultcheck.utc_now()
    settle(c, project, trial)
    entries, _ = faultcheck.listed(project)
    kind = "pre-rollback" if rollback else "pre-apply"
    new = [e for e in entries if e["kind"] == kind and started <= faultcheck.created(e) < settling]
    if trial.state == "applied" and not any(_sums(e) == pre_sums for e in new):
        trial.problems.append(f"committed, but no {kind} backup of the state before is listed")
    if trial.state == "before" and not any(r.committed for r in injected.runs) and new:
        what = "a rollback" if rollback else "an apply"
        trial.problems.append(f"a {kind} backup of {what} that never committed is listed")
    if len(new) > len(injected.runs):
        trial.problems.append(f"{len(new)} {kind} backups listed for {len(injected.runs)} runs")
    return trial


def take_trial(c: Campaign, fault: Fault, n: int) -> Trial:
    """A take with a fault injected; then the next take and the next apply must succeed."""
    trial = Trial(fault.name, n)
    lab, refs = c.lab, c.refs
    lab.reset_prod(refs.base)
    project = lab.project(f"{fault.name}-{n}")
    folder = project.archive("dev")
    disk = fault.name == "disk-full-take"
    if disk:
        size = _small_size(c, fault.name, n, refs.space["take"])
        why = faultlab.mount_small(folder, size)
        if why is not None:
            raise NotPossible(f"cannot mount a tmpfs: {why}")
        trial.aimed = f"tmpfs {size // 1024} KiB of {refs.space['take'] // 1024} needed"
    run = project.spawn("take", "dev")
    if disk:
        run.wait()
        trial.hit = _filling(run)
    else:
        life = refs.dump_life["take"]
        trial.aimed, trial.hit, trial.landed = kill_pg_dump(c, fault.name, n, run, life)
        run.wait()
    trial.left += ["half-written folder" for _ in faultcheck.hidden_folders(folder)]
    if disk:
        faultlab.unmount_keeping(folder)
    entries, listing = faultcheck.listed(project)
    trial.problems += listing
    takes = [e for e in entries if e["kind"] == "take"]
    if run.proc.returncode == 0:
        good = len(takes) == 1 and _sums(takes[0]) == refs.snapshot_sums
        trial.state = "applied" if good else "neither"
    else:
        trial.state = "before" if not takes else "neither"
    if trial.state == "neither":
        trial.problems.append(
            f"take exited {run.proc.returncode} and {len(takes)} snapshots listed"
        )
    judge_runs([run], trial.state, trial)
    with lab.connect("dev") as conn:
        if faultcheck.fingerprint(conn) != refs.dev:
            trial.problems.append("dev changed")
    nxt = project.run("take", "dev")
    if nxt.proc.returncode != 0:
        trial.problems.append(f"the next take failed: {what_user_saw(nxt)}")
    settle(c, project, trial)
    return trial


# --- the campaign ------------------------------------------------------------------------------


def run_trial(c: Campaign, fault: Fault, n: int) -> Trial:
    started = time.monotonic()
    if fault.name.startswith("disk-full") and c.mount_problem:
        raise NotPossible(c.mount_problem)
    trial = take_trial(c, fault, n) if fault.action == "take" else target_trial(c, fault, n)
    trial.seconds = time.monotonic() - started
    return trial


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=10, help="trials per fault (default 10)")
    parser.add_argument("--scale", type=int, default=1, help="dataset scale (27,000 rows each)")
    parser.add_argument("--seed", type=int, default=1, help="seed of every random choice")
    parser.add_argument("--faults", default=",".join(FAULTS), help="comma-separated fault names")
    parser.add_argument("--short", action="store_true", help=f"CI: {SHORT_TRIALS} trial per fault")
    parser.add_argument("--no-app", action="store_true", help="no app writing during the trials")
    parser.add_argument(
        "--prod",
        choices=("diverged", "near"),
        default="diverged",
        help="what prod holds before each trial: the diverged dataset (a first apply), or "
        "dev's snapshot with about 1%% changed (a re-sync)",
    )
    parser.add_argument(
        "--upload",
        choices=("auto", "changed", "all"),
        default="auto",
        help='[apply] upload of the trials ("changed": sparse staging and difference backups, '
        "as over a network)",
    )
    parser.add_argument("--pg-bin", type=Path, help="server binaries (default: newest installed)")
    args = parser.parse_args()
    names = [n.strip() for n in args.faults.split(",") if n.strip()]
    unknown = [n for n in names if n not in FAULTS]
    if unknown:
        parser.error(f"unknown faults {unknown}; known: {', '.join(FAULTS)}")
    trials = SHORT_TRIALS if args.short else args.trials
    bin_dir = args.pg_bin or faultlab.system_bin()
    began = time.monotonic()
    results: dict[str, list[Trial]] = {}
    skipped: dict[str, str] = {}
    with faultlab.open_lab(bin_dir, args.scale, args.upload) as lab:
        print(f"lab ready on port {lab.server.port}; measuring a clean run…", file=sys.stderr)
        refs = prepare(lab, near=args.prod == "near")
        timeline = refs.timelines["apply"]
        phases = ", ".join(f"{s.name} {s.duration:.2f}" for s in timeline)
        print(f"apply {sum(s.duration for s in timeline):.1f}s: {phases}", file=sys.stderr)
        print(
            f"pg_dump {refs.dump_life['take']:.2f}s (take), {refs.dump_life['backup']:.2f}s "
            "(backup)",
            file=sys.stderr,
        )
        linked = (refs.backup / "data.dump").stat().st_ino == (
            refs.snapshot / "data.dump"
        ).stat().st_ino
        kind = "the snapshot's dump plus the difference" if linked else "a pg_dump of prod"
        print(f"the reference apply's backup: {kind}", file=sys.stderr)
        campaign = Campaign(lab, refs, args.seed, not args.no_app, faultlab.can_mount(lab.base))
        for name in names:
            fault = FAULTS[name]
            for n in range(trials):
                try:
                    trial = run_trial(campaign, fault, n)
                except NotPossible as exc:
                    skipped[name] = str(exc)
                    break
                results.setdefault(name, []).append(trial)
                verdict = "ok" if trial.ok else "FAILED: " + "; ".join(trial.problems)
                print(
                    f"{name} {n + 1}/{trials}: {trial.aimed} -> {trial.hit}; "
                    f"{trial.state}; {' / '.join(trial.saw)}; {verdict} ({trial.seconds:.1f}s)",
                    file=sys.stderr,
                )
    elapsed = time.monotonic() - began
    print(render(results, skipped))
    every = [t for done in results.values() for t in done]
    failed = [t for t in every if not t.ok]
    print(
        f"\n{len(every)} trials, {len(failed)} failed; scale {args.scale}, seed {args.seed}, "
        f"{trials} per fault, prod {args.prod}, upload {args.upload}, "
        f"app writing: {'no' if args.no_app else 'yes'}, PostgreSQL from "
        f"{bin_dir}; {elapsed:.0f}s"
    )
    for trial in failed:
        print(f"\n{trial.fault} #{trial.number}: aimed {trial.aimed}, hit {trial.hit}")
        for line in [*trial.problems, *(f"note: {n}" for n in trial.notes)]:
            print(f"  {line}")
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    stamp = faultcheck.utc_now().strftime("%Y%m%dT%H%M%SZ")
    (out / f"faults-{stamp}.json").write_text(
        json.dumps(
            {
                "scale": args.scale,
                "seed": args.seed,
                "trials": trials,
                "app": not args.no_app,
                "upload": args.upload,
                "prod": args.prod,
                "seconds": round(elapsed, 1),
                "skipped": skipped,
                "results": {k: [asdict(t) for t in v] for k, v in results.items()},
            },
            indent=2,
        )
    )
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
