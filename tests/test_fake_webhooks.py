"""The fake provider's webhooks and the notification reader's facts.

* the fault switch signs every attempt with a wrong secret: the receiver refuses each one
  (400, counted), the fake keeps retrying with backoff, and once the switch is off the next
  retry is stored, once;
* a configured delay holds the first attempt back;
* StripeNotifications.read turns each handled event type into its fact (and anything else
  into Unhandled), and settle reads a PaymentIntent exactly as the adapter's lookup does;
* webhook settings: secrets from a file, one per line, and a missing file named.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from provider_adapters.base import (
    Action,
    CaptureReported,
    Command,
    Declined,
    DisputeClosed,
    DisputeOpened,
    PaymentSettled,
    RefundsReported,
    ReportedRefund,
    Retryable,
    Succeeded,
    Unhandled,
)
from provider_adapters.fake.webhooks import _event_id
from provider_adapters.stripe import payment_intent_outcome
from provider_adapters.stripe_webhooks import StripeNotifications
from relay.infra.config import ConfigError, load_settings
from tests.scrape import Scrape
from tests.support.fake_server import API_KEY, FakeServer
from tests.support.waiting import wait_until
from tests.support.webhooks import SECRET, inbox_rows, running_receiver


async def _charge(fake: FakeServer) -> None:
    answer = await fake.control.post(
        "/v1/payment_intents",
        data={
            "amount": "900",
            "currency": "eur",
            "payment_method": "pm_card_visa",
            "confirm": "true",
        },
        headers={"Authorization": f"Bearer {API_KEY}"},
    )
    assert answer.status_code == 200


async def _log(fake: FakeServer) -> dict[str, Any]:
    body: dict[str, Any] = (await fake.control.get("/_fake/webhooks")).json()
    return body


@pytest.mark.integration
@pytest.mark.anyio
async def test_bad_signature_switch_is_refused_then_retried_until_stored(
    db_url: str, fake: FakeServer
) -> None:
    async with running_receiver(db_url) as receiver:
        config = {
            "url": receiver.stripe_url,
            "secret": SECRET,
            "bad_signature_rate": 1.0,
            "retry_base_ms": 50,
            "retry_cap_ms": 200,
        }
        await fake.control.post("/_fake/webhooks/config", json=config)
        await _charge(fake)

        async def refused_thrice() -> bool:
            events = (await _log(fake))["events"]
            return any(e["statuses"].count(400) >= 3 for e in events.values())

        await wait_until(refused_thrice, "three refused attempts")
        assert inbox_rows(db_url) == []
        await fake.control.post(
            "/_fake/webhooks/config", json={**config, "bad_signature_rate": 0.0}
        )

        async def stored() -> bool:
            return (await _log(fake))["pending"] == 0 and len(inbox_rows(db_url)) == 1

        await wait_until(stored, "the retry stored once the switch is off")
        (event,) = (await _log(fake))["events"].values()
        assert event["statuses"][-1] == 200 and set(event["statuses"][:-1]) == {400}
        async with httpx.AsyncClient() as client:
            metrics = Scrape((await client.get(receiver.url + "/metrics")).text)
        assert metrics.total("outbox_relay_webhooks_rejected_total", reason="bad_signature") >= 3


@pytest.mark.integration
@pytest.mark.anyio
async def test_a_delay_holds_the_first_attempt_back(db_url: str, fake: FakeServer) -> None:
    async with running_receiver(db_url) as receiver:
        await fake.control.post(
            "/_fake/webhooks/config",
            json={"url": receiver.stripe_url, "secret": SECRET, "delay_ms": 1500},
        )
        sent_at = time.monotonic()
        await _charge(fake)
        assert (await _log(fake))["sent"] == 0, "nothing sent before the delay"
        await wait_until(lambda: inbox_rows(db_url), "the delayed delivery")
        assert time.monotonic() - sent_at >= 1.5


@pytest.mark.integration
@pytest.mark.anyio
async def test_the_fake_opens_and_closes_a_dispute_out_of_band(
    db_url: str, fake: FakeServer
) -> None:
    async with running_receiver(db_url) as receiver:
        await fake.control.post(
            "/_fake/webhooks/config", json={"url": receiver.stripe_url, "secret": SECRET}
        )
        answer = await fake.control.post(
            "/v1/payment_intents",
            data={
                "amount": "900",
                "currency": "eur",
                "payment_method": "pm_card_visa",
                "confirm": "true",
            },
            headers={"Authorization": f"Bearer {API_KEY}"},
        )
        reference = answer.json()["id"]
        opened = await fake.control.post(
            "/_fake/dashboard/dispute", json={"payment_intent": reference, "amount": 400}
        )
        assert opened.status_code == 200
        dispute = opened.json()["id"]
        refused = await fake.control.post(
            "/_fake/dashboard/dispute/close", json={"dispute": dispute, "status": "maybe"}
        )
        assert refused.status_code == 400 and "won or lost" in refused.text
        closed = await fake.control.post(
            "/_fake/dashboard/dispute/close", json={"dispute": dispute, "status": "won"}
        )
        assert closed.status_code == 200 and closed.json()["status"] == "won"
        again = await fake.control.post(
            "/_fake/dashboard/dispute/close", json={"dispute": dispute, "status": "lost"}
        )
        assert again.status_code == 400 and "already won" in again.text
        await wait_until(
            lambda: any(r["event_type"] == "charge.dispute.closed" for r in inbox_rows(db_url)),
            "the closed dispute delivered",
        )
    (row,) = [r for r in inbox_rows(db_url) if r["event_type"] == "charge.dispute.closed"]
    assert READER.read(row["payload"]) == DisputeClosed(
        reference, dispute, 400, "EUR", "fraudulent", "won"
    )


# -- facts, without a server ------------------------------------------------------------------

READER = StripeNotifications("stripe", [])


def _event(event_type: str, obj: dict[str, Any]) -> dict[str, Any]:
    return {"id": "evt_1", "type": event_type, "created": 1, "data": {"object": obj}}


PI = {
    "id": "pi_1x",
    "object": "payment_intent",
    "amount": 900,
    "amount_received": 900,
    "amount_capturable": 0,
    "currency": "eur",
    "status": "succeeded",
    "metadata": {"outbox_idempotency_key": "key-1"},
}


def test_read_turns_each_handled_type_into_its_fact() -> None:
    assert READER.read(_event("payment_intent.succeeded", PI)) == PaymentSettled(
        "pi_1x", "key-1", succeeded=True
    )
    assert READER.read(_event("payment_intent.payment_failed", PI)) == PaymentSettled(
        "pi_1x", "key-1", succeeded=False
    )
    charge = {
        "object": "charge",
        "payment_intent": "pi_1x",
        "currency": "eur",
        "amount_captured": 900,
        "amount_refunded": 300,
        "refunds": {
            "data": [
                {"id": "re_1", "amount": 200, "status": "succeeded", "metadata": {}},
                {
                    "id": "re_2",
                    "amount": 100,
                    "status": "succeeded",
                    "metadata": {"outbox_idempotency_key": "key-2"},
                },
                {"id": "re_3", "amount": 50, "status": "failed", "metadata": {}},
            ]
        },
    }
    assert READER.read(_event("charge.refunded", charge)) == RefundsReported(
        "pi_1x",
        "EUR",
        900,
        300,
        (ReportedRefund("re_1", 200, None), ReportedRefund("re_2", 100, "key-2")),
    )
    dispute = {
        "id": "dp_1",
        "object": "dispute",
        "payment_intent": "pi_1x",
        "amount": 900,
        "currency": "eur",
        "reason": "fraudulent",
    }
    assert READER.read(_event("charge.dispute.created", dispute)) == DisputeOpened(
        "pi_1x", "dp_1", 900, "EUR", "fraudulent"
    )
    captured = {"id": "ch_1", "object": "charge", "payment_intent": "pi_1x", "currency": "eur",
                "amount_captured": 700}  # fmt: skip
    assert READER.read(_event("charge.captured", captured)) == CaptureReported(
        "pi_1x", "ch_1", "EUR", 700
    )
    assert isinstance(
        READER.read(_event("charge.captured", {**captured, "amount_captured": None})), Unhandled
    )
    inquiry = {**dispute, "status": "warning_needs_response"}
    assert READER.read(_event("charge.dispute.created", inquiry)).inquiry  # type: ignore[union-attr]
    for status, outcome in (("won", "won"), ("lost", "lost"), ("warning_closed", "inquiry")):
        assert READER.read(
            _event("charge.dispute.closed", {**dispute, "status": status})
        ) == DisputeClosed("pi_1x", "dp_1", 900, "EUR", "fraudulent", outcome)
    assert isinstance(
        READER.read(_event("charge.dispute.closed", {**dispute, "status": "under_review"})),
        Unhandled,
    )
    assert isinstance(READER.read(_event("customer.created", {"id": "cus_1"})), Unhandled)
    assert isinstance(READER.read(_event("charge.refunded", {"object": "charge"})), Unhandled)
    assert isinstance(READER.read({"id": "evt_1", "type": "charge.refunded"}), Unhandled)


def _command(key: str = "key-1") -> Command:
    return Command(
        intent_id=1,
        payment_id="pay-1",
        action=Action.CHARGE,
        idempotency_key=key,
        amount_minor=900,
        currency="EUR",
        payment_method="pm_card_visa",
        exponent=2,
    )


def test_settle_reads_the_payment_intent_as_the_lookup_does() -> None:
    settled = READER.settle(_command(), _event("payment_intent.succeeded", PI))
    assert settled == payment_intent_outcome(_command(), PI)
    assert isinstance(settled, Succeeded) and settled.payment_reference == "pi_1x"
    failed_pi = {
        **PI,
        "status": "requires_payment_method",
        "amount_received": 0,
        "last_payment_error": {
            "code": "card_declined",
            "decline_code": "insufficient_funds",
            "message": "Your card has insufficient funds.",
        },
    }
    declined = READER.settle(_command(), _event("payment_intent.payment_failed", failed_pi))
    assert isinstance(declined, Declined) and declined.code == "insufficient_funds"
    # Another intent's key, or another amount: no outcome of this intent.
    assert isinstance(
        READER.settle(_command("key-9"), _event("payment_intent.succeeded", PI)), Retryable
    )
    other_amount = {**PI, "amount": 901, "amount_received": 901}
    assert not isinstance(
        READER.settle(_command(), _event("payment_intent.succeeded", other_amount)), Succeeded
    )


def test_webhook_secrets_come_from_a_file_one_per_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secrets = tmp_path / "secrets"
    secrets.write_text("whsec_new\n# rolled in on Monday\nwhsec_old\n\n")
    monkeypatch.setenv("RELAY_WEBHOOKS__STRIPE__SECRETS_FILE", str(secrets))
    settings = load_settings()
    assert settings.webhooks["stripe"].resolved_secrets() == ["whsec_new", "whsec_old"]
    monkeypatch.setenv("RELAY_WEBHOOKS__STRIPE__SECRETS_FILE", str(tmp_path / "missing"))
    with pytest.raises(ConfigError) as refused:
        load_settings()
    assert any(
        "RELAY_WEBHOOKS__STRIPE" in line and "missing" in line for line in refused.value.lines
    )


def test_settle_finds_our_refund_in_the_charge_by_its_key() -> None:
    command = Command(
        intent_id=2,
        payment_id="pay-1",
        action=Action.REFUND,
        idempotency_key="key-r",
        amount_minor=300,
        currency="EUR",
        payment_reference="pi_1x",
        exponent=2,
    )
    refund = {
        "id": "re_1x",
        "object": "refund",
        "amount": 300,
        "currency": "eur",
        "status": "succeeded",
        "payment_intent": "pi_1x",
        "metadata": {"outbox_idempotency_key": "key-r"},
    }
    charge = {"object": "charge", "payment_intent": "pi_1x", "refunds": {"data": [refund]}}
    settled = READER.settle(command, _event("charge.refunded", charge))
    assert isinstance(settled, Succeeded) and settled.provider_reference == "re_1x"
    others = {**charge, "refunds": {"data": [{**refund, "metadata": {}}]}}
    assert isinstance(READER.settle(command, _event("charge.refunded", others)), Retryable)


def test_the_apply_concurrency_is_validated_and_fits_the_pool(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = load_settings()
    assert settings.webhooks_apply_concurrency == 2
    # Pool 4: 1 for claims, 2 write-back writers, 1 apply.
    assert (
        settings.effective_completer_writers(),
        settings.effective_webhooks_apply_concurrency(),
    ) == (2, 1)
    monkeypatch.setenv("RELAY_DB_POOL_SIZE", "5")
    assert load_settings().effective_webhooks_apply_concurrency() == 2
    monkeypatch.setenv("RELAY_WEBHOOKS_APPLY_CONCURRENCY", "8")
    monkeypatch.setenv("RELAY_DB_POOL_SIZE", "12")
    assert load_settings().effective_webhooks_apply_concurrency() == 8
    for bad in ("0", "17", "two"):
        monkeypatch.setenv("RELAY_WEBHOOKS_APPLY_CONCURRENCY", bad)
        with pytest.raises(ConfigError) as refused:
            load_settings()
        assert any("RELAY_WEBHOOKS_APPLY_CONCURRENCY" in line for line in refused.value.lines)
    monkeypatch.setenv("RELAY_WEBHOOKS_APPLY_CONCURRENCY", "2")
    monkeypatch.setenv("RELAY_DB_POOL_SIZE", "2")
    with pytest.raises(ConfigError) as refused:
        load_settings()
    assert any(
        "RELAY_DB_POOL_SIZE (2) must be at least 3" in line for line in refused.value.lines
    ), refused.value.lines
    monkeypatch.setenv("RELAY_WEBHOOKS_APPLY", "false")
    assert load_settings().db_pool_size == 2  # a relay that applies nothing needs no room


def test_event_ids_look_like_stripe_ids_and_never_like_card_numbers() -> None:
    """The inbox refuses an event id holding 13 digits in a row that pass Luhn, as it
    should for a real provider's (Stripe's ids are 24 letters and digits). Hex ids put
    13 digits in a row in about one id in 90 and failed a CI run that way."""
    ids = [_event_id() for _ in range(5000)]
    assert all(re.fullmatch(r"evt_[A-Za-z0-9]{24}", i) for i in ids)
    assert not [i for i in ids if re.search(r"[0-9]{13}", i)]
    assert len(set(ids)) == len(ids)


def test_a_refund_finishing_settles_our_refund_awaiting_its_confirmation() -> None:
    """refund.updated / refund.failed carry the Refund: our key names the intent, and the
    refund is read as the adapter reads one (pending: still awaiting; failed: declined)."""
    refund = {
        "id": "re_9x",
        "object": "refund",
        "amount": 400,
        "currency": "eur",
        "payment_intent": "pi_1x",
        "status": "succeeded",
        "metadata": {"outbox_idempotency_key": "key-r"},
    }
    assert READER.read(_event("refund.updated", refund)) == PaymentSettled("pi_1x", "key-r", True)
    command = Command(
        intent_id=2, payment_id="pay-1", action=Action.REFUND, idempotency_key="key-r",
        amount_minor=400, currency="EUR", payment_reference="pi_1x", exponent=2,
    )  # fmt: skip
    assert READER.settle(command, _event("refund.updated", refund)) == Succeeded(
        "re_9x", "pi_1x", 400, "EUR"
    )
    failed = {**refund, "status": "failed"}
    assert READER.read(_event("refund.failed", failed)) == PaymentSettled("pi_1x", "key-r", False)
    declined = READER.settle(command, _event("refund.failed", failed))
    assert isinstance(declined, Declined) and declined.code == "refund_failed"
    pending = READER.settle(command, _event("refund.updated", {**refund, "status": "pending"}))
    assert not isinstance(pending, Succeeded | Declined), "pending is not an outcome yet"
    other = READER.settle(command, _event("refund.updated", {**refund, "metadata": {}}))
    assert isinstance(other, Retryable)
