"""What an apply or rollback tells its user: the plan before, the outcome after."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from snapshot.apply.auth import TriggerWrites
from snapshot.apply.keepers import UndoneWrites
from snapshot.apply.plan import Plan
from snapshot.archive import Snapshot
from snapshot.environments import Connection
from snapshot.parity import TableParity


@dataclass(frozen=True)
class AuthOutcome:
    """What the apply did to auth users: it only ever creates them."""

    snapshot_users: int
    created_users: int
    created_identities: int
    missing_after: int
    trigger_writes: tuple[TriggerWrites, ...] = ()  # what the app's auth triggers wrote

    def to_json(self) -> dict[str, Any]:
        return {
            "snapshot_users": self.snapshot_users,
            "created_users": self.created_users,
            "created_identities": self.created_identities,
            "missing_after": self.missing_after,
            "trigger_writes": [w.to_json() for w in self.trigger_writes],
        }


def describe_snapshot(snapshot: Snapshot) -> dict[str, Any]:
    """Which snapshot: its id, source, label and age, as the plan shows it."""
    m = snapshot.manifest
    created = datetime.fromisoformat(m.created)
    age = datetime.now(UTC) - created
    return {
        "id": snapshot.id,
        "source": m.environment,
        "kind": m.kind,
        "label": m.label,
        "created": m.created,
        "age_seconds": int(age.total_seconds()),
    }


@dataclass(frozen=True)
class ApplyPlan:
    """What an apply is about to do, shown to the user before confirming."""

    action: str
    target: Connection
    snapshot: Snapshot
    plan: Plan
    dry_run: bool
    auth_withheld: str = ""  # why the snapshot's auth users are not created (snapshot.direction)

    def to_json(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "target": self.target.env,
            "snapshot": describe_snapshot(self.snapshot),
            "dry_run": self.dry_run,
            "auth_withheld": self.auth_withheld or None,
            "subset": subset.to_json() if (subset := self.snapshot.manifest.subset) else None,
            **self.plan.to_json(),
        }


Confirm = Callable[[ApplyPlan], bool]


@dataclass(frozen=True)
class ApplyReport:
    """The outcome of an apply or rollback (also of a dry run)."""

    action: str
    target: str
    snapshot: str
    dry_run: bool
    committed: bool
    tables: tuple[TableParity, ...]
    auth: AuthOutcome | None
    backup: str | None
    phases: tuple[tuple[str, float], ...]
    notes: tuple[str, ...] = ()
    plan: Plan | None = None
    trigger_writes: tuple[UndoneWrites, ...] = ()  # what the app's triggers wrote, undone

    @property
    def matches(self) -> bool:
        return all(t.match for t in self.tables) and (
            self.auth is None or self.auth.missing_after == 0
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "target": self.target,
            "snapshot": self.snapshot,
            "dry_run": self.dry_run,
            "committed": self.committed,
            "matches": self.matches,
            "backup": self.backup,
            "tables": [t.to_json() for t in self.tables],
            "changes": [t.to_json() for t in self.plan.tables] if self.plan else [],
            "auth": self.auth.to_json() if self.auth else None,
            "auth_plan": self.plan.auth.to_json() if self.plan and self.plan.auth else None,
            "kept": [k.to_json() for k in self.plan.kept] if self.plan else [],
            "written_since": self.plan.to_json()["written_since"] if self.plan else None,
            "phases": [{"phase": p, "seconds": round(s, 3)} for p, s in self.phases],
            "notes": list(self.notes),
            "trigger_rewrites": [t.to_json() for t in self.trigger_writes],
        }
