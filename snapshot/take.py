"""``snapshot take``: a consistent, data-only snapshot of the scope, archived with its manifest.

One REPEATABLE READ transaction exports its snapshot to pg_dump; the manifest is read in
that same transaction while pg_dump runs (:mod:`snapshot.dump`), so it describes exactly
the archived rows. ``take --dry-run`` (:func:`preview`) runs the same plan and transaction,
closes the subset and counts it, and rolls back before any dump.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from snapshot import archive, beside, catalog, masking, subset, text
from snapshot.alongside import Alongside
from snapshot.archive import Snapshot
from snapshot.config import Config
from snapshot.db import connect
from snapshot.dump import LIVE, DumpPlan, dump_in_snapshot, export_snapshot, identity, plan_dump
from snapshot.environments import Connection, resolve_connection
from snapshot.manifest import Manifest, Subset, TableEntry
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


@dataclass(frozen=True)
class TakePreview:
    """What a take of an environment would archive, found by ``take --dry-run``: whether it
    is masked (the key's fingerprint) and, when subsetted, the rows each subsetted table
    would keep of the source's (its ``file`` the one the take would write)."""

    environment: str
    key_fingerprint: str | None  # None: taken as it is
    source_safe: bool
    subset: Subset | None  # None: every row

    def to_json(self) -> dict[str, Any]:
        return {
            "environment": self.environment,
            "dry_run": True,
            "masked": self.key_fingerprint is not None,
            "key_fingerprint": self.key_fingerprint,
            "subset": self.subset.to_json() if self.subset else None,
        }


@dataclass(frozen=True)
class _Recipe:
    """A take's plan, made before its transaction: what to dump, the masks, the subset."""

    dump: DumpPlan
    masks: masking.Masks | None
    cut: subset.SubsetPlan | None


def _plan(
    conn: psycopg.Connection,
    config: Config,
    env_name: str,
    target: Connection,
    key: str | None,
    pg_bin: Path | None,
    whole: bool,
) -> _Recipe:
    """Plan the take (``conn`` in autocommit): the scope checked, the masks resolved (and
    refused while a personal column has no rule), the subset planned and its empty kept
    tables made, before the read-only transaction that may fill but not create them."""
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
    if config.subset.configured and not whole and not target.safe:
        cut = subset.plan_subset(conn, plan.shapes, list(plan.leaves), config.subset, env_name)
        subset.create_kept(conn, cut)
    return _Recipe(plan, masks, cut)


@contextlib.contextmanager
def _take_transaction(conn: psycopg.Connection, recipe: _Recipe) -> Iterator[None]:
    """The take's ``REPEATABLE READ, READ ONLY`` transaction, always rolled back, with the
    masking key set for it."""
    conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
    conn.read_only = True
    with conn.transaction(force_rollback=True):
        if recipe.masks is not None:
            masking.set_key(conn, recipe.masks)
        yield


def _key(config: Config, env_name: str, unmasked: bool) -> str | None:
    env = config.environment(env_name)
    return None if env.safe or unmasked else read_key(config.masking, env_name)


def preview(
    config: Config,
    env_name: str,
    *,
    pg_bin: Path | None,
    unmasked: bool = False,
    whole: bool = False,
) -> TakePreview:
    """``take --dry-run``: the take's own recipe up to the dump, rolled back. Its refusals
    (a missing key, a personal column without a rule, a ``where`` the source refuses) are
    the take's; a subset is closed over foreign keys in the source's read-only snapshot as
    the take closes it, and counted. Nothing is dumped or archived."""
    key = _key(config, env_name, unmasked)
    target = resolve_connection(config.environment(env_name))
    with contextlib.closing(connect(target)) as conn:
        recipe = _plan(conn, config, env_name, target, key, pg_bin, whole)
        found = None
        with _take_transaction(conn, recipe):
            if recipe.cut is not None:
                with Alongside(target, export_snapshot(conn), recipe.cut, None) as alongside:
                    kept = subset.close_over_keys(conn, recipe.cut)
                    total = alongside.source_rows.result()
                kept.update(subset.count_streamed(conn, recipe.cut))
                found = subset.record(recipe.cut, beside.file_name(recipe.masks), kept, total)
    fingerprint = recipe.masks.key_fingerprint if recipe.masks else None
    return TakePreview(env_name, fingerprint, target.safe, found)


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
    key = _key(config, env_name, unmasked)
    target = resolve_connection(config.environment(env_name))
    archive.check_writable(config.archive, env_name)  # refuse an unwritable one before any work
    with contextlib.closing(connect(target)) as conn:
        recipe = _plan(conn, config, env_name, target, key, pg_bin, whole)
        plan, masks, cut = recipe.dump, recipe.masks, recipe.cut
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
        with (
            _take_transaction(conn, recipe),
            archive.pending_snapshot(config.archive, env_name) as folder,
        ):
            snapshot_id = export_snapshot(conn)
            manifest = dump_in_snapshot(
                conn, plan, snapshot_id, folder, kind="take", label=label, masks=masks, subset=cut
            )
            snapshot = archive.publish(archive.seal(folder, manifest), label)
    log.info("archived %s (%s)", snapshot.path, text.count(snapshot.manifest.total_rows, "row"))
    return snapshot
