"""`snapshot prune` and [retention]: the newest N per environment and kind are kept, never
the backup rollback restores; a dry run deletes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from snapshot import prune
from snapshot.archive import Snapshot
from tests.fix_project import Project, one_error_line, sample_manifest, take


def test_prune_keeps_the_newest_per_environment_and_kind(project: Project, make_db) -> None:
    dev, prod = make_db("empty"), make_db("empty")
    project.point("dev", dev)
    project.point("prod", prod)
    for _ in range(3):
        take(project)
    for n in range(2):
        # prod's app wrote a row the snapshot lacks: each apply writes (deletes it)
        prod.execute("INSERT INTO public.categories (slug, name) VALUES (%s, 'p')", [f"p{n}"])
        applied = project.run("apply", "prod", "--yes")
        assert applied.exit_code == 0, applied.stderr
    take(project, "prod", "--unmasked")
    everything = project.snapshots()
    newest_backup = max(p for p in project.snapshots("prod") if p.name.endswith("pre-apply"))

    dry = project.run("prune", "--keep", "1", "--dry-run", "--json")

    assert dry.exit_code == 0, dry.stderr
    report = json.loads(dry.stdout)
    assert sorted(r["kind"] for r in report["removed"]) == ["pre-apply", "take", "take"]
    assert project.snapshots() == everything  # a dry run deletes nothing

    pruned = project.run("prune", "--keep", "1")

    assert pruned.exit_code == 0, pruned.stderr
    assert "removed 3 snapshots" in pruned.stdout
    assert [p.name for p in project.snapshots("dev")] == [everything[2].name]
    assert newest_backup in project.snapshots("prod") and len(project.snapshots("prod")) == 2
    rolled = project.run("rollback", "prod", "--yes")  # the way back is still there
    assert rolled.exit_code == 0, rolled.stderr


def test_retention_setting_prunes_after_each_take(project: Project, make_db) -> None:
    project.point("dev", make_db("empty"))
    project.config("[retention]\nkeep = 2\n")

    for _ in range(4):
        take(project)

    assert len(project.snapshots("dev")) == 2


@pytest.mark.fast
def test_prune_needs_a_number(project: Project) -> None:
    result = project.run("prune")

    assert result.exit_code == 2
    assert "pass --keep N, or set [retention] keep" in one_error_line(result)


# --- what prune plans to remove: no database needed ------------------------------------------


def _archived(*entries: tuple[str, str, str]) -> list[Snapshot]:
    """Snapshots as the archive lists them (newest first), from (environment, kind, folder)."""
    return [
        Snapshot(Path("snapshots", env, name), sample_manifest(env, kind))
        for env, kind, name in entries
    ]


@pytest.mark.fast
def test_prune_plans_to_keep_the_newest_of_each_environment_and_kind() -> None:
    snapshots = _archived(
        ("dev", "take", "20261204T000000Z"),
        ("prod", "pre-apply", "20261203T000000Z-pre-apply"),
        ("dev", "take", "20261203T000000Z"),
        ("prod", "take", "20261202T000000Z"),
        ("prod", "pre-apply", "20261202T000000Z-pre-apply"),
        ("dev", "take", "20261201T000000Z"),
    )

    kept, removed = prune.plan(snapshots, keep=2)

    assert [s.id for s in removed] == ["dev/20261201T000000Z"]
    assert kept == snapshots[:5]
    kept, removed = prune.plan(snapshots, keep=1)
    assert [s.id for s in kept] == [
        "dev/20261204T000000Z",
        "prod/20261203T000000Z-pre-apply",
        "prod/20261202T000000Z",
    ]


@pytest.mark.fast
def test_prune_never_plans_away_the_backup_rollback_restores() -> None:
    snapshots = _archived(
        ("prod", "pre-rollback", "20261205T000000Z-pre-rollback"),
        ("prod", "pre-apply", "20261204T000000Z-pre-apply"),
        ("prod", "pre-apply", "20261203T000000Z-pre-apply"),
    )

    kept, removed = prune.plan(snapshots, keep=0)

    assert [s.id for s in kept] == ["prod/20261204T000000Z-pre-apply"]
    assert prune.rollback_target(snapshots, "prod") == kept[0]
    assert len(removed) == 2
