"""Bulkheads: a sick provider's lane, its circuit breaker and its rate limit, seen from the
provider's side (the fake provider's request log), never from wall-clock limits."""

from __future__ import annotations

import itertools
from typing import Any

import psycopg
import pytest

from provider_adapters.fake import FaultConfig
from relay.core.runtime import Relay
from relay.domain.breaker import BreakerState
from tests.fake_server import running_fake
from tests.lane_harness import (
    count_status,
    insert_charges,
    max_concurrency,
    provider,
    relay_for,
    running,
    wait_until,
)

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

TERMINAL = ("succeeded", "failed", "dead")
# Server-side timestamps trail the relay's decisions by the loopback hop and event-loop
# scheduling; this much slack keeps the checks about the relay, not about the machine.
SLACK = 0.2


async def test_sick_provider_fills_only_its_own_lane(db_url: str) -> None:
    sick_faults = FaultConfig(latency_ms=1500, rate_503=0.5, seed=3)
    async with running_fake(sick_faults) as sick, running_fake() as healthy:
        relay = relay_for(
            db_url,
            {
                "sick": provider(sick.url, concurrency=3, breaker_failure_threshold=1000),
                "healthy": provider(healthy.url, concurrency=8),
            },
        )
        insert_charges(db_url, "sick", 30, "sick")
        insert_charges(db_url, "healthy", 300, "healthy")
        async with running(relay):

            async def healthy_done() -> bool:
                return await count_status(db_url, "healthy", TERMINAL) == 300

            await wait_until(healthy_done)
            sick_unfinished = 30 - await count_status(db_url, "sick", TERMINAL)
            sick_log = await sick.request_log()

    assert await count_status(db_url, "healthy", ("succeeded",)) == 300
    assert sick_unfinished > 0, "the healthy provider finished while the sick one still had work"
    assert max_concurrency(sick_log) == 3, "the sick lane was saturated and never above its limit"


async def test_breaker_opens_stops_calls_probes_and_closes(db_url: str) -> None:
    threshold, cooldown, probes, concurrency = 3, 1.0, 2, 4
    async with running_fake(FaultConfig(rate_503=1.0)) as fake:
        relay = relay_for(
            db_url,
            {
                "flaky": provider(
                    fake.url,
                    concurrency=concurrency,
                    breaker_failure_threshold=threshold,
                    breaker_cooldown_seconds=cooldown,
                    breaker_half_open_probes=probes,
                )
            },
        )
        breaker = relay.lanes["flaky"].breaker
        insert_charges(db_url, "flaky", 20, "flaky")
        async with running(relay):

            async def reopened() -> bool:
                return breaker.times_opened >= 2

            await wait_until(reopened)  # open, a failed half-open probe, open again
            await fake.configure(rate_503=0.0)

            async def all_done() -> bool:
                return await count_status(db_url, "flaky", TERMINAL) == 20

            await wait_until(all_done)
            log = await fake.request_log()

    assert await count_status(db_url, "flaky", ("succeeded",)) == 20
    transitions = list(breaker.transitions)
    states = [state for _, state in transitions]
    assert states[:4] == [
        BreakerState.OPEN,
        BreakerState.HALF_OPEN,
        BreakerState.OPEN,
        BreakerState.HALF_OPEN,
    ]
    assert states[-1] is BreakerState.CLOSED

    starts = sorted(entry["started"] for entry in log)
    first_open = transitions[0][0]
    assert sum(1 for t in starts if t < first_open) <= threshold + concurrency - 1
    for (at, state), (until, next_state) in itertools.pairwise(transitions):
        during = [t for t in starts if at + SLACK < t < until]
        if state is BreakerState.OPEN:
            assert during == [], f"calls while the breaker was open: {len(during)}"
        if state is BreakerState.HALF_OPEN:
            # After a close, calls flow at once: only a re-open window gets the slack.
            end = until + SLACK if next_state is BreakerState.OPEN else until
            window = [t for t in starts if at - SLACK <= t <= end]
            assert 1 <= len(window) <= probes, "half-open lets only the configured probes through"
    await _assert_attempts_match_calls(db_url, "flaky", log)


async def _assert_attempts_match_calls(
    db_url: str, provider_name: str, log: list[dict[str, Any]]
) -> None:
    """Attempts are consumed only by real provider calls: an open breaker costs none."""
    async with await psycopg.AsyncConnection.connect(db_url) as conn:
        cur = await conn.execute(
            "SELECT sum(attempts) FROM outbox.payment_intents WHERE provider = %s",
            (provider_name,),
        )
        row = await cur.fetchone()
    assert row is not None
    assert int(row[0]) == len(log)


async def test_rate_limit_holds_calls_per_second_and_burst(db_url: str) -> None:
    rate, burst = 25.0, 5
    async with running_fake() as fake:
        relay: Relay = relay_for(
            db_url,
            {
                "limited": provider(
                    fake.url, concurrency=16, rate_limit_per_second=rate, rate_limit_burst=burst
                )
            },
        )
        insert_charges(db_url, "limited", 60, "limited")
        async with running(relay):

            async def all_done() -> bool:
                return await count_status(db_url, "limited", TERMINAL) == 60

            await wait_until(all_done)
            log = await fake.request_log()

    assert await count_status(db_url, "limited", ("succeeded",)) == 60
    starts = sorted(entry["started"] for entry in log)
    assert len(starts) == 60
    worst = 0.0
    for i, first in enumerate(starts):
        for j in range(i, len(starts)):
            allowed = burst + rate * (starts[j] - first + SLACK)
            worst = max(worst, (j - i + 1) - allowed)
    assert worst <= 0, f"{worst:.1f} calls above burst + rate x interval"
    await _assert_attempts_match_calls(db_url, "limited", log)
