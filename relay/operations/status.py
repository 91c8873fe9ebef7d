"""The relay's state at a glance: queue depth by provider and status, oldest pending age,
dead intents and unpublished result events.

"oldest pending" is how long the oldest due pending intent has waited for a claim
(``now - available_at``, by the database's clock): the same figure as the
``outbox_relay_oldest_pending_age_seconds`` gauge. The command line is relay/cli/status.py.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import psycopg

from relay.infra.queries import QUERIES

__all__ = ["ProviderDepth", "Status", "collect_status"]


@dataclass
class ProviderDepth:
    """One provider's intents: a count per status, and the oldest due pending one's wait."""

    counts: dict[str, int] = field(default_factory=dict)
    oldest_pending_seconds: float | None = None


@dataclass
class Status:
    schema_version: str | None  # the latest applied migration, e.g. "0015"
    providers: dict[str, ProviderDepth]
    dead_letters: int
    unpublished_events: int
    oldest_unpublished_event_seconds: float

    def to_json(self) -> dict[str, Any]:
        """The fields as JSON types, in declaration order (``status --json``)."""
        return asdict(self)


def collect_status(conninfo: str) -> Status:
    """One read of the counts; raises psycopg.errors.UndefinedTable without the schema."""
    with psycopg.connect(conninfo) as conn:
        version = conn.execute(QUERIES["schema_version"]).fetchone()
        rows = conn.execute(QUERIES["status_counts"]).fetchall()
        depth = conn.execute(QUERIES["queue_depth"], {"now": None}).fetchall()
        events = conn.execute(QUERIES["unpublished_events"], {"now": None}).fetchone()
    providers: dict[str, ProviderDepth] = {}
    for provider, status, count, _created in rows:
        providers.setdefault(provider, ProviderDepth()).counts[status] = count
    dead = 0
    for provider, status, count, oldest in depth:
        entry = providers.setdefault(provider, ProviderDepth())
        if status == "pending":
            entry.oldest_pending_seconds = round(float(oldest), 1)
        if status == "dead":
            dead += int(count)
    unpublished, oldest_event = events if events else (0, 0.0)
    return Status(
        schema_version=version[0] if version else None,
        providers=providers,
        dead_letters=dead,
        unpublished_events=int(unpublished),
        oldest_unpublished_event_seconds=round(float(oldest_event), 1),
    )
