"""The apps the tests run snapshot on, each as a dev and a prod the project points at.

* The bundled question-bank app (``sql/``): :func:`setup_pair` gives dev and a diverged prod
  with a snapshot of dev taken; :func:`apply` applies it the way a script would;
  :func:`prod_snapshot` takes prod instead, for the directions that need care.
* Another app, built by the test itself: :func:`plain_app_pair` fills an empty dev and prod.
* The teams app: PascalCase and uuid keys, a json column, a self-referencing tree, cascades
  inside the scope, a table without any key and a trigger that rewrites rows on update; the
  cases that make deltas hard (:func:`teams_db`, :func:`take_teams_dev`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from click.testing import Result

from tests.fix_db import Database
from tests.fix_project import Project

# A user only prod has (dev's seed never makes this id).
NEW_USER = "5e1f0000-0000-4000-8000-000000000001"


def setup_pair(project: Project, make_db, dev_kind: str = "dev") -> tuple[Database, Database]:
    """A dev and a diverged prod database, with a snapshot of dev taken."""
    dev, prod = make_db(dev_kind), make_db("prod")
    project.point("dev", dev)
    project.point("prod", prod)
    result = project.run("take", "dev")
    assert result.exit_code == 0, result.stderr
    return dev, prod


def resync_pair(project: Project, make_db) -> tuple[Database, Database]:
    """Dev and a prod that holds dev's rows already (a re-sync), the rows that differ sent
    up alone (``[apply] upload = "changed"``, as over a network)."""
    dev, prod = make_db("dev"), make_db("dev")
    project.point("dev", dev)
    project.point("prod", prod)
    project.config('[apply]\nupload = "changed"\n')
    return dev, prod


def apply(project: Project, *args: str) -> Result:
    """``snapshot apply prod --yes``: dev's newest snapshot, unattended."""
    return project.run("apply", "prod", "--yes", *args)


def prod_snapshot(project: Project, dev: Database, prod: Database) -> Path:
    """Point the project at ``dev`` and ``prod`` and take prod (unmasked): the snapshot's folder."""
    project.point("dev", dev)
    project.point("prod", prod)
    taken = project.run("take", "prod", "--unmasked")
    assert taken.exit_code == 0, taken.output
    [snapshot] = project.snapshots("prod")
    return snapshot


def plain_app_pair(
    project: Project, new_db, fill: Callable[[Database, str, int], None], config: str
) -> tuple[Database, Database]:
    """A dev and a smaller, different prod of another app, filled by ``fill`` (variant, size).

    The project points at both, with ``config`` and empty script folders: these apps have no
    guardrails to step around.
    """
    dev, prod = new_db("empty"), new_db("empty")  # new_db: the make_db fixture
    fill(dev, "dev", 30)
    fill(prod, "prod", 20)
    project.point("dev", dev)
    project.point("prod", prod)
    project.config(config)
    for phase in ("pre", "post"):
        (project.path / "sql" / phase).mkdir(parents=True)
    return dev, prod


TEAMS_SCHEMA = """
SET ROLE app_owner;
CREATE TABLE public."Team" (id uuid PRIMARY KEY, slug text NOT NULL UNIQUE, meta json);
CREATE TABLE public.node (
    id int PRIMARY KEY,
    parent_id int REFERENCES public.node (id),
    "teamId" uuid NOT NULL REFERENCES public."Team" (id) ON DELETE CASCADE,
    label text NOT NULL);
CREATE TABLE public.member (
    id int PRIMARY KEY,
    "teamId" uuid NOT NULL REFERENCES public."Team" (id) ON DELETE CASCADE,
    rank int NOT NULL,
    UNIQUE ("teamId", rank));
CREATE TABLE public.event_log (note text, payload json);
CREATE TABLE public.stamped (id int PRIMARY KEY, body text NOT NULL, edits int NOT NULL DEFAULT 0);
CREATE FUNCTION public.count_edit() RETURNS trigger LANGUAGE plpgsql AS
$$ BEGIN NEW.edits := OLD.edits + 1; RETURN NEW; END $$;
CREATE TRIGGER count_edit BEFORE UPDATE ON public.stamped
    FOR EACH ROW EXECUTE FUNCTION public.count_edit();
RESET ROLE;
"""
TEAMS_SCOPE = (
    'public."Team"',
    "public.node",
    "public.member",
    "public.event_log",
    "public.stamped",
)
TEAMS_CONFIG = f"""
[scope]
tables = [{", ".join("'" + t + "'" for t in TEAMS_SCOPE)}]
auth_users = false

[apply]
insert_as = {{}}
"""
TEAMS_SEED = """
INSERT INTO public."Team" SELECT md5('team' || i)::uuid, 'team-' || i, json_build_object('n', i)
    FROM generate_series(1, 6) i;
INSERT INTO public.node SELECT i, CASE WHEN i > 1 THEN 1 END, md5('team' || (1 + i % 3))::uuid,
    'node ' || i FROM generate_series(1, 40) i;
INSERT INTO public.member SELECT i, md5('team' || (1 + i % 6))::uuid, i FROM generate_series(1, 60) i;
INSERT INTO public.event_log SELECT 'event ' || i, json_build_object('i', i)
    FROM generate_series(1, 30) i;
INSERT INTO public.stamped (id, body) SELECT i, 'body ' || i FROM generate_series(1, 20) i;
"""


def teams_db(make_db) -> Database:
    """A fresh database holding the teams app and its seed."""
    db = make_db("empty")
    db.execute(TEAMS_SCHEMA)
    db.execute(TEAMS_SEED)
    return db


def take_teams_dev(project: Project, dev: Database) -> None:
    """Point ``dev`` at the teams app's scope (no scripts: it has no guardrails) and take it."""
    project.point("dev", dev)
    project.config(TEAMS_CONFIG)
    for phase in ("pre", "post"):
        (project.path / "sql" / phase).mkdir(parents=True, exist_ok=True)
    assert project.run("take", "dev").exit_code == 0
