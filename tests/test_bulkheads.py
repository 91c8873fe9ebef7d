"""Bulkheads: a sick provider's lane, its circuit breaker and its rate limit, seen from the
provider's side (the fake provider's request log), never from wall-clock limits.

The breaker and the rate limit run on a hand-driven clock (tests/support/clock.py): time in
the lanes passes only when a test advances it, so each check is exact. The sick provider
is real latency holding real slots, waited for on the database.
"""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from provider_adapters.fake import FaultConfig
from relay.core.lanes import Lane
from relay.core.runtime import Relay
from relay.domain.breaker import BreakerState
from tests.support.clock import ManualClock
from tests.support.fake_server import FakeServer, running_fake
from tests.support.intents import insert_charges
from tests.support.relays import count_status, max_concurrency, provider, relay_for, running
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

TERMINAL = ("succeeded", "failed", "dead")


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

            await wait_until(healthy_done, "every healthy intent finished")
            sick_unfinished = 30 - await count_status(db_url, "sick", TERMINAL)
            sick_log = await sick.request_log()

    assert await count_status(db_url, "healthy", ("succeeded",)) == 300
    assert sick_unfinished > 0, "the healthy provider finished while the sick one still had work"
    assert max_concurrency(sick_log) == 3, "the sick lane was saturated and never above its limit"


async def test_breaker_opens_stops_calls_probes_and_closes(db_url: str) -> None:
    threshold, cooldown, probes, concurrency = 3, 30.0, 2, 4
    clock = ManualClock()
    opened_at = clock.now
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
            clock=clock.lane_clock,
        )
        lane = relay.lanes["flaky"]
        breaker = lane.breaker
        insert_charges(db_url, "flaky", 20, "flaky")
        async with running(relay):
            await wait_until(lambda: breaker.times_opened == 1, "the breaker to open")
            before_open = await _calls_once_idle(fake, lane)
            assert threshold <= before_open <= threshold + concurrency - 1

            clock.advance(cooldown - 0.5)
            await _claim_loop_turned(relay)
            assert breaker.state is BreakerState.OPEN
            assert await _calls_once_idle(fake, lane) == before_open, "a call while open"

            clock.advance(0.5)  # half-open: the probes fail and open the breaker again
            await wait_until(lambda: breaker.times_opened == 2, "the breaker to re-open")
            probes_made = await _calls_once_idle(fake, lane) - before_open
            assert 1 <= probes_made <= probes, "half-open lets only the configured probes through"

            clock.advance(cooldown - 0.5)
            await _claim_loop_turned(relay)
            assert breaker.state is BreakerState.OPEN
            assert await _calls_once_idle(fake, lane) == before_open + probes_made

            await fake.configure(rate_503=0.0)
            clock.advance(0.5)  # half-open again: a probe succeeds and closes the breaker

            async def all_done() -> bool:
                return await count_status(db_url, "flaky", TERMINAL) == 20

            await wait_until(all_done, "every flaky intent finished")
            log = await fake.request_log()

    assert await count_status(db_url, "flaky", ("succeeded",)) == 20
    assert list(breaker.transitions)[:4] == [
        (opened_at, BreakerState.OPEN),
        (opened_at + cooldown, BreakerState.HALF_OPEN),
        (opened_at + cooldown, BreakerState.OPEN),
        (opened_at + 2 * cooldown, BreakerState.HALF_OPEN),
    ]
    assert breaker.transitions[-1] == (opened_at + 2 * cooldown, BreakerState.CLOSED)
    await _assert_attempts_match_calls(db_url, "flaky", log)


async def _calls_once_idle(fake: FakeServer, lane: Lane) -> int:
    """Calls the provider has received, once the lane has none claimed or running."""
    await wait_until(lambda: lane.in_flight == 0, f"lane {lane.provider} to go idle")
    return len(await fake.request_log())


async def _claim_loop_turned(relay: Relay) -> None:
    """Return once a whole turn of the claim loop began after this call: it has asked
    every lane what it may claim on the clock as it is now, and dispatched what it got."""
    for _ in range(2):
        seen = relay.heartbeat
        await wait_until(lambda seen=seen: relay.heartbeat > seen, "a turn of the claim loop")


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
    # One token every 1/16 s: steps of a binary fraction keep the clock's sums exact.
    rate, burst, total = 16.0, 5, 60
    clock = ManualClock()
    start = clock.now
    async with running_fake(clock=clock) as fake:
        relay = relay_for(
            db_url,
            {
                "limited": provider(
                    fake.url, concurrency=16, rate_limit_per_second=rate, rate_limit_burst=burst
                )
            },
            clock=clock.lane_clock,
        )
        insert_charges(db_url, "limited", total, "limited")
        async with running(relay):
            while True:
                allowed = min(total, burst + int(rate * (clock.now - start)))
                await wait_until(
                    lambda allowed=allowed: len(fake.posts()) >= allowed,
                    f"{allowed} calls by {clock.now - start:g} s",
                    every=0.01,
                )
                if allowed == total:
                    break
                clock.advance(1 / rate)

            async def all_done() -> bool:
                return await count_status(db_url, "limited", TERMINAL) == total

            await wait_until(all_done, "every limited intent finished")
            log = await fake.request_log()

    assert await count_status(db_url, "limited", ("succeeded",)) == total
    starts = sorted(request.at for request in fake.posts())
    assert len(starts) == total
    for i, first in enumerate(starts):
        for j in range(i, len(starts)):
            calls, interval = j - i + 1, starts[j] - first
            assert calls <= burst + rate * interval, f"{calls} calls in {interval:g} s"
    assert starts[-1] - start == (total - burst) / rate, "the limit is no slower than its rate"
    await _assert_attempts_match_calls(db_url, "limited", log)
