"""Transport: the connection pool, statement execution and LISTEN. No domain meaning here."""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TypeVar, overload

import anyio
import psycopg
import structlog
from psycopg.rows import AsyncRowFactory, TupleRow, tuple_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from relay.domain.retry_policy import capped_doubling, half_jitter
from relay.infra.queries import QUERIES

__all__ = [
    "EVENTS_NOTIFY_CHANNEL",
    "INBOX_NOTIFY_CHANNEL",
    "NOTIFY_CHANNEL",
    "RETRYABLE_DB_ERRORS",
    "Database",
    "again_next_interval",
    "every_interval",
    "fetch",
    "listen_forever",
]

R = TypeVar("R")

NOTIFY_CHANNEL = "outbox_payment_intents"
MAX_IDLE_SECONDS = 20.0
EVENTS_NOTIFY_CHANNEL = "outbox_events"  # sql/0004_pre_events.sql notifies here
INBOX_NOTIFY_CHANNEL = "outbox_webhook_inbox"  # sql/0023_pre_webhook_inbox.sql notifies here
log = structlog.get_logger("relay.infra.db")

# Errors after which the same work can simply be tried again on a fresh connection.
RETRYABLE_DB_ERRORS: tuple[type[Exception], ...] = (
    psycopg.OperationalError,
    psycopg.errors.DeadlockDetected,
    psycopg.errors.SerializationFailure,
    psycopg.errors.LockNotAvailable,
    psycopg.errors.AdminShutdown,
    psycopg.errors.CannotConnectNow,
    psycopg.errors.IdleInTransactionSessionTimeout,  # we were frozen mid-transaction
    PoolTimeout,
)


@contextmanager
def again_next_interval(job: str) -> Iterator[None]:
    """For a background job that runs again next interval: a database error ends this
    turn, never the relay. One that may heal (RETRYABLE_DB_ERRORS) is a debug line
    ``{job}_db_error``; any other (the schema behind the relay) a warning ``{job}_failed``
    that says to migrate."""
    try:
        yield
    except RETRYABLE_DB_ERRORS as exc:
        log.debug(f"{job}_db_error", error=type(exc).__name__)
    except psycopg.Error as exc:
        log.warning(
            f"{job}_failed",
            error=type(exc).__name__,
            sqlstate=getattr(exc, "sqlstate", None),
            remedy="run `outbox-relay migrate`",
        )


async def every_interval(
    job: str,
    turn: Callable[[], Awaitable[object]],
    interval_seconds: float,
    rng: Callable[[], float],
) -> None:
    """Run ``turn`` now and then every ``interval_seconds`` (x0.75-1.25 jitter, so replicas
    spread out) until cancelled; a database error ends one turn (:func:`again_next_interval`)."""
    while True:
        with again_next_interval(job):
            await turn()
        await anyio.sleep(interval_seconds * (0.75 + rng() / 2))


class Database:
    """A small async pool and named-statement helpers."""

    def __init__(
        self,
        conninfo: str,
        *,
        pool_size: int = 4,
        name: str = "outbox-relay",
        idle_in_transaction_seconds: float | None = None,
    ) -> None:
        self.conninfo = conninfo
        self.name = name  # the relay's instance name (application_name, relay_instances)
        self._idle_in_transaction_ms = (
            None if idle_in_transaction_seconds is None else int(idle_in_transaction_seconds * 1000)
        )
        self.pool: AsyncConnectionPool[psycopg.AsyncConnection[TupleRow]] = AsyncConnectionPool(
            conninfo,
            min_size=1,
            max_size=pool_size,
            open=False,
            kwargs={"application_name": name, "autocommit": True},
            timeout=30.0,
            reconnect_timeout=0,  # never give up: the relay waits for the database to return
            # An idle relay gives back what a burst grew its pool to (one connection per
            # MAX_IDLE_SECONDS), so 50 idle sidecars hold ~2 connections each, not 5.
            max_idle=MAX_IDLE_SECONDS,
            configure=self._configure,
        )

    async def _configure(self, conn: psycopg.AsyncConnection[TupleRow]) -> None:
        # A relay frozen inside a transaction (SIGSTOP, a paused VM) would hold its row
        # locks until it resumes; the server ends such a session instead, releasing them,
        # and its intents are re-driven like a killed relay's (docs/reliability.md).
        if self._idle_in_transaction_ms is not None:
            await conn.execute(
                "SELECT set_config('idle_in_transaction_session_timeout', %s, false)",
                (str(self._idle_in_transaction_ms),),
            )

    async def open(self) -> None:
        await self.pool.open(wait=False)

    async def close(self, wait_seconds: float = 5.0) -> None:
        """Close the pool; its tasks still connecting get ``wait_seconds`` to stop."""
        await self.pool.close(timeout=wait_seconds)

    @overload
    async def fetch_all(
        self, name: str, params: Mapping[str, Any] | None = None
    ) -> list[TupleRow]: ...

    @overload
    async def fetch_all(
        self, name: str, params: Mapping[str, Any] | None = None, *, row: AsyncRowFactory[R]
    ) -> list[R]: ...

    async def fetch_all(
        self,
        name: str,
        params: Mapping[str, Any] | None = None,
        *,
        row: AsyncRowFactory[Any] = tuple_row,
    ) -> list[Any]:
        """Run the named statement on a pooled connection (autocommit); its rows as ``row``
        builds them (``class_row(X)``, ``dict_row``, ``columns_row(f)``), tuples by default."""
        async with self.pool.connection() as conn:
            return await fetch(conn, name, params, row=row)


async def fetch(
    conn: psycopg.AsyncConnection[Any],
    name: str,
    params: Mapping[str, Any] | None = None,
    *,
    row: AsyncRowFactory[R],
) -> list[R]:
    """Run the named statement on ``conn``, inside its open transaction or pipeline if any;
    its rows as ``row`` builds them."""
    cur = conn.cursor(row_factory=row)
    await cur.execute(QUERIES[name], params)
    return await cur.fetchall()


async def listen_forever(
    conninfo: str,
    on_notify: Callable[[], None],
    *,
    on_connected: Callable[[], None] = lambda: None,
    retry_seconds: float = 1.0,
    max_retry_seconds: float = 30.0,
    channel: str = NOTIFY_CHANNEL,
    sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
    jitter: Callable[[], float] = random.random,
    also: Mapping[str, Callable[[], None]] | None = None,
) -> None:
    """LISTEN on ``channel`` (default: intents), calling ``on_notify`` per notification.

    Polling stays correct on its own; this only shortens pickup latency, so a broken
    listener logs and retries instead of failing the relay. Consecutive failures back off
    from ``retry_seconds``, doubling up to ``max_retry_seconds``, each wait jittered to
    between half and all of it (so sidecars do not reconnect in step after a database
    restart), with one log line per wait; a connection that LISTENed resets the backoff.
    ``also`` maps further channels to their callbacks, LISTENed on the same connection (a
    relay wakes its inbox applier without a connection of its own).
    """
    others = dict(also or {})
    failures = 0
    while True:
        try:
            conn = await psycopg.AsyncConnection.connect(
                conninfo, autocommit=True, application_name="outbox-relay-listen"
            )
            async with conn:
                await conn.execute(f"LISTEN {channel}")
                for other in others:
                    await conn.execute(f"LISTEN {other}")
                failures = 0
                on_connected()
                on_notify()  # anything committed while we were not listening
                for wake in others.values():
                    wake()
                async for notification in conn.notifies():
                    others.get(notification.channel, on_notify)()
        except psycopg.Error as exc:
            failures += 1
            delay = half_jitter(capped_doubling(retry_seconds, max_retry_seconds, failures), jitter)
            log.warning(
                "listen_connection_lost",
                error=type(exc).__name__,
                failures=failures,
                retry_in=round(delay, 2),
            )
            await sleep(delay)
            continue
        await sleep(retry_seconds)  # the server ended the connection cleanly
