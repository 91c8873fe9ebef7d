"""A running relay reports the providers it serves on its own, sampler or not, and takes
its report back when it stops cleanly (issue 17): `status` must never call a served
provider unserved because the queue-depth sampler is off, nor keep a stopped relay's
providers served. A killed relay cannot take its report back: it ages out."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import psycopg
import pytest

from relay.infra.queries import QUERIES
from tests.processes import UNREACHABLE_PROVIDER, RelayProcess, idle_relay_env
from tests.support.cli import run_cli
from tests.support.intents import insert_charges
from tests.support.waiting import block_until

pytestmark = pytest.mark.integration


def _reported(db_url: str, *, seconds_from_now: float = 0) -> list[tuple[Any, ...]]:
    """(instance, providers, live) per row, as the statement relay_instances sees them
    ``seconds_from_now`` later by the server's clock."""
    with psycopg.connect(db_url) as conn:
        row = conn.execute("SELECT now() + make_interval(secs => %s)", (seconds_from_now,))
        now = row.fetchone()
        assert now is not None
        found = conn.execute(QUERIES["relay_instances"], {"now": now[0]}).fetchall()
    return [(instance, providers, live) for instance, providers, _at, _age, live, *_ in found]


def _status(db_url: str) -> dict[str, Any]:
    result = run_cli("status", "--json", env={"RELAY_DATABASE_URL": db_url})
    assert result.returncode == 0, result.stderr
    parsed: dict[str, Any] = json.loads(result.stdout)
    return parsed


def test_a_relay_without_a_depth_sampler_still_reports_and_withdraws_on_a_clean_stop(
    db_url: str, tmp_path: Path
) -> None:
    insert_charges(db_url, "paypal", 2, "unserved")  # no relay serves paypal
    relay = RelayProcess(
        "serving-relay",
        idle_relay_env(
            db_url,
            # A second Stripe lane; not named adyen, whose 31-day key lifetime (sql/0046)
            # a Stripe lane refuses to start with (tests/test_key_lifetimes.py).
            RELAY_PROVIDERS__ACME__KIND="stripe",
            RELAY_PROVIDERS__ACME__API_KEY="sk_test_serving",
            RELAY_PROVIDERS__ACME__BASE_URL=UNREACHABLE_PROVIDER,
            RELAY_DEPTH_INTERVAL_SECONDS="0",  # the sampler is off
        ),
        tmp_path,
    )
    relay.start()
    try:
        relay.wait_ready()
        # Reported before relay_ready: no wait for a sample that never comes.
        assert _reported(db_url) == [("serving-relay", ["acme", "stripe"], True)]
        status = _status(db_url)
        assert status["unserved_providers"] == ["paypal"]
        assert [(r["instance"], r["live"]) for r in status["relays"]] == [("serving-relay", True)]
    finally:
        exit_code = relay.terminate()
    assert exit_code == 0, relay.log_path.read_text()
    assert _reported(db_url) == []  # withdrawn: its providers are not served any more
    assert '"relay_withdrawn"' in relay.log_path.read_text()
    assert _status(db_url)["relays"] == []


def test_a_killed_relay_s_report_ages_out(db_url: str, tmp_path: Path) -> None:
    relay = RelayProcess(
        "killed-relay",
        idle_relay_env(db_url, RELAY_HEARTBEAT_INTERVAL_SECONDS="5"),
        tmp_path,
    )
    relay.start()
    try:
        relay.wait_ready()
        block_until(lambda: _reported(db_url), "the relay's report")
    finally:
        relay.kill()
    # Its row stays (nothing withdrew it) and is live for max(3 x 5 s, 30 s), then not.
    assert _reported(db_url) == [("killed-relay", ["stripe"], True)]
    assert _reported(db_url, seconds_from_now=25) == [("killed-relay", ["stripe"], True)]
    assert _reported(db_url, seconds_from_now=31) == [("killed-relay", ["stripe"], False)]
