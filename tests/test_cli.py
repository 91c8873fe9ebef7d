"""The command line as a user meets it: help, bad configuration, migrate, status."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator

import pytest
from psycopg.conninfo import make_conninfo

from relay.cli.main import build_parser
from tests.support.cli import run_cli
from tests.support.databases import scratch_database


@pytest.mark.parametrize("command", ["migrate", "run", "demo", "status", "fake-provider"])
def test_every_command_has_help(command: str) -> None:
    result = run_cli(command, "--help")
    assert result.returncode == 0
    assert "usage: outbox-relay" in result.stdout
    assert len(result.stdout.splitlines()) > 3


def _every_parser(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _every_parser(sub)


def test_help_texts_carry_no_markup() -> None:
    """Descriptions taken from docstrings showed ``literal`` and **strong** as typed."""
    parsers = list(_every_parser(build_parser()))
    assert len(parsers) > 15
    for parser in parsers:
        text = parser.format_help()
        assert "``" not in text and "**" not in text, parser.prog


def test_bad_configuration_names_each_variable_once() -> None:
    result = run_cli(
        "run",
        env={
            "RELAY_DATABASE_URL": "postgresql://nowhere/x",
            "RELAY_BATCH_SIZE": "0",
            "RELAY_LEASE_SECONDS": "soon",
            "RELAY_PROVIDERS__STRIPE__TIMEOUT_MS": "-3",
            "RELAY_PROVIDERS__STRIPE__API_KEY": "sk_test_secret_value",
        },
    )
    assert result.returncode == 2
    lines = [line.strip() for line in result.stderr.splitlines() if line.startswith("  ")]
    assert sorted(line.split(":")[0] for line in lines) == [
        "RELAY_BATCH_SIZE",
        "RELAY_LEASE_SECONDS",
        "RELAY_PROVIDERS__STRIPE__TIMEOUT_MS",
    ]
    assert "sk_test_secret_value" not in result.stderr


def test_provider_without_key_is_refused() -> None:
    result = run_cli(
        "run",
        env={
            "RELAY_DATABASE_URL": "postgresql://x/y",
            "RELAY_PROVIDERS__STRIPE__BASE_URL": "http://127.0.0.1:1",
        },
    )
    assert result.returncode == 2
    assert "RELAY_PROVIDERS__STRIPE" in result.stderr and "API_KEY" in result.stderr


def test_missing_database_url_says_what_to_do() -> None:
    result = run_cli("migrate")
    assert result.returncode == 2
    assert "RELAY_DATABASE_URL" in result.stderr


@pytest.mark.integration
def test_migrate_then_status(db_url: str) -> None:
    env = {"RELAY_DATABASE_URL": db_url}
    again = run_cli("migrate", env=env)
    assert again.returncode == 0 and "up to date" in again.stdout
    import psycopg

    with psycopg.connect(db_url) as conn:
        conn.execute(
            "INSERT INTO outbox.payment_intents (payment_id, action, provider, amount_minor,"
            " currency, payment_method) VALUES ('s1', 'charge', 'stripe', 100, 'EUR', 'pm_card_visa'),"
            " ('s1', 'refund', 'stripe', NULL, 'EUR', NULL)"
        )
    table = run_cli("status", env=env)
    assert table.returncode == 0
    row = next(line for line in table.stdout.splitlines() if line.startswith("stripe"))
    assert row.split()[1:3] == ["1", "1"]  # blocked 1, pending 1
    as_json = json.loads(run_cli("status", "--json", env=env).stdout)
    assert as_json["providers"]["stripe"]["counts"] == {"blocked": 1, "pending": 1}


_RUN_ENV = {
    "RELAY_PROVIDERS__STRIPE__API_KEY": "sk_test_cli",
    "RELAY_PROVIDERS__STRIPE__BASE_URL": "http://127.0.0.1:9",
    "RELAY_HTTP_PORT": "0",
}


@pytest.fixture
def unmigrated_url(pg_admin_url: str) -> Iterator[str]:
    with scratch_database(pg_admin_url, "outbox_relay_empty") as url:
        yield url


@pytest.mark.integration
def test_run_on_an_unmigrated_database_says_migrate_and_exits_2(unmigrated_url: str) -> None:
    result = run_cli("run", env={**_RUN_ENV, "RELAY_DATABASE_URL": unmigrated_url})
    assert result.returncode == 2
    assert "run 'outbox-relay migrate' first" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert "relay_ready" not in result.stderr + result.stdout


@pytest.mark.integration
@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"dbname": "outbox_relay_no_such_db"}, "database_missing"),
        ({"user": "outbox_relay_no_such_role"}, "database_login_refused"),
        (None, "database_url_malformed"),
    ],
)
def test_run_stops_at_once_on_what_waiting_cannot_heal(
    pg_admin_url: str, change: dict[str, str] | None, code: str
) -> None:
    url = "not a url" if change is None else make_conninfo(pg_admin_url, **change)
    result = run_cli("run", env={**_RUN_ENV, "RELAY_DATABASE_URL": url})
    assert result.returncode == 2, result.stderr
    assert f"(code {code})" in result.stderr
    assert "Traceback" not in result.stderr
    assert "relay_ready" not in result.stderr + result.stdout


@pytest.mark.integration
@pytest.mark.parametrize(
    "command",
    [
        ["dead-letters", "list"],
        ["ledger", "check"],
        ["audit", "verify"],
        ["exceptions", "list"],
        ["reconcile", "--provider", "stripe"],
        ["status"],
        ["intents", "show", "1"],
    ],
)
def test_every_command_says_migrate_on_an_unmigrated_database(
    unmigrated_url: str, command: list[str]
) -> None:
    result = run_cli(*command, env={**_RUN_ENV, "RELAY_DATABASE_URL": unmigrated_url})
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "error: the outbox schema is missing; run 'outbox-relay migrate' first"
    )
