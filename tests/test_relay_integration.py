"""The relay on a real PostgreSQL with an in-process provider: order, fencing, leases."""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime, timedelta

import anyio
import psycopg
import pytest

from provider_adapters.base import Command, Outcome, Retryable
from provider_adapters.memory import MemoryProvider
from relay.core.store import Store
from relay.domain.intents import WriteBack
from relay.infra.db import Database
from tests.support.intents import insert_intents
from tests.support.relays import make_relay, run_until_settled
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.anyio]


def lifecycle(payment_id: str, amount: int = 1000) -> list[dict[str, object]]:
    return [
        {
            "payment_id": payment_id,
            "action": "authorize",
            "amount_minor": amount,
            "payment_method": "pm_card_visa",
        },
        {"payment_id": payment_id, "action": "capture", "amount_minor": amount - 100},
        {"payment_id": payment_id, "action": "refund", "amount_minor": 300},
        {"payment_id": payment_id, "action": "refund", "amount_minor": None},
    ]


class OrderCheckingProvider(MemoryProvider):
    """Records dispatch order and flags two intents of one payment in flight at once."""

    def __init__(self) -> None:
        super().__init__()
        self.in_flight: dict[str, int] = defaultdict(int)
        self.overlaps = 0
        self.order: dict[str, list[int]] = defaultdict(list)
        self.keys: dict[int, set[str]] = defaultdict(set)

    async def execute(self, command: Command) -> Outcome:
        self.in_flight[command.payment_id] += 1
        if self.in_flight[command.payment_id] > 1:
            self.overlaps += 1
        self.order[command.payment_id].append(command.intent_id)
        self.keys[command.intent_id].add(command.idempotency_key)
        try:
            await anyio.sleep(0.001)  # give other relays a chance to overlap
            return await super().execute(command)
        finally:
            self.in_flight[command.payment_id] -= 1


async def test_lifecycle_ends_with_exact_amounts(db_url: str) -> None:
    insert_intents(db_url, [row for i in range(20) for row in lifecycle(f"p{i}")])
    provider = MemoryProvider()
    await run_until_settled(db_url, [make_relay(db_url, provider)])
    with psycopg.connect(db_url) as conn:
        statuses = conn.execute(
            "SELECT status, count(*) FROM outbox.payment_intents GROUP BY status"
        ).fetchall()
        assert statuses == [("succeeded", 80)]
        payments = conn.execute(
            "SELECT DISTINCT state, authorized_minor, captured_minor, refunded_minor"
            " FROM outbox.payments"
        ).fetchall()
        assert payments == [("refunded", 1000, 900, 900)]
        applied = conn.execute(
            "SELECT sum(amount_applied_minor) FILTER (WHERE action = 'refund')"
            " FROM outbox.payment_intents WHERE payment_id = 'p0'"
        ).fetchone()
        assert applied == (900,)
    assert sum(provider.effects.values()) == 80
    assert set(provider.effects.values()) == {1}


async def test_invalid_commands_never_reach_the_provider(db_url: str) -> None:
    insert_intents(
        db_url,
        [
            {"payment_id": "a", "action": "capture", "amount_minor": 100},
            {
                "payment_id": "b",
                "action": "authorize",
                "amount_minor": 500,
                "payment_method": "pm_card_visa",
            },
            {"payment_id": "b", "action": "capture", "amount_minor": 600},
            {"payment_id": "b", "action": "void"},
            {"payment_id": "b", "action": "capture"},
            {
                "payment_id": "c",
                "action": "charge",
                "amount_minor": 500,
                "payment_method": "pm_card_visa",
            },
            {"payment_id": "c", "action": "refund", "amount_minor": 501},
        ],
    )
    provider = MemoryProvider()
    await run_until_settled(db_url, [make_relay(db_url, provider)])
    with psycopg.connect(db_url) as conn:
        rows = conn.execute(
            "SELECT payment_id, action, status, error_code FROM outbox.payment_intents ORDER BY id"
        ).fetchall()
    assert rows == [
        ("a", "capture", "failed", "payment_not_authorized"),
        ("b", "authorize", "succeeded", None),
        ("b", "capture", "failed", "capture_exceeds_authorized"),
        ("b", "void", "succeeded", None),
        ("b", "capture", "failed", "payment_voided"),
        ("c", "charge", "succeeded", None),
        ("c", "refund", "failed", "refund_exceeds_captured"),
    ]
    assert provider.calls == 3  # authorize, void, charge


async def test_declines_fail_the_payment(db_url: str) -> None:
    insert_intents(
        db_url,
        [
            {
                "payment_id": "d",
                "action": "charge",
                "amount_minor": 700,
                "payment_method": "pm_card_chargeDeclined",
            },
            {
                "payment_id": "d",
                "action": "charge",
                "amount_minor": 700,
                "payment_method": "pm_card_visa",
            },
        ],
    )
    provider = MemoryProvider()
    await run_until_settled(db_url, [make_relay(db_url, provider)])
    with psycopg.connect(db_url) as conn:
        rows = conn.execute(
            "SELECT status, error_code FROM outbox.payment_intents ORDER BY id"
        ).fetchall()
        payment = conn.execute("SELECT state, captured_minor FROM outbox.payments").fetchone()
    assert rows == [("failed", "card_declined"), ("succeeded", None)]
    assert payment == ("captured", 700)


async def test_three_relays_keep_per_payment_order(db_url: str) -> None:
    insert_intents(db_url, [row for i in range(60) for row in lifecycle(f"p{i}", 1000 + i)])
    provider = OrderCheckingProvider()
    relays = [make_relay(db_url, provider, instance=f"relay-{n}", seed=n) for n in range(3)]
    await run_until_settled(db_url, relays)
    assert provider.overlaps == 0
    with psycopg.connect(db_url) as conn:
        expected = defaultdict(list)
        for payment_id, intent_id in conn.execute(
            "SELECT payment_id, id FROM outbox.payment_intents ORDER BY payment_seq"
        ):
            expected[payment_id].append(intent_id)
        claimers = conn.execute("SELECT count(DISTINCT claimed_by) FROM outbox.payment_intents")
        assert claimers.fetchone() == (0,)  # leases are cleared on write-back
    assert dict(provider.order) == dict(expected)
    assert all(relay.claimed_total > 0 for relay in relays), "all three relays took work"


async def test_retries_reuse_the_idempotency_key_then_die_at_the_cap(db_url: str) -> None:
    class AlwaysBusy(OrderCheckingProvider):
        async def execute(self, command: Command) -> Outcome:
            await super().execute(command)
            return Retryable("rate_limited", "slow down", retry_after_seconds=0.01)

    insert_intents(
        db_url,
        [
            {
                "payment_id": "r",
                "action": "charge",
                "amount_minor": 100,
                "payment_method": "pm_card_visa",
            }
        ],
    )
    provider = AlwaysBusy()
    await run_until_settled(db_url, [make_relay(db_url, provider, max_attempts=4)])
    with psycopg.connect(db_url) as conn:
        row = conn.execute(
            "SELECT id, status, attempts, error_code, idempotency_key FROM outbox.payment_intents"
        ).fetchone()
    assert row is not None
    intent_id, status, attempts, error_code, key = row
    assert (status, attempts, error_code) == ("dead", 4, "rate_limited")
    assert provider.keys[intent_id] == {key}
    assert len(provider.order["r"]) == 4


async def test_dead_intent_stalls_only_its_own_payment(db_url: str) -> None:
    insert_intents(
        db_url,
        [
            {
                "payment_id": "x",
                "action": "charge",
                "amount_minor": 100,
                "payment_method": "pm_bad",
            },
            {"payment_id": "x", "action": "refund"},
            {
                "payment_id": "y",
                "action": "charge",
                "amount_minor": 100,
                "payment_method": "pm_card_visa",
            },
        ],
    )

    class RejectsBadToken(MemoryProvider):
        async def execute(self, command: Command) -> Outcome:
            if command.payment_method == "pm_bad":
                from provider_adapters.base import Invalid

                return Invalid("invalid_request", "No such PaymentMethod: 'pm_bad'")
            return await super().execute(command)

    relay = make_relay(db_url, RejectsBadToken())
    await relay.db.open()
    async with anyio.create_task_group() as tg:
        await tg.start(relay.run)

        def settled() -> bool:
            with psycopg.connect(db_url) as conn:
                rows = dict(
                    conn.execute(
                        "SELECT payment_id || ':' || action, status FROM outbox.payment_intents"
                    ).fetchall()
                )
            return rows["x:charge"] == "dead" and rows["y:charge"] == "succeeded"

        await wait_until(settled, "x's charge dead and y's succeeded")
        await anyio.sleep(0.3)  # several poll rounds: the blocked refund must stay blocked
        relay.stop()
    await relay.db.close()
    with psycopg.connect(db_url) as conn:
        row = conn.execute(
            "SELECT status FROM outbox.payment_intents WHERE action = 'refund'"
        ).fetchone()
    assert row == ("blocked",)


async def test_stale_claimant_cannot_write(db_url: str) -> None:
    insert_intents(
        db_url,
        [
            {
                "payment_id": "f",
                "action": "charge",
                "amount_minor": 100,
                "payment_method": "pm_card_visa",
            }
        ],
    )
    db = Database(db_url, pool_size=2)
    await db.open()
    try:
        store = Store(db)
        t0 = datetime.now(UTC)
        first = await store.claim("stripe", 10, lease_seconds=5, instance="zombie", now=t0)
        assert len(first) == 1
        # The zombie pauses past its lease; the intent is re-driven and claimed anew.
        later = t0 + timedelta(seconds=10)
        assert await store.requeue_expired(now=later) == 1
        second = await store.claim("stripe", 10, lease_seconds=5, instance="healthy", now=later)
        assert len(second) == 1 and second[0].lease_token != first[0].lease_token
        assert second[0].idempotency_key == first[0].idempotency_key
        assert second[0].attempts == 2

        zombie = WriteBack(first[0].id, first[0].lease_token, "f", "failed", error_code="zombie")
        assert await store.complete([zombie]) == set()
        healthy = WriteBack(
            second[0].id,
            second[0].lease_token,
            "f",
            "succeeded",
            provider_reference="pi_1",
            amount_applied_minor=100,
        )
        assert await store.complete([healthy]) == {second[0].id}
        # Replaying the zombie's write after the healthy one still changes nothing.
        assert await store.complete([zombie]) == set()
    finally:
        await db.close()
    with psycopg.connect(db_url) as conn:
        row = conn.execute(
            "SELECT status, error_code, provider_reference FROM outbox.payment_intents"
        ).fetchone()
    assert row == ("succeeded", None, "pi_1")


async def test_expired_lease_is_recovered_by_another_relay(db_url: str) -> None:
    insert_intents(
        db_url,
        [
            {
                "payment_id": "l",
                "action": "charge",
                "amount_minor": 100,
                "payment_method": "pm_card_visa",
            }
        ],
    )
    provider = MemoryProvider()
    db = Database(db_url, pool_size=1)
    await db.open()
    try:
        # A relay claims, calls the provider, and dies before writing back.
        claimed = await Store(db).claim("stripe", 1, lease_seconds=0.2, instance="dead-relay")
        command = Command(
            claimed[0].id,
            "l",
            claimed[0].action,
            claimed[0].idempotency_key,
            100,
            "EUR",
            "pm_card_visa",
        )
        await provider.execute(command)
    finally:
        await db.close()
    await run_until_settled(db_url, [make_relay(db_url, provider, lease_seconds=0.5)])
    with psycopg.connect(db_url) as conn:
        row = conn.execute("SELECT status, attempts FROM outbox.payment_intents").fetchone()
    assert row == ("succeeded", 2)
    assert dict(provider.effects) == {claimed[0].idempotency_key: 1}
