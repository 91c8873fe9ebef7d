"""The inbox table's own writes outside applying: the receiver's insert and retention."""

from __future__ import annotations

from datetime import datetime

from relay.infra.db import Database


async def store_notification(
    db: Database,
    provider: str,
    event_id: str,
    event_type: str,
    created: datetime | None,
    body_text: str,
) -> bool:
    """Insert one verified notification (the raw verified text, parsed by PostgreSQL, so
    what is stored is what was signed, redacted of card numbers by the table's trigger);
    committed when this returns. False: a duplicate, already stored."""
    rows = await db.fetch_all(
        "inbox_insert",
        {
            "provider": provider,
            "event_id": event_id,
            "event_type": event_type,
            "event_created_at": created,
            "payload": body_text,
        },
    )
    return bool(rows)


async def purge_applied(
    db: Database, *, older_than_seconds: float, limit: int, now: datetime | None = None
) -> int:
    """Delete up to ``limit`` applied or ignored notifications older than the retention;
    return how many. Received ones are never deleted."""
    rows = await db.fetch_all(
        "inbox_retention", {"older_than_seconds": older_than_seconds, "limit": limit, "now": now}
    )
    return len(rows)
