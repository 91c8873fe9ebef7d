"""Unit tests of the pure circuit breaker and token bucket, and of a lane built on them,
on a hand-driven clock (tests/support/clock.py): no test waits for real time to pass."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import anyio.lowlevel
import pytest
from hypothesis import given
from hypothesis import strategies as st

from provider_adapters.memory import MemoryProvider
from relay.core.lanes import BreakerSettings, Lane, RateLimit
from relay.domain.breaker import BreakerState, CircuitBreaker
from relay.domain.rate_limit import TokenBucket
from tests.support.clock import ManualClock as Clock
from tests.support.waiting import wait_until


def make_breaker(clock: Clock, threshold: int = 3, probes: int = 2) -> CircuitBreaker:
    return CircuitBreaker(
        failure_threshold=threshold, cooldown_seconds=10.0, half_open_probes=probes, clock=clock
    )


def test_opens_after_threshold_consecutive_failures_only() -> None:
    clock = Clock()
    breaker = make_breaker(clock)
    breaker.record_failure()
    breaker.record_failure()
    breaker.record_success()  # resets the run of failures
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.state is BreakerState.CLOSED
    assert breaker.allowance() is None
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN
    assert breaker.allowance() == 0
    assert not breaker.try_start()


def test_open_turns_half_open_after_cooldown_and_lets_probes_through() -> None:
    clock = Clock()
    breaker = make_breaker(clock, threshold=1, probes=2)
    breaker.record_failure()
    clock.now += 9.9
    assert breaker.state is BreakerState.OPEN
    assert breaker.seconds_until_half_open() == pytest.approx(0.1)
    clock.now += 0.1
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.allowance() == 2
    assert breaker.try_start() and breaker.try_start()
    assert not breaker.try_start(), "no more than the configured probes at once"
    breaker.cancel_start()
    assert breaker.allowance() == 1


def test_half_open_success_closes_and_failure_reopens() -> None:
    clock = Clock()
    breaker = make_breaker(clock, threshold=1, probes=1)
    breaker.record_failure()
    clock.now += 10
    assert breaker.try_start()
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN
    assert breaker.times_opened == 2
    clock.now += 10
    assert breaker.try_start()
    breaker.record_success()
    assert breaker.state is BreakerState.CLOSED
    assert [state for _, state in breaker.transitions] == [
        BreakerState.OPEN,
        BreakerState.HALF_OPEN,
        BreakerState.OPEN,
        BreakerState.HALF_OPEN,
        BreakerState.CLOSED,
    ]


def test_late_failure_of_a_call_started_before_opening_does_not_extend_the_open_period() -> None:
    clock = Clock()
    breaker = make_breaker(clock, threshold=1)
    breaker.record_failure()
    clock.now += 5
    breaker.record_failure()
    clock.now += 5
    assert breaker.state is BreakerState.HALF_OPEN


def test_bad_breaker_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="failure_threshold"):
        CircuitBreaker(failure_threshold=0, cooldown_seconds=1, half_open_probes=1, clock=Clock())


def test_bucket_allows_a_burst_then_the_rate() -> None:
    clock = Clock()
    bucket = TokenBucket(rate=4.0, burst=3, clock=clock)
    assert [bucket.try_take() for _ in range(4)] == [True, True, True, False]
    assert bucket.seconds_until_token() == pytest.approx(0.25)
    clock.now += 0.25
    assert bucket.try_take()
    assert not bucket.try_take()
    clock.now += 100
    assert bucket.available() == 3, "never more than the burst"
    assert bucket.obtainable_within(1.0) == 3 + 4


@given(
    rate=st.floats(min_value=0.5, max_value=200),
    burst=st.integers(min_value=1, max_value=20),
    steps=st.lists(st.floats(min_value=0, max_value=0.5), min_size=1, max_size=200),
)
def test_bucket_never_exceeds_burst_plus_rate_times_elapsed(
    rate: float, burst: int, steps: list[float]
) -> None:
    clock = Clock()
    start = clock.now
    bucket = TokenBucket(rate=rate, burst=burst, clock=clock)
    taken = 0
    for step in steps:
        clock.now += step
        while bucket.try_take():
            taken += 1
        assert taken <= burst + rate * (clock.now - start) + 1e-9


# -- a lane reads and waits on the clock it is given ------------------------------------


def make_lane(clock: Clock, **settings: object) -> Lane:
    return Lane(
        "memory",
        MemoryProvider(),
        concurrency=8,
        timeout_seconds=5.0,
        clock=clock.lane_clock,
        **settings,  # type: ignore[arg-type]
    )


@asynccontextmanager
async def waiting_for_a_token(
    clock: Clock, per_second: float, stop: anyio.Event, admitted: list[bool]
) -> AsyncIterator[Lane]:
    """A lane whose burst of one token is spent, with a second admission asleep on its
    clock for the block's duration; what that admission returns lands in ``admitted``."""
    lane = make_lane(clock, rate_limit=RateLimit(per_second=per_second, burst=1))
    lane.acquire()
    assert await lane.admit(stop), "the burst's one token"

    async def admit_next() -> None:
        lane.acquire()
        admitted.append(await lane.admit(stop))

    async with anyio.create_task_group() as tg:
        tg.start_soon(admit_next)
        await wait_until(lambda: clock.sleepers == 1, "the admission to sleep on the lane clock")
        yield lane


@pytest.mark.anyio
async def test_lane_waits_for_a_token_on_its_clock() -> None:
    clock, stop, admitted = Clock(), anyio.Event(), []
    async with waiting_for_a_token(clock, 4.0, stop, admitted) as lane:
        clock.advance(0.2)
        await anyio.lowlevel.checkpoint()  # the woken admission sees the clock, sleeps on
        assert admitted == [], "no token before 1/rate has passed on the lane's clock"
        clock.advance(0.05)
    assert admitted == [True]
    assert lane.seconds_until_capacity() == pytest.approx(0.25)


@pytest.mark.anyio
async def test_a_stop_ends_the_wait_for_a_token_without_admitting() -> None:
    clock, stop, admitted = Clock(), anyio.Event(), []
    async with waiting_for_a_token(clock, 1.0, stop, admitted) as lane:
        stop.set()
    assert admitted == [False]
    assert clock.sleepers == 0 and lane.waiting == 0


def test_lane_breaker_cools_down_on_the_lane_clock() -> None:
    clock = Clock()
    lane = make_lane(clock, breaker=BreakerSettings(failure_threshold=1, cooldown_seconds=10.0))
    lane.breaker.record_failure()
    assert lane.claimable() == 0
    assert lane.seconds_until_capacity() == pytest.approx(10.0)
    clock.advance(10.0)
    assert lane.breaker.state is BreakerState.HALF_OPEN
    assert lane.claimable() == 1, "one half-open probe by default"


@pytest.mark.anyio
async def test_an_admission_cancelled_before_the_call_gives_its_token_back() -> None:
    # The relay admits, then finds the lease too short for the call and hands the intent
    # back unattempted: the provider's rate budget must not shrink by a call never made.
    clock, stop = Clock(), anyio.Event()
    lane = make_lane(clock, rate_limit=RateLimit(per_second=1.0, burst=2))
    lane.acquire()
    assert await lane.admit(stop)
    lane.cancel_admission()
    assert lane.bucket is not None and lane.bucket.available() == 2
    lane.acquire()
    lane.acquire()
    assert [await lane.admit(stop), await lane.admit(stop)] == [True, True]
    assert lane.bucket.available() == 0


def test_a_token_given_back_never_lifts_the_bucket_above_its_burst() -> None:
    clock = Clock()
    bucket = TokenBucket(rate=1.0, burst=2, clock=clock)
    bucket.give_back()
    assert bucket.available() == 2


@pytest.mark.anyio
async def test_an_admission_the_breaker_refuses_gives_its_token_back() -> None:
    clock, stop = Clock(), anyio.Event()
    lane = make_lane(
        clock,
        rate_limit=RateLimit(per_second=1.0, burst=2),
        breaker=BreakerSettings(failure_threshold=1, cooldown_seconds=10.0),
    )
    lane.breaker.record_failure()
    lane.acquire()
    assert not await lane.admit(stop), "the breaker is open"
    assert lane.bucket is not None and lane.bucket.available() == 2
