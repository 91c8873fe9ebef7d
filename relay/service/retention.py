"""The retention sweeper: move long-finished intents out of the hot table, in batches.

Keeps claims O(batch) and dead tuples bounded however long the relay runs. Each batch is
one short statement (SKIP LOCKED), so replicas sweep side by side and never block a
claim or a write-back; while there is a backlog the sweeper goes on at once, otherwise
it sleeps ``interval_seconds`` (jittered).
"""

from __future__ import annotations

import random
from collections.abc import Callable

import anyio
import anyio.lowlevel
import structlog

from relay.core.inbox import purge_applied
from relay.core.store import Store
from relay.infra import metrics
from relay.infra.db import RETRYABLE_DB_ERRORS, Database

__all__ = ["sweep_forever", "sweep_inbox_forever"]

log = structlog.get_logger("relay.service.retention")


async def sweep_forever(
    store: Store,
    *,
    older_than_seconds: float,
    batch_size: int,
    interval_seconds: float,
    rng: Callable[[], float] = random.random,
) -> None:
    while True:
        try:
            moved = await store.archive_terminal(
                older_than_seconds=older_than_seconds, limit=batch_size
            )
        except RETRYABLE_DB_ERRORS as exc:
            log.warning("retention_db_error", error=type(exc).__name__)
            moved = 0
        if moved:
            metrics.INTENTS_ARCHIVED.inc(moved)
            log.info("intents_archived", intents=moved)
        if moved < batch_size:
            await anyio.sleep(interval_seconds * (0.5 + rng()))
        else:
            await anyio.lowlevel.checkpoint()  # a backlog: next batch now, but let other tasks run


async def sweep_inbox_forever(
    db: Database,
    *,
    older_than_seconds: float,
    batch_size: int,
    interval_seconds: float,
    rng: Callable[[], float] = random.random,
) -> None:
    """Delete applied notifications past RELAY_WEBHOOKS_RETENTION_HOURS, which outlasts
    the providers' retry windows: until then a late duplicate still meets its key."""
    while True:
        try:
            deleted = await purge_applied(
                db, older_than_seconds=older_than_seconds, limit=batch_size
            )
        except RETRYABLE_DB_ERRORS as exc:
            log.warning("inbox_retention_db_error", error=type(exc).__name__)
            deleted = 0
        if deleted:
            log.info("notifications_deleted", notifications=deleted)
        if deleted < batch_size:
            await anyio.sleep(interval_seconds * (0.5 + rng()))
        else:
            await anyio.lowlevel.checkpoint()
