"""`outbox-relay status`: queue depth by provider and status, oldest pending age, dead
intents and unpublished result events.

"oldest pending" is how long the oldest due pending intent has waited for a claim
(``now - available_at``, by the database's clock): the same figure as the
``outbox_relay_oldest_pending_age_seconds`` gauge.
"""

from __future__ import annotations

import json
from typing import Any

import psycopg

from relay.cli.tables import format_seconds, render_table
from relay.infra.queries import QUERIES

__all__ = ["collect_status", "print_status"]


def collect_status(conninfo: str) -> dict[str, Any]:
    with psycopg.connect(conninfo) as conn:
        version = conn.execute(QUERIES["schema_version"]).fetchone()
        rows = conn.execute(QUERIES["status_counts"]).fetchall()
        depth = conn.execute(QUERIES["queue_depth"], {"now": None}).fetchall()
        events = conn.execute(QUERIES["unpublished_events"], {"now": None}).fetchone()
    providers: dict[str, dict[str, Any]] = {}
    for provider, status, count, _created in rows:
        entry = providers.setdefault(provider, {"counts": {}, "oldest_pending_seconds": None})
        entry["counts"][status] = count
    dead = 0
    for provider, status, count, oldest in depth:
        entry = providers.setdefault(provider, {"counts": {}, "oldest_pending_seconds": None})
        if status == "pending":
            entry["oldest_pending_seconds"] = round(float(oldest), 1)
        if status == "dead":
            dead += int(count)
    unpublished, oldest_event = events if events else (0, 0.0)
    return {
        "schema_version": version[0] if version else None,
        "providers": providers,
        "dead_letters": dead,
        "unpublished_events": int(unpublished),
        "oldest_unpublished_event_seconds": round(float(oldest_event), 1),
    }


def print_status(conninfo: str, *, as_json: bool = False) -> int:
    try:
        status = collect_status(conninfo)
    except psycopg.errors.UndefinedTable:
        print("error: the outbox schema is missing; run `outbox-relay migrate` first")
        return 1
    if as_json:
        print(json.dumps(status, indent=2))
        return 0
    columns = ["blocked", "pending", "in_flight", "succeeded", "failed", "dead"]
    print(f"schema version {status['schema_version']}")
    providers = status["providers"]
    table = []
    for provider, entry in sorted(providers.items()):
        counts = entry["counts"]
        oldest = entry["oldest_pending_seconds"]
        age = None if oldest is None else format_seconds(oldest)
        table.append([provider, *(counts.get(c, 0) for c in columns), age])
    print(
        render_table(["provider", *columns, "oldest pending"], table) if table else "no intents yet"
    )
    dead = status["dead_letters"]
    print(
        f"\ndead intents: {dead}"
        + (" (they block their payments: `outbox-relay dead-letters list`)" if dead else "")
    )
    unpublished = status["unpublished_events"]
    oldest_event = status["oldest_unpublished_event_seconds"]
    print(
        f"unpublished events: {unpublished}"
        + (f" (oldest {format_seconds(oldest_event)})" if unpublished else "")
    )
    return 0
