"""In-process relays wired to fake providers (tests/fake_server.py), and what to check."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import psycopg

from relay.core.runtime import Relay, RelayOptions
from relay.domain.retry_policy import RetryPolicy
from relay.infra.config import ProviderSettings
from relay.infra.db import Database
from relay.service.main import build_lane


def provider(url: str, **settings: Any) -> ProviderSettings:
    return ProviderSettings(base_url=url, api_key="sk_test_bulkheads", **settings)


def relay_for(
    db_url: str,
    providers: dict[str, ProviderSettings],
    *,
    max_attempts: int = 50,
    seed: int = 7,
    **options: Any,
) -> Relay:
    lanes = {name: build_lane(name, spec) for name, spec in providers.items()}
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


async def wait_until(
    check: Callable[[], Awaitable[bool]], *, guard_seconds: float = 180.0, every: float = 0.05
) -> None:
    """Poll ``check``; the guard only turns a hang into a failure, it is no speed limit."""
    with anyio.fail_after(guard_seconds):
        while not await check():  # noqa: ASYNC110 - the condition lives in the database
            await anyio.sleep(every)


def insert_charges(db_url: str, provider_name: str, count: int, prefix: str) -> None:
    with psycopg.connect(db_url) as conn, conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO outbox.payment_intents (payment_id, action, provider, amount_minor,"
            " currency, payment_method) VALUES (%s, 'charge', %s, %s, 'EUR', 'pm_card_visa')",
            [(f"{prefix}-{n}", provider_name, 1000 + n) for n in range(count)],
        )


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
