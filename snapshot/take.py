"""``snapshot take``: a consistent, data-only snapshot of the scope, archived with its manifest.

One REPEATABLE READ transaction exports its snapshot to pg_dump; the manifest is read in
that same transaction while pg_dump runs (:mod:`snapshot.dump`), so it describes exactly
the archived rows.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import psycopg

from snapshot import archive, catalog, masking, subset, text
from snapshot.archive import Snapshot
from snapshot.config import Config
from snapshot.db import connect
from snapshot.dump import LIVE, dump_in_snapshot, export_snapshot, identity, plan_dump
from snapshot.environments import resolve_connection
from snapshot.manifest import Manifest, TableEntry
from snapshot.masking.rules import read_key
from snapshot.names import AUTH_TABLES

log = logging.getLogger(__name__)


def describe(config: Config, env_name: str, *, pg_bin: Path | None) -> Snapshot:
    """What a take of ``env_name`` would archive, read from its catalog without dumping.

    The manifest has the columns, identity, versions and migrations but no rows, checksums
    or files: enough for the preflight that opens a cutover, before anything is taken.
    """
    target = resolve_connection(config.environment(env_name))
    with contextlib.closing(connect(target)) as conn:
        plan = plan_dump(conn, target, config.scope, pg_bin)
        manifest = Manifest(
            environment=env_name,
            source_safe=target.safe,
            kind=LIVE,
            created=archive.utc_now().isoformat(),
            label=None,
            project_ref=target.project_ref,
            server_version=plan.info.version,
            pg_dump_version=plan.pg_dump.version,
            database=identity(target, plan.info),
            scope=config.scope,
            tables=tuple(
                TableEntry(
                    table=table,
                    rows=0,
                    checksum="",
                    columns=plan.shapes[table].columns,
                    generated=plan.shapes[table].generated,
                    auth=table in AUTH_TABLES,
                )
                for table in plan.tables
            ),
            sequences=(),
            migrations=catalog.migration_versions(conn),
        )
    return Snapshot(Path(LIVE), manifest)


def take(
    config: Config,
    env_name: str,
    *,
    label: str | None,
    pg_bin: Path | None,
    unmasked: bool = False,
    whole: bool = False,
) -> Snapshot:
    """Archive a snapshot of ``env_name``'s scope and return it.

    An environment not marked safe holds real people's data: its snapshot is masked by the
    rules of ``[masking]`` (:mod:`snapshot.masking`) unless ``unmasked``, and with
    ``[subset]`` it holds part of the rows, every foreign key kept (:mod:`snapshot.subset`),
    unless ``whole``.
    """
    label = archive.check_label(label)
    env = config.environment(env_name)
    key = None if env.safe or unmasked else read_key(config.masking, env_name)
    target = resolve_connection(env)
    archive.check_writable(config.archive, env_name)  # refuse an unwritable one before any work
    with contextlib.closing(connect(target)) as conn:
        plan = plan_dump(conn, target, config.scope, pg_bin)
        masks = None
        if key is not None:
            masks = masking.plan_masks(
                conn, plan.shapes, list(plan.leaves), config.masking, key, env_name
            )
        cut = None
        # Only an environment not marked safe (prod) is subsetted: its snapshot goes to dev.
        # A safe one's (dev's) goes to prod, which a subset would strip of every row it
        # leaves out (and the apply refuses it there).
        if config.subset.configured and not whole and not env.safe:
            cut = subset.plan_subset(conn, plan.shapes, list(plan.leaves), config.subset, env_name)
            subset.create_kept(conn, cut)  # before the read-only transaction: it may fill them
        log.info(
            "taking %s: %s%s from %s (PostgreSQL %s, pg_dump %s)%s%s",
            env_name,
            text.count(len(plan.scope.tables), "table"),
            " and auth users/identities" if plan.scope.auth_users else "",
            target.describe(),
            plan.info.version,
            plan.pg_dump.version,
            f", masked (key {masks.key_fingerprint})" if masks else "",
            f", subsetted ({', '.join(f'{t} {r}' for t, r in cut.rules)})" if cut else "",
        )
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        conn.read_only = True
        with (
            conn.transaction(force_rollback=True),
            archive.pending_snapshot(config.archive, env_name) as folder,
        ):
            snapshot_id = export_snapshot(conn)
            if masks is not None:
                masking.set_key(conn, masks)
            manifest = dump_in_snapshot(
                conn, plan, snapshot_id, folder, kind="take", label=label, masks=masks, subset=cut
            )
            snapshot = archive.publish(archive.seal(folder, manifest), label)
    log.info("archived %s (%s)", snapshot.path, text.count(snapshot.manifest.total_rows, "row"))
    return snapshot
