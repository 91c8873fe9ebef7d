"""The fake Stripe-compatible provider, driven by the official stripe SDK.

What the relay's exactly-once proof rests on: the fake must keep Stripe's idempotency
semantics (replay, key misuse, key in use), store what Stripe stores and nothing else
(injected 429/503 are not stored; an effect followed by a 500 is), and count effects per
idempotency key honestly (declines, errors and replays are not effects). Raw httpx is
used only where the SDK cannot express the request (no Authorization header at all).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import stripe

from provider_adapters.fake import FaultConfig
from provider_adapters.fake.cards import TEST_CARDS, cards_markdown
from tests.support.cli import run_cli
from tests.support.fake_server import API_KEY, FakeServer, running_fake, stripe_client

pytestmark = pytest.mark.anyio


@pytest.fixture
async def fake() -> AsyncIterator[FakeServer]:
    async with running_fake(FaultConfig(seed=7)) as server:
        yield server


@pytest.fixture
async def client(fake: FakeServer) -> AsyncIterator[stripe.StripeClient]:
    sdk, http = stripe_client(fake.url)
    try:
        yield sdk
    finally:
        await http.close_async()  # type: ignore[no-untyped-call]


def authorize_params(
    amount: int = 1000, method: str = "pm_card_visa", **metadata: str
) -> dict[str, Any]:
    return {
        "amount": amount,
        "currency": "eur",
        "payment_method": method,
        "confirm": True,
        "capture_method": "manual",
        "metadata": metadata,
    }


def charge_params(amount: int = 1000, **metadata: str) -> dict[str, Any]:
    return {**authorize_params(amount, **metadata), "capture_method": "automatic"}


def replayed(obj: Any) -> bool:
    return str(obj.last_response.headers.get("Idempotent-Replayed", "")).lower() == "true"


def error_code(exc: stripe.StripeError) -> str | None:
    """The error object's code (the SDK leaves ``exc.code`` empty for a 409 or 500)."""
    body = exc.json_body
    return body["error"].get("code") if isinstance(body, dict) else None


# -- idempotency -------------------------------------------------------------------------


async def test_same_key_replays_the_stored_response(
    fake: FakeServer, client: stripe.StripeClient
) -> None:
    first = await client.v1.payment_intents.create_async(
        authorize_params(), {"idempotency_key": "k-replay"}
    )
    again = await client.v1.payment_intents.create_async(
        authorize_params(), {"idempotency_key": "k-replay"}
    )
    assert first.status == "requires_capture"
    assert (again.id, again.status, again.amount_capturable) == (first.id, "requires_capture", 1000)
    assert not replayed(first)
    assert replayed(again)
    assert again.last_response.headers["Idempotency-Key"] == "k-replay"
    assert await fake.effect_count("k-replay") == 1


async def test_same_key_with_other_parameters_is_an_idempotency_error(
    fake: FakeServer, client: stripe.StripeClient
) -> None:
    await client.v1.payment_intents.create_async(authorize_params(), {"idempotency_key": "k-p"})
    with pytest.raises(stripe.IdempotencyError) as caught:
        await client.v1.payment_intents.create_async(
            authorize_params(amount=999), {"idempotency_key": "k-p"}
        )
    assert caught.value.http_status == 400
    assert caught.value.json_body["error"]["type"] == "idempotency_error"  # type: ignore[index]
    # The same key on another endpoint is misuse as well.
    with pytest.raises(stripe.IdempotencyError):
        await client.v1.refunds.create_async({"payment_intent": "pi_x"}, {"idempotency_key": "k-p"})
    assert await fake.effect_count("k-p") == 1


async def test_concurrent_request_while_the_key_is_in_use_gets_409(
    fake: FakeServer, client: stripe.StripeClient
) -> None:
    # Latency keeps the first request running; whichever request takes the key first
    # holds it for that long, so the other one must find it in use (never a 2nd effect).
    await fake.configure(latency_ms=300, seed=1)
    results: list[Any] = []

    async def send() -> None:
        try:
            results.append(
                await client.v1.payment_intents.create_async(
                    authorize_params(), {"idempotency_key": "k-busy"}
                )
            )
        except stripe.StripeError as exc:
            results.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(send)
        tg.start_soon(send)

    errors = [r for r in results if isinstance(r, stripe.StripeError)]
    successes = [r for r in results if not isinstance(r, stripe.StripeError)]
    assert len(errors) == 1 and len(successes) == 1, results
    conflict = errors[0]
    assert conflict.http_status == 409
    assert error_code(conflict) == "idempotency_key_in_use"
    assert conflict.headers["Stripe-Should-Retry"] == "true"  # type: ignore[index]
    assert await fake.effect_count("k-busy") == 1

    # Once the first request finished, the key replays its result.
    await fake.configure(seed=1)
    later = await client.v1.payment_intents.create_async(
        authorize_params(), {"idempotency_key": "k-busy"}
    )
    assert later.id == successes[0].id and replayed(later)
    assert await fake.effect_count("k-busy") == 1


# -- fault injection ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "error_class", "status"),
    [("rate_429", stripe.RateLimitError, 429), ("rate_503", stripe.APIError, 503)],
)
async def test_injected_429_and_503_are_not_stored(
    fake: FakeServer,
    client: stripe.StripeClient,
    fault: str,
    error_class: type[stripe.StripeError],
    status: int,
) -> None:
    await fake.configure(**{fault: 1.0})
    with pytest.raises(error_class) as caught:
        await client.v1.payment_intents.create_async(
            authorize_params(), {"idempotency_key": "k-fault"}
        )
    assert caught.value.http_status == status
    assert caught.value.headers["Stripe-Should-Retry"] == "true"  # type: ignore[index]
    if status == 429:
        assert caught.value.headers["Retry-After"] == "1"  # type: ignore[index]
    assert await fake.effect_count("k-fault") == 0

    await fake.configure()  # faults off: the retry with the same key runs for real
    retry = await client.v1.payment_intents.create_async(
        authorize_params(), {"idempotency_key": "k-fault"}
    )
    assert retry.status == "requires_capture"
    assert not replayed(retry)
    effects = await fake.effects()
    assert effects["effects_by_key"]["k-fault"]["count"] == 1
    assert effects["faults_injected"][str(status)] == 1


async def test_effect_then_500_is_stored_and_replayed_as_500(
    fake: FakeServer, client: stripe.StripeClient
) -> None:
    await fake.configure(rate_500_after_effect=1.0)
    with pytest.raises(stripe.APIError) as first:
        await client.v1.payment_intents.create_async(
            authorize_params(order="o-500"), {"idempotency_key": "k-500"}
        )
    assert first.value.http_status == 500
    assert first.value.headers["Stripe-Should-Retry"] == "false"  # type: ignore[index]
    assert await fake.effect_count("k-500") == 1

    await fake.configure()  # even with faults off, Stripe replays the stored 500
    with pytest.raises(stripe.APIError) as again:
        await client.v1.payment_intents.create_async(
            authorize_params(order="o-500"), {"idempotency_key": "k-500"}
        )
    assert again.value.http_status == 500
    assert again.value.headers["Idempotent-Replayed"] == "true"  # type: ignore[index]
    assert await fake.effect_count("k-500") == 1

    # Only a lookup can settle it: the payment exists and holds the money.
    found = await client.v1.payment_intents.search_async({"query": "metadata['order']:'o-500'"})
    assert [(pi.status, pi.amount_capturable) for pi in found.data] == [("requires_capture", 1000)]


async def test_effect_then_timeout_applies_the_effect(fake: FakeServer) -> None:
    await fake.configure(rate_timeout_after_effect=1.0, timeout_seconds=0.4)
    impatient, impatient_http = stripe_client(fake.url, timeout=0.1)
    try:
        with pytest.raises(stripe.APIConnectionError) as caught:
            await impatient.v1.payment_intents.create_async(
                charge_params(), {"idempotency_key": "k-timeout"}
            )
    finally:
        await impatient_http.close_async()  # type: ignore[no-untyped-call]
    assert isinstance(caught.value.__cause__, httpx.ReadTimeout)
    effects = await fake.effects()
    assert effects["effects_by_key"]["k-timeout"]["count"] == 1
    assert effects["effects_by_key"]["k-timeout"]["kinds"] == ["charge"]

    # The reply was stored before the server stalled: a retry replays it at once.
    await fake.configure()
    patient, patient_http = stripe_client(fake.url)
    try:
        retry = await patient.v1.payment_intents.create_async(
            charge_params(), {"idempotency_key": "k-timeout"}
        )
    finally:
        await patient_http.close_async()  # type: ignore[no-untyped-call]
    assert replayed(retry)
    assert (retry.id, retry.status) == (
        effects["effects_by_key"]["k-timeout"]["object"],
        "succeeded",
    )
    assert await fake.effect_count("k-timeout") == 1


async def test_malformed_reply_still_applies_the_effect(fake: FakeServer) -> None:
    # Raw httpx: the point is the bytes on the wire, which the SDK would refuse to parse.
    form = {
        "amount": "1000",
        "currency": "eur",
        "payment_method": "pm_card_visa",
        "confirm": "true",
        "capture_method": "manual",
    }
    headers = {"Authorization": f"Bearer {API_KEY}", "Idempotency-Key": "k-bad"}
    await fake.configure(rate_malformed=1.0, seed=3)
    async with httpx.AsyncClient(base_url=fake.url) as raw:
        bad = await raw.post("/v1/payment_intents", data=form, headers=headers)
        await fake.configure()
        good = await raw.post("/v1/payment_intents", data=form, headers=headers)
    assert bad.status_code == good.status_code == 200
    assert good.headers["Idempotent-Replayed"] == "true"
    assert bad.content != good.content  # the stored reply is the true one, not the broken one
    assert good.json()["status"] == "requires_capture"
    assert (await fake.effects())["faults_injected"]["malformed"] == 1
    assert await fake.effect_count("k-bad") == 1


async def test_fault_config_rejects_unknown_or_out_of_range_settings(fake: FakeServer) -> None:
    for bad in ({"rate_4299": 0.5}, {"rate_429": 2.0}, {"latency_ms": -1}):
        response = await fake.control.post("/_fake/config", json=bad)
        assert response.status_code == 400, bad
    assert (await fake.control.get("/_fake/config")).json()["rate_429"] == 0.0


# -- reading state back ------------------------------------------------------------------


async def test_search_payment_intents_by_metadata(client: stripe.StripeClient) -> None:
    a = await client.v1.payment_intents.create_async(
        authorize_params(order="a"), {"idempotency_key": "k-a"}
    )
    await client.v1.payment_intents.create_async(
        authorize_params(order="b"), {"idempotency_key": "k-b"}
    )
    found = await client.v1.payment_intents.search_async({"query": "metadata['order']:'a'"})
    assert [pi.id for pi in found.data] == [a.id]
    assert found.data[0].metadata["order"] == "a"
    none = await client.v1.payment_intents.search_async({"query": 'metadata["order"]:"zzz"'})
    assert list(none.data) == []
    with pytest.raises(stripe.InvalidRequestError) as caught:
        await client.v1.payment_intents.search_async({"query": "amount>100"})
    assert caught.value.http_status == 400


async def test_refunds_list_and_retrieve(fake: FakeServer, client: stripe.StripeClient) -> None:
    pi = await client.v1.payment_intents.create_async(
        charge_params(1000), {"idempotency_key": "k-ch"}
    )
    partial = await client.v1.refunds.create_async(
        {"payment_intent": pi.id, "amount": 300, "metadata": {"n": "1"}},
        {"idempotency_key": "k-re1"},
    )
    rest = await client.v1.refunds.create_async(
        {"payment_intent": pi.id}, {"idempotency_key": "k-re2"}
    )
    assert (partial.amount, rest.amount) == (300, 700)  # no amount = all that remains

    listed = await client.v1.refunds.list_async({"payment_intent": pi.id})
    assert [r.id for r in listed.data] == [rest.id, partial.id]  # newest first, like Stripe
    assert all(r.payment_intent == pi.id and r.status == "succeeded" for r in listed.data)
    got = await client.v1.refunds.retrieve_async(partial.id)
    assert (got.id, got.amount, got.currency, got.metadata["n"]) == (partial.id, 300, "eur", "1")

    other = await client.v1.payment_intents.create_async(
        charge_params(50), {"idempotency_key": "k-ch2"}
    )
    assert [
        r.id for r in (await client.v1.refunds.list_async({"payment_intent": other.id})).data
    ] == []

    with pytest.raises(stripe.InvalidRequestError) as caught:
        await client.v1.refunds.create_async(
            {"payment_intent": pi.id, "amount": 1}, {"idempotency_key": "k-re3"}
        )
    assert error_code(caught.value) == "amount_too_large"
    assert await fake.effect_count("k-re3") == 0


async def test_capture_partial_and_over_capture(
    fake: FakeServer, client: stripe.StripeClient
) -> None:
    pi = await client.v1.payment_intents.create_async(
        authorize_params(1000), {"idempotency_key": "k-auth"}
    )
    with pytest.raises(stripe.InvalidRequestError) as caught:
        await client.v1.payment_intents.capture_async(
            pi.id, {"amount_to_capture": 1001}, {"idempotency_key": "k-cap-over"}
        )
    assert error_code(caught.value) == "amount_too_large"
    captured = await client.v1.payment_intents.capture_async(
        pi.id, {"amount_to_capture": 600}, {"idempotency_key": "k-cap"}
    )
    assert (captured.status, captured.amount_received, captured.amount_capturable) == (
        "succeeded",
        600,
        0,
    )
    effects = (await fake.effects())["effects_by_key"]
    assert "k-cap-over" not in effects
    assert (effects["k-cap"]["kinds"], effects["k-cap"]["amount"]) == (["capture"], 600)


# -- authentication and missing objects --------------------------------------------------


async def test_401_without_an_api_key(fake: FakeServer) -> None:
    async with httpx.AsyncClient(base_url=fake.url) as raw:
        post = await raw.post(
            "/v1/payment_intents",
            data={"amount": "100", "currency": "eur"},
            headers={"Idempotency-Key": "k-noauth"},
        )
        get = await raw.get("/v1/payment_intents/pi_x")
    for response in (post, get):
        assert response.status_code == 401
        assert response.json()["error"]["type"] == "invalid_request_error"
    assert await fake.effect_count("k-noauth") == 0


async def test_401_with_a_wrong_api_key(fake: FakeServer) -> None:
    wrong, http = stripe_client(fake.url, api_key="sk_live_not_for_the_fake")
    try:
        with pytest.raises(stripe.AuthenticationError) as post:
            await wrong.v1.payment_intents.create_async(
                authorize_params(), {"idempotency_key": "k-wrong"}
            )
        with pytest.raises(stripe.AuthenticationError) as get:
            await wrong.v1.payment_intents.retrieve_async("pi_x")
    finally:
        await http.close_async()  # type: ignore[no-untyped-call]
    assert post.value.http_status == get.value.http_status == 401
    assert await fake.effect_count("k-wrong") == 0
    # A rejected key did not burn the idempotency key: the right key applies it once.
    right, http = stripe_client(fake.url, api_key=API_KEY)
    try:
        pi = await right.v1.payment_intents.create_async(
            authorize_params(), {"idempotency_key": "k-wrong"}
        )
    finally:
        await http.close_async()  # type: ignore[no-untyped-call]
    assert not replayed(pi)
    assert await fake.effect_count("k-wrong") == 1


async def test_404_for_unknown_objects(client: stripe.StripeClient) -> None:
    calls: list[Callable[[], Awaitable[Any]]] = [
        lambda: client.v1.payment_intents.retrieve_async("pi_unknown"),
        lambda: client.v1.refunds.retrieve_async("re_unknown"),
        lambda: client.v1.payment_intents.capture_async(
            "pi_unknown", None, {"idempotency_key": "k-404"}
        ),
        lambda: client.v1.refunds.create_async(
            {"payment_intent": "pi_unknown"}, {"idempotency_key": "k-4"}
        ),
    ]
    for call in calls:
        with pytest.raises(stripe.InvalidRequestError) as caught:
            await call()
        assert caught.value.http_status == 404
        assert caught.value.code == "resource_missing"


# -- test payment methods ----------------------------------------------------------------


@pytest.mark.parametrize(
    "method", ["pm_card_visa", "pm_card_mastercard", "pm_card_amex", "pm_card_visa_debit"]
)
async def test_good_test_cards_authorize(
    fake: FakeServer, client: stripe.StripeClient, method: str
) -> None:
    pi = await client.v1.payment_intents.create_async(
        authorize_params(1234, method), {"idempotency_key": f"k-{method}"}
    )
    assert (pi.status, pi.amount_capturable, pi.payment_method) == (
        "requires_capture",
        1234,
        method,
    )
    assert (await fake.effects())["effects_by_key"][f"k-{method}"]["kinds"] == ["authorize"]


@pytest.mark.parametrize(
    ("method", "code", "decline_code"),
    [
        ("pm_card_chargeDeclined", "card_declined", "generic_decline"),
        ("pm_card_chargeDeclinedInsufficientFunds", "card_declined", "insufficient_funds"),
        ("pm_card_chargeDeclinedExpiredCard", "expired_card", None),
    ],
)
async def test_declining_test_cards(
    fake: FakeServer,
    client: stripe.StripeClient,
    method: str,
    code: str,
    decline_code: str | None,
) -> None:
    key = f"k-{method}"
    with pytest.raises(stripe.CardError) as caught:
        await client.v1.payment_intents.create_async(
            charge_params(**{"m": method}) | {"payment_method": method}, {"idempotency_key": key}
        )
    exc = caught.value
    assert (exc.http_status, exc.code) == (402, code)
    assert exc.json_body["error"].get("decline_code") == decline_code  # type: ignore[index]
    pi = exc.json_body["error"]["payment_intent"]  # type: ignore[index]
    assert (pi["status"], pi["amount_received"]) == ("requires_payment_method", 0)
    assert pi["last_payment_error"]["code"] == code

    # A decline is stored like Stripe stores it: the same key replays the 402.
    with pytest.raises(stripe.CardError) as again:
        await client.v1.payment_intents.create_async(
            charge_params(**{"m": method}) | {"payment_method": method}, {"idempotency_key": key}
        )
    assert again.value.headers["Idempotent-Replayed"] == "true"  # type: ignore[index]
    assert await fake.effect_count(key) == 0


README = Path(__file__).resolve().parent.parent / "README.md"
_README_CARDS = re.compile(
    r"<!-- test cards: [^\n]*-->\n(.*?)\n<!-- end of test cards -->", flags=re.DOTALL
)


def test_the_readme_lists_the_fake_s_own_test_cards() -> None:
    [block] = _README_CARDS.findall(README.read_text())
    listed = set(re.findall(r"^\| `(pm_\w+)` \|", block, flags=re.MULTILINE))
    assert listed == {card.payment_method for card in TEST_CARDS}
    assert block == cards_markdown(), (
        "README.md's test-card table differs from provider_adapters/fake/cards.py; "
        "replace it with:\n" + cards_markdown()
    )


def test_fake_provider_help_lists_every_test_card_and_what_it_does() -> None:
    result = run_cli("fake-provider", "--help")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for card in TEST_CARDS:
        [line] = [line for line in lines if line.split()[:1] == [card.payment_method]]
        assert line.endswith(card.outcome()), line
    assert "pm_card_chargeDeclined" in result.stdout and "generic_decline" in result.stdout


async def test_unknown_payment_method_is_invalid(
    fake: FakeServer, client: stripe.StripeClient
) -> None:
    with pytest.raises(stripe.InvalidRequestError) as caught:
        await client.v1.payment_intents.create_async(
            authorize_params(method="pm_card_nonsense"), {"idempotency_key": "k-pm"}
        )
    assert (caught.value.http_status, caught.value.code, caught.value.param) == (
        400,
        "resource_missing",
        "payment_method",
    )
    assert await fake.effect_count("k-pm") == 0


# -- effect accounting -------------------------------------------------------------------


async def test_effects_count_only_money_changes(
    fake: FakeServer, client: stripe.StripeClient
) -> None:
    pis = client.v1.payment_intents
    held = await pis.create_async(authorize_params(1000), {"idempotency_key": "e-auth"})
    await pis.create_async(authorize_params(1000), {"idempotency_key": "e-auth"})  # replay
    await pis.capture_async(held.id, {"amount_to_capture": 400}, {"idempotency_key": "e-cap"})
    await client.v1.refunds.create_async(
        {"payment_intent": held.id, "amount": 100}, {"idempotency_key": "e-ref"}
    )
    voided = await pis.create_async(authorize_params(200), {"idempotency_key": "e-auth2"})
    await pis.cancel_async(voided.id, None, {"idempotency_key": "e-void"})
    # No hold, nothing released: cancelling an unconfirmed intent is not an effect.
    bare = await pis.create_async(
        {"amount": 50, "currency": "eur", "capture_method": "manual"}, {"idempotency_key": "e-new"}
    )
    await pis.cancel_async(bare.id, None, {"idempotency_key": "e-cancel-bare"})
    failing: list[Callable[[], Awaitable[Any]]] = [
        lambda: pis.create_async(
            authorize_params(method="pm_card_chargeDeclined"), {"idempotency_key": "e-decl"}
        ),
        lambda: pis.capture_async(held.id, None, {"idempotency_key": "e-cap-again"}),
        lambda: pis.cancel_async(voided.id, None, {"idempotency_key": "e-void-again"}),
    ]
    for call in failing:  # a decline, an already-captured capture, a second void
        with pytest.raises(stripe.StripeError):
            await call()

    effects = await fake.effects()
    by_key = {
        k: (v["count"], v["kinds"], v["amount"]) for k, v in effects["effects_by_key"].items()
    }
    assert by_key == {
        "e-auth": (1, ["authorize"], 1000),
        "e-cap": (1, ["capture"], 400),
        "e-ref": (1, ["refund"], 100),
        "e-auth2": (1, ["authorize"], 200),
        "e-void": (1, ["void"], 200),
    }
    assert effects["total_effects"] == 5


async def test_reset_forgets_state_and_keys(fake: FakeServer, client: stripe.StripeClient) -> None:
    first = await client.v1.payment_intents.create_async(
        authorize_params(), {"idempotency_key": "k-reset"}
    )
    assert (await fake.control.post("/_fake/reset")).status_code == 200
    assert (await fake.effects())["total_effects"] == 0
    second = await client.v1.payment_intents.create_async(
        authorize_params(), {"idempotency_key": "k-reset"}
    )
    assert second.id != first.id and not replayed(second)
    with pytest.raises(stripe.InvalidRequestError):
        await client.v1.payment_intents.retrieve_async(first.id)
