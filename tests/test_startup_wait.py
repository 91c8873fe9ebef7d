"""A database that may come back is waited for, visibly (issue 17): `run` against a server
that refuses connections backs off with one `database_not_ready` line per step, reports the
reason on /readyz, never logs `relay_ready`, and still stops at once on SIGTERM."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from tests.processes import RelayProcess, free_port, idle_relay_env
from tests.support.waiting import block_until

pytestmark = pytest.mark.slow


def _events(path: Path, name: str) -> list[dict[str, object]]:
    found = []
    for line in path.read_text().splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if entry.get("event") == name:
                found.append(entry)
    return found


@pytest.mark.parametrize(
    "where",
    [
        # Nothing listens on this port: every login is refused, which can heal.
        "tcp",
        # A server that is not running on its Unix socket (no socket file): libpq fails
        # that connect before any exchange, which must not read as a malformed URL (the
        # fault campaign's restarted relays did, and exited 2 during a database restart).
        "unix-socket",
    ],
)
def test_run_waits_for_a_database_that_refuses_connections(tmp_path: Path, where: str) -> None:
    url = (
        f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
        if where == "tcp"
        else f"postgresql://postgres@/postgres?host={tmp_path / 'no-server-here'}"
    )
    relay = RelayProcess(
        "waiting-relay",
        idle_relay_env(url, RELAY_SHUTDOWN_GRACE_SECONDS="2"),
        tmp_path,
    )
    relay.start()
    try:
        block_until(
            lambda: len(_events(relay.log_path, "database_not_ready")) >= 3 or not relay.running,
            "three database_not_ready steps",
        )
        assert relay.running, relay.log_path.read_text()
        readyz = httpx.get(f"http://127.0.0.1:{relay.http_port}/readyz", timeout=10)
    finally:
        exit_code = relay.terminate()

    assert readyz.status_code == 503
    assert "waiting for the database" in readyz.text
    steps = _events(relay.log_path, "database_not_ready")
    assert [step["attempt"] for step in steps[:3]] == [1, 2, 3]
    # Each wait lies between half and all of a bound that doubles per step, so the third
    # (half of 4 bounds at least) is at least twice the first (a whole bound at most).
    delays = [float(str(step["retry_in"])) for step in steps[:3]]
    assert delays[0] > 0
    assert delays[2] >= 2 * delays[0]
    assert _events(relay.log_path, "relay_ready") == []
    assert exit_code == 0, relay.log_path.read_text()
