"""Finding the project root: where ``snapshot.toml``, the env files and the archive live.

snapshot walks up from the working directory to the nearest folder holding ``snapshot.toml``
or one of the default env files (``.env.local``, ``.env.production``), the way npm finds
``package.json`` and the Supabase CLI its ``supabase/`` folder. So ``cd app/src; snapshot env
dev`` reads ``app/.env.local``, and a cutover run through npm in ``app/`` is rolled back from
anywhere below it with the same archive.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CONFIG_FILE = "snapshot.toml"
# The env files that mark a project root without a snapshot.toml (dev's and prod's).
ENV_MARKERS = (".env.local", ".env.production")


@dataclass(frozen=True)
class ProjectRoot:
    """The folder that relative paths resolve from, and how it was found."""

    folder: Path
    config: Path | None
    marker: str | None
    start: Path

    def describe(self) -> str:
        """Why paths resolve from ``folder``, for messages that name a missing file."""
        if self.marker is None:
            *first, last = (CONFIG_FILE, *ENV_MARKERS)
            markers = f"{', '.join(first)} or {last}"
            return f"no {markers} in {self.start} or any folder above it"
        return f"project root {self.folder}, found by its {self.marker}"


def find_root(start: Path) -> ProjectRoot:
    """The nearest folder at or above ``start`` holding ``snapshot.toml`` or an env file.

    Without one, ``start`` itself (whose env files then do not exist, and say so).
    """
    start = start.resolve()
    for folder in (start, *start.parents):
        if (folder / CONFIG_FILE).is_file():
            return ProjectRoot(folder, folder / CONFIG_FILE, CONFIG_FILE, start)
        for marker in ENV_MARKERS:
            if (folder / marker).is_file():
                return ProjectRoot(folder, None, marker, start)
    return ProjectRoot(start, None, None, start)
