"""Result events in SQL: written with outcomes, validated at INSERT, ordered per key.

The publisher's database half (claim, mark, promote, release) is exercised here without a
broker; tests/test_publisher_rabbitmq.py runs it against RabbitMQ.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aio_pika
import anyio
import psycopg
import pytest
import structlog.testing
from psycopg import errors
from psycopg.types.json import Jsonb

from provider_adapters.base import Command, Invalid, Outcome
from provider_adapters.memory import MemoryProvider
from relay.core.store import Store
from relay.domain.intents import WriteBack
from relay.events.messages import ClaimedEvent, build_message, payment_routing_key
from relay.events.publisher import publisher_from_settings
from relay.events.store import EventResult, EventStore, Release
from relay.infra.config import ConfigError, load_settings
from relay.infra.db import Database
from tests.support.intents import insert_intents
from tests.support.relays import make_relay, run_until_settled

pytestmark = pytest.mark.integration

INSERT_EVENT = """
INSERT INTO outbox.events
    (routing_key, payload, exchange, event_type, headers, ordering_key, payment_id,
     schema_version, traceparent, event_id)
VALUES (%(routing_key)s, %(payload)s, %(exchange)s, %(event_type)s, %(headers)s,
        %(ordering_key)s, %(payment_id)s, %(schema_version)s, %(traceparent)s,
        COALESCE(%(event_id)s::uuid, gen_random_uuid()))
RETURNING id, event_id, seq, status
"""
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
NOISE = "".join(uuid.uuid4().hex for _ in range(3_500))  # ~112 kB that does not compress


def event(**overrides: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "routing_key": "order.shipped",
        "payload": Jsonb({"order_id": 42}),
        "exchange": None,
        "event_type": None,
        "headers": Jsonb({}),
        "ordering_key": None,
        "payment_id": None,
        "schema_version": 1,
        "traceparent": None,
        "event_id": None,
    }
    row.update(overrides)
    return row


def insert_event(conn: psycopg.Connection, **overrides: Any) -> tuple[Any, ...]:
    row = conn.execute(INSERT_EVENT, event(**overrides)).fetchone()
    assert row is not None
    return row


def lifecycle(payment_id: str) -> list[dict[str, object]]:
    return [
        {
            "payment_id": payment_id,
            "action": "authorize",
            "amount_minor": 1000,
            "payment_method": "pm_card_visa",
        },
        {"payment_id": payment_id, "action": "capture", "amount_minor": 900},
        {"payment_id": payment_id, "action": "refund", "amount_minor": 300},
    ]


class InvalidForMethod(MemoryProvider):
    """Answers `invalid` for one payment method: the intent goes dead."""

    async def execute(self, command: Command) -> Outcome:
        if command.payment_method == "pm_card_invalidRequest":
            self.calls += 1
            return Invalid("invalid_request", "bad card token")
        return await super().execute(command)


# -- events written by the relay's write-back --------------------------------------------


@pytest.mark.anyio
async def test_every_terminal_outcome_writes_one_event_in_the_same_transaction(
    db_url: str,
) -> None:
    rows = [r for i in range(5) for r in lifecycle(f"p{i}")]
    rows += [
        {"payment_id": "bad", "action": "capture", "amount_minor": 100},  # failed: no auth
        {
            "payment_id": "dead",
            "action": "charge",
            "amount_minor": 500,
            "payment_method": "pm_card_invalidRequest",
        },
        {
            "payment_id": "declined",
            "action": "charge",
            "amount_minor": 500,
            "payment_method": "pm_card_chargeDeclined",
        },
    ]
    insert_intents(db_url, rows)
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(
            "UPDATE outbox.payment_intents SET metadata = %s WHERE payment_id = 'p0'",
            (Jsonb({"order_id": 7, "traceparent": TRACEPARENT}),),
        )
    await run_until_settled(db_url, [make_relay(db_url, InvalidForMethod())])

    with psycopg.connect(db_url) as conn:
        intents = conn.execute(
            "SELECT id, payment_id, action, status, payment_seq FROM outbox.payment_intents"
            " ORDER BY payment_id, payment_seq"
        ).fetchall()
        events = conn.execute(
            "SELECT payment_id, ordering_key, seq, routing_key, event_type, exchange, status,"
            " payload, traceparent, headers FROM outbox.events ORDER BY payment_id, seq"
        ).fetchall()
    assert len(events) == len(intents) == len(rows)
    assert {i[3] for i in intents} == {"succeeded", "failed", "dead"}
    for intent, ev in zip(intents, events, strict=True):
        intent_id, payment_id, action, status, payment_seq = intent
        ev_payment, key, seq, routing_key, event_type, exchange, ev_status, payload, tp, hdr = ev
        assert ev_payment == payment_id and key == f"payment:{payment_id}"
        assert seq == payment_seq, "one event per outcome, in the payment's order"
        assert routing_key == event_type == payment_routing_key(action, status)
        assert exchange is None and hdr == {}
        assert ev_status == ("pending" if seq == 1 else "blocked")
        assert payload["intent"]["id"] == intent_id
        assert payload["intent"]["status"] == status
        assert payload["payment_id"] == payment_id
        assert tp == (TRACEPARENT if payment_id == "p0" else None)
    final = next(e[7] for e in events if e[0] == "p0" and e[2] == 3)
    reference = final["payment"].pop("provider_reference")
    assert isinstance(reference, str) and reference
    assert final["payment"] == {
        "state": "partially_refunded",
        "authorized_minor": 1000,
        "captured_minor": 900,
        "refunded_minor": 300,
    }
    assert final["intent"]["amount_applied_minor"] == 300
    assert final["intent"]["metadata"]["order_id"] == 7
    failed = next(e[7] for e in events if e[0] == "bad")
    assert failed["intent"]["error_code"] == "payment_not_authorized"
    assert failed["payment"]["state"] == "new"


@pytest.mark.anyio
async def test_retries_and_fenced_write_backs_write_no_event(db_url: str) -> None:
    insert_intents(db_url, lifecycle("r1")[:1])
    db = Database(db_url, pool_size=2)
    await db.open()
    try:
        store = Store(db)
        (first,) = await store.claim("stripe", 10, lease_seconds=30, instance="t")
        retry = WriteBack(first.id, first.lease_token, first.payment_id, "pending", 0.0)
        assert await store.complete([retry]) == {first.id}
        (second,) = await store.claim("stripe", 10, lease_seconds=30, instance="t")
        stale = WriteBack(first.id, first.lease_token, first.payment_id, "failed")
        assert await store.complete([stale]) == set(), "old token: fenced"
        with psycopg.connect(db_url) as conn:
            assert conn.execute("SELECT count(*) FROM outbox.events").fetchone() == (0,)
        done = WriteBack(second.id, second.lease_token, second.payment_id, "failed", 0.0)
        assert await store.complete([done]) == {second.id}
    finally:
        await db.close()
    with psycopg.connect(db_url) as conn:
        rows = conn.execute("SELECT routing_key, seq FROM outbox.events").fetchall()
    assert rows == [("payment.authorize.failed", 1)]


# -- events inserted by applications -----------------------------------------------------


def test_application_event_gets_relay_owned_columns_reset(conn: psycopg.Connection) -> None:
    row = conn.execute(
        "INSERT INTO outbox.events (routing_key, payload, status, seq, attempts, lease_token,"
        " published_at) VALUES ('a.b', '{}', 'published', 99, 5, 7, now())"
        " RETURNING status, seq, attempts, lease_token, published_at, event_type, event_id"
    ).fetchone()
    assert row is not None
    assert row[:6] == ("pending", None, 0, None, None, "a.b")
    assert isinstance(row[6], uuid.UUID)


@pytest.mark.parametrize(
    ("overrides", "error", "constraint"),
    [
        (
            {"routing_key": "order shipped"},
            errors.CheckViolation,
            "events_routing_key_dotted_words",
        ),
        (
            {"routing_key": "order..shipped"},
            errors.CheckViolation,
            "events_routing_key_dotted_words",
        ),
        ({"routing_key": "a" * 256}, errors.CheckViolation, "events_routing_key_dotted_words"),
        ({"routing_key": None}, errors.NotNullViolation, None),
        ({"payload": None}, errors.NotNullViolation, None),
        ({"exchange": ""}, errors.CheckViolation, "events_exchange_name_format"),
        ({"exchange": "bad exchange"}, errors.CheckViolation, "events_exchange_name_format"),
        ({"event_type": "has space"}, errors.CheckViolation, "events_event_type_format"),
        (
            {"payload": Jsonb({"blob": NOISE * 3})},
            errors.CheckViolation,
            "events_payload_max_256kb",
        ),
        ({"headers": Jsonb(["a"])}, errors.CheckViolation, "events_headers_is_object"),
        ({"headers": Jsonb({"a": {"b": 1}})}, errors.CheckViolation, "events_headers_flat_scalars"),
        ({"headers": Jsonb({"a": [1]})}, errors.CheckViolation, "events_headers_flat_scalars"),
        ({"headers": Jsonb({"a": None})}, errors.CheckViolation, "events_headers_flat_scalars"),
        (
            # beyond 2**53 - 1, with no 13 to 19 digits passing Luhn (2**60's digits hold
            # some: the card rule, checked first, would refuse it)
            {"headers": Jsonb({"a": 2**53 + 1})},
            errors.CheckViolation,
            "events_headers_flat_scalars",
        ),
        (
            {"headers": Jsonb({"traceparent": TRACEPARENT})},
            errors.CheckViolation,
            "events_headers_reserved_names",
        ),
        (
            {"headers": Jsonb({"schema-version": 2})},
            errors.CheckViolation,
            "events_headers_reserved_names",
        ),
        (
            {"headers": Jsonb({"k": NOISE[:20_000]})},
            errors.CheckViolation,
            "events_headers_max_16kb",
        ),
        ({"ordering_key": "  "}, errors.CheckViolation, "events_ordering_key_nonblank_max_255"),
        (
            {"ordering_key": "k" * 256},
            errors.CheckViolation,
            "events_ordering_key_nonblank_max_255",
        ),
        ({"payment_id": ""}, errors.CheckViolation, "events_payment_id_nonblank_max_200"),
        ({"schema_version": 0}, errors.CheckViolation, "events_schema_version_positive"),
        ({"traceparent": "00-abc"}, errors.CheckViolation, "events_traceparent_format"),
    ],
)
def test_application_event_refused_at_insert_with_a_named_constraint(
    conn: psycopg.Connection,
    overrides: dict[str, Any],
    error: type[Exception],
    constraint: str | None,
) -> None:
    with pytest.raises(error) as caught:
        insert_event(conn, **{"ordering_key": "k1", **overrides})
    assert isinstance(caught.value, psycopg.Error)
    if constraint is not None:
        assert caught.value.diag.constraint_name == constraint
    counts = conn.execute(
        "SELECT (SELECT count(*) FROM outbox.events), (SELECT count(*) FROM outbox.event_streams)"
    ).fetchone()
    assert counts == (0, 0), "nothing written"


def test_event_id_must_be_unique(conn: psycopg.Connection) -> None:
    chosen = str(uuid.uuid4())
    insert_event(conn, event_id=chosen)
    with pytest.raises(errors.UniqueViolation) as caught:
        insert_event(conn, event_id=chosen)
    assert caught.value.diag.constraint_name == "events_event_id_unique"


def test_valid_application_events_are_accepted(conn: psycopg.Connection) -> None:
    chosen = uuid.uuid4()
    row = insert_event(
        conn,
        exchange="amq.topic",
        event_type="com.example.order.shipped.v1",
        headers=Jsonb({"tenant": "acme", "priority": 5, "urgent": True, "ratio": 0.5}),
        ordering_key="order-42",
        payment_id="order-42",
        schema_version=3,
        traceparent=TRACEPARENT,
        event_id=str(chosen),
        payload=Jsonb([1, "two"]),
    )
    assert row[1] == chosen and row[2] == 1 and row[3] == "pending"
    assert insert_event(conn)[2:] == (None, "pending"), "unkeyed: no order, always publishable"


def test_seq_follows_commit_order_and_later_events_wait(db_url: str) -> None:
    """A writer of a key waits for the key's previous writer to commit."""
    first = psycopg.connect(db_url)
    try:
        insert_event(first, ordering_key="k")  # not committed yet
        done = threading.Event()
        result: list[tuple[Any, ...]] = []

        def second_writer() -> None:
            with psycopg.connect(db_url, autocommit=True) as conn:
                result.append(insert_event(conn, ordering_key="k"))
            done.set()

        thread = threading.Thread(target=second_writer)
        thread.start()
        assert not done.wait(0.5), "the second writer queues on the stream row"
        first.commit()
        thread.join(30)
        assert done.is_set()
    finally:
        first.close()
    with psycopg.connect(db_url) as conn:
        rows = conn.execute(
            "SELECT seq, status FROM outbox.events WHERE ordering_key = 'k' ORDER BY id"
        ).fetchall()
    assert rows == [(1, "pending"), (2, "blocked")]
    assert result[0][2:] == (2, "blocked")


def test_an_application_may_append_to_a_payments_stream(conn: psycopg.Connection) -> None:
    conn.execute(
        "INSERT INTO outbox.payment_intents (payment_id, action, provider, amount_minor, currency,"
        " payment_method) VALUES ('pay-1', 'charge', 'stripe', 100, 'EUR', 'pm_card_visa')"
    )
    assert insert_event(conn, ordering_key="payment:pay-1")[2:] == (1, "pending")
    assert insert_event(conn, ordering_key="payment:pay-1")[2:] == (2, "blocked")


# -- the publisher's database half: claim heads, mark, promote, release ------------------


@pytest.fixture
async def events(db_url: str) -> AsyncIterator[EventStore]:
    db = Database(db_url, pool_size=2)
    await db.open()
    try:
        yield EventStore(db)
    finally:
        await db.close()


@pytest.mark.anyio
async def test_only_heads_are_claimed_and_marking_promotes_the_next(
    conn: psycopg.Connection, events: EventStore
) -> None:
    for _ in range(3):
        insert_event(conn, ordering_key="k")
    insert_event(conn, routing_key="unkeyed.one")
    claimed = await events.claim(10, lease_seconds=30, instance="p1")
    assert [(e.ordering_key, e.seq) for e in claimed] == [("k", 1), (None, None)]
    assert await events.claim(10, lease_seconds=30, instance="p2") == [], "leased"

    report = await events.mark([EventResult(c, "published") for c in claimed])
    assert report.marked == {c.id for c in claimed} and not report.deferred and not report.lost
    (second,) = await events.claim(10, lease_seconds=30, instance="p2")
    assert (second.ordering_key, second.seq) == ("k", 2)

    await events.mark([EventResult(second, "unroutable", "no_route", "NO_ROUTE")])
    (third,) = await events.claim(10, lease_seconds=30, instance="p1")
    assert third.seq == 3, "an unroutable event is terminal and lets the key move on"

    assert await events.release([Release(third, 60.0, "broker_nack", "refused")]) == 1
    assert await events.claim(10, lease_seconds=30, instance="p1") == []
    later = datetime.now(UTC) + timedelta(seconds=120)
    (again,) = await events.claim(10, lease_seconds=30, instance="p1", now=later)
    assert again.id == third.id and again.attempts == 2

    stale = await events.mark([EventResult(third, "published")])
    assert stale.lost and not stale.marked, "old lease token: fenced"
    rows = conn.execute(
        "SELECT seq, status, error_code FROM outbox.events WHERE ordering_key = 'k' ORDER BY seq"
    ).fetchall()
    assert rows == [
        (1, "published", None),
        (2, "unroutable", "no_route"),
        (3, "pending", "broker_nack"),
    ]
    assert (await events.mark([EventResult(again, "published")])).marked == {again.id}
    assert insert_event(conn, ordering_key="k")[2:] == (4, "pending"), "key clear: no wait"
    assert conn.execute(
        "SELECT last_seq, done_seq FROM outbox.event_streams WHERE ordering_key = 'k'"
    ).fetchone() == (4, 3)


@pytest.mark.anyio
async def test_expired_lease_makes_an_event_claimable_again(
    conn: psycopg.Connection, events: EventStore
) -> None:
    insert_event(conn, ordering_key="k")
    insert_event(conn, ordering_key="k")
    (held,) = await events.claim(10, lease_seconds=5, instance="dead-relay")
    later = datetime.now(UTC) + timedelta(seconds=10)
    (again,) = await events.claim(10, lease_seconds=5, instance="p2", now=later)
    assert again.id == held.id and again.event_id == held.event_id
    assert again.lease_token != held.lease_token


@pytest.mark.anyio
async def test_mark_skips_a_stream_a_writer_holds_then_promotes_its_insert(
    db_url: str, conn: psycopg.Connection, events: EventStore
) -> None:
    insert_event(conn, ordering_key="k")
    (head,) = await events.claim(10, lease_seconds=30, instance="p1")
    with psycopg.connect(db_url) as writer:
        inserted = insert_event(writer, ordering_key="k")  # holds the stream row
        assert inserted[3] == "blocked", "the head is still unpublished"
        with anyio.fail_after(10):
            report = await events.mark([EventResult(head, "published")])
        assert report.deferred and not report.marked, "never waits for a writer"
        writer.commit()
    report = await events.mark([EventResult(head, "published")])
    assert report.marked == {head.id}
    (nxt,) = await events.claim(10, lease_seconds=30, instance="p1")
    assert nxt.id == inserted[0], "the writer's committed event was promoted"


# -- message building (pure) -------------------------------------------------------------


def test_message_carries_stable_id_correlation_and_headers() -> None:
    created = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    claimed = ClaimedEvent(
        id=1,
        event_id="0b3c8f5e-0000-4000-8000-000000000001",
        lease_token=9,
        ordering_key="payment:order-42",
        seq=3,
        exchange=None,
        routing_key="payment.capture.succeeded",
        event_type="payment.capture.succeeded",
        payload='{"a": 1}',
        headers={"tenant": "acme"},
        payment_id="order-42",
        schema_version=1,
        traceparent=TRACEPARENT,
        created_at=created,
    )
    out = build_message(claimed, "outbox.events")
    assert (out.exchange, out.routing_key) == ("outbox.events", "payment.capture.succeeded")
    msg = out.message
    assert msg.body == b'{"a": 1}'
    assert msg.message_id == claimed.event_id
    assert msg.correlation_id == "order-42"
    assert msg.content_type == "application/json"
    assert msg.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert msg.type == "payment.capture.succeeded"
    assert msg.headers == {
        "tenant": "acme",
        "schema-version": 1,
        "traceparent": TRACEPARENT,
        "ordering-key": "payment:order-42",
        "sequence": 3,
    }
    bare = build_message(
        ClaimedEvent(2, "id-2", 1, None, None, "other.ex", "a.b", "a.b", "{}"), "outbox.events"
    )
    assert bare.exchange == "other.ex"
    assert bare.message.headers == {"schema-version": 1}
    assert bare.message.correlation_id is None


# -- settings and the disabled publisher (pure) ------------------------------------------


def test_without_amqp_url_there_is_no_publisher_and_one_log_line() -> None:
    settings = load_settings(amqp_url=None, amqp_url_file=None)
    with structlog.testing.capture_logs() as logs:
        publisher = publisher_from_settings(settings, Database("postgresql://unused"))
    assert publisher is None
    assert [entry["event"] for entry in logs] == ["events_publisher_disabled"]
    assert "RELAY_AMQP_URL" in logs[0]["reason"]


def test_an_empty_amqp_url_file_disables_the_publisher_naming_the_file(tmp_path: Path) -> None:
    secret = tmp_path / "amqp_url"
    secret.write_text("  \n")  # mounted, but the secret has no value
    settings = load_settings(amqp_url=None, amqp_url_file=secret)
    with structlog.testing.capture_logs() as logs:
        publisher = publisher_from_settings(settings, Database("postgresql://unused"))
    assert publisher is None
    assert [entry["event"] for entry in logs] == ["events_publisher_disabled"]
    assert logs[0]["reason"] == f"RELAY_AMQP_URL_FILE {secret} is empty"


def test_amqp_url_from_a_file_builds_a_publisher(tmp_path: Path) -> None:
    secret = tmp_path / "amqp_url"
    secret.write_text("amqp://relay:s3cret@rabbit:5672/payments\n")
    settings = load_settings(amqp_url_file=secret, events_exchange="payments.events")
    publisher = publisher_from_settings(settings, Database("postgresql://unused"))
    assert publisher is not None
    assert publisher.options.amqp_url == "amqp://relay:s3cret@rabbit:5672/payments"
    assert publisher.options.exchange == "payments.events"


@pytest.mark.parametrize(
    ("overrides", "names"),
    [
        ({"events_example_queue": "q"}, "RELAY_EVENTS_DECLARE_TOPOLOGY"),
        (
            {"publish_timeout_seconds": 90.0, "amqp_url": "amqp://rabbit"},
            "RELAY_PUBLISH_TIMEOUT_SECONDS",
        ),
        ({"amqp_url": "http://rabbit"}, "RELAY_AMQP_URL"),
        ({"events_exchange": "has space"}, "RELAY_EVENTS_EXCHANGE"),
        ({"publish_window": 0}, "RELAY_PUBLISH_WINDOW"),
        (
            {"amqp_reconnect_base_seconds": 5.0, "amqp_reconnect_cap_seconds": 1.0},
            "RELAY_AMQP_RECONNECT_CAP_SECONDS",
        ),
    ],
)
def test_bad_event_settings_name_the_variable(overrides: dict[str, Any], names: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(**overrides)
    assert any(names in line for line in caught.value.lines), caught.value.lines
    assert "http://rabbit" not in str(caught.value), "URLs are never echoed"


def test_publish_timeout_only_matters_when_publishing() -> None:
    # A short lease with no broker configured must not be refused for a publisher
    # that does not run.
    settings = load_settings(lease_seconds=3.0)
    assert settings.resolved_amqp_url() is None


# -- debounced NOTIFY (sql/0021) ------------------------------------------------------------


def _event_notified(db_url: str) -> bool:
    with psycopg.connect(db_url, autocommit=True) as listener, psycopg.connect(db_url) as app:
        listener.execute("LISTEN outbox_events")
        insert_event(app)
        app.commit()
        # Bounded wait for a notification that may (correctly) never come.
        return any(True for _ in listener.notifies(timeout=1.0, stop_after=1))


def test_event_inserts_notify_only_while_a_publisher_wants_it(db_url: str) -> None:
    assert _event_notified(db_url), "a fresh installation notifies"
    with psycopg.connect(db_url) as conn:
        conn.execute("UPDATE outbox.events_wakeup SET wanted = false")
    assert not _event_notified(db_url), "a saturated publisher polls: no NOTIFY"
    with psycopg.connect(db_url) as conn:
        conn.execute("UPDATE outbox.events_wakeup SET wanted = true")
    assert _event_notified(db_url)
    with psycopg.connect(db_url) as conn:
        conn.execute("DELETE FROM outbox.events_wakeup")
    assert _event_notified(db_url), "no flag row: notify, the safe default"
