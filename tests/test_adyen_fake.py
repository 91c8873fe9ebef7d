"""The fake Adyen Checkout API (provider_adapters/fake/adyen.py): conformance with Adyen's
published OpenAPI file, idempotency for 31 days, faults, and signed webhooks.

Conformance: every request the adapter sends and every reply the fake gives in these
tests is checked against tests/data/adyen_checkout_v71.json, the facts derived from
Adyen's CheckoutService-v71.json by scripts/adyen_schema_subset.py (field names, required
fields, JSON types, enumerations, status codes). A fake that drifts (a renamed field, a
status code the API does not answer, a resultCode Adyen does not define) fails here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from provider_adapters.adyen_webhooks import HmacKeys, verify_item
from provider_adapters.base import Action, Ambiguous, Declined, Invalid, Retryable, Succeeded
from provider_adapters.fake.adyen import (
    API_KEY,
    CARDS,
    HMAC_KEY_HEX,
    MERCHANT_ACCOUNT,
    AdyenFaults,
)
from tests.support.adyen import AdyenFake, adyen_on_fake, running_adyen_fake
from tests.support.commands import command
from tests.support.serving import serving

pytestmark = pytest.mark.anyio

SUBSET = json.loads(
    (Path(__file__).parent / "data" / "adyen_checkout_v71.json").read_text(encoding="utf-8")
)
_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "boolean": (bool,),
    "object": (dict,),
    "array": (list,),
    "number": (int, float),
}


def conforms(value: Any, shape: dict[str, Any], where: str) -> None:
    assert isinstance(value, dict), f"{where}: not an object"
    for name in shape.get("required", []):
        assert name in value, f"{where}: required {name} missing"
    properties = shape.get("properties", {})
    for name, item in value.items():
        assert name in properties, f"{where}: {name} is not a field of the API"
        rule = properties[name]
        allowed = _JSON_TYPES[rule["type"]]
        assert isinstance(item, allowed) and not (
            rule["type"] == "integer" and isinstance(item, bool)
        ), f"{where}.{name}: {type(item).__name__}, the API says {rule['type']}"
        if "enum" in rule:
            assert item in rule["enum"], f"{where}.{name}: {item!r} not in {rule['enum']}"
        if "properties" in rule:
            conforms(item, rule, f"{where}.{name}")


def operation_of(path: str) -> str:
    parts = path.strip("/").split("/")  # v71/payments[/psp/kind]
    return parts[3] if len(parts) == 4 else "payments"


async def post(fake: AdyenFake, path: str, body: dict[str, Any], key: str = "") -> httpx.Response:
    headers = {"X-API-Key": API_KEY}
    if key:
        headers["Idempotency-Key"] = key
    return await fake.control.post(f"/v71{path}", json=body, headers=headers)


def checked(response: httpx.Response, path: str) -> dict[str, Any]:
    """The reply, after checking its status and body against the published API."""
    operation = SUBSET["operations"][operation_of(f"/v71{path}")]
    body: dict[str, Any] = response.json()
    assert str(response.status_code) in operation["statuses"], response.status_code
    if response.status_code == operation["success"]:
        conforms(body, operation["reply"], operation_of(f"/v71{path}"))
    else:
        conforms(body, SUBSET["error"], "error")
    return body


def payment(amount: int = 1000, method: str = "stored_visa", **extra: Any) -> dict[str, Any]:
    return {
        "amount": {"value": amount, "currency": "EUR"},
        "merchantAccount": MERCHANT_ACCOUNT,
        "reference": "order-1",
        "returnUrl": "https://example.invalid/r",
        "paymentMethod": {"type": "scheme", "storedPaymentMethodId": method},
        **extra,
    }


def modification(amount: int | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"merchantAccount": MERCHANT_ACCOUNT}
    if amount is not None:
        body["amount"] = {"value": amount, "currency": "EUR"}
    return body


# -- conformance -------------------------------------------------------------------------


async def test_every_request_of_the_adapter_and_every_reply_of_the_fake_conform() -> None:
    async with adyen_on_fake() as (fake, adapter):
        pi = (await adapter.execute(command(Action.AUTHORIZE, "c-a"))).payment_reference  # type: ignore[union-attr]
        ch = (await adapter.execute(command(Action.CHARGE, "c-c"))).payment_reference  # type: ignore[union-attr]
        await adapter.execute(command(Action.CAPTURE, "c-cap", 400, reference=pi))
        await adapter.execute(command(Action.REFUND, "c-ref", 100, reference=ch))
        pi2 = (await adapter.execute(command(Action.AUTHORIZE, "c-a2"))).payment_reference  # type: ignore[union-attr]
        await adapter.execute(command(Action.VOID, "c-void", reference=pi2))
        await adapter.execute(command(Action.AUTHORIZE, "c-d", method="adyen_fraud"))
        assert {operation_of(p.path) for p in fake.seen} == {
            "payments",
            "captures",
            "refunds",
            "cancels",
        }
        for seen in fake.seen:
            operation = SUBSET["operations"][operation_of(seen.path)]
            body = json.loads(seen.body)
            for name in operation["request"]["required"]:
                assert name in body, f"{seen.path}: the adapter omits required {name}"
            unknown = set(body) - set(operation["request"]["fields"])
            assert not unknown, f"{seen.path}: fields the API does not have: {unknown}"
        # And the fake's own replies, including every card and the reversal.
        for method in sorted(CARDS):
            checked(await post(fake, "/payments", payment(method=method)), "/payments")
        psp = checked(await post(fake, "/payments", payment()), "/payments")["pspReference"]
        path = f"/payments/{psp}/reversals"
        checked(await post(fake, path, modification()), path)
        checked(await post(fake, "/payments/0000000000000000/captures", modification(5)), path)


async def test_the_fakes_errors_conform_and_name_the_rule() -> None:
    async with running_adyen_fake() as fake:
        unauthorised = await fake.control.post("/v71/payments", json=payment())
        assert unauthorised.status_code == 401
        assert checked(unauthorised, "/payments")["errorType"] == "security"
        no_return = {k: v for k, v in payment().items() if k != "returnUrl"}
        body = checked(await post(fake, "/payments", no_return), "/payments")
        assert (body["status"], body["errorType"]) == (422, "validation")
        assert "returnUrl" in body["message"]
        long_key = await post(fake, "/payments", payment(), key="k" * 65)
        assert long_key.status_code == 422 and "64" in checked(long_key, "/payments")["message"]


# -- idempotency -------------------------------------------------------------------------


async def test_a_key_replays_for_31_days_of_fake_time_then_runs_again() -> None:
    async with running_adyen_fake() as fake:
        first = checked(await post(fake, "/payments", payment(), key="k31"), "/payments")
        await fake.advance_days(31)
        again = checked(await post(fake, "/payments", payment(), key="k31"), "/payments")
        assert again == first
        assert await fake.effects() == {"k31": 1}
        await fake.advance_days(1)
        later = checked(await post(fake, "/payments", payment(), key="k31"), "/payments")
        assert later["pspReference"] != first["pspReference"]
        assert await fake.effects() == {"k31": 2}, "past the window the key is forgotten"


async def test_a_duplicate_while_the_first_runs_gets_422_704() -> None:
    import anyio

    async with running_adyen_fake(AdyenFaults(latency_ms=200)) as fake:
        replies: list[httpx.Response] = []

        async def one() -> None:
            replies.append(await post(fake, "/payments", payment(), key="busy"))

        async with anyio.create_task_group() as tg:
            tg.start_soon(one)
            await anyio.sleep(0.05)
            tg.start_soon(one)
        statuses = sorted(r.status_code for r in replies)
        assert statuses == [200, 422]
        busy = next(r for r in replies if r.status_code == 422)
        assert checked(busy, "/payments")["errorCode"] == "704"
        assert await fake.effects() == {"busy": 1}


async def test_a_reused_key_with_another_body_replays_unless_told_otherwise() -> None:
    async with running_adyen_fake() as fake:
        first = (await post(fake, "/payments", payment(1000), key="mm")).json()
        assert (await post(fake, "/payments", payment(2000), key="mm")).json() == first
        await fake.configure(mismatch_error=True)
        mismatch = await post(fake, "/payments", payment(2000), key="mm")
        assert mismatch.status_code == 422
        assert await fake.effects() == {"mm": 1}


# -- faults ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "status", "stored"),
    [("rate_429", 429, False), ("rate_503", 503, False), ("rate_500_after_effect", 500, True)],
)
async def test_faults_before_and_after_the_effect(setting: str, status: int, stored: bool) -> None:
    async with running_adyen_fake() as fake:
        await fake.configure(**{setting: 1.0})
        assert (await post(fake, "/payments", payment(), key="f")).status_code == status
        await fake.configure(**{setting: 0.0})
        again = await post(fake, "/payments", payment(), key="f")
        assert again.status_code == (status if stored else 200), "a 500 after effect replays"
        assert await fake.effects() == {"f": 1}


async def test_the_adapter_maps_each_fault() -> None:
    async with adyen_on_fake() as (fake, adapter):
        await fake.configure(rate_429=1.0)
        limited = await adapter.execute(command(Action.AUTHORIZE, "m-429"))
        assert isinstance(limited, Retryable) and limited.code == "rate_limited"
        await fake.configure(rate_429=0.0, rate_500_after_effect=1.0)
        error = await adapter.execute(command(Action.AUTHORIZE, "m-500"))
        assert isinstance(error, Ambiguous) and error.code == "provider_error"
        await fake.configure(rate_500_after_effect=0.0, rate_malformed_after_effect=1.0)
        malformed = await adapter.execute(command(Action.AUTHORIZE, "m-bad"))
        assert isinstance(malformed, Ambiguous) and malformed.code == "invalid_provider_reply"
        await fake.configure(rate_malformed_after_effect=0.0)
        # The malformed reply was stored after the effect? No: what is stored is the good
        # reply (the body was broken on the wire), so the same key settles it.
        assert isinstance(await adapter.execute(command(Action.AUTHORIZE, "m-bad")), Succeeded)
        assert await fake.effects() == {"m-500": 1, "m-bad": 1}


# -- refusals and webhooks ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "code"),
    [
        ("adyen_refused", "refused"),
        ("adyen_expired", "expired_card"),
        ("adyen_not_enough_balance", "not_enough_balance"),
        ("adyen_fraud", "fraud"),
        ("adyen_cvc_declined", "cvc_declined"),
        ("adyen_blocked", "blocked_card"),
        ("adyen_error", "acquirer_error"),
    ],
)
async def test_refusals_by_test_card(method: str, code: str) -> None:
    async with adyen_on_fake() as (fake, adapter):
        outcome = await adapter.execute(command(Action.AUTHORIZE, f"r-{method}", method=method))
        assert isinstance(outcome, Declined) and outcome.code == code
        assert await fake.effects() == {}
        (note,) = await fake.notifications()
        assert (note["eventCode"], note["success"], note["reason"]) == (
            "AUTHORISATION",
            "false",
            CARDS[method][1],
        )


async def test_pending_and_shopper_actions_are_not_success() -> None:
    async with adyen_on_fake() as (_, adapter):
        pending = await adapter.execute(command(Action.AUTHORIZE, "p", method="adyen_pending"))
        assert isinstance(pending, Ambiguous) and pending.code == "awaiting_confirmation"
        redirect = await adapter.execute(command(Action.AUTHORIZE, "rd", method="adyen_redirect"))
        assert isinstance(redirect, Invalid) and redirect.code == "shopper_action_required"


async def test_every_outcome_is_a_signed_webhook_and_failures_are_their_own_events() -> None:
    keys = HmacKeys.from_hex([HMAC_KEY_HEX])
    async with adyen_on_fake() as (fake, adapter):
        pi = (await adapter.execute(command(Action.AUTHORIZE, "w-a"))).payment_reference  # type: ignore[union-attr]
        cap = await adapter.execute(command(Action.CAPTURE, "w-cap", 600, reference=pi))
        over = await adapter.execute(command(Action.REFUND, "w-over", 601, reference=pi))
        refund = await adapter.execute(command(Action.REFUND, "w-ref", 200, reference=pi))
        again = await adapter.execute(command(Action.CAPTURE, "w-cap2", 100, reference=pi))
        assert all(
            isinstance(o, Ambiguous) and o.code == "awaiting_confirmation"
            for o in (cap, over, refund, again)
        ), "Adyen accepts each and answers later"
        notes = await fake.notifications()
        for note in notes:
            verify_item(note, keys)
        assert [(n["eventCode"], n["success"]) for n in notes] == [
            ("AUTHORISATION", "true"),
            ("CAPTURE", "true"),
            ("REFUND_FAILED", "true"),  # the event itself is the failure
            ("REFUND", "true"),
            ("CAPTURE_FAILED", "true"),
        ]
        assert isinstance(cap, Ambiguous) and notes[1]["pspReference"] == cap.provider_reference
        assert notes[1]["originalReference"] == pi
        assert await fake.effects() == {"w-a": 1, "w-cap": 1, "w-ref": 1}


async def test_webhooks_are_posted_to_the_url_given_duplicated_on_demand() -> None:
    import anyio
    from aiohttp import web

    received: list[dict[str, Any]] = []
    both = anyio.Event()

    async def sink(request: web.Request) -> web.Response:
        received.append(await request.json())
        if len(received) == 2:
            both.set()
        return web.Response(text="[accepted]")

    app = web.Application()
    app.router.add_post("/hook", sink)
    async with serving(app) as url:
        faults = AdyenFaults(webhook_url=f"{url}/hook", webhook_duplicate=True, webhook_delay_ms=10)
        async with adyen_on_fake(faults) as (_, adapter):
            await adapter.execute(command(Action.AUTHORIZE, "hook"))
            with anyio.fail_after(60):  # a hang guard, no speed limit
                await both.wait()
    items = [b["notificationItems"][0]["NotificationRequestItem"] for b in received]
    assert items[0] == items[1] and items[0]["eventCode"] == "AUTHORISATION"
    assert all(b["live"] == "false" for b in received)
