"""The webhook receiver: verify against the raw body, store once, answer 2xx only after
the commit; every refusal is a 4xx by reason, counted, and stores nothing.

* the fake's signing (written from PROVIDERS.md's algorithm) and Stripe's SDK agree on a
  fixed test vector, and the SDK accepts Stripe's documented header format (several v1
  values, a v0 value) from the fake;
* signature cases: valid, wrong secret, tampered body, stale timestamp, a second active
  secret, no header: the right status code and nothing stored when refused;
* a duplicate event id is acknowledged 200 and stored once; an unknown route is 404, an
  oversized body 413, malformed JSON, deep JSON and invalid UTF-8 400 (the receiver keeps
  serving); a card number in a free-text field is stored redacted.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from typing import Any

import httpx
import psycopg
import pytest
import stripe

from provider_adapters.base import NotificationRejected
from provider_adapters.fake.webhooks import sign, signature_header
from provider_adapters.stripe_webhooks import StripeNotifications
from tests.scrape import Scrape
from tests.support.webhooks import SECRET, inbox_rows, running_receiver

# -- the signature, without a server ----------------------------------------------------------

# PROVIDERS.md: HMAC-SHA256 of "<t>.<raw body>", keyed by the secret's UTF-8 bytes including
# its whsec_ prefix, hex digest. This vector was computed once with Stripe's SDK
# (stripe.WebhookSignature._compute_signature) and is fixed here, so a change of either
# implementation shows.
VECTOR_SECRET = "whsec_test_secret"
VECTOR_TIMESTAMP = 1700000000
VECTOR_BODY = '{"id":"evt_test","object":"event","type":"payment_intent.succeeded"}'
VECTOR_SIGNATURE = "f457ee3d89f52f9f02936e1cd1173dd5dfa132cdc78ec55ea964a53098c5a1c0"


def event_body(event_id: str = "evt_1", event_type: str = "customer.created", **extra: Any) -> str:
    body = {
        "id": event_id,
        "object": "event",
        "type": event_type,
        "created": int(time.time()),
        "data": {"object": {"id": "cus_1", "object": "customer", **extra}},
    }
    return json.dumps(body)


def test_the_fakes_signature_is_stripes_on_a_fixed_vector() -> None:
    signed = f"{VECTOR_TIMESTAMP}.{VECTOR_BODY}"
    ours = sign(signed, VECTOR_SECRET)
    sdk = stripe.WebhookSignature._compute_signature(signed, VECTOR_SECRET)
    assert ours == sdk
    assert ours == VECTOR_SIGNATURE


def test_stripes_documented_header_format_verifies() -> None:
    """`t=...,v1=...,v1=...,v0=...`: any one matching v1 passes, v0 is ignored."""
    body = event_body()
    now = int(time.time())
    header = (
        f"t={now},v1={sign(f'{now}.{body}', 'whsec_old_secret')},"
        f"v1={sign(f'{now}.{body}', SECRET)},v0=6ffbb59b2300aae63f272406069a9788598b792a"
    )
    verified = StripeNotifications("stripe", [SECRET]).verify(
        body.encode(), {"Stripe-Signature": header}
    )
    assert (verified.event_id, verified.event_type) == ("evt_1", "customer.created")


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("wrong_secret", "bad_signature"),
        ("tampered", "bad_signature"),
        ("stale", "stale_timestamp"),
        ("no_header", "missing_signature"),
        ("garbage_header", "bad_signature"),
    ],
)
def test_refused_signatures_name_their_reason(case: str, reason: str) -> None:
    body = event_body()
    now = int(time.time())
    headers = {
        "wrong_secret": {"Stripe-Signature": signature_header(body, "whsec_other", now)},
        "tampered": {"Stripe-Signature": signature_header(body, SECRET, now)},
        "stale": {"Stripe-Signature": signature_header(body, SECRET, now - 301)},
        "no_header": {},
        "garbage_header": {"Stripe-Signature": "t=abc,v1"},
    }[case]
    raw = body.replace("customer.created", "customer.deleted") if case == "tampered" else body
    with pytest.raises(NotificationRejected) as refused:
        StripeNotifications("stripe", [SECRET]).verify(raw.encode(), headers)
    assert refused.value.reason == reason


def test_a_second_active_secret_verifies_while_the_first_is_rolled() -> None:
    body = event_body()
    header = signature_header(body, "whsec_new_secret", int(time.time()))
    reader = StripeNotifications("stripe", [SECRET, "whsec_new_secret"])
    assert reader.verify(body.encode(), {"Stripe-Signature": header}).event_id == "evt_1"
    with pytest.raises(NotificationRejected):
        StripeNotifications("stripe", [SECRET]).verify(body.encode(), {"Stripe-Signature": header})


# -- the receiver, with a database ------------------------------------------------------------


def signed(body: str | bytes, secret: str = SECRET, *, at: int | None = None) -> dict[str, str]:
    when = int(time.time()) if at is None else at
    raw = body if isinstance(body, bytes) else body.encode()
    # Over the raw bytes, so that a body that is not UTF-8 still carries a valid signature.
    digest = hmac.new(secret.encode(), f"{when}.".encode() + raw, hashlib.sha256).hexdigest()
    return {"Stripe-Signature": f"t={when},v1={digest}", "Content-Type": "application/json"}


def rejected(metrics_text: str, reason: str) -> float:
    return Scrape(metrics_text).total("outbox_relay_webhooks_rejected_total", reason=reason)


@pytest.mark.integration
@pytest.mark.anyio
async def test_signature_cases_answer_by_status_and_store_only_the_valid(db_url: str) -> None:
    async with running_receiver(db_url) as server, httpx.AsyncClient() as client:
        before = (await client.get(server.url + "/metrics")).text
        now = int(time.time())
        valid = event_body("evt_valid")
        cases = [
            ("valid", valid, signed(valid), 200),
            ("wrong secret", event_body("evt_w"), signed(event_body("evt_w"), "whsec_x"), 400),
            ("tampered", event_body("evt_t", note="b"), signed(event_body("evt_t", note="a")), 400),
            ("stale", event_body("evt_s"), signed(event_body("evt_s"), at=now - 3600), 400),
            ("no header", event_body("evt_n"), {"Content-Type": "application/json"}, 400),
        ]
        for name, body, headers, status in cases:
            answer = await client.post(server.stripe_url, content=body, headers=headers)
            assert answer.status_code == status, name
        after = (await client.get(server.url + "/metrics")).text
    assert [r["event_id"] for r in inbox_rows(db_url)] == ["evt_valid"]
    assert rejected(after, "bad_signature") - rejected(before, "bad_signature") == 2
    assert rejected(after, "stale_timestamp") - rejected(before, "stale_timestamp") == 1
    assert rejected(after, "missing_signature") - rejected(before, "missing_signature") == 1


@pytest.mark.integration
@pytest.mark.anyio
async def test_a_second_active_secret_is_accepted_by_the_receiver(db_url: str) -> None:
    async with (
        running_receiver(db_url, [SECRET, "whsec_rolled_in"]) as server,
        httpx.AsyncClient() as client,
    ):
        body = event_body("evt_rolled")
        answer = await client.post(
            server.stripe_url, content=body, headers=signed(body, "whsec_rolled_in")
        )
    assert answer.status_code == 200
    assert [r["event_id"] for r in inbox_rows(db_url)] == ["evt_rolled"]


@pytest.mark.integration
@pytest.mark.anyio
async def test_a_duplicate_is_acknowledged_and_stored_once(db_url: str) -> None:
    async with running_receiver(db_url) as server, httpx.AsyncClient() as client:
        body = event_body("evt_dup")
        answers = [
            await client.post(server.stripe_url, content=body, headers=signed(body))
            for _ in range(3)
        ]
        metrics_text = (await client.get(server.url + "/metrics")).text
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert [a.json().get("duplicate", False) for a in answers] == [False, True, True]
    assert len(inbox_rows(db_url)) == 1
    assert Scrape(metrics_text).total("outbox_relay_webhooks_duplicates_total") >= 2


@pytest.mark.integration
@pytest.mark.anyio
async def test_hostile_bodies_are_refused_and_the_receiver_keeps_serving(db_url: str) -> None:
    deep = '{"id":"evt_deep","type":"x","created":1,"data":' + "[" * 5000 + "]" * 5000 + "}"
    nul = event_body("evt_nul").replace('"cus_1"', '"cus\\u0000"')
    cases: list[tuple[str, str, bytes, dict[str, str], int]] = [
        ("unknown route", "/webhooks/adyen", b"{}", signed("{}"), 404),
        ("not a webhook path", "/admin", b"{}", {}, 404),
        ("oversized", "/webhooks/stripe", b"{" + b" " * 300_000 + b"}", signed("{}"), 413),
        ("malformed JSON", "/webhooks/stripe", b'{"id": "evt_', signed('{"id": "evt_'), 400),
        ("deep JSON", "/webhooks/stripe", deep.encode(), signed(deep), 400),
        (
            "invalid UTF-8",
            "/webhooks/stripe",
            b'{"id":"\xff\xfe"}',
            signed(b'{"id":"\xff\xfe"}'),
            400,
        ),
        ("not an event", "/webhooks/stripe", b"[1, 2]", signed("[1, 2]"), 400),
        ("NUL escape", "/webhooks/stripe", nul.encode(), signed(nul), 400),
    ]
    async with running_receiver(db_url) as server, httpx.AsyncClient() as client:
        for name, path, body, headers, status in cases:
            answer = await client.post(server.url + path, content=body, headers=headers)
            assert answer.status_code == status, name
            assert "error" in answer.json(), name
        metrics_text = (await client.get(server.url + "/metrics")).text
        # still serving after all of it
        fine = event_body("evt_after")
        answer = await client.post(server.stripe_url, content=fine, headers=signed(fine))
        assert answer.status_code == 200
    assert [r["event_id"] for r in inbox_rows(db_url)] == ["evt_after"]
    for reason in ("too_large", "malformed_json", "too_deep", "invalid_utf8", "unstorable"):
        assert rejected(metrics_text, reason) >= 1, reason


@pytest.mark.integration
@pytest.mark.anyio
async def test_a_card_number_in_free_text_is_stored_redacted(db_url: str) -> None:
    body = event_body(
        "evt_card",
        description="customer wrote 4242 4242 4242 4242 in the note",
        metadata={"memo": "4000-0566-5566-5556", "order": "order-1764747123:00042"},
    )
    async with running_receiver(db_url) as server, httpx.AsyncClient() as client:
        answer = await client.post(server.stripe_url, content=body, headers=signed(body))
    assert answer.status_code == 200
    (row,) = inbox_rows(db_url)
    stored = row["payload"]["data"]["object"]
    assert stored["description"] == "[card number redacted]"
    assert stored["metadata"] == {
        "memo": "[card number redacted]",
        "order": "order-1764747123:00042",
    }
    with psycopg.connect(db_url) as conn:
        text = conn.execute("SELECT payload::text FROM outbox.webhook_inbox").fetchone()
    assert text is not None and "4242" not in text[0] and "5556" not in text[0]
