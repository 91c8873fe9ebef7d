"""From an ``outbox.events`` row to the AMQP message consumers receive. Pure, no I/O.

Guarantees, each tested:

* ``message_id`` is the event's ``event_id``, the same on every publish of the event, so
  consumers deduplicate on it;
* ``correlation_id`` is the ``payment_id`` when the event has one;
* the message is persistent, ``content_type`` is ``application/json`` and the body is the
  stored ``payload`` as UTF-8 JSON, unchanged;
* headers carry the writer's headers plus ``schema-version``, and ``traceparent``,
  ``ordering-key`` and ``sequence`` when the event has them (the database refuses writer
  headers with these names, so the relay's values are never overwritten);
* the exchange is the event's own, or the configured default.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import aio_pika
from aio_pika.abc import HeadersType

__all__ = [
    "APP_ID",
    "ClaimedEvent",
    "OutgoingMessage",
    "build_message",
    "payment_routing_key",
]

APP_ID = "outbox-relay"


@dataclass(frozen=True, slots=True)
class ClaimedEvent:
    """One event leased by a publisher (a row returned by ``claim_events``)."""

    id: int
    event_id: str
    lease_token: int
    ordering_key: str | None
    seq: int | None
    exchange: str | None
    routing_key: str
    event_type: str
    payload: str
    headers: dict[str, Any] = field(default_factory=dict)
    payment_id: str | None = None
    schema_version: int = 1
    traceparent: str | None = None
    created_at: datetime | None = None
    attempts: int = 1


@dataclass(frozen=True, slots=True)
class OutgoingMessage:
    exchange: str
    routing_key: str
    message: aio_pika.Message


def payment_routing_key(action: str, status: str) -> str:
    """``payment.<action>.<status>``, as the write-back stores it for payment outcomes."""
    return f"payment.{action}.{status}"


def build_message(event: ClaimedEvent, default_exchange: str) -> OutgoingMessage:
    headers: HeadersType = dict(event.headers)
    headers["schema-version"] = event.schema_version
    if event.traceparent:
        headers["traceparent"] = event.traceparent
    if event.ordering_key is not None and event.seq is not None:
        headers["ordering-key"] = event.ordering_key
        headers["sequence"] = event.seq
    message = aio_pika.Message(
        body=event.payload.encode("utf-8"),
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=event.event_id,
        correlation_id=event.payment_id,
        type=event.event_type,
        timestamp=event.created_at,
        app_id=APP_ID,
        headers=headers,
    )
    return OutgoingMessage(
        exchange=event.exchange or default_exchange,
        routing_key=event.routing_key,
        message=message,
    )
