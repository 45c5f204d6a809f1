"""``snapshot prune``: the archive's retention, so it does not only grow.

The newest N snapshots of each environment and kind (takes, pre-apply backups, pre-rollback
backups) are kept and older ones deleted. Whatever N is, the newest pre-apply backup of an
environment stays: it is what ``snapshot rollback`` restores. Damaged snapshots are listed
by ``snapshot list`` and left for a person to look at.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from snapshot import archive
from snapshot.archive import Snapshot
from snapshot.config import Config

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PruneReport:
    """What a prune removed (or, as a dry run, would remove) and what it kept."""

    keep: int
    removed: tuple[Snapshot, ...]
    kept: tuple[Snapshot, ...]
    dry_run: bool

    @property
    def freed(self) -> int:
        return sum(s.manifest.size for s in self.removed)

    def to_json(self) -> dict[str, Any]:
        def entry(s: Snapshot) -> dict[str, Any]:
            m = s.manifest
            return {"id": s.id, "kind": m.kind, "created": m.created, "size": m.size}

        return {
            "keep": self.keep,
            "dry_run": self.dry_run,
            "removed": [entry(s) for s in self.removed],
            "kept": [entry(s) for s in self.kept],
            "freed": self.freed,
        }


def rollback_target(snapshots: list[Snapshot], env: str) -> Snapshot | None:
    """The backup ``snapshot rollback ENV`` would restore: the newest pre-apply one."""
    for snapshot in snapshots:  # newest first
        if snapshot.manifest.environment == env and snapshot.manifest.kind == archive.PRE_APPLY:
            return snapshot
    return None


def plan(snapshots: list[Snapshot], keep: int) -> tuple[list[Snapshot], list[Snapshot]]:
    """Split ``snapshots`` (newest first) into (kept, removed) under ``keep`` per group."""
    groups: dict[tuple[str, str], list[Snapshot]] = defaultdict(list)
    for snapshot in snapshots:
        groups[(snapshot.manifest.environment, snapshot.manifest.kind)].append(snapshot)
    protected = {
        target.path
        for env in {s.manifest.environment for s in snapshots}
        if (target := rollback_target(snapshots, env)) is not None
    }
    kept: list[Snapshot] = []
    removed: list[Snapshot] = []
    for members in groups.values():
        for index, snapshot in enumerate(members):
            (kept if index < keep or snapshot.path in protected else removed).append(snapshot)
    order = {s.path: i for i, s in enumerate(snapshots)}
    return sorted(kept, key=lambda s: order[s.path]), sorted(removed, key=lambda s: order[s.path])


def prune(root: Path, keep: int, env: str | None = None, *, dry_run: bool = False) -> PruneReport:
    """Delete all but the newest ``keep`` snapshots per environment and kind (of ``env``)."""
    if not dry_run:
        archive.sweep_archive(root)
    snapshots = archive.list_snapshots(root, env)
    kept, removed = plan(snapshots, keep)
    if not dry_run:
        for snapshot in removed:
            archive.remove(snapshot)
            log.info("removed %s (%s)", snapshot.id, archive.human_size(snapshot.manifest.size))
    return PruneReport(keep, tuple(removed), tuple(kept), dry_run)


def retain(config: Config, *envs: str) -> list[PruneReport]:
    """``[retention] keep`` applied to ``envs`` after a command archived something (nothing
    when it is not set); what went is logged."""
    keep = config.retention
    if keep is None:
        return []
    reports = []
    for env in envs:
        report = prune(config.archive, keep, env)
        if report.removed:
            log.info(
                "pruned %d old snapshot%s of %s (%s; [retention] keep = %d)",
                len(report.removed),
                "" if len(report.removed) == 1 else "s",
                env,
                archive.human_size(report.freed),
                keep,
            )
        reports.append(report)
    return reports
