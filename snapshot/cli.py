"""The command line: parses options, calls one capability, renders its result. Nothing else."""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import click
import psycopg

from snapshot import __version__, archive, progress, render
from snapshot.config import CONFIG_FILE, Config, load_config, render_default_config
from snapshot.db import cancelled_message
from snapshot.errors import SnapshotError

F = TypeVar("F", bound=Callable[..., Any])
OTHER_ENV = {"prod": "dev", "dev": "prod"}
log = logging.getLogger("snapshot")


class RuntimeFailure(click.ClickException):
    """Something failed while running (exit code 1)."""

    exit_code = 1


class UsageFailure(click.ClickException):
    """Bad usage or configuration (exit code 2)."""

    exit_code = 2


class InterruptedFailure(click.ClickException):
    """Ctrl-C (exit code 130, as shells report SIGINT)."""

    exit_code = 130


def user_error(message: str, exit_code: int) -> click.ClickException:
    """A one-line error with the exit code its cause calls for."""
    if exit_code == 130:
        return InterruptedFailure(message)
    return UsageFailure(message) if exit_code == 2 else RuntimeFailure(message)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


class Group(click.Group):
    """Turns the tool's errors, and database failures, into one line and an exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except SnapshotError as exc:
            raise user_error(str(exc), exc.exit_code) from None
        except psycopg.errors.QueryCanceled as exc:
            name = ctx.invoked_subcommand or "snapshot"
            raise user_error(cancelled_message(exc, "the database", f"running {name}"), 1) from None
        except psycopg.OperationalError as exc:
            raise user_error(f"database connection failed: {_one_line(exc)}", 1) from None
        except (psycopg.errors.InsufficientPrivilege, psycopg.errors.LockNotAvailable) as exc:
            raise user_error(_one_line(exc), 1) from None
        except KeyboardInterrupt:
            # Commands that change a database turn Ctrl-C into Interrupted with the state;
            # anything else wrote nothing that stays (take's folder is removed unpublished).
            raise user_error("interrupted (Ctrl-C): nothing was changed", 130) from None


@dataclass
class App:
    """Options shared by every command."""

    config_path: Path | None
    pg_bin: Path | None

    @functools.cached_property
    def config(self) -> Config:
        return load_config(self.config_path)


pass_app = click.make_pass_decorator(App)


def json_option(f: F) -> F:
    """``--json``: print machine-readable output instead of a table."""
    return click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")(f)


def yes_option(f: F) -> F:
    """``--yes``: do not ask before changing an environment that is not marked safe."""
    return click.option(
        "--yes", "-y", is_flag=True, help="Do not ask for confirmation (for scripts and CI)."
    )(f)


def full_option(f: F) -> F:
    """``--full``: replace every table in full instead of writing only what differs."""
    return click.option(
        "--full",
        is_flag=True,
        help="Replace every table in full (delete all, insert all) instead of writing only "
        "the rows that differ.",
    )(f)


def allow_cascade_option(f: F) -> F:
    """``--allow-cascade FK``: accept a cascade or set-null into an outside table."""
    return click.option(
        "--allow-cascade",
        "allow_cascades",
        multiple=True,
        metavar="FK",
        help="Accept that the deletes cascade into, or null out, this foreign key from outside "
        "the scope (schema.table.constraint, as check prints it). Repeatable.",
    )(f)


def _choose_snapshot(
    app: App, target_env: str, source_env: str | None, snapshot_id: str | None
) -> archive.Snapshot:
    """--snapshot ID, else the newest snapshot of --from ENV, else of the other environment."""
    if source_env and snapshot_id:
        raise user_error("give --from or --snapshot, not both", 2)
    if snapshot_id:
        return archive.find_snapshot(app.config.archive, snapshot_id)
    source = source_env or OTHER_ENV.get(target_env)
    if source is None:
        raise user_error(f"which snapshot should go to {target_env}? pass --from ENV", 2)
    return archive.newest_snapshot(app.config.archive, source, kind="take")


@contextlib.contextmanager
def _preflight_table(as_json: bool) -> Any:
    """Print the preflight's table when it refuses, before the one-line error."""
    from snapshot.preflight import PreflightFailed

    try:
        yield
    except PreflightFailed as exc:
        report = exc.report
        click.echo(render.as_json(report.to_json()) if as_json else render.preflight_report(report))
        raise


def _confirmer(app: App, target: str, yes: bool, dry_run: bool) -> Any:
    """Ask the user to type the environment's name, unless it is safe or --yes was given."""
    if yes or dry_run or app.config.environment(target).safe:
        return None
    if not sys.stdin.isatty():
        raise user_error(
            f"refusing to change {target} without confirmation: no terminal to ask in; pass "
            "--yes, or mark the environment safe in snapshot.toml",
            2,
        )

    def confirm(proposal: Any) -> bool:
        click.echo(render.plan_report(proposal), err=True)
        typed = click.prompt(
            f"\nType {target} to {proposal.action}", default="", show_default=False, err=True
        )
        return bool(typed == target)

    return confirm


def _finish(report: Any, as_json: bool, failure: str | None) -> None:
    """Print a report (table or JSON); exit 1 with ``failure`` as the error line when set."""
    click.echo(render.as_json(report.to_json()) if as_json else render.parity_report(report))
    for note in getattr(report, "notes", ()):
        click.echo(f"note: {note}", err=True)
    if failure:
        raise user_error(failure, 1)


def _setup_logging(verbose: int, quiet: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)
    progress.enable(sys.stderr.isatty() and not quiet)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="snapshot")
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    envvar="SNAPSHOT_CONFIG",
    help=f"Config file (default: ./{CONFIG_FILE} when present, else built-in defaults).",
)
@click.option(
    "--pg-bin",
    type=click.Path(path_type=Path, file_okay=False),
    envvar="PG_BIN",
    help="Directory holding pg_dump/pg_restore (default: PATH, then usual install places).",
)
@click.option("-v", "--verbose", count=True, help="Show debug output, commands included.")
@click.option("-q", "--quiet", is_flag=True, help="Show only warnings and errors on stderr.")
@click.pass_context
def cli(
    ctx: click.Context, config_path: Path | None, pg_bin: Path | None, verbose: int, quiet: bool
) -> None:
    """Make one PostgreSQL database's data match another's, safely, with pg_dump/pg_restore.

    \b
    snapshot take dev          archive a snapshot of dev's scope
    snapshot apply prod        apply dev's newest snapshot to prod
    snapshot verify dev prod   compare the two live databases
    """
    _setup_logging(verbose, quiet)
    ctx.obj = App(config_path, pg_bin)


@cli.command()
@click.option("--force", is_flag=True, help="Overwrite an existing config file.")
@pass_app
def init(app: App, force: bool) -> None:
    """Write a commented snapshot.toml with the default scope.

    \b
    snapshot init
    """
    path = app.config_path or Path(CONFIG_FILE)
    if path.exists() and not force:
        raise user_error(f"{path} already exists: edit it, or pass --force to overwrite it", 2)
    path.write_text(render_default_config(), encoding="utf-8")
    click.echo(f"wrote {path}")


@cli.command()
@click.argument("env_name", metavar="ENV")
@json_option
@pass_app
def env(app: App, env_name: str, as_json: bool) -> None:
    """Show how ENV is reached (password masked) and whether it answers.

    \b
    snapshot env prod
    """
    from snapshot.envinfo import probe_environment

    report = probe_environment(app.config, env_name)
    click.echo(render.as_json(report.to_json()) if as_json else render.env_report(report))
    if not report.answers:
        sys.exit(1)


@cli.command()
@click.argument("env_name", metavar="ENV")
@click.option("--label", help="Suffix for the snapshot's name, e.g. before-cutover.")
@json_option
@pass_app
def take(app: App, env_name: str, label: str | None, as_json: bool) -> None:
    """Archive a consistent, data-only snapshot of ENV's scope.

    \b
    snapshot take dev
    snapshot take dev --label before-cutover
    """
    from snapshot.take import take as take_snapshot

    snapshot = take_snapshot(app.config, env_name, label=label, pg_bin=app.pg_bin)
    summary = render.snapshot_summary(snapshot)
    click.echo(render.as_json(summary) if as_json else render.take_report(snapshot))


@cli.command(name="list")
@click.argument("env_name", metavar="[ENV]", required=False)
@json_option
@pass_app
def list_(app: App, env_name: str | None, as_json: bool) -> None:
    """List archived snapshots, newest first.

    \b
    snapshot list
    snapshot list prod
    """
    snapshots, damaged = archive.scan_archive(app.config.archive, env_name)
    if as_json:
        listed = [render.snapshot_summary(s) for s in snapshots]
        listed += [{"id": d.id, "path": str(d.path), "damaged": d.reason} for d in damaged]
        click.echo(render.as_json(listed))
    elif snapshots or damaged:
        click.echo(render.list_report(snapshots, damaged))
    else:
        where = f" of {env_name}" if env_name else ""
        click.echo(f"no snapshots{where} in {app.config.archive}", err=True)


def _apply_failure(report: Any) -> str | None:
    if report.matches:
        return None
    bad = [
        f"{t.table}" + (f" ({t.detail})" if t.detail else "") for t in report.tables if not t.match
    ]
    if report.auth and report.auth.missing_after:
        bad.append(f"auth.users ({report.auth.missing_after} snapshot users missing)")
    return f"parity check failed for {', '.join(bad)}: rolled back, {report.target} is unchanged"


@cli.command()
@click.argument("target_env", metavar="TARGET")
@click.option("--from", "source_env", metavar="ENV", help="Apply ENV's newest snapshot.")
@click.option(
    "--snapshot", "snapshot_id", metavar="ID", help="Apply this snapshot (snapshot list)."
)
@click.option("--dry-run", is_flag=True, help="Do everything, then roll back: changes nothing.")
@full_option
@allow_cascade_option
@yes_option
@json_option
@pass_app
def apply(
    app: App,
    target_env: str,
    source_env: str | None,
    snapshot_id: str | None,
    dry_run: bool,
    full: bool,
    allow_cascades: tuple[str, ...],
    yes: bool,
    as_json: bool,
) -> None:
    """Make TARGET's scope equal a snapshot, in one verified transaction.

    By default the newest snapshot of the other environment is applied (dev's for prod),
    writing only the rows that differ (--full replaces every table instead). The preflight
    (see check) runs first and stops it on any error; the plan is shown before asking. A
    pre-apply backup of TARGET is archived; the transaction commits only when every row of
    every table matches the snapshot.

    \b
    snapshot apply prod
    snapshot apply prod --dry-run
    snapshot apply prod --snapshot dev/20261124T101500Z-release --yes
    """
    from snapshot.apply import run_apply

    snapshot = _choose_snapshot(app, target_env, source_env, snapshot_id)
    confirm = _confirmer(app, target_env, yes, dry_run)
    with _preflight_table(as_json):
        report = run_apply(
            app.config,
            target_env,
            snapshot,
            dry_run=dry_run,
            full=full,
            confirm=confirm,
            pg_bin=app.pg_bin,
            allow_cascades=allow_cascades,
        )
    _finish(report, as_json, _apply_failure(report))


@cli.command()
@click.argument("target_env", metavar="TARGET")
@click.option("--to", "snapshot_id", metavar="ID", help="Restore this snapshot of TARGET.")
@yes_option
@json_option
@pass_app
def rollback(app: App, target_env: str, snapshot_id: str | None, yes: bool, as_json: bool) -> None:
    """Put TARGET back as it was before the last apply (its newest pre-apply backup).

    \b
    snapshot rollback prod
    snapshot rollback prod --to prod/20261124T101500Z-pre-apply
    """
    from snapshot.apply import run_apply, settle_backups

    config = app.config
    if snapshot_id:
        snapshot = archive.find_snapshot(config.archive, snapshot_id)
    else:
        # Settle first: the newest backup may be one a killed apply sealed but never listed.
        for note in settle_backups(config, target_env):
            click.echo(note, err=True)
        snapshot = archive.newest_snapshot(config.archive, target_env, kind=archive.PRE_APPLY)
    confirm = _confirmer(app, target_env, yes, False)
    with _preflight_table(as_json):
        report = run_apply(
            config, target_env, snapshot, action="rollback", confirm=confirm, pg_bin=app.pg_bin
        )
    _finish(report, as_json, _apply_failure(report))


@cli.command()
@click.argument("target_env", metavar="TARGET")
@click.option("--from", "source_env", metavar="ENV", help="Check ENV's newest snapshot.")
@click.option("--snapshot", "snapshot_id", metavar="ID", help="Check this snapshot (see list).")
@full_option
@allow_cascade_option
@json_option
@pass_app
def check(
    app: App,
    target_env: str,
    source_env: str | None,
    snapshot_id: str | None,
    full: bool,
    allow_cascades: tuple[str, ...],
    as_json: bool,
) -> None:
    """Run the preflight of an apply to TARGET alone: find what would fail, change nothing.

    Checks the snapshot's files, the schema, migrations, foreign keys from outside the
    scope, auth user conflicts, tools, privileges, and concurrent applies, then shows the
    plan: per table, the rows to insert, update, delete and leave alone. Exits 1 on any
    error.

    \b
    snapshot check prod
    snapshot check prod --snapshot dev/20261124T101500Z --json
    """
    from snapshot.apply import check as run_check

    snapshot = _choose_snapshot(app, target_env, source_env, snapshot_id)
    report = run_check(
        app.config,
        target_env,
        snapshot,
        pg_bin=app.pg_bin,
        allow_cascades=allow_cascades,
        full=full,
    )
    click.echo(render.as_json(report.to_json()) if as_json else render.preflight_report(report))
    if not report.ok:
        count = len(report.errors)
        raise user_error(
            f"preflight found {count} error{'s' if count > 1 else ''}: apply {snapshot.id} to "
            f"{target_env} would not go through",
            1,
        )


@cli.command()
@click.argument("target_env", metavar="TARGET")
@json_option
@pass_app
def smoke(app: App, target_env: str, as_json: bool) -> None:
    """Prove TARGET's guardrails hold: try what they must refuse, then roll back.

    The checks are the SQL files in sql/smoke/. Exits 1 when one does not hold.

    \b
    snapshot smoke prod
    """
    from snapshot.smoke import smoke as run_smoke

    report = run_smoke(app.config, target_env)
    click.echo(render.as_json(report.to_json()) if as_json else render.smoke_report(report))
    if not report.ok:
        raise user_error(f"guardrails of {target_env} do not hold: {', '.join(report.broken)}", 1)


@cli.command()
@click.argument("source_env", metavar="SOURCE")
@click.argument("target_env", metavar="TARGET")
@allow_cascade_option
@yes_option
@json_option
@pass_app
def cutover(
    app: App,
    source_env: str,
    target_env: str,
    allow_cascades: tuple[str, ...],
    yes: bool,
    as_json: bool,
) -> None:
    """Run the whole cutover: preflight, take SOURCE, apply to TARGET, smoke, verify.

    Stops at the first failing step and says what state both sides are in and how to roll
    back. Exits 0 only when every step passed.

    \b
    snapshot cutover dev prod
    snapshot cutover dev prod --yes --json
    """
    from snapshot.cutover import cutover as run_cutover

    if source_env == target_env:
        raise user_error(f"cutover needs two environments, got {source_env} twice", 2)
    confirm = _confirmer(app, target_env, yes, False)
    report = run_cutover(
        app.config,
        source_env,
        target_env,
        confirm=confirm,
        pg_bin=app.pg_bin,
        allow_cascades=allow_cascades,
    )
    click.echo(render.as_json(report.to_json()) if as_json else render.cutover_report(report))
    if report.failure:
        raise user_error(report.failure, report.exit_code)


@cli.command()
@click.option(
    "--scale",
    type=click.IntRange(1, 500),
    default=1,
    show_default=True,
    help="Dataset size: about 27,000 rows per unit.",
)
@click.option("--keep", is_flag=True, help="Leave the servers running and print how to reach them.")
@click.option("--down", is_flag=True, help="Stop servers a kept or killed rehearsal left running.")
@json_option
@pass_app
def rehearse(app: App, scale: int, keep: bool, down: bool, as_json: bool) -> None:
    """Rehearse the whole cutover on two throwaway local PostgreSQL servers.

    Starts a dev and a prod server (embedded PostgreSQL, or --pg-bin), loads the app's
    schema and two diverged datasets from sql/, runs cutover dev prod, rolls prod back and
    verifies it against its state before the cutover. Needs no Docker and no system
    PostgreSQL; everything is removed afterwards unless --keep.

    \b
    snapshot rehearse
    snapshot rehearse --scale 20 --keep
    snapshot rehearse --down
    """
    from snapshot import rehearse as rehearsal

    if down:
        if keep:
            raise user_error("give --down or --keep, not both", 2)
        stopped = rehearsal.down()
        click.echo(f"stopped {stopped} rehearsal server{'s' if stopped != 1 else ''}")
        return
    report = rehearsal.rehearse(
        rehearsal.rehearsal_sql(app.config), scale=scale, keep=keep, pg_bin=app.pg_bin
    )
    click.echo(render.as_json(report.to_json()) if as_json else render.rehearsal_report(report))
    if report.failure:
        raise user_error(f"rehearsal failed: {report.failure}", 1)


@cli.command()
@click.argument("source_env", metavar="SOURCE")
@click.argument("target_env", metavar="TARGET")
@json_option
@pass_app
def verify(app: App, source_env: str, target_env: str, as_json: bool) -> None:
    """Compare two live databases over the scope: counts and checksums.

    Exits 1 when any table differs.

    \b
    snapshot verify dev prod
    """
    from snapshot.verify import verify as run_verify

    report = run_verify(app.config, source_env, target_env)
    failure = None
    if not report.matches:
        bad = [str(t.table) for t in report.tables if not t.match]
        if report.auth_users_missing:
            bad.append(f"auth.users ({report.auth_users_missing} missing in {target_env})")
        failure = f"{target_env} differs from {source_env} in {', '.join(bad)}"
    _finish(report, as_json, failure)


def main() -> None:
    """Console entry point."""
    with contextlib.suppress(BrokenPipeError):
        cli(prog_name="snapshot")
