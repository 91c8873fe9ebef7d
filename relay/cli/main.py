"""The `outbox-relay` command line."""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from relay.infra.config import Settings

__all__ = ["main"]

_DESCRIPTION = """\
Transactional-outbox relay for payments. Applications INSERT payment intents into
outbox.payment_intents in their own transaction; the relay calls the provider exactly
once per intent and writes the outcome back.

Configuration comes from RELAY_* environment variables (see the README's table)."""


def _database_url_or_exit() -> str:
    from relay.infra.config import ConfigError, load_settings

    try:
        settings = load_settings()
    except ConfigError as exc:
        _print_config_error(exc)
        raise SystemExit(2) from None
    url = _resolved_database_url(settings)
    if not url:
        print(
            "error: RELAY_DATABASE_URL is not set; point it at your PostgreSQL, e.g. "
            "RELAY_DATABASE_URL=postgresql://app@db:5432/app",
            file=sys.stderr,
        )
        raise SystemExit(2)
    return url


def _resolved_database_url(settings: Settings) -> str | None:
    """The database URL, or exit 2 naming the file when RELAY_DATABASE_URL_FILE is unreadable."""
    try:
        return settings.resolved_database_url()
    except OSError as exc:
        print(
            f"error: RELAY_DATABASE_URL_FILE {settings.database_url_file} cannot be read "
            f"({exc.strerror or type(exc).__name__})",
            file=sys.stderr,
        )
        raise SystemExit(2) from None


def _print_config_error(exc: Exception) -> None:
    lines = getattr(exc, "lines", [str(exc)])
    print(f"error: invalid configuration ({len(lines)} problem(s)):", file=sys.stderr)
    for line in lines:
        print(f"  {line}", file=sys.stderr)


def _cmd_migrate(args: argparse.Namespace) -> int:
    from relay.infra.migrate import MigrationError, migrate

    url = _database_url_or_exit()
    try:
        applied = migrate(url, report=print)
    except MigrationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{len(applied)} migration(s) applied" if applied else "schema is up to date")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    import anyio

    from relay.infra.config import ConfigError, load_settings, unknown_variables
    from relay.infra.db_startup import StartupRefused
    from relay.infra.logs import configure_logging
    from relay.service.health import HttpPortUnavailable
    from relay.service.main import log_unknown_variables, run_relay

    try:
        settings = load_settings(warn_unknown=False)
    except ConfigError as exc:
        # No log format to log in: the warnings go as plain lines, like the error.
        for line in unknown_variables(os.environ):
            print(line, file=sys.stderr)
        _print_config_error(exc)
        return 2
    # From here every line `run` writes about itself is a log line (JSON in production).
    configure_logging(settings.log_format)
    log_unknown_variables(os.environ)
    url = _resolved_database_url(settings)
    if not url:
        print("error: RELAY_DATABASE_URL is not set", file=sys.stderr)
        return 2
    if not settings.providers:
        print(
            "error: no provider configured; set at least RELAY_PROVIDERS__STRIPE__API_KEY "
            "(or __API_KEY_FILE) and, for the fake provider, RELAY_PROVIDERS__STRIPE__BASE_URL",
            file=sys.stderr,
        )
        return 2
    if args.migrate:
        from relay.infra.migrate import migrate

        migrate(url)
    try:
        return anyio.run(run_relay, settings, url)
    except BaseExceptionGroup as group:
        # What stops start-up for good, raised inside the task group: one line, exit 2.
        refused, _ = group.split((HttpPortUnavailable, StartupRefused))
        if refused is None:
            raise
        print(f"error: {_first_leaf(refused)}", file=sys.stderr)
        return 2
    except (HttpPortUnavailable, StartupRefused) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first exception of a (possibly nested) exception group."""
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


def _cmd_fake_provider(args: argparse.Namespace) -> int:
    from provider_adapters.fake import run_from_args

    result: int = run_from_args(args)
    return result


# The fake providers ship in outbox-relay-demo (demo/pyproject.toml), which the production
# package does not depend on: without them, `demo` and `fake-provider` say what to install.
_DEMO_MISSING = (
    "error: `outbox-relay {command}` needs the fake providers, which are not installed "
    "(they ship in outbox-relay-demo, not in the production package); from a clone of the "
    "repository: pip install '.[demo]' ./demo"
)


def _demo_installed() -> bool:
    return importlib.util.find_spec("provider_adapters.fake") is not None


def _cmd_demo_missing(args: argparse.Namespace) -> int:
    print(_DEMO_MISSING.format(command=args.command), file=sys.stderr)
    return 2


def _cmd_demo(args: argparse.Namespace) -> int:
    if not _demo_installed():
        return _cmd_demo_missing(args)
    from relay.cli.demo import run_demo

    result: int = run_demo(args)
    return result


def _cmd_status(args: argparse.Namespace) -> int:
    from relay.cli.status import print_status

    result: int = print_status(_database_url_or_exit(), as_json=args.json)
    return result


def _fraction(text: str) -> float:
    """An argparse type: a share between 0 and 1 (argparse names the option on error)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {text!r}") from None
    if not 0.0 <= value <= 1.0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {text}")
    return value


def _int_in(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: a whole number from ``low`` to ``high``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a whole number from {low} to {high}, got {text!r}"
            ) from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(
                f"expected a whole number from {low} to {high}, got {text}"
            )
        return value

    return parse


def _seconds(text: str) -> float:
    """An argparse type: a duration in seconds, above 0 and finite."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds above 0, got {text!r}") from None
    if not 0.0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected seconds above 0, got {text}")
    return value


def _installed_version() -> str:
    """The installed distribution's version, as pip shows it."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("outbox-relay")
    except PackageNotFoundError:  # run from a source tree that was never pip-installed
        return "(version unknown: not installed; pip install . from the repository)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="outbox-relay",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"%(prog)s {_installed_version()}",
        help="print the installed version and exit",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    migrate = commands.add_parser(
        "migrate",
        help="apply the schema migrations (safe to re-run, safe from many replicas)",
        description="Apply the numbered SQL files in order, each once, under an advisory lock.",
    )
    migrate.set_defaults(handler=_cmd_migrate)

    run = commands.add_parser(
        "run",
        help="run the relay until SIGTERM/SIGINT",
        description="Claim intents, call providers, write outcomes back. "
        "SIGTERM drains within RELAY_SHUTDOWN_GRACE_SECONDS; a second signal exits at once.",
    )
    run.add_argument("--migrate", action="store_true", help="apply migrations before starting")
    run.set_defaults(handler=_cmd_run)

    fake_help = "serve the fake Stripe-compatible provider (tests, demos)"
    # Printed as written (the test-card table under the options is aligned): wrapped here.
    fake_description = (
        "A Stripe-compatible fake with idempotency, test cards and fault injection.\n"
        "GET /_fake/effects shows the effects applied per idempotency key."
    )
    if _demo_installed():
        fake = commands.add_parser("fake-provider", help=fake_help, description=fake_description)
        from provider_adapters.fake import add_cli_arguments

        add_cli_arguments(fake)
        fake.set_defaults(handler=_cmd_fake_provider)
    else:
        # Any arguments (even --help, hence no option prefix at all) lead to what to install.
        absent = commands.add_parser(
            "fake-provider",
            help=fake_help + "; needs the demo extra",
            add_help=False,
            prefix_chars="\0",
        )
        absent.add_argument("ignored", nargs="*")
        absent.set_defaults(handler=_cmd_demo_missing)

    demo = commands.add_parser(
        "demo",
        help="run a self-contained demo (embedded PostgreSQL, fake provider, faults on)"
        + ("" if _demo_installed() else "; needs the demo extra"),
        description="Migrates, starts the fake Stripe and Adyen providers, inserts a mixed "
        "workload for each, relays it to the end and checks exactly-once against each "
        "provider's effect counts. Uses "
        "RELAY_DATABASE_URL when set, else an embedded PostgreSQL in a temporary directory. "
        "Exit status 0 only if the exactly-once check holds.",
    )
    demo.add_argument(
        "--payments",
        type=_int_in(1, 1_000_000),
        default=300,
        help="payments to create, 1 to 1000000 (default 300)",
    )
    demo.add_argument(
        "--adyen-payments",
        type=_int_in(0, 1_000_000),
        default=None,
        help="payments for Adyen beside Stripe's, 0 to 1000000 (default: a third of "
        "--payments; 0: Stripe only), with Stripe's mix: Adyen's captures, cancels and "
        "refunds are confirmed by webhook, through the demo's webhook receiver",
    )
    demo.add_argument(
        "--relays", type=_int_in(1, 64), default=2, help="relay instances, 1 to 64 (default 2)"
    )
    demo.add_argument("--seed", type=int, default=7, help="random seed (default 7)")
    demo.add_argument(
        "--rate-429",
        type=_fraction,
        default=0.03,
        help="share of 429 replies, 0 to 1 (default %(default)s)",
    )
    demo.add_argument(
        "--rate-503",
        type=_fraction,
        default=0.02,
        help="share of 503 replies, 0 to 1 (default %(default)s)",
    )
    demo.add_argument(
        "--rate-timeout-after-effect",
        type=_fraction,
        default=0.02,
        help="share of calls applied, then left unanswered past the client timeout, 0 to 1 "
        "(default %(default)s)",
    )
    demo.add_argument(
        "--rate-500-after-effect",
        type=_fraction,
        default=0.02,
        help="share of calls applied, then answered 500 (replayed for that key), 0 to 1 "
        "(default %(default)s)",
    )
    demo.add_argument(
        "--rate-malformed",
        type=_fraction,
        default=0.01,
        help="share of bad bodies, 0 to 1 (default %(default)s)",
    )
    demo.add_argument(
        "--latency-ms",
        type=_int_in(0, 60_000),
        default=5,
        help="fake provider latency, 0 to 60000 (default 5)",
    )
    demo.add_argument(
        "--deadline-seconds",
        type=_seconds,
        default=300.0,
        help="give up, exit 1 and name what is stuck, when the workload is not finished "
        "this long after relaying starts (default 300)",
    )
    demo.set_defaults(handler=_cmd_demo)

    status = commands.add_parser(
        "status",
        help="queue depth by provider and status, dead intents, unpublished events",
        description="Queue depth by provider and status, the wait of the oldest due pending "
        "intent, how many intents are dead and how many result events are unpublished.",
    )
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(handler=_cmd_status)

    from relay.cli import dead_letters
    from relay.cli import intents as intents_show

    intents_show.add_commands(commands, _database_url_or_exit)

    from relay.cli import flows as flows_cli  # sql/0072 to sql/0085

    flows_cli.add_commands(commands, _database_url_or_exit)
    dead_letters.add_commands(commands, _database_url_or_exit)

    from relay.cli import finance as finance_cli  # ledger check, audit verify, reconcile...
    from relay.cli import webhooks as webhooks_cli

    webhooks_cli.add_commands(commands, _database_url_or_exit)

    finance_cli.add_commands(commands, _database_url_or_exit)

    from relay.cli import fx as fx_cli  # fx import|show|convert|history

    fx_cli.add_commands(commands, _database_url_or_exit)

    from relay.cli import providers as providers_cli  # providers ..., routes ...

    providers_cli.add_commands(commands, _database_url_or_exit)

    from relay.cli import errors as errors_cli

    errors_cli.add_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        result = _main(argv)
        sys.stdout.flush()  # here, so that a reader gone away is seen here (below)
    except BrokenPipeError:
        return _stdout_closed()
    return result


# What a shell reports for a process killed by SIGPIPE (128 + 13), which is what a
# command whose reader went away would be without Python's handler for it.
_EXIT_STDOUT_CLOSED = 141


def _stdout_closed() -> int:
    """The reader of stdout went away (``outbox-relay intents show 42 --json | head -1``):
    stop quietly, as command-line tools do, instead of printing a traceback.

    SIGPIPE is left ignored (Python's default) rather than restored: ``run`` writes to
    sockets, and a peer closing one must not kill the relay. stdout is pointed at
    /dev/null so that the interpreter's final flush does not fail a second time.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)
    return _EXIT_STDOUT_CLOSED


SCHEMA_MISSING_MESSAGE = "the outbox schema is missing; run 'outbox-relay migrate' first"


def _main(argv: Sequence[str] | None) -> int:
    import psycopg

    from relay.infra.redaction import redact_text

    args = build_parser().parse_args(argv)
    try:
        result: int = args.handler(args)
    except psycopg.OperationalError as exc:
        # The database could not be reached (or refused the login): one line saying why,
        # not a traceback. libpq's messages name host and port, never the password; the
        # text is redacted anyway in case a future message quotes the URL.
        print(f"error: {redact_text(str(exc).strip())}", file=sys.stderr)
        print("hint: check RELAY_DATABASE_URL (or RELAY_DATABASE_URL_FILE)", file=sys.stderr)
        return 1
    except (psycopg.errors.UndefinedTable, psycopg.errors.InvalidSchemaName):
        # Any command reading the outbox on a database never migrated (a table, or the
        # schema "outbox" itself, not found): said here once for every command.
        print(f"error: {SCHEMA_MISSING_MESSAGE}", file=sys.stderr)
        return 1
    return result


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
