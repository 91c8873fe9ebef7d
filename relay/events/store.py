"""Domain operations on outbox.events: claim, mark, release. Every statement is in queries.sql.

Guarantees:

* :meth:`EventStore.claim` commits before returning: no transaction or lock is held while
  a publisher talks to the broker. Only publishable events are claimed: the head of each
  ordering key (``pending``) or unkeyed events; the lease is ``available_at``.
* :meth:`EventStore.mark` records broker results in one transaction, each fenced by its
  lease token. It first locks the ordering keys' stream rows with ``SKIP LOCKED``: a key a
  writer holds right now is left for the next attempt (its event stays held, and is
  re-published if the lease runs out), so the mark never waits and never deadlocks. Under
  the lock it advances the key's ``done_seq`` and promotes its next (``seq + 1``)
  ``blocked`` event, which a writer of that key can only have inserted before the lock was
  taken (and so is visible) or will insert after this commit (and then reads the new
  ``done_seq`` and is ``pending`` at once).
* :meth:`EventStore.release` hands held events back, fenced, to be claimed again after
  ``delay`` seconds (a nack, a lost connection, a missing exchange): nothing is dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from relay.events.messages import ClaimedEvent
from relay.infra.db import Database, fetch
from relay.infra.rows import columns_row

__all__ = ["EventResult", "EventStore", "MarkReport", "Release"]


@dataclass(frozen=True, slots=True)
class EventResult:
    """The broker's answer for one held event: ``published`` or ``unroutable``."""

    event: ClaimedEvent
    status: str
    error_code: str | None = None
    error_message: str | None = None


@dataclass(frozen=True, slots=True)
class Release:
    event: ClaimedEvent
    delay_seconds: float
    error_code: str
    error_message: str


@dataclass(frozen=True, slots=True)
class MarkReport:
    marked: set[int]  # ids recorded (fence held)
    deferred: list[EventResult]  # stream held by a writer: try again
    lost: list[EventResult]  # fence failed: another publisher holds the event now


def _claimed_event(
    id: int,
    event_id: UUID,
    lease_token: int,
    ordering_key: str | None,
    seq: int | None,
    exchange: str | None,
    routing_key: str,
    event_type: str,
    payload: str,
    headers: dict[str, Any] | None,
    payment_id: str | None,
    schema_version: int,
    traceparent: str | None,
    created_at: datetime,
    attempts: int,
) -> ClaimedEvent:
    """claim_events' row, each parameter the column of its name."""
    return ClaimedEvent(
        id=id,
        event_id=str(event_id),
        lease_token=lease_token,
        ordering_key=ordering_key,
        seq=seq,
        exchange=exchange,
        routing_key=routing_key,
        event_type=event_type,
        payload=payload,
        headers=dict(headers or {}),
        payment_id=payment_id,
        schema_version=schema_version,
        traceparent=traceparent,
        created_at=created_at,
        attempts=attempts,
    )


_CLAIMED = columns_row(_claimed_event)


def _ordering_key(ordering_key: str) -> str:
    return ordering_key


def _event_id(id: int) -> int:
    return id


# One column by name, without a dict per row: a mark round reads up to a batch of rows.
_LOCKED_KEYS = columns_row(_ordering_key)
_MARKED_IDS = columns_row(_event_id)


class EventStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def claim(
        self,
        limit: int,
        *,
        lease_seconds: float,
        instance: str,
        now: datetime | None = None,
    ) -> list[ClaimedEvent]:
        events = await self.db.fetch_all(
            "claim_events",
            {"limit": limit, "lease_seconds": lease_seconds, "instance": instance, "now": now},
            row=_CLAIMED,
        )
        events.sort(key=lambda event: event.id)
        return events

    async def mark(
        self, results: Sequence[EventResult], *, now: datetime | None = None
    ) -> MarkReport:
        if not results:
            return MarkReport(set(), [], [])
        keys = sorted({r.event.ordering_key for r in results if r.event.ordering_key is not None})
        async with self.db.pool.connection() as conn, conn.transaction():
            locked: set[str] = set()
            if keys:
                locked = set(
                    await fetch(
                        conn, "lock_event_streams", {"ordering_keys": keys}, row=_LOCKED_KEYS
                    )
                )
            ready = [
                r for r in results if r.event.ordering_key is None or r.event.ordering_key in locked
            ]
            marked: set[int] = set()
            if ready:
                rows = await fetch(
                    conn,
                    "mark_events",
                    {
                        "ids": [r.event.id for r in ready],
                        "lease_tokens": [r.event.lease_token for r in ready],
                        "statuses": [r.status for r in ready],
                        "error_codes": [r.error_code for r in ready],
                        "error_messages": [r.error_message for r in ready],
                        "now": now,
                    },
                    row=_MARKED_IDS,
                )
                marked = set(rows)
        ready_ids = {r.event.id for r in ready}
        deferred = [r for r in results if r.event.id not in ready_ids]
        lost = [r for r in ready if r.event.id not in marked]
        return MarkReport(marked, deferred, lost)

    async def set_wakeups(self, *, wanted: bool) -> None:
        """Ask event inserts to NOTIFY (this publisher goes idle) or not (it is saturated)."""
        await self.db.fetch_all("want_event_wakeups" if wanted else "skip_event_wakeups")

    async def release(self, releases: Sequence[Release], *, now: datetime | None = None) -> int:
        if not releases:
            return 0
        rows = await self.db.fetch_all(
            "release_events",
            {
                "ids": [r.event.id for r in releases],
                "lease_tokens": [r.event.lease_token for r in releases],
                "delays": [r.delay_seconds for r in releases],
                "error_codes": [r.error_code for r in releases],
                "error_messages": [r.error_message for r in releases],
                "now": now,
            },
        )
        return len(rows)
