"""Applying the inbox exactly once, end to end: the fake provider sends signed webhooks to a
real receiver, a real relay makes the calls, the inbox applier applies what arrives.

* every event delivered twice and out of order is stored once and applied once; the
  payments end as the provider shows them, the ledger balances, and types the relay does
  not handle are stored, acknowledged and marked ignored;
* a refund from the provider's dashboard and a dispute show up as payment state, ledger
  lines, result events and (for the dispute) a reconciliation exception;
* a webhook settles an intent left ambiguous before the janitor's first lookup, through
  the same write-back, and the janitor then has nothing to do;
* a notification whose totals disagree with the ledger opens an exception at once;
* a notification older than what the payment knows changes nothing and says why.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import pytest

from provider_adapters.base import Ambiguous, Command, Outcome
from provider_adapters.stripe import StripeAdapter
from relay.core.janitor import Janitor, JanitorOptions
from relay.core.lanes import Lane
from relay.finance.ledger import check_ledger
from relay.infra.db import Database
from tests.support.fake_server import API_KEY, FakeServer
from tests.support.intents import insert_intents
from tests.support.relays import make_relay, running
from tests.support.sql import dict_rows
from tests.support.waiting import wait_until
from tests.support.webhooks import SECRET, applier, inbox_rows, running_receiver

pytestmark = [pytest.mark.integration, pytest.mark.anyio]


@pytest.fixture
async def database(db_url: str) -> AsyncIterator[Database]:
    db = Database(db_url, pool_size=3, name="inbox-test")
    await db.open()
    yield db
    await db.close()


async def deliveries_done(fake: FakeServer) -> bool:
    state = (await fake.control.get("/_fake/webhooks")).json()
    return bool(state["pending"] == 0 and state["sent"] > 0)


def all_finished(db_url: str) -> bool:
    found = inbox_rows(db_url)
    return bool(found) and all(r["status"] != "received" for r in found)


async def settled_inbox(fake: FakeServer, db_url: str) -> None:
    await wait_until(lambda: deliveries_done(fake), "the fake delivered every webhook")
    await wait_until(lambda: all_finished(db_url), "every notification applied or ignored")


def assert_ledger_clean(db_url: str) -> None:
    report = check_ledger(db_url)
    assert report.problems == [], "ledger balances and equals the payments"


async def test_duplicates_and_reordering_are_applied_once(
    db_url: str, database: Database, fake: FakeServer, adapter: StripeAdapter
) -> None:
    async with running_receiver(db_url) as receiver:
        await fake.control.post(
            "/_fake/webhooks/config",
            json={
                "url": receiver.stripe_url,
                "secret": SECRET,
                "duplicates": 2,
                "reorder_ms": 400,
                "seed": 11,
            },
        )
        charges = [
            {
                "payment_id": f"pay-{n}",
                "action": "charge",
                "amount_minor": 1000 + n,
                "payment_method": "pm_card_visa",
            }
            for n in range(4)
        ]
        authorize = {
            "payment_id": "pay-auth",
            "action": "authorize",
            "amount_minor": 700,
            "payment_method": "pm_card_visa",
        }
        insert_intents(db_url, [*charges, authorize])
        insert_intents(db_url, [{"payment_id": "pay-0", "action": "refund", "amount_minor": 300}])
        relay = make_relay(db_url, adapter, instance="apply-relay")
        inbox = applier(database)
        async with running(relay), anyio.create_task_group() as tg:
            tg.start_soon(inbox.run_forever)
            await wait_until(
                lambda: (
                    dict_rows(
                        db_url,
                        "SELECT 1 FROM outbox.payment_intents WHERE status <> 'succeeded'",
                    )
                    == []
                ),
                "every intent succeeded",
            )
            (pi_1,) = dict_rows(
                db_url,
                "SELECT provider_reference FROM outbox.payments WHERE payment_id = 'pay-1'",
            )
            refund = await fake.control.post(
                "/_fake/dashboard/refund",
                json={"payment_intent": pi_1["provider_reference"], "amount": 200},
            )
            assert refund.status_code == 200
            second = await fake.control.post(
                "/_fake/dashboard/refund",
                json={"payment_intent": pi_1["provider_reference"], "amount": 100},
            )
            assert second.status_code == 200
            await settled_inbox(fake, db_url)
            tg.cancel_scope.cancel()

    found = inbox_rows(db_url)
    log = (await fake.control.get("/_fake/webhooks")).json()
    assert len(found) == len(log["events"]), "every event stored once"
    assert len({r["event_id"] for r in found}) == len(found)
    assert log["sent"] >= 2 * len(found), "each event was delivered twice"
    by_type: dict[str, set[str]] = {}
    for r in found:
        by_type.setdefault(r["event_type"], set()).add(r["status"])
    assert by_type["payment_intent.amount_capturable_updated"] == {"ignored"}
    assert by_type["payment_intent.succeeded"] == {"applied"}
    assert by_type["charge.refunded"] == {"applied"}

    # The payments are what the provider shows: pay-0 refunded 300 by our intent, pay-1
    # 300 by two dashboard refunds (recorded once each, whatever the order).
    payments = {
        p["payment_id"]: p
        for p in dict_rows(db_url, "SELECT payment_id, state, refunded_minor FROM outbox.payments")
    }
    assert (payments["pay-0"]["state"], payments["pay-0"]["refunded_minor"]) == (
        "partially_refunded",
        300,
    )
    assert (payments["pay-1"]["state"], payments["pay-1"]["refunded_minor"]) == (
        "partially_refunded",
        300,
    )
    external = dict_rows(
        db_url,
        "SELECT payment_id, amount_minor FROM outbox.ledger_transactions"
        " WHERE inbox_id IS NOT NULL ORDER BY id",
    )
    assert sum(t["amount_minor"] for t in external) == 300
    assert {t["payment_id"] for t in external} == {"pay-1"}
    events = dict_rows(
        db_url,
        "SELECT payload FROM outbox.events WHERE event_type = 'payment.refund.external'",
    )
    assert sum(e["payload"]["change"]["amount_minor"] for e in events) == 300
    assert dict_rows(db_url, "SELECT id FROM outbox.reconciliation_exceptions") == []
    effects = await fake.effects()
    assert all(entry["count"] == 1 for entry in effects["effects_by_key"].values())
    assert_ledger_clean(db_url)


async def test_dashboard_refund_and_dispute_are_recorded(
    db_url: str, database: Database, fake: FakeServer, adapter: StripeAdapter
) -> None:
    async with running_receiver(db_url) as receiver:
        await fake.control.post(
            "/_fake/webhooks/config", json={"url": receiver.stripe_url, "secret": SECRET}
        )
        insert_intents(
            db_url,
            [
                {
                    "payment_id": "pay-d",
                    "action": "charge",
                    "amount_minor": 5000,
                    "payment_method": "pm_card_visa",
                }
            ],
        )
        relay = make_relay(db_url, adapter, instance="dispute-relay")
        inbox = applier(database)
        async with running(relay), anyio.create_task_group() as tg:
            tg.start_soon(inbox.run_forever)
            await wait_until(
                lambda: dict_rows(
                    db_url,
                    "SELECT provider_reference FROM outbox.payments"
                    " WHERE payment_id = 'pay-d' AND state = 'captured'",
                ),
                "the charge succeeded",
            )
            (payment,) = dict_rows(
                db_url,
                "SELECT provider_reference FROM outbox.payments WHERE payment_id = 'pay-d'",
            )
            reference = payment["provider_reference"]
            await fake.control.post(
                "/_fake/dashboard/refund", json={"payment_intent": reference, "amount": 1500}
            )
            opened = await fake.control.post(
                "/_fake/dashboard/dispute",
                json={"payment_intent": reference, "amount": 3500, "reason": "fraudulent"},
            )
            await settled_inbox(fake, db_url)
            # The dispute's funds left the receivable: payment and ledger say so.
            (state,) = dict_rows(
                db_url,
                "SELECT disputed_minor, dispute_status FROM outbox.payments"
                " WHERE payment_id = 'pay-d'",
            )
            assert state == {"disputed_minor": 3500, "dispute_status": "open"}
            assert_ledger_clean(db_url)
            closed = await fake.control.post(
                "/_fake/dashboard/dispute/close",
                json={"dispute": opened.json()["id"], "status": "lost"},
            )
            assert closed.status_code == 200, closed.text
            # The fake may not have queued the closing webhook yet: wait for its row, then
            # for everything to settle.
            await wait_until(
                lambda: any(
                    r["event_type"] == "charge.dispute.closed" and r["status"] != "received"
                    for r in inbox_rows(db_url)
                ),
                "the dispute's closing notification applied",
            )
            await settled_inbox(fake, db_url)
            tg.cancel_scope.cancel()

    (state,) = dict_rows(
        db_url,
        "SELECT state, captured_minor, refunded_minor, disputed_minor, dispute_status"
        " FROM outbox.payments WHERE payment_id = 'pay-d'",
    )
    assert state == {
        "state": "partially_refunded",
        "captured_minor": 5000,
        "refunded_minor": 1500,
        "disputed_minor": 3500,
        "dispute_status": "lost",
    }
    lines = dict_rows(
        db_url,
        "SELECT t.kind, e.account, e.amount_minor FROM outbox.ledger_entries AS e"
        " JOIN outbox.ledger_transactions AS t ON t.id = e.transaction_id"
        " WHERE t.inbox_id IS NOT NULL ORDER BY e.id",
    )
    assert lines == [
        {"kind": "refund", "account": "stripe:refunded", "amount_minor": 1500},
        {"kind": "refund", "account": "stripe:receivable", "amount_minor": -1500},
        # lost: the withdrawal stays, final
        {"kind": "dispute", "account": "stripe:disputed", "amount_minor": 3500},
        {"kind": "dispute", "account": "stripe:receivable", "amount_minor": -3500},
    ]
    (lost,) = [r for r in inbox_rows(db_url) if r["event_type"] == "charge.dispute.closed"]
    assert "lost" in lost["result"] and "final" in lost["result"]
    # Issue 17: amounts a person reads are in currency units (1500 minor EUR is 15.00 EUR),
    # never raw minor units that read 100 times too large.
    (refunded,) = [r for r in inbox_rows(db_url) if r["event_type"] == "charge.refunded"]
    assert refunded["result"].startswith(
        "recorded a refund of 15.00 EUR made outside the relay; the payment is "
        "partially_refunded (15.00 EUR of 50.00 EUR refunded)"
    ), refunded["result"]
    assert "1500 EUR" not in refunded["result"]
    assert "the withdrawal of 35.00 EUR is final" in lost["result"], lost["result"]
    (dispute,) = dict_rows(
        db_url,
        "SELECT detail FROM outbox.reconciliation_exceptions WHERE kind = 'dispute'"
        " AND payment_id = 'pay-d'",
    )
    assert dispute["detail"].startswith(f"the customer disputes 35.00 EUR of {reference} ")
    types = [
        e["event_type"]
        for e in dict_rows(
            db_url, "SELECT event_type FROM outbox.events WHERE payment_id = 'pay-d' ORDER BY seq"
        )
    ]
    assert types == [
        "payment.charge.succeeded",
        "payment.refund.external",
        "payment.dispute.opened",
        "payment.dispute.lost",
    ]
    (exception,) = dict_rows(
        db_url,
        "SELECT kind, status, payment_id, provider_amount_minor, inbox_id IS NOT NULL AS by_webhook"
        " FROM outbox.reconciliation_exceptions",
    )
    assert exception == {
        "kind": "dispute",
        "status": "open",
        "payment_id": "pay-d",
        "provider_amount_minor": 3500,
        "by_webhook": True,
    }
    assert_ledger_clean(db_url)


class _LookupsFail(StripeAdapter):
    """Stripe whose search has not indexed the payment yet: the relay's own lookup after
    the ambiguous attempt finds nothing to settle by."""

    async def lookup(self, command: Command) -> Outcome:
        return Ambiguous("lookup_failed", "lookup failed: the search index lags")


async def test_a_webhook_settles_an_ambiguous_intent_before_the_janitor(
    db_url: str, database: Database, fake: FakeServer, adapter: StripeAdapter
) -> None:
    """The charge happens at the provider, the reply never arrives in time, the relay's
    one attempt ends the intent dead; payment_intent.succeeded settles it with the
    effects a lookup would have had, and the janitor finds nothing left to do."""
    impatient = _LookupsFail(
        name="stripe", api_key=API_KEY, base_url=fake.url, read_timeout_seconds=0.3
    )
    try:
        async with running_receiver(db_url) as receiver:
            await fake.configure(rate_timeout_after_effect=1.0, timeout_seconds=2.0)
            await fake.control.post(
                "/_fake/webhooks/config",
                json={"url": receiver.stripe_url, "secret": SECRET, "delay_ms": 500},
            )
            insert_intents(
                db_url,
                [
                    {
                        "payment_id": "pay-amb",
                        "action": "charge",
                        "amount_minor": 1234,
                        "payment_method": "pm_card_visa",
                    }
                ],
            )
            relay = make_relay(db_url, impatient, instance="amb-relay", max_attempts=1)
            inbox = applier(database)
            async with running(relay), anyio.create_task_group() as tg:
                tg.start_soon(inbox.run_forever)
                await settled_inbox(fake, db_url)
                tg.cancel_scope.cancel()
    finally:
        await impatient.aclose()

    (intent,) = dict_rows(
        db_url,
        "SELECT id, status, amount_applied_minor, provider_reference LIKE 'pi_%%' AS ref,"
        " idempotency_key FROM outbox.payment_intents WHERE payment_id = 'pay-amb'",
    )
    assert (intent["status"], intent["amount_applied_minor"], intent["ref"]) == (
        "succeeded",
        1234,
        True,
    )
    (payment,) = dict_rows(
        db_url, "SELECT state, captured_minor FROM outbox.payments WHERE payment_id = 'pay-amb'"
    )
    assert payment == {"state": "captured", "captured_minor": 1234}
    (row,) = [r for r in inbox_rows(db_url) if r["event_type"] == "payment_intent.succeeded"]
    assert row["status"] == "applied" and row["result"].startswith(f"settled intent {intent['id']}")
    reasons = dict_rows(
        db_url,
        "SELECT reason FROM outbox.audit_log WHERE entity = 'intent' AND entity_id = %s"
        " AND reason LIKE 'webhook%%'",
        str(intent["id"]),
    )
    assert reasons, "the audit trail names the webhook as the evidence"
    assert dict_rows(db_url, "SELECT 1 FROM outbox.janitor_checks") == []
    await fake.configure()
    lane = Lane("stripe", adapter, concurrency=2, timeout_seconds=5.0)
    janitor = Janitor(
        database, {"stripe": lane}, JanitorOptions(instance="jan"), rng=random.Random(1).random
    )
    assert (await janitor.run_once()).examined == 0, "nothing left for the janitor"
    effects = await fake.effects()
    assert effects["effects_by_key"][intent["idempotency_key"]]["count"] == 1
    assert_ledger_clean(db_url)


def signed_post(url: str, body: dict[str, Any]) -> httpx.Response:
    from provider_adapters.fake.webhooks import signature_header

    text = json.dumps(body)
    header = signature_header(text, SECRET, int(time.time()))
    return httpx.post(url, content=text, headers={"Stripe-Signature": header}, timeout=10)


def charge_refunded(event_id: str, reference: str, captured: int, refunded: int) -> dict[str, Any]:
    return {
        "id": event_id,
        "object": "event",
        "type": "charge.refunded",
        "created": int(time.time()),
        "data": {
            "object": {
                "id": "ch_x",
                "object": "charge",
                "payment_intent": reference,
                "currency": "eur",
                "amount_captured": captured,
                "amount_refunded": refunded,
                "refunds": {"object": "list", "data": []},
            }
        },
    }


async def test_an_old_notification_changes_nothing_and_a_mismatch_opens_an_exception(
    db_url: str, database: Database, fake: FakeServer, adapter: StripeAdapter
) -> None:
    insert_intents(
        db_url,
        [
            {
                "payment_id": "pay-m",
                "action": "charge",
                "amount_minor": 2000,
                "payment_method": "pm_card_visa",
            },
            {"payment_id": "pay-m", "action": "refund", "amount_minor": 500},
        ],
    )
    relay = make_relay(db_url, adapter, instance="mismatch-relay")
    async with running(relay):
        await wait_until(
            lambda: dict_rows(
                db_url,
                "SELECT 1 FROM outbox.payments WHERE payment_id = 'pay-m' AND refunded_minor = 500",
            ),
            "charge and refund written",
        )
    (payment,) = dict_rows(
        db_url, "SELECT provider_reference FROM outbox.payments WHERE payment_id = 'pay-m'"
    )
    reference = payment["provider_reference"]
    async with running_receiver(db_url) as receiver:
        # Older than what the payment knows: 0 refunded then (the ledger agrees on 2000).
        old = charge_refunded("evt_old", reference, 2000, 0)
        # The provider shows 2100 captured: the ledger says 2000.
        odd = charge_refunded("evt_odd", reference, 2100, 500)
        for body in (old, odd):
            assert (
                await anyio.to_thread.run_sync(signed_post, receiver.stripe_url, body)
            ).status_code == 200
    inbox = applier(database)
    assert await inbox.run_once() == 2
    results = {r["event_id"]: r for r in inbox_rows(db_url)}
    assert results["evt_old"]["status"] == "applied"
    assert "older than what the payment knows; nothing changed" in results["evt_old"]["result"]
    assert "exception" in results["evt_odd"]["result"]
    (exception,) = dict_rows(
        db_url,
        "SELECT kind, internal_amount_minor, provider_amount_minor FROM"
        " outbox.reconciliation_exceptions",
    )
    assert exception == {
        "kind": "amount_mismatch",
        "internal_amount_minor": 1500,
        "provider_amount_minor": 1600,
    }
    (state,) = dict_rows(
        db_url, "SELECT refunded_minor FROM outbox.payments WHERE payment_id = 'pay-m'"
    )
    assert state == {"refunded_minor": 500}
    assert_ledger_clean(db_url)


async def test_a_notification_that_fails_to_apply_is_retried_and_stops_nothing(
    db_url: str, database: Database, fake: FakeServer, adapter: StripeAdapter
) -> None:
    """A verified but absurd body (a refunded total beyond any bigint) fails its own
    transaction: the row stays received with the error and a backoff, and the other
    notification of the same batch is applied."""
    insert_intents(
        db_url,
        [
            {
                "payment_id": "pay-h",
                "action": "charge",
                "amount_minor": 800,
                "payment_method": "pm_card_visa",
            }
        ],
    )
    async with running(make_relay(db_url, adapter, instance="hostile-relay")):
        await wait_until(
            lambda: dict_rows(db_url, "SELECT 1 FROM outbox.payments WHERE state = 'captured'"),
            "the charge written",
        )
    (payment,) = dict_rows(db_url, "SELECT provider_reference FROM outbox.payments")
    reference = payment["provider_reference"]
    async with running_receiver(db_url) as receiver:
        # 19 nines: past bigint, and no 13-19 digit window of it passes Luhn (9 x n is a
        # multiple of 10 only for n = 10, 20), so the card rule leaves it as sent.
        absurd = charge_refunded("evt_absurd", reference, 800, 9_999_999_999_999_999_999)
        fine = charge_refunded("evt_fine", reference, 800, 100)
        for body in (absurd, fine):
            answer = await anyio.to_thread.run_sync(signed_post, receiver.stripe_url, body)
            assert answer.status_code == 200
    inbox = applier(database)
    assert await inbox.run_once() == 2
    results = {r["event_id"]: r for r in inbox_rows(db_url)}
    assert results["evt_fine"]["status"] == "applied"
    assert results["evt_absurd"]["status"] == "received"
    (failed,) = dict_rows(
        db_url,
        "SELECT last_error, available_at > now() AS later, lease_token FROM outbox.webhook_inbox"
        " WHERE event_id = 'evt_absurd'",
    )
    assert failed["last_error"] and failed["later"] and failed["lease_token"] is None
    assert await inbox.run_once() == 0, "not claimed again before its backoff"
    (state,) = dict_rows(db_url, "SELECT refunded_minor FROM outbox.payments")
    assert state == {"refunded_minor": 100}
    assert_ledger_clean(db_url)


async def test_a_refund_left_ambiguous_is_settled_by_charge_refunded(
    db_url: str, database: Database, fake: FakeServer, adapter: StripeAdapter
) -> None:
    """Our refund happens at the provider but its reply never arrives; the relay's one
    attempt ends it dead. charge.refunded lists it under our key: it is settled through
    the write-back (payment refunded, the intent's own ledger posting), not recorded as a
    refund made outside the relay."""
    insert_intents(
        db_url,
        [
            {
                "payment_id": "pay-r",
                "action": "charge",
                "amount_minor": 3000,
                "payment_method": "pm_card_visa",
            }
        ],
    )
    async with running(make_relay(db_url, adapter, instance="charge-relay")):
        await wait_until(
            lambda: dict_rows(db_url, "SELECT 1 FROM outbox.payments WHERE state = 'captured'"),
            "the charge written",
        )
    impatient = _LookupsFail(
        name="stripe", api_key=API_KEY, base_url=fake.url, read_timeout_seconds=0.3
    )
    try:
        async with running_receiver(db_url) as receiver:
            await fake.configure(rate_timeout_after_effect=1.0, timeout_seconds=2.0)
            await fake.control.post(
                "/_fake/webhooks/config",
                json={"url": receiver.stripe_url, "secret": SECRET, "delay_ms": 300},
            )
            insert_intents(
                db_url, [{"payment_id": "pay-r", "action": "refund", "amount_minor": 1200}]
            )
            relay = make_relay(db_url, impatient, instance="refund-relay", max_attempts=1)
            inbox = applier(database)
            async with running(relay), anyio.create_task_group() as tg:
                tg.start_soon(inbox.run_forever)
                await settled_inbox(fake, db_url)
                tg.cancel_scope.cancel()
    finally:
        await impatient.aclose()
    (refund,) = dict_rows(
        db_url,
        "SELECT id, status, amount_applied_minor FROM outbox.payment_intents"
        " WHERE action = 'refund'",
    )
    assert (refund["status"], refund["amount_applied_minor"]) == ("succeeded", 1200)
    (payment,) = dict_rows(db_url, "SELECT state, refunded_minor FROM outbox.payments")
    assert payment == {"state": "partially_refunded", "refunded_minor": 1200}
    (row,) = [r for r in inbox_rows(db_url) if r["event_type"] == "charge.refunded"]
    assert f"settled intent {refund['id']}" in row["result"]
    assert (
        dict_rows(db_url, "SELECT 1 FROM outbox.ledger_transactions WHERE inbox_id IS NOT NULL")
        == []
    )
    assert dict_rows(db_url, "SELECT 1 FROM outbox.reconciliation_exceptions") == []
    assert_ledger_clean(db_url)


def dispute_event(
    event_id: str, event_type: str, reference: str, dispute: str, status: str, amount: int
) -> dict[str, Any]:
    """A Stripe event carrying a Dispute (stripe-python's fields: amount, currency, status,
    charge, payment_intent, reason)."""
    return {
        "id": event_id,
        "object": "event",
        "type": event_type,
        "created": int(time.time()),
        "data": {
            "object": {
                "id": dispute,
                "object": "dispute",
                "amount": amount,
                "currency": "eur",
                "status": status,
                "charge": "ch_" + dispute,
                "payment_intent": reference,
                "reason": "fraudulent",
            }
        },
    }


async def test_disputes_won_and_lost_out_of_order_and_repeated_change_things_once(
    db_url: str, database: Database, fake: FakeServer, adapter: StripeAdapter
) -> None:
    insert_intents(
        db_url,
        [
            {
                "payment_id": payment_id,
                "action": "charge",
                "amount_minor": 3000,
                "payment_method": "pm_card_visa",
            }
            for payment_id in ("pay-won", "pay-lost")
        ],
    )
    async with running(make_relay(db_url, adapter, instance="dispute-order-relay")):
        await wait_until(
            lambda: (
                len(dict_rows(db_url, "SELECT 1 FROM outbox.payments WHERE state = 'captured'"))
                == 2
            ),
            "both charges written",
        )
    refs = {
        r["payment_id"]: r["provider_reference"]
        for r in dict_rows(db_url, "SELECT payment_id, provider_reference FROM outbox.payments")
    }
    won, lost = refs["pay-won"], refs["pay-lost"]
    created, closed = "charge.dispute.created", "charge.dispute.closed"
    # One notification at a time, in this order: the outcome overtakes the opening for
    # pay-won; every dispute is reported again under another event id.
    sequence = [
        dispute_event("evt_w_closed", closed, won, "dp_w", "won", 1200),
        dispute_event("evt_w_created", created, won, "dp_w", "needs_response", 1200),
        dispute_event("evt_w_closed_again", closed, won, "dp_w", "won", 1200),
        dispute_event("evt_l_created", created, lost, "dp_l", "needs_response", 3000),
        dispute_event("evt_l_created_again", created, lost, "dp_l", "under_review", 3000),
        dispute_event("evt_l_closed", closed, lost, "dp_l", "lost", 3000),
        dispute_event("evt_l_closed_again", closed, lost, "dp_l", "lost", 3000),
    ]
    inbox = applier(database)
    async with running_receiver(db_url) as receiver:
        for body in sequence:
            answer = await anyio.to_thread.run_sync(signed_post, receiver.stripe_url, body)
            assert answer.status_code == 200
            assert await inbox.run_once() == 1
    results = {r["event_id"]: r for r in inbox_rows(db_url)}
    assert {r["status"] for r in results.values()} == {"applied"}
    for repeated in ("evt_w_created", "evt_w_closed_again", "evt_l_created_again"):
        assert "nothing changed" in results[repeated]["result"], results[repeated]["result"]
    assert "nothing changed" in results["evt_l_closed_again"]["result"]
    assert "recorded the opening of dispute dp_w first" in results["evt_w_closed"]["result"]

    payments = {
        r["payment_id"]: r
        for r in dict_rows(
            db_url,
            "SELECT payment_id, state, captured_minor, disputed_minor, dispute_status"
            " FROM outbox.payments",
        )
    }
    assert payments["pay-won"] == {
        "payment_id": "pay-won",
        "state": "captured",
        "captured_minor": 3000,
        "disputed_minor": 0,
        "dispute_status": "won",
    }
    assert payments["pay-lost"] == {
        "payment_id": "pay-lost",
        "state": "captured",
        "captured_minor": 3000,
        "disputed_minor": 3000,
        "dispute_status": "lost",
    }
    postings = dict_rows(
        db_url,
        "SELECT payment_id, kind, amount_minor FROM outbox.ledger_transactions"
        " WHERE inbox_id IS NOT NULL ORDER BY id",
    )
    assert postings == [
        {"payment_id": "pay-won", "kind": "dispute", "amount_minor": 1200},
        {"payment_id": "pay-won", "kind": "dispute_reversal", "amount_minor": 1200},
        {"payment_id": "pay-lost", "kind": "dispute", "amount_minor": 3000},
    ]
    balances = {
        r["account"]: r["balance"]
        for r in dict_rows(
            db_url,
            "SELECT account, sum(amount_minor)::bigint AS balance FROM outbox.ledger_entries"
            " WHERE account IN ('stripe:disputed', 'stripe:receivable') GROUP BY account",
        )
    }
    # 6000 captured; 3000 lost to the card holder; the won dispute's 1200 came back.
    assert balances == {"stripe:disputed": 3000, "stripe:receivable": 3000}
    events = [
        (r["payment_id"], r["event_type"])
        for r in dict_rows(
            db_url,
            "SELECT payment_id, event_type FROM outbox.events"
            " WHERE event_type LIKE 'payment.dispute.%%' ORDER BY id",
        )
    ]
    assert events == [
        ("pay-won", "payment.dispute.opened"),
        ("pay-won", "payment.dispute.won"),
        ("pay-lost", "payment.dispute.opened"),
        ("pay-lost", "payment.dispute.lost"),
    ]
    exceptions = dict_rows(
        db_url,
        "SELECT payment_id, kind, match_key FROM outbox.reconciliation_exceptions ORDER BY id",
    )
    assert exceptions == [
        {"payment_id": "pay-won", "kind": "dispute", "match_key": "dispute:dp_w"},
        {"payment_id": "pay-lost", "kind": "dispute", "match_key": "dispute:dp_l"},
    ]
    assert_ledger_clean(db_url)

    # A refund of the lost payment is refused before the provider: its money is gone.
    insert_intents(db_url, [{"payment_id": "pay-lost", "action": "refund", "amount_minor": 100}])
    async with running(make_relay(db_url, adapter, instance="dispute-refund-relay")):
        await wait_until(
            lambda: dict_rows(
                db_url,
                "SELECT 1 FROM outbox.payment_intents WHERE action = 'refund' AND status = 'failed'",
            ),
            "the refund refused",
        )
    (refund,) = dict_rows(
        db_url, "SELECT error_code FROM outbox.payment_intents WHERE action = 'refund'"
    )
    assert refund == {"error_code": "refund_exceeds_captured"}


def charge_captured(event_id: str, reference: str, captured: int) -> dict[str, Any]:
    return {
        "id": event_id,
        "object": "event",
        "type": "charge.captured",
        "created": int(time.time()),
        "data": {
            "object": {
                "id": "ch_" + reference,
                "object": "charge",
                "payment_intent": reference,
                "currency": "eur",
                "amount": 4000,
                "amount_captured": captured,
                "captured": True,
            }
        },
    }


async def test_a_capture_by_another_system_is_recorded_as_an_external_change(
    db_url: str, database: Database, fake: FakeServer, adapter: StripeAdapter
) -> None:
    insert_intents(
        db_url,
        [
            {
                "payment_id": payment_id,
                "action": "authorize",
                "amount_minor": 4000,
                "payment_method": "pm_card_visa",
            }
            for payment_id in ("pay-ext", "pay-ours")
        ],
    )
    async with running(make_relay(db_url, adapter, instance="capture-relay")):
        await wait_until(
            lambda: (
                len(dict_rows(db_url, "SELECT 1 FROM outbox.payments WHERE state = 'authorized'"))
                == 2
            ),
            "both authorisations written",
        )
    refs = {
        r["payment_id"]: r["provider_reference"]
        for r in dict_rows(db_url, "SELECT payment_id, provider_reference FROM outbox.payments")
    }
    # pay-ours has a capture of ours waiting: a capture notification may be its own.
    insert_intents(db_url, [{"payment_id": "pay-ours", "action": "capture"}])
    inbox = applier(database)
    async with running_receiver(db_url) as receiver:
        for body in (
            charge_captured("evt_ext", refs["pay-ext"], 2500),
            charge_captured("evt_ext_again", refs["pay-ext"], 2500),
            charge_captured("evt_ours", refs["pay-ours"], 4000),
        ):
            answer = await anyio.to_thread.run_sync(signed_post, receiver.stripe_url, body)
            assert answer.status_code == 200
            assert await inbox.run_once() == 1
    results = {r["event_id"]: r["result"] for r in inbox_rows(db_url)}
    assert results["evt_ext"].startswith(
        "recorded a capture of 25.00 EUR made outside the relay (40.00 EUR authorized;"
    ), results["evt_ext"]
    assert "older than what the payment knows; nothing changed" in results["evt_ext_again"]
    assert "our capture intent" in results["evt_ours"] and "nothing changed" in results["evt_ours"]
    payments = {
        r["payment_id"]: r
        for r in dict_rows(db_url, "SELECT payment_id, state, captured_minor FROM outbox.payments")
    }
    assert payments["pay-ext"] == {
        "payment_id": "pay-ext",
        "state": "captured",
        "captured_minor": 2500,
    }
    assert payments["pay-ours"]["state"] == "authorized"
    lines = dict_rows(
        db_url,
        "SELECT t.kind, e.account, e.amount_minor FROM outbox.ledger_entries AS e"
        " JOIN outbox.ledger_transactions AS t ON t.id = e.transaction_id"
        " WHERE t.inbox_id IS NOT NULL ORDER BY e.id",
    )
    assert lines == [
        {"kind": "capture", "account": "stripe:authorizations", "amount_minor": 4000},
        {"kind": "capture", "account": "stripe:holds", "amount_minor": -4000},
        {"kind": "capture", "account": "stripe:receivable", "amount_minor": 2500},
        {"kind": "capture", "account": "stripe:captured", "amount_minor": -2500},
    ]
    events = dict_rows(
        db_url,
        "SELECT payment_id, payload -> 'change' ->> 'amount_minor' AS amount FROM outbox.events"
        " WHERE event_type = 'payment.capture.external'",
    )
    assert events == [{"payment_id": "pay-ext", "amount": "2500"}]
    # Our capture then runs against the provider and is written by its own write-back.
    async with running(make_relay(db_url, adapter, instance="capture-relay-2")):
        await wait_until(
            lambda: dict_rows(
                db_url,
                "SELECT 1 FROM outbox.payments WHERE payment_id = 'pay-ours' AND state = 'captured'",
            ),
            "our capture written",
        )
    assert_ledger_clean(db_url)
