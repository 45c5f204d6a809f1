"""The command line: parses options, calls one capability, renders its result. Nothing else."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
import psycopg

from snapshot import __version__, archive, direction, interrupts, progress, render
from snapshot.config import CONFIG_FILE, Config, load_config
from snapshot.db import error_sentence
from snapshot.errors import SnapshotError
from snapshot.parity import parity_failure
from snapshot.prune import retain

if TYPE_CHECKING:  # the commands' modules load only when a command runs
    from snapshot.apply.report import ApplyPlan, ApplyReport, Confirm
    from snapshot.preflight import PreflightReport

F = TypeVar("F", bound=Callable[..., Any])
log = logging.getLogger("snapshot")


class RuntimeFailure(click.ClickException):
    """Something failed while running (exit code 1)."""

    exit_code = 1


class UsageFailure(click.ClickException):
    """Bad usage or configuration (exit code 2)."""

    exit_code = 2


class InterruptedFailure(click.ClickException):
    """Ctrl-C or a terminating signal (130 for SIGINT, 143 for SIGTERM, as shells report them)."""

    def __init__(self, message: str, exit_code: int = 130) -> None:
        super().__init__(message)
        self.exit_code = exit_code  # type: ignore[misc]  # click declares it per class


def user_error(message: str, exit_code: int) -> click.ClickException:
    """A one-line error with the exit code its cause calls for."""
    if exit_code > 128:
        return InterruptedFailure(message, exit_code)
    return UsageFailure(message) if exit_code == 2 else RuntimeFailure(message)


def _as_user_error(ctx: click.Context, exc: Exception) -> click.ClickException | None:
    """The one line and exit code for an error a user can act on; None for a bug."""
    if isinstance(exc, click.ClickException):
        return exc
    if isinstance(exc, SnapshotError):
        return user_error(str(exc), exc.exit_code)
    # Failures of the server or the connection (time limits and lock waits among them), and
    # privileges: the user can act on them. Any other database error is a bug.
    if isinstance(exc, psycopg.OperationalError | psycopg.errors.InsufficientPrivilege):
        name = ctx.invoked_subcommand or "snapshot"
        return user_error(error_sentence(exc, "the database", f"running {name}"), 1)
    return None


_ARGV = "snapshot.argv"


class Group(click.Group):
    """Turns the tool's errors, and database failures, into one line and an exit code.

    With ``--json``, stdout gets exactly one JSON document whatever happens: the command's
    report, with an ``error`` field when it failed (``{"error": ...}`` when there is none).
    """

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta[_ARGV] = list(args)
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            with interrupts.termination_as_interrupt():  # SIGTERM ends a command as Ctrl-C does
                result = super().invoke(ctx)
        except Exception as exc:
            failure = _as_user_error(ctx, exc)
            if failure is None:
                raise
            _print_document(ctx, failure)
            raise failure from None
        except KeyboardInterrupt as exc:
            # Commands that change a database turn Ctrl-C into Interrupted with the state;
            # anything else wrote nothing that stays (take's folder is removed unpublished).
            failure = user_error(
                f"{interrupts.words(exc)}: nothing was changed", interrupts.exit_code(exc)
            )
            _print_document(ctx, failure)
            raise failure from None
        _print_document(ctx, None)
        return result


def _print_document(ctx: click.Context, failure: click.ClickException | None) -> None:
    """Print the JSON document of a ``--json`` run (see :class:`Group`)."""
    app = ctx.obj if isinstance(ctx.obj, App) else None
    if not ((app is not None and app.as_json) or "--json" in ctx.meta.get(_ARGV, ())):
        return
    document = app.document if app is not None else None
    if failure is not None:
        error = failure.format_message()
        if isinstance(document, dict):
            document = {**document, "error": error}
        elif document is None:
            document = {"error": error}
        else:
            document = {"result": document, "error": error}
    if document is not None:
        click.echo(render.as_json(document))


@dataclass
class App:
    """Options shared by every command, and the JSON document a command produced."""

    config_path: Path | None
    option_pg_bin: Path | None
    verbose: int = 0
    quiet: bool = False
    as_json: bool = False
    document: Any = None

    @functools.cached_property
    def config(self) -> Config:
        return load_config(self.config_path)

    @property
    def pg_bin(self) -> Path | None:
        """--pg-bin/PG_BIN, else pg_bin in snapshot.toml, else None (search)."""
        return self.option_pg_bin or self.config.pg_bin

    def output(self, document: Any, text: Callable[[], str]) -> None:
        """Print ``text()``, or keep ``document`` for the one JSON document of ``--json``."""
        if self.as_json:
            self.document = document
        else:
            click.echo(text())


pass_app = click.make_pass_decorator(App)


def _global_option(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """A global option given after the subcommand (``snapshot take dev -v``)."""
    app = ctx.find_object(App)
    if app is None or value in (None, 0, False):
        return value
    if param.name == "config_path":
        app.config_path = value
        app.__dict__.pop("config", None)
    elif param.name == "pg_bin":
        app.option_pg_bin = value
    elif param.name == "verbose":
        app.verbose += value
    elif param.name == "quiet":
        app.quiet = True
    _setup_logging(app.verbose, app.quiet)
    return value


CONFIG_HELP = (
    f"Config file (default: the nearest {CONFIG_FILE} at or above the working directory). "
    "Env files and the archive resolve relative to its folder."
)
PG_BIN_HELP = (
    "Directory holding pg_dump/pg_restore (default: pg_bin in snapshot.toml, PATH, the usual "
    "install places, then the bundled PostgreSQL)."
)


def global_options(f: F) -> F:
    """--config, --pg-bin, -v and -q, accepted after the subcommand as well as before it."""
    options = [
        click.option(
            "--config",
            "config_path",
            type=click.Path(path_type=Path, dir_okay=False),
            expose_value=False,
            callback=_global_option,
            help=CONFIG_HELP,
        ),
        click.option(
            "--pg-bin",
            type=click.Path(path_type=Path, file_okay=False),
            expose_value=False,
            callback=_global_option,
            help=PG_BIN_HELP,
        ),
        click.option(
            "-v",
            "--verbose",
            count=True,
            expose_value=False,
            callback=_global_option,
            help="Show debug output, commands included.",
        ),
        click.option(
            "-q",
            "--quiet",
            is_flag=True,
            expose_value=False,
            callback=_global_option,
            help="Show only warnings and errors on stderr.",
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _json_flag(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    app = ctx.find_object(App)
    if app is not None and value:
        app.as_json = True
    return value


def json_option(f: F) -> F:
    """``--json``: print one machine-readable document instead of a table, even on failure."""
    return click.option(
        "--json",
        "as_json",
        is_flag=True,
        callback=_json_flag,
        help="Print one JSON document instead of a table (with an error field on failure).",
    )(f)


def yes_option(f: F) -> F:
    """``--yes``: do not ask before changing an environment that is not marked safe."""
    return click.option(
        "--yes", "-y", is_flag=True, help="Do not ask for confirmation (for scripts and CI)."
    )(f)


def unmasked_option(f: F) -> F:
    """``--unmasked``: take, or apply to a safe environment, real people's data as it is."""
    return click.option(
        direction.UNMASKED,
        "unmasked",
        is_flag=True,
        help="Take an environment not marked safe, or apply its snapshot to one that is, as "
        "it is: real people's logins, password hashes and personal columns included.",
    )(f)


def create_auth_users_option(f: F) -> F:
    """``--create-auth-users``: with --unmasked, create the snapshot's auth users too."""
    return click.option(
        direction.CREATE_AUTH_USERS,
        "create_auth_users",
        is_flag=True,
        help="With --unmasked: also create the auth users of a snapshot of an environment not "
        "marked safe (real people's logins) in the safe target.",
    )(f)


def block_readers_option(f: F) -> F:
    """``--block-readers``: check the scope's foreign keys in bulk; readers wait."""
    return click.option(
        "--block-readers",
        is_flag=True,
        help="Drop and re-add the scope's own foreign keys to check them in bulk, for a role "
        "that may not set session_replication_role (large changes are otherwise checked in "
        "bulk already): readers of those tables wait until the commit.",
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


def keep_referenced_option(f: F) -> F:
    """``--keep-referenced``: keep the target's rows that rows outside the scope refer to."""
    return click.option(
        "--keep-referenced",
        is_flag=True,
        help="Keep the target's rows the snapshot lacks that rows outside the scope refer to "
        "(instead of refusing); the reports count them as kept ([apply] keep_referenced).",
    )(f)


def _preflight_failure(report: PreflightReport, message: str) -> click.ClickException:
    """The error line of a failed preflight: the verdict, then the first error itself.

    The cause is on stderr too, so ``-q`` or a redirected stdout never hides it. A missing
    or too old pg_dump/pg_restore is an installation problem: exit 2, as in take.
    """
    first = report.errors[0]
    more = len(report.errors) - 1
    cause = f"{first.check}: {first.detail}" + (f" (and {more} more)" if more else "")
    return user_error(f"{message}; {cause}", report.exit_code)


@contextlib.contextmanager
def _preflight_table(app: App) -> Iterator[None]:
    """Show the preflight's table (or keep its JSON) when it refuses, then the one-line error."""
    from snapshot.preflight import PreflightFailed

    try:
        yield
    except PreflightFailed as exc:
        report = exc.report
        app.output(report.to_json(), lambda: render.preflight_report(report))
        raise _preflight_failure(report, str(exc)) from None


def _confirmer(
    app: App, target: str, yes: bool, dry_run: bool, way: direction.Direction | None = None
) -> Confirm | None:
    """Ask the user to type the environment's name, unless --yes was given or it needs no
    asking (:func:`snapshot.direction.needs_confirmation`)."""
    if yes or dry_run or not direction.needs_confirmation(app.config, target, way):
        return None
    unusual = way is not None and not way.usual
    if not sys.stdin.isatty():
        # Never advise marking it safe: that would turn off the question for good.
        npm_script = os.environ.get("npm_lifecycle_event")  # noqa: SIM112 (npm's own name)
        how = f"npm run {npm_script} -- --yes" if npm_script else "pass --yes"
        why = f": {way.unusual_sentence()}, and" if way is not None and unusual else ":"
        raise user_error(
            f"refusing to change {target} without confirmation{why} there is no terminal to "
            f"ask in; {how} to confirm from a script",
            2,
        )

    def confirm(proposal: ApplyPlan) -> bool:
        click.echo(render.plan_report(proposal), err=True)
        if way is not None and unusual:
            click.echo(f"\nwarning: {way.unusual_sentence()}", err=True)
        click.echo(f"\n{render.confirm_question(proposal)}: ", nl=False, err=True)
        try:
            typed = input()  # Ctrl-C here is KeyboardInterrupt: nothing was changed, exit 130
        except EOFError:
            typed = ""
        return typed.strip() == target

    return confirm


def _finish(app: App, report: ApplyReport) -> None:
    """Print an apply's or rollback's report (table or JSON) and its notes; exit 1 with the
    parity failure as the error line when it rolled back for that."""
    app.output(report.to_json(), lambda: render.apply_report(report))
    failure = parity_failure(
        report.tables, report.target, auth_missing=report.auth.missing_after if report.auth else 0
    )
    # A failed run's notes tell what was tried: none of it stayed.
    label = "note (rolled back with the rest)" if failure else "note"
    for note in report.notes:
        click.echo(f"{label}: {note}", err=True)
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
    help=CONFIG_HELP,
)
@click.option(
    "--pg-bin",
    type=click.Path(path_type=Path, file_okay=False),
    envvar="PG_BIN",
    help=PG_BIN_HELP,
)
@click.option("-v", "--verbose", count=True, help="Show debug output, commands included.")
@click.option("-q", "--quiet", is_flag=True, help="Show only warnings and errors on stderr.")
@click.pass_context
def cli(
    ctx: click.Context, config_path: Path | None, pg_bin: Path | None, verbose: int, quiet: bool
) -> None:
    """Make one PostgreSQL database's data match another's, safely, with pg_dump/pg_restore.

    Global options (--config, --pg-bin, -v, -q) go before or after the command.

    \b
    snapshot take dev          archive a snapshot of dev's scope
    snapshot apply prod        apply dev's newest snapshot to prod
    snapshot verify dev prod   compare the two live databases
    """
    _setup_logging(verbose, quiet)
    ctx.obj = App(config_path, pg_bin, verbose, quiet)


@cli.command()
@click.option("--force", is_flag=True, help="Overwrite an existing config file.")
@global_options
@pass_app
def init(app: App, force: bool) -> None:
    """Write a commented snapshot.toml for this app, in the project root.

    The scope is read from dev when its env file answers: the tables of its public schema
    in foreign-key order, auth users if it has Supabase Auth's tables. Otherwise the
    bundled example app's scope is written, and init says why. The project root is the
    nearest folder at or above this one holding snapshot.toml or .env.local/.env.production
    (else this folder).

    \b
    snapshot init
    snapshot init --force
    """
    from snapshot.init import summary, write_config

    path, proposal = write_config(app.config_path, force=force)
    click.echo(f"wrote {path}")
    if proposal.read_from:
        log.info("%s", summary(proposal))
    else:
        log.warning("warning: %s", summary(proposal))


@cli.command()
@click.argument("env_name", metavar="ENV")
@json_option
@global_options
@pass_app
def env(app: App, env_name: str, as_json: bool) -> None:
    """Show how ENV is reached (password masked) and whether it answers.

    \b
    snapshot env prod
    """
    from snapshot.envinfo import probe_environment

    report = probe_environment(app.config, env_name)
    app.output(report.to_json(), lambda: render.env_report(report))
    if report.failure:
        raise user_error(report.failure, 1)


@cli.command()
@click.argument("env_name", metavar="ENV")
@click.option("--label", help="Suffix for the snapshot's name, e.g. before-cutover.")
@unmasked_option
@click.option(
    "--whole",
    is_flag=True,
    help="Take every row, ignoring [subset] in snapshot.toml.",
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="Plan the take and count what a subset keeps, then roll back: archive nothing.",
)
@json_option
@global_options
@pass_app
def take(
    app: App,
    env_name: str,
    label: str | None,
    unmasked: bool,
    whole: bool,
    dry_run: bool,
    as_json: bool,
) -> None:
    """Archive a consistent, data-only snapshot of ENV's scope.

    An environment not marked safe (prod) holds real people's data: it is taken masked, by
    the rules of [masking] in snapshot.toml and the key in $SNAPSHOT_MASK_KEY, or as it is
    with --unmasked; with [subset], it keeps part of the rows, every foreign key holding
    (a subsetted snapshot goes only to environments marked safe); --whole takes them all.
    An environment marked safe (dev) is always taken whole. --dry-run shows the rows each
    subsetted table would keep (the subset closed in the source, read only) and dumps nothing.

    \b
    snapshot take dev
    snapshot take dev --label before-cutover
    SNAPSHOT_MASK_KEY=... snapshot take prod
    SNAPSHOT_MASK_KEY=... snapshot take prod --dry-run
    """
    from snapshot.take import preview
    from snapshot.take import take as take_snapshot

    if dry_run:
        found = preview(app.config, env_name, pg_bin=app.pg_bin, unmasked=unmasked, whole=whole)
        app.output(found.to_json(), lambda: render.take_preview(found))
        return

    snapshot = take_snapshot(
        app.config, env_name, label=label, pg_bin=app.pg_bin, unmasked=unmasked, whole=whole
    )
    app.output(render.snapshot_summary(snapshot), lambda: render.take_report(snapshot))
    retain(app.config, env_name)


@cli.command(name="list")
@click.argument("env_name", metavar="[ENV]", required=False)
@json_option
@global_options
@pass_app
def list_(app: App, env_name: str | None, as_json: bool) -> None:
    """List archived snapshots, newest first, each file checked against its sha256.

    \b
    snapshot list
    snapshot list prod
    """
    from snapshot.history import shared_databases

    if env_name is not None:
        app.config.require_known(env_name)
    snapshots, damaged = archive.scan_archive(app.config.archive, env_name, verify=True)
    shared = shared_databases(archive.list_snapshots(app.config.archive))
    if as_json:
        app.document = render.list_document(snapshots, damaged, shared)
    elif snapshots or damaged:
        click.echo(render.list_report(snapshots, damaged, shared))
    else:
        where = f" of {env_name}" if env_name else ""
        folder = app.config.archive.resolve()
        click.echo(f"no snapshots{where} in the archive folder {folder}", err=True)


@cli.command()
@click.argument("env_name", metavar="[ENV]", required=False)
@click.option(
    "--keep",
    type=click.IntRange(min=1),
    metavar="N",
    help="Keep the newest N per environment and kind (default: [retention] keep).",
)
@click.option("--dry-run", is_flag=True, help="List what would be deleted; delete nothing.")
@json_option
@global_options
@pass_app
def prune(app: App, env_name: str | None, keep: int | None, dry_run: bool, as_json: bool) -> None:
    """Delete old snapshots: keep the newest N per environment and kind.

    Kinds are takes, pre-apply backups and pre-rollback backups. The newest pre-apply
    backup of each environment (what rollback restores) is always kept.

    \b
    snapshot prune --keep 5 --dry-run
    snapshot prune prod
    """
    from snapshot.prune import prune as run_prune

    keep = keep or app.config.retention
    if keep is None:
        raise user_error(
            "how many snapshots should stay? pass --keep N, or set [retention] keep in "
            "snapshot.toml",
            2,
        )
    if env_name is not None:
        app.config.require_known(env_name)
    report = run_prune(app.config.archive, keep, env_name, dry_run=dry_run)
    app.output(report.to_json(), lambda: render.prune_report(report))


@cli.command()
@click.argument("target_env", metavar="TARGET")
@click.option("--from", "source_env", metavar="ENV", help="Apply ENV's newest snapshot.")
@click.option(
    "--snapshot", "snapshot_id", metavar="ID", help="Apply this snapshot (snapshot list)."
)
@click.option("--dry-run", is_flag=True, help="Do everything, then roll back: changes nothing.")
@full_option
@block_readers_option
@allow_cascade_option
@keep_referenced_option
@unmasked_option
@create_auth_users_option
@yes_option
@json_option
@global_options
@pass_app
def apply(
    app: App,
    target_env: str,
    source_env: str | None,
    snapshot_id: str | None,
    dry_run: bool,
    full: bool,
    block_readers: bool,
    allow_cascades: tuple[str, ...],
    keep_referenced: bool,
    unmasked: bool,
    create_auth_users: bool,
    yes: bool,
    as_json: bool,
) -> None:
    """Make TARGET's scope equal a snapshot, in one verified transaction.

    By default the newest snapshot of the other environment is applied (dev's for prod),
    writing only the rows that differ (--full replaces every table instead). The preflight
    (see check) runs first and stops it on any error; the plan is shown before asking. A
    pre-apply backup of TARGET is archived; the transaction commits only when every row of
    every table matches the snapshot. Readers of TARGET never wait, unless --block-readers.
    A snapshot of an environment not marked safe goes to one that is only with --unmasked
    (its auth users only with --create-auth-users); any other direction than dev -> prod
    asks first, even onto a safe environment.

    \b
    snapshot apply prod
    snapshot apply prod --dry-run
    snapshot apply prod --snapshot dev/20261124T101500Z-release --yes
    """
    from snapshot.apply import run_apply

    snapshot = direction.choose_snapshot(app.config, target_env, source_env, snapshot_id)
    way = direction.of_snapshot(
        app.config,
        snapshot.manifest,
        snapshot.id,
        target_env,
        unmasked=unmasked,
        create_auth_users=create_auth_users,
    )
    confirm = _confirmer(app, target_env, yes, dry_run, way)
    with _preflight_table(app):
        report = run_apply(
            app.config,
            target_env,
            snapshot,
            dry_run=dry_run,
            full=full,
            confirm=confirm,
            pg_bin=app.pg_bin,
            allow_cascades=allow_cascades,
            block_readers=block_readers,
            keep_referenced=keep_referenced,
            auth_withheld=way.auth_withheld,
        )
    _finish(app, report)
    if report.committed:
        retain(app.config, target_env)


@cli.command()
@click.argument("target_env", metavar="TARGET")
@click.option("--to", "snapshot_id", metavar="ID", help="Restore this snapshot of TARGET.")
@click.option("--dry-run", is_flag=True, help="Do everything, then roll back: changes nothing.")
@allow_cascade_option
@keep_referenced_option
@yes_option
@json_option
@global_options
@pass_app
def rollback(
    app: App,
    target_env: str,
    snapshot_id: str | None,
    dry_run: bool,
    allow_cascades: tuple[str, ...],
    keep_referenced: bool,
    yes: bool,
    as_json: bool,
) -> None:
    """Put TARGET back as it was before the last apply (its newest pre-apply backup).

    The newest backup of TARGET's database is restored, whatever environment name the
    apply ran under (snapshot list shows which names are one database). Rows written since
    that apply are thrown away with it: the plan, the prompt, --dry-run and --json count
    them per table.

    \b
    snapshot rollback prod
    snapshot rollback prod --dry-run
    snapshot rollback prod --to prod/20261124T101500Z-pre-apply
    snapshot rollback prod --allow-cascade public.audit.audit_item_id_fkey
    """
    from snapshot.apply import run_apply
    from snapshot.history import rollback_choice

    choice = rollback_choice(app.config, target_env, snapshot_id)
    for note in choice.notes:
        click.echo(note, err=True)
    confirm = _confirmer(app, target_env, yes, dry_run)
    with _preflight_table(app):
        report = run_apply(
            app.config,
            target_env,
            choice.backup,
            action="rollback",
            dry_run=dry_run,
            confirm=confirm,
            pg_bin=app.pg_bin,
            allow_cascades=allow_cascades,
            keep_referenced=keep_referenced,
        )
    _finish(app, report)
    if report.committed:
        retain(app.config, target_env)


@cli.command()
@click.argument("target_env", metavar="TARGET")
@click.option("--from", "source_env", metavar="ENV", help="Check ENV's newest snapshot.")
@click.option("--snapshot", "snapshot_id", metavar="ID", help="Check this snapshot (see list).")
@full_option
@allow_cascade_option
@keep_referenced_option
@unmasked_option
@create_auth_users_option
@json_option
@global_options
@pass_app
def check(
    app: App,
    target_env: str,
    source_env: str | None,
    snapshot_id: str | None,
    full: bool,
    allow_cascades: tuple[str, ...],
    keep_referenced: bool,
    unmasked: bool,
    create_auth_users: bool,
    as_json: bool,
) -> None:
    """Run the preflight of an apply to TARGET alone: find what would fail, change nothing.

    Checks the snapshot's files, the schema, migrations, foreign keys from outside the
    scope, auth user conflicts, tools, privileges, and concurrent applies, then shows the
    plan: per table, the rows to insert, update, delete and leave alone. Exits 1 on any
    error (2 when pg_dump or pg_restore is missing or too old).

    \b
    snapshot check prod
    snapshot check prod --snapshot dev/20261124T101500Z --json
    """
    from snapshot.apply import check as run_check

    snapshot = direction.choose_snapshot(app.config, target_env, source_env, snapshot_id)
    way = direction.of_snapshot(
        app.config,
        snapshot.manifest,
        snapshot.id,
        target_env,
        unmasked=unmasked,
        create_auth_users=create_auth_users,
    )
    report = run_check(
        app.config,
        target_env,
        snapshot,
        pg_bin=app.pg_bin,
        allow_cascades=allow_cascades,
        full=full,
        keep_referenced=keep_referenced,
        auth_withheld=way.auth_withheld,
    )
    app.output(report.to_json(), lambda: render.preflight_report(report))
    if not report.ok:
        count = len(report.errors)
        raise _preflight_failure(
            report,
            f"preflight found {count} error{'s' if count > 1 else ''}: apply {snapshot.id} to "
            f"{target_env} would not go through",
        )


@cli.command()
@click.argument("target_env", metavar="TARGET")
@json_option
@global_options
@pass_app
def smoke(app: App, target_env: str, as_json: bool) -> None:
    """Prove TARGET's guardrails hold: try what they must refuse, then roll back.

    The checks are the SQL files in sql/smoke/. Exits 1 when one does not hold, or when
    every check was skipped (nothing tested is no pass).

    \b
    snapshot smoke prod
    """
    from snapshot.smoke import smoke as run_smoke

    report = run_smoke(app.config, target_env)
    app.output(report.to_json(), lambda: render.smoke_report(report))
    if report.failure:
        raise user_error(report.failure, 1)


@cli.command()
@click.argument("source_env", metavar="SOURCE")
@click.argument("target_env", metavar="TARGET")
@allow_cascade_option
@unmasked_option
@create_auth_users_option
@yes_option
@json_option
@global_options
@pass_app
def cutover(
    app: App,
    source_env: str,
    target_env: str,
    allow_cascades: tuple[str, ...],
    unmasked: bool,
    create_auth_users: bool,
    yes: bool,
    as_json: bool,
) -> None:
    """Run the whole cutover: preflight, take SOURCE, apply to TARGET, smoke, verify.

    Stops at the first failing step and says what state both sides are in and how to roll
    back. Exits 0 only when every step passed. A SOURCE not marked safe is taken only with
    --unmasked; any direction but dev -> prod asks first.

    \b
    snapshot cutover dev prod
    snapshot cutover dev prod --yes --json
    """
    from snapshot.cutover import cutover as run_cutover

    if source_env == target_env:
        raise user_error(f"cutover needs two environments, got {source_env} twice", 2)
    way = direction.of_cutover(
        app.config,
        source_env,
        target_env,
        unmasked=unmasked,
        create_auth_users=create_auth_users,
    )
    confirm = _confirmer(app, target_env, yes, False, way)
    report = run_cutover(
        app.config,
        source_env,
        target_env,
        confirm=confirm,
        pg_bin=app.pg_bin,
        allow_cascades=allow_cascades,
        unmasked=unmasked,
        auth_withheld=way.auth_withheld,
    )
    app.output(report.to_json(), lambda: render.cutover_report(report))
    if report.failure:
        raise user_error(report.failure, report.exit_code)
    retain(app.config, source_env, target_env)


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
@global_options
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
        app.output(
            {"stopped": stopped},
            lambda: f"stopped {stopped} rehearsal server{'s' if stopped != 1 else ''}",
        )
        return
    report = rehearsal.rehearse(
        rehearsal.rehearsal_sql(app.config), scale=scale, keep=keep, pg_bin=app.pg_bin
    )
    app.output(report.to_json(), lambda: render.rehearsal_report(report))
    if report.failure:
        raise user_error(f"rehearsal failed: {report.failure}", 1)


@cli.command()
@click.argument("source_env", metavar="SOURCE")
@click.argument("target_env", metavar="TARGET")
@json_option
@global_options
@pass_app
def verify(app: App, source_env: str, target_env: str, as_json: bool) -> None:
    """Compare two live databases over the scope: counts and checksums.

    Exits 1 when any table differs.

    \b
    snapshot verify dev prod
    """
    from snapshot.verify import verify as run_verify

    for name in (source_env, target_env):
        app.config.environment(name)  # a typo is named before anything connects
    report = run_verify(app.config, source_env, target_env)
    app.output(report.to_json(), lambda: render.verify_report(report))
    if report.failure:
        raise user_error(report.failure, 1)


def main() -> None:
    """Console entry point.

    The process ends without the interpreter's teardown, which frees every object and
    library one by one (about 40 ms a command). By then the command is done: its threads
    are joined, its connections and files closed; output and logs are flushed here first.
    """
    code: int | str | None = 0
    try:
        with contextlib.suppress(BrokenPipeError):
            cli(prog_name="snapshot")
    except SystemExit as exc:
        code = exc.code
    if isinstance(code, str):  # sys.exit("message"): printed, exit status 1
        print(code, file=sys.stderr)
        code = 1
    if sys.getprofile() is not None or sys.gettrace() is not None:
        sys.exit(code)  # a profiler or coverage writes its data at the interpreter's exit
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code or 0)
