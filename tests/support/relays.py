"""In-process relays against a test database: built around one adapter (``make_relay``),
around lanes the test built (``relay_with_lanes``) or from provider settings, one lane each
(``relay_for``); run in the background
(``running``) or until every intent is finished (``run_until_settled``)."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import psycopg

from provider_adapters.base import ProviderAdapter
from relay.core.clock import SYSTEM_CLOCK, Clock
from relay.core.lanes import BreakerSettings, Lane
from relay.core.runtime import Relay, RelayOptions
from relay.domain.retry_policy import RetryPolicy
from relay.infra.config import ProviderSettings
from relay.infra.db import Database
from relay.service.main import build_lane
from tests.invariants import unfinished
from tests.support.waiting import wait_until

__all__ = [
    "count_status",
    "make_relay",
    "make_relay_with",
    "max_concurrency",
    "provider",
    "relay_for",
    "relay_with_lanes",
    "run_until_settled",
    "running",
]

PRODUCTION_BREAKER = BreakerSettings()
# Fast polling and retries for tests; the lease and grace of a short production run.
_TEST_OPTIONS: dict[str, Any] = {
    "batch_size": 50,
    "lease_seconds": 30.0,
    "poll_interval_seconds": 0.05,
    "poll_max_interval_seconds": 0.2,
}


def _relay(
    db_url: str,
    lanes: dict[str, Lane],
    *,
    instance: str,
    pool_size: int,
    max_attempts: int,
    seed: int,
    options: dict[str, Any],
) -> Relay:
    """The one builder behind :func:`make_relay` and :func:`relay_for`."""
    return Relay(
        Database(db_url, pool_size=pool_size, name=instance),
        lanes,
        RetryPolicy(base_seconds=0.01, cap_seconds=0.05, max_attempts=max_attempts),
        RelayOptions(instance=instance, **{**_TEST_OPTIONS, **options}),
        rng=random.Random(seed).random,
    )


def relay_with_lanes(
    db_url: str,
    lanes: dict[str, Lane],
    *,
    instance: str = "test-relay",
    max_attempts: int = 5,
    seed: int = 1,
    **options: Any,
) -> Relay:
    """A relay around lanes the test built itself (its own adapters, breakers, timeouts)."""
    return _relay(
        db_url,
        lanes,
        instance=instance,
        pool_size=3,
        max_attempts=max_attempts,
        seed=seed,
        options={"shutdown_grace_seconds": 5.0, **options},
    )


def make_relay(
    db_url: str,
    adapter: ProviderAdapter,
    *,
    provider: str = "stripe",
    **options: Any,
) -> Relay:
    """A relay with one lane around ``adapter`` (a 5 s call timeout)."""
    return make_relay_with(db_url, {provider: adapter}, **options)


def make_relay_with(
    db_url: str,
    adapters: dict[str, ProviderAdapter],
    *,
    concurrency: int = 16,
    breaker: BreakerSettings = PRODUCTION_BREAKER,
    **options: Any,
) -> Relay:
    """A relay with one lane per provider name around its adapter (a 5 s call timeout)."""
    lanes = {
        name: Lane(name, adapter, concurrency=concurrency, timeout_seconds=5.0, breaker=breaker)
        for name, adapter in adapters.items()
    }
    return relay_with_lanes(db_url, lanes, **options)


def provider(url: str, **settings: Any) -> ProviderSettings:
    """Settings for a provider served at ``url`` (a fake); ``settings`` override."""
    return ProviderSettings(base_url=url, api_key="sk_test_bulkheads", **settings)


def relay_for(
    db_url: str,
    providers: dict[str, ProviderSettings],
    *,
    max_attempts: int = 50,
    seed: int = 7,
    clock: Clock = SYSTEM_CLOCK,
    **options: Any,
) -> Relay:
    """A relay with a lane per provider as production builds it, on ``clock``."""
    return _relay(
        db_url,
        {name: build_lane(name, spec, clock=clock) for name, spec in providers.items()},
        instance="bulkhead-test",
        pool_size=4,
        max_attempts=max_attempts,
        seed=seed,
        options={"shutdown_grace_seconds": 10.0, **options},
    )


@asynccontextmanager
async def running(relay: Relay) -> AsyncIterator[Relay]:
    """Run ``relay`` in the background; on exit stop it and wait until it has drained."""
    await relay.db.open()
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(relay.run)
            try:
                yield relay
            finally:
                relay.stop()
                await relay.finished.wait()
    finally:
        await _close(relay)


async def settled(db_url: str) -> bool:
    """No intent is left unfinished (tests/invariants.unfinished), read off the event loop."""
    return await anyio.to_thread.run_sync(unfinished, db_url) == 0


async def run_until_settled(
    db_url: str, relays: Iterable[Relay], *, deadline: float = 120.0
) -> None:
    """Run the relays until no intent is left unfinished; fail after ``deadline`` (a hang)."""
    relays = list(relays)
    for relay in relays:
        await relay.db.open()
    try:
        async with anyio.create_task_group() as tg:
            for relay in relays:
                await tg.start(relay.run)

            await wait_until(
                lambda: settled(db_url), "every intent finished", guard_seconds=deadline
            )
            for relay in relays:
                relay.stop()
    finally:
        for relay in relays:
            await _close(relay)


async def _close(relay: Relay) -> None:
    """What the service closes after a relay stops: its pool and its lanes' connections."""
    await relay.db.close()
    for lane in relay.lanes.values():
        await lane.adapter.aclose()


async def count_status(db_url: str, provider_name: str, statuses: tuple[str, ...]) -> int:
    async with await psycopg.AsyncConnection.connect(db_url) as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM outbox.payment_intents WHERE provider = %s AND status = ANY(%s)",
            (provider_name, list(statuses)),
        )
        row = await cur.fetchone()
    assert row is not None
    return int(row[0])


def max_concurrency(log: list[dict[str, Any]]) -> int:
    """Most requests the provider was serving at once (still running counts as open)."""
    events: list[tuple[float, int]] = []
    for entry in log:
        events.append((entry["started"], 1))
        events.append((entry["finished"] if entry["finished"] is not None else float("inf"), -1))
    events.sort(key=lambda e: (e[0], e[1]))  # an end before a start at the same instant
    current = peak = 0
    for _, delta in events:
        current += delta
        peak = max(peak, current)
    return peak
