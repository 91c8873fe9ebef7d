"""Secrets never leave the relay: planted values, looked for in everything it prints.

A database password (`pw-planted-<uuid>`, in the URL of a LOGIN role created with that
password; the test cluster trusts local connections, so the password is carried but not
checked), a provider API key (`sk_test_planted_<uuid>`, from a file and from the
environment) and a broker password (`amqp-planted-<uuid>`, in a URL of a broker that is
not there) are given to the relay process and to CLI commands, on the paths that work and
on the error paths that tend to print a URL: an unreachable database, an unreachable
broker, a configuration that fails validation. Their stdout and stderr, the relay's JSON
logs, /metrics, /healthz and /readyz must not contain any planted value. The provider does
see the key (in its Authorization header): that is where it belongs.
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from tests.login_roles import login_role
from tests.processes import FakeProviderProcess, RelayProcess, free_port
from tests.support.cli import run_cli
from tests.support.intents import insert_intents
from tests.support.waiting import block_until

pytestmark = pytest.mark.integration

PASSWORD = f"pw-planted-{uuid.uuid4().hex}"
API_KEY = f"sk_test_planted_{uuid.uuid4().hex}"
AMQP_PASSWORD = f"amqp-planted-{uuid.uuid4().hex}"
PLANTED = (PASSWORD, API_KEY, AMQP_PASSWORD)
# Fragments too: a leak that cuts the value still leaks it.
FRAGMENTS = (
    PASSWORD.split("-")[-1],
    AMQP_PASSWORD.split("-")[-1],
    API_KEY.removeprefix("sk_test_planted_"),
)


def assert_no_secret(text: str, where: str) -> None:
    for value in (*PLANTED, *FRAGMENTS):
        assert value not in text, f"a planted secret appears in {where}"


def _with_password(url: str, password: str, **overrides: str) -> str:
    return make_conninfo(url, password=password, **overrides)


def _as_uri(url: str) -> str:
    """The same connection as a postgresql:// URI (the form RELAY_DATABASE_URL documents)."""
    p = conninfo_to_dict(url)
    # A socket directory (the embedded server's) is percent-encoded in a URI's host.
    host = quote(str(p.get("host", "127.0.0.1")), safe="")
    return f"postgresql://{p['user']}:{p['password']}@{host}:{p.get('port', '5432')}/{p['dbname']}"


@pytest.fixture
def relay_uri(db_url: str) -> Iterator[str]:
    """A URI with a planted password, for a LOGIN role in outbox_relay."""
    with login_role(db_url, "outbox_relay", prefix="secret", password=PASSWORD) as url:
        yield _as_uri(url)


def test_cli_commands_never_print_the_database_password(db_url: str, relay_uri: str) -> None:
    owner = _as_uri(_with_password(db_url, PASSWORD))
    dead_port = str(free_port())
    unreachable = _as_uri(_with_password(db_url, PASSWORD, port=dead_port))
    outputs: dict[str, subprocess.CompletedProcess[str]] = {
        "migrate": run_cli("migrate", env={"RELAY_DATABASE_URL": owner}),
        "status": run_cli("status", env={"RELAY_DATABASE_URL": relay_uri}),
        "status --json": run_cli("status", "--json", env={"RELAY_DATABASE_URL": relay_uri}),
        "migrate, unreachable": run_cli("migrate", env={"RELAY_DATABASE_URL": unreachable}),
        "status, unreachable": run_cli("status", env={"RELAY_DATABASE_URL": unreachable}),
        "migrate, bad port": run_cli(
            "migrate", env={"RELAY_DATABASE_URL": owner.replace("5432", "notaport")}
        ),
        "run, invalid configuration": run_cli(
            "run",
            env={
                "RELAY_DATABASE_URL": relay_uri,
                "RELAY_PROVIDERS__STRIPE__API_KEY": API_KEY,
                "RELAY_PROVIDERS__STRIPE__BASE_URL": f"ftp://user:{PASSWORD}@example",
                "RELAY_AMQP_URL": f"http://guest:{AMQP_PASSWORD}@127.0.0.1/",
                "RELAY_BATCH_SIZE": "0",
            },
        ),
        "migrate, URL from a missing file": run_cli(
            "migrate", env={"RELAY_DATABASE_URL_FILE": "/nonexistent/database-url"}
        ),
    }
    for name, result in outputs.items():
        assert_no_secret(result.stdout + result.stderr, f"`{name}`")
    # The commands did what they say (so the check above looked at real output).
    assert outputs["migrate"].returncode == 0, outputs["migrate"].stderr
    assert "schema is up to date" in outputs["migrate"].stdout
    assert outputs["status"].returncode == 0, outputs["status"].stderr
    assert "schema version" in outputs["status"].stdout
    assert '"dead_letters": 0' in outputs["status --json"].stdout
    for name in ("migrate, unreachable", "status, unreachable", "migrate, bad port"):
        result = outputs[name]
        assert result.returncode != 0, name
        assert "error" in result.stderr.lower(), name
    assert "connection" in outputs["migrate, unreachable"].stderr.lower()
    missing = outputs["migrate, URL from a missing file"]
    assert missing.returncode == 2
    assert "RELAY_DATABASE_URL_FILE" in missing.stderr and "Traceback" not in missing.stderr
    invalid = outputs["run, invalid configuration"]
    assert invalid.returncode == 2
    assert "RELAY_BATCH_SIZE" in invalid.stderr
    assert "RELAY_PROVIDERS__STRIPE__BASE_URL" in invalid.stderr


def test_running_relay_never_prints_or_exports_a_secret(
    db_url: str, relay_uri: str, tmp_path: Path
) -> None:
    key_file = tmp_path / "stripe-api-key"
    key_file.write_text(API_KEY + "\n")
    with psycopg.connect(db_url) as conn:
        insert_intents(
            conn,
            [
                {
                    "payment_id": f"sec-{n}",
                    "action": "charge",
                    "amount_minor": 1000,
                    "payment_method": method,
                    "metadata": '{"note": "no secret here"}',
                }
                for n, method in enumerate(
                    ["pm_card_visa", "pm_card_chargeDeclined", "pm_card_visa"]
                )
            ],
        )
    fake = FakeProviderProcess(tmp_path)
    broker_port = free_port()  # nothing listens there: the publisher's error path runs
    relay = RelayProcess(
        "secret-relay",
        {
            "RELAY_DATABASE_URL": relay_uri,
            "RELAY_PROVIDERS__STRIPE__API_KEY_FILE": str(key_file),
            "RELAY_PROVIDERS__STRIPE__BASE_URL": fake.url,
            "RELAY_AMQP_URL": f"amqp://guest:{AMQP_PASSWORD}@127.0.0.1:{broker_port}/",
            "RELAY_PUBLISH_TIMEOUT_SECONDS": "2",
            "RELAY_AMQP_RECONNECT_BASE_SECONDS": "0.1",
            "RELAY_AMQP_RECONNECT_CAP_SECONDS": "0.5",
            "RELAY_POLL_INTERVAL_SECONDS": "0.1",
            "RELAY_DEPTH_INTERVAL_SECONDS": "0.5",
            "RELAY_LOG_FORMAT": "json",
        },
        tmp_path,
    )
    try:
        relay.start()
        relay.wait_ready()

        def finished() -> bool:
            with psycopg.connect(db_url) as conn:
                row = conn.execute(
                    "SELECT count(*) FILTER (WHERE status IN ('succeeded', 'failed')),"
                    " count(*) FROM outbox.payment_intents"
                ).fetchone()
            return row is not None and row[0] == row[1] == 3

        block_until(finished)
        # The provider accepted the key (the fake answers 401 to a key without sk_test_).
        effects = httpx.get(f"{fake.url}/_fake/effects", timeout=10).json()
        assert sum(v["count"] for v in effects["effects_by_key"].values()) == 2
        # The publisher has tried the unreachable broker at least twice by now.
        block_until(lambda: relay.log_path.read_text().count("amqp_connect_failed") >= 2)
        base = f"http://127.0.0.1:{relay.http_port}"
        pages = {
            path: httpx.get(base + path, timeout=10) for path in ("/metrics", "/healthz", "/readyz")
        }
    finally:
        relay.terminate()
        fake.stop()

    assert pages["/metrics"].status_code == 200
    assert "outbox_relay_" in pages["/metrics"].text
    for path, page in pages.items():
        assert_no_secret(page.text, path)
    log = relay.log_path.read_text()
    assert "relay_ready" in log
    assert_no_secret(log, "the relay's log")
    # The URL it did log (relay_ready) names the database without the password.
    assert conninfo_to_dict(db_url)["dbname"] in log


def test_unreachable_database_error_path_never_prints_the_password(
    db_url: str, tmp_path: Path
) -> None:
    dead_port = free_port()
    url = _as_uri(_with_password(db_url, PASSWORD, port=str(dead_port)))
    relay = RelayProcess(
        "secret-no-db",
        {
            "RELAY_DATABASE_URL": url,
            "RELAY_PROVIDERS__STRIPE__API_KEY": API_KEY,
            "RELAY_PROVIDERS__STRIPE__BASE_URL": "http://127.0.0.1:9",
            "RELAY_POLL_INTERVAL_SECONDS": "0.1",
            "RELAY_LOG_FORMAT": "json",
        },
        tmp_path,
    )
    try:
        relay.start()
        # The pool reports its failed connections (naming host and port, not the password).
        block_until(lambda: str(dead_port) in relay.log_path.read_text())
        health = httpx.get(f"http://127.0.0.1:{relay.http_port}/readyz", timeout=10)
    finally:
        relay.terminate()
    log = relay.log_path.read_text()
    assert health.status_code == 503
    assert "database unreachable" in health.text
    assert_no_secret(health.text, "/readyz")
    assert_no_secret(log, "the relay's log")
