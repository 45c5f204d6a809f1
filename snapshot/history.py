"""One database, one history: a database's backups, whatever name its applies ran under.

The archive keeps each environment's snapshots in a folder of its name, but two names can
reach one database (``prod`` and ``production`` both reading ``.env.production``, say). Each
manifest records the database it came from (system identifier and name, project ref), so
rollback considers every pre-apply backup of the target's database and restores the
newest, and ``list`` says which names are one database.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from snapshot import archive, catalog
from snapshot.archive import Snapshot
from snapshot.config import Config
from snapshot.db import connect
from snapshot.dump import identity
from snapshot.environments import resolve_connection
from snapshot.errors import ConfigError
from snapshot.manifest import DatabaseIdentity, Manifest
from snapshot.text import display_path


def one_database(
    a: DatabaseIdentity, a_ref: str | None, b: DatabaseIdentity, b_ref: str | None
) -> bool | None:
    """Whether two identities are one database: by system identifier and database name,
    else by project ref; None when neither side records either."""
    if a.system_identifier and b.system_identifier:
        return (a.system_identifier, a.dbname) == (b.system_identifier, b.dbname)
    if a_ref and b_ref:
        return a_ref == b_ref
    return None


def _key(manifest: Manifest) -> tuple[str, ...] | None:
    database = manifest.database
    if database.system_identifier:
        return ("system", database.system_identifier, database.dbname)
    if manifest.project_ref:
        return ("project", manifest.project_ref)
    return None


def _describe(key: tuple[str, ...]) -> str:
    if key[0] == "system":
        return f"database {key[2]} on system {key[1]}"
    return f"project {key[1]}"


def shared_databases(snapshots: Iterable[Snapshot]) -> list[tuple[tuple[str, ...], str]]:
    """The environment names that are one database (two or more), with that database."""
    names: dict[tuple[str, ...], set[str]] = defaultdict(set)
    for snapshot in snapshots:
        key = _key(snapshot.manifest)
        if key is not None:
            names[key].add(snapshot.manifest.environment)
    return sorted(
        (tuple(sorted(envs)), _describe(key)) for key, envs in names.items() if len(envs) > 1
    )


@dataclass(frozen=True)
class Choice:
    """The backup ``snapshot rollback ENV`` restores, and what was said on the way."""

    backup: Snapshot
    notes: tuple[str, ...]


def rollback_choice(config: Config, env: str, snapshot_id: str | None) -> Choice:
    """What ``snapshot rollback ENV`` restores: ``snapshot_id`` (``--to``) when given, else
    :func:`rollback_backup`."""
    if snapshot_id:
        return Choice(archive.find_snapshot(config.archive, snapshot_id), ())
    config.environment(env)  # an unknown name is a typo, not a missing backup
    return rollback_backup(config, env)


def rollback_backup(config: Config, env: str) -> Choice:
    """The newest pre-apply backup of ``env``'s database, under any environment name.

    Backups sealed by an apply killed at its commit are settled first (in every folder of
    that database). Backups of another database are passed over; when a newer backup's
    database cannot be told (its manifest records neither system identifier nor project
    ref), rollback refuses, naming both.
    """
    from snapshot.apply import settle_backups  # the apply machinery, only when rolling back

    if not _any_backup(config):
        archive.newest_snapshot(config.archive, env, kind=archive.PRE_APPLY)  # says where
    target = resolve_connection(config.environment(env))
    with contextlib.closing(connect(target)) as conn:
        here = identity(target, catalog.server_info(conn))
    ref = target.project_ref

    def ours(manifest: Manifest, folder: str) -> bool | None:
        same = one_database(manifest.database, manifest.project_ref, here, ref)
        return True if same is None and folder == env else same

    folders = {env} | {
        s.path.parent.name
        for s in [*_backups(config), *_orphans(config)]
        if ours(s.manifest, s.path.parent.name)
    }
    notes = settle_backups(config, env, others=sorted(folders - {env}))
    backups = _backups(config)  # newest first
    mine = [s for s in backups if ours(s.manifest, s.path.parent.name)]
    unknown = [s for s in backups if ours(s.manifest, s.path.parent.name) is None]
    if not mine:
        # None in env's own folder either: the usual sentence, saying where it looked.
        archive.newest_snapshot(config.archive, env, kind=archive.PRE_APPLY)
        raise ConfigError(
            f"there is no pre-apply backup of {env}'s database ({here.dbname} on "
            f"{here.host}:{here.port}) in {display_path(config.archive)}: the backups in "
            f"{display_path(config.archive / env)} are of another database; pass --to with a "
            "snapshot id"
        )
    newest = mine[0]
    if unknown and unknown[0].manifest.created > newest.manifest.created:
        raise ConfigError(
            f"cannot tell which backup to restore: {unknown[0].id} is newer than {newest.id}, "
            f"but its manifest does not say which database it came from; pass --to "
            f"{newest.id} or --to {unknown[0].id}"
        )
    if newest.manifest.environment != env:
        others = sorted({s.manifest.environment for s in mine} - {env})
        note = (
            f"{newest.id} is the newest backup of {env}'s database: {env} and "
            f"{', '.join(others)} are one database ({here.dbname} on {here.host}:{here.port})"
        )
        notes.append(note)
    return Choice(newest, tuple(notes))


def _backups(config: Config) -> list[Snapshot]:
    return [
        s for s in archive.list_snapshots(config.archive) if s.manifest.kind == archive.PRE_APPLY
    ]


def _orphans(config: Config) -> list[Snapshot]:
    if not config.archive.is_dir():
        return []
    return [
        orphan
        for folder in sorted(config.archive.iterdir())
        if folder.is_dir() and not folder.name.startswith(".")
        for orphan in archive.orphaned_backups(config.archive, folder.name)
    ]


def _any_backup(config: Config) -> bool:
    return bool(_backups(config) or _orphans(config))
