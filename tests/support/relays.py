"""In-process relays against a test database: built around one adapter (``make_relay``)
or from provider settings, one lane each (``relay_for``); run in the background
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
    "max_concurrency",
    "provider",
    "relay_for",
    "run_until_settled",
    "running",
]

PRODUCTION_BREAKER = BreakerSettings()


def make_relay(
    db_url: str,
    adapter: ProviderAdapter,
    *,
    provider: str = "stripe",
    instance: str = "test-relay",
    lease_seconds: float = 30.0,
    max_attempts: int = 5,
    concurrency: int = 16,
    batch_size: int = 50,
    seed: int = 1,
    breaker: BreakerSettings = PRODUCTION_BREAKER,
    **options: Any,
) -> Relay:
    lane = Lane(provider, adapter, concurrency=concurrency, timeout_seconds=5.0, breaker=breaker)
    rng = random.Random(seed)
    return Relay(
        Database(db_url, pool_size=3, name=instance),
        {provider: lane},
        RetryPolicy(base_seconds=0.01, cap_seconds=0.05, max_attempts=max_attempts),
        RelayOptions(
            **{
                "instance": instance,
                "batch_size": batch_size,
                "lease_seconds": lease_seconds,
                "poll_interval_seconds": 0.05,
                "poll_max_interval_seconds": 0.2,
                "shutdown_grace_seconds": 5.0,
                **options,
            }
        ),
        rng=rng.random,
    )


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
    lanes = {name: build_lane(name, spec, clock=clock) for name, spec in providers.items()}
    defaults: dict[str, Any] = {
        "batch_size": 50,
        "lease_seconds": 30.0,
        "poll_interval_seconds": 0.05,
        "poll_max_interval_seconds": 0.2,
        "shutdown_grace_seconds": 10.0,
    }
    return Relay(
        Database(db_url, pool_size=4, name="bulkhead-test"),
        lanes,
        RetryPolicy(base_seconds=0.01, cap_seconds=0.05, max_attempts=max_attempts),
        RelayOptions(instance="bulkhead-test", **{**defaults, **options}),
        rng=random.Random(seed).random,
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
        await relay.db.close()


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

            async def settled() -> bool:
                return await anyio.to_thread.run_sync(unfinished, db_url) == 0

            await wait_until(settled, "every intent finished", guard_seconds=deadline)
            for relay in relays:
                relay.stop()
    finally:
        for relay in relays:
            await relay.db.close()


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
