"""Environments: env files, Supabase's direct host and session pooler, `snapshot env`; names
this project does not know refused with a suggestion, and a connection that fails said in
one line with its cause."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import psycopg
import pytest

from snapshot import localpg
from tests.fix_project import Project, one_error_line
from tests.fix_servers import POOLER_PASSWORD, POOLER_REF

GOOD_TOKEN = "sbp_test_token_0123456789"


class ManagementAPI:
    """A local stand-in for api.supabase.com answering the pooler endpoint."""

    def __init__(self) -> None:
        self.pooler: list[dict[str, Any]] = []
        self.requests: list[tuple[str, str | None]] = []
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                api.requests.append((self.path, self.headers.get("Authorization")))
                if self.headers.get("Authorization") != f"Bearer {GOOD_TOKEN}":
                    status, body = 401, {"message": "Unauthorized"}
                elif self.path == f"/v1/projects/{POOLER_REF}/config/database/pooler":
                    status, body = 200, api.pooler
                else:
                    status, body = 404, {"message": "Not found"}
                payload = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def entry(self, port: int, mode: str = "session", kind: str = "PRIMARY") -> dict[str, Any]:
        return {
            "identifier": POOLER_REF,
            "database_type": kind,
            "is_using_scram_auth": True,
            "db_user": f"postgres.{POOLER_REF}",
            "db_host": "127.0.0.1",
            "db_port": port,
            "db_name": "postgres",
            "connection_string": f"postgresql://postgres.{POOLER_REF}:[YOUR-PASSWORD]@127.0.0.1:{port}/postgres",
            "default_pool_size": 15,
            "max_client_conn": 200,
            "pool_mode": mode,
        }


@pytest.fixture
def management_api() -> Iterator[ManagementAPI]:
    api = ManagementAPI()
    thread = threading.Thread(target=api.httpd.serve_forever, daemon=True)
    thread.start()
    yield api
    api.httpd.shutdown()
    api.httpd.server_close()


def supabase_env(
    project: Project, api: ManagementAPI | None, password: str = POOLER_PASSWORD, **extra: str
) -> None:
    variables = {
        "NEXT_PUBLIC_SUPABASE_URL": f"https://{POOLER_REF}.supabase.co",
        "SUPABASE_PROJECT_REF": POOLER_REF,
        "SUPABASE_DB_PASSWORD": password,
    }
    if api is not None:
        variables.update(SUPABASE_ACCESS_TOKEN=GOOD_TOKEN, SUPABASE_API_URL=api.url)
    variables.update(extra)
    project.env("prod", **variables)


def test_env_shows_the_connection_masked_and_that_it_answers(project: Project, make_db) -> None:
    db = make_db("empty")
    project.env("dev", SUPABASE_DB_URL=db.app_url.replace("app_owner@", "app_owner:s3cr%40t@"))

    result = project.run("-v", "env", "dev")

    assert result.exit_code == 0, result.stderr
    assert f"postgresql://app_owner:****@127.0.0.1:{db.server.port}/" in result.stdout
    assert "yes: PostgreSQL" in result.stdout and db.name in result.stdout
    assert "s3cr" not in result.output


def test_env_discovers_the_session_pooler_from_the_management_api(
    project: Project, management_api: ManagementAPI, tls_server: localpg.LocalServer
) -> None:
    management_api.pooler = [
        management_api.entry(tls_server.port),
        {**management_api.entry(9), "database_type": "READ_REPLICA", "db_host": "replica.invalid"},
    ]
    supabase_env(project, management_api)

    result = project.run("-v", "env", "prod", "--json")

    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["route"] == "pooler"
    assert report["project_ref"] == POOLER_REF
    assert "direct host" in report["note"]  # db.<ref>.supabase.co does not answer here
    assert report["connection"] == (
        f"postgresql://postgres.{POOLER_REF}:****@127.0.0.1:{tls_server.port}/postgres"
        "?sslmode=require&gssencmode=disable"
    )
    # TLS and scram with a password full of special characters: it answers.
    assert report["answers"] is True, report["error"]
    assert management_api.requests == [
        (f"/v1/projects/{POOLER_REF}/config/database/pooler", f"Bearer {GOOD_TOKEN}")
    ]
    assert POOLER_PASSWORD not in result.output and GOOD_TOKEN not in result.output


def test_env_turns_the_transaction_pooler_port_into_session_mode(
    project: Project, management_api: ManagementAPI
) -> None:
    management_api.pooler = [management_api.entry(6543, mode="transaction")]
    supabase_env(project, management_api)

    result = project.run("env", "prod", "--json")

    report = json.loads(result.stdout)
    assert "@127.0.0.1:5432/postgres" in report["connection"]


def test_env_uses_a_configured_pooler_host_without_a_token(
    project: Project, tls_server: localpg.LocalServer
) -> None:
    supabase_env(project, None)
    project.config(
        f'[environments.prod]\nconnection = "pooler"\npooler_host = "127.0.0.1:{tls_server.port}"\n'
    )

    result = project.run("env", "prod")

    assert result.exit_code == 0, result.output
    assert "yes: PostgreSQL" in result.stdout
    assert "pooler" in result.stdout


def test_project_id_is_accepted_as_the_ref(
    project: Project, tls_server: localpg.LocalServer
) -> None:
    project.env("prod", SUPABASE_PROJECT_ID=POOLER_REF, SUPABASE_DB_PASSWORD=POOLER_PASSWORD)
    project.config(f'[environments.prod]\npooler_host = "127.0.0.1:{tls_server.port}"\n')

    result = project.run("env", "prod", "--json")

    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["project_ref"] == POOLER_REF


@pytest.mark.parametrize(
    ("where", "advice"),
    [
        ("url", "check the password in SUPABASE_DB_URL in .env.production"),
        ("variable", "check SUPABASE_DB_PASSWORD in .env.production"),
    ],
)
def test_wrong_password_is_one_line_naming_the_variable(
    project: Project, tls_server: localpg.LocalServer, where: str, advice: str
) -> None:
    user = f"postgres.{POOLER_REF}"
    if where == "url":
        project.env("prod", SUPABASE_DB_URL=tls_server.url(user=user, password="wrong-one"))
    else:
        project.env(
            "prod", SUPABASE_DB_URL=tls_server.url(user=user), SUPABASE_DB_PASSWORD="wrong-one"
        )

    env = project.run("env", "prod")
    take = project.run("take", "prod", "--unmasked")

    assert env.exit_code == 1 and "refused the password" in env.stdout
    assert take.exit_code == 1
    assert take.stderr.strip().splitlines()[-1].startswith("Error: ")
    assert "refused the password for user 'postgres.abcdefghijklmnopqrst'" in take.stderr
    assert advice in take.stderr and advice in env.stderr
    assert "wrong-one" not in take.output and "Traceback" not in take.output
    assert project.snapshots() == []


def test_password_reaches_pg_dump_through_the_environment_only(
    project: Project, tls_server: localpg.LocalServer
) -> None:
    with psycopg.connect(tls_server.url(password="superuser-secret"), autocommit=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS items")
        conn.execute(f'CREATE DATABASE items OWNER "postgres.{POOLER_REF}"')
    with psycopg.connect(
        tls_server.url("items", f"postgres.{POOLER_REF}", POOLER_PASSWORD), autocommit=True
    ) as conn:
        conn.execute("CREATE TABLE items (id int PRIMARY KEY, name text)")
        conn.execute("INSERT INTO items SELECT i, 'item ' || i FROM generate_series(1, 50) i")
    project.env(
        "prod", SUPABASE_DB_URL=tls_server.url("items", f"postgres.{POOLER_REF}", POOLER_PASSWORD)
    )
    project.config('[scope]\ntables = ["items"]\nauth_users = false\n')

    result = project.run("-v", "take", "prod", "--unmasked")

    assert result.exit_code == 0, result.output
    assert "running " in result.stderr and "pg_dump --dbname=" in result.stderr
    assert "p@ss" not in result.output and "%40" not in result.output
    manifest = json.loads((project.snapshots("prod")[0] / "manifest.json").read_text())
    assert manifest["tables"][0]["rows"] == 50
    assert "p@ss" not in json.dumps(manifest)


def test_env_without_a_route_shows_the_table_and_suspects_the_ref(project: Project) -> None:
    project.env("prod", SUPABASE_PROJECT_REF="nosuchprojectrefxyzw", SUPABASE_DB_PASSWORD="x")

    result = project.run("env", "prod")

    assert result.exit_code == 1
    assert "nosuchprojectrefxyzw" in result.stdout and "route" in result.stdout
    line = one_error_line(result)
    assert "check the project ref 'nosuchprojectrefxyzw'" in line and "IPv6" not in line
    assert "pooler_host" in line


def test_env_without_network_still_shows_its_table(project: Project) -> None:
    """No route to the direct host and no Management API to ask (as without a network)."""
    project.env(
        "prod",
        SUPABASE_PROJECT_REF="nosuchprojectrefxyzw",
        SUPABASE_DB_PASSWORD="x",
        SUPABASE_ACCESS_TOKEN=GOOD_TOKEN,
        SUPABASE_API_URL="http://127.0.0.1:9",  # nothing listens on the discard port
    )

    result = project.run("env", "prod")

    assert result.exit_code == 1
    assert "nosuchprojectrefxyzw" in result.stdout and "route" in result.stdout
    line = one_error_line(result)
    assert "cannot reach the Management API" in line and "pooler_host" in line
    assert GOOD_TOKEN not in result.output


def test_a_refused_connection_keeps_its_cause_on_one_line(project: Project, make_db) -> None:
    port = localpg.free_port()
    project.env("dev", SUPABASE_DB_URL=f"postgresql://app_owner@127.0.0.1:{port}/x")

    result = project.run("take", "dev")

    assert result.exit_code == 1
    line = one_error_line(result)
    assert "Connection refused (is the server running on that host" in line


@pytest.mark.fast
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


@pytest.mark.fast
def test_an_archived_environment_without_its_env_file_names_the_file(project: Project) -> None:
    (project.path / "snapshots" / "staging").mkdir(parents=True)

    listed = project.run("list", "staging")
    taken = project.run("take", "staging", "--unmasked")

    assert listed.exit_code == 0
    assert taken.exit_code == 2
    assert "environment 'staging' needs .env.staging, which does not exist" in (
        one_error_line(taken)
    )


@pytest.mark.fast
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
