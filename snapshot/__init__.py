"""snapshot: promote PostgreSQL data between environments with native pg_dump/pg_restore."""

__version__ = "0.1.0"

# The name on the package index (`snapshot` there is another project): what install commands say.
DISTRIBUTION = "snapshot-cutover"
