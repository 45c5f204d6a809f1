"""A throwaway embedded PostgreSQL for scripts/test on machines without a server.

python -m tests.embedded_server up            start one, print its folder and its DSN
python -m tests.embedded_server down FOLDER   stop that one and remove its folder

The server belongs to the process that ran ``up`` (scripts/test): ``down`` stops only the
server in FOLDER, never another run's, and a later ``up`` stops servers whose owner died
without stopping them (kill -9).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

from snapshot import localpg
from snapshot.errors import SnapshotError

PREFIX = "snapshot-test-server-"


def up() -> tuple[Path, str]:
    """Start a server owned by our parent process; its folder and DSN."""
    base = Path(tempfile.gettempdir())
    localpg.sweep(base, PREFIX, only_orphans=True)
    folder = Path(tempfile.mkdtemp(prefix=PREFIX))
    (folder / localpg.OWNER_FILE).write_text(localpg.owner_stamp(os.getppid()))
    localpg.give_to_server_user(folder)
    bin_dir = localpg.server_binaries(localpg.embedded_bin(), folder)
    server = localpg.start(bin_dir, folder, "pg")
    return folder, f"host=127.0.0.1 port={server.port} user=postgres dbname=postgres"


def down(folder: Path) -> int:
    """Stop the server in ``folder`` (one ``up`` made) and remove the folder."""
    if not folder.name.startswith(PREFIX):
        raise SystemExit(f"{folder} is not a folder 'up' made")
    stopped = localpg.stop_servers(folder)
    shutil.rmtree(folder, ignore_errors=True)
    return stopped


if __name__ == "__main__":
    try:
        if sys.argv[1:] == ["up"]:
            made, dsn = up()
            print(made)
            print(dsn)
        elif len(sys.argv) == 3 and sys.argv[1] == "down":
            down(Path(sys.argv[2]))
        else:
            sys.exit("usage: python -m tests.embedded_server up | down FOLDER")
    except SnapshotError as exc:
        sys.exit(f"embedded server: {exc}")
