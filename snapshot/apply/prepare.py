"""The apply's preparation, before any lock: what it will write, worked out and shown.

``check`` and ``apply`` run the same steps (``check`` then stops):

1. the pre-apply backup's snapshot is exported by a session of its own (:mod:`.backup`),
   unless this is a dry run or a check;
2. the target's rows are recorded in that snapshot: key, row version and hash of every
   row (:func:`.plan.record`); a table whose record adds up to the manifest already holds
   the snapshot's rows and is staged from the target itself;
3. the other tables are staged from the archive into temporary tables
   (:mod:`snapshot.staging`), withheld auth users never even loaded; where the target
   holds a table in part, only the rows that differ go up (:mod:`snapshot.sparse`);
4. the backup: when every table is held already or was staged from what differs, the
   snapshot's dump plus the target's versions of the rows the apply changes; otherwise
   pg_dump in the exported snapshot, in the background (:mod:`.backup`);
5. both sides are compared row by row and each table's mode decided (:func:`.plan.prepare`).

Afterwards :mod:`.staged_checks` judges what the plan found.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from snapshot import catalog, staging, text
from snapshot.apply import backup
from snapshot.apply import plan as planning
from snapshot.apply import rows as rowsets
from snapshot.apply.plan import Plan
from snapshot.apply.state import ApplyRun
from snapshot.checksum import kind_of, table_stats_later
from snapshot.manifest import TableEntry
from snapshot.names import TableName

log = logging.getLogger(__name__)

SENT = "sent only the rows that differ"  # the report's note on sparse staging


def prepare(run: ApplyRun) -> Plan:
    """Start the backup, record the target, stage the snapshot and plan (see the module)."""
    assert run.pg_restore is not None, "the preflight found a pg_restore"
    conn = run.conn
    with conn.pipeline():  # the catalog's answers the preparation needs: one round trip
        # the sequences and migrations, found now, read under the lock in one round trip
        names = catalog.state_names_later(conn, run.order) if run.names is None else None
        keys = planning.row_keys_later(run)
        leaves = (
            catalog.leaf_partitions_later(conn, run.config.scope.tables)
            if run.backup_into is not None
            else None
        )
    if names is not None:
        run.names = names()
    if run.backup_into is not None:
        # The plan records the target in the snapshot pg_dump then backs up while the
        # staged rows are compared; the apply copies what changed since under its lock.
        run.backup = backup.start(run, run.backup_into, leaves() if leaves else None)
        if planning.upload_changed_only(run):
            # Over a network pg_dump starts at once: its catalog questions (a couple of
            # seconds of round trips) go beside the record, its download beside the
            # staging's upload. It is stopped if the difference turns out to be the backup
            # (backup.write_difference), before it has downloaded much.
            backup.dump(run.backup)
    matched = planning.record(run, keys())
    if run.backup is not None and run.sparse:
        # the difference is likely the backup: its whole tables read beside the staging
        backup.read_whole_ahead(run.backup)
    entries = [*run.entries.values(), *run.auth_entries]
    skip = matched | run.session.withheld_tables  # withheld auth users are never even loaded
    staging.stage(run.conn, run.pg_restore, run.snapshot, entries, skip, run.sparse)
    if whole := sorted(t for t, s in run.sparse.items() if s.whole):
        # most of their rows differ: they went up whole and are hashed as a full upload is
        log.info("  %s: most rows differ from the target's, sent whole", ", ".join(map(str, whole)))
        run.sparse = {t: s for t, s in run.sparse.items() if not s.whole}
    hashed = _prove_sparse(run, entries)
    if run.backup is not None:
        if backup.can_write_difference(run, matched):
            backup.write_difference(run, run.backup)
        elif run.backup.dump is None:
            backup.dump(run.backup)
    return planning.prepare(
        run, matched, hashed=hashed, full=run.options.full, allowed=run.options.allowed
    )


def _prove_sparse(run: ApplyRun, entries: Sequence[TableEntry]) -> frozenset[TableName]:
    """Hash the sparsely staged tables and check each against the manifest; stage again in
    full those that do not add up (:mod:`snapshot.sparse`). The scoped tables hashed.

    A scoped table's rows are proven from the record's hashes and the rows that went up
    (:func:`rowsets.hash_sparse`, whose hashes the plan uses); an auth table's staged rows
    are hashed whole (the plan does not compare them), and one staged by key holds the
    target's versions of the logins it has: only its count is the manifest's."""
    if not run.sparse:
        return frozenset()
    assert run.pg_restore is not None, "the preflight found a pg_restore"
    manifest = {entry.table: entry for entry in entries}
    sets = [run.row_sets[table] for table in run.sparse if table in run.row_sets]
    with run.conn.pipeline():  # the hashes made and summed: one round trip
        for rows in sets:
            rowsets.hash_sparse(run.conn, rows, run.sparse[rows.table])
        summed = rowsets.stats_later(run.conn, sets, rowsets.SNAPSHOT)
        others = {
            table: table_stats_later(
                run.conn,
                staging.staging_table(manifest[table]),
                manifest[table].column_names,
                kind=kind_of(manifest[table].checksum),
            )
            for table in run.sparse
            if table not in run.row_sets
        }
    staged = summed()
    staged.update((table, later()) for table, later in others.items())
    wrong = {
        table
        for table, changes in run.sparse.items()
        if (staged[table].rows != manifest[table].rows)
        or (not changes.by_key and staged[table].checksum != manifest[table].checksum)
    }
    uploaded = sum(s.uploaded for s in run.sparse.values())
    # a second preparation (after the question) says it once, with its own numbers
    run.notes = [note for note in run.notes if not note.startswith(SENT)]
    run.notes.append(
        f"{SENT}: {text.count(uploaded, 'row')} of "
        f"{sum(manifest[t].rows for t in run.sparse):,} in "
        f"{text.count(len(run.sparse), 'table')} the target already held in part"
    )
    if wrong:
        log.info(
            "  staging %s again in full: sparse staging did not add up",
            ", ".join(map(str, sorted(wrong))),
        )
        others_staged = {entry.table for entry in entries} - wrong
        staging.stage(run.conn, run.pg_restore, run.snapshot, entries, others_staged)
    run.sparse = {t: s for t, s in run.sparse.items() if t not in wrong}
    return frozenset(t for t in run.sparse if t in run.row_sets)
