"""Amounts in the provider's units where it departs from ISO 4217 (Stripe's special cases).

Unit tests of the conversions, then the whole path against the fake Stripe-compatible
provider: an ISK payment reaches the provider in Stripe's units (x100) while every amount
in SQL stays in ISO minor units, reconciliation matches it, and an amount Stripe cannot
represent is refused before any request.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from provider_adapters.base import Action, BalanceTransaction, Command, Invalid
from provider_adapters.currency_units import (
    STRIPE_THREE_DECIMAL,
    STRIPE_UNITS,
    STRIPE_ZERO_DECIMAL,
    AmountNotRepresentable,
)
from provider_adapters.stripe import StripeAdapter
from relay.finance.reconcile import FeeSchedule, currency_exponents, run
from tests.invariants import assert_audit_intact, assert_ledger_balanced
from tests.support.fake_server import API_KEY, FakeServer
from tests.support.intents import insert_intents
from tests.support.relays import make_relay, run_until_settled

# -- conversions (pure) ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("currency", "iso_exponent", "ours", "stripes"),
    [
        ("ISK", 0, 5000, 500_000),  # 5000 kr: Stripe counts ISK with two decimals
        ("ISK", 0, 1, 100),
        ("HUF", 2, 12345, 12345),  # two-decimal in both; only payouts are whole forints
        ("TWD", 2, 12345, 12345),
        ("KWD", 3, 5120, 5120),  # three-decimal in both, last digit 0
        ("JPY", 0, 500, 500),  # zero-decimal in both
        ("EUR", 2, 1999, 1999),
        ("MGA", 2, 12300, 123),  # ISO counts MGA with two decimals, Stripe with none
        ("isk", 0, 7, 700),  # codes in any case
    ],
)
def test_amounts_convert_both_ways(
    currency: str, iso_exponent: int, ours: int, stripes: int
) -> None:
    assert STRIPE_UNITS.to_provider(ours, currency, iso_exponent) == stripes
    assert STRIPE_UNITS.from_provider(stripes, currency, iso_exponent) == ours
    assert STRIPE_UNITS.from_provider(-stripes, currency, iso_exponent) == -ours  # refunds


@pytest.mark.parametrize(
    ("currency", "iso_exponent", "ours", "advice"),
    [
        ("KWD", 3, 5125, "use 5120 or 5130 minor units"),
        ("BHD", 3, 1, "use 0 or 10 minor units"),
        ("OMR", 3, 99_999, "use 99990 or 100000 minor units"),
        ("MGA", 2, 12345, "use 12300 or 12400 minor units"),
    ],
)
def test_amounts_stripe_cannot_represent_are_refused_with_the_way_out(
    currency: str, iso_exponent: int, ours: int, advice: str
) -> None:
    with pytest.raises(AmountNotRepresentable, match=advice) as refused:
        STRIPE_UNITS.to_provider(ours, currency, iso_exponent)
    assert refused.value.code == "amount_not_representable"
    assert currency in str(refused.value)


def test_a_provider_amount_finer_than_iso_is_not_rounded() -> None:
    # 145.30 kr is not a whole number of ISO minor units of ISK.
    with pytest.raises(AmountNotRepresentable, match="14530"):
        STRIPE_UNITS.from_provider(14_530, "ISK", 0)
    # A three-decimal amount off Stripe's grid is still exactly representable in ISO units.
    assert STRIPE_UNITS.from_provider(5125, "KWD", 3) == 5125


def test_a_departing_currency_needs_the_iso_exponent() -> None:
    with pytest.raises(AmountNotRepresentable) as refused:
        STRIPE_UNITS.to_provider(5000, "ISK", None)
    assert refused.value.code == "currency_exponent_unknown"
    # Where Stripe counts as ISO does, the amount passes as it is.
    assert STRIPE_UNITS.to_provider(1999, "EUR", None) == 1999
    assert STRIPE_UNITS.to_provider(5120, "KWD", None) == 5120


def test_granularity_is_the_step_stripe_accepts() -> None:
    assert STRIPE_UNITS.granularity("isk") == 100
    assert {STRIPE_UNITS.granularity(c) for c in STRIPE_THREE_DECIMAL} == {10}
    assert STRIPE_UNITS.granularity("EUR") == STRIPE_UNITS.granularity("HUF") == 1


@pytest.mark.integration
def test_the_overrides_are_exactly_where_stripe_departs_from_the_currency_table(
    db_url: str,
) -> None:
    """Stripe's zero-decimal and three-decimal lists against outbox.currencies: the
    exponent overrides are the currencies where they disagree, no more, no fewer."""
    exponents = currency_exponents(db_url)
    stripe_exponent = {c: 0 for c in STRIPE_ZERO_DECIMAL} | {c: 3 for c in STRIPE_THREE_DECIMAL}
    stripe_exponent["ISK"] = 2
    departures = {c for c, e in stripe_exponent.items() if exponents[c] != e}
    assert departures == {"ISK", "MGA"}
    overridden = {
        c for c in stripe_exponent if (rule := STRIPE_UNITS.rule(c)) and rule.exponent is not None
    }
    assert overridden == departures
    for code in departures:
        rule = STRIPE_UNITS.rule(code)
        assert rule is not None and rule.exponent == stripe_exponent[code]


# -- the whole path, against the fake provider ----------------------------------------------


def _keys(db_url: str, payment_id: str) -> dict[str, str]:
    with psycopg.connect(db_url) as conn:
        rows = conn.execute(
            "SELECT action, idempotency_key FROM outbox.payment_intents WHERE payment_id = %s",
            (payment_id,),
        ).fetchall()
    return {str(action): str(key) for action, key in rows}


@pytest.mark.integration
@pytest.mark.anyio
async def test_isk_reaches_stripe_in_its_units_and_sql_keeps_iso_minor_units(
    db_url: str, fake: FakeServer, adapter: StripeAdapter
) -> None:
    # A fee of 2.9 % and no fixed part: on whole-krónur amounts it is a whole number of
    # krónur, so both fee schedules agree exactly.
    (await fake.control.post("/_fake/fees", json={"bps": 290, "fixed_minor": 0})).raise_for_status()
    started = datetime.now(UTC) - timedelta(minutes=1)
    insert_intents(
        db_url,
        [
            {
                "payment_id": "p-isk",
                "action": "authorize",
                "amount_minor": 5000,  # 5000 kr (ISK has no minor unit in ISO 4217)
                "currency": "ISK",
                "payment_method": "pm_card_visa",
            },
            {"payment_id": "p-isk", "action": "capture", "amount_minor": 4000, "currency": "ISK"},
            {"payment_id": "p-isk", "action": "refund", "amount_minor": 1000, "currency": "ISK"},
            {
                "payment_id": "p-kwd",
                "action": "charge",
                "amount_minor": 10_000,  # 10.000 KWD: on Stripe's grid
                "currency": "KWD",
                "payment_method": "pm_card_visa",
            },
            {
                "payment_id": "p-jpy",
                "action": "charge",
                "amount_minor": 5000,
                "currency": "JPY",
                "payment_method": "pm_card_visa",
            },
        ],
    )
    await run_until_settled(db_url, [make_relay(db_url, adapter, instance="isk-relay")])

    # At the provider: Stripe's units.
    effects = (await fake.effects())["effects_by_key"]
    keys = _keys(db_url, "p-isk")
    assert [
        (effects[keys[a]]["kinds"], effects[keys[a]]["amount"], effects[keys[a]]["currency"])
        for a in ("authorize", "capture", "refund")
    ] == [
        (["authorize"], 500_000, "isk"),
        (["capture"], 400_000, "isk"),
        (["refund"], 100_000, "isk"),
    ]
    assert effects[_keys(db_url, "p-kwd")["charge"]]["amount"] == 10_000
    assert effects[_keys(db_url, "p-jpy")["charge"]]["amount"] == 5000

    # In SQL: ISO minor units, everywhere.
    with psycopg.connect(db_url) as conn:
        intents = conn.execute(
            "SELECT action, status, amount_applied_minor FROM outbox.payment_intents"
            " WHERE payment_id = 'p-isk' ORDER BY payment_seq"
        ).fetchall()
        payment = conn.execute(
            "SELECT state, authorized_minor, captured_minor, refunded_minor FROM outbox.payments"
            " WHERE payment_id = 'p-isk'"
        ).fetchone()
        posted = conn.execute(
            "SELECT kind, amount_minor, currency FROM outbox.ledger_transactions"
            " WHERE payment_id = 'p-isk' ORDER BY id"
        ).fetchall()
    assert intents == [
        ("authorize", "succeeded", 5000),
        ("capture", "succeeded", 4000),
        ("refund", "succeeded", 1000),
    ]
    assert payment == ("partially_refunded", 5000, 4000, 1000)
    assert posted == [("authorize", 5000, "ISK"), ("capture", 4000, "ISK"), ("refund", 1000, "ISK")]
    assert_ledger_balanced(db_url)

    # Reconciliation reads Stripe's units and matches them with the ledger's, exactly.
    exponents = currency_exponents(db_url)

    def transactions(since: datetime, until: datetime) -> AsyncIterator[BalanceTransaction]:
        return adapter.balance_transactions(since, until, exponents=exponents)

    listed = [t async for t in transactions(started, datetime.now(UTC) + timedelta(minutes=1))]
    isk = sorted((t.type, t.amount_minor, t.fee_minor) for t in listed if t.currency == "ISK")
    assert isk == [("charge", 4000, 116), ("refund", -1000, 0)]
    report = await run(
        db_url,
        "stripe",
        transactions,
        since=started,
        until=datetime.now(UTC) + timedelta(minutes=1),
        fees=FeeSchedule(bps=290, fixed_minor=0),
        slack=timedelta(0),
        actor="reconcile:stripe",
    )
    assert report.result.findings == [], [f.detail for f in report.result.findings]
    assert report.result.matched == 4  # the ISK capture and refund, the KWD and JPY charges
    # Without the currency table the ISK amounts cannot be read, rather than be misread.
    with pytest.raises(Exception, match="ISO 4217 exponent"):
        [t async for t in adapter.balance_transactions(started, datetime.now(UTC))]
    assert_audit_intact(db_url)


@pytest.mark.integration
@pytest.mark.anyio
async def test_amounts_stripe_cannot_represent_die_invalid_before_any_request(
    db_url: str, fake: FakeServer, adapter: StripeAdapter
) -> None:
    rows: list[dict[str, Any]] = [
        {"payment_id": "p-kwd", "action": "charge", "amount_minor": 12_345, "currency": "KWD"},
        {"payment_id": "p-mga", "action": "charge", "amount_minor": 12_345, "currency": "MGA"},
        {"payment_id": "p-mga-ok", "action": "charge", "amount_minor": 12_300, "currency": "MGA"},
    ]
    insert_intents(db_url, [{**row, "payment_method": "pm_card_visa"} for row in rows])
    await run_until_settled(db_url, [make_relay(db_url, adapter, instance="grid-relay")])
    with psycopg.connect(db_url) as conn:
        outcome = {
            payment_id: (status, attempts, error_code, message)
            for payment_id, status, attempts, error_code, message in conn.execute(
                "SELECT payment_id, status, attempts, error_code, error_message"
                " FROM outbox.payment_intents"
            )
        }
    assert outcome["p-kwd"][:3] == ("dead", 1, "amount_not_representable")
    assert "last digit 0; use 12340 or 12350 minor units" in outcome["p-kwd"][3]
    assert outcome["p-mga"][:3] == ("dead", 1, "amount_not_representable")
    assert "use 12300 or 12400 minor units" in outcome["p-mga"][3]
    assert outcome["p-mga-ok"][:3] == ("succeeded", 1, None)
    # Neither refused intent reached the provider; the good one arrived in whole ariary.
    sent = {r.headers.get("Idempotency-Key") for r in fake.posts()}
    assert _keys(db_url, "p-kwd")["charge"] not in sent
    assert _keys(db_url, "p-mga")["charge"] not in sent
    effects = (await fake.effects())["effects_by_key"]
    assert effects[_keys(db_url, "p-mga-ok")["charge"]]["amount"] == 123
    assert (await fake.effects())["total_effects"] == 1


@pytest.mark.integration
@pytest.mark.anyio
async def test_the_adapter_refuses_a_departing_currency_without_its_exponent(
    fake: FakeServer, adapter: StripeAdapter
) -> None:
    command = Command(1, "p", Action.CHARGE, "k-no-exp", 5000, "ISK", "pm_card_visa")
    outcome = await adapter.execute(command)
    assert isinstance(outcome, Invalid) and outcome.code == "currency_exponent_unknown"
    assert fake.posts() == []


@pytest.mark.integration
@pytest.mark.anyio
async def test_the_fake_provider_refuses_amounts_off_stripes_grid(fake: FakeServer) -> None:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    for currency, amount in (("isk", "500050"), ("kwd", "5125")):
        response = await fake.control.post(
            "/v1/payment_intents",
            data={"amount": amount, "currency": currency},
            headers=headers,
        )
        assert response.status_code == 400
        error = response.json()["error"]
        assert error["code"] == "invalid_charge_amount_no_decimal_compatible"
    accepted = await fake.control.post(
        "/v1/payment_intents", data={"amount": "500000", "currency": "isk"}, headers=headers
    )
    assert accepted.status_code == 200
