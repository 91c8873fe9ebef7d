"""The inbox applier's shared parts: options, results, the claimed row, and the base
class whose writes (payment, exception, event) every kind of notification uses."""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import anyio
import structlog
from psycopg import AsyncConnection
from psycopg.rows import TupleRow, dict_row
from psycopg.types.json import Jsonb

from provider_adapters.base import NotificationReader
from relay.core.store import Store
from relay.domain.intents import IntentRow
from relay.domain.money import format_minor
from relay.domain.retry_policy import RetryPolicy
from relay.infra.db import Database, fetch
from relay.infra.queries import QUERIES
from relay.infra.shutdown import CutOffShields

log = structlog.get_logger("relay.core.inbox")

# The write-back of a settled intent never retries (it is a decided outcome).
NO_RETRY = RetryPolicy(base_seconds=1.0, cap_seconds=1.0, max_attempts=1)


@dataclass(frozen=True, slots=True)
class InboxOptions:
    instance: str
    batch_size: int = 50
    lease_seconds: float = 30.0
    poll_interval_seconds: float = 0.5
    retry_base_seconds: float = 1.0
    retry_cap_seconds: float = 300.0
    # Notifications applied at once, each in its own transaction on its own connection
    # (two of one payment queue on the payment's lock). The relay's pool is shared with
    # claims and write-backs: Settings.effective_webhooks_apply_concurrency() sizes it so
    # the claim loop and the writers keep their connections.
    concurrency: int = 2
    # An intent awaiting its provider's confirmation longer than this opens a
    # confirmation_overdue exception (RELAY_CONFIRMATION_DEADLINE_SECONDS); the sweep runs
    # at most every ``overdue_sweep_seconds``.
    confirmation_deadline_seconds: float = 86_400.0
    overdue_sweep_seconds: float = 30.0


@dataclass(frozen=True, slots=True)
class Applied:
    """What applying one notification did: ``status`` applied, ignored, retry (handed
    back) or lease_lost; ``result`` is the operator-facing sentence."""

    status: str
    result: str
    payment_id: str | None = None
    retry_in: float = 0.0


@dataclass(frozen=True, slots=True)
class Claimed:
    id: int
    provider: str
    event_id: str
    event_type: str
    event_created_at: datetime | None
    received_at: datetime
    payload: dict[str, Any]
    lease_token: int
    attempts: int


def refund_state(captured_minor: int, refunded_minor: int) -> str:
    """The payment's state once ``refunded_minor`` of ``captured_minor`` is refunded."""
    return "refunded" if refunded_minor >= captured_minor else "partially_refunded"


def formatter(payment: Mapping[str, Any]) -> Callable[[int], str]:
    """Amounts of this payment as a person reads them (issue 17: ``1.00 EUR``, never
    ``100 EUR``), in its currency with its exponent, through :func:`format_minor`."""
    currency, exponent = str(payment["currency"]), payment["exponent"]
    return lambda amount_minor: format_minor(amount_minor, currency, exponent)


def exponent_of(intent: IntentRow, currency: str) -> int | None:
    """The intent's exponent when ``currency`` is the intent's; otherwise unknown here, and
    :func:`format_minor` names the amount as minor units rather than guess a scale."""
    return intent.exponent if currency == intent.currency else None


class Retry(Exception):
    def __init__(self, result: str, delay: float, payment_id: str | None) -> None:
        super().__init__(result)
        self.result, self.delay, self.payment_id = result, delay, payment_id


class ApplierBase:
    """What every part of the applier shares: the pool, the readers, the options, and the
    writes every kind of notification makes (the payment row, exceptions, events)."""

    def __init__(
        self,
        db: Database,
        readers: Mapping[str, NotificationReader],
        options: InboxOptions,
        *,
        rng: Callable[[], float] = random.random,
        stopping: Callable[[], bool] = lambda: False,
    ) -> None:
        self.db = db
        self.readers = dict(readers)
        self.options = options
        self.rng = rng
        self.stopping = stopping
        self.actor = f"relay:{options.instance}"
        self.store = Store(db, actor=self.actor)
        self._wake = anyio.Event()
        # Applies in progress, bounded by the relay's shutdown: cut_off(), which
        # Relay.stop() calls with its in-flight cut-off.
        self._applying = CutOffShields()

    async def _payment(
        self, conn: AsyncConnection[TupleRow], provider: str, reference: str
    ) -> dict[str, Any] | None:
        rows = await fetch(
            conn,
            "inbox_payment_by_reference",
            {"provider": provider, "reference": reference},
            row=dict_row,
        )
        return rows[0] if rows else None

    async def _exception(
        self,
        conn: AsyncConnection[TupleRow],
        row: Claimed,
        kind: str,
        match_key: str,
        payment: Mapping[str, Any],
        internal: int | None,
        theirs: int | None,
        detail: str,
    ) -> int:
        cur = await conn.execute(
            QUERIES["inbox_open_exception"],
            {
                "inbox_id": row.id,
                "provider": row.provider,
                "kind": kind,
                "match_key": match_key[:255],
                "payment_id": payment["payment_id"],
                "currency": payment["currency"],
                "internal_minor": internal,
                "provider_minor": theirs,
                "detail": detail[:1000],
                "occurred_at": row.event_created_at or row.received_at,
            },
        )
        found = await cur.fetchone()
        assert found is not None
        log.warning("inbox_exception", kind=kind, exception_id=found[0])
        return int(found[0])

    async def _event(
        self,
        conn: AsyncConnection[TupleRow],
        row: Claimed,
        payment_id: str,
        event_type: str,
        payment: Mapping[str, Any],
        currency: str,
        change: Mapping[str, Any],
    ) -> None:
        payload = {
            "notification": {
                "provider": row.provider,
                "event_id": row.event_id,
                "type": row.event_type,
                "created": row.event_created_at.isoformat() if row.event_created_at else None,
            },
            "payment": {
                "state": payment["state"],
                "currency": currency,
                "authorized_minor": payment["authorized_minor"],
                "captured_minor": payment["captured_minor"],
                "refunded_minor": payment["refunded_minor"],
                "disputed_minor": payment.get("disputed_minor", 0),
                "dispute_status": payment.get("dispute_status"),
                "provider_reference": payment["provider_reference"],
            },
            "change": dict(change),
        }
        await conn.execute(
            QUERIES["inbox_event"],
            {"payment_id": payment_id, "event_type": event_type, "payload": Jsonb(payload)},
        )
