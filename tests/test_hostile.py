"""Hostile input: each is one clear line, a non-zero exit, and nothing changed anywhere
(the target, the archive, and what lies outside it)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.fix_apps import setup_pair
from tests.fix_db import Database
from tests.fix_project import Project


def _archive(project: Project) -> dict[str, bytes]:
    """Every file under the archive, with its bytes (hidden ones too)."""
    root = project.path / "snapshots"
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _refused(result, *words: str) -> str:
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("Error: "), result.stderr
    for word in words:
        assert word in line, line
    return line


@pytest.mark.parametrize(
    ("snapshot_id", "words"),
    [
        ("../../etc", ["../../etc"]),
        ("prod/../../x", ["prod/../../x"]),
        ("/etc/passwd", ["/etc/passwd"]),
        ("dev/.hidden", ["dev/.hidden"]),
    ],
)
def test_snapshot_ids_that_are_paths_are_refused(
    project: Project, make_db, snapshot_id: str, words: list[str]
) -> None:
    _dev, prod = setup_pair(project, make_db)
    before, archive = prod.fingerprint(), _archive(project)

    for args in (
        ["apply", "prod", "--snapshot", snapshot_id, "--yes"],
        ["check", "prod", "--snapshot", snapshot_id],
        ["rollback", "prod", "--to", snapshot_id, "--yes"],
    ):
        _refused(project.run(*args), *words)

    assert prod.fingerprint() == before
    assert _archive(project) == archive


def _manifest(snapshot: Path) -> dict:
    return json.loads((snapshot / "manifest.json").read_text())


def _write(snapshot: Path, manifest: dict) -> None:
    (snapshot / "manifest.json").write_text(json.dumps(manifest, indent=2))


def _row_count(m: dict) -> None:
    m["tables"][3]["rows"] += 1


def _table_added(m: dict) -> None:
    m["scope"]["tables"].append("public.extra")


def _table_removed(m: dict) -> None:
    m["scope"]["tables"].remove("public.topics")
    m["tables"] = [t for t in m["tables"] if t["table"] != "public.topics"]


def _future_format(m: dict) -> None:
    m["format"] = 99


def _garbage_format(m: dict) -> None:
    m["format"] = "one"


def _missing_key(m: dict) -> None:
    del m["tables"]


def _wrong_type(m: dict) -> None:
    m["tables"][0]["rows"] = "many"


EDITS: dict[str, Callable[[dict], None]] = {
    "a row count": _row_count,
    "a table added to the scope": _table_added,
    "a table removed from the scope": _table_removed,
    "a future format version": _future_format,
    "a garbage format version": _garbage_format,
    "a missing key": _missing_key,
    "a wrong JSON type": _wrong_type,
}


@pytest.mark.parametrize("edit", EDITS)
def test_a_manifest_edited_by_hand_is_refused(project: Project, make_db, edit: str) -> None:
    _dev, prod = setup_pair(project, make_db)
    [snapshot] = project.snapshots("dev")
    manifest = _manifest(snapshot)
    EDITS[edit](manifest)
    _write(snapshot, manifest)
    before, archive = prod.fingerprint(), _archive(project)

    _refused(project.run("apply", "prod", "--snapshot", f"dev/{snapshot.name}", "--yes"))
    _refused(project.run("check", "prod", "--snapshot", f"dev/{snapshot.name}"))

    assert prod.fingerprint() == before
    assert _archive(project) == archive


def _two_snapshots(project: Project, make_db) -> tuple[Database, Database, Path, Path]:
    dev, prod = setup_pair(project, make_db)
    dev.execute("UPDATE public.playlists SET title = title || ' (edited)'")
    assert project.run("take", "dev").exit_code == 0
    first, second = project.snapshots("dev")
    return dev, prod, first, second


def test_a_data_dump_from_another_snapshot_is_refused(project: Project, make_db) -> None:
    _dev, prod, first, second = _two_snapshots(project, make_db)
    shutil.copyfile(second / "data.dump", first / "data.dump")
    before, archive = prod.fingerprint(), _archive(project)

    _refused(
        project.run("apply", "prod", "--snapshot", f"dev/{first.name}", "--yes"),
        "data.dump",
        "sha256",
    )

    assert prod.fingerprint() == before
    assert _archive(project) == archive


def test_a_manifest_swapped_with_another_snapshots_is_refused(project: Project, make_db) -> None:
    _dev, prod, first, second = _two_snapshots(project, make_db)
    shutil.copyfile(second / "manifest.json", first / "manifest.json")
    before, archive = prod.fingerprint(), _archive(project)

    _refused(project.run("apply", "prod", "--snapshot", f"dev/{first.name}", "--yes"))

    assert prod.fingerprint() == before
    assert _archive(project) == archive


def test_a_manifest_from_another_environment_is_refused(project: Project, make_db) -> None:
    _dev, prod = setup_pair(project, make_db)
    assert project.run("take", "prod", "--unmasked").exit_code == 0
    [dev_snapshot] = project.snapshots("dev")
    [prod_snapshot] = project.snapshots("prod")
    shutil.copyfile(prod_snapshot / "manifest.json", dev_snapshot / "manifest.json")
    before, archive = prod.fingerprint(), _archive(project)

    _refused(project.run("apply", "prod", "--snapshot", f"dev/{dev_snapshot.name}", "--yes"))

    assert prod.fingerprint() == before
    assert _archive(project) == archive


@pytest.mark.parametrize(
    ("toml", "words"),
    [
        ('[scope]\ntables = "public.users"\n', ["tables"]),
        ("[apply]\nlock_timeout = 5\n", ["lock_timeout"]),
        ("[session]\nstatement_timeout = true\n", ["statement_timeout"]),
        ("[apply]\nlock_timout = '5s'\n", ["lock_timout", "did you mean lock_timeout?"]),
        (
            '[scope]\ntabels = ["users"]\n',
            ["unknown setting 'tabels' in [scope]: did you mean tables?"],
        ),
        (
            '[environments.dev]\nsafe = "false"\n',
            ["[environments.dev] safe must be true or false, not 'false': write it without quotes"],
        ),
        (
            "[environments.prod]\nenv_file = 5\n",
            ["[environments.prod] env_file must be a path, not 5"],
        ),
        ("[environments.prod]\nssl_root_cert = 5\n", ["[environments.prod] ssl_root_cert"]),
        ("[environments.prod]\npooler_host = 5\n", ["[environments.prod] pooler_host"]),
        ("[environments]\ndev = 3\n", ["dev"]),
        ("archive = 12\n", ["archive"]),
        ("[scope\n", ["snapshot.toml"]),
    ],
)
def test_toml_with_wrong_types_is_one_line(
    project: Project, make_db, toml: str, words: list[str]
) -> None:
    _dev, prod = setup_pair(project, make_db)
    project.config(toml)
    before, archive = prod.fingerprint(), _archive(project)

    for args in (["apply", "prod", "--yes"], ["check", "prod"], ["list"]):
        result = project.run(*args)
        assert result.exit_code == 2, result.output
        _refused(result, *words)

    assert prod.fingerprint() == before
    assert _archive(project) == archive


def test_list_shows_a_snapshot_whose_dump_was_altered_as_damaged(project: Project, make_db) -> None:
    project.point("dev", make_db("dev"))
    assert project.run("take", "dev", "--label", "good").exit_code == 0
    assert project.run("take", "dev", "--label", "altered").exit_code == 0
    altered = next(project.path.glob("snapshots/dev/*-altered"))
    dump = altered / "data.dump"
    data = bytearray(dump.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one byte, the size unchanged
    dump.write_bytes(bytes(data))

    listed = project.run("list")
    document = json.loads(project.run("list", "--json").stdout)

    assert listed.exit_code == 0, listed.output
    damaged = [e for e in document if "damaged" in e]
    assert [e["id"] for e in damaged] == [f"dev/{altered.name}"]
    assert "data.dump does not match its sha256 in the manifest" in damaged[0]["damaged"]
    assert "damaged (never applied)" in listed.stdout
    assert [e["id"].endswith("-good") for e in document if "damaged" not in e] == [True]
