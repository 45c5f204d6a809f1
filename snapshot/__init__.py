"""snapshot: promote PostgreSQL data between environments with native pg_dump/pg_restore."""

__version__ = "0.1.0"
