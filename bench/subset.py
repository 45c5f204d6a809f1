"""Benchmark masked and subsetted takes against raw pg_dump, in the same run, on the same data.

    .venv/bin/python bench/subset.py [--scale 20] [--dsn postgresql://postgres@127.0.0.1/postgres]

Builds prod from sql/ (bench/run.py's build), then times, each the best of ``--repeat``:

* raw:        ``pg_dump -Fc --data-only`` of the scope's tables and auth users/identities
* full:       ``snapshot take prod --unmasked --whole`` (every row, as it is)
* masked:     ``snapshot take prod --whole`` (masked by the test suite's rules)
* attempts:   ``snapshot take prod --unmasked``, ``question_attempts`` 10% (the activity)
* users:      ``snapshot take prod --unmasked``, ``auth.users`` 10% (everything follows)
* masked+cut: ``snapshot take prod``, masked and ``auth.users`` 10%

and prints each one's seconds, rows and ratios to raw pg_dump and to the full take. Results
also go to bench/results/subset-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import psycopg
from psycopg import sql

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import ROOT, SCOPE, build, timed, url

KEY = "bench-masking-key-0123456789"
RULES = """
[masking.columns]
"users.email" = "email"
"users.display_name" = "name"
"users.bio" = "text"
"users.avatar_url" = "null"
"""
ATTEMPTS = '[subset.tables]\n"question_attempts" = { percent = 10 }\n'
USERS = '[subset.tables]\n"auth.users" = { percent = 10 }\n'
RUNS = {  # name: (snapshot.toml, take arguments)
    "full": (RULES, ["--unmasked", "--whole"]),
    "masked": (RULES, ["--whole"]),
    "attempts": (RULES + ATTEMPTS, ["--unmasked"]),
    "users": (RULES + USERS, ["--unmasked"]),
    "masked+cut": (RULES + USERS, []),
}


def best(cmd: list[str], cwd: Path, env: dict[str, str], repeat: int, clean: Path) -> float:
    """The fastest of ``repeat`` runs of ``cmd`` (``clean`` removed after each)."""
    seconds = []
    for _ in range(repeat):
        seconds.append(timed(cmd, cwd, env)[0])
        shutil.rmtree(clean, ignore_errors=True)
    return min(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dsn", default="host=127.0.0.1 port=5432 user=postgres dbname=postgres")
    parser.add_argument("--pg-bin", default="/usr/lib/postgresql/15/bin")
    args = parser.parse_args()
    pg_bin = Path(args.pg_bin)
    work = Path(tempfile.mkdtemp(prefix="snapshot-bench-subset-"))
    prod = "bench_subset_prod"
    try:
        print(f"building prod at scale {args.scale}…", file=sys.stderr)
        build(args.dsn, prod, "prod", args.scale)
        target = url(args.dsn, prod, "app_owner")
        (work / ".env.production").write_text(f"SUPABASE_DB_URL={target}\n")
        for phase in ("pre", "post"):
            (work / "sql" / phase).mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PG_BIN": str(pg_bin), "SNAPSHOT_MASK_KEY": KEY}
        snapshot = str(Path(sys.executable).parent / "snapshot")
        tables = [f"--table=public.{t}" for t in SCOPE]
        tables += ["--table=auth.users", "--table=auth.identities"]
        raw_cmd = [str(pg_bin / "pg_dump"), "-Fc", "--data-only", *tables]
        raw_cmd += [f"--file={work / 'raw.dump'}", f"--dbname={target}"]
        results: dict[str, dict[str, float]] = {
            "raw": {"seconds": best(raw_cmd, work, env, args.repeat, work / "none")}
        }
        for name, (config, take_args) in RUNS.items():
            (work / "snapshot.toml").write_text(config)
            cmd = [snapshot, "-q", "take", "prod", "--json", *take_args]
            results[name] = {"seconds": best(cmd, work, env, args.repeat, work / "snapshots")}
            shown = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
            results[name]["rows"] = json.loads(shown.stdout)["rows"]
            shutil.rmtree(work / "snapshots", ignore_errors=True)
        raw, full = results["raw"]["seconds"], results["full"]["seconds"]
        out = ROOT / "bench" / "results"
        out.mkdir(exist_ok=True)
        when = datetime.now(UTC).strftime("%Y-%m-%dT%H%M%SZ")
        record = {"when": when, "scale": args.scale, "repeat": args.repeat, "results": results}
        (out / f"subset-{when}.json").write_text(json.dumps(record, indent=2))
        print(f"scale {args.scale}, best of {args.repeat}")
        print(f"  {'raw pg_dump':<12} {raw:6.2f} s")
        for name in RUNS:
            figures = results[name]
            print(
                f"  {name:<12} {figures['seconds']:6.2f} s  {int(figures['rows']):>10,} rows  "
                f"{figures['seconds'] / raw:4.2f}x raw  {figures['seconds'] / full:4.2f}x full"
            )
    finally:
        with psycopg.connect(args.dsn, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(prod))
            )
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
