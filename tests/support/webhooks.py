"""The webhook receiver served in-process on a free port, and an inbox applier for tests."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
from aiohttp import web

from provider_adapters.registry import build_notification_reader
from relay.core.inbox import InboxApplier, InboxOptions
from relay.infra.db import Database
from relay.service.webhooks import WebhookReceiver, build_receiver_app

__all__ = ["SECRET", "Receiver", "applier", "inbox_rows", "running_receiver"]

SECRET = "whsec_test_outbox_relay"


@dataclass
class Receiver:
    url: str  # the base URL; the route is url + "/webhooks/stripe"
    receiver: WebhookReceiver

    @property
    def stripe_url(self) -> str:
        return self.url + "/webhooks/stripe"


@asynccontextmanager
async def running_receiver(
    db_url: str,
    secrets: Sequence[str] = (SECRET,),
    *,
    tolerance_seconds: int = 300,
    max_body_bytes: int = 262_144,
) -> AsyncIterator[Receiver]:
    reader = build_notification_reader(
        "stripe", "stripe", list(secrets), tolerance_seconds=tolerance_seconds
    )
    db = Database(db_url, pool_size=4, name="test-webhooks")
    receiver = WebhookReceiver(db, {"stripe": reader}, max_body_bytes=max_body_bytes)
    await db.open()
    runner = web.AppRunner(build_receiver_app(receiver), access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        yield Receiver(f"http://127.0.0.1:{runner.addresses[0][1]}", receiver)
    finally:
        await runner.cleanup()
        await db.close()


def applier(
    db: Database, *, instance: str = "test-inbox", lease_seconds: float = 30.0, seed: int = 3
) -> InboxApplier:
    return InboxApplier(
        db,
        {"stripe": build_notification_reader("stripe", "stripe")},
        InboxOptions(instance=instance, lease_seconds=lease_seconds, poll_interval_seconds=0.05),
        rng=random.Random(seed).random,
    )


def inbox_rows(db_url: str) -> list[dict[str, Any]]:
    with psycopg.connect(db_url) as conn:
        cur = conn.cursor(row_factory=psycopg.rows.dict_row)
        return cur.execute(
            "SELECT id, event_id, event_type, status, payment_id, result, attempts, payload"
            " FROM outbox.webhook_inbox ORDER BY id"
        ).fetchall()
