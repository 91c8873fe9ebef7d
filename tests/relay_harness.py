"""Helpers to run in-process relays against a test database."""

from __future__ import annotations

import random
from collections.abc import Iterable
from typing import Any

import anyio
import psycopg

from provider_adapters.base import ProviderAdapter
from relay.core.lanes import Lane
from relay.core.runtime import Relay, RelayOptions
from relay.domain.retry_policy import RetryPolicy
from relay.infra.db import Database
from tests.invariants import unfinished


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
    **options: Any,
) -> Relay:
    lane = Lane(provider, adapter, concurrency=concurrency, timeout_seconds=5.0)
    rng = random.Random(seed)
    return Relay(
        Database(db_url, pool_size=3, name=instance),
        {provider: lane},
        RetryPolicy(base_seconds=0.01, cap_seconds=0.05, max_attempts=max_attempts),
        RelayOptions(
            instance=instance,
            batch_size=batch_size,
            lease_seconds=lease_seconds,
            poll_interval_seconds=0.05,
            poll_max_interval_seconds=0.2,
            shutdown_grace_seconds=5.0,
            **options,
        ),
        rng=rng.random,
    )


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
            with anyio.fail_after(deadline):
                while await anyio.to_thread.run_sync(unfinished, db_url):  # noqa: ASYNC110
                    await anyio.sleep(0.05)
            for relay in relays:
                relay.stop()
    finally:
        for relay in relays:
            await relay.db.close()


def insert_intents(db_url: str, rows: Iterable[dict[str, Any]]) -> None:
    with psycopg.connect(db_url) as conn, conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO outbox.payment_intents (payment_id, action, provider, amount_minor,"
            " currency, payment_method) VALUES (%(payment_id)s, %(action)s,"
            " %(provider)s, %(amount_minor)s, %(currency)s, %(payment_method)s)",
            [
                {
                    "provider": "stripe",
                    "currency": "EUR",
                    "payment_method": None,
                    "amount_minor": None,
                    **row,
                }
                for row in rows
            ],
        )
