"""The errors a user can see: each message says what is wrong and what to do about it.

Only the CLI turns these into an exit code and a line on stderr. Anything else that
escapes is a bug and keeps its traceback.
"""

from __future__ import annotations


class SnapshotError(Exception):
    """A failure the user can act on; ``str(error)`` is the sentence shown to them."""

    exit_code = 1


class ConfigError(SnapshotError):
    """Bad usage, configuration, environment file or installation (exit code 2)."""

    exit_code = 2


class ConnectionFailed(SnapshotError):
    """The database could not be reached or refused the credentials."""


class ToolFailed(SnapshotError):
    """pg_dump or pg_restore exited with an error."""


class ArchiveError(SnapshotError):
    """A snapshot in the archive is missing, incomplete or altered."""


class ApplyFailed(SnapshotError):
    """An apply stopped and was rolled back; the target is unchanged."""


class ScriptFailed(ApplyFailed):
    """A user SQL script failed inside the apply's transaction."""


class Refused(SnapshotError):
    """A safety check refused to go on; nothing was changed."""


class Interrupted(SnapshotError):
    """Ctrl-C, SIGTERM or SIGHUP stopped the command; the message says where things stand.

    The exit code is the shell's for the signal: 130 for Ctrl-C, 143 for SIGTERM.
    """

    exit_code = 130

    def __init__(self, message: str, exit_code: int = 130) -> None:
        super().__init__(message)
        self.exit_code = exit_code
