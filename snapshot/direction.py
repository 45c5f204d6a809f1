"""Which way data may flow: environments marked safe, and the usual direction.

An environment not marked ``safe`` in ``snapshot.toml`` (prod is not) holds real people's
data: logins, password hashes, personal columns. A take of it is masked
(:mod:`snapshot.masking`) unless ``--unmasked``; a masked snapshot goes anywhere, its auth
users (masked too) included. An unmasked one spreads those people wherever it goes, so
applying it to an environment that is marked safe (dev) needs an explicit ``--unmasked``,
and even then its auth users become logins there only with ``--create-auth-users``; a
cutover takes its source only unmasked, so it needs ``--unmasked`` too. Each snapshot's
manifest records whether its source was marked safe when it was taken, and how it was
masked. Rolling an environment back to its own backups is never refused.

Apart from safety, every apply or cutover whose direction is not the usual one (dev -> prod,
:data:`snapshot.config.DEFAULT_SOURCES`) is confirmed by a person, even onto a safe target.
"""

from __future__ import annotations

from dataclasses import dataclass

from snapshot import archive
from snapshot.archive import Snapshot
from snapshot.config import DEFAULT_SOURCES, Config, EnvironmentConfig
from snapshot.errors import ConfigError
from snapshot.manifest import Manifest

UNMASKED = "--unmasked"
CREATE_AUTH_USERS = "--create-auth-users"
REAL_DATA = "real people's data (logins, password hashes, personal columns)"


@dataclass(frozen=True)
class Direction:
    """Where an apply's snapshot comes from and goes to, and what that allows."""

    source: str
    target: str
    usual_source: str | None  # the target's default source (dev for prod), if it has one
    auth_withheld: str = ""  # why auth users are not created from the snapshot ("": they are)

    @property
    def usual(self) -> bool:
        """Whether this is the configured default direction (dev -> prod)."""
        return self.source == self.usual_source

    def unusual_sentence(self) -> str:
        """``prod -> dev is not the usual direction (dev -> prod)``."""
        if self.usual_source:
            usual = f"{self.usual_source} -> {self.target}"
        else:
            usual = ", ".join(f"{s} -> {t}" for t, s in DEFAULT_SOURCES.items())
        return f"{self.source} -> {self.target} is not the usual direction ({usual})"


def source_safe(config: Config, manifest: Manifest) -> bool:
    """Whether the snapshot holds no real people's data: its source was marked safe when
    taken, or it is masked (:mod:`snapshot.masking`).

    Manifests written before this was recorded fall back to the environment's setting now;
    an environment this configuration does not mark (or know) is not safe.
    """
    if manifest.masking is not None:
        return True
    if manifest.source_safe is not None:
        return manifest.source_safe
    env = config.environments.get(manifest.environment)
    return env.safe if env is not None else False


def choose_snapshot(
    config: Config, target: str, source: str | None, snapshot_id: str | None
) -> Snapshot:
    """The snapshot an apply (or check) to ``target`` gets: ``snapshot_id``, else the newest
    take of ``source``, else of the target's usual source.

    Only prod has one (dev): a snapshot never flows the other way unless named.
    """
    if source and snapshot_id:
        raise ConfigError("give --from or --snapshot, not both")
    if snapshot_id:
        return archive.find_snapshot(config.archive, snapshot_id)
    source = source or config.default_source(target)
    if source is None:
        raise ConfigError(f"which snapshot should go to {target}? pass --from ENV")
    config.require_known(source)
    return archive.newest_snapshot(config.archive, source, kind="take")


def needs_confirmation(config: Config, target: str, way: Direction | None = None) -> bool:
    """Whether changing ``target`` needs a person to confirm by typing its name: unless it
    is marked safe and the snapshot comes the usual way (``way`` None: a rollback)."""
    unusual = way is not None and not way.usual
    return unusual or not config.environment(target).safe


def require_unmasked_take(env: EnvironmentConfig, unmasked: bool) -> None:
    """Refuse a cutover's take of an environment not marked safe, unless ``unmasked`` (a
    masked snapshot would never verify against its source)."""
    if env.safe or unmasked:
        return
    raise ConfigError(
        f"refusing to take {env.name}: it is not marked safe, so its snapshot would carry "
        f"{REAL_DATA}; pass {UNMASKED} to take it as it is"
    )


def decide(
    config: Config,
    source: str,
    safe_source: bool,
    target: str,
    *,
    what: str,
    unmasked: bool,
    create_auth_users: bool,
) -> Direction:
    """The direction of an apply of ``what`` (taken from ``source``) to ``target``.

    Refuses a snapshot of an environment not marked safe onto one that is, unless
    ``unmasked``; its auth users are then withheld unless ``create_auth_users``.
    """
    usual = config.default_source(target)
    if safe_source or not config.environment(target).safe:
        return Direction(source, target, usual)
    if not unmasked:
        raise ConfigError(
            f"refusing to apply {what} to {target}: {source} is not marked safe and "
            f"{target} is, so it would copy {REAL_DATA} into {target}; pass {UNMASKED} to "
            f"apply it as it is (and {CREATE_AUTH_USERS} to create its auth users)"
        )
    withheld = (
        ""
        if create_auth_users
        else f"none created: the snapshot comes from {source}, which is not marked safe; "
        f"pass {CREATE_AUTH_USERS} to create its users in {target}"
    )
    return Direction(source, target, usual, withheld)


def of_cutover(
    config: Config, source: str, target: str, *, unmasked: bool, create_auth_users: bool
) -> Direction:
    """The direction of ``cutover SOURCE TARGET``: its take of ``source``, then its apply."""
    env = config.environment(source)
    require_unmasked_take(env, unmasked)
    return decide(
        config,
        source,
        env.safe,
        target,
        what=f"a snapshot of {source}",
        unmasked=unmasked,
        create_auth_users=create_auth_users,
    )


def of_snapshot(
    config: Config,
    manifest: Manifest,
    snapshot_id: str,
    target: str,
    *,
    unmasked: bool,
    create_auth_users: bool,
) -> Direction:
    """:func:`decide` for an archived snapshot (``apply``, ``check``).

    A subsetted snapshot goes only to an environment marked safe: applied anywhere else it
    would delete every row it left out.
    """
    if manifest.subset is not None and not config.environment(target).safe:
        raise ConfigError(
            f"refusing to apply {snapshot_id} to {target}: it is a subsetted snapshot, and "
            f"{target} is not marked safe: applied, it would delete every row the subset left "
            f"out; apply it to a safe environment, or take {manifest.environment} with --whole"
        )
    return decide(
        config,
        manifest.environment,
        source_safe(config, manifest),
        target,
        what=snapshot_id,
        unmasked=unmasked,
        create_auth_users=create_auth_users,
    )
