"""The command line as a user meets it: help, bad configuration, migrate, status."""

from __future__ import annotations

import argparse
import json
import os
import re
from collections.abc import Iterator
from importlib.metadata import version

import pytest
from psycopg.conninfo import make_conninfo

from relay.cli.main import build_parser
from relay.cli.tables import clip
from relay.infra.config import ConfigError, load_settings, unknown_variables
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


def _settings_env(monkeypatch: pytest.MonkeyPatch, **values: str) -> None:
    """Exactly ``values`` as the RELAY_* environment of an in-process load_settings."""
    for name in list(os.environ):
        if name.startswith("RELAY_"):
            monkeypatch.delenv(name)
    for name, value in values.items():
        monkeypatch.setenv(name, value)


def test_every_broken_rule_between_settings_is_reported_in_one_run() -> None:
    result = run_cli(
        "run",
        env={
            "RELAY_DATABASE_URL": "postgresql://nowhere/x",
            "RELAY_AMQP_URL": "amqp://guest:guest@127.0.0.1:5672/",
            "RELAY_PROVIDERS__STRIPE__API_KEY": "sk_test_x",
            "RELAY_LEASE_SECONDS": "5",
            "RELAY_BACKOFF_CAP_SECONDS": "0.5",
        },
    )
    assert result.returncode == 2
    assert "invalid configuration (3 problem(s))" in result.stderr
    lines = [line.strip() for line in result.stderr.splitlines() if line.startswith("  ")]
    assert [line.split(" ")[0] for line in lines] == [
        "RELAY_PUBLISH_TIMEOUT_SECONDS",
        "RELAY_BACKOFF_CAP_SECONDS",
        "RELAY_PROVIDERS__STRIPE__TIMEOUT_MS",
    ]


def test_a_bad_value_does_not_hide_the_rules_between_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """RELAY_BATCH_SIZE=0 fails its own check; the lease conflicts are still reported beside
    it, and a rule naming the bad variable is not guessed at with its default."""
    _settings_env(
        monkeypatch,
        RELAY_BATCH_SIZE="0",
        RELAY_AMQP_URL="amqp://guest:guest@127.0.0.1:5672/",
        RELAY_PROVIDERS__STRIPE__API_KEY="sk_test_x",
        RELAY_LEASE_SECONDS="5",
    )
    with pytest.raises(ConfigError) as refused:
        load_settings(warn_unknown=False)
    assert [line.split(" ")[0].rstrip(":") for line in refused.value.lines] == [
        "RELAY_BATCH_SIZE",
        "RELAY_PUBLISH_TIMEOUT_SECONDS",
        "RELAY_PROVIDERS__STRIPE__TIMEOUT_MS",
    ]
    _settings_env(monkeypatch, RELAY_LEASE_SECONDS="0", RELAY_AMQP_URL="amqp://h/")
    with pytest.raises(ConfigError) as refused:
        load_settings(warn_unknown=False)
    assert [line.split(" ")[0].rstrip(":") for line in refused.value.lines] == [
        "RELAY_LEASE_SECONDS"
    ]


def test_an_empty_variable_is_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    _settings_env(
        monkeypatch,
        RELAY_LEASE_SECONDS="5",
        RELAY_AMQP_URL="",  # no broker, so the publish timeout has no lease to outlast
        RELAY_AMQP_URL_FILE="",
        RELAY_EVENTS_EXAMPLE_QUEUE="",  # would need RELAY_EVENTS_DECLARE_TOPOLOGY
        RELAY_PROVIDERS__STRIPE__API_KEY="sk_test_x",
        RELAY_PROVIDERS__STRIPE__API_KEY_FILE="",  # would be "not a readable file"
        RELAY_PROVIDERS__STRIPE__TIMEOUT_MS="3000",
        RELAY_BATCH_SIZE="",  # the default
    )
    settings = load_settings()
    assert settings.amqp_url is None and settings.resolved_amqp_url() is None
    assert settings.events_example_queue is None
    assert settings.providers["stripe"].api_key_file is None
    assert settings.batch_size == 100


def test_unknown_relay_variables_are_named_with_the_nearest_known_one() -> None:
    warnings = unknown_variables(
        {
            "RELAY_BATCHSIZE": "5",
            "RELAY_PROVIDERS__STRIPE__TIMEOUTMS": "3000",
            "RELAY_XYZZY": "1",
            # known: settings, *_FILE variants, nested provider keys, the test suite's own,
            # the ones read outside Settings, and anything not RELAY_*
            "RELAY_BATCH_SIZE": "5",
            "relay_lease_seconds": "30",
            "RELAY_DATABASE_URL_FILE": "/run/secrets/db",
            "RELAY_PROVIDERS__STRIPE__API_KEY_FILE": "/run/secrets/stripe",
            "RELAY_PROVIDERS__ADYEN__TIMEOUT_MS": "3000",
            "RELAY_TEST_DATABASE_URL": "postgresql://x/y",
            "RELAY_OPERATOR": "alice",
            "RELAY_SECRETS_DIR": "/run/secrets",
            "HOME": "/root",
        }
    )
    assert warnings == [
        "warning: RELAY_BATCHSIZE is not a setting of the relay and is ignored; "
        "did you mean RELAY_BATCH_SIZE?",
        "warning: RELAY_PROVIDERS__STRIPE__TIMEOUTMS is not a setting of the relay and is "
        "ignored; did you mean RELAY_PROVIDERS__STRIPE__TIMEOUT_MS?",
        "warning: RELAY_XYZZY is not a setting of the relay and is ignored; see the README's "
        "configuration table",
    ]


_MISSPELT_WARNING = (
    "warning: RELAY_BATCHSIZE is not a setting of the relay and is ignored; "
    "did you mean RELAY_BATCH_SIZE?"
)


@pytest.mark.parametrize("command", [("status",), ("reconcile", "--provider", "stripe")])
def test_commands_warn_once_about_a_misspelt_variable(command: tuple[str, ...]) -> None:
    # No database configured: each command stops with an error after the warning.
    result = run_cli(*command, env={"RELAY_BATCHSIZE": "5", "RELAY_TEST_ANYTHING": "1"})
    assert result.returncode == 2
    assert result.stderr.count(_MISSPELT_WARNING) == 1, result.stderr
    assert "RELAY_TEST_ANYTHING" not in result.stderr


def test_run_logs_a_misspelt_variable_as_a_json_line_like_every_other() -> None:
    # Default log format, output not a terminal: JSON lines on stdout.
    result = run_cli("run", env={"RELAY_BATCHSIZE": "5", "RELAY_TEST_ANYTHING": "1"})
    assert result.returncode == 2  # no database configured
    assert "RELAY_BATCHSIZE" not in result.stderr, result.stderr
    logged = [json.loads(line) for line in result.stdout.splitlines()]
    assert [
        (entry["event"], entry["level"], entry["variable"], entry["did_you_mean"])
        for entry in logged
    ] == [("unknown_setting_ignored", "warning", "RELAY_BATCHSIZE", "RELAY_BATCH_SIZE")]
    assert "timestamp" in logged[0]


def test_run_with_a_bad_setting_prints_the_warning_plainly_beside_the_error() -> None:
    # The log format itself may be what is wrong: no log line, plain lines on stderr.
    result = run_cli("run", env={"RELAY_BATCHSIZE": "5", "RELAY_BATCH_SIZE": "0"})
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines[0] == _MISSPELT_WARNING
    assert lines[1] == "error: invalid configuration (1 problem(s)):"


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
        ({"port": "abc"}, "database_url_malformed"),
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


def test_clip_cuts_with_an_ellipsis_after_a_whole_word() -> None:
    # The one clip every command uses (tables, dead letters, intent history, the demo).
    assert clip("short", 10) == "short"
    assert clip("exactly10!", 10) == "exactly10!"
    assert clip("the ledger says 19.99 EUR, the provider 20.99 EUR", 30) == (
        "the ledger says 19.99 EUR…"
    )
    assert len(clip("x" * 100, 12)) == 12 and clip("x" * 100, 12).endswith("…")
