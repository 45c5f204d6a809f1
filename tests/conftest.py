"""The test suite's plugins: where each kind of setup lives.

* :mod:`tests.fix_db`: the shared server (``--test-dsn``), asked for only when a selected
  test needs it, and a fresh database per test from templates built out of ``sql/``.
* :mod:`tests.fix_servers`: throwaway servers (TLS, PostgreSQL 16) and server binaries.
* :mod:`tests.fix_project`: a project folder to run the CLI in, as a user would.
* :mod:`tests.fix_apps` (plain functions, no fixtures): the apps tests start from, paired as
  dev and prod.

Tests import helpers from these modules, never from one another.
"""

pytest_plugins = ["tests.fix_db", "tests.fix_servers", "tests.fix_project"]
