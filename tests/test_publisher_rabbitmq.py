"""The events publisher against the machine's real RabbitMQ.

Each test declares its own topic exchange and quorum queue (bound with '#'), consumes
everything the relay publishes, and deletes them afterwards. Deadlines below only turn a
hang into a failure; nothing asserts on elapsed time.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import random
import re
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import anyio
import psycopg
import pytest
import structlog.testing
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
)
from prometheus_client import REGISTRY
from psycopg.types.json import Jsonb

from provider_adapters.base import Command, Invalid, Outcome, Retryable
from provider_adapters.memory import MemoryProvider
from relay.cli.demo import build_workload
from relay.core.runtime import Relay
from relay.events.publisher import Publisher, PublisherOptions
from tests.invariants import unfinished
from tests.processes import RelayProcess
from tests.support.intents import insert_intents
from tests.support.relays import make_relay
from tests.support.waiting import wait_until
from tests.tcp_proxy import TcpProxy

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
HANG = 120.0  # seconds before a wait is declared a hang


# -- a consumer on a test-owned exchange and quorum queue --------------------------------


@dataclass(frozen=True, slots=True)
class Received:
    message_id: str | None
    routing_key: str | None
    correlation_id: str | None
    content_type: str | None
    delivery_mode: int | None
    type: str | None
    headers: dict[str, Any]
    body: Any


class Broker:
    """A fresh topic exchange, a quorum queue bound with '#', and a consumer; deleted on exit."""

    def __init__(self, url: str) -> None:
        self.url = url
        tag = uuid.uuid4().hex[:10]
        self.exchange_name = f"outbox-test.{tag}"
        self.queue_name = f"outbox-test.{tag}.all"
        self.received: list[Received] = []
        self._connection: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None
        self._exchanges: list[AbstractExchange] = []
        self._queue: AbstractQueue | None = None

    async def __aenter__(self) -> Broker:
        # A plain connection: the consumer's path never breaks in these tests (the relay's
        # does, through a proxy), and a robust one's reconnect callbacks could fire after
        # the test's event loop is gone ("Event loop is closed" in a later test).
        self._connection = await aio_pika.connect(self.url, timeout=10)
        try:
            self._channel = await self._connection.channel()
            exchange = await self.declare_exchange(self.exchange_name)
            self._queue = await self._channel.declare_queue(
                self.queue_name, durable=True, arguments={"x-queue-type": "quorum"}
            )
            await self._queue.bind(exchange, routing_key="#")
            await self._queue.consume(self._on_message)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._connection.close()
            raise
        return self

    async def declare_exchange(self, name: str) -> AbstractExchange:
        assert self._channel is not None
        exchange = await self._channel.declare_exchange(
            name, aio_pika.ExchangeType.TOPIC, durable=True
        )
        self._exchanges.append(exchange)
        return exchange

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        async with message.process():
            self.received.append(
                Received(
                    message_id=message.message_id,
                    routing_key=message.routing_key,
                    correlation_id=message.correlation_id,
                    content_type=message.content_type,
                    delivery_mode=int(message.delivery_mode) if message.delivery_mode else None,
                    type=message.type,
                    headers=dict(message.headers),
                    body=json.loads(message.body),
                )
            )

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with anyio.CancelScope(shield=True):
            try:
                if self._queue is not None:
                    await self._queue.delete(if_unused=False, if_empty=False)
                for exchange in self._exchanges:
                    await exchange.delete()
            finally:
                # Always: a connection left open is closed by its finaliser after this
                # test's event loop is gone, failing a later test ("Event loop is closed").
                if self._connection is not None:
                    await self._connection.close()

    def unique(self) -> dict[str, Received]:
        """The first delivery of each message_id, in arrival order (consumer-side dedup)."""
        first: dict[str, Received] = {}
        for message in self.received:
            assert message.message_id
            first.setdefault(message.message_id, message)
        return first


# -- running relays and publishers in-process --------------------------------------------


def make_publisher(
    relay: Relay,
    amqp_url: str,
    exchange: str,
    *,
    instance: str = "pub",
    seed: int = 3,
    **overrides: Any,
) -> Publisher:
    rng = random.Random(seed)
    options = PublisherOptions(
        amqp_url=amqp_url,
        instance=instance,
        exchange=exchange,
        batch_size=40,
        window=16,
        timeout_seconds=5.0,
        lease_seconds=relay.options.lease_seconds,
        poll_interval_seconds=0.05,
        poll_max_interval_seconds=0.2,
        reconnect_base_seconds=0.05,
        reconnect_cap_seconds=0.5,
        shutdown_grace_seconds=10.0,
    )
    return Publisher(relay.db, dataclasses.replace(options, **overrides), rng=rng.random)


async def run_system(
    relays: Sequence[Relay],
    publishers: Sequence[Publisher],
    scenario: Callable[[], Awaitable[None]],
) -> None:
    """Run relays and publishers while ``scenario`` runs; then stop them as SIGTERM would."""
    for relay in relays:
        await relay.db.open()
    try:
        async with anyio.create_task_group() as tg:
            for publisher in publishers:
                await tg.start(publisher.run)
            for relay in relays:
                await tg.start(relay.run)
            await scenario()
            for relay in relays:
                relay.stop()
            for relay in relays:
                await relay.finished.wait()
            for publisher in publishers:
                publisher.stop()
            for publisher in publishers:
                await publisher.finished.wait()
    finally:
        for relay in relays:
            await relay.db.close()


async def db_value(db_url: str, query: str) -> Any:
    def run() -> Any:
        with psycopg.connect(db_url) as conn:
            row = conn.execute(query).fetchone()  # type: ignore[arg-type]
            return None if row is None else row[0]

    return await anyio.to_thread.run_sync(run)


def stored_events(db_url: str) -> dict[str, tuple[Any, ...]]:
    with psycopg.connect(db_url) as conn:
        rows = conn.execute(
            "SELECT event_id::text, ordering_key, seq, status, routing_key, payment_id,"
            " error_code, attempts FROM outbox.events"
        ).fetchall()
    return {row[0]: row[1:] for row in rows}


def unroutable_total() -> float:
    return REGISTRY.get_sample_value("outbox_relay_events_unroutable_total") or 0.0


def assert_complete_and_in_order(broker: Broker, db_url: str) -> dict[str, Received]:
    """Every stored event arrived (once after dedup by message_id), in per-key seq order."""
    events = stored_events(db_url)
    unique = broker.unique()
    assert set(unique) == set(events), "every event arrives; nothing unknown arrives"
    assert {row[2] for row in events.values()} == {"published"}
    seen: dict[str, list[int]] = defaultdict(list)
    for message_id, message in unique.items():
        key, seq = events[message_id][:2]
        if key is not None:
            assert message.headers["ordering-key"] == key
            assert message.headers["sequence"] == seq
            seen[key].append(seq)
    for key, seqs in seen.items():
        assert seqs == list(range(1, len(seqs) + 1)), f"{key} arrived out of order: {seqs}"
    return unique


class MixedProvider(MemoryProvider):
    """Memory provider plus a retry on some first attempts and `invalid` for one card."""

    async def execute(self, command: Command) -> Outcome:
        if command.payment_method == "pm_card_invalidRequest":
            self.calls += 1
            return Invalid("invalid_request", "bad card token")
        digest = hashlib.sha256(command.idempotency_key.encode()).digest()
        if command.attempt == 1 and digest[0] % 5 == 0:
            self.calls += 1
            return Retryable("rate_limited", "try again")
        return await super().execute(command)


def workload(payments: int, prefix: str, seed: int) -> list[dict[str, Any]]:
    rows = [
        {
            "payment_id": r.payment_id,
            "action": r.action,
            "amount_minor": r.amount_minor,
            "currency": r.currency,
            "payment_method": r.payment_method,
        }
        for r in build_workload(payments, random.Random(seed), prefix)
    ]
    rows += [
        {
            "payment_id": f"{prefix}-dead-{n}",
            "action": "charge",
            "amount_minor": 500,
            "payment_method": "pm_card_invalidRequest",
        }
        for n in range(3)
    ]
    return rows


# -- the tests ---------------------------------------------------------------------------


async def test_mixed_workload_every_outcome_arrives_once_in_payment_order(
    db_url: str, amqp_url: str
) -> None:
    rows = workload(120, "mix", seed=5)
    provider = MixedProvider()
    relays = [make_relay(db_url, provider, instance=f"relay-{n}", seed=n) for n in range(2)]
    async with Broker(amqp_url) as broker:
        publishers = [
            make_publisher(relay, amqp_url, broker.exchange_name, instance=f"pub-{n}", seed=n)
            for n, relay in enumerate(relays)
        ]

        async def scenario() -> None:
            half = len(rows) // 2
            await anyio.to_thread.run_sync(insert_intents, db_url, rows[:half])
            await anyio.to_thread.run_sync(insert_intents, db_url, rows[half:])
            await wait_until(lambda: unfinished(db_url) == 0, "every intent terminal")
            total = await db_value(db_url, "SELECT count(*) FROM outbox.events")
            await wait_until(lambda: len(broker.unique()) >= total, "every event consumed")

        await run_system(relays, publishers, scenario)

    unique = assert_complete_and_in_order(broker, db_url)
    with psycopg.connect(db_url) as conn:
        intents = conn.execute(
            "SELECT payment_id, action, status FROM outbox.payment_intents"
            " ORDER BY payment_id, payment_seq"
        ).fetchall()
    assert len(unique) == len(intents) == len(rows), "one event per outcome"
    assert {status for _, _, status in intents} == {"succeeded", "failed", "dead"}
    expected: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for payment_id, action, status in intents:
        expected[payment_id].append((action, status))
    arrived: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for message in unique.values():
        body = message.body
        arrived[body["payment_id"]].append((body["intent"]["action"], body["intent"]["status"]))
        assert (
            message.routing_key
            == message.type
            == f"payment.{body['intent']['action']}" + (f".{body['intent']['status']}")
        )
        assert message.correlation_id == body["payment_id"]
        assert message.message_id == body["event_id"]
        assert message.content_type == "application/json"
        assert message.delivery_mode == 2, "persistent"
        assert message.headers["schema-version"] == 1
    assert arrived == expected, "per payment, outcomes arrive in the order they committed"
    assert sum(p.published for p in publishers) >= len(unique)
    assert all(p.published > 0 for p in publishers), "both replicas published"


async def test_broker_outage_loses_nothing_and_keeps_order(db_url: str, amqp_url: str) -> None:
    rows = workload(80, "out", seed=9)
    by_payment: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_payment[row["payment_id"]].append(row)
    ids = list(by_payment)
    before = [r for pid in ids[: len(ids) // 2] for r in by_payment[pid]]
    during = [r for pid in ids[len(ids) // 2 :] for r in by_payment[pid]]
    relay = make_relay(db_url, MixedProvider(), instance="relay-outage")
    proxy = TcpProxy(amqp_url)
    unpublished_while_cut: list[int] = []
    async with Broker(amqp_url) as broker, anyio.create_task_group() as proxy_tg:
        await proxy_tg.start(proxy.serve)
        publisher = make_publisher(relay, proxy.url, broker.exchange_name)

        async def scenario() -> None:
            await anyio.to_thread.run_sync(insert_intents, db_url, before)
            await wait_until(lambda: len(broker.received) >= 10, "first events consumed")
            proxy.cut()
            await wait_until(lambda: not publisher.connected, "publisher sees the link drop")
            # Payments keep flowing while the broker is unreachable.
            await anyio.to_thread.run_sync(insert_intents, db_url, during)
            await wait_until(lambda: unfinished(db_url) == 0, "every intent terminal while cut")
            failures = publisher.connect_failures
            await wait_until(
                lambda: publisher.connect_failures >= failures + 2, "reconnects keep trying"
            )
            unpublished_while_cut.append(
                await db_value(
                    db_url, "SELECT count(*) FROM outbox.events WHERE status <> 'published'"
                )
            )
            assert not publisher.connected
            proxy.restore()
            total = await db_value(db_url, "SELECT count(*) FROM outbox.events")
            await wait_until(lambda: len(broker.unique()) >= total, "backlog published")

        await run_system([relay], [publisher], scenario)
        proxy_tg.cancel_scope.cancel()

    assert unpublished_while_cut[0] > 0, "events accumulated during the outage"
    assert publisher.connections >= 2, "the publisher reconnected"
    unique = assert_complete_and_in_order(broker, db_url)
    assert len(unique) == len(rows)


async def test_application_events_from_sql_are_delivered_with_keys_and_headers(
    db_url: str, amqp_url: str
) -> None:
    chosen = str(uuid.uuid4())
    async with Broker(amqp_url) as broker:
        lonely = f"{broker.exchange_name}.lonely"  # exists, nothing bound: unroutable
        await broker.declare_exchange(lonely)
        missing = f"{broker.exchange_name}.missing"  # never declared
        insert = (
            "INSERT INTO outbox.events (routing_key, payload, exchange, event_type, headers,"
            " ordering_key, payment_id, schema_version, traceparent, event_id)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, COALESCE(%s::uuid, gen_random_uuid()))"
            " RETURNING event_id::text"
        )
        rows = [
            ("order.created", {"n": 1}, None, None, {"tenant": "acme"}, "order-1", "order-1", 1,
             None, chosen),
            ("order.paid", {"n": 2}, None, None, {"tenant": "acme", "amount": 1999}, "order-1",
             "order-1", 1, TRACEPARENT, None),
            ("order.shipped", {"n": 3}, None, None, {"tenant": "acme", "express": True},
             "order-1", "order-1", 1, None, None),
            ("inventory.adjusted", [1, 2], None, "com.example.inventory.v2", {"ratio": 0.5},
             None, None, 2, None, None),
            ("order.lost", {"n": 5}, lonely, None, {}, "order-2", None, 1, None, None),
            ("order.found", {"n": 6}, None, None, {}, "order-2", None, 1, None, None),
            ("order.stuck", {"n": 7}, missing, None, {}, "order-3", None, 1, None, None),
            ("order.after_stuck", {"n": 8}, None, None, {}, "order-3", None, 1, None, None),
        ]  # fmt: skip
        ids: list[str] = []
        with psycopg.connect(db_url, autocommit=True) as conn:
            for rk, payload, exchange, etype, headers, key, pid, version, tp, eid in rows:
                row = conn.execute(
                    insert,
                    (rk, Jsonb(payload), exchange, etype, Jsonb(headers), key, pid, version, tp,
                     eid),
                ).fetchone()  # fmt: skip
                assert row is not None
                ids.append(row[0])
        relay = make_relay(db_url, MemoryProvider(), instance="relay-app")
        publisher = make_publisher(relay, amqp_url, broker.exchange_name)

        def settled() -> bool:
            stored = stored_events(db_url)
            return (
                {ids[0], ids[1], ids[2], ids[3], ids[5]} <= set(broker.unique())
                and stored[ids[4]][2] == "unroutable"
                and stored[ids[6]][5] == "exchange_not_found"
            )

        async def scenario() -> None:
            await wait_until(settled, "app events delivered, unroutable and missing recorded")

        unroutable_before = unroutable_total()
        with structlog.testing.capture_logs() as logs:
            await run_system([relay], [publisher], scenario)
        unroutable_after = unroutable_total()

    assert ids[0] == chosen
    unique = broker.unique()
    assert set(unique) == {ids[0], ids[1], ids[2], ids[3], ids[5]}
    order_1 = [m for m in unique.values() if m.headers.get("ordering-key") == "order-1"]
    assert [m.routing_key for m in order_1] == ["order.created", "order.paid", "order.shipped"]
    first, paid, shipped = order_1
    assert first.message_id == chosen and first.correlation_id == "order-1"
    assert first.headers == {
        "tenant": "acme",
        "schema-version": 1,
        "ordering-key": "order-1",
        "sequence": 1,
    }
    assert paid.headers["traceparent"] == TRACEPARENT and paid.headers["amount"] == 1999
    assert shipped.headers["express"] is True and shipped.body == {"n": 3}
    assert first.type == "order.created", "event_type defaults to the routing key"
    inventory = unique[ids[3]]
    assert inventory.routing_key == "inventory.adjusted"
    assert inventory.type == "com.example.inventory.v2"
    assert inventory.headers == {"ratio": 0.5, "schema-version": 2}
    assert inventory.body == [1, 2] and inventory.correlation_id is None
    found = unique[ids[5]]
    assert found.headers["sequence"] == 2, "delivered once its unroutable predecessor resolved"
    stored = stored_events(db_url)
    assert stored[ids[4]][2:] == ("unroutable", "order.lost", None, "no_route", 1)
    # Returned, not dropped silently: logged and counted, once.
    returned = [e for e in logs if e["event"] == "event_unroutable"]
    assert [(e["event_id"], e["exchange"], e["routing_key"]) for e in returned] == [
        (ids[4], lonely, "order.lost")
    ]
    assert returned[0]["reason"] == "312 NO_ROUTE" and returned[0]["log_level"] == "warning"
    assert unroutable_after - unroutable_before == 1
    stuck = stored[ids[6]]
    assert stuck[2] == "pending" and stuck[5] == "exchange_not_found", "kept, not dropped"
    assert stored[ids[7]][2] == "blocked", "its key waits behind the stuck event"


async def test_relay_killed_between_confirm_and_mark_redelivers_same_message_id(
    db_url: str, amqp_url: str, tmp_path: Path
) -> None:
    """SIGKILL after the broker confirmed and before the mark: at-least-once, same id.

    The test holds the event's stream row lock (as a writer of that ordering key would),
    so the relay's mark after the confirm is deferred; the relay logs that, and is then
    SIGKILLed with the event confirmed but still unmarked.
    """
    key = f"kill-{uuid.uuid4().hex[:8]}"
    async with Broker(amqp_url) as broker:
        with psycopg.connect(db_url, autocommit=True) as conn:
            row = conn.execute(
                "INSERT INTO outbox.events (routing_key, payload, ordering_key)"
                " VALUES ('order.killed', '{\"n\": 1}', %s) RETURNING event_id::text",
                (key,),
            ).fetchone()
        assert row is not None
        event_id = row[0]
        env = {
            "RELAY_DATABASE_URL": db_url,
            "RELAY_PROVIDERS__STRIPE__API_KEY": "sk_test_events",
            "RELAY_PROVIDERS__STRIPE__BASE_URL": "http://127.0.0.1:9",
            "RELAY_PROVIDERS__STRIPE__TIMEOUT_MS": "1000",
            "RELAY_AMQP_URL": amqp_url,
            "RELAY_EVENTS_EXCHANGE": broker.exchange_name,
            "RELAY_LEASE_SECONDS": "4",
            "RELAY_PUBLISH_TIMEOUT_SECONDS": "2",
            "RELAY_POLL_INTERVAL_SECONDS": "0.1",
            "RELAY_POLL_MAX_INTERVAL_SECONDS": "0.3",
            "RELAY_SHUTDOWN_GRACE_SECONDS": "5",
            "RELAY_LOG_FORMAT": "json",
        }
        relay = RelayProcess("events-relay", env, tmp_path)
        holder = psycopg.connect(db_url)  # holds the stream row, as an open writer would
        try:
            holder.execute(
                "SELECT 1 FROM outbox.event_streams WHERE ordering_key = %s FOR UPDATE", (key,)
            )
            relay.start()
            await anyio.to_thread.run_sync(relay.wait_ready)
            await wait_until(lambda: len(broker.received) >= 1, "first delivery")

            def deferred() -> bool:
                log = relay.log_path.read_text()
                return '"event": "events_mark_deferred"' in log and event_id in log

            await wait_until(deferred, "relay logged the confirmed-but-unmarked event")
            relay.kill()
            status = await db_value(
                db_url, f"SELECT status FROM outbox.events WHERE event_id = '{event_id}'"
            )
            assert status == "pending", "confirmed by the broker, not marked in the database"
            holder.rollback()
            delivered_before_restart = len(broker.received)

            relay.start()
            await anyio.to_thread.run_sync(relay.wait_ready)
            await wait_until(lambda: len(broker.received) > delivered_before_restart, "redelivery")

            async def published() -> bool:
                status = await db_value(
                    db_url, f"SELECT status FROM outbox.events WHERE event_id = '{event_id}'"
                )
                return bool(status == "published")

            await wait_until(published, "the event published", guard_seconds=HANG)
            exit_code = await anyio.to_thread.run_sync(relay.terminate)
        finally:
            holder.close()
            relay.kill()

    copies = [m for m in broker.received if m.message_id == event_id]
    assert len(copies) >= 2, "delivered again after the restart"
    assert len(broker.received) == len(copies), "no other message"
    assert {json.dumps(m.body) for m in copies} == {'{"n": 1}'}
    assert {m.routing_key for m in copies} == {"order.killed"}
    assert exit_code == 0, "SIGTERM: final flush, exit 0"
    attempts = await db_value(
        db_url, f"SELECT attempts FROM outbox.events WHERE event_id = '{event_id}'"
    )
    assert attempts >= 2


async def test_declared_topology_routes_events_to_the_example_quorum_queue(
    db_url: str, amqp_url: str
) -> None:
    tag = uuid.uuid4().hex[:10]
    exchange_name, queue_name = f"outbox-test.{tag}", f"outbox-test.{tag}.example"
    relay = make_relay(db_url, MemoryProvider(), instance="relay-topology")
    base = make_publisher(relay, amqp_url, exchange_name)
    publisher = Publisher(
        relay.db,
        dataclasses.replace(base.options, declare_topology=True, example_queue=queue_name),
    )
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("INSERT INTO outbox.events (routing_key, payload) VALUES ('a.b.c', '{}')")
    connection = await aio_pika.connect(amqp_url, timeout=10)
    try:
        channel = await connection.channel()

        async def scenario() -> None:
            await wait_until(lambda: publisher.published == 1, "event published")

        await run_system([relay], [publisher], scenario)
        queue = await channel.declare_queue(queue_name, passive=True)
        message = await queue.get(timeout=10)
        assert message is not None and message.routing_key == "a.b.c"
        await message.ack()
        with pytest.raises(aio_pika.exceptions.ChannelPreconditionFailed):
            # It exists as a durable quorum queue: a classic redeclaration is refused.
            await channel.declare_queue(queue_name, durable=True)
    finally:
        cleanup = await connection.channel()
        await cleanup.queue_delete(queue_name, if_unused=False, if_empty=False)
        await cleanup.exchange_delete(exchange_name)
        await connection.close()
    assert stored_events(db_url)  # still readable in SQL after publishing


async def test_broker_nack_leaves_events_unpublished_until_the_broker_takes_them(
    db_url: str, amqp_url: str
) -> None:
    """Publisher confirms: a nacked event is handed back, never marked published.

    The only queue bound is full (``x-max-length=1``, ``x-overflow=reject-publish``), so the
    broker answers every publish with ``basic.nack``. Without publisher confirms the relay
    would take the publish as done and mark the events published, although the broker
    dropped them: this test fails then. Once a queue takes them, they go out in order.
    """
    broker = Broker(amqp_url)  # names only; entered (its queue bound) once the limit goes
    full_queue = f"{broker.queue_name}.full"
    connection = await aio_pika.connect(amqp_url, timeout=10)
    try:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(
            broker.exchange_name, aio_pika.ExchangeType.TOPIC, durable=True
        )
        full = await channel.declare_queue(
            full_queue, arguments={"x-max-length": 1, "x-overflow": "reject-publish"}
        )
        await full.bind(exchange, routing_key="#")
        await exchange.publish(aio_pika.Message(b"filler"), routing_key="filler")
        with psycopg.connect(db_url, autocommit=True) as conn:
            for key in ("nack-a", "nack-b", None):
                for n in range(1 if key is None else 3):
                    conn.execute(
                        "INSERT INTO outbox.events (routing_key, payload, ordering_key)"
                        " VALUES ('order.nacked', %s, %s)",
                        (Jsonb({"key": key, "n": n}), key),
                    )
        relay = make_relay(db_url, MemoryProvider(), instance="relay-nack")
        publisher = make_publisher(relay, amqp_url, broker.exchange_name)
        refused: list[dict[str, Any]] = []

        async def nacked_or_published() -> bool:
            rows = await db_value(
                db_url,
                # Done when each head (both keys' first event, the unkeyed one) was refused
                # three times, or (confirms ignored) as soon as anything is marked.
                "SELECT count(*) FILTER (WHERE status NOT IN ('pending', 'blocked'))"
                " + count(*) FILTER (WHERE status = 'pending' AND error_code = 'broker_nack'"
                " AND attempts >= 3) FROM outbox.events",
            )
            return bool(rows >= 3)

        async def scenario() -> None:
            await wait_until(
                nacked_or_published, "the event nacked or published", guard_seconds=HANG
            )
            with psycopg.connect(db_url) as conn:
                refused.extend(
                    {"status": s, "error_code": c, "attempts": a, "seq": q, "published_at": p}
                    for s, c, a, q, p in conn.execute(
                        "SELECT status, error_code, attempts, seq, published_at"
                        " FROM outbox.events ORDER BY id"
                    ).fetchall()
                )
            assert publisher.published == 0, "nothing the broker refused is marked published"
            async with broker:  # a queue that takes everything; then the full one goes
                await full.delete(if_unused=False, if_empty=False)
                await wait_until(lambda: len(broker.unique()) >= 7, "all 7 events consumed")

        with structlog.testing.capture_logs() as logs:
            await run_system([relay], [publisher], scenario)
    finally:
        cleanup = await connection.channel()
        await cleanup.queue_delete(full_queue, if_unused=False, if_empty=False)
        await cleanup.exchange_delete(broker.exchange_name)
        await connection.close()

    assert [r["status"] for r in refused] == ["pending", "blocked", "blocked"] * 2 + ["pending"]
    assert all(r["published_at"] is None for r in refused), "never marked published"
    for head in (refused[0], refused[3], refused[6]):
        assert head["error_code"] == "broker_nack" and head["attempts"] >= 3
    assert {(e["event"], e["error_code"]) for e in logs if e["event"] == "event_publish_retry"} == {
        ("event_publish_retry", "broker_nack")
    }
    assert assert_complete_and_in_order(broker, db_url).keys() == set(stored_events(db_url))
    assert publisher.published == 7


def with_heartbeat(url: str, seconds: int) -> str:
    """The AMQP URL asking for ``seconds`` of heartbeat (aiormq reads it from the query)."""
    parts = urlsplit(url)
    query = "&".join(q for q in (parts.query, f"heartbeat={seconds}") if q)
    return urlunsplit(parts._replace(query=query))


@pytest.mark.parametrize(
    ("to_broker", "to_client"),
    [(True, True), (False, True)],
    ids=["both-ways", "confirms-lost"],
)
async def test_blackholed_link_mid_round_loses_nothing_with_two_publishers(
    db_url: str, amqp_url: str, to_broker: bool, to_client: bool
) -> None:
    """The path to the broker goes silent (nothing closes) while two publishers publish.

    Publishes in flight wait for confirms that never come: the confirm timeout (or, on an
    idle link, the heartbeat) tells each publisher the link is dead; they hand their events
    back and keep reconnecting into the hole. With ``confirms-lost`` only the broker's
    answers vanish: the messages reach the queue but are published again (duplicates).
    After the path heals every event arrives, once per message_id, in per-payment order.
    """
    rows = workload(60, f"hole{int(to_broker)}", seed=13)
    by_payment: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_payment[row["payment_id"]].append(row)
    ids = list(by_payment)
    before = [r for pid in ids[: len(ids) // 2] for r in by_payment[pid]]
    during = [r for pid in ids[len(ids) // 2 :] for r in by_payment[pid]]
    provider = MixedProvider()  # one provider behind both relays
    relays = [make_relay(db_url, provider, instance=f"relay-hole-{n}", seed=n) for n in range(2)]
    proxy = TcpProxy(with_heartbeat(amqp_url, 1))
    in_the_hole: dict[str, int] = {}
    async with Broker(amqp_url) as broker, anyio.create_task_group() as proxy_tg:
        await proxy_tg.start(proxy.serve)
        publishers = [
            make_publisher(
                relay,
                proxy.url,
                broker.exchange_name,
                instance=f"pub-hole-{n}",
                seed=n,
                timeout_seconds=1.0,
            )
            for n, relay in enumerate(relays)
        ]

        async def scenario() -> None:
            await anyio.to_thread.run_sync(insert_intents, db_url, before)
            await wait_until(lambda: len(broker.received) >= 10, "first events consumed")
            proxy.blackhole(to_broker=to_broker, to_client=to_client)
            # Payments keep flowing: the publishers claim and publish into the hole.
            await anyio.to_thread.run_sync(insert_intents, db_url, during)
            await wait_until(
                lambda: all(p.links_lost >= 1 and not p.connected for p in publishers),
                "each publisher detects the dead link",
            )
            await wait_until(lambda: unfinished(db_url) == 0, "every intent terminal")
            failures = [p.connect_failures for p in publishers]
            await wait_until(
                lambda: all(
                    p.connect_failures >= f + 2 for p, f in zip(publishers, failures, strict=True)
                ),
                "reconnects keep trying (and time out in the hole)",
            )
            in_the_hole["unpublished"] = await db_value(
                db_url, "SELECT count(*) FROM outbox.events WHERE status <> 'published'"
            )
            assert not any(p.connected for p in publishers)
            proxy.restore()
            total = await db_value(db_url, "SELECT count(*) FROM outbox.events")
            await wait_until(lambda: len(broker.unique()) >= total, "backlog published")

        with structlog.testing.capture_logs() as logs:
            await run_system(relays, publishers, scenario)
        proxy_tg.cancel_scope.cancel()

    assert in_the_hole["unpublished"] > 0, "events accumulated while the path was dead"
    # A publish awaiting its confirm when the link died: timed out, its event handed back.
    lost = [e for e in logs if e["event"] == "amqp_connection_lost"]
    assert any(e["error"] == "TimeoutError" for e in lost), lost
    assert all(p.links_lost >= 1 and p.connections >= 2 for p in publishers)
    unique = assert_complete_and_in_order(broker, db_url)
    assert len(unique) == len(rows)
    if not to_broker:
        assert len(broker.received) > len(unique), "confirms lost: some arrived twice"


async def test_a_link_found_dead_while_a_channel_opens_is_a_lost_link_not_a_stop(
    db_url: str, amqp_url: str
) -> None:
    """aiormq fails every pending operation of a connection it finds stuck (no frame
    within the heartbeat grace) with a CancelledError. A channel open waiting in a silent
    path got it; the publisher let it through as if it were cancelled itself, its task
    ended 'cancelled', and anyio cancelled the task group around it: the relay (here the
    scenario) stopped without an error. That made the test above fail now and then with
    KeyError 'unpublished'. Here the path goes silent before the publisher's first round,
    so that round's exchange check opens its channel into the hole."""
    rows = workload(10, "stuck", seed=5)
    relay = make_relay(db_url, MixedProvider(), instance="relay-stuck")
    proxy = TcpProxy(with_heartbeat(amqp_url, 1))
    reached: list[str] = []
    async with Broker(amqp_url) as broker, anyio.create_task_group() as proxy_tg:
        await proxy_tg.start(proxy.serve)
        publisher = make_publisher(
            relay, proxy.url, broker.exchange_name, instance="pub-stuck", timeout_seconds=1.0
        )

        async def scenario() -> None:
            await wait_until(lambda: publisher.connected, "publisher connected")
            proxy.blackhole()  # both ways, before any event: no exchange checked yet
            await anyio.to_thread.run_sync(insert_intents, db_url, rows)
            await wait_until(lambda: publisher.links_lost >= 1, "the dead link noticed")
            reached.append("link lost")
            proxy.restore()
            total = await db_value(db_url, "SELECT count(*) FROM outbox.events")
            await wait_until(lambda: len(broker.unique()) >= total, "every event published")
            reached.append("published")

        with structlog.testing.capture_logs() as logs:
            await run_system([relay], [publisher], scenario)
        proxy_tg.cancel_scope.cancel()

    assert reached == ["link lost", "published"], "the scenario was cut short"
    lost = [e for e in logs if e["event"] == "amqp_connection_lost"]
    assert any("heartbeat grace" in e["detail"] for e in lost), lost
    assert_complete_and_in_order(broker, db_url)


# -- the README's example consumer, run as written ---------------------------------------

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_consumer() -> dict[str, Any]:
    """The README's example consumer, executed as a module (not as ``__main__``)."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    [code] = [block for block in blocks if "async def consume(" in block]
    namespace: dict[str, Any] = {"__name__": "readme_consumer"}
    exec(compile(code, "README.md (example consumer)", "exec"), namespace)
    return namespace


async def finish_close_callbacks() -> int:
    """Wait for the close callbacks aio_pika runs as tasks of their own; return how many.

    The README's consumer connects with ``connect_robust``. Cancelled, it leaves the
    connection's close callback (aio_pika's ``OneShotCallback``) as a pending task. Were
    this test's event loop to end with it, the garbage collector would destroy it later,
    inside whichever test then runs in this worker, and fail that one with a
    PytestUnraisableExceptionWarning (and, during ``ast.parse``, CPython's "AST
    constructor recursion depth mismatch").
    """
    current = asyncio.current_task()
    callbacks = [
        task
        for task in asyncio.all_tasks()
        if task is not current and "OneShotCallback" in repr(task.get_coro())
    ]
    if callbacks:
        _, still_pending = await asyncio.wait(callbacks, timeout=HANG)
        assert not still_pending, f"aio_pika close callbacks still running: {still_pending}"
    return len(callbacks)


async def queue_exists(connection: aio_pika.abc.AbstractConnection, name: str) -> bool:
    channel = await connection.channel()
    try:
        await channel.declare_queue(name, passive=True)
    except aio_pika.exceptions.ChannelNotFoundEntity:
        return False
    await channel.close()
    return True


async def test_readme_consumer_keeps_payment_order_skips_copies_and_parks_poison(
    db_url: str, amqp_url: str
) -> None:
    """The README's consumer against the relay's real messages.

    Payment ``p1``'s second event fails twice, then succeeds: it is retried in place, and
    its successor waits. ``p2``'s second event always fails: it is parked after the
    example's ``ATTEMPTS`` tries, and ``p2``'s third event is parked behind it, unhandled.
    A copy of an applied message (same ``message_id``) is acked without handling it.
    """
    consumer = readme_consumer()
    tag = uuid.uuid4().hex[:10]
    exchange_name, queue_name = f"outbox-test.{tag}", f"outbox-test.{tag}.readme"
    consumer.update(
        AMQP_URL=amqp_url,
        EXCHANGE=exchange_name,
        QUEUE=queue_name,
        PARKED=f"{queue_name}.parked",
        RETRY_SECONDS=0.01,
    )
    tries: dict[tuple[str, int], int] = defaultdict(int)
    handled: list[tuple[str, int]] = []

    async def handle(event: dict[str, Any]) -> None:
        step = (event["payment_id"], event["n"])
        tries[step] += 1
        if step == ("p2", 1) or (step == ("p1", 1) and tries[step] <= 2):
            raise RuntimeError(f"cannot handle {step} (try {tries[step]})")
        handled.append(step)

    consumer["handle"] = handle
    payments = ["p0", "p1", "p2", "p3"]
    with psycopg.connect(db_url, autocommit=True) as conn:
        for n in range(3):
            for payment in payments:
                conn.execute(
                    "INSERT INTO outbox.events (routing_key, payload, ordering_key, payment_id)"
                    " VALUES (%s, %s, %s, %s)",
                    (f"payment.step{n}.succeeded", Jsonb({"payment_id": payment, "n": n}),
                     f"order:{payment}", payment),
                )  # fmt: skip
    relay = make_relay(db_url, MemoryProvider(), instance="relay-readme")
    publisher = make_publisher(relay, amqp_url, exchange_name)
    connection = await aio_pika.connect(amqp_url, timeout=10)
    parked: list[tuple[str, int, Any]] = []
    try:
        async with anyio.create_task_group() as consumer_tg:
            consumer_tg.start_soon(consumer["main"])
            await wait_until(
                lambda: queue_exists(connection, queue_name),
                "the queue declared",
                guard_seconds=HANG,
            )

            async def scenario() -> None:
                await wait_until(
                    lambda: len(handled) >= 10 and tries[("p2", 1)] >= consumer["ATTEMPTS"],
                    "every event handled but p2's last two",
                )

            await run_system([relay], [publisher], scenario)
            channel = await connection.channel()
            exchange = await channel.get_exchange(exchange_name)
            first = stored_events(db_url)
            copy_of = next(eid for eid, row in first.items() if row[:2] == ("order:p0", 1))
            # A copy of an applied event, then a marker (the queue keeps their order).
            for message_id, key, seq in ((copy_of, "order:p0", 1), ("marker", "order:m", 1)):
                await exchange.publish(
                    aio_pika.Message(
                        json.dumps({"payment_id": key, "n": 0}).encode(),
                        message_id=message_id,
                        headers={"ordering-key": key, "sequence": seq},
                    ),
                    routing_key="payment.step0.succeeded",
                )
            await wait_until(lambda: ("order:m", 0) in handled, "the marker handled")
            consumer_tg.cancel_scope.cancel()
        channel = await connection.channel()
        parked_queue = await channel.declare_queue(f"{queue_name}.parked", passive=True)
        while (message := await parked_queue.get(fail=False, timeout=10)) is not None:
            body = json.loads(message.body)
            parked.append((body["payment_id"], body["n"], message.headers.get("sequence")))
            await message.ack()
    finally:
        cleanup = await connection.channel()
        for name in (queue_name, f"{queue_name}.parked"):
            await cleanup.queue_delete(name, if_unused=False, if_empty=False)
        await cleanup.exchange_delete(exchange_name)
        await connection.close()
        await finish_close_callbacks()

    by_payment: dict[str, list[int]] = defaultdict(list)
    for payment, n in handled:
        by_payment[payment].append(n)
    assert by_payment == {
        "p0": [0, 1, 2],
        "p1": [0, 1, 2],  # its second event retried in place; the third waited for it
        "p2": [0],  # the second is poison; the third is never handled before it
        "p3": [0, 1, 2],
        "order:m": [0],
    }, "per payment, in order; the copy of p0's first event is not handled again"
    assert tries[("p1", 1)] == 3 and tries[("p2", 1)] == consumer["ATTEMPTS"]
    assert parked == [("p2", 1, 2), ("p2", 2, 3)], "poison parked, its successor behind it"


async def test_a_confirmed_event_is_marked_while_the_broker_stays_unreachable(
    db_url: str, amqp_url: str
) -> None:
    """A mark held past a lost link is written without waiting for a new link.

    The test holds the event's stream row (as a writer of its key would), so the mark after
    the broker's confirm is deferred; then the link is cut and stays cut. Once the writer
    lets go, the publisher, still unable to reconnect, marks the event: its lease is not
    left to run out into a needless re-publish.
    """
    key = f"held-{uuid.uuid4().hex[:8]}"
    with psycopg.connect(db_url, autocommit=True) as conn:
        row = conn.execute(
            "INSERT INTO outbox.events (routing_key, payload, ordering_key)"
            " VALUES ('order.held', '{}', %s) RETURNING event_id::text",
            (key,),
        ).fetchone()
    assert row is not None
    event_id = row[0]

    def status() -> str:
        return str(stored_events(db_url)[event_id][2])

    relay = make_relay(db_url, MemoryProvider(), instance="relay-held")
    proxy = TcpProxy(amqp_url)
    holder = psycopg.connect(db_url)  # holds the stream row, as an open writer would
    outcome: dict[str, Any] = {}
    try:
        holder.execute(
            "SELECT 1 FROM outbox.event_streams WHERE ordering_key = %s FOR UPDATE", (key,)
        )
        async with Broker(amqp_url) as broker, anyio.create_task_group() as proxy_tg:
            await proxy_tg.start(proxy.serve)
            publisher = make_publisher(relay, proxy.url, broker.exchange_name, timeout_seconds=1.0)

            async def scenario() -> None:
                await wait_until(
                    lambda: any(e["event"] == "events_mark_deferred" for e in logs),
                    "confirmed, mark deferred",
                )
                proxy.cut()
                await wait_until(lambda: not publisher.connected, "publisher sees the link drop")
                failures = publisher.connect_failures
                holder.rollback()  # the writer is done with the key
                await wait_until(
                    lambda: status() == "published" or publisher.connect_failures >= failures + 5,
                    "marked, or five reconnects later",
                )
                outcome.update(status=status(), connected=publisher.connected)
                proxy.restore()

            with structlog.testing.capture_logs() as logs:
                await run_system([relay], [publisher], scenario)
            proxy_tg.cancel_scope.cancel()
    finally:
        holder.close()

    assert outcome == {"status": "published", "connected": False}, "marked while unreachable"
    assert [m.message_id for m in broker.received] == [event_id], "published once"


async def test_a_slow_broker_never_lets_a_round_outlive_its_lease(
    db_url: str, amqp_url: str
) -> None:
    """Confirms come late, so publishing a whole round would outlast the events' lease.

    The publisher starts no publish whose confirm could come after the lease ends: it hands
    those events back, to be claimed again with a fresh lease. Otherwise every confirmed
    mark of the round would be abandoned and each event published again, round after round.
    """
    relay = make_relay(db_url, MemoryProvider(), instance="relay-slow", lease_seconds=4.0)
    proxy = TcpProxy(amqp_url)
    insert = "INSERT INTO outbox.events (routing_key, payload) VALUES ('order.slow', %s)"
    async with Broker(amqp_url) as broker, anyio.create_task_group() as proxy_tg:
        await proxy_tg.start(proxy.serve)
        publisher = make_publisher(
            relay, proxy.url, broker.exchange_name, window=1, batch_size=20, timeout_seconds=1.5
        )

        def settled() -> bool:
            statuses = [row[2] for row in stored_events(db_url).values()]
            abandoned = any(e["event"] == "event_mark_abandoned" for e in logs)
            return abandoned or statuses == ["published"] * 21

        async def scenario() -> None:
            with psycopg.connect(db_url, autocommit=True) as conn:
                conn.execute(insert, (Jsonb({"n": -1}),))  # the link is up, the exchange known
            await wait_until(lambda: len(broker.received) == 1, "first event consumed")
            proxy.slow("to_client", 0.25)  # each confirm takes a quarter of a second
            with psycopg.connect(db_url, autocommit=True) as conn:
                for n in range(20):
                    conn.execute(insert, (Jsonb({"n": n}),))
            await wait_until(settled, "every event published (or a mark abandoned)")

        with structlog.testing.capture_logs() as logs:
            await run_system([relay], [publisher], scenario)
        proxy_tg.cancel_scope.cancel()

    assert not [e for e in logs if e["event"] == "event_mark_abandoned"]
    assert any(e["event"] == "events_lease_ending" for e in logs), "rounds were cut short"
    ids = [str(m.message_id) for m in broker.received]
    assert sorted(ids) == sorted(stored_events(db_url)), "each event published exactly once"


async def test_debounced_notify_still_wakes_an_idle_publisher(db_url: str, amqp_url: str) -> None:
    """sql/0021: event inserts NOTIFY only while a publisher asked for it. The publisher
    here never polls within the test (an hour between polls), so each delivery below
    can only come from a NOTIFY; it asks for them when idle and stops asking while it
    claims full batches."""
    with psycopg.connect(db_url) as conn:
        conn.execute("UPDATE outbox.events_wakeup SET wanted = false")
    insert = "INSERT INTO outbox.events (routing_key, payload) SELECT 'order.tick', %s FROM generate_series(1, %s)"
    async with Broker(amqp_url) as broker:
        relay = make_relay(db_url, MemoryProvider(), instance="relay-notify")
        publisher = make_publisher(
            relay,
            amqp_url,
            broker.exchange_name,
            poll_interval_seconds=3600.0,
            poll_max_interval_seconds=3600.0,
        )
        asked: list[bool] = []
        set_wakeups = publisher.store.set_wakeups

        async def recording(*, wanted: bool) -> None:
            asked.append(wanted)
            await set_wakeups(wanted=wanted)

        publisher.store.set_wakeups = recording  # type: ignore[method-assign]

        async def wanted() -> bool:
            return bool(await db_value(db_url, "SELECT wanted FROM outbox.events_wakeup"))

        async def scenario() -> None:
            await wait_until(wanted, "the idle publisher to ask for wake-ups")

            def insert_events(n: int) -> None:
                with psycopg.connect(db_url, autocommit=True) as conn:
                    conn.execute(insert, (Jsonb({"n": n}), n))  # type: ignore[arg-type]

            await anyio.to_thread.run_sync(insert_events, 1)
            await wait_until(lambda: len(broker.unique()) >= 1, "the event woken by NOTIFY")
            # More than a batch (40) in one commit: the publisher claims full batches,
            # stops asking, then asks again once it finds nothing.
            await anyio.to_thread.run_sync(insert_events, 100)
            await wait_until(lambda: len(broker.unique()) >= 101, "every event published")
            await wait_until(wanted, "the publisher, idle again, to ask for wake-ups")

        await run_system([relay], [publisher], scenario)
    assert asked[:1] == [True]
    assert False in asked, "a full batch stops the wake-ups"
    assert asked[-1] is True
    assert {row[2] for row in stored_events(db_url).values()} == {"published"}
