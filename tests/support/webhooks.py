"""The webhook receiver served in-process on a free port, and an inbox applier for tests."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import psycopg

from provider_adapters.registry import build_notification_reader
from relay.core.inbox import InboxApplier, InboxOptions
from relay.infra.db import Database
from relay.service.webhooks import WebhookReceiver, build_receiver_app
from tests.support.serving import serving

__all__ = ["SECRET", "Receiver", "applier", "inbox_rows", "running_receiver"]

SECRET = "whsec_test_outbox_relay"


@dataclass
class Receiver:
    url: str  # the base URL; the route is url + "/webhooks/stripe"
    receiver: WebhookReceiver

    @property
    def stripe_url(self) -> str:
        return self.url + "/webhooks/stripe"

    @property
    def adyen_url(self) -> str:
        return self.url + "/webhooks/adyen"


@asynccontextmanager
async def running_receiver(
    db_url: str,
    secrets: Sequence[str] = (SECRET,),
    *,
    tolerance_seconds: int = 300,
    max_body_bytes: int = 262_144,
    adyen_hmac_keys: Sequence[str] = (),
) -> AsyncIterator[Receiver]:
    readers = {
        "stripe": build_notification_reader(
            "stripe", "stripe", list(secrets), tolerance_seconds=tolerance_seconds
        )
    }
    if adyen_hmac_keys:
        readers["adyen"] = build_notification_reader("adyen", "adyen", list(adyen_hmac_keys))
    db = Database(db_url, pool_size=4, name="test-webhooks")
    receiver = WebhookReceiver(db, readers, max_body_bytes=max_body_bytes)
    await db.open()
    try:
        async with serving(build_receiver_app(receiver)) as url:
            yield Receiver(url, receiver)
    finally:
        await db.close()


def applier(
    db: Database,
    *,
    instance: str = "test-inbox",
    lease_seconds: float = 30.0,
    seed: int = 3,
    kinds: Sequence[str] = ("stripe",),
    confirmation_deadline_seconds: float = 86_400.0,
) -> InboxApplier:
    """An applier for the providers named like their kinds (``stripe``, ``adyen``)."""
    return InboxApplier(
        db,
        {kind: build_notification_reader(kind, kind) for kind in kinds},
        InboxOptions(
            instance=instance,
            lease_seconds=lease_seconds,
            poll_interval_seconds=0.05,
            confirmation_deadline_seconds=confirmation_deadline_seconds,
        ),
        rng=random.Random(seed).random,
    )


def inbox_rows(db_url: str) -> list[dict[str, Any]]:
    with psycopg.connect(db_url) as conn:
        cur = conn.cursor(row_factory=psycopg.rows.dict_row)
        return cur.execute(
            "SELECT id, event_id, event_type, status, payment_id, result, attempts, payload"
            " FROM outbox.webhook_inbox ORDER BY id"
        ).fetchall()
