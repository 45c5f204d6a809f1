"""Turning results into text: tables through tabulate, JSON for CI. Functions return strings.

Each function takes one kind of report, typed. The report types are imported for the type
checker only: this module loads with the CLI, and each command's own modules (the apply
package above all) load only when that command runs.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, cast

from tabulate import tabulate

from snapshot.archive import Damaged, Snapshot, human_size
from snapshot.text import count

if TYPE_CHECKING:
    from snapshot.apply.plan import Plan
    from snapshot.apply.report import ApplyPlan, ApplyReport
    from snapshot.cutover import CutoverReport
    from snapshot.envinfo import EnvReport
    from snapshot.parity import TableParity
    from snapshot.preflight import PreflightReport
    from snapshot.prune import PruneReport
    from snapshot.rehearse import RehearsalReport
    from snapshot.smoke import SmokeReport
    from snapshot.take import TakePreview
    from snapshot.verify import VerifyReport


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A plain-text table."""
    return tabulate(list(rows), headers=list(headers), tablefmt="simple", disable_numparse=True)


def as_json(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=False, default=str)


def short(checksum: str) -> str:
    return checksum[:12]


def snapshot_summary(snapshot: Snapshot) -> dict[str, Any]:
    """The JSON form of a snapshot, as ``take --json`` and ``list --json`` print it."""
    m = snapshot.manifest
    return {
        "id": snapshot.id,
        "path": str(snapshot.path),
        "environment": m.environment,
        "kind": m.kind,
        "created": m.created,
        "label": m.label,
        "project_ref": m.project_ref,
        "server_version": m.server_version,
        "pg_dump_version": m.pg_dump_version,
        "applies": m.applies,
        "tables": {
            str(t.table): {"rows": t.rows, "checksum": t.checksum, "auth": t.auth} for t in m.tables
        },
        "rows": m.total_rows,
        "size": m.size,
        "source_safe": m.source_safe,
        "masking": m.masking.to_json() if m.masking else None,
        "people": people(snapshot),
        "subset": m.subset.to_json() if m.subset else None,
    }


def people(snapshot: Snapshot) -> str:
    """What a snapshot holds of real people: ``masked``, ``unmasked`` (a take of an
    environment not marked safe, as it was), or ``""`` (a safe source, a backup)."""
    m = snapshot.manifest
    if m.masking is not None:
        return "masked"
    return "unmasked" if m.kind == "take" and m.source_safe is False else ""


def subset_share(snapshot: Snapshot) -> str:
    """The share of the subsetted tables' rows a snapshot kept (``12% of rows``); ``""``: whole."""
    subset = snapshot.manifest.subset
    if subset is None:
        return ""
    kept = sum(t.kept for t in subset.tables)
    total = sum(t.total for t in subset.tables)
    return f"{kept * 100 / total:.3g}% of rows" if total else "0 rows"


def take_preview(preview: TakePreview) -> str:
    """``take --dry-run``: per subsetted table the rows the rules keep of the source's."""
    env = preview.environment
    if preview.key_fingerprint is not None:
        people = f"masked (key {preview.key_fingerprint})"
    elif preview.source_safe:
        people = "as it is (marked safe)"
    else:
        people = "unmasked: it holds its people"
    cut = preview.subset
    if cut is None:
        return f"a take of {env} would keep every row, {people}; nothing was taken"
    rows = [
        (
            t.table,
            f"{t.kept:,}",
            f"{t.total:,}",
            f"{t.kept * 100 / t.total:.3g}%" if t.total else "",
        )
        for t in cut.tables
    ]
    kept, total = sum(t.kept for t in cut.tables), sum(t.total for t in cut.tables)
    rows.append(("total (subsetted tables)", f"{kept:,}", f"{total:,}", ""))
    rules = ", ".join(f"{t} {r}" for t, r in cut.rules)
    return (
        table(("table", "kept", "of", "share"), rows)
        + f"\n\na take of {env} would be subsetted ({rules}), {people}; every other table "
        "whole; nothing was taken"
    )


def take_report(snapshot: Snapshot) -> str:
    m = snapshot.manifest
    masked = set(m.masking.tables) if m.masking else set()
    cut = {t.table: t for t in m.subset.tables} if m.subset else {}
    rows = [
        (
            f"{t.table}{' (auth)' if t.auth else ''}"
            + (" (masked)" if str(t.table) in masked else "")
            + (f" (kept of {cut[str(t.table)].total:,})" if str(t.table) in cut else ""),
            f"{t.rows:,}",
            short(t.checksum),
        )
        for t in m.tables
    ]
    rows.append(("total (scope)", f"{m.total_rows:,}", ""))
    text = (
        table(("table", "rows", "checksum"), rows)
        + f"\n\nsnapshot {snapshot.id} ({human_size(m.size)}) in {snapshot.path}"
    )
    if m.masking:
        text += f"\n{m.masking.describe()}"
    elif people(snapshot) == "unmasked":
        text += f"\nunmasked: {m.environment} is not marked safe; this snapshot holds its people"
    if m.subset:
        text += f"\n{m.subset.describe()}"
    return text


def list_report(
    snapshots: Sequence[Snapshot],
    damaged: Sequence[Damaged] = (),
    shared: Sequence[tuple[Sequence[str], str]] = (),
) -> str:
    """``snapshot list``: one row per snapshot, the damaged ones with their reason, then the
    environment names that are one database."""
    rows = [
        (
            s.id,
            s.manifest.environment,
            s.manifest.created[:19].replace("T", " "),
            s.manifest.label or (s.manifest.kind if s.manifest.kind != "take" else ""),
            len(s.manifest.scope_tables),
            f"{s.manifest.total_rows:,}",
            human_size(s.manifest.size),
            people(s),
            subset_share(s),
        )
        for s in snapshots
    ]
    text = table(
        (
            "id",
            "environment",
            "created (UTC)",
            "label",
            "tables",
            "rows",
            "size",
            "people",
            "subset",
        ),
        rows,
    )
    if damaged:
        broken = table(("damaged (never applied)", "reason"), [(d.id, d.reason) for d in damaged])
        text = f"{text}\n\n{broken}" if rows else broken
    lines = [
        f"{', '.join(names[:-1])} and {names[-1]} are one database ({database}): rollback "
        "restores its newest backup, under whichever name"
        for names, database in shared
    ]
    return "\n\n".join([text, "\n".join(lines)]) if lines else text


def list_document(
    snapshots: Sequence[Snapshot],
    damaged: Sequence[Damaged] = (),
    shared: Sequence[tuple[Sequence[str], str]] = (),
) -> list[dict[str, Any]]:
    """``snapshot list --json``: each snapshot with the other names of its database, then
    the damaged ones with their reason."""
    listed = [
        {
            **snapshot_summary(s),
            "same_database_as": [
                name
                for names, _ in shared
                if s.manifest.environment in names
                for name in names
                if name != s.manifest.environment
            ],
        }
        for s in snapshots
    ]
    listed += [{"id": d.id, "path": str(d.path), "damaged": d.reason} for d in damaged]
    return listed


def env_report(report: EnvReport) -> str:
    """``snapshot env`` as aligned key/value lines."""
    route = report.route
    if report.note and report.route != "none":
        route += f" ({report.note})"
    rows = [
        ("environment", report.environment),
        ("env file", report.env_file),
        ("project ref", report.project_ref or "-"),
        ("route", route),
        ("connection", report.connection),
        ("answers", f"yes: {report.server}" if report.answers else f"no: {report.error}"),
    ]
    return tabulate(rows, tablefmt="plain")


def age(seconds: int) -> str:
    """``3 min``, ``2 h``, ``5 days``: how old a snapshot is."""
    for unit, size in (("days", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds // size} {unit}"
    return f"{seconds} s"


def plan_report(proposal: ApplyPlan) -> str:
    """What an apply is about to do: which snapshot, then per table what changes."""
    snap = proposal.to_json()["snapshot"]
    label = f", label {snap['label']}" if snap["label"] and snap["label"] != snap["kind"] else ""
    head = (
        f"{proposal.action} {snap['id']} (taken from {snap['source']} {age(snap['age_seconds'])} "
        f"ago{label}) to {proposal.target.env} ({proposal.target.describe()}):"
    )
    lines = [head, "", plan_table(proposal.plan, proposal.target.env)]
    if proposal.auth_withheld:
        lines.append(f"auth users: {proposal.auth_withheld}")
    if proposal.snapshot.manifest.masking is not None:
        lines.append(proposal.snapshot.manifest.masking.describe())
    if proposal.snapshot.manifest.subset is not None:
        lines.append(proposal.snapshot.manifest.subset.describe())
    return "\n".join(lines)


def confirm_question(proposal: ApplyPlan) -> str:
    """``Type prod to apply dev's snapshot to prod``: what typing the name agrees to; a
    rollback that throws away rows written since its apply names them."""
    target = proposal.target.env
    lost = sum(w.rows for w in proposal.plan.written_since or ())
    throwing = ""
    if lost:
        throwing = f", throwing away the {count(lost, 'row')} written since the apply"
    if proposal.action == "rollback":
        return f"Type {target} to roll {target} back{throwing}"
    source = proposal.snapshot.manifest.environment
    return f"Type {target} to {proposal.action} {source}'s snapshot to {target}{throwing}"


def plan_table(plan: Plan, target: str) -> str:
    """Per table: mode, rows to insert, update, delete and leave alone; then auth users."""
    kept = any(t.kept for t in plan.tables)
    rows = [
        (
            str(t.table),
            t.mode,
            f"{t.inserts:,}",
            f"{t.updates:,}",
            f"{t.deletes:,}",
            f"{t.unchanged:,}",
            *([f"{t.kept:,}"] if kept else []),
            t.reason,
        )
        for t in plan.tables
    ]
    headers = ["table", "mode", "insert", "update", "delete", "unchanged"]
    headers += [*(["kept"] if kept else []), "why in full"]
    text = tabulate(
        rows,
        headers=headers,
        tablefmt="simple",
        disable_numparse=True,
        maxcolwidths=[*([None] * (len(headers) - 1)), 60],
    )
    lines = [text]
    lines += [f"kept: {k.sentence(target)}" for k in plan.kept]
    lines += [
        f"written since the apply, thrown away: {w.sentence()}"
        for w in plan.written_since or ()
        if w.rows
    ]
    if plan.auth is not None:
        lines.append(f"auth users: {plan.auth.create_sentence(target)}")
        scope = tuple(t.table for t in plan.tables)
        lines += [f"auth trigger: {t.sentence(scope)}" for t in plan.auth.triggers]
        if plan.auth.orphaned:
            lines.append(f"warning: {plan.auth.orphaned_sentence(target)}")
    return "\n".join(lines)


def apply_report(report: ApplyReport) -> str:
    """The closing table of apply and rollback: per table what was planned, the rows before
    and after, parity; then auth users, kept rows, the backup and the outcome."""
    changes = {t.table: t for t in report.plan.tables} if report.plan else {}
    rows = []
    for t in report.tables:
        c = changes.get(t.table)
        planned = (
            [c.mode, f"{c.inserts:,}", f"{c.updates:,}", f"{c.deletes:,}", f"{c.unchanged:,}"]
            if c
            else ["-"] * 5
        )
        before = "-" if t.target_rows_before is None else f"{t.target_rows_before:,}"
        rows.append(
            [
                str(t.table),
                *planned,
                f"{t.source_rows:,}",
                before,
                f"{t.target_rows:,}",
                t.status,
                t.detail,
            ]
        )
    headers = [
        "table",
        "mode",
        "insert",
        "update",
        "delete",
        "unchanged",
        "snapshot rows",
        "target before",
        "target after",
        "checksum",
        "detail",
    ]
    lines = [table(headers, rows), ""]
    if report.auth is not None:
        a = report.auth
        lines.append(
            f"auth.users: {a.snapshot_users:,} in the snapshot, {a.created_users:,} created "
            f"({count(a.created_identities, 'identity', 'identities')}), "
            f"{a.missing_after:,} missing"
        )
        lines += [f"auth triggers wrote {w.sentence()}" for w in a.trigger_writes]
    for kept in report.plan.kept if report.plan else ():
        lines.append(f"kept: {kept.sentence(report.target)}")
    for lost in (report.plan.written_since if report.plan else None) or ():
        if lost.rows:
            lines.append(f"written since the apply, thrown away: {lost.sentence()}")
    for undone in report.trigger_writes:
        lines.append(f"triggers: {undone.sentence()}")
    people = report.plan.auth if report.plan else None
    if people is not None and people.orphaned:
        done = report.committed and not report.dry_run
        lines.append(f"note: {people.orphaned_sentence(report.target, done=done)}")
    if report.backup:
        undo = f"snapshot rollback {report.target}"
        if report.action != "apply":
            undo += f" --to {report.backup}"
        lines.append(f"backup: {report.backup} (undo with: {undo})")
    if report.dry_run:
        outcome = "dry run, rolled back: nothing changed"
    elif report.committed:
        outcome = "committed"
    else:
        outcome = "rolled back: nothing changed"
    lines.append(
        f"{report.action} {report.snapshot} to {report.target}: {_matched(report.tables)}; "
        f"{outcome}"
    )
    return "\n".join(lines)


def verify_report(report: VerifyReport) -> str:
    """The table of verify (two live databases, or one and a snapshot), with a summary line."""
    rows = [
        [str(t.table), f"{t.source_rows:,}", f"{t.target_rows:,}", t.status, t.detail]
        for t in report.tables
    ]
    source = "snapshot" if "/" in report.source else report.source  # a snapshot's id
    headers = ["table", f"{source} rows", f"{report.target} rows", "checksum", "detail"]
    lines = [table(headers, rows), ""]
    if report.auth_users_missing is not None:
        lines.append(
            f"auth.users: {report.auth_users_missing:,} {report.source} users missing "
            f"in {report.target}"
        )
    lines.append(f"verify {report.source} {report.target}: {_matched(report.tables)}")
    return "\n".join(lines)


def _matched(tables: Sequence[TableParity]) -> str:
    """``15/16 tables match``, and how many more match but for rows kept for outside ones."""
    matched = sum(t.match and not t.kept for t in tables)
    text = f"{matched}/{len(tables)} tables match"
    kept = [t for t in tables if t.match and t.kept]
    if kept:
        rows = sum(t.kept for t in kept)
        text += (
            f", {len(kept)} more match{'es' if len(kept) == 1 else ''} but for {rows:,} "
            f"row{'' if rows == 1 else 's'} kept for rows outside the scope"
        )
    return text


def preflight_report(report: PreflightReport) -> str:
    """``snapshot check``: one table of check, status and detail."""
    rows = [(f.check, f.status, f.detail) for f in report.findings]
    text = tabulate(
        rows,
        headers=["check", "status", "detail"],
        tablefmt="simple",
        maxcolwidths=[None, None, 90],
    )
    errors = sum(f.status == "error" for f in report.findings)
    warnings = sum(f.status == "warning" for f in report.findings)
    verdict = "ready" if not errors else "not ready"
    # The report carries the apply's plan (the preflight cannot name its type: it knows
    # nothing of the apply).
    applying = cast("Plan", report.plan)
    plan = f"\n\n{plan_table(applying, report.target)}" if report.plan else ""
    return (
        f"{text}{plan}\n\n{report.action} {report.snapshot} to {report.target}: {verdict} "
        f"({count(errors, 'error')}, {count(warnings, 'warning')})"
    )


def smoke_report(report: SmokeReport) -> str:
    """``snapshot smoke``: one line per guardrail check."""
    rows = [(r.check, r.status, r.description, r.detail) for r in report.results]
    text = tabulate(
        rows,
        headers=["check", "status", "guardrail", "detail"],
        tablefmt="simple",
        maxcolwidths=[None, None, 45, 60],
    )
    return f"{text}\n\nsmoke {report.target}: {report.summary}"


def cutover_report(report: CutoverReport) -> str:
    """``snapshot cutover``: the steps, the table of the step that matters, where things stand."""
    steps = tabulate(
        [
            (s.name, s.status, "-" if s.status == "skipped" else f"{s.seconds:.1f}", s.detail)
            for s in report.steps
        ],
        headers=["step", "status", "seconds", "detail"],
        tablefmt="simple",
        maxcolwidths=[None, None, None, 80],
    )
    parts = [steps]
    failed = next((s.name for s in report.steps if s.status == "failed"), None)
    if report.preflight is not None and not report.preflight.ok:
        parts.append(preflight_report(report.preflight))
    if report.apply is not None:
        parts.append(apply_report(report.apply))
    if failed == "smoke" and report.smoke is not None:
        parts.append(smoke_report(report.smoke))
    if failed == "verify" and report.verify is not None:
        parts.append(verify_report(report.verify))
    total = sum(s.seconds for s in report.steps)
    verdict = "done" if report.ok else f"stopped at {failed}"
    lines = [f"cutover {report.source} -> {report.target}: {verdict} in {total:.1f} s"]
    lines.append(f"state: {report.state}")
    if report.undo:
        lines.append(f"to roll back: {report.undo}")
    parts.append("\n".join(lines))
    return "\n\n".join(parts)


def rehearsal_report(report: RehearsalReport) -> str:
    """``snapshot rehearse``: the cutover's report, the rollback's, the verify after it."""
    parts = [
        f"rehearsal: two PostgreSQL {report.server_version} servers (scale {report.scale}), "
        f"binaries from {report.bin_dir}"
    ]
    if report.cutover is not None:
        parts.append(cutover_report(report.cutover))
    if report.rollback is not None:
        parts.append("rollback prod to its pre-apply backup:\n" + apply_report(report.rollback))
    if report.restored is not None:
        parts.append(
            f"prod after the rollback, against {report.restored.source} (taken before the "
            f"cutover):\n" + verify_report(report.restored)
        )
    if report.ok:
        ending = (
            f"rehearsal passed in {report.seconds:.1f} s: the cutover matched dev, the rollback "
            "gave prod back its pre-cutover checksums"
        )
    else:
        ending = f"rehearsal FAILED after {report.seconds:.1f} s: {report.failure}"
    if report.kept:
        servers = "\n".join(
            f"  {name}: {url}  (env file: {report.env_files[name]})"
            for name, url in report.urls.items()
        )
        ending += (
            f"\nkept the servers running in {report.folder}:\n{servers}\n"
            f"try: cd {report.folder} && snapshot verify dev prod\n"
            "stop them with: snapshot rehearse --down"
        )
    else:
        ending += f"\nservers stopped, {report.folder} removed"
    parts.append(ending)
    return "\n\n".join(parts)


def prune_report(report: PruneReport) -> str:
    """``snapshot prune``: what went (or would go), and what it freed."""
    rows = [
        (
            s.id,
            s.manifest.kind,
            s.manifest.created[:19].replace("T", " "),
            human_size(s.manifest.size),
        )
        for s in report.removed
    ]
    verb = "would remove" if report.dry_run else "removed"
    count = len(report.removed)
    summary = (
        f"prune (keep {report.keep} per environment and kind): {verb} {count} snapshot"
        f"{'' if count == 1 else 's'} ({human_size(report.freed)}), kept {len(report.kept)}"
    )
    if not rows:
        return summary
    return f"{table(('id', 'kind', 'created (UTC)', 'size'), rows)}\n\n{summary}"
