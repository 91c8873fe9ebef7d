"""The events publisher against the machine's real RabbitMQ.

Each test declares its own topic exchange and quorum queue (bound with '#'), consumes
everything the relay publishes, and deletes them afterwards. Deadlines below only turn a
hang into a failure; nothing asserts on elapsed time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import aio_pika
import anyio
import psycopg
import pytest
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)
from psycopg.types.json import Jsonb

from provider_adapters.base import Command, Invalid, Outcome, Retryable
from provider_adapters.memory import MemoryProvider
from relay.demo import build_workload
from relay.publisher import Publisher, PublisherOptions
from relay.runtime import Relay
from tests.processes import RelayProcess
from tests.relay_harness import insert_intents, make_relay, unfinished
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
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._exchanges: list[AbstractExchange] = []
        self._queue: AbstractQueue | None = None

    async def __aenter__(self) -> Broker:
        self._connection = await aio_pika.connect_robust(self.url, timeout=10)
        self._channel = await self._connection.channel()
        exchange = await self.declare_exchange(self.exchange_name)
        self._queue = await self._channel.declare_queue(
            self.queue_name, durable=True, arguments={"x-queue-type": "quorum"}
        )
        await self._queue.bind(exchange, routing_key="#")
        await self._queue.consume(self._on_message)
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
            if self._queue is not None:
                await self._queue.delete(if_unused=False, if_empty=False)
            for exchange in self._exchanges:
                await exchange.delete()
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
    relay: Relay, amqp_url: str, exchange: str, *, instance: str = "pub", seed: int = 3
) -> Publisher:
    rng = random.Random(seed)
    return Publisher(
        relay.db,
        PublisherOptions(
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
        ),
        rng=rng.random,
    )


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


async def wait_until(check: Callable[[], bool], what: str, *, deadline: float = HANG) -> None:
    with anyio.move_on_after(deadline) as scope:
        while not check():  # noqa: ASYNC110
            await anyio.sleep(0.05)
    if scope.cancelled_caught:
        pytest.fail(f"not reached within {deadline:g} s (a hang): {what}")


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

        await run_system([relay], [publisher], scenario)

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

            with anyio.fail_after(HANG):
                while not await published():  # noqa: ASYNC110
                    await anyio.sleep(0.05)
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
