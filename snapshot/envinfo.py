"""``snapshot env``: how an environment resolves, and whether it answers."""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from typing import Any

from snapshot import catalog
from snapshot.config import Config
from snapshot.db import connect
from snapshot.environments import NoRoute, resolve_connection
from snapshot.errors import ConnectionFailed


@dataclass(frozen=True)
class EnvReport:
    """A resolved environment; no field ever holds the password."""

    environment: str
    env_file: str
    route: str
    connection: str
    project_ref: str | None
    note: str
    answers: bool
    server: str | None
    error: str | None

    @property
    def failure(self) -> str | None:
        """The error line when the environment does not answer."""
        return None if self.answers else f"{self.environment} does not answer: {self.error}"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def probe_environment(config: Config, env_name: str) -> EnvReport:
    """Resolve ``env_name`` and try to connect."""
    env = config.environment(env_name)
    try:
        target = resolve_connection(env)
    except NoRoute as exc:  # a ref whose host does not answer: still show what is known
        return EnvReport(
            environment=env_name,
            env_file=str(env.env_file),
            route="none",
            connection="-",
            project_ref=exc.ref,
            note=exc.note,
            answers=False,
            server=None,
            error=str(exc).removeprefix(f"{exc.env}: "),
        )
    server = error = None
    try:
        with contextlib.closing(connect(target)) as conn:
            info = catalog.server_info(conn)
            server = f"PostgreSQL {info.version}, database {info.dbname}, user {info.user}"
    except ConnectionFailed as exc:
        error = str(exc)
    return EnvReport(
        environment=env_name,
        env_file=str(env.env_file),
        route=target.route,
        connection=target.masked_url(),
        project_ref=target.project_ref,
        note=target.note,
        answers=error is None,
        server=server,
        error=error,
    )
