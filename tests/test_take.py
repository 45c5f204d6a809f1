"""`snapshot take` and `snapshot list`: consistent, archived, data-only snapshots of the scope."""

from __future__ import annotations

import json
import signal
import stat
import subprocess
import threading
import time
from pathlib import Path

import psycopg
import pytest

from snapshot import archive, checksum
from snapshot.manifest import FORMAT_VERSION
from snapshot.names import TableName
from tests.fix_db import ALL_TABLES, Database
from tests.fix_project import Project


def manifest_of(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def restore_into(db: Database, dump: Path, bin_dir: Path) -> None:
    """Load a data-only dump into an empty-schema database with the real pg_restore."""
    subprocess.run(
        [
            str(bin_dir / "pg_restore"),
            "--data-only",
            "--disable-triggers",
            "--dbname",
            db.server.url(db.name),
            str(dump),
        ],
        check=True,
        capture_output=True,
    )


def test_take_archives_exactly_the_rows_of_the_database(
    project: Project, make_db, restore_bin: Path
) -> None:
    dev = make_db("dev")
    project.point("dev", dev)

    result = project.run("take", "dev", "--label", "first")

    assert result.exit_code == 0, result.stderr
    [folder] = project.snapshots("dev")
    assert folder.name.endswith("Z-first")
    manifest = manifest_of(folder)
    counts = {t: dev.scalar(f"SELECT count(*) FROM {t}") for t in ALL_TABLES}
    assert {t["table"]: t["rows"] for t in manifest["tables"]} == counts
    # The table on stdout lists every table with its row count; progress went to stderr.
    for table, rows in counts.items():
        assert table in result.stdout and f"{rows:,}" in result.stdout
    assert "public.questions" in result.stderr and "rows" in result.stderr
    # Checksums match what the database holds now (nothing wrote since).
    with psycopg.connect(dev.app_url) as conn:
        conn.execute("SET search_path = pg_catalog")
        for entry in manifest["tables"]:
            columns = [c["name"] for c in entry["columns"]]
            stats = checksum.table_stats(conn, TableName.parse(entry["table"]), columns)
            assert stats.checksum == entry["checksum"], entry["table"]
    # The dump holds exactly the database's rows: restored elsewhere, they compare equal.
    empty = make_db("empty")
    restore_into(empty, folder / "data.dump", restore_bin)
    assert empty.fingerprint() == dev.fingerprint()
    listing = subprocess.run(
        [str(restore_bin / "pg_restore"), "--list", str(folder / "data.dump")],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert listing.count("TABLE DATA") == len(ALL_TABLES)


def test_manifest_records_identity_fingerprint_and_file_hashes(project: Project, make_db) -> None:
    dev = make_db("dev")
    project.point("dev", dev)

    assert project.run("take", "dev").exit_code == 0

    [folder] = project.snapshots("dev")
    manifest = manifest_of(folder)
    assert manifest["format"] == FORMAT_VERSION
    assert manifest["environment"] == "dev" and manifest["kind"] == "take"
    assert manifest["database"]["dbname"] == dev.name
    assert manifest["database"]["system_identifier"] == str(
        dev.scalar("SELECT system_identifier FROM pg_control_system()")
    )
    assert manifest["server_version"] == dev.scalar("SHOW server_version").split()[0]
    assert manifest["pg_dump_version"]
    questions = next(t for t in manifest["tables"] if t["table"] == "public.questions")
    names = [c["name"] for c in questions["columns"]]
    assert "title_length" not in names and questions["generated"] == ["title_length"]
    assert {"name": "status", "type": "public.question_status", "not_null": True} in questions[
        "columns"
    ]
    users = next(t for t in manifest["tables"] if t["table"] == "auth.users")
    assert users["auth"] and users["generated"] == ["confirmed_at"]
    sequences = {s["sequence"]: s for s in manifest["sequences"]}
    assert sequences["public.questions_id_seq"]["last_value"] == dev.scalar(
        "SELECT last_value FROM public.questions_id_seq"
    )
    assert set(manifest["files"]) == {"data.dump"}
    assert manifest["files"]["data.dump"]["sha256"] == archive.sha256_file(folder / "data.dump")
    # Private: folders 0700, files 0600.
    for path in (project.path / "snapshots", folder.parent, folder):
        assert stat.S_IMODE(path.stat().st_mode) == 0o700
    for path in folder.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_take_json_prints_the_manifest_summary(project: Project, make_db) -> None:
    dev = make_db("dev")
    project.point("dev", dev)

    result = project.run("take", "dev", "--json")

    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    [folder] = project.snapshots("dev")
    assert summary["id"] == f"dev/{folder.name}"
    assert summary["tables"]["public.questions"]["rows"] == dev.scalar(
        "SELECT count(*) FROM public.questions"
    )
    assert summary["rows"] == sum(v["rows"] for k, v in summary["tables"].items() if not v["auth"])


def test_take_is_consistent_while_the_database_is_written(
    project: Project, make_db, restore_bin: Path
) -> None:
    dev = make_db("devx5")
    project.point("dev", dev)
    stop = threading.Event()
    written = []

    def writer() -> None:
        with psycopg.connect(dev.server.url(dev.name), autocommit=True) as conn:
            user = conn.execute("SELECT id FROM public.users LIMIT 1").fetchone()[0]
            while not stop.is_set():
                conn.execute(
                    "INSERT INTO public.question_attempts (user_id, question_id, is_correct) "
                    "VALUES (%s, 1, true)",
                    (user,),
                )
                conn.execute("UPDATE public.categories SET sort_order = sort_order + 1")
                written.append(1)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        time.sleep(0.2)
        result = project.run("take", "dev")
    finally:
        stop.set()
        thread.join()

    assert result.exit_code == 0, result.stderr
    assert len(written) > 10
    [folder] = project.snapshots("dev")
    manifest = manifest_of(folder)
    restored = make_db("empty")
    restore_into(restored, folder / "data.dump", restore_bin)
    with psycopg.connect(restored.server.url(restored.name)) as conn:
        conn.execute("SET search_path = pg_catalog; SET TimeZone = 'UTC'")
        for entry in manifest["tables"]:
            columns = [c["name"] for c in entry["columns"]]
            stats = checksum.table_stats(conn, TableName.parse(entry["table"]), columns)
            assert (stats.rows, stats.checksum) == (entry["rows"], entry["checksum"]), entry[
                "table"
            ]


def test_checksum_ignores_row_order_and_session_settings(project: Project, make_db) -> None:
    first, second = make_db("dev"), make_db("dev")
    # Same rows, other physical order and other session defaults on the second database.
    with second.connect() as conn:
        conn.execute(
            "CREATE TABLE scratch AS SELECT * FROM public.topic_edges ORDER BY weight DESC, to_topic_id DESC"
        )
        conn.execute("DELETE FROM public.topic_edges")
        conn.execute("INSERT INTO public.topic_edges SELECT * FROM scratch")
        conn.execute("DROP TABLE scratch")
        conn.execute("CLUSTER public.answers USING answers_question_id_position_key")
        for setting, value in {
            "timezone": "Asia/Kathmandu",
            "datestyle": "SQL, DMY",
            "intervalstyle": "sql_standard",
            "extra_float_digits": "-3",
            "bytea_output": "escape",
        }.items():
            conn.execute(f"ALTER DATABASE {second.name} SET {setting} = '{value}'")
    project.point("dev", first)
    project.env("second", SUPABASE_DB_URL=second.app_url)
    assert project.run("take", "dev").exit_code == 0
    assert project.run("take", "second", "--unmasked").exit_code == 0
    checksums = [
        {t["table"]: t["checksum"] for t in manifest_of(f)["tables"]}
        for f in project.snapshots("dev") + project.snapshots("second")
    ]
    assert checksums[0] == checksums[1]

    # One changed value anywhere changes that table's checksum, and only that one.
    second.execute(
        "UPDATE public.question_attempts SET duration = duration + interval '1 microsecond' WHERE id = 7"
    )
    assert project.run("take", "second", "--label", "changed", "--unmasked").exit_code == 0
    changed = {
        t["table"]: t["checksum"] for t in manifest_of(project.snapshots("second")[-1])["tables"]
    }
    assert [t for t in changed if changed[t] != checksums[0][t]] == ["public.question_attempts"]


def test_list_shows_snapshots_newest_first(project: Project, make_db) -> None:
    dev, prod = make_db("dev"), make_db("prod")
    project.point("dev", dev)
    project.point("prod", prod)
    assert project.run("take", "dev", "--label", "one").exit_code == 0
    assert project.run("take", "prod", "--unmasked").exit_code == 0
    assert project.run("take", "dev", "--label", "two").exit_code == 0

    everything = project.run("list")
    only_dev = json.loads(project.run("list", "dev", "--json").stdout)

    assert everything.exit_code == 0
    lines = [ln for ln in everything.stdout.splitlines() if ln.startswith(("dev/", "prod/"))]
    assert lines[0].split()[0].endswith("-two")
    assert [ln.split()[0].split("/")[0] for ln in lines] == ["dev", "prod", "dev"]
    assert "26,758" in everything.stdout  # the dev dataset's scope rows
    assert [s["label"] for s in only_dev] == ["two", "one"]
    assert all(s["environment"] == "dev" and s["size"] > 0 for s in only_dev)


def test_killed_take_leaves_no_snapshot(project: Project, make_db) -> None:
    dev = make_db("devx5")
    project.point("dev", dev)
    env_folder = project.path / "snapshots" / "dev"

    process = project.spawn("take", "dev")
    deadline = time.monotonic() + 30
    dump = None
    while time.monotonic() < deadline and process.poll() is None:
        partial = list(env_folder.glob(".tmp-*/data.dump")) if env_folder.exists() else []
        if partial and partial[0].stat().st_size > 0:
            dump = partial[0]
            break
        time.sleep(0.005)
    assert dump is not None, "the take finished before it could be interrupted"
    process.send_signal(signal.SIGKILL)
    process.communicate()

    listed = project.run("list", "--json")
    assert json.loads(listed.stdout) == []
    assert project.snapshots() == []
    # pg_dump died with its parent; the next take sweeps the leftover folder.
    time.sleep(0.2)
    assert not any(
        "pg_dump" in p.read_text(errors="ignore")
        for p in Path("/proc").glob("[0-9]*/cmdline")
        if _readable(p) and str(dump.parent) in p.read_text(errors="ignore")
    )
    assert project.run("take", "dev").exit_code == 0
    assert [p.name for p in env_folder.iterdir() if p.name.startswith(".")] == []
    assert len(project.snapshots("dev")) == 1


def test_a_backup_killed_while_writing_its_manifest_is_swept_not_settled(
    project: Project, make_db
) -> None:
    project.point("dev", make_db("dev"))
    assert project.run("take", "dev").exit_code == 0
    taken = archive.read_snapshot(project.snapshots("dev")[0])
    dead = subprocess.Popen(["true"])
    dead.wait()
    # What a process killed halfway through the manifest of a pre-apply backup leaves.
    pending = taken.path.parent / f".tmp-20261124T000000-{dead.pid}"
    pending.mkdir()
    (pending / "data.dump").write_bytes(taken.dump_path.read_bytes())
    manifest = json.dumps({**manifest_of(taken.path), "kind": "pre-apply"}, indent=2)
    (pending / "manifest.json").write_text(manifest[: len(manifest) // 2])

    # Not mistaken for a sealed backup to settle, and removed by the next sweep.
    assert archive.orphaned_backups(project.path / "snapshots", "dev") == []
    archive.sweep_stale(taken.path.parent)
    assert not pending.exists()


def _readable(path: Path) -> bool:
    try:
        path.read_bytes()
    except OSError:
        return False
    return True


@pytest.mark.fast
def test_list_of_a_known_environment_without_snapshots_says_so(project: Project) -> None:
    result = project.run("list", "prod")

    assert result.exit_code == 0
    archive = project.path.resolve() / "snapshots"
    assert result.stderr.strip() == f"no snapshots of prod in the archive folder {archive}"


def test_a_take_archives_the_entries_a_plain_data_only_pg_dump_does(
    project: Project, make_db, restore_bin: Path, tmp_path: Path
) -> None:
    # The take's pg_dump skips catalogs a data-only archive never draws on (comments,
    # publications, security labels: a round trip each): with all of them present, its
    # archive lists what pg_dump's defaults list.
    dev = make_db("dev")
    dev.execute(
        "COMMENT ON TABLE public.questions IS 'the bank'; "
        "COMMENT ON COLUMN public.answers.body IS 'shown after a try'; "
        "CREATE PUBLICATION snapshot_test_feed FOR TABLE public.questions, public.answers"
    )
    project.point("dev", dev)

    result = project.run("take", "dev")

    assert result.exit_code == 0, result.stderr
    [folder] = project.snapshots("dev")
    plain = tmp_path / "plain.dump"
    subprocess.run(
        [
            str(restore_bin / "pg_dump"),
            "--format=custom",
            "--data-only",
            f"--dbname={dev.app_url}",
            f"--file={plain}",
            *(f"--table={table}" for table in ALL_TABLES),
        ],
        check=True,
        capture_output=True,
    )

    def entries(dump: Path) -> list[str]:
        listing = subprocess.run(
            [str(restore_bin / "pg_restore"), "--list", str(dump)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        # "<dump id>; <catalog oid> <object oid> <kind> <schema> <name> <owner>"
        return sorted(line.split(" ", 3)[3] for line in listing.splitlines() if line[:1] != ";")

    assert entries(folder / "data.dump") == entries(plain)
    assert any(entry.startswith("TABLE DATA public questions") for entry in entries(plain))
