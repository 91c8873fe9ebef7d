"""Idempotency-key lifetimes per provider (issue 19): Stripe keeps keys 24 hours, Adyen 31
days. The database parks an intent already sent once it is older than its provider's
lifetime (sql/0005's guard; ``'adyen'`` gets 31 days from sql/0046), and a relay refuses
to start when the database would let a provider's intents be sent again after that
provider forgot their keys."""

from __future__ import annotations

import psycopg
import pytest
import structlog

from provider_adapters import adyen, stripe
from relay.domain.key_lifetimes import KeyLifetime, compare_key_lifetimes, describe_seconds
from relay.infra.db_startup import StartupRefused
from relay.service.main import check_key_lifetimes
from tests.processes import free_port
from tests.support.cli import run_cli
from tests.support.intents import insert_intent
from tests.support.relays import provider, relay_for

DAY = 86400.0


def test_the_adapters_state_their_providers_lifetimes() -> None:
    assert stripe.StripeAdapter.idempotency_key_lifetime_seconds == DAY
    assert adyen.AdyenAdapter.idempotency_key_lifetime_seconds == 31 * DAY


def test_a_database_lifetime_beyond_the_providers_is_unsafe_and_a_shorter_one_is_not() -> None:
    checks = compare_key_lifetimes(
        {"stripe": DAY, "adyen": 31 * DAY, "adyen_eu": DAY, "misnamed": 31 * DAY, "mem": DAY},
        {"stripe": DAY, "adyen": 31 * DAY, "adyen_eu": 31 * DAY, "misnamed": DAY, "mem": None},
    )
    by_name = {c.provider: c for c in checks}
    assert set(by_name) == {"stripe", "adyen", "adyen_eu", "misnamed"}  # mem states none
    assert [c.provider for c in checks if c.unsafe] == ["misnamed"]
    assert [c.provider for c in checks if c.shorter] == ["adyen_eu"]
    refusal = by_name["misnamed"].refusal()
    assert "'misnamed' intents be sent again until 31 days" in refusal
    assert "keeps idempotency keys only 24 hours" in refusal
    assert "VALUES ('misnamed', interval '24 hours')" in by_name["misnamed"].remedy()
    assert [describe_seconds(s) for s in (DAY, 31 * DAY, 3600, 90.0)] == [
        "24 hours",
        "31 days",
        "1 hours",
        "90 seconds",
    ]
    assert not KeyLifetime("x", DAY, DAY).unsafe and not KeyLifetime("x", DAY, DAY).shorter


@pytest.mark.integration
def test_the_database_keeps_adyen_intents_resendable_for_31_days_and_stripe_for_24_hours(
    db_url: str,
) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        lifetimes = dict(
            conn.execute(
                "SELECT p, outbox.idempotency_key_lifetime(p)::text"
                " FROM unnest(ARRAY['stripe', 'adyen', 'adyen_eu']) AS p"
            ).fetchall()
        )
        assert lifetimes == {"stripe": "24:00:00", "adyen": "31 days", "adyen_eu": "24:00:00"}

        def retried(provider: str, age: str) -> tuple[str, str | None]:
            """An intent sent 3 times, created ``age`` ago, whose retry write-back lands."""
            intent_id = insert_intent(
                conn,
                payment_id=f"kl-{provider}-{age}",
                action="charge",
                provider=provider,
                amount_minor=500,
                payment_method="pm_card_visa",
            )
            conn.execute(
                "UPDATE outbox.payment_intents SET status = 'in_flight', attempts = 3,"
                " lease_token = 9, lease_expires_at = now() + interval '1 minute',"
                " created_at = now() - %s::interval WHERE id = %s",
                (age, intent_id),
            )
            conn.execute(
                "UPDATE outbox.payment_intents SET status = 'pending', lease_token = NULL,"
                " lease_expires_at = NULL WHERE id = %s",
                (intent_id,),
            )
            row = conn.execute(
                "SELECT status, error_code FROM outbox.payment_intents WHERE id = %s",
                (intent_id,),
            ).fetchone()
            assert row is not None
            return row[0], row[1]

        assert retried("adyen", "2 days") == ("pending", None)
        assert retried("adyen", "30 days") == ("pending", None)
        assert retried("adyen", "32 days") == ("dead", "idempotency_key_expired")
        assert retried("stripe", "2 days") == ("dead", "idempotency_key_expired")
        assert retried("adyen_eu", "2 days") == ("dead", "idempotency_key_expired")


@pytest.mark.integration
@pytest.mark.anyio
async def test_a_relay_refuses_a_lifetime_its_provider_does_not_keep(db_url: str) -> None:
    # A Stripe lane named 'adyen' would inherit Adyen's 31 days from sql/0046.
    misnamed = relay_for(db_url, {"adyen": provider("http://127.0.0.1:9")})
    await misnamed.db.open()
    try:
        with pytest.raises(StartupRefused) as info:
            await check_key_lifetimes(misnamed)
    finally:
        await misnamed.db.close()
    assert info.value.code == "idempotency_key_lifetime_too_long"
    assert "'adyen' intents be sent again until 31 days" in str(info.value)
    assert "only 24 hours" in str(info.value)

    adyen_lanes = {
        name: provider("https://checkout-test.adyen.com", kind="adyen", merchant_account="Shop")
        for name in ("adyen", "adyen_eu")
    }
    fine = relay_for(db_url, {"stripe": provider("http://127.0.0.1:9"), **adyen_lanes})
    await fine.db.open()
    try:
        with structlog.testing.capture_logs() as logs:
            await check_key_lifetimes(fine)
    finally:
        await fine.db.close()
        for lane in fine.lanes.values():
            await lane.adapter.aclose()
    (note,) = [e for e in logs if e["event"] == "idempotency_key_lifetime_shorter"]
    assert (note["provider"], note["database"], note["provider_keeps"]) == (
        "adyen_eu",
        "24 hours",
        "31 days",
    )


@pytest.mark.integration
def test_run_exits_2_naming_the_row(db_url: str) -> None:
    done = run_cli(
        "run",
        env={
            "RELAY_DATABASE_URL": db_url,
            "RELAY_HTTP_PORT": str(free_port()),
            "RELAY_PROVIDERS__ADYEN__API_KEY": "sk_test_misnamed",  # kind stripe
        },
    )
    assert done.returncode == 2, done.stderr
    assert "outbox.provider_policies lets 'adyen' intents be sent again" in done.stderr
    assert "(code idempotency_key_lifetime_too_long)" in done.stderr
