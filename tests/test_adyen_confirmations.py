"""Asynchronous outcomes end to end with Adyen: the fake Adyen answers modifications
``received`` and sends signed webhooks to a real receiver; a real relay makes the calls;
the inbox applier finishes each awaiting intent by its confirmation.

* an accepted call waits as ``awaiting_confirmation`` (no lease, no retry, nothing booked,
  the requested amount on the payment beside the confirmed ones) and its confirmation
  finishes it once; duplicated and reordered deliveries, and every notification delivered
  again afterwards, change nothing; every pspReference is 16 digits passing the Luhn check,
  so the inbox must neither refuse nor redact it;
* a later intent of the payment is not sent while an earlier one awaits (parked, promoted
  by the confirmation);
* CAPTURE_FAILED after CAPTURE reverses exactly what the capture booked; CAPTURE_FAILED
  delivered before its CAPTURE fails the intent and the late CAPTURE changes nothing;
* a confirmation that never comes opens a confirmation_overdue exception after the
  deadline, once; a late one settles the intent once and resolves the exception;
* chargebacks (notice, chargeback, reversal) and an expired authorisation map to payment
  state, ledger, exceptions and events;
* a Stripe refund answered ``pending`` takes the same path: it awaits, a later refund of
  the payment waits behind it, charge.refund.updated finishes it (succeeded or failed).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import httpx
import pytest
from prometheus_client import REGISTRY

from provider_adapters.adyen import AdyenAdapter
from provider_adapters.adyen_webhooks import sign_item
from provider_adapters.fake.adyen import HMAC_KEY_HEX, AdyenFaults, luhn_valid
from provider_adapters.stripe import StripeAdapter
from relay.core.inbox import InboxApplier
from relay.finance.exceptions import list_exceptions
from relay.finance.ledger import check_ledger
from relay.infra.db import Database
from relay.service.depth import DepthSampler
from tests.support.adyen import AdyenFake, adyen_on_fake
from tests.support.cli import run_cli
from tests.support.fake_server import FakeServer
from tests.support.intents import insert_intents
from tests.support.relays import make_relay, running
from tests.support.sql import dict_rows
from tests.support.waiting import wait_until
from tests.support.webhooks import SECRET, Receiver, applier, inbox_rows, running_receiver

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

SECOND_KEY = "00112233445566778899AABBCCDDEEFF00112233445566778899AABBCCDDEEFF"


@pytest.fixture
async def database(db_url: str) -> AsyncIterator[Database]:
    db = Database(db_url, pool_size=4, name="adyen-confirm-test")
    await db.open()
    yield db
    await db.close()


def intents(db_url: str) -> list[dict[str, Any]]:
    return dict_rows(
        db_url,
        "SELECT id, payment_id, action, status, attempts, error_code, provider_reference,"
        " amount_applied_minor, idempotency_key FROM outbox.payment_intents ORDER BY id",
    )


def payment(db_url: str, payment_id: str) -> dict[str, Any]:
    (found,) = dict_rows(db_url, "SELECT * FROM outbox.payments WHERE payment_id = %s", payment_id)
    return found


def assert_ledger_clean(db_url: str) -> None:
    report = check_ledger(db_url)
    assert report.problems == [], report.problems


def flow(payment_id: str, *actions: tuple[str, int | None]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for action, amount in actions:
        row: dict[str, Any] = {
            "payment_id": payment_id,
            "provider": "adyen",
            "action": action,
            "amount_minor": amount,
            "currency": "EUR",
        }
        if action in ("authorize", "charge"):
            row["payment_method"] = "stored_visa"
        out.append(row)
    return out


async def all_applied(db_url: str) -> bool:
    found = inbox_rows(db_url)
    return bool(found) and all(r["status"] != "received" for r in found)


async def delivered(fake: AdyenFake) -> bool:
    notes = await fake.notifications()
    return all(n.get("_delivered") for n in notes)


async def delivered_times(fake: AdyenFake, event: str, times: int) -> bool:
    notes = await fake.notifications()
    return all(n.get("_delivered", 0) >= times for n in notes if n["eventCode"] == event)


def stored(db_url: str, count: int) -> bool:
    return len(inbox_rows(db_url)) >= count


async def settle(fake: AdyenFake, db_url: str) -> None:
    await wait_until(lambda: delivered(fake), "the fake delivered every notification")
    await wait_until(lambda: all_applied(db_url), "every notification applied")


def statuses(db_url: str) -> list[str]:
    return [i["status"] for i in intents(db_url)]


async def test_confirmations_finish_each_intent_once_whatever_the_delivery(
    db_url: str, database: Database
) -> None:
    faults = AdyenFaults(seed=5, webhook_duplicate=True, webhook_reorder=True, luhn_psp=True)
    faults.webhook_delay_ms = 50
    insert_intents(
        db_url,
        [
            *flow("p-cap", ("authorize", 1000), ("capture", 1000), ("refund", 300)),
            *flow("p-void", ("authorize", 500), ("void", None)),
            *flow("p-two", ("authorize", 800), ("capture", 800), ("refund", 100), ("refund", None)),
        ],
    )
    async with (
        adyen_on_fake(faults) as (fake, adapter),
        running_receiver(db_url, adyen_hmac_keys=[SECOND_KEY, HMAC_KEY_HEX]) as receiver,
    ):
        await fake.configure(webhook_url=receiver.adyen_url)
        relay = make_relay(db_url, adapter, provider="adyen", instance="confirm", max_attempts=3)
        inbox = applier(database, kinds=("adyen",))
        async with running(relay), anyio.create_task_group() as tg:
            tg.start_soon(inbox.run_forever)
            await wait_until(
                lambda: set(statuses(db_url)) == {"succeeded"}, "every intent succeeded"
            )
            await settle(fake, db_url)
            before = (intents(db_url), dict_rows(db_url, "SELECT * FROM outbox.ledger_entries"))
            # Every notification delivered once more, long after: nothing changes.
            resent = (await fake.control.post("/_fake/webhooks/resend", json={})).json()
            assert resent["resent"] > 0
            await settle(fake, db_url)
            after = (intents(db_url), dict_rows(db_url, "SELECT * FROM outbox.ledger_entries"))
            tg.cancel_scope.cancel()
        effects = await fake.effects()
        notes = await fake.notifications()
    assert before == after, "repeated confirmations changed nothing"
    done = intents(db_url)
    assert all(i["attempts"] == 1 for i in done), "an accepted call is never sent again"
    assert all(effects.get(i["idempotency_key"]) == 1 for i in done), effects
    assert sum(effects.values()) == len(done), "exactly one effect per intent at Adyen"
    assert payment(db_url, "p-cap")["state"] == "partially_refunded"
    assert (
        payment(db_url, "p-cap")["captured_minor"],
        payment(db_url, "p-cap")["refunded_minor"],
    ) == (1000, 300)
    assert payment(db_url, "p-void")["state"] == "voided"
    assert payment(db_url, "p-two")["state"] == "refunded"
    assert all(payment(db_url, p)["awaiting_action"] is None for p in ("p-cap", "p-void", "p-two"))
    assert_ledger_clean(db_url)
    # Every reference was a Luhn-valid 16-digit number: stored as sent, not redacted, and
    # the notifications were neither refused nor left unapplied.
    stored = inbox_rows(db_url)
    keys = {(n["pspReference"], n["eventCode"], n["success"]) for n in notes}
    assert len(stored) == len(keys), "one row per (pspReference, eventCode, success)"
    for row in stored:
        item = row["payload"]["notificationItems"][0]["NotificationRequestItem"]
        assert luhn_valid(item["pspReference"]) and item["pspReference"].isdigit()
        assert row["event_id"].startswith(item["pspReference"][:8] + ":")
        assert row["status"] == "applied", row
    results = " ".join(r["result"] for r in stored)
    assert "finished intent" in results


async def test_a_later_intent_waits_for_the_confirmation_and_nothing_is_booked_meanwhile(
    db_url: str, database: Database
) -> None:
    insert_intents(db_url, flow("p-wait", ("authorize", 1000), ("capture", 1000)))
    async with (
        adyen_on_fake(AdyenFaults(luhn_psp=True)) as (fake, adapter),
        running_receiver(db_url, adyen_hmac_keys=[HMAC_KEY_HEX]) as receiver,
    ):
        relay = make_relay(db_url, adapter, provider="adyen", instance="wait", max_attempts=3)
        async with running(relay):
            await wait_until(
                lambda: statuses(db_url) == ["succeeded", "awaiting_confirmation"],
                "the capture awaits its confirmation",
            )
            # Inserted after the capture went awaiting: pending, claimed, parked unsent;
            # a void after the unconfirmed capture waits the same way.
            insert_intents(db_url, flow("p-wait", ("refund", 400), ("void", None)))
            await wait_until(
                lambda: statuses(db_url)[2:] == ["blocked", "blocked"],
                "the refund and the void parked behind it",
            )
            await anyio.sleep(0.5)
        effects = await fake.effects()
        capture, refund, void = intents(db_url)[1:]
        assert (capture["attempts"], capture["amount_applied_minor"]) == (1, None)
        assert (refund["attempts"], refund["error_code"]) == (0, "awaiting_earlier_confirmation")
        assert refund["idempotency_key"] not in effects and void["idempotency_key"] not in effects
        assert effects[capture["idempotency_key"]] == 1
        paid = payment(db_url, "p-wait")
        assert (paid["state"], paid["captured_minor"]) == ("authorized", 0), "confirmed only"
        assert (paid["awaiting_action"], paid["awaiting_minor"]) == ("capture", 1000)
        kinds = dict_rows(db_url, "SELECT kind FROM outbox.ledger_transactions ORDER BY id")
        assert [k["kind"] for k in kinds] == ["authorize"]
        assert_ledger_clean(db_url)
        lease = dict_rows(
            db_url,
            "SELECT lease_token, claimed_by FROM outbox.payment_intents WHERE id = %s",
            capture["id"],
        )
        assert lease == [{"lease_token": None, "claimed_by": None}], "no lease while waiting"
        # The confirmation arrives: the capture is booked, the refund goes next (and waits
        # for its own confirmation), then the void finds a captured payment.
        await fake.configure(webhook_url=receiver.adyen_url)
        await resend(fake, eventCode="CAPTURE")
        inbox = applier(database, kinds=("adyen",))
        again = make_relay(db_url, adapter, provider="adyen", instance="wait-2", max_attempts=3)
        async with running(again), anyio.create_task_group() as tg:
            tg.start_soon(inbox.run_forever)
            await wait_until(
                lambda: statuses(db_url) == ["succeeded", "succeeded", "succeeded", "failed"],
                "capture, refund confirmed; the void refused",
            )
            tg.cancel_scope.cancel()
    capture, refund, void = intents(db_url)[1:]
    assert (refund["attempts"], void["attempts"], void["error_code"]) == (
        1,
        1,
        "payment_not_authorized",
    )
    paid = payment(db_url, "p-wait")
    assert (paid["state"], paid["captured_minor"], paid["refunded_minor"]) == (
        "partially_refunded",
        1000,
        400,
    )
    assert_ledger_clean(db_url)


async def _run_until_awaiting(
    db_url: str, adapter: AdyenAdapter, what: list[str], instance: str
) -> None:
    relay = make_relay(db_url, adapter, provider="adyen", instance=instance, max_attempts=3)
    async with running(relay):
        await wait_until(lambda: statuses(db_url) == what, f"intents {what}")


async def _apply_until_done(inbox: InboxApplier, db_url: str) -> None:
    async with anyio.create_task_group() as tg:
        tg.start_soon(inbox.run_forever)
        await wait_until(lambda: all_applied(db_url), "every notification applied")
        tg.cancel_scope.cancel()


async def resend(fake: AdyenFake, **match: str) -> None:
    response = await fake.control.post("/_fake/webhooks/resend", json=match)
    assert response.json()["resent"] >= 1, match


async def test_capture_failed_reverses_exactly_what_the_capture_booked(
    db_url: str, database: Database
) -> None:
    insert_intents(db_url, flow("p-cf", ("authorize", 1000), ("capture", 700)))
    async with (
        adyen_on_fake(AdyenFaults(luhn_psp=True)) as (fake, adapter),
        running_receiver(db_url, adyen_hmac_keys=[HMAC_KEY_HEX]) as receiver,
    ):
        await fake.configure(webhook_url=receiver.adyen_url)
        relay = make_relay(db_url, adapter, provider="adyen", instance="cf", max_attempts=3)
        inbox = applier(database, kinds=("adyen",))
        async with running(relay):
            await wait_until(lambda: statuses(db_url) == ["succeeded", "awaiting_confirmation"])
            await _apply_until_done(inbox, db_url)
        assert statuses(db_url) == ["succeeded", "succeeded"]
        capture = intents(db_url)[1]
        booked = dict_rows(
            db_url,
            "SELECT e.account, e.amount_minor FROM outbox.ledger_entries AS e"
            " JOIN outbox.ledger_transactions AS t ON t.id = e.transaction_id"
            " WHERE t.intent_id = %s ORDER BY e.id",
            capture["id"],
        )
        assert booked, "the confirmed capture is booked"
        failed = await fake.control.post(
            "/_fake/dashboard",
            json={
                "psp": payment(db_url, "p-cf")["provider_reference"],
                "event": "CAPTURE_FAILED",
                "modification": capture["provider_reference"],
            },
        )
        assert failed.status_code == 200
        await wait_until(lambda: delivered(fake), "the fake delivered every notification")
        await _apply_until_done(inbox, db_url)
        await resend(fake, eventCode="CAPTURE_FAILED")  # a duplicate, long after
        await resend(fake, eventCode="CAPTURE")  # and the CAPTURE again
        await wait_until(lambda: delivered(fake), "the fake delivered every notification")
        await _apply_until_done(inbox, db_url)
    reversal = dict_rows(
        db_url,
        "SELECT e.account, e.amount_minor FROM outbox.ledger_entries AS e"
        " JOIN outbox.ledger_transactions AS t ON t.id = e.transaction_id"
        " WHERE t.kind = 'capture_reversal' ORDER BY e.id",
    )
    assert reversal == [{**e, "amount_minor": -e["amount_minor"]} for e in booked]
    paid = payment(db_url, "p-cf")
    assert (paid["state"], paid["authorized_minor"], paid["captured_minor"]) == (
        "authorized",
        1000,
        0,
    )
    events = dict_rows(
        db_url, "SELECT event_type FROM outbox.events WHERE payment_id = 'p-cf' ORDER BY id"
    )
    assert [e["event_type"] for e in events].count("payment.capture.reversed") == 1
    assert_ledger_clean(db_url)


async def test_capture_failed_before_its_capture_fails_the_intent_and_the_late_capture_changes_nothing(
    db_url: str, database: Database
) -> None:
    insert_intents(db_url, flow("p-cf2", ("authorize", 1000), ("capture", 1000)))
    async with (
        adyen_on_fake(AdyenFaults(luhn_psp=True)) as (fake, adapter),
        running_receiver(db_url, adyen_hmac_keys=[HMAC_KEY_HEX]) as receiver,
    ):
        # No webhook target yet: the notifications are held at the fake.
        await _run_until_awaiting(db_url, adapter, ["succeeded", "awaiting_confirmation"], "cf2")
        capture = intents(db_url)[1]
        held = await fake.control.post(
            "/_fake/dashboard",
            json={
                "psp": payment(db_url, "p-cf2")["provider_reference"],
                "event": "CAPTURE_FAILED",
                "modification": capture["provider_reference"],
            },
        )
        assert held.status_code == 200
        await fake.configure(webhook_url=receiver.adyen_url)
        inbox = applier(database, kinds=("adyen",))
        await resend(fake, eventCode="CAPTURE_FAILED")
        await wait_until(lambda: stored(db_url, 1), "CAPTURE_FAILED stored")
        await _apply_until_done(inbox, db_url)
        await resend(fake, eventCode="CAPTURE")
        await wait_until(lambda: len(inbox_rows(db_url)) == 2, "the late CAPTURE stored")
        await _apply_until_done(inbox, db_url)
    (capture,) = [i for i in intents(db_url) if i["action"] == "capture"]
    assert (capture["status"], capture["error_code"]) == ("failed", "capture_failed")
    paid = payment(db_url, "p-cf2")
    assert (paid["state"], paid["captured_minor"], paid["awaiting_action"]) == (
        "authorized",
        0,
        None,
    )
    late = [r for r in inbox_rows(db_url) if r["event_type"] == "CAPTURE"]
    assert "already failed" in late[0]["result"] and "nothing changed" in late[0]["result"]
    kinds = dict_rows(db_url, "SELECT kind FROM outbox.ledger_transactions ORDER BY id")
    assert [k["kind"] for k in kinds] == ["authorize"], "nothing was ever booked for it"
    assert_ledger_clean(db_url)


async def test_a_missing_confirmation_opens_an_exception_and_a_late_one_settles_it_once(
    db_url: str, database: Database
) -> None:
    insert_intents(db_url, flow("p-late", ("authorize", 1000), ("capture", 1000)))
    async with (
        adyen_on_fake(AdyenFaults(luhn_psp=True)) as (fake, adapter),
        running_receiver(db_url, adyen_hmac_keys=[HMAC_KEY_HEX]) as receiver,
    ):
        await _run_until_awaiting(db_url, adapter, ["succeeded", "awaiting_confirmation"], "late")
        inbox = applier(database, kinds=("adyen",), confirmation_deadline_seconds=3600)
        capture = intents(db_url)[1]
        sample = await DepthSampler(database, providers=["adyen"]).sample()
        assert sample.awaiting == {"adyen": 1}, "visible as a gauge while it waits"
        assert (
            REGISTRY.get_sample_value("outbox_relay_awaiting_confirmation", {"provider": "adyen"})
            == 1
        )
        assert await inbox.sweep_overdue() == [], "not overdue before the deadline"
        later = datetime.now(UTC) + timedelta(seconds=3601)
        opened = await inbox.sweep_overdue(now=later)
        assert len(opened) == 1
        assert await inbox.sweep_overdue(now=later) == [], "opened once"
        (exception,) = list_exceptions(db_url, statuses=["open"], kind="confirmation_overdue")
        assert exception["id"] == opened[0]
        shown = await anyio.to_thread.run_sync(
            lambda: run_cli(
                "exceptions", "list", "--kind", "confirmation_overdue",
                env={"RELAY_DATABASE_URL": db_url},
            )
        )  # fmt: skip
        assert shown.returncode == 0 and "confirmation_overdue" in shown.stdout, shown
        assert exception["payment_id"] == "p-late" and exception["internal_amount_minor"] == 1000
        assert f"intent {capture['id']}" in exception["detail"]
        # The confirmation arrives late, twice.
        await fake.configure(webhook_url=receiver.adyen_url)
        await resend(fake, eventCode="CAPTURE")
        await wait_until(lambda: delivered_times(fake, "CAPTURE", 1), "delivered")
        await resend(fake, eventCode="CAPTURE")
        await wait_until(lambda: delivered_times(fake, "CAPTURE", 2), "delivered again")
        await _apply_until_done(inbox, db_url)
        assert await inbox.sweep_overdue(now=later + timedelta(days=1)) == []
    assert statuses(db_url) == ["succeeded", "succeeded"]
    (resolved,) = list_exceptions(db_url, statuses=None, kind="confirmation_overdue")
    assert (resolved["status"], resolved["resolution"]) == ("resolved", "confirmed_late")
    (row,) = inbox_rows(db_url)
    assert f"exception {resolved['id']} resolved" in row["result"]
    paid = payment(db_url, "p-late")
    assert (paid["state"], paid["captured_minor"]) == ("captured", 1000)
    kinds = dict_rows(db_url, "SELECT kind FROM outbox.ledger_transactions ORDER BY id")
    assert [k["kind"] for k in kinds] == ["authorize", "capture"], "booked once"
    assert_ledger_clean(db_url)


async def test_chargebacks_and_an_expired_authorisation_map_to_state_ledger_and_events(
    db_url: str, database: Database
) -> None:
    insert_intents(db_url, [*flow("p-cb", ("charge", 2000)), *flow("p-exp", ("authorize", 900))])
    async with (
        adyen_on_fake(AdyenFaults(luhn_psp=True)) as (fake, adapter),
        running_receiver(db_url, adyen_hmac_keys=[HMAC_KEY_HEX]) as receiver,
    ):
        await fake.configure(webhook_url=receiver.adyen_url)
        await _run_until_awaiting(db_url, adapter, ["succeeded", "succeeded"], "cb")
        inbox = applier(database, kinds=("adyen",))
        await wait_until(lambda: delivered(fake), "the fake delivered every notification")
        await _apply_until_done(inbox, db_url)
        charged = payment(db_url, "p-cb")["provider_reference"]
        for event in ("NOTIFICATION_OF_CHARGEBACK", "CHARGEBACK"):
            answer = await fake.control.post(
                "/_fake/dashboard", json={"psp": charged, "event": event, "amount": 2000}
            )
            assert answer.status_code == 200
            await wait_until(lambda: delivered(fake), "the fake delivered every notification")
            await _apply_until_done(inbox, db_url)
            if event == "CHARGEBACK":
                disputed = payment(db_url, "p-cb")
                assert (disputed["disputed_minor"], disputed["dispute_status"]) == (2000, "open")
                assert_ledger_clean(db_url)
        await fake.control.post(
            "/_fake/dashboard",
            json={"psp": charged, "event": "CHARGEBACK_REVERSED", "amount": 2000},
        )
        await fake.control.post(
            "/_fake/dashboard",
            json={"psp": payment(db_url, "p-exp")["provider_reference"], "event": "EXPIRE"},
        )
        await wait_until(lambda: delivered(fake), "the fake delivered every notification")
        await _apply_until_done(inbox, db_url)
        await resend(fake, eventCode="CHARGEBACK")  # an old one again: nothing changes
        await wait_until(lambda: delivered(fake), "the fake delivered every notification")
        await _apply_until_done(inbox, db_url)
    won = payment(db_url, "p-cb")
    assert (won["disputed_minor"], won["dispute_status"], won["state"]) == (0, "won", "captured")
    kinds = dict_rows(
        db_url, "SELECT kind FROM outbox.ledger_transactions WHERE payment_id = 'p-cb' ORDER BY id"
    )
    assert [k["kind"] for k in kinds] == ["charge", "dispute", "dispute_reversal"]
    assert payment(db_url, "p-exp")["state"] == "voided"
    events = [
        e["event_type"]
        for e in dict_rows(db_url, "SELECT event_type FROM outbox.events ORDER BY id")
    ]
    assert events.count("payment.dispute.opened") == 2  # the notice, then the chargeback
    assert events.count("payment.dispute.won") == 1
    assert events.count("payment.authorization.ended") == 1
    disputes = list_exceptions(db_url, statuses=None, kind="dispute")
    assert len(disputes) == 1
    assert_ledger_clean(db_url)


async def test_a_pending_authorisation_is_confirmed_by_its_authorisation_notification(
    db_url: str, database: Database
) -> None:
    insert_intents(
        db_url,
        [
            {
                "payment_id": "p-pend",
                "provider": "adyen",
                "action": "authorize",
                "amount_minor": 1200,
                "currency": "EUR",
                "payment_method": "adyen_pending",
            }
        ],
    )
    async with (
        adyen_on_fake(AdyenFaults(luhn_psp=True)) as (fake, adapter),
        running_receiver(db_url, adyen_hmac_keys=[HMAC_KEY_HEX]) as receiver,
    ):
        await _run_until_awaiting(db_url, adapter, ["awaiting_confirmation"], "pend")
        (intent,) = intents(db_url)
        psp = intent["provider_reference"]
        assert payment(db_url, "p-pend")["provider_reference"] == psp
        # The fake's own AUTHORISATION, then the same again built here: stored once.
        await fake.configure(webhook_url=receiver.adyen_url)
        await resend(fake, eventCode="AUTHORISATION")
        await wait_until(lambda: stored(db_url, 1), "the fake's AUTHORISATION stored")
        await post_item(receiver, authorisation(psp, "p-pend", 1200, success=True))
        await _apply_until_done(applier(database, kinds=("adyen",)), db_url)
        assert (await fake.effects()) == {intent["idempotency_key"]: 1}
    assert statuses(db_url) == ["succeeded"]
    paid = payment(db_url, "p-pend")
    assert (paid["state"], paid["authorized_minor"], paid["awaiting_action"]) == (
        "authorized",
        1200,
        None,
    )
    assert len(inbox_rows(db_url)) == 1, "the duplicate was acknowledged, not stored"
    assert_ledger_clean(db_url)


def authorisation(psp: str, reference: str, value: int, *, success: bool) -> dict[str, Any]:
    item: dict[str, Any] = {
        "pspReference": psp,
        "merchantAccountCode": "OutboxRelayTest",
        "merchantReference": reference,
        "amount": {"value": value, "currency": "EUR"},
        "eventCode": "AUTHORISATION",
        "success": "true" if success else "false",
        "eventDate": "2026-12-07T12:00:00+01:00",
        "reason": "",
    }
    item["additionalData"] = {"hmacSignature": sign_item(item, bytes.fromhex(HMAC_KEY_HEX))}
    return item


async def post_item(receiver: Receiver, *items: dict[str, Any]) -> httpx.Response:
    body = {"live": "false", "notificationItems": [{"NotificationRequestItem": i} for i in items]}
    async with httpx.AsyncClient() as client:
        answer = await client.post(receiver.adyen_url, content=json.dumps(body))
    assert (answer.status_code, answer.text) == (200, "[accepted]"), answer.text
    return answer


async def test_a_luhn_valid_reference_is_stored_as_sent_and_a_bad_item_refuses_the_delivery(
    db_url: str,
) -> None:
    psp = "4111111111111111"  # 16 digits passing the Luhn check, like ~1 in 10 of Adyen's
    assert luhn_valid(psp)
    async with running_receiver(db_url, adyen_hmac_keys=[HMAC_KEY_HEX]) as receiver:
        good = authorisation(psp, "p-x", 100, success=False)
        good["reason"] = "refused for card 4242 4242 4242 4242"  # unsigned, still a card
        other = authorisation("8813012345678901", "p-y", 100, success=True)
        bad = {
            **other,
            "additionalData": {"hmacSignature": good["additionalData"]["hmacSignature"]},
        }
        async with httpx.AsyncClient() as client:
            refused = await client.post(
                receiver.adyen_url,
                content=json.dumps(
                    {
                        "live": "false",
                        "notificationItems": [
                            {"NotificationRequestItem": good},
                            {"NotificationRequestItem": bad},
                        ],
                    }
                ),
            )
        assert refused.status_code == 400 and "item 2 of 2" in refused.text
        assert inbox_rows(db_url) == [], "nothing of a refused delivery is stored"
        await post_item(receiver, good, other)
    stored = inbox_rows(db_url)
    assert [r["event_id"] for r in stored] == [
        "41111111:11111111:AUTHORISATION:false",
        "88130123:45678901:AUTHORISATION:true",
    ]
    item = stored[0]["payload"]["notificationItems"][0]["NotificationRequestItem"]
    assert item["pspReference"] == psp, "an Adyen reference is not redacted"
    assert "4242" not in item["reason"], "any other field holding a card number still is"


# -- Stripe's pending refund: the same path --------------------------------------------------


async def test_a_stripe_refund_pending_awaits_its_confirmation_then_settles_once(
    db_url: str, database: Database, fake: FakeServer, adapter: StripeAdapter
) -> None:
    insert_intents(
        db_url,
        [
            {"payment_id": "p-sr", "action": "charge", "amount_minor": 1000,
             "payment_method": "pm_card_visa"},
            {"payment_id": "p-sr", "action": "refund", "amount_minor": 400},
            {"payment_id": "p-sr", "action": "refund", "amount_minor": 100},
        ],
    )  # fmt: skip
    async with running_receiver(db_url) as receiver:
        await fake.control.post(
            "/_fake/webhooks/config",
            json={"url": receiver.stripe_url, "secret": SECRET, "duplicates": 2},
        )
        await fake.control.post("/_fake/dashboard/refund/settle", json={"pending": "true"})
        relay = make_relay(db_url, adapter, instance="stripe-pending")
        inbox = applier(database, kinds=("stripe",))
        async with running(relay), anyio.create_task_group() as tg:
            tg.start_soon(inbox.run_forever)
            await wait_until(
                lambda: statuses(db_url) == ["succeeded", "awaiting_confirmation", "blocked"],
                "the first refund awaits Stripe's confirmation",
            )
            first = intents(db_url)[1]
            waiting = payment(db_url, "p-sr")
            assert (waiting["refunded_minor"], waiting["awaiting_action"]) == (0, "refund")
            assert waiting["awaiting_minor"] == 400
            settled = await fake.control.post(
                "/_fake/dashboard/refund/settle",
                json={"refund": first["provider_reference"], "status": "succeeded"},
            )
            assert settled.status_code == 200
            await wait_until(
                lambda: statuses(db_url) == ["succeeded", "succeeded", "awaiting_confirmation"],
                "the first refund confirmed, the second sent and awaiting",
            )
            second = intents(db_url)[2]
            await fake.control.post(
                "/_fake/dashboard/refund/settle",
                json={"refund": second["provider_reference"], "status": "failed"},
            )
            await wait_until(
                lambda: statuses(db_url) == ["succeeded", "succeeded", "failed"],
                "the second refund failed",
            )
            await wait_until(lambda: all_applied(db_url), "every notification applied")
            tg.cancel_scope.cancel()
    done = intents(db_url)
    assert [i["attempts"] for i in done] == [1, 1, 1], "an accepted refund is never re-sent"
    assert done[2]["error_code"] == "refund_failed"
    paid = payment(db_url, "p-sr")
    assert (paid["state"], paid["refunded_minor"], paid["awaiting_action"]) == (
        "partially_refunded",
        400,
        None,
    )
    kinds = dict_rows(db_url, "SELECT kind FROM outbox.ledger_transactions ORDER BY id")
    assert [k["kind"] for k in kinds] == ["charge", "refund"], "confirmed money only, once"
    assert_ledger_clean(db_url)
