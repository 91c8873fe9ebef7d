"""The events publisher: outbox.events -> RabbitMQ (aio-pika, publisher confirms).

One task, owned by the relay's task group. Guarantees:

* an event is marked ``published`` only after the broker confirmed it (``basic.ack`` on a
  confirm-mode channel); a message the broker returns as unroutable (``mandatory``) is
  marked ``unroutable`` with ``error_code = 'no_route'``, logged and counted, never
  dropped silently; a nack, a timeout or a lost connection hands the event back to be
  published again: delivery is at least once, with a stable ``message_id``;
* per ordering key (``payment:<payment_id>`` for payment outcomes) events are published
  in the order their writers committed: only the key's head is ever claimable (see
  relay/events/store.py and sql/0004_pre_events.sql), whatever the number of replicas;
* no database transaction or lock is held while talking to the broker: claim (lease)
  commits, then publish a window of messages, await their confirms, then mark;
* the broker being down never stops payments nor crashes the relay: the publisher logs,
  reconnects with capped exponential backoff and full jitter, and catches up;
* on stop it finishes its round, publishes what is left (a final flush) and returns, all
  within the shutdown grace; anything cut off is re-published after its lease expires.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import urlsplit

import aio_pika
import anyio
import psycopg
import structlog
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange
from aiormq.abc import DeliveredMessage
from anyio.abc import TaskStatus
from psycopg_pool import PoolTimeout

from relay.domain.retry_policy import capped_doubling
from relay.events.messages import ClaimedEvent, build_message
from relay.events.store import EventResult, EventStore, Release
from relay.infra import metrics
from relay.infra.config import Settings
from relay.infra.db import EVENTS_NOTIFY_CHANNEL, RETRYABLE_DB_ERRORS, Database, listen_forever
from relay.infra.shutdown import CutOffShields

__all__ = ["Publisher", "PublisherOptions", "publisher_from_settings"]

log = structlog.get_logger("relay.events.publisher")

# What a broker or network failure raises: the connection is renewed after a backoff.
_AMQP_ERRORS: tuple[type[BaseException], ...] = aio_pika.exceptions.CONNECTION_EXCEPTIONS
_MAX_MESSAGE = 500
# A release code: the event's lease would end before its confirm could come; not sent.
_LEASE_ENDING = "lease_ending"
# The relay's pool timeout (relay/infra/db.py): the longest one database call waits for a connection.
_POOL_TIMEOUT_SECONDS = 30.0


@contextlib.contextmanager
def _stray_cancel_is_a_lost_link() -> Iterator[None]:
    """Turn aiormq's way of failing a dead connection into a lost link.

    When aiormq finds a connection stuck (no frame within the heartbeat grace, e.g. a
    path that went silent) it cancels its reader and closes the connection with that
    CancelledError as the reason, failing every pending operation (a connect, a channel
    open, a confirm) with a CancelledError (aiormq FutureStore.reject_all). That is no
    cancellation of this task; let through, it would end the task as cancelled, and anyio
    then cancels the task group that owns the publisher: the relay would stop without an
    error. Raised while nothing cancels this task, it is a lost link: reconnect.
    """
    try:
        yield
    except asyncio.CancelledError as exc:
        task = asyncio.current_task()
        if task is None or task.cancelling():
            raise  # a real cancellation (shutdown, a deadline): let it through
        raise aio_pika.exceptions.AMQPConnectionError(
            "the AMQP client closed the connection as dead (no frame from the broker "
            "within the heartbeat grace)"
        ) from exc


@dataclass(frozen=True, slots=True)
class PublisherOptions:
    amqp_url: str
    instance: str
    exchange: str = "outbox.events"
    declare_topology: bool = False
    example_queue: str | None = None
    batch_size: int = 500
    window: int = 100
    timeout_seconds: float = 15.0
    lease_seconds: float = 60.0
    poll_interval_seconds: float = 1.0
    poll_max_interval_seconds: float = 5.0
    reconnect_base_seconds: float = 0.5
    reconnect_cap_seconds: float = 30.0
    shutdown_grace_seconds: float = 30.0
    listen: bool = True


def publisher_from_settings(settings: Settings, db: Database) -> Publisher | None:
    """The relay's publisher, or None (logged once) when RELAY_AMQP_URL is unset."""
    url = settings.resolved_amqp_url()
    if url is None:
        source = settings.amqp_url_file
        log.warning(
            "events_publisher_disabled",
            reason="RELAY_AMQP_URL is not set"
            if source is None
            else f"RELAY_AMQP_URL_FILE {source} is empty",
            remedy="events stay in outbox.events (status pending/blocked), readable in SQL; "
            "set RELAY_AMQP_URL to publish them, in order, from where they stand",
        )
        return None
    return Publisher(
        db,
        PublisherOptions(
            amqp_url=url,
            instance=settings.instance_name,
            exchange=settings.events_exchange,
            declare_topology=settings.events_declare_topology,
            example_queue=settings.events_example_queue,
            batch_size=settings.publish_batch_size,
            window=settings.publish_window,
            timeout_seconds=settings.publish_timeout_seconds,
            lease_seconds=settings.lease_seconds,
            poll_interval_seconds=settings.poll_interval_seconds,
            poll_max_interval_seconds=settings.poll_max_interval_seconds,
            reconnect_base_seconds=settings.amqp_reconnect_base_seconds,
            reconnect_cap_seconds=settings.amqp_reconnect_cap_seconds,
            shutdown_grace_seconds=settings.shutdown_grace_seconds,
        ),
    )


def _clip(message: str) -> str:
    return message if len(message) <= _MAX_MESSAGE else message[: _MAX_MESSAGE - 1] + "…"


class _Held:
    """A confirmed event whose mark is still to be written, and when its lease ends."""

    __slots__ = ("deferred", "lease_ends", "result")

    def __init__(self, result: EventResult, lease_ends: float) -> None:
        self.result = result
        self.lease_ends = lease_ends
        self.deferred = False


class Publisher:
    def __init__(
        self,
        db: Database,
        options: PublisherOptions,
        *,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.db = db
        self.store = EventStore(db)
        self.options = options
        self.rng = rng
        self.connected = False
        self.published = 0  # marked published or unroutable by this publisher
        self.connections = 0  # successful connects, for tests and logs
        self.connect_failures = 0  # failed connects since start
        self.links_lost = 0  # established connections that broke (closed, timed out, dead)
        self.finished = anyio.Event()
        self._wake_event = anyio.Event()
        self._stopping = False
        self._stop_event = anyio.Event()
        self._deadline: float | None = None
        self._scope: anyio.CancelScope | None = None
        # Shielded final writes (marks and releases), bounded by the process's hard stop
        # once start_draining() names it, also those in progress then.
        self._final_writes = CutOffShields()
        self._held: dict[int, _Held] = {}
        self._failures = 0
        self._wakeups_wanted: bool | None = None  # what this publisher last asked event inserts
        self._claimed_ok = False
        self.heartbeat = 0.0  # anyio clock of the last turn of a loop below (liveness)

    # -- control -------------------------------------------------------------------------

    def wake(self) -> None:
        self._wake_event.set()

    def stale_after_seconds(self) -> float:
        """How long the publisher may go without a turn before liveness calls it wedged.

        Twice the longest a healthy turn takes: a connect (timeout) and the longest
        reconnect backoff, or a claim and a mark (each may wait the database pool's 30 s),
        a round of publishes (a window at a time, each confirm within the timeout) and
        the final mark and release (each within the timeout), and an idle wait.
        """
        rounds = -(-self.options.batch_size // self.options.window)
        turn = (
            self.options.timeout_seconds * (rounds + 3)
            + 2 * _POOL_TIMEOUT_SECONDS
            + self.options.reconnect_cap_seconds
            + 1.5 * self.options.poll_max_interval_seconds
        )
        return 2 * turn

    def start_draining(self, *, hard_stop_at: float | None = None) -> None:
        """The process is shutting down: finish within the grace counted from now.

        ``hard_stop_at`` (anyio clock): when the process cancels everything to close and
        exit. The shielded writes of confirmed marks and releases, which a cancellation
        must not cut in half, end by then whatever the database does: past it their
        leases expire and the events are published again (consumers deduplicate)."""
        if self._deadline is None:
            self._deadline = anyio.current_time() + self.options.shutdown_grace_seconds
            if self._scope is not None:
                self._scope.deadline = self._deadline
        if hard_stop_at is not None:
            self._final_writes.cut_off(hard_stop_at)

    def stop(self) -> None:
        """No more events will be written here: flush what is left, then :meth:`run` returns."""
        self.start_draining()
        self._stopping = True
        self._stop_event.set()
        self.wake()

    # -- main ----------------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Publish until stopped; never raises for broker or database trouble."""
        self.heartbeat = anyio.current_time()
        try:
            with anyio.CancelScope() as scope:
                self._scope = scope
                if self._deadline is not None:
                    scope.deadline = self._deadline
                async with anyio.create_task_group() as helpers:
                    if self.options.listen:
                        helpers.start_soon(self._listen)
                    task_status.started()
                    await self._connect_loop()
                    helpers.cancel_scope.cancel()
            if scope.cancelled_caught:
                log.warning(
                    "publisher_shutdown_grace_exceeded",
                    remedy="events left unpublished are published by another replica or "
                    "after restart (leases expire); consumers deduplicate by message_id",
                )
        finally:
            self.connected = False
            metrics.AMQP_CONNECTED.set(0)
            self.finished.set()
            log.info("publisher_stopped", published=self.published)

    async def _listen(self) -> None:
        await listen_forever(self.db.conninfo, self.wake, channel=EVENTS_NOTIFY_CHANNEL)

    def _backoff(self, failures: int) -> float:
        ceiling = capped_doubling(
            self.options.reconnect_base_seconds, self.options.reconnect_cap_seconds, failures
        )
        return ceiling * self.rng()  # full jitter

    async def _connect_loop(self) -> None:
        host = urlsplit(self.options.amqp_url).hostname
        while True:
            self.heartbeat = anyio.current_time()
            # Events the broker confirmed before a link broke are marked without waiting
            # for a new link (their leases run; the broker may stay away for long).
            await self._mark_held()
            try:
                with _stray_cancel_is_a_lost_link():
                    connection = await aio_pika.connect(
                        self.options.amqp_url, timeout=self.options.timeout_seconds
                    )
            except Exception as exc:  # unreachable, refused, bad credentials, bad URL...
                if self._stopping:
                    log.warning("publisher_stopping_broker_unreachable", error=type(exc).__name__)
                    return
                self._failures += 1
                self.connect_failures += 1
                delay = self._backoff(self._failures)
                log.warning(
                    "amqp_connect_failed",
                    host=host,
                    error=type(exc).__name__,
                    detail=_clip(str(exc)),
                    attempt=self._failures,
                    retry_in=round(delay, 3),
                )
                await self._sleep(delay)
                continue
            try:
                with _stray_cancel_is_a_lost_link():
                    async with connection:
                        await self._session(connection)
                return  # stopped and flushed
            except _AMQP_ERRORS as exc:
                self._failures += 1
                self.links_lost += 1
                log.warning(
                    "amqp_connection_lost",
                    host=host,
                    error=type(exc).__name__,
                    detail=_clip(str(exc)),
                    remedy="reconnecting; unconfirmed events are published again",
                )
            except Exception:
                # A bug must not take payments down with it: log, back off, start over.
                self._failures += 1
                log.exception("publisher_session_failed")
            finally:
                if self.connected:
                    self.connected = False
                    metrics.AMQP_CONNECTED.set(0)
            if self._stopping:
                log.warning("publisher_stopping_connection_lost")
                return
            await self._sleep(self._backoff(self._failures))

    async def _sleep(self, seconds: float) -> None:
        """Sleep (a backoff), cut short only by :meth:`stop`."""
        with anyio.move_on_after(seconds):
            await self._stop_event.wait()

    async def _session(self, connection: AbstractConnection) -> None:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=False)

        def closed(_sender: object, _exc: BaseException | None = None) -> None:
            self.wake()  # an idle publisher notices a dropped link at once

        connection.close_callbacks.add(closed)
        channel.close_callbacks.add(closed)
        exchanges = _Exchanges(connection, channel, self.options.timeout_seconds)
        if self.options.declare_topology:
            await self._declare_topology(channel)
        self.connected = True
        self.connections += 1
        self._failures = 0
        metrics.AMQP_CONNECTED.set(1)
        log.info(
            "amqp_connected",
            exchange=self.options.exchange,
            declared=self.options.declare_topology,
            window=self.options.window,
        )
        idle = self.options.poll_interval_seconds
        while True:
            if connection.is_closed or channel.is_closed:
                raise aio_pika.exceptions.AMQPConnectionError("the AMQP connection closed")
            self.heartbeat = anyio.current_time()
            self._wake_event = anyio.Event()
            await self._mark_held()
            events = await self._claim()
            if events:
                full = len(events) == self.options.batch_size
                if full:
                    await self._ask_for_wakeups(False)
                await self._publish_round(exchanges, events)
                idle = self.options.poll_interval_seconds
                if full or self._wakeups_wanted is False:
                    # More may be waiting; or, without wake-ups, find out now whether
                    # this publisher is idle and must ask for them before it sleeps.
                    continue
            elif self._claimed_ok and not self._stopping and await self._ask_for_wakeups(True):
                continue  # once more: events committed before the flag did not notify
            if self._stopping:
                if not events and not self._held:
                    log.info("publisher_flushed")
                    return
                if events:
                    continue
            wait = min(idle, 0.1) if self._held else idle
            with anyio.move_on_after(wait * (0.5 + self.rng())):
                await self._wake_event.wait()
            if not self._wake_event.is_set():
                idle = min(idle * 2, self.options.poll_max_interval_seconds)

    async def _ask_for_wakeups(self, wanted: bool) -> bool:
        """Tell event inserts whether to NOTIFY; True when this changed what we had asked.

        As the relay's claim loop does for intents (sql/0007): only an idle publisher
        needs a NOTIFY, and a write-back that notifies queues its commit on the
        cluster-wide notification lock. What we asked last is remembered, so this writes
        only on a change; polling covers a wake-up lost to a race.
        """
        if not self.options.listen or self._wakeups_wanted is wanted:
            return False
        try:
            await self.store.set_wakeups(wanted=wanted)
        except (psycopg.Error, PoolTimeout) as exc:
            log.warning("event_wakeups_not_set", wanted=wanted, error=type(exc).__name__)
            return False
        self._wakeups_wanted = wanted
        return True

    async def _declare_topology(self, channel: AbstractChannel) -> None:
        exchange = await channel.declare_exchange(
            self.options.exchange,
            aio_pika.ExchangeType.TOPIC,
            durable=True,
            timeout=self.options.timeout_seconds,
        )
        if self.options.example_queue:
            queue = await channel.declare_queue(
                self.options.example_queue,
                durable=True,
                arguments={"x-queue-type": "quorum"},
                timeout=self.options.timeout_seconds,
            )
            await queue.bind(exchange, routing_key="#", timeout=self.options.timeout_seconds)
        log.info(
            "amqp_topology_declared",
            exchange=self.options.exchange,
            example_queue=self.options.example_queue,
        )

    async def _claim(self) -> list[ClaimedEvent]:
        # Whether the last claim reached the database: an empty answer from a database
        # that is down says nothing about being idle, so no wake-ups are asked for then.
        self._claimed_ok = False
        try:
            events = await self.store.claim(
                self.options.batch_size,
                lease_seconds=self.options.lease_seconds,
                instance=self.options.instance,
            )
            self._claimed_ok = True
            return events
        except RETRYABLE_DB_ERRORS as exc:
            log.warning("event_claim_db_error", error=type(exc).__name__)
        except psycopg.Error:
            log.exception("event_claim_failed")
        await anyio.sleep(self.options.poll_interval_seconds)
        return []

    async def _publish_round(self, exchanges: _Exchanges, events: Sequence[ClaimedEvent]) -> None:
        """Publish a window at a time, await the confirms, mark; raise if the link broke."""
        lease_ends = anyio.current_time() + self.options.lease_seconds
        results: list[EventResult] = []
        releases: list[Release] = []
        broken: list[BaseException] = []
        limiter = anyio.CapacityLimiter(self.options.window)
        targets: dict[str, AbstractExchange | None] = {}
        try:
            with _stray_cancel_is_a_lost_link():
                for name in sorted({e.exchange or self.options.exchange for e in events}):
                    targets[name] = await exchanges.get(name)
        except _AMQP_ERRORS:
            with self._final_writes.shielded(self.options.timeout_seconds):
                await self._release_all(
                    [self._release(e, "amqp_connection_lost", "not sent") for e in events]
                )
            raise

        async def publish(event: ClaimedEvent) -> None:
            async with limiter:
                if broken:
                    releases.append(self._release(event, "amqp_connection_lost", "not sent"))
                    return
                if anyio.current_time() + self.options.timeout_seconds >= lease_ends:
                    # Its confirm could come after the lease ends, when another publisher
                    # may hold the event: hand it back, to be claimed with a fresh lease.
                    releases.append(self._release(event, _LEASE_ENDING, "not sent"))
                    return
                try:
                    outgoing = build_message(event, self.options.exchange)
                    exchange = targets[outgoing.exchange]
                    if exchange is None:
                        releases.append(
                            self._release(
                                event,
                                "exchange_not_found",
                                f"exchange {outgoing.exchange!r} does not exist on the broker; "
                                "declare it (or set RELAY_EVENTS_DECLARE_TOPOLOGY=true)",
                                delay=True,
                            )
                        )
                        return
                    with _stray_cancel_is_a_lost_link():
                        confirm = await exchange.publish(
                            outgoing.message,
                            outgoing.routing_key,
                            mandatory=True,
                            timeout=self.options.timeout_seconds,
                        )
                except aio_pika.exceptions.DeliveryError as exc:
                    releases.append(
                        self._release(event, "broker_nack", f"the broker refused: {exc}", True)
                    )
                    return
                except _AMQP_ERRORS as exc:
                    broken.append(exc)
                    releases.append(self._release(event, "amqp_connection_lost", repr(exc)))
                    return
                except Exception as exc:
                    log.exception("event_publish_failed", event_id=event.event_id)
                    releases.append(self._release(event, "publish_failed", repr(exc), True))
                    return
                if event.created_at is not None:
                    lag = (datetime.now(UTC) - event.created_at).total_seconds()
                    metrics.PUBLISH_LAG_SECONDS.observe(max(lag, 0.0))
                if isinstance(confirm, DeliveredMessage):
                    returned = confirm.delivery
                    reason = (
                        f"{getattr(returned, 'reply_code', '')} "
                        f"{getattr(returned, 'reply_text', '')}".strip()
                    )
                    log.warning(
                        "event_unroutable",
                        event_id=event.event_id,
                        exchange=outgoing.exchange,
                        routing_key=outgoing.routing_key,
                        reason=reason,
                        remedy="bind a queue for this routing key; the event is kept in "
                        "outbox.events with status 'unroutable'",
                    )
                    metrics.EVENTS_UNROUTABLE.inc()
                    results.append(
                        EventResult(
                            event,
                            "unroutable",
                            "no_route",
                            _clip(
                                f"the broker returned the message ({reason}): no queue is "
                                f"bound to exchange {outgoing.exchange!r} for routing key "
                                f"{outgoing.routing_key!r}"
                            ),
                        )
                    )
                else:
                    results.append(EventResult(event, "published"))

        async with anyio.create_task_group() as tg:
            for event in events:
                tg.start_soon(publish, event)
        unsent = sum(1 for release in releases if release.error_code == _LEASE_ENDING)
        if unsent:
            log.warning(
                "events_lease_ending",
                events=unsent,
                published=len(results),
                reason="the broker confirms too slowly to publish the whole round within "
                "the lease; the rest is handed back and claimed again",
                remedy="lower RELAY_PUBLISH_BATCH_SIZE or raise RELAY_LEASE_SECONDS",
            )
        for result in results:
            self._held[result.event.id] = _Held(result, lease_ends)
        # Confirmed results are recorded even when the round ends in a broken link.
        with self._final_writes.shielded(self.options.timeout_seconds):
            await self._mark_held()
            await self._release_all(releases)
        if broken:
            raise broken[0]

    def _release(
        self, event: ClaimedEvent, code: str, message: str, delay: bool = False
    ) -> Release:
        # Lost links are retried at once (maybe by another replica); refusals back off.
        seconds = self._backoff(event.attempts) if delay else 0.0
        return Release(event, seconds, code, _clip(message))

    async def _release_all(self, releases: Sequence[Release]) -> None:
        if not releases:
            return
        try:
            await self.store.release(releases)
        except psycopg.Error as exc:
            # Not fatal: the leases expire and the events are claimed again.
            log.warning("event_release_failed", events=len(releases), error=type(exc).__name__)
        for release in releases:
            if release.error_code not in ("amqp_connection_lost", _LEASE_ENDING):
                log.warning(
                    "event_publish_retry",
                    event_id=release.event.event_id,
                    error_code=release.error_code,
                    retry_in=round(release.delay_seconds, 3),
                )

    async def _mark_held(self) -> None:
        """Write the marks of confirmed events; keep those whose stream a writer holds."""
        if not self._held:
            return
        now = anyio.current_time()
        for event_id, held in list(self._held.items()):
            if held.lease_ends <= now:
                del self._held[event_id]
                log.warning(
                    "event_mark_abandoned",
                    event_id=held.result.event.event_id,
                    remedy="the lease expired; the event is published again (same message_id)",
                )
        results = [held.result for held in self._held.values()]
        if not results:
            return
        try:
            report = await self.store.mark(results)
        except psycopg.Error as exc:
            log.warning("event_mark_db_error", events=len(results), error=type(exc).__name__)
            return
        for result in results:
            if result.event.id in report.marked:
                self._held.pop(result.event.id, None)
        for result in report.lost:
            self._held.pop(result.event.id, None)
            log.info(
                "event_lease_lost",
                event_id=result.event.event_id,
                remedy="another publisher holds it now; nothing to do",
            )
        if report.marked:
            self.published += len(report.marked)
            metrics.EVENTS_PUBLISHED.inc(len(report.marked))
        newly = [r for r in report.deferred if not self._held[r.event.id].deferred]
        for result in newly:
            self._held[result.event.id].deferred = True
        if newly:
            log.info(
                "events_mark_deferred",
                events=len(newly),
                event_ids=[r.event.event_id for r in newly[:10]],
                reason="confirmed by the broker; a writer holds the ordering key's stream row, "
                "so the mark is retried shortly",
            )


class _Exchanges:
    """Exchanges checked to exist on this connection (a publish to a missing one would
    close the channel and fail every other publish in flight)."""

    def __init__(
        self, connection: AbstractConnection, channel: AbstractChannel, timeout: float
    ) -> None:
        self._connection = connection
        self._channel = channel
        self._timeout = timeout
        self._known: dict[str, AbstractExchange] = {}

    async def get(self, name: str) -> AbstractExchange | None:
        if name in self._known:
            return self._known[name]
        probe = await self._connection.channel(publisher_confirms=False)
        try:
            await probe.declare_exchange(name, passive=True, timeout=self._timeout)
        except aio_pika.exceptions.ChannelNotFoundEntity:
            return None
        finally:
            if not probe.is_closed:
                await probe.close()
        exchange = await self._channel.get_exchange(name, ensure=False)
        self._known[name] = exchange
        return exchange
