"""Deploys and database trouble, with real processes: SIGTERM drains and releases, and a
PostgreSQL restart under load is survived with every effect exactly once."""

from __future__ import annotations

import random
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from relay.cli.demo import build_workload
from relay.infra.migrate import migrate
from tests.conftest import REQUIRE_SERVICES
from tests.invariants import assert_exactly_once, unfinished
from tests.processes import FakeProviderProcess, RelayProcess
from tests.support.intents import insert_workload
from tests.support.waiting import block_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _relay_env(db_url: str, fake: FakeProviderProcess, **extra: str) -> dict[str, str]:
    return {
        "RELAY_DATABASE_URL": db_url,
        "RELAY_PROVIDERS__STRIPE__API_KEY": "sk_test_drain",
        "RELAY_PROVIDERS__STRIPE__BASE_URL": fake.url,
        "RELAY_PROVIDERS__STRIPE__TIMEOUT_MS": "2000",
        "RELAY_PROVIDERS__STRIPE__CONNECT_TIMEOUT_MS": "500",
        "RELAY_LEASE_SECONDS": "30",
        "RELAY_MAX_ATTEMPTS": "50",
        "RELAY_BACKOFF_BASE_SECONDS": "0.05",
        "RELAY_BACKOFF_CAP_SECONDS": "0.5",
        "RELAY_POLL_INTERVAL_SECONDS": "0.1",
        "RELAY_POLL_MAX_INTERVAL_SECONDS": "0.5",
        "RELAY_LOG_FORMAT": "json",
        **extra,
    }


def _scalar(db_url: str, sql: str, *params: object) -> Any:
    with psycopg.connect(db_url) as conn:
        row = conn.execute(sql, params).fetchone()
    assert row is not None
    return row[0]


def test_sigterm_drains_releases_unstarted_and_exits_zero(db_url: str, tmp_path: Path) -> None:
    rows = build_workload(150, random.Random(5), "drain")
    # Slow calls: a call starts every 0.1 s (the rate limit) and takes 1.5 s, so at the
    # SIGTERM some call has well over a second left and the drain lasts that long, long
    # enough for the probes below to see it.
    fake = FakeProviderProcess(tmp_path, "--latency-ms", "1500")
    # A tight rate limit keeps claimed intents waiting for a token, so a SIGTERM always
    # finds some that never reached the provider: those must be handed back at once.
    env = _relay_env(
        db_url,
        fake,
        RELAY_PROVIDERS__STRIPE__CONCURRENCY="20",
        RELAY_PROVIDERS__STRIPE__RATE_LIMIT_PER_SECOND="10",
        RELAY_PROVIDERS__STRIPE__RATE_LIMIT_BURST="1",
        RELAY_PROVIDERS__STRIPE__TIMEOUT_MS="10000",  # the latency is no timeout
        RELAY_SHUTDOWN_GRACE_SECONDS="10",
    )
    first = RelayProcess("drain-relay-1", env, tmp_path)
    second = RelayProcess(
        "drain-relay-2",
        {
            **env,
            "RELAY_PROVIDERS__STRIPE__RATE_LIMIT_PER_SECOND": "1000",
            "RELAY_PROVIDERS__STRIPE__RATE_LIMIT_BURST": "100",
        },
        tmp_path,
    )
    try:
        insert_workload(db_url, rows)
        first.start()
        first.wait_ready()
        block_until(lambda: _probe(first, "/readyz") == 200, guard_seconds=60)
        block_until(
            lambda: (
                _scalar(
                    db_url, "SELECT count(*) FROM outbox.payment_intents WHERE status = 'succeeded'"
                )
                >= 20
            )
        )
        assert first.proc is not None
        first.proc.send_signal(signal.SIGTERM)
        # Until the process exits: readiness turns 503 "draining", liveness never fails
        # (the drain has its own deadline; a liveness kill would cut it short).
        draining_seen = False
        liveness_while_draining: list[int] = []
        hang_guard = time.monotonic() + 120  # turns a hang into a failure; no speed limit
        while first.proc.poll() is None:
            assert time.monotonic() < hang_guard, "the relay did not exit after SIGTERM"
            status, problems = _probe_json(first, "/readyz")
            if status == 503 and "draining" in problems:
                draining_seen = True
            if draining_seen:
                liveness_while_draining.append(_probe(first, "/healthz"))
            time.sleep(0.02)
        exit_code = first.proc.wait(60)  # a second signal would mean "exit at once"
        left_in_flight = _scalar(
            db_url,
            "SELECT count(*) FROM outbox.payment_intents"
            " WHERE status = 'in_flight' AND claimed_by = %s",
            first.name,
        )
        log = first.log_path.read_text()
        # The rest only has to finish, exactly once: no latency, no rate limit to wait on.
        fake.configure({"latency_ms": 0})
        second.start()
        block_until(lambda: unfinished(db_url) == 0)
        second.wait_ready()
        assert second.terminate(timeout=60) == 0
        effects = fake.effects()
    finally:
        first.kill()
        second.kill()
        fake.stop()

    assert exit_code == 0, "SIGTERM drains and exits 0"
    assert draining_seen, "/readyz said 503 draining before the relay exited"
    assert 200 in liveness_while_draining, "/healthz answered while draining"
    # 0: the HTTP server closed in the last moments before exit; never a 503.
    assert set(liveness_while_draining) <= {200, 0}, liveness_while_draining
    assert left_in_flight == 0, "no intent stays in flight under the stopped relay's lease"
    assert '"reason": "shutdown"' in log and "lease_released" in log
    assert_exactly_once(db_url, effects, expected_intents=len(rows))


@pytest.fixture
def owned_postgres() -> Iterator[tuple[str, Any]]:
    """A PostgreSQL this test may stop and start (pgserver, in a temporary directory)."""
    try:
        import pgserver
    except ImportError:
        if REQUIRE_SERVICES:
            pytest.fail("pgserver is needed to restart a PostgreSQL the test owns")
        pytest.skip("pgserver is not installed for this Python")
    workdir = Path(tempfile.mkdtemp(prefix="outbox-relay-restart-"))
    server = pgserver.get_server(workdir / "pgdata", cleanup_mode="stop")  # type: ignore[attr-defined]
    try:
        yield str(server.get_uri()), server
    finally:
        server.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)


def _stop(server: Any) -> None:
    from pgserver._commands import pg_ctl  # type: ignore[import-untyped]

    pg_ctl(["-w", "-m", "immediate", "stop"], pgdata=server.pgdata, user=server.system_user)


def _probe(relay: RelayProcess, path: str) -> int:
    try:
        return httpx.get(f"http://127.0.0.1:{relay.http_port}{path}", timeout=5).status_code
    except httpx.HTTPError:
        return 0


def _probe_json(relay: RelayProcess, path: str) -> tuple[int, list[str]]:
    """Status and the problems the probe named (0 and none when it did not answer)."""
    try:
        answer = httpx.get(f"http://127.0.0.1:{relay.http_port}{path}", timeout=5)
        problems = answer.json().get("problems", [])
    except (httpx.HTTPError, ValueError):
        return 0, []
    return answer.status_code, problems


def test_postgres_restart_under_load_is_survived_exactly_once(
    owned_postgres: tuple[str, Any], tmp_path: Path
) -> None:
    db_url, server = owned_postgres
    migrate(db_url)
    rows = build_workload(200, random.Random(9), "restart")
    half = len(rows) // 2
    by_payment: dict[str, list[Any]] = {}
    for row in rows:
        by_payment.setdefault(row.payment_id, []).append(row)
    payments = list(by_payment)
    before = [r for p in payments[: len(payments) // 2] for r in by_payment[p]]
    after = [r for p in payments[len(payments) // 2 :] for r in by_payment[p]]
    assert before and after and abs(len(before) - half) < half
    fake = FakeProviderProcess(tmp_path, "--latency-ms", "20", "--rate-500-after-effect", "0.02")
    relay = RelayProcess(
        "restart-relay",
        _relay_env(db_url, fake, RELAY_PROVIDERS__STRIPE__CONCURRENCY="16"),
        tmp_path,
    )
    try:
        insert_workload(db_url, before)
        relay.start()
        relay.wait_ready()
        block_until(
            lambda: (
                _scalar(
                    db_url, "SELECT count(*) FROM outbox.payment_intents WHERE status = 'succeeded'"
                )
                >= 50
            )
        )
        assert _probe(relay, "/readyz") == 200
        _stop(server)
        block_until(lambda: _probe(relay, "/readyz") == 503, guard_seconds=60)
        assert _probe(relay, "/healthz") == 200, "liveness does not fail for the database"
        time.sleep(2.0)
        server.ensure_postgres_running()
        block_until(lambda: _probe(relay, "/readyz") == 200, guard_seconds=120)
        assert relay.running, "the relay survives the database going away"
        insert_workload(db_url, after)
        _stop(server)
        time.sleep(1.0)
        server.ensure_postgres_running()
        block_until(lambda: unfinished(db_url) == 0)
        assert relay.running
        assert relay.terminate(timeout=60) == 0
        effects = fake.effects()
    finally:
        relay.kill()
        fake.stop()
    log = relay.log_path.read_text()
    assert "claim_db_error" in log or "write_back_retry" in log, "the outage was seen"
    assert_exactly_once(db_url, effects, expected_intents=len(rows))
