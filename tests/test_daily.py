"""Daily use: the archive in an app's repository, folders, retention, typos, JSON, exit codes.

Each test runs the CLI the way a user types it, against real databases.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from snapshot import localpg
from snapshot.pgtools import bundled_bins
from tests.fix_apps import setup_pair
from tests.fix_db import ROOT
from tests.fix_project import Project


def take(project: Project, env: str = "dev", *args: str) -> None:
    result = project.run("take", env, *args)
    assert result.exit_code == 0, result.stderr


def one_error_line(result) -> str:
    """The single ``Error:`` line a failure prints, with no traceback anywhere."""
    assert "Traceback" not in result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("Error: ")]
    assert len(lines) == 1, result.stderr
    assert "\t" not in lines[0]
    return lines[0]


# --- 1. the archive protects itself --------------------------------------------------------


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_the_archive_stays_out_of_git_in_any_repository(project: Project, make_db) -> None:
    subprocess.run(["git", "init", "-q", str(project.path)], check=True)
    project.point("dev", make_db("empty"))

    take(project)

    ignore = project.path / "snapshots" / ".gitignore"
    assert ignore.read_text().splitlines()[-1] == "*"
    assert stat.S_IMODE((project.path / "snapshots").stat().st_mode) == 0o700
    status = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all"],
        cwd=project.path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert status.split() == ["??", ".env.local"]


def test_an_existing_archive_is_made_private_and_ignored(project: Project, make_db) -> None:
    archive = project.path / "snapshots"
    archive.mkdir(mode=0o755)
    archive.chmod(0o755)
    project.point("dev", make_db("empty"))

    take(project)

    assert stat.S_IMODE(archive.stat().st_mode) == 0o700
    assert (archive / ".gitignore").is_file()
    assert project.run("list", "--json").exit_code == 0


def test_an_archive_that_is_the_project_folder_is_refused(project: Project, make_db) -> None:
    project.point("dev", make_db("empty"))
    project.config('archive = "."\n')

    result = project.run("take", "dev")

    assert result.exit_code == 2
    assert "archive = '.' is the project folder or above it" in one_error_line(result)
    assert not (project.path / ".gitignore").exists()


# --- 2. the project root, from any folder below it ----------------------------------------


def test_commands_find_the_project_from_a_subfolder(
    project: Project, make_db, monkeypatch: pytest.MonkeyPatch
) -> None:
    project.point("dev", make_db("empty"))
    deep = project.path / "app" / "src"
    deep.mkdir(parents=True)
    monkeypatch.chdir(deep)

    env = project.run("env", "dev", "--json")
    taken = project.run("take", "dev", "--json")

    assert env.exit_code == 0, env.stderr
    assert json.loads(env.stdout)["env_file"] == str(project.path / ".env.local")
    assert taken.exit_code == 0, taken.stderr
    assert Path(json.loads(taken.stdout)["path"]).parent == project.path / "snapshots" / "dev"
    assert not (deep / "snapshots").exists()


def test_init_from_a_subfolder_writes_the_project_root(
    project: Project, make_db, monkeypatch: pytest.MonkeyPatch
) -> None:
    project.point("dev", make_db("empty"))
    deep = project.path / "web" / "pages"
    deep.mkdir(parents=True)
    monkeypatch.chdir(deep)

    written = project.run("init")
    again = project.run("init")
    taken = project.run("take", "dev")

    config = project.path / "snapshot.toml"
    assert written.exit_code == 0 and written.stdout.strip() == f"wrote {config}"
    assert again.exit_code == 2 and f"{config} already exists" in again.stderr
    assert taken.exit_code == 0, taken.stderr
    assert project.snapshots("dev") and not (deep / "snapshot.toml").exists()


def test_rollback_from_below_the_app_finds_the_backup_npm_made(
    project: Project, make_db, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sync through scripts/npm-db in the app, undone from the checkout inside it."""
    _dev, prod = setup_pair(project, make_db, dev_kind="empty")
    before = prod.fingerprint()
    synced = subprocess.run(
        [str(ROOT / "scripts" / "npm-db"), "sync:dev-prod", "--yes"],
        cwd=project.path,
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "PG_BIN"},
    )
    assert synced.returncode == 0, synced.stderr
    assert prod.fingerprint() != before
    checkout = project.path / "tools" / "snapshot"
    checkout.mkdir(parents=True)
    shutil.copy(ROOT / ".env.rehearsal-dev", checkout)  # a checkout's own files are no marker
    monkeypatch.chdir(checkout)

    result = project.run("rollback", "prod", "--yes")

    assert result.exit_code == 0, result.stderr
    assert prod.fingerprint() == before


def test_not_found_errors_name_the_folder_searched(project: Project) -> None:
    env = project.run("take", "dev")
    backup = project.run("rollback", "prod", "--yes")
    project.env("dev", SUPABASE_DB_URL="postgresql://nobody@127.0.0.1:1/none")
    snapshot = project.run("apply", "prod", "--yes")

    assert env.exit_code == 2
    assert f"no snapshot.toml, .env.local or .env.production in {project.path}" in (
        one_error_line(env)
    )
    assert backup.exit_code == 2 and "no pre-apply backup of 'prod' in snapshots/prod" in (
        one_error_line(backup)
    )
    assert snapshot.exit_code == 2
    assert "there is no take snapshot of 'dev' in snapshots/dev" in one_error_line(snapshot)


# --- 3. retention ------------------------------------------------------------------------


def test_prune_keeps_the_newest_per_environment_and_kind(project: Project, make_db) -> None:
    dev, prod = make_db("empty"), make_db("empty")
    project.point("dev", dev)
    project.point("prod", prod)
    for _ in range(3):
        take(project)
    for n in range(2):
        # prod's app wrote a row the snapshot lacks: each apply writes (deletes it)
        prod.execute("INSERT INTO public.categories (slug, name) VALUES (%s, 'p')", [f"p{n}"])
        applied = project.run("apply", "prod", "--yes")
        assert applied.exit_code == 0, applied.stderr
    take(project, "prod", "--unmasked")
    everything = project.snapshots()
    newest_backup = max(p for p in project.snapshots("prod") if p.name.endswith("pre-apply"))

    dry = project.run("prune", "--keep", "1", "--dry-run", "--json")

    assert dry.exit_code == 0, dry.stderr
    report = json.loads(dry.stdout)
    assert sorted(r["kind"] for r in report["removed"]) == ["pre-apply", "take", "take"]
    assert project.snapshots() == everything  # a dry run deletes nothing

    pruned = project.run("prune", "--keep", "1")

    assert pruned.exit_code == 0, pruned.stderr
    assert "removed 3 snapshots" in pruned.stdout
    assert [p.name for p in project.snapshots("dev")] == [everything[2].name]
    assert newest_backup in project.snapshots("prod") and len(project.snapshots("prod")) == 2
    rolled = project.run("rollback", "prod", "--yes")  # the way back is still there
    assert rolled.exit_code == 0, rolled.stderr


def test_retention_setting_prunes_after_each_take(project: Project, make_db) -> None:
    project.point("dev", make_db("empty"))
    project.config("[retention]\nkeep = 2\n")

    for _ in range(4):
        take(project)

    assert len(project.snapshots("dev")) == 2


def test_prune_needs_a_number(project: Project) -> None:
    result = project.run("prune")

    assert result.exit_code == 2
    assert "pass --keep N, or set [retention] keep" in one_error_line(result)


# --- 4. servers from a private folder ------------------------------------------------------


@pytest.mark.skipif(os.geteuid() != 0, reason="servers run as another user only as root")
@pytest.mark.timeout(240)
def test_rehearse_runs_binaries_from_a_private_folder(project: Project, tmp_path: Path) -> None:
    """A clone in a 0700 folder: its .venv's embedded PostgreSQL is out of postgres' reach."""
    site = tmp_path / "clone" / ".venv" / "site-packages"
    site.parent.parent.mkdir(mode=0o700)
    install = localpg.embedded_bin().parent  # <site>/<package>/pginstall18
    package = install.parent
    shutil.copytree(install, site / package.name / install.name, symlinks=True)
    libs = package.parent / f"{package.name}.libs"  # the wheel's libpq, by relative rpath
    if libs.is_dir():
        shutil.copytree(libs, site / libs.name, symlinks=True)
    pg_bin = site / package.name / install.name / "bin"

    result = project.run("rehearse", "--pg-bin", str(pg_bin), "--json")

    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["restored"]["matches"] is True


def test_a_server_that_cannot_start_is_one_line(project: Project, tmp_path: Path) -> None:
    bin_dir = tmp_path / "broken" / "bin"
    bin_dir.mkdir(parents=True)
    for name in ("initdb", "postgres", "pg_ctl", "pg_dump"):
        (bin_dir / name).write_text("not a program\n")

    result = project.run("rehearse", "--pg-bin", str(bin_dir))

    assert result.exit_code == 1
    line = one_error_line(result)
    assert "cannot run" in line and str(bin_dir.parent) in line


# --- 5. no system PostgreSQL: the bundled tools --------------------------------------------


def test_take_falls_back_to_the_bundled_pg_dump(
    project: Project, pg16: localpg.LocalServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # Debian's pg_dump 15 at most
    project.env("dev", SUPABASE_DB_URL=pg16.url("app", user="app_owner"))

    result = project.run("take", "dev", "--json")

    assert result.exit_code == 0, result.stderr
    assert int(json.loads(result.stdout)["pg_dump_version"].split(".")[0]) >= 16


def test_pg_bin_in_snapshot_toml_is_used_and_checked(
    project: Project, pg16: localpg.LocalServer
) -> None:
    project.env("dev", SUPABASE_DB_URL=pg16.url("app", user="app_owner"))
    project.config(f'pg_bin = "{localpg.embedded_bin(16)}"\n')
    taken = project.run("take", "dev", "--json")
    project.config('pg_bin = "no/such/bin"\n')
    refused = project.run("take", "dev")

    assert taken.exit_code == 0, taken.stderr
    assert json.loads(taken.stdout)["pg_dump_version"].startswith("16.")
    assert refused.exit_code == 2
    assert "pg_bin in snapshot.toml" in one_error_line(refused)


def test_bundled_postgresql_is_found() -> None:
    assert bundled_bins(), "the rehearse/test extras bundle PostgreSQL"


def test_ci_proves_the_suite_without_a_system_postgresql() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    assert "unshare --mount --net" in ci and "/usr/lib/postgresql" in ci


# --- 6. init's config works as written -----------------------------------------------------


def test_init_config_runs_the_bundled_scripts_until_sql_exists(project: Project, make_db) -> None:
    prod = make_db("prod")
    project.point("prod", prod)
    assert project.run("init").exit_code == 0

    result = project.run("smoke", "prod")

    assert result.exit_code == 0, result.stderr
    assert "3/3 guardrails hold" in result.stdout


# --- 9. errors and exit codes that agree with the README -----------------------------------


def test_env_without_a_route_shows_the_table_and_suspects_the_ref(project: Project) -> None:
    project.env("prod", SUPABASE_PROJECT_REF="nosuchprojectrefxyzw", SUPABASE_DB_PASSWORD="x")

    result = project.run("env", "prod")

    assert result.exit_code == 1
    assert "nosuchprojectrefxyzw" in result.stdout and "route" in result.stdout
    line = one_error_line(result)
    assert "check the project ref 'nosuchprojectrefxyzw'" in line and "IPv6" not in line
    assert "pooler_host" in line


def test_a_refused_connection_keeps_its_cause_on_one_line(project: Project, make_db) -> None:
    port = localpg.free_port()
    project.env("dev", SUPABASE_DB_URL=f"postgresql://app_owner@127.0.0.1:{port}/x")

    result = project.run("take", "dev")

    assert result.exit_code == 1
    line = one_error_line(result)
    assert "Connection refused (is the server running on that host" in line


@pytest.mark.parametrize(
    ("args", "hint"),
    [
        (["env", "prdo"], "unknown environment 'prdo': did you mean prod?"),
        (["apply", "prod", "--from", "dve"], "unknown environment 'dve': did you mean dev?"),
        (["list", "staging"], "unknown environment 'staging'"),
        (["verify", "dev", "prdo"], "did you mean prod?"),
    ],
)
def test_a_mistyped_environment_is_refused_with_a_suggestion(
    project: Project, args: list[str], hint: str
) -> None:
    result = project.run(*args)

    assert result.exit_code == 2
    assert hint in one_error_line(result)


def test_list_of_a_known_environment_without_snapshots_says_so(project: Project) -> None:
    result = project.run("list", "prod")

    assert result.exit_code == 0
    archive = project.path.resolve() / "snapshots"
    assert result.stderr.strip() == f"no snapshots of prod in the archive folder {archive}"


def test_a_too_old_pg_restore_exits_2_in_check_and_apply_as_in_take(
    project: Project, make_db, pg16: localpg.LocalServer, pg_bin: Path
) -> None:
    prod = make_db("prod")
    project.env("dev", SUPABASE_DB_URL=pg16.url("app", user="app_owner"))
    project.point("prod", prod)
    assert project.run("--pg-bin", str(localpg.embedded_bin(16)), "take", "dev").exit_code == 0
    original = prod.fingerprint()

    checked = project.run("check", "prod", "--pg-bin", str(pg_bin))
    applied = project.run("apply", "prod", "--yes", "--pg-bin", str(pg_bin), "-q")

    for result in (checked, applied):
        assert result.exit_code == 2
        assert "tooling: " in one_error_line(result)
        assert "needs pg_restore 16 or newer" in one_error_line(result)
    assert prod.fingerprint() == original


def test_quiet_still_names_the_cause_of_a_preflight_failure(project: Project, make_db) -> None:
    _dev, prod = setup_pair(project, make_db)
    project.config('[scope]\ntables = ["users", "categories"]\n')
    original = prod.fingerprint()

    result = project.run("apply", "prod", "--yes", "-q")

    assert result.exit_code == 2  # the scope is configuration
    assert "scope: the snapshot covers another scope" in one_error_line(result)
    assert prod.fingerprint() == original


# --- 10. global options on either side of the command --------------------------------------


def test_global_options_work_after_the_command(project: Project, make_db) -> None:
    project.point("dev", make_db("empty"))
    config = project.path / "cfg" / "x.toml"
    config.parent.mkdir()
    config.write_text('archive = "archive"\n')

    verbose = project.run("take", "dev", "-v", "--config", str(config))
    listed = project.run("list", "--json", "--config", "cfg/x.toml", "-q")

    assert verbose.exit_code == 2  # cfg/.env.local: env files resolve beside the config
    assert "relative to the folder of" in one_error_line(verbose)
    assert "cfg/.env.local" in one_error_line(verbose)
    shutil.copy(project.path / ".env.local", config.parent / ".env.local")
    verbose = project.run("take", "dev", "-v", "--config", str(config))
    assert verbose.exit_code == 0, verbose.stderr
    assert "pg_dump --dbname=" in verbose.stderr  # -v after the command: debug output
    assert (config.parent / "archive" / "dev").is_dir()
    assert listed.exit_code == 0 and json.loads(listed.stdout) == []


# --- 11. --json: one document on stdout, whatever happens ----------------------------------


def test_json_failures_are_one_document_with_an_error(project: Project, make_db) -> None:
    port = localpg.free_port()
    project.env("dev", SUPABASE_DB_URL=f"postgresql://app_owner@127.0.0.1:{port}/x")

    unknown = project.run("env", "nosuch", "--json")
    unreachable = project.run("take", "dev", "--json")
    no_snapshot = project.run("check", "prod", "--json")
    usage = project.run("take", "--json")

    for result in (unknown, unreachable, no_snapshot, usage):
        assert result.exit_code in (1, 2)
        document = json.loads(result.stdout)
        assert document["error"] and document["error"] in result.stderr


def test_json_of_a_failing_check_is_the_report_with_an_error(project: Project, make_db) -> None:
    setup_pair(project, make_db)
    project.config('[scope]\ntables = ["users", "categories"]\n')

    result = project.run("check", "prod", "--json")

    assert result.exit_code == 2  # another scope than the snapshot's: configuration
    document = json.loads(result.stdout)
    assert document["ok"] is False and document["findings"]
    assert document["error"].startswith("preflight found 1 error")


def test_npm_sync_json_is_one_document(project: Project, make_db) -> None:
    dev, prod = make_db("empty"), make_db("empty")
    project.point("dev", dev)
    project.point("prod", prod)

    synced = subprocess.run(
        [str(ROOT / "scripts" / "npm-db"), "sync:dev-prod", "--json", "--yes"],
        cwd=project.path,
        capture_output=True,
        text=True,
    )

    assert synced.returncode == 0, synced.stderr
    document = json.loads(synced.stdout)
    assert document["take"]["environment"] == "dev"
    assert document["apply"]["committed"] is True and "error" not in document


def test_npm_refusal_without_a_terminal_never_advises_marking_prod_safe(
    project: Project, make_db
) -> None:
    setup_pair(project, make_db, dev_kind="empty")

    refused = subprocess.run(
        [str(ROOT / "scripts" / "npm-db"), "sync:dev-prod"],
        cwd=project.path,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "npm_lifecycle_event": "db:sync:dev-prod"},
    )

    assert refused.returncode == 2
    assert "npm run db:sync:dev-prod -- --yes" in refused.stderr
    assert "safe" not in refused.stderr


# --- 12. scripts/test stops only its own server --------------------------------------------


@pytest.mark.timeout(120)
def test_embedded_test_server_down_stops_only_its_own() -> None:
    def up() -> tuple[str, str]:
        out = subprocess.run(
            [sys.executable, "-m", "tests.embedded_server", "up"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        folder, dsn = out.strip().splitlines()
        return folder, dsn

    first, second = up(), up()
    try:
        subprocess.run(
            [sys.executable, "-m", "tests.embedded_server", "down", first[0]], cwd=ROOT, check=True
        )
        with psycopg.connect(second[1], connect_timeout=5) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(first[1], connect_timeout=5)
        assert not Path(first[0]).exists()
    finally:
        for folder, _ in (first, second):
            subprocess.run(
                [sys.executable, "-m", "tests.embedded_server", "down", folder], cwd=ROOT
            )


# --- issue 13: malformed env files, stale temporary folders, a full disk -------------------


def test_a_malformed_env_file_line_is_refused_naming_file_and_line(project: Project) -> None:
    (project.path / ".env.local").write_text(
        'SUPABASE_DB_URL="postgresql://app_owner@127.0.0.1/x"\nthis line is broken s3cret\n'
    )

    result = project.run("env", "dev")

    assert result.exit_code == 2
    line = one_error_line(result)
    assert ".env.local line 2 is not a KEY=value line" in line
    assert "s3cret" not in result.output
    assert "could not parse" not in result.output  # python-dotenv's own warning


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_any_archive_write_sweeps_what_killed_processes_left(project: Project, make_db) -> None:
    _dev, _prod = setup_pair(project, make_db, dev_kind="empty")
    [published] = project.snapshots("dev")
    dead = _dead_pid()
    prod_folder = project.path / "snapshots" / "prod"
    prod_folder.mkdir(mode=0o700)
    unsealed = prod_folder / f".tmp-20260101T000000-{dead}"
    unsealed.mkdir()
    (unsealed / "data.dump").write_bytes(b"half")
    sealed_take = prod_folder / f".tmp-20260101T000001-{dead}"
    shutil.copytree(published, sealed_take)
    # Our own pid, but the folder is older than this process: a reused pid owns nothing.
    reused = prod_folder / f".tmp-20200101T000000-{os.getpid()}"
    reused.mkdir()
    backup = prod_folder / f".tmp-20260101T000002-{dead}"
    shutil.copytree(published, backup)
    manifest = json.loads((backup / "manifest.json").read_text())
    (backup / "manifest.json").write_text(json.dumps({**manifest, "kind": "pre-apply"}))
    live = prod_folder / f".tmp-20990101T000000-{os.getpid()}"  # this process, writing now
    live.mkdir()

    take(project)  # writes dev's folder; sweeps every environment's

    assert not unsealed.exists() and not sealed_take.exists() and not reused.exists()
    assert backup.exists(), "a sealed backup is left for apply to settle"
    assert live.exists()


def _mount_tmpfs(folder: Path, kib: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={kib}k,mode=0700", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")


def _fill(folder: Path, leave: int) -> None:
    """Fill ``folder``'s file system until ``leave`` bytes stay free."""
    free = shutil.disk_usage(folder).free
    with (folder / ".filler").open("wb") as handle:
        handle.write(b"\0" * max(0, free - leave))


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_a_full_disk_while_sealing_is_one_line_and_publishes_nothing(
    project: Project, make_db
) -> None:
    dev = make_db("empty")
    project.point("dev", dev)
    take(project)  # on a roomy disk: how large are the dump and the manifest?
    [first] = project.snapshots("dev")
    dump, manifest = (first / "data.dump").stat().st_size, (first / "manifest.json").stat().st_size
    assert manifest > 8192, "the manifest must need more than the slack left below"
    shutil.rmtree(first)
    folder = project.path / "snapshots" / "dev"
    _mount_tmpfs(folder, 1024)
    try:
        _fill(folder, leave=dump + 4096)

        result = project.run("take", "dev")

        assert result.exit_code == 1
        line = one_error_line(result)
        assert "no space left in snapshots/dev: the snapshot's manifest needs" in line
        assert "KiB more" in line and "nothing was published" in line
        assert project.snapshots("dev") == []
    finally:
        subprocess.run(["umount", str(folder)], check=False)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_a_full_disk_during_the_pre_apply_backup_leaves_prod_unchanged(
    project: Project, make_db
) -> None:
    dev, prod = make_db("dev"), make_db("empty")
    project.point("dev", dev)
    project.point("prod", prod)
    take(project)
    take(project, "prod", "--unmasked")  # measure a backup-sized dump of prod
    [measure] = project.snapshots("prod")
    dump = (measure / "data.dump").stat().st_size
    shutil.rmtree(measure)
    folder = project.path / "snapshots" / "prod"
    original = prod.fingerprint()
    _mount_tmpfs(folder, 1024)
    try:
        _fill(folder, leave=dump + 4096)

        result = project.run("apply", "prod", "--yes")

        assert result.exit_code == 1
        line = one_error_line(result)
        assert "no space left in snapshots/prod: the snapshot's" in line
        assert prod.fingerprint() == original
        assert project.snapshots("prod") == []
    finally:
        subprocess.run(["umount", str(folder)], check=False)


# --- smaller -------------------------------------------------------------------------------


def test_check_shows_migrations_and_scope_closure_when_clean(project: Project, make_db) -> None:
    setup_pair(project, make_db, dev_kind="empty")

    result = project.run("check", "prod", "--json")

    statuses = {f["check"]: f["status"] for f in json.loads(result.stdout)["findings"]}
    assert statuses["migrations"] == "ok" and statuses["scope closure"] == "ok"


def test_a_too_old_pg_dump_for_the_target_exits_2_in_cutover(
    project: Project, make_db, pg16: localpg.LocalServer, pg_bin: Path
) -> None:
    project.point("dev", make_db("dev"))
    project.env("prod", SUPABASE_DB_URL=pg16.url("app", user="app_owner"))

    result = project.run("cutover", "dev", "prod", "--yes", "--pg-bin", str(pg_bin), "--json")

    assert result.exit_code == 2
    assert "needs pg_dump 16 or newer" in one_error_line(result)
    assert json.loads(result.stdout)["steps"][0]["status"] == "failed"


def test_an_archived_environment_without_its_env_file_names_the_file(project: Project) -> None:
    (project.path / "snapshots" / "staging").mkdir(parents=True)

    listed = project.run("list", "staging")
    taken = project.run("take", "staging", "--unmasked")

    assert listed.exit_code == 0
    assert taken.exit_code == 2
    assert "environment 'staging' needs .env.staging, which does not exist" in (
        one_error_line(taken)
    )
