"""The apply's preparation, before any lock: what it will write, worked out and shown.

``check`` and ``apply`` run the same steps (``check`` then stops):

1. the pre-apply backup's snapshot is exported by a session of its own (:mod:`.backup`),
   unless this is a dry run or a check;
2. the target's rows are recorded in that snapshot: key, row version and hash of every
   row (:func:`.plan.record`); a table whose record adds up to the manifest already holds
   the snapshot's rows and is staged from the target itself;
3. the other tables are staged from the archive into temporary tables
   (:mod:`snapshot.staging`), withheld auth users never even loaded;
4. the backup's pg_dump starts in the exported snapshot, in the background;
5. both sides are compared row by row and each table's mode decided (:func:`.plan.prepare`).

Afterwards :mod:`.staged_checks` judges what the plan found.
"""

from __future__ import annotations

from snapshot import staging
from snapshot.apply import backup
from snapshot.apply import plan as planning
from snapshot.apply.plan import Plan
from snapshot.apply.state import ApplyRun


def prepare(run: ApplyRun) -> Plan:
    """Start the backup, record the target, stage the snapshot and plan (see the module)."""
    assert run.pg_restore is not None, "the preflight found a pg_restore"
    if run.backup_into is not None:
        # The plan records the target in the snapshot pg_dump then backs up while the
        # staged rows are compared; the apply copies what changed since under its lock.
        run.backup = backup.start(run, run.backup_into)
    matched = planning.record(run)
    staging.stage(
        run.conn,
        run.pg_restore,
        run.snapshot,
        [*run.entries.values(), *run.auth_entries],
        matched | run.session.withheld_tables,  # withheld auth users are never even loaded
    )
    if run.backup is not None:
        backup.dump(run.backup)
    return planning.prepare(run, matched, full=run.options.full, allowed=run.options.allowed)
