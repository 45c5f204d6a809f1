"""A throwaway embedded PostgreSQL for scripts/test on machines without a server.

python -m tests.embedded_server up     start it, print its DSN
python -m tests.embedded_server down   stop it and remove its folder
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from snapshot import localpg

PREFIX = "snapshot-test-server-"


def up() -> str:
    folder = Path(tempfile.mkdtemp(prefix=PREFIX))
    localpg.give_to_server_user(folder)
    server = localpg.start(localpg.embedded_bin(), folder, "pg")
    return f"host=127.0.0.1 port={server.port} user=postgres dbname=postgres"


def down() -> int:
    return localpg.sweep(Path(tempfile.gettempdir()), PREFIX, only_orphans=False)


if __name__ == "__main__":
    if sys.argv[1:] == ["up"]:
        print(up())
    elif sys.argv[1:] == ["down"]:
        down()
    else:
        sys.exit("usage: python -m tests.embedded_server up|down")
