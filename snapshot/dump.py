"""Dumping a database's scope in one exported snapshot, and describing what was dumped.

``take`` archives these dumps and the apply's pre-apply backup is one, so both share this
module: what to dump and with which pg_dump (:class:`DumpPlan`), the exported snapshot
pg_dump reads, and the manifest's row counts, checksums, column fingerprints and sequence
values, read in that same transaction while pg_dump runs, so that the manifest describes
exactly the dumped rows. The preflight and verify use the database identity it records.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from snapshot import archive, beside, catalog, pgtools, text
from snapshot import subset as subsets
from snapshot.alongside import Alongside
from snapshot.catalog import OwnedSequence, ServerInfo, TableShape
from snapshot.checksum import TableStats, table_stats
from snapshot.environments import Connection
from snapshot.errors import ConfigError
from snapshot.manifest import DUMP_FILE, DatabaseIdentity, Manifest, Masking, Subset, TableEntry
from snapshot.masking import MASKED_FILE, Masks
from snapshot.names import AUTH_TABLES, TableName
from snapshot.scope import Scope
from snapshot.subset import SubsetPlan

log = logging.getLogger(__name__)

# The kind of a manifest read from a live database (snapshot.take.describe), never archived.
LIVE = "live"


@dataclass(frozen=True)
class DumpPlan:
    """What to dump from one database, and who it is."""

    target: Connection
    info: ServerInfo
    pg_dump: pgtools.PgTool
    scope: Scope
    shapes: Mapping[TableName, TableShape]
    # Partitioned tables' partitions (catalog.leaf_partitions): what pg_dump is given instead.
    leaves: Mapping[TableName, tuple[TableName, ...]] = field(default_factory=dict)

    @property
    def tables(self) -> tuple[TableName, ...]:
        auth = AUTH_TABLES if self.scope.auth_users else ()
        return (*self.scope.tables, *auth)

    @property
    def dump_tables(self) -> tuple[TableName, ...]:
        """The tables pg_dump reads: a partitioned table's partitions in its place."""
        return tuple(part for t in self.tables for part in self.leaves.get(t, (t,)))


def plan_dump(
    conn: psycopg.Connection, target: Connection, scope: Scope, pg_bin: Path | None
) -> DumpPlan:
    """Check that the scope exists and find a pg_dump new enough for this server."""
    info = catalog.server_info(conn)
    pg_dump = pgtools.find_tool(
        "pg_dump", info.major, pg_bin, f"{target.env} (PostgreSQL {info.version})"
    )
    where = f"{target.env} ({target.describe()})"
    shapes = catalog.require_tables(
        conn, scope.tables, where, scope.fix("fix [scope] tables in snapshot.toml")
    )
    if scope.auth_users:
        missing = [t for t in AUTH_TABLES if t not in catalog.table_shapes(conn, AUTH_TABLES)]
        if missing:
            raise ConfigError(
                f"{where} has no {', '.join(map(str, missing))}: it is not a Supabase "
                f"database; {scope.fix('set auth_users = false in [scope] of snapshot.toml')}"
            )
        shapes.update(catalog.table_shapes(conn, AUTH_TABLES))
    catalog.require_readable(conn, list(shapes), f"cannot read {target.env}")
    leaves = catalog.leaf_partitions(conn, scope.tables)
    return DumpPlan(target, info, pg_dump, scope, shapes, leaves)


def identity(target: Connection, info: ServerInfo) -> DatabaseIdentity:
    """Which database ``target`` is: its address, name and system identifier, as manifests
    record it (and rollback and the preflight compare)."""
    host, port, _ = target.endpoint
    return DatabaseIdentity(host, port, info.dbname, info.system_identifier)


@dataclass(frozen=True)
class DumpState:
    """What a manifest says of the dumped database: per-table stats, sequences, migrations."""

    tables: tuple[TableEntry, ...]
    sequences: tuple[OwnedSequence, ...]
    migrations: tuple[str, ...] | None


def describe_state(
    conn: psycopg.Connection,
    plan: DumpPlan,
    known: Mapping[TableName, TableStats] | None = None,
    beside_dump: bool = False,
    names: catalog.StateNames | None = None,
    state: catalog.State | None = None,
) -> DumpState:
    """Counts and checksums of ``plan``'s tables (or ``known`` ones), in ``conn``'s snapshot.

    ``beside_dump``: pg_dump is reading the same snapshot meanwhile (:func:`_checksums`).
    With ``names`` (found beforehand), sequences and migrations are read in one round trip;
    with ``state``, they were read already.
    """
    known = known or {}
    todo = [t for t in plan.tables if t not in known]
    stats = {**known, **_checksums(conn, plan, todo, beside_dump)}
    entries = []
    for table in plan.tables:
        shape = plan.shapes[table]
        entries.append(
            TableEntry(
                table=table,
                rows=stats[table].rows,
                checksum=stats[table].checksum,
                columns=shape.columns,
                generated=shape.generated,
                auth=table in AUTH_TABLES,
            )
        )
    if state is None and names is not None:
        state = catalog.read_state(conn, names)
    if state is not None:
        return DumpState(tuple(entries), tuple(state.owned), state.migrations)
    return DumpState(
        tuple(entries),
        tuple(catalog.owned_sequences(conn, plan.scope.tables)),
        catalog.migration_versions(conn),
    )


def _checksums(
    conn: psycopg.Connection, plan: DumpPlan, tables: list[TableName], beside_dump: bool
) -> dict[TableName, TableStats]:
    """Count and checksum ``tables``, one after the other (each one's time logged).

    Beside pg_dump (``beside_dump``), with no parallel workers: pg_dump's session, which
    copies one table after the other, is what the take waits for, and the checksums, about
    as much work, finish beside it on one core. Workers would take the cores its session
    and its compression need (a server with two, as small hosted instances have, or
    localhost, where pg_dump runs too): a second checksum session with workers made a
    take 5-10% slower on localhost. Over a network pg_dump's download is longer than all
    of these round trips.
    """
    if beside_dump:
        conn.execute("SET LOCAL max_parallel_workers_per_gather = 0")
    done = {}
    for table in tables:
        started = time.monotonic()
        done[table] = table_stats(conn, table, plan.shapes[table].column_names)
        log.info(
            "  %-34s %10s rows  %8s",
            table,
            f"{done[table].rows:,}",
            text.duration(time.monotonic() - started),
        )
    return done


def build_manifest(
    plan: DumpPlan,
    state: DumpState,
    *,
    kind: str,
    label: str | None,
    applies: str | None = None,
    masks: Masks | None = None,
    subset: Subset | None = None,
) -> Manifest:
    """The manifest of a dump of ``plan`` whose content ``state`` describes (masked by
    ``masks`` and subsetted as ``subset`` says, when given)."""
    masking = None
    if masks is not None:
        masking = Masking(
            masks.rules, masks.key_fingerprint, MASKED_FILE, tuple(map(str, masks.tables))
        )
    return Manifest(
        environment=plan.target.env,
        source_safe=plan.target.safe,
        kind=kind,
        created=archive.utc_now().isoformat(),
        label=label,
        project_ref=plan.target.project_ref,
        server_version=plan.info.version,
        pg_dump_version=plan.pg_dump.version,
        database=identity(plan.target, plan.info),
        scope=plan.scope,
        tables=state.tables,
        sequences=state.sequences,
        applies=applies,
        migrations=state.migrations,
        masking=masking,
        subset=subset,
    )


def start_dump(
    plan: DumpPlan,
    snapshot_id: str,
    folder: Path,
    application: str = pgtools.DUMP_APPLICATION,
    beside: Collection[TableName] = (),
) -> pgtools.Running:
    """pg_dump of ``plan``'s tables into ``folder``, in the exported snapshot ``snapshot_id``
    (without the rows of the tables in ``beside``: masked or subsetted, written apart)."""
    return pgtools.start_dump(
        plan.pg_dump,
        plan.target,
        snapshot_id,
        plan.dump_tables,
        folder / DUMP_FILE,
        application,
        via_partition_root=bool(plan.leaves),
        exclude_data=[p for t in beside for p in plan.leaves.get(t, (t,))],
    )


def dump_in_snapshot(
    conn: psycopg.Connection,
    plan: DumpPlan,
    snapshot_id: str,
    folder: Path,
    *,
    kind: str,
    label: str | None,
    masks: Masks | None = None,
    subset: SubsetPlan | None = None,
) -> Manifest:
    """Dump ``plan`` into ``folder`` under an exported snapshot, and describe it.

    ``conn`` must be inside the transaction that exported ``snapshot_id``; the statistics
    are computed there while pg_dump runs alongside. With ``masks`` (and the key set in
    ``conn``'s transaction), the masked tables' rows are written masked beside the dump;
    with ``subset`` (its kept tables created, :func:`snapshot.subset.create_kept`), the
    subsetted tables' kept rows are (:mod:`snapshot.beside`), a second session in the
    snapshot counting the source's rows and writing part of the blocks
    (:mod:`snapshot.alongside`). Their statistics are those of the written rows.
    """
    started = time.monotonic()
    written = beside.blocks(plan.tables, masks, subset)
    dump = start_dump(plan, snapshot_id, folder, beside=list(written))
    cut = None
    try:
        known = None
        if subset is not None:
            with Alongside(plan.target, snapshot_id, subset, masks) as alongside:
                kept = subsets.close_over_keys(conn, subset)
                total = alongside.source_rows.result()
                alongside.receive_keys(conn)
                known = beside.write_beside(
                    conn, folder, beside.file_name(masks), written, alongside
                )
            # A streamed follower's kept rows are the rows written.
            kept.update((t, known[t].rows) for t, c in subset.tables.items() if c.streamed)
            cut = subsets.record(subset, beside.file_name(masks), kept, total)
            for table in cut.tables:
                log.info(
                    "  %-34s kept %s of %s", table.table, f"{table.kept:,}", f"{table.total:,}"
                )
        elif written:
            known = beside.write_beside(conn, folder, beside.file_name(masks), written)
        state = describe_state(conn, plan, known, beside_dump=True)
    except BaseException:
        dump.kill()
        raise
    dump.wait()
    log.info("  %-34s %24s", "pg_dump done", text.duration(time.monotonic() - started))
    return build_manifest(plan, state, kind=kind, label=label, masks=masks, subset=cut)


def export_snapshot(conn: psycopg.Connection) -> str:
    """Export the current transaction's snapshot for pg_dump --snapshot."""
    row = conn.execute("SELECT pg_export_snapshot()").fetchone()
    assert row is not None
    return str(row[0])
