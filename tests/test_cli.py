"""The command line as a user meets it: help, bad configuration, migrate, status."""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Iterator
from importlib.metadata import version

import pytest

from relay.cli.main import build_parser
from tests.support.cli import run_cli


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


def test_every_option_says_what_it_does() -> None:
    """`fake-provider --host` had no help at all."""
    for parser in _every_parser(build_parser()):
        for action in parser._actions:
            if action.option_strings:
                assert action.help, f"{parser.prog} {'/'.join(action.option_strings)}"


def test_version_is_the_installed_distribution_s() -> None:
    result = run_cli("--version")
    assert (result.returncode, result.stdout) == (0, f"outbox-relay {version('outbox-relay')}\n")


def test_demo_help_shows_every_default() -> None:
    result = run_cli("demo", "--help")
    assert result.returncode == 0
    help_text = " ".join(result.stdout.split())  # argparse wraps lines anywhere
    for rate in ("--rate-429", "--rate-503", "--rate-malformed"):
        assert re.search(rf"{rate} \S+ share of .*? \(default 0\.0[1-3]\)", help_text), rate
    assert "past the client timeout, 0 to 1 (default 0.02)" in help_text
    assert "(replayed for that key), 0 to 1 (default 0.02)" in help_text


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
