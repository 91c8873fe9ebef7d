"""Applications that insert under REPEATABLE READ or SERIALIZABLE.

The insert trigger (sql/0001) makes an intent ``blocked`` when an earlier intent of its
payment is unresolved, judged from the inserting transaction's snapshot. Under READ
COMMITTED the payment's row lock makes that snapshot current. Under REPEATABLE READ or
SERIALIZABLE it may predate a write-back that resolved the earlier intent without touching
the payment's row (a decline, a refused command): the new intent is stored ``blocked``,
and that write-back, which could not see it, promoted nothing. The relay's reaper sweeps
for such orphaned blocked heads and promotes them (relay/infra/queries.sql,
lock_orphaned_blocked_payments and promote_orphaned_blocked).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import psycopg
import pytest
from prometheus_client import REGISTRY

from provider_adapters.memory import MemoryProvider
from relay.core.store import Store
from relay.domain.intents import WriteBack
from relay.infra.db import Database
from tests.support.intents import insert_intents
from tests.support.relays import make_relay, run_until_settled

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

INSERT = (
    "INSERT INTO outbox.payment_intents (payment_id, action, provider, amount_minor, currency,"
    " payment_method) VALUES (%s, 'authorize', 'stripe', 1000, 'EUR', %s) RETURNING id, status"
)


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[Store]:
    db = Database(db_url, pool_size=2, name="iso")
    await db.open()
    try:
        yield Store(db, actor="relay:iso")
    finally:
        await db.close()


def statuses(db_url: str, payment_id: str) -> list[str]:
    with psycopg.connect(db_url) as conn:
        rows = conn.execute(
            "SELECT status FROM outbox.payment_intents WHERE payment_id = %s ORDER BY payment_seq",
            (payment_id,),
        ).fetchall()
    return [r[0] for r in rows]


async def orphan_a_blocked_intent(
    db_url: str, store: Store, payment_id: str, isolation: str
) -> int:
    """Decline the payment's first authorize while an application transaction, whose
    snapshot predates the decline, inserts a second one; return the second one's id."""
    insert_intents(
        db_url,
        [
            {
                "payment_id": payment_id,
                "action": "authorize",
                "amount_minor": 1000,
                "payment_method": "pm_card_chargeDeclined",
            }
        ],
    )
    (first,) = await store.claim("stripe", 10, lease_seconds=60, instance="iso")
    with psycopg.connect(db_url) as app:
        app.execute(f"SET TRANSACTION ISOLATION LEVEL {isolation}")  # type: ignore[arg-type]
        app.execute("SELECT count(*) FROM outbox.payments")  # the snapshot is taken here
        declined = WriteBack(
            first.id, first.lease_token, payment_id, "failed", error_code="card_declined"
        )
        assert await store.complete([declined]) == {first.id}
        row = app.execute(INSERT, (payment_id, "pm_card_visa")).fetchone()
        app.commit()
    assert row is not None
    assert row[1] == "blocked", "the snapshot still showed the first intent in flight"
    assert statuses(db_url, payment_id) == ["failed", "blocked"]
    return int(row[0])


def promoted_total() -> float:
    value = REGISTRY.get_sample_value(
        "outbox_relay_orphaned_blocked_promoted_total", {"provider": "stripe"}
    )
    return value or 0.0


@pytest.mark.parametrize("isolation", ["REPEATABLE READ", "SERIALIZABLE"])
async def test_a_running_relay_finishes_an_intent_orphaned_by_a_snapshot_insert(
    db_url: str, store: Store, isolation: str
) -> None:
    payment_id = f"iso-{isolation.split()[0].lower()}"
    second = await orphan_a_blocked_intent(db_url, store, payment_id, isolation)
    before = promoted_total()
    provider = MemoryProvider()
    # lease_seconds=2: the reaper (and its sweep) runs every half second or so.
    relay = make_relay(db_url, provider, instance="iso-relay", lease_seconds=2.0)
    await run_until_settled(db_url, [relay], deadline=60.0)
    assert statuses(db_url, payment_id) == ["failed", "succeeded"]
    assert provider.effects == {store_key(db_url, second): 1}
    assert promoted_total() == before + 1


def store_key(db_url: str, intent_id: int) -> str:
    with psycopg.connect(db_url) as conn:
        row = conn.execute(
            "SELECT idempotency_key FROM outbox.payment_intents WHERE id = %s", (intent_id,)
        ).fetchone()
    assert row is not None
    return str(row[0])


async def test_the_sweep_waits_for_no_lock_and_promotes_once_the_payment_is_free(
    db_url: str, store: Store
) -> None:
    second = await orphan_a_blocked_intent(db_url, store, "iso-locked", "REPEATABLE READ")
    with psycopg.connect(db_url) as other:
        # A write-back or an insert owns the payment: the sweep skips it, without waiting.
        other.execute("SELECT 1 FROM outbox.payments WHERE payment_id = 'iso-locked' FOR UPDATE")
        with anyio.fail_after(30):  # a hang here would be a lock wait, not slowness
            assert await store.promote_orphaned_blocked(["stripe"]) == []
        other.rollback()
    assert await store.promote_orphaned_blocked(["adyen"]) == [], "only the relay's providers"
    assert await store.promote_orphaned_blocked(["stripe"]) == [(second, "iso-locked", "stripe")]
    assert statuses(db_url, "iso-locked") == ["failed", "pending"]
    assert await store.promote_orphaned_blocked(["stripe"]) == [], "promoted once"
    with psycopg.connect(db_url) as conn:
        audited = conn.execute(
            "SELECT actor, reason FROM outbox.audit_log WHERE entity = 'intent'"
            " AND entity_id = %s AND after ->> 'status' = 'pending' AND operation = 'update'",
            (str(second),),
        ).fetchall()
    assert [actor for actor, _ in audited] == ["relay:iso"]
    assert audited[0][1].startswith("promoted:")


async def test_intents_blocked_behind_an_unresolved_one_stay_blocked(
    db_url: str, store: Store
) -> None:
    rows: list[dict[str, object]] = []
    for payment_id in ("behind-pending", "behind-in-flight", "behind-dead"):
        rows.append(
            {
                "payment_id": payment_id,
                "action": "authorize",
                "amount_minor": 1000,
                "payment_method": "pm_card_visa",
            }
        )
        rows.append({"payment_id": payment_id, "action": "capture"})
        rows.append({"payment_id": payment_id, "action": "refund"})
    insert_intents(db_url, rows)
    with psycopg.connect(db_url) as conn:
        conn.execute(
            "UPDATE outbox.payment_intents SET status = 'in_flight', lease_token = 1,"
            " lease_expires_at = now() + interval '1 hour'"
            " WHERE payment_id = 'behind-in-flight' AND action = 'authorize'"
        )
        conn.execute(
            "UPDATE outbox.payment_intents SET status = 'dead', error_code = 'invalid'"
            " WHERE payment_id = 'behind-dead' AND action = 'authorize'"
        )
    assert await store.promote_orphaned_blocked(["stripe"]) == []
    assert statuses(db_url, "behind-pending") == ["pending", "blocked", "blocked"]
    assert statuses(db_url, "behind-in-flight") == ["in_flight", "blocked", "blocked"]
    assert statuses(db_url, "behind-dead") == ["dead", "blocked", "blocked"]
