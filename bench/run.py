"""Benchmark snapshot against raw pg_dump/pg_restore, in the same run, on the same data.

    .venv/bin/python bench/run.py [--scale 45] [--dsn postgresql://postgres@127.0.0.1/postgres]

Builds a dev and a diverged prod database from sql/ (scale 45 is about 1.2 million scope
rows, the size of the user's app), then times, with peak memory:

* take:   ``snapshot take dev``      vs ``pg_dump -Fc --data-only`` of the same tables (on
          localhost the median of three of each)
* apply:  ``snapshot apply prod``    vs two raw baselines, each ``TRUNCATE`` then
          ``pg_restore --data-only --single-transaction``:
          - unsafe: ``--disable-triggers`` as a superuser (no foreign-key checks, no
            guardrails, no backup, no parity: what integrity-off tools do);
          - constraints on: as the app owner, with the guardrail triggers dropped first
            (raw pg_restore cannot pass them: it inserts published questions before their
            topic links), so it pays the same foreign-key checks as snapshot;
          snapshot's and the constraints-on restore the median of three runs each, every
          run on a fresh copy of its database; and again with ``--block-readers`` (foreign
          keys checked in bulk) on a copy;
* verify: ``snapshot verify dev prod``
* re-sync: each side changes about 1%; ``apply`` as a delta (the median of three runs,
  each on a fresh copy of the same prod), ``--full``, and ``--full --block-readers``,
  while an app writes and reads (longest waits reported)

and prints the ratios. Results also go to bench/results/<time>.json.

    .venv/bin/python bench/run.py --scale 3 --rtt-ms 30 --mbit 100

puts a slow link (bench/link.py: half the round trip each way, a rate per direction) between
every tool and the server, snapshot and the raw tools alike (the app probe stays local: its
waits are the apply's locks), and adds bytes each way and the statements and round trips
each phase of take, the first apply and the re-sync sent through it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from snapshot.config import DEFAULT_TABLES

sys.path.insert(0, str(Path(__file__).resolve().parent))
from link import Link

ROOT = Path(__file__).resolve().parent.parent
SCOPE = list(DEFAULT_TABLES)  # the one scope the tool defaults to


def url(dsn: str, dbname: str, user: str | None = None) -> str:
    params = conninfo_to_dict(dsn)
    params["dbname"] = dbname
    if user:
        params["user"] = user
    return make_conninfo("", **params)


def build(dsn: str, name: str, variant: str, scale: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    with psycopg.connect(url(dsn, name), autocommit=True) as conn:
        for path in sorted((ROOT / "sql" / "schema").glob("*.sql")):
            conn.execute(path.read_text())
        conn.execute(f"SET seed.scale = {scale}")
        conn.execute((ROOT / "sql" / "seed" / "10_generator.sql").read_text())
        conn.execute((ROOT / "sql" / "seed" / f"20_{variant}.sql").read_text())
        conn.execute("VACUUM ANALYZE")


_WRAPPER = (
    "import resource, subprocess, sys\n"
    "code = subprocess.run(sys.argv[1:]).returncode\n"
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)\n"
    "sys.exit(code)\n"
)


TAKE_RUNS = 3
FIRST_RUNS = 3
RESYNC_RUNS = 3


def median_run(runs: list[tuple[float, int]]) -> tuple[float, int]:
    """The run of median time (its peak memory with it)."""
    return sorted(runs)[len(runs) // 2]


def timed(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> tuple[float, int]:
    """Wall seconds, and peak RSS (MiB) of the largest process of the command's tree."""
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", _WRAPPER, *cmd], cwd=cwd, env=env, capture_output=True, text=True
    )
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{result.stderr[-2000:]}")
    return elapsed, int(result.stderr.strip().splitlines()[-1]) // 1024


def raw_restore(
    pg_bin: Path, target: str, dump: Path, setup: list[str], options: list[str]
) -> tuple[float, int]:
    """A raw baseline: ``setup`` statements and TRUNCATE of the scope, then pg_restore."""
    started = time.perf_counter()
    with psycopg.connect(target, autocommit=True) as conn:
        for statement in [*setup, f"TRUNCATE {', '.join(f'public.{t}' for t in SCOPE)}"]:
            conn.execute(statement)
    prepared = time.perf_counter() - started
    seconds, peak = timed(
        [
            str(pg_bin / "pg_restore"),
            "--data-only",
            *options,
            "--single-transaction",
            "--schema=public",
            f"--dbname={target}",
            str(dump),
        ],
        dump.parent,
    )
    return prepared + seconds, peak


# The re-sync: prod already holds dev's data, then each side changes about 1% (issue 9).
RESYNC_DEV = """
UPDATE public.questions SET body = body || ' (edited)' WHERE id % 100 = 7;
UPDATE public.answers SET body = body || ' (edited)' WHERE id % 100 = 7;
INSERT INTO public.question_attempts (user_id, question_id, is_correct)
  SELECT user_id, question_id, NOT is_correct FROM public.question_attempts WHERE id % 100 = 3;
DELETE FROM public.user_question_progress
  WHERE abs(hashtext(user_id::text || question_id)) % 200 = 0;
UPDATE public.user_topic_progress SET mastery = least(mastery + 1, 100)
  WHERE abs(hashtext(user_id::text || topic_id)) % 100 = 0;
"""
RESYNC_PROD = """
INSERT INTO public.question_attempts (user_id, question_id, is_correct)
  SELECT user_id, question_id, is_correct FROM public.question_attempts WHERE id % 100 = 5;
UPDATE public.user_question_progress SET attempts = attempts + 1
  WHERE abs(hashtext(user_id::text || question_id)) % 100 = 1;
"""
RESYNC_MIX = (
    "dev: 1% of questions and answers edited, 1% more question_attempts, 0.5% of "
    "user_question_progress deleted, 1% of user_topic_progress updated; prod: 1% more "
    "question_attempts, 1% of user_question_progress updated"
)


class AppProbe:
    """An app writer (an in-scope insert every 20 ms) and a reader, timing each statement."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.stop = threading.Event()
        self.waits: dict[str, list[float]] = {"writer": [], "reader": []}
        self.errors: list[str] = []
        self.threads = [
            threading.Thread(target=self._run, args=(role,), daemon=True)
            for role in ("writer", "reader")
        ]

    def _run(self, role: str) -> None:
        try:
            with psycopg.connect(self.target, autocommit=True) as conn:
                row = conn.execute(
                    "SELECT user_id, question_id FROM public.question_attempts LIMIT 1"
                ).fetchone()
                top = conn.execute("SELECT max(id) FROM public.questions").fetchone()
                while not self.stop.is_set():
                    started = time.perf_counter()
                    if role == "writer":
                        conn.execute(
                            "INSERT INTO public.question_attempts (user_id, question_id, "
                            "is_correct) VALUES (%s, %s, true)",
                            row,
                        )
                    else:
                        conn.execute(
                            "SELECT count(*) FROM public.questions WHERE id = %s",
                            (random.randint(1, int(top[0] or 1)),),
                        )
                    self.waits[role].append(time.perf_counter() - started)
                    time.sleep(0.02)
        except psycopg.Error as exc:
            self.errors.append(f"{role}: {str(exc).splitlines()[0]}")

    def __enter__(self) -> AppProbe:
        for thread in self.threads:
            thread.start()
        time.sleep(0.2)
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join()

    def longest(self, role: str) -> float:
        return max(self.waits[role], default=0.0)


def probed_apply(
    snapshot: list[str],
    work: Path,
    env: dict[str, str],
    target: str,
    *args: str,
    link: Link | None = None,
) -> dict[str, object]:
    """Time an apply while the app writes and reads; the apply's own wait figure too."""
    with AppProbe(target) as app:
        if link is not None:
            wire = observed([snapshot[0], "-v", "apply", "prod", "--yes", *args], work, env, link)
            seconds, stderr = float(wire["seconds"]), ""  # type: ignore[arg-type]
        else:
            started = time.perf_counter()
            result = subprocess.run(
                [*snapshot[:1], "apply", "prod", "--yes", *args],
                cwd=work,
                env=env,
                capture_output=True,
                text=True,
            )
            seconds, stderr, wire = time.perf_counter() - started, result.stderr, {}
            if result.returncode != 0:
                sys.exit(f"apply {' '.join(args)} failed:\n{result.stderr[-2000:]}")
    if app.errors:
        sys.exit(f"the app failed during the apply: {'; '.join(app.errors)}")
    waited = re.search(r"they waited ([\d.]+) s", stderr)
    lock = wire.get("under_lock")
    return {
        "snapshot_s": seconds,
        "writer_max_wait_s": app.longest("writer"),
        "reader_max_wait_s": app.longest("reader"),
        "locked_s": float(waited.group(1))
        if waited
        else float(lock["seconds"])  # type: ignore[index]
        if isinstance(lock, dict)
        else float("nan"),
        "wire": wire,
    }


def routed(target: str, link: Link | None) -> str:
    """``target`` reached through ``link`` (without TLS: the link reads the protocol)."""
    if link is None:
        return target
    params = conninfo_to_dict(target)
    params.update(host="127.0.0.1", port=str(link.port), sslmode="disable")
    return make_conninfo("", **params)


def observed(
    cmd: list[str], cwd: Path, env: dict[str, str], link: Link | None
) -> dict[str, object]:
    """Run a ``snapshot -v`` command; its seconds, and through a link what each phase sent.

    Phases are the tool's own ``name…`` log lines, timed as they arrive on stderr; every
    statement the link saw between two of them is counted in the first. "under the lock"
    runs from ``locking…`` to the commit.
    """
    if link is not None:
        link.reset()
    lines: list[tuple[float, str]] = []
    started = time.monotonic()
    process = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    assert process.stderr is not None
    for line in process.stderr:
        lines.append((time.monotonic(), line.rstrip("\n")))
    code = process.wait()
    ended = time.monotonic()
    if code != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n" + "\n".join(text for _, text in lines[-30:]))
    result: dict[str, object] = {"seconds": ended - started}
    if link is None:
        return result
    stats = link.stats()
    marks = [(at, text.strip()[:-1]) for at, text in lines if text.endswith("…")]
    locked = next((at for at, name in marks if name == "locking"), None)
    committed = next((at for at, text in lines if "committed:" in text), ended)
    bounds = [(started, "startup"), *marks, (ended, "")]
    phases = []
    for (begin, name), (end, _) in itertools.pairwise(bounds):
        count = sum(begin <= t < end for t in stats.statements)
        turns = sum(begin <= t < end for t in stats.turns)
        if count or turns:
            phases.append(
                {"phase": name, "statements": count, "turns": turns, "seconds": end - begin}
            )
    result.update(
        up_bytes=stats.up,
        down_bytes=stats.down,
        statements=len(stats.statements),
        turns=len(stats.turns),
        phases=phases,
    )
    if locked is not None:
        result["under_lock"] = {
            "statements": sum(locked <= t < committed for t in stats.statements),
            "turns": sum(locked <= t < committed for t in stats.turns),
            "seconds": committed - locked,
        }
    return result


def describe_wire(name: str, figures: dict[str, object]) -> str:
    """One paragraph: bytes, statements, round trips and seconds, per phase."""
    if "statements" not in figures:
        return ""
    text = (
        f"  {name}: {int(figures['up_bytes']) / 1e6:.2f} MB up, "  # type: ignore[call-overload]
        f"{int(figures['down_bytes']) / 1e6:.2f} MB down, "  # type: ignore[call-overload]
        f"{figures['statements']} statements, {figures['turns']} round trips"
    )
    lock = figures.get("under_lock")
    if isinstance(lock, dict):
        text += f"; under the lock {lock['statements']} statements, {lock['turns']} round trips"
    phases = figures.get("phases") or []
    parts = [
        f"{p['phase']} {p['statements']}/{p['turns']}/{p['seconds']:.1f}s"  # type: ignore[index]
        for p in phases  # type: ignore[attr-defined]
    ]
    return text + "\n    per phase (statements/round trips/seconds): " + ", ".join(parts)


def run_sql(target: str, text: str) -> None:
    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute(text)


def rows(dsn: str, name: str) -> int:
    with psycopg.connect(url(dsn, name)) as conn:
        return sum(conn.execute(f"SELECT count(*) FROM public.{t}").fetchone()[0] for t in SCOPE)  # noqa: S608


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", type=int, default=45)
    parser.add_argument("--dsn", default="host=127.0.0.1 port=5432 user=postgres dbname=postgres")
    parser.add_argument("--pg-bin", default="/usr/lib/postgresql/15/bin")
    parser.add_argument(
        "--rtt-ms", type=float, default=0, help="Round trip of a simulated link (0: none)."
    )
    parser.add_argument("--mbit", type=float, default=100, help="The link's rate each way.")
    args = parser.parse_args()
    # snapshot as installed: with its bytecode (pip compiles it; an editable install under
    # PYTHONDONTWRITEBYTECODE would compile every module again at each command).
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "snapshot")], check=True)
    pg_bin = Path(args.pg_bin)
    link = Link(args.rtt_ms, args.mbit).start() if args.rtt_ms > 0 else None
    work = Path(tempfile.mkdtemp(prefix="snapshot-bench-"))
    dev, prod, raw, checked = "bench_dev", "bench_prod", "bench_raw", "bench_checked"
    bulk = "bench_bulk"  # the first apply again, with --block-readers
    diverged = "bench_prod_diverged"  # prod as built, for each run of the first apply
    resync = "bench_prod_resync"
    try:
        print(f"building dev and prod at scale {args.scale}…", file=sys.stderr)
        t = time.perf_counter()
        build(args.dsn, dev, "dev", args.scale)
        build(args.dsn, prod, "prod", args.scale)
        with psycopg.connect(args.dsn, autocommit=True) as conn:
            # checked starts from dev, whose auth.users hold every user the rows point at:
            # raw pg_restore cannot create the missing ones in prod, as snapshot does.
            for copy, template in ((raw, prod), (checked, dev), (bulk, prod), (diverged, prod)):
                conn.execute(f"DROP DATABASE IF EXISTS {copy} WITH (FORCE)")
                conn.execute(f"CREATE DATABASE {copy} TEMPLATE {template}")
        print(f"  built in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        scope_rows = rows(args.dsn, dev)
        (work / ".env.local").write_text(
            f"SUPABASE_DB_URL={routed(url(args.dsn, dev, 'app_owner'), link)}\n"
        )
        (work / ".env.production").write_text(
            f"SUPABASE_DB_URL={routed(url(args.dsn, prod, 'app_owner'), link)}\n"
        )
        env = {**os.environ, "PG_BIN": str(pg_bin)}
        snapshot = [str(Path(sys.executable).parent / "snapshot"), "-q"]
        tables = [f"--table=public.{t}" for t in SCOPE] + [
            "--table=auth.users",
            "--table=auth.identities",
        ]

        raw_dump = [
            str(pg_bin / "pg_dump"),
            "-Fc",
            "--data-only",
            *tables,
            f"--file={work / 'raw.dump'}",
            f"--dbname={routed(url(args.dsn, dev, 'app_owner'), link)}",
        ]
        take_wire = observed([snapshot[0], "-v", "take", "dev"], work, env, link)
        # On localhost a take lasts two seconds, and one timing of each swings by 10%: the
        # median of three, raw and snapshot in turn. Through the link, one of each.
        raw_takes, our_takes = [], []
        for _ in range(1 if link else TAKE_RUNS):
            raw_takes.append(timed(raw_dump, work))
            shutil.rmtree(work / "snapshots" / "dev")
            our_takes.append(timed([*snapshot, "take", "dev"], work, env))
        raw_take, our_take = median_run(raw_takes), median_run(our_takes)
        if link is not None:
            our_take = (float(take_wire["seconds"]), our_take[1])  # type: ignore[arg-type]

        raw_apply = raw_restore(
            pg_bin, routed(url(args.dsn, raw), link), work / "raw.dump", [], ["--disable-triggers"]
        )
        # The first apply and the restore it is set against last 10-20 s each, and one
        # timing of either swung by 10% on a shared machine: three of each, in turn, each on
        # a fresh copy (checked from dev, prod from prod as built), the median runs kept.
        checked_applies, our_applies, apply_wires = [], [], []
        for run in range(FIRST_RUNS):
            if run:
                with psycopg.connect(args.dsn, autocommit=True) as conn:
                    for copy, template in ((checked, dev), (prod, diverged)):
                        conn.execute(f"DROP DATABASE {copy} WITH (FORCE)")
                        conn.execute(f"CREATE DATABASE {copy} TEMPLATE {template}")
            checked_applies.append(
                raw_restore(
                    pg_bin,
                    routed(url(args.dsn, checked, "app_owner"), link),
                    work / "raw.dump",
                    [
                        "DROP TRIGGER questions_publish_guardrail ON public.questions",
                        "DROP TRIGGER question_topics_unlink_guardrail ON public.question_topics",
                    ],
                    [],
                )
            )
            if link is not None:
                wire = observed([snapshot[0], "-v", "apply", "prod", "--yes"], work, env, link)
                apply_wires.append(wire)
                our_applies.append((float(wire["seconds"]), 0))  # type: ignore[arg-type]
            else:
                our_applies.append(timed([*snapshot, "apply", "prod", "--yes"], work, env))
        checked_apply, our_apply = median_run(checked_applies), median_run(our_applies)
        apply_wire = (
            sorted(apply_wires, key=lambda w: float(w["seconds"]))[len(apply_wires) // 2]  # type: ignore[arg-type]
            if apply_wires
            else {}
        )
        production = (work / ".env.production").read_text()
        (work / ".env.production").write_text(
            f"SUPABASE_DB_URL={routed(url(args.dsn, bulk, 'app_owner'), link)}\n"
        )
        bulk_apply = timed([*snapshot, "apply", "prod", "--yes", "--block-readers"], work, env)
        (work / ".env.production").write_text(production)
        our_verify = timed([*snapshot, "verify", "dev", "prod"], work, env)

        # Re-sync: prod holds dev's data now; both sides change about 1%.
        run_sql(url(args.dsn, dev, "app_owner"), RESYNC_DEV)
        run_sql(url(args.dsn, prod, "app_owner"), RESYNC_PROD)
        with psycopg.connect(args.dsn, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {resync} WITH (FORCE)")
            conn.execute(f"CREATE DATABASE {resync} TEMPLATE {prod}")
        resync_take = timed([*snapshot, "take", "dev"], work, env)
        prod_url = url(args.dsn, prod, "app_owner")
        # A re-sync lasts a few seconds, and one timing of it swung by 10-20% on a shared
        # machine: three, each on a fresh copy of the same prod, the median run kept.
        deltas = []
        for run in range(RESYNC_RUNS):
            if run:
                with psycopg.connect(args.dsn, autocommit=True) as conn:
                    conn.execute(f"DROP DATABASE {prod} WITH (FORCE)")
                    conn.execute(f"CREATE DATABASE {prod} TEMPLATE {resync}")
            deltas.append(probed_apply(snapshot, work, env, prod_url, link=link))
        delta = sorted(deltas, key=lambda d: float(d["snapshot_s"]))[len(deltas) // 2]  # type: ignore[arg-type]
        delta["runs_s"] = [d["snapshot_s"] for d in deltas]
        delta["writer_worst_s"] = max(float(d["writer_max_wait_s"]) for d in deltas)  # type: ignore[arg-type]
        with psycopg.connect(args.dsn, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE {prod} WITH (FORCE)")
            conn.execute(f"CREATE DATABASE {prod} TEMPLATE {resync}")
        full = probed_apply(snapshot, work, env, prod_url, "--full")
        with psycopg.connect(args.dsn, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE {prod} WITH (FORCE)")
            conn.execute(f"CREATE DATABASE {prod} TEMPLATE {resync}")
        full_bulk = probed_apply(snapshot, work, env, prod_url, "--full", "--block-readers")
        reference = raw_take[0] + checked_apply[0]
        dump_size = (work / "raw.dump").stat().st_size
        ours = next((work / "snapshots" / "dev").iterdir()) / "data.dump"

        results = {
            "when": datetime.now(UTC).isoformat(timespec="seconds"),
            "scale": args.scale,
            "scope_rows": scope_rows,
            "server": psycopg.connect(args.dsn).info.server_version,
            "link": {"rtt_ms": args.rtt_ms, "mbit": args.mbit} if link else None,
            "wire": {"take": take_wire, "apply": apply_wire, "resync": delta["wire"]},
            "take": {
                "snapshot_s": our_take[0],
                "pg_dump_s": raw_take[0],
                "snapshot_mib": our_take[1],
                "pg_dump_mib": raw_take[1],
                "snapshot_bytes": ours.stat().st_size,
                "pg_dump_bytes": dump_size,
            },
            "apply": {
                "snapshot_s": our_apply[0],
                "raw_s": raw_apply[0],
                "raw_constraints_on_s": checked_apply[0],
                "snapshot_mib": our_apply[1],
                "raw_mib": raw_apply[1],
                "block_readers_s": bulk_apply[0],
                "raw_reference_s": raw_take[0] + checked_apply[0],
                "runs_s": [t for t, _ in our_applies],
                "raw_constraints_on_runs_s": [t for t, _ in checked_applies],
            },
            "verify": {"snapshot_s": our_verify[0]},
            "resync": {
                "mix": RESYNC_MIX,
                "take_s": resync_take[0],
                "raw_reference_s": reference,
                "delta": delta,
                "full": full,
                "full_block_readers": full_bulk,
            },
        }
        out = ROOT / "bench" / "results"
        out.mkdir(exist_ok=True)
        (out / f"{results['when'].replace(':', '')}.json").write_text(json.dumps(results, indent=2))
        take, apply = results["take"], results["apply"]
        where = f"{args.rtt_ms:g} ms, {args.mbit:g} Mbit/s link" if link else "localhost"
        print(f"scope rows: {scope_rows:,} (scale {args.scale}), {where}")
        print(
            f"take:   snapshot {take['snapshot_s']:.1f} s, pg_dump {take['pg_dump_s']:.1f} s "
            f"-> {take['snapshot_s'] / take['pg_dump_s']:.2f}x; peak "
            f"{take['snapshot_mib']} MiB vs {take['pg_dump_mib']} MiB"
        )
        print(
            f"apply:  snapshot {apply['snapshot_s']:.1f} s; truncate+pg_restore unsafe "
            f"{apply['raw_s']:.1f} s -> {apply['snapshot_s'] / apply['raw_s']:.2f}x; "
            f"with constraints on {apply['raw_constraints_on_s']:.1f} s -> "
            f"{apply['snapshot_s'] / apply['raw_constraints_on_s']:.2f}x; peak "
            f"{apply['snapshot_mib']} MiB vs {apply['raw_mib']} MiB"
        )
        reference_first = apply["raw_reference_s"]
        print(
            f"        vs raw reference (pg_dump of prod + restore, constraints on) "
            f"{reference_first:.1f} s -> {apply['snapshot_s'] / reference_first:.2f}x; with "
            f"--block-readers {apply['block_readers_s']:.1f} s -> "
            f"{apply['block_readers_s'] / reference_first:.2f}x"
        )
        print(
            f"        the median of {FIRST_RUNS} runs each: snapshot "
            f"{', '.join(f'{t:.1f}' for t in apply['runs_s'])} s; with constraints on "
            f"{', '.join(f'{t:.1f}' for t in apply['raw_constraints_on_runs_s'])} s"
        )
        print(f"verify: {results['verify']['snapshot_s']:.1f} s (both sides, all 16 tables)")
        print(f"re-sync ({RESYNC_MIX}):")
        variants = (("delta", delta), ("--full", full), ("--full --block-readers", full_bulk))
        for name, figures in variants:
            print(
                f"  apply {name}: {figures['snapshot_s']:.1f} s vs raw reference "
                f"{reference:.1f} s -> {float(figures['snapshot_s']) / reference:.2f}x; app "
                f"writer waited at most {figures['writer_max_wait_s']:.2f} s (apply says "
                f"{figures['locked_s']:.1f} s), reader at most "
                f"{figures['reader_max_wait_s']:.3f} s"
            )
            if "runs_s" in figures:
                runs = ", ".join(f"{float(t):.1f}" for t in figures["runs_s"])  # type: ignore[attr-defined]
                print(
                    f"    the median of {len(figures['runs_s'])} runs ({runs} s); the writer's "  # type: ignore[arg-type]
                    f"longest wait in any of them {figures['writer_worst_s']:.2f} s"
                )
        if link is not None:
            print("through the link:")
            for name, figures in (("take", take_wire), ("first apply", apply_wire)):
                print(describe_wire(name, figures))
            print(describe_wire("re-sync", delta["wire"]))  # type: ignore[arg-type]
    finally:
        if link is not None:
            link.stop()
        with psycopg.connect(args.dsn, autocommit=True) as conn:
            for name in (dev, prod, raw, checked, resync, bulk, diverged):
                conn.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
                )
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
