"""`snapshot prune` and [retention]: the newest N per environment and kind are kept, never
the backup rollback restores; a dry run deletes nothing."""

from __future__ import annotations

import json

from tests.fix_project import Project, one_error_line, take


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


def test_prune_needs_a_number(project: Project) -> None:
    result = project.run("prune")

    assert result.exit_code == 2
    assert "pass --keep N, or set [retention] keep" in one_error_line(result)
