"""`outbox-relay status`: queue depth by provider and status, oldest pending age."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import psycopg

from relay.queries import QUERIES

__all__ = ["collect_status", "print_status"]


def collect_status(conninfo: str) -> dict[str, object]:
    with psycopg.connect(conninfo) as conn:
        version = conn.execute(QUERIES["schema_version"]).fetchone()
        rows = conn.execute(QUERIES["status_counts"]).fetchall()
    now = datetime.now(UTC)
    providers: dict[str, dict[str, object]] = {}
    for provider, status, count, oldest in rows:
        entry = providers.setdefault(provider, {"counts": {}, "oldest_pending_seconds": None})
        entry["counts"][status] = count  # type: ignore[index]
        if oldest is not None:
            entry["oldest_pending_seconds"] = round((now - oldest).total_seconds(), 1)
    return {"schema_version": version[0] if version else None, "providers": providers}


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
    assert isinstance(providers, dict)
    if not providers:
        print("no intents yet")
        return 0
    header = f"{'provider':<12}" + "".join(f"{c:>11}" for c in columns) + f"{'oldest pending':>16}"
    print(header)
    for provider, entry in sorted(providers.items()):
        counts = entry["counts"]
        oldest = entry["oldest_pending_seconds"]
        age = "-" if oldest is None else f"{oldest:.1f}s"
        print(
            f"{provider:<12}" + "".join(f"{counts.get(c, 0):>11}" for c in columns) + f"{age:>16}"
        )
    return 0
