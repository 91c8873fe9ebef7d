"""`run` against a server that demands a password (issue 17): a wrong or missing password
cannot heal by waiting, so start-up stops with the reason and exit 2, never retries.

The shared test server trusts every local login, so these tests start a PostgreSQL of
their own that asks this role for its password (tests/support/password_server.py). A
control case logs in with the right password and reaches the next refusal (no schema),
so a refusal here is the login's, not the set-up's.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from tests.processes import RelayProcess, idle_relay_env
from tests.support.password_server import password_server
from tests.support.waiting import block_until

pytestmark = pytest.mark.integration

ROLE = "outbox_relay_pw"
PASSWORD = "the-right-one-9c1f"


@pytest.fixture(scope="module")
def password_url() -> Iterator[str]:
    with password_server(ROLE, PASSWORD) as url:
        yield url


def _without_password(url: str) -> str:
    params = conninfo_to_dict(url)
    params.pop("password", None)
    return make_conninfo("", **params)


def _run_until_it_exits_or_waits(tmp_path: Path, url: str) -> tuple[int | None, str]:
    """Start `run`; return its exit code once it exits, or None with its log as soon as it
    logs a backoff step instead (it treats the failure as one that may heal)."""
    relay = RelayProcess(
        "login-relay",
        # No password from ~/.pgpass either.
        idle_relay_env(url, PGPASSFILE=str(tmp_path / "no-pgpass")),
        tmp_path,
    )
    relay.start()
    try:
        block_until(
            lambda: not relay.running or b"database_not_ready" in relay.log_path.read_bytes(),
            "run to exit or to log a backoff step",
        )
    finally:
        exit_code = relay.terminate()
    waited = b"database_not_ready" in relay.log_path.read_bytes()
    return (None if waited else exit_code), relay.log_path.read_text()


@pytest.mark.parametrize(
    ("password", "code"),
    [
        ("wrong-password", "database_login_failed"),  # SQLSTATE 28P01
        (None, "database_password_missing"),  # the server asks, the URL has none
        (PASSWORD, "schema_missing"),  # control: the login works, the schema is next
    ],
)
def test_run_stops_with_exit_2_on_a_password_the_server_refuses(
    tmp_path: Path, password_url: str, password: str | None, code: str
) -> None:
    url = (
        _without_password(password_url)
        if password is None
        else make_conninfo(password_url, password=password)
    )
    exit_code, output = _run_until_it_exits_or_waits(tmp_path, url)
    assert exit_code == 2, f"run did not stop (exit {exit_code}):\n{output}"
    lines = output.splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, output
    error = errors[0]
    assert error.endswith(f"(code {code})"), error
    assert "Traceback" not in output
    assert PASSWORD not in output and "wrong-password" not in output
    events = [json.loads(line)["event"] for line in lines if line.startswith("{")]
    assert "relay_ready" not in events and "database_not_ready" not in events
