"""The Adyen adapter (provider_adapters/adyen.py): idempotency keys, the pinned API version,
Adyen's currency units end to end, error mapping, and what ``received`` becomes."""

from __future__ import annotations

import json
from dataclasses import replace

import anyio
import psycopg
import pytest

from provider_adapters.adyen import (
    TESTED_API_VERSIONS,
    AdyenAdapter,
    UntestedApiVersion,
    adyen_idempotency_key,
)
from provider_adapters.base import Action, Ambiguous, Invalid, Retryable, Succeeded
from provider_adapters.currency_units import ADYEN_UNITS, AmountNotRepresentable
from provider_adapters.fake.adyen import MERCHANT_ACCOUNT
from relay.finance.reconcile import currency_exponents
from tests.invariants import assert_audit_intact, assert_ledger_balanced
from tests.support.adyen import adyen_adapter, adyen_on_fake
from tests.support.commands import command
from tests.support.intents import insert_intents
from tests.support.relays import make_relay, run_until_settled, running
from tests.support.waiting import wait_until

# -- idempotency keys --------------------------------------------------------------------


@pytest.mark.parametrize("key", ["k", "a" * 64, "order-42:capture:1", "~!x"])
def test_a_key_that_fits_is_sent_as_it_is(key: str) -> None:
    assert adyen_idempotency_key(key) == key


@pytest.mark.parametrize("key", ["a" * 65, "x" * 255, "caf\u00e9", "two words"])
def test_a_key_that_does_not_fit_gets_a_stable_digest_form_within_64(key: str) -> None:
    derived = adyen_idempotency_key(key)
    assert derived.startswith("sha256:") and len(derived) == 50
    assert derived == adyen_idempotency_key(key), "a function of the key alone"
    assert derived != adyen_idempotency_key(key + "x")


@pytest.mark.anyio
async def test_every_post_of_every_attempt_carries_the_same_key_and_the_pinned_version() -> None:
    long_key = "intent:" + "z" * 200
    async with adyen_on_fake() as (fake, adapter):
        auth = command(Action.AUTHORIZE, long_key)
        first = await adapter.execute(auth)
        assert isinstance(first, Succeeded)
        assert await adapter.execute(replace(auth, attempt=2)) == first, "replayed"
        cap = command(Action.CAPTURE, "c" * 80, reference=first.payment_reference)
        await adapter.execute(cap)
        await adapter.execute(replace(cap, attempt=2))
        keys = [p.headers.get("Idempotency-Key") for p in fake.seen]
        assert keys == [adyen_idempotency_key(long_key)] * 2 + [adyen_idempotency_key("c" * 80)] * 2
        assert all(len(k or "") <= 64 for k in keys)
        assert all(p.path.startswith("/v71/") for p in fake.seen)
        assert await fake.effects() == {keys[0]: 1, keys[2]: 1}
        body = json.loads(fake.seen[0].body)
        assert body["merchantAccount"] == MERCHANT_ACCOUNT
        assert body["paymentMethod"] == {"type": "scheme", "storedPaymentMethodId": "pm_card_visa"}
        assert "captureDelayHours" not in body
        charge = command(Action.CHARGE, "ch-1")
        await adapter.execute(charge)
        assert json.loads(fake.seen[-1].body)["captureDelayHours"] == 0


def test_an_untested_api_version_is_refused_naming_the_tested_ones() -> None:
    with pytest.raises(UntestedApiVersion, match="v71"):
        AdyenAdapter(name="adyen", api_key="k", merchant_account="m", api_version="v72")
    adapter = AdyenAdapter(
        name="adyen",
        api_key="k",
        merchant_account="m",
        api_version="v72",
        allow_untested_version=True,
    )
    assert adapter.untested_version and adapter.api_version == "v72"
    assert TESTED_API_VERSIONS == ("v71",)


@pytest.mark.anyio
async def test_the_version_is_part_of_every_path() -> None:
    async with adyen_on_fake(api_version="v72", allow_untested_version=True) as (fake, adapter):
        assert isinstance(await adapter.execute(command(Action.AUTHORIZE, "v")), Succeeded)
        assert fake.seen[0].path == "/v72/payments"


# -- errors ------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_bad_credentials_are_invalid_and_nothing_happens() -> None:
    async with adyen_on_fake() as (fake, good):
        async with adyen_adapter(fake.url, api_key="wrong") as adapter:
            outcome = await adapter.execute(command(Action.AUTHORIZE, "auth"))
            assert isinstance(outcome, Invalid) and outcome.code == "authentication_failed"
        async with adyen_adapter(fake.url, merchant_account="Other") as adapter:
            outcome = await adapter.execute(command(Action.AUTHORIZE, "merch"))
            assert isinstance(outcome, Invalid) and outcome.code == "forbidden"
        assert await fake.effects() == {}
        assert good.name == "adyen"


@pytest.mark.anyio
async def test_nothing_listening_is_retryable() -> None:
    async with adyen_adapter("http://127.0.0.1:9") as adapter:
        outcome = await adapter.execute(command(Action.AUTHORIZE, "down"))
        assert isinstance(outcome, Retryable) and outcome.code == "connection_error"


@pytest.mark.anyio
async def test_a_modification_without_a_psp_reference_never_leaves() -> None:
    async with adyen_on_fake() as (fake, adapter):
        outcome = await adapter.execute(command(Action.CAPTURE, "nr", reference="pi_123"))
        assert isinstance(outcome, Invalid) and outcome.code == "missing_payment_reference"
        assert fake.seen == []


@pytest.mark.anyio
async def test_received_is_awaiting_confirmation_never_succeeded() -> None:
    async with adyen_on_fake() as (_, adapter):
        auth = await adapter.execute(command(Action.AUTHORIZE, "rc"))
        assert isinstance(auth, Succeeded)
        for action in (Action.CAPTURE, Action.REFUND, Action.VOID):
            ref = auth.payment_reference
            outcome = await adapter.execute(command(action, f"rc-{action}", 100, reference=ref))
            assert isinstance(outcome, Ambiguous) and outcome.code == "awaiting_confirmation"
            assert outcome.provider_reference and outcome.provider_reference != ref
        looked = await adapter.lookup(command(Action.CAPTURE, "rc-capture", 100, reference=ref))
        assert isinstance(looked, Ambiguous) and looked.code == "lookup_unavailable"


# -- Adyen's currency units --------------------------------------------------------------


@pytest.mark.parametrize(
    ("currency", "iso_exponent", "ours", "adyens"),
    [
        ("CLP", 0, 5000, 500_000),  # ISO: whole pesos; Adyen: two decimals
        ("ISK", 0, 7, 700),
        ("IDR", 2, 12_300, 123),  # ISO: two decimals; Adyen: whole rupiah
        ("CVE", 2, 100, 1),
        ("EUR", 2, 1999, 1999),
        ("KWD", 3, 5125, 5125),  # no last-digit rule at Adyen (Stripe has one)
        ("JPY", 0, 500, 500),
    ],
)
def test_adyen_units_convert_both_ways(
    currency: str, iso_exponent: int, ours: int, adyens: int
) -> None:
    assert ADYEN_UNITS.to_provider(ours, currency, iso_exponent) == adyens
    assert ADYEN_UNITS.from_provider(adyens, currency, iso_exponent) == ours


def test_cents_adyen_cannot_represent_are_refused_with_the_way_out() -> None:
    with pytest.raises(AmountNotRepresentable, match="use 12300 or 12400 minor units"):
        ADYEN_UNITS.to_provider(12_345, "IDR", 2)
    with pytest.raises(AmountNotRepresentable, match="ISO 4217 exponent"):
        ADYEN_UNITS.to_provider(5000, "CLP", None)


@pytest.mark.integration
def test_the_overrides_are_exactly_where_adyen_departs_from_the_currency_table(
    db_url: str,
) -> None:
    exponents = currency_exponents(db_url)
    adyen = {"CLP": 2, "CVE": 0, "IDR": 0, "ISK": 2}  # ../shared/PROVIDERS.md
    assert {c for c, e in adyen.items() if exponents[c] != e} == set(adyen)
    for code, exponent in adyen.items():
        rule = ADYEN_UNITS.rule(code)
        assert rule is not None and rule.exponent == exponent
    assert set(ADYEN_UNITS.overrides) == set(adyen)


@pytest.mark.anyio
async def test_an_amount_adyen_cannot_represent_is_invalid_before_any_request() -> None:
    async with adyen_on_fake() as (fake, adapter):
        cmd = replace(
            command(Action.CHARGE, "idr"), currency="IDR", amount_minor=12_345, exponent=2
        )
        outcome = await adapter.execute(cmd)
        assert isinstance(outcome, Invalid) and outcome.code == "amount_not_representable"
        assert fake.seen == []


@pytest.mark.integration
@pytest.mark.anyio
async def test_clp_and_idr_reach_adyen_in_its_units_and_sql_keeps_iso_minor_units(
    db_url: str,
) -> None:
    insert_intents(
        db_url,
        [
            {
                "payment_id": "p-clp",
                "provider": "adyen",
                "action": "authorize",
                "amount_minor": 5000,  # 5000 pesos (no minor unit in ISO 4217)
                "currency": "CLP",
                "payment_method": "stored_visa",
            },
            {
                "payment_id": "p-idr",
                "provider": "adyen",
                "action": "charge",
                "amount_minor": 1_500_000,  # 15000.00 rupiah
                "currency": "IDR",
                "payment_method": "stored_visa",
            },
            {
                "payment_id": "p-idr-cents",
                "provider": "adyen",
                "action": "charge",
                "amount_minor": 1_500_050,  # 15000.50 rupiah: Adyen has no cents
                "currency": "IDR",
                "payment_method": "stored_visa",
            },
        ],
    )
    async with adyen_on_fake() as (fake, adapter):
        relay = make_relay(db_url, adapter, provider="adyen", instance="adyen-relay")
        await run_until_settled(db_url, [relay])
        sent = {json.loads(p.body)["reference"]: json.loads(p.body)["amount"] for p in fake.seen}
    assert sent == {
        "p-clp": {"value": 500_000, "currency": "CLP"},
        "p-idr": {"value": 15_000, "currency": "IDR"},
    }, "the cents amount never left"
    with psycopg.connect(db_url) as conn:
        rows = conn.execute(
            "SELECT payment_id, status, amount_applied_minor, error_code"
            " FROM outbox.payment_intents ORDER BY payment_id"
        ).fetchall()
        payments = conn.execute(
            "SELECT payment_id, authorized_minor, captured_minor FROM outbox.payments"
            " WHERE payment_id IN ('p-clp', 'p-idr') ORDER BY payment_id"
        ).fetchall()
    assert rows == [
        ("p-clp", "succeeded", 5000, None),
        ("p-idr", "succeeded", 1_500_000, None),
        ("p-idr-cents", "dead", None, "amount_not_representable"),
    ]
    assert payments == [("p-clp", 5000, 0), ("p-idr", 1_500_000, 1_500_000)]
    assert_ledger_balanced(db_url)
    assert_audit_intact(db_url)


# -- "received" through the relay: awaiting its confirmation (tests/test_adyen_confirmations.py) --


@pytest.mark.integration
@pytest.mark.anyio
async def test_a_received_capture_books_nothing_awaits_its_confirmation_and_keeps_the_breaker_closed(
    db_url: str,
) -> None:
    payments = [f"p-rcv-{i}" for i in range(7)]  # more than the breaker's threshold (5)
    rows: list[dict[str, object]] = []
    for payment_id in payments:
        rows.append(
            {
                "payment_id": payment_id,
                "provider": "adyen",
                "action": "authorize",
                "amount_minor": 1000,
                "currency": "EUR",
                "payment_method": "stored_visa",
            }
        )
        rows.append(
            {
                "payment_id": payment_id,
                "provider": "adyen",
                "action": "capture",
                "amount_minor": 1000,
                "currency": "EUR",
            }
        )
        rows.append(
            {
                "payment_id": payment_id,
                "provider": "adyen",
                "action": "refund",
                "amount_minor": 100,
                "currency": "EUR",
            }
        )
    insert_intents(db_url, rows)
    async with adyen_on_fake() as (fake, adapter):
        relay = make_relay(db_url, adapter, provider="adyen", instance="rcv", max_attempts=3)

        def captures_awaiting() -> bool:
            with psycopg.connect(db_url) as conn:
                row = conn.execute(
                    "SELECT count(*) FROM outbox.payment_intents"
                    " WHERE action = 'capture' AND status = 'awaiting_confirmation'"
                ).fetchone()
            return row is not None and row[0] == len(payments)

        async with running(relay):
            await wait_until(
                lambda: anyio.to_thread.run_sync(captures_awaiting), "every capture awaiting"
            )
        lane = relay.lanes["adyen"]
        assert lane.breaker.state.name == "CLOSED", "accepted answers are healthy answers"
        effects = await fake.effects()
        notes = await fake.notifications()
    with psycopg.connect(db_url) as conn:
        intents = conn.execute(
            "SELECT action, status, attempts, error_code, idempotency_key"
            " FROM outbox.payment_intents ORDER BY payment_id, payment_seq"
        ).fetchall()
        amounts = conn.execute(
            "SELECT DISTINCT state, authorized_minor, captured_minor FROM outbox.payments"
        ).fetchall()
        booked = conn.execute(
            "SELECT DISTINCT kind FROM outbox.ledger_transactions ORDER BY kind"
        ).fetchall()
    for action, status, attempts, error_code, key in intents:
        if action == "authorize":
            assert status == "succeeded"
        elif action == "capture":
            # Sent once, then waiting without a lease for its CAPTURE webhook (no inbox
            # runs here): never retried, one capture at Adyen.
            assert (status, attempts, error_code) == (
                "awaiting_confirmation",
                1,
                "awaiting_confirmation",
            )
            assert effects[key] == 1
        else:
            assert status == "blocked", "the refund waits behind the unconfirmed capture"
            assert key not in effects
    assert amounts == [("authorized", 1000, 0)], "no captured money is booked"
    with psycopg.connect(db_url) as conn:
        awaiting = conn.execute(
            "SELECT DISTINCT awaiting_action, awaiting_minor FROM outbox.payments"
        ).fetchall()
    assert awaiting == [("capture", 1000)], "the requested amount, beside the confirmed ones"
    assert booked == [("authorize",)]
    assert sum(1 for n in notes if n["eventCode"] == "CAPTURE") == len(payments)
    assert_ledger_balanced(db_url)
