"""Allow ``python -m snapshot``."""

from snapshot.cli import main

if __name__ == "__main__":
    main()
