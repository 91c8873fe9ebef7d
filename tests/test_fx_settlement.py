"""Converted charges end to end (sql/0029): a real relay, the Stripe SDK, the fake provider.

* a charge converted from EUR keeps its rate when a newer rate arrives; its refund takes
  the charge's rate by default (the customer gets back what they paid, in USD, worth the
  same EUR at that rate), and the difference against the rate in force when the refund
  succeeds is posted to the FX difference journal, balanced, audited;
* the provider settles the charge in the account's currency (EUR) at its own exchange
  rate; reconciliation compares that with our conversion, posts the difference, and opens
  exactly one fx_rate_drift exception (re-runs find the same one) naming both currencies
  when the gap is over the tolerance, none when it is within.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from prometheus_client import REGISTRY

from provider_adapters.stripe import StripeAdapter
from relay.finance.audit import verify_database
from relay.finance.ledger import check_ledger
from relay.finance.reconcile import FeeSchedule, run
from relay.infra.db import Database
from relay.service.depth import DepthSampler
from tests.support.cli import run_cli
from tests.support.fake_server import FakeServer
from tests.support.relays import make_relay, run_until_settled

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

SHA = b"\x02" * 32
NO_FEE_CHECK = FeeSchedule(bps=None)


def add_rate(conn: psycopg.Connection, rate: str, published: datetime) -> int:
    row = conn.execute(
        "INSERT INTO outbox.fx_rates (base, quote, rate, source_kind, source_name, "
        "source_sha256, published_at, valid_from) VALUES ('EUR', 'USD', %s, 'ecb', 'test', "
        "%s, %s, %s) RETURNING id",
        (Decimal(rate), SHA, published, published),
    ).fetchone()
    assert row is not None
    return int(row[0])


def charge_converted(conn: psycopg.Connection, payment_id: str, eur_minor: int) -> tuple[int, int]:
    """The application's transaction: convert, then insert the charge with its rate."""
    with conn.transaction():
        converted, rate_id, via, _age = conn.execute(  # type: ignore[misc]
            "SELECT converted_minor, rate_id, via_rate_id, rate_age "
            "FROM outbox.convert_v1(%s, 'EUR', 'USD')",
            (eur_minor,),
        ).fetchone()
        conn.execute(
            "INSERT INTO outbox.payment_intents (payment_id, action, provider, amount_minor, "
            "currency, payment_method, original_amount_minor, original_currency, fx_rate_id, "
            "fx_via_rate_id) VALUES (%s, 'charge', 'stripe', %s, 'USD', 'pm_card_visa', %s, "
            "'EUR', %s, %s)",
            (payment_id, converted, eur_minor, rate_id, via),
        )
    return int(converted), int(rate_id)


async def settle_in_eur(fake: FakeServer, usd_rate: str) -> None:
    response = await fake.control.post(
        "/_fake/settlement_currency", json={"currency": "eur", "rates": {"usd": usd_rate}}
    )
    response.raise_for_status()


async def reconcile(db_url: str, adapter: StripeAdapter, since: datetime, **fees: Any) -> Any:
    return await run(
        db_url,
        "stripe",
        adapter.balance_transactions,
        since=since,
        until=datetime.now(UTC) + timedelta(minutes=1),
        fees=FeeSchedule(bps=None, **fees),
        slack=timedelta(0),
        actor="operator:carol",
    )


async def test_refund_takes_the_charge_rate_and_books_the_difference(
    db_url: str, conn: psycopg.Connection, fake: FakeServer, adapter: StripeAdapter
) -> None:
    first = add_rate(conn, "1.0876", datetime.now(UTC) - timedelta(hours=2))
    usd, rate_id = charge_converted(conn, "fx-refund", 10000)
    assert (usd, rate_id) == (10876, first)
    await run_until_settled(db_url, [make_relay(db_url, adapter, instance="fx-relay")])

    # Today's rate moves; the charge keeps its own.
    today = add_rate(conn, "1.2000", datetime.now(UTC) - timedelta(minutes=5))
    conn.execute(
        "INSERT INTO outbox.payment_intents (payment_id, action, provider, amount_minor, "
        "currency) VALUES ('fx-refund', 'refund', 'stripe', 5438, 'USD')"
    )
    refund = conn.execute(
        "SELECT id, amount_minor, original_amount_minor, original_currency, fx_rate_id "
        "FROM outbox.payment_intents WHERE payment_id = 'fx-refund' AND action = 'refund'"
    ).fetchone()
    assert refund is not None
    assert refund[1:] == (5438, 5000, "EUR", first)  # 54.38 USD is 50.00 EUR at the charge's rate
    shown = run_cli("intents", "show", str(refund[0]), env={"RELAY_DATABASE_URL": db_url})
    assert (
        "at charge rate  54.38 USD is worth 50.00 EUR at the charge's rate 1.0876" in shown.stdout
    )
    await run_until_settled(db_url, [make_relay(db_url, adapter, instance="fx-relay")])

    charge = conn.execute(
        "SELECT status, fx_rate_id, amount_minor FROM outbox.payment_intents "
        "WHERE payment_id = 'fx-refund' AND action = 'charge'"
    ).fetchone()
    assert charge == ("succeeded", first, 10876)
    posting = conn.execute(
        "SELECT kind, intent_id, source_currency, source_amount_minor, currency, expected_minor, "
        "actual_minor, difference_minor, our_rate_id, compared_rate_id, posted_by "
        "FROM outbox.fx_postings"
    ).fetchall()
    # 54.38 USD at today's 1.2 is 45.32 EUR (45.316..., half even): 4.68 EUR less than at
    # the charge's rate, booked, not lost.
    assert posting == [
        (
            "refund_at_charge_rate",
            refund[0],
            "USD",
            5438,
            "EUR",
            5000,
            4532,
            -468,
            first,
            today,
            "relay:fx-relay",
        )
    ]
    entries = conn.execute(
        "SELECT account, currency, amount_minor FROM outbox.fx_ledger_entries ORDER BY account"
    ).fetchall()
    assert entries == [
        ("stripe:fx_difference", "EUR", -468),
        ("stripe:refund_cost", "EUR", -4532),
        ("stripe:refunded_converted", "EUR", 5000),
    ]
    assert sum(amount for _, _, amount in entries) == 0
    assert verify_database(db_url).intact
    assert check_ledger(db_url).problems == []
    db = Database(db_url, pool_size=1)
    await db.open()
    try:
        await DepthSampler(db, providers=["stripe"]).sample()
    finally:
        await db.close()
    assert (
        REGISTRY.get_sample_value(
            "outbox_relay_fx_difference_minor",
            {"provider": "stripe", "currency": "EUR", "kind": "refund_at_charge_rate"},
        )
        == -468
    )
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):
        conn.execute("UPDATE outbox.fx_postings SET actual_minor = 5000")


async def test_settlement_at_a_drifted_rate_opens_exactly_one_exception(
    db_url: str, conn: psycopg.Connection, fake: FakeServer, adapter: StripeAdapter
) -> None:
    since = datetime.now(UTC) - timedelta(minutes=1)
    first = add_rate(conn, "1.0876", datetime.now(UTC) - timedelta(hours=2))
    await settle_in_eur(fake, "0.8937")  # 1 USD = 0.8937 EUR at the provider; ours 0.91946
    charge_converted(conn, "fx-drift", 10000)
    await run_until_settled(db_url, [make_relay(db_url, adapter, instance="fx-relay")])

    first_run = await reconcile(db_url, adapter, since)
    again = await reconcile(db_url, adapter, since)
    exceptions = conn.execute(
        "SELECT kind, currency, internal_amount_minor, provider_amount_minor, delta_minor, "
        "detail, times_seen FROM outbox.reconciliation_exceptions"
    ).fetchall()
    assert len(exceptions) == 1, exceptions
    kind, currency, ours, theirs, delta, detail, seen = exceptions[0]
    # 108.76 USD x 0.8937 = 97.198... -> 97.20 EUR; ours 108.76 / 1.0876 = 100.00 EUR.
    assert (kind, currency, ours, theirs, delta, seen) == (
        "fx_rate_drift",
        "EUR",
        10000,
        9720,
        -280,
        2,
    )
    assert "108.76 USD" in detail and "97.20 EUR" in detail and "100.00 EUR" in detail
    assert (
        "0.8937" in detail
        and f"rate {first}" in detail
        and "over the tolerance of 200 bps" in detail
    )
    assert [f.kind for f in first_run.result.findings] == ["fx_rate_drift"]
    assert [f.kind for f in again.result.findings] == ["fx_rate_drift"]

    postings = conn.execute(
        "SELECT kind, source_currency, source_amount_minor, currency, expected_minor, "
        "actual_minor, difference_minor, our_rate_id, provider_rate FROM outbox.fx_postings"
    ).fetchall()
    assert postings == [("settlement", "USD", 10876, "EUR", 10000, 9720, -280, first, "0.8937")]
    assert len(first_run.fx_postings) == 1 and again.fx_postings == []
    entries = conn.execute(
        "SELECT account, amount_minor FROM outbox.fx_ledger_entries ORDER BY account"
    ).fetchall()
    assert entries == [
        ("stripe:fx_difference", 280),
        ("stripe:receivable_converted", -10000),
        ("stripe:settled", 9720),
    ]
    assert verify_database(db_url).intact
    shown = run_cli("fx", "differences", env={"RELAY_DATABASE_URL": db_url})
    assert shown.returncode == 0, shown.stderr
    assert "settlement" in shown.stdout and "108.76 USD" in shown.stdout
    assert "100.00 EUR" in shown.stdout and "97.20 EUR" in shown.stdout
    assert "-2.80 EUR" in shown.stdout and "provider 0.8937" in shown.stdout


async def test_settlement_within_the_tolerance_opens_none_and_is_still_booked(
    db_url: str, conn: psycopg.Connection, fake: FakeServer, adapter: StripeAdapter
) -> None:
    since = datetime.now(UTC) - timedelta(minutes=1)
    add_rate(conn, "1.0876", datetime.now(UTC) - timedelta(hours=2))
    await settle_in_eur(fake, "0.9150")  # 0.5 % under ours
    charge_converted(conn, "fx-close", 10000)
    await run_until_settled(db_url, [make_relay(db_url, adapter, instance="fx-relay")])
    report = await reconcile(db_url, adapter, since)
    assert report.result.findings == []
    assert report.result.matched == 1
    assert conn.execute(
        "SELECT expected_minor, actual_minor FROM outbox.fx_postings"
    ).fetchall() == [(10000, 9952)]
    # A tighter tolerance makes the same settlement an exception.
    strict = await reconcile(db_url, adapter, since, fx_tolerance_bps=10)
    assert [f.kind for f in strict.result.findings] == ["fx_rate_drift"]
