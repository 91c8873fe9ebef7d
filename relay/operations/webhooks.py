"""The webhook inbox as an operator reads it: counts by provider, type and status, the
latest notifications, and one notification with its stored (card-redacted) payload.
The command line is relay/cli/webhooks.py."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.rows import dict_row

from relay.infra.queries import QUERIES
from relay.infra.redaction import redact_value

__all__ = ["find_notification", "list_notifications", "summarise_inbox"]


def summarise_inbox(conninfo: str) -> list[dict[str, Any]]:
    """Notifications by provider, event type and status, with the last receipt."""
    with psycopg.connect(conninfo, autocommit=True) as conn:
        return conn.cursor(row_factory=dict_row).execute(QUERIES["webhooks_summary"]).fetchall()


def list_notifications(
    conninfo: str,
    *,
    provider: str | None = None,
    status: str | None = None,
    event_type: str | None = None,
    limit: int = 50,
) -> list[dict[str, Any]]:
    """The latest notifications, newest first, filtered (None: any)."""
    params = {"provider": provider, "status": status, "event_type": event_type, "limit": limit}
    with psycopg.connect(conninfo, autocommit=True) as conn:
        rows = conn.cursor(row_factory=dict_row).execute(QUERIES["webhooks_list"], params)
        found: list[dict[str, Any]] = redact_value(rows.fetchall())
        return found


def find_notification(conninfo: str, ref: str) -> dict[str, Any] | None:
    """One notification by inbox id or provider event id; None when there is none."""
    with psycopg.connect(conninfo, autocommit=True) as conn:
        row = (
            conn.cursor(row_factory=dict_row)
            .execute(QUERIES["webhook_show"], {"ref": ref})
            .fetchone()
        )
    if row is None:
        return None
    shown: dict[str, Any] = redact_value(row)
    return shown
