"""The janitor settles intents whose outcome is unknown by a lookup at the provider.

The provider is the fake Stripe-compatible server, in-process, driven through the real
Stripe adapter; the database is a real PostgreSQL.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from provider_adapters.base import Action, Ambiguous, Command, Outcome, Succeeded
from provider_adapters.stripe import StripeAdapter
from relay.core.janitor import Janitor, JanitorOptions, next_check_delay
from relay.core.lanes import Lane
from relay.core.store import Store
from relay.infra.db import Database
from tests.invariants import assert_audit_intact, assert_ledger_balanced
from tests.support.fake_server import API_KEY, FakeServer
from tests.support.intents import insert_intent as insert_one
from tests.support.intents import insert_intents
from tests.support.providers import stripe_adapter
from tests.support.relays import make_relay, run_until_settled

pytestmark = [pytest.mark.integration, pytest.mark.anyio]


@pytest.fixture
async def database(db_url: str) -> AsyncIterator[Database]:
    db = Database(db_url, pool_size=2, name="janitor-test")
    await db.open()
    yield db
    await db.close()


def janitor(db: Database, adapter: StripeAdapter, **options: Any) -> Janitor:
    lane = Lane("stripe", adapter, concurrency=4, timeout_seconds=5.0)
    return Janitor(
        db,
        {"stripe": lane},
        JanitorOptions(instance="jan-1", **options),
        rng=random.Random(3).random,
    )


def insert_intent(
    conn: psycopg.Connection, payment_id: str, action: str, key: str, **extra: Any
) -> int:
    return insert_one(
        conn,
        payment_id=payment_id,
        action=action,
        amount_minor=extra.get("amount", 1000),
        payment_method=extra.get("method", "pm_card_visa"),
        idempotency_key=key,
    )


def make_dead(conn: psycopg.Connection, intent_id: int, code: str = "provider_timeout") -> None:
    """What the relay leaves after its retry budget ran out on ambiguous replies."""
    conn.execute(
        "UPDATE outbox.payment_intents SET status = 'dead', attempts = 8, error_code = %s,"
        " error_message = 'gave up after 8 attempts; last: read timeout', completed_at = now()"
        " WHERE id = %s",
        (code, intent_id),
    )


async def test_ambiguous_dead_intent_is_settled_by_lookup_and_audited(
    db_url: str, database: Database, adapter: StripeAdapter, fake: FakeServer
) -> None:
    # The authorisation took effect at the provider; the relay never learnt it.
    applied = await adapter.execute(
        Command(
            intent_id=1,
            payment_id="p-amb",
            action=Action.AUTHORIZE,
            idempotency_key="key-amb",
            amount_minor=1000,
            currency="EUR",
            payment_method="pm_card_visa",
        )
    )
    assert isinstance(applied, Succeeded)
    with psycopg.connect(db_url, autocommit=True) as conn:
        intent_id = insert_intent(conn, "p-amb", "authorize", "key-amb")
        follower = insert_intent(conn, "p-amb", "capture", "key-amb-capture")
        make_dead(conn, intent_id)
    effects_before = (await fake.effects())["total_effects"]

    done = await janitor(database, adapter).run_once()
    assert done.results == {"settled_succeeded": 1}

    with psycopg.connect(db_url) as conn:
        intent = conn.execute(
            "SELECT status, amount_applied_minor, provider_reference, error_code"
            " FROM outbox.payment_intents WHERE id = %s",
            (intent_id,),
        ).fetchone()
        payment = conn.execute(
            "SELECT state, authorized_minor, provider_reference FROM outbox.payments"
            " WHERE payment_id = 'p-amb'"
        ).fetchone()
        follower_status = conn.execute(
            "SELECT status FROM outbox.payment_intents WHERE id = %s", (follower,)
        ).fetchone()
        trail = conn.execute(
            "SELECT actor, before ->> 'status', after ->> 'status', reason FROM outbox.audit_log"
            " WHERE entity = 'intent' AND entity_id = %s ORDER BY chain_seq",
            (str(intent_id),),
        ).fetchall()
        check = conn.execute(
            "SELECT result, checks, settled_at IS NOT NULL FROM outbox.janitor_checks"
            " WHERE intent_id = %s",
            (intent_id,),
        ).fetchone()
        check_trail = conn.execute(
            "SELECT actor, after ->> 'result' FROM outbox.audit_log"
            " WHERE entity = 'janitor_check' AND entity_id = %s ORDER BY chain_seq",
            (str(intent_id),),
        ).fetchall()
        event = conn.execute(
            "SELECT event_type FROM outbox.events WHERE payload -> 'intent' ->> 'id' = %s",
            (str(intent_id),),
        ).fetchall()
        posted = conn.execute(
            "SELECT kind, amount_minor, posted_by FROM outbox.ledger_transactions"
            " WHERE intent_id = %s",
            (intent_id,),
        ).fetchall()
    assert intent == ("succeeded", 1000, applied.provider_reference, None)
    assert payment == ("authorized", 1000, applied.payment_reference)
    assert follower_status == ("pending",)  # the payment's next intent may go now
    evidence = (
        f"janitor lookup: the provider shows the authorize applied "
        f"({applied.provider_reference}, 1000 EUR)"
    )
    # Taken back and settled in one transaction: no one ever saw it in flight.
    assert trail[-2:] == [
        ("janitor:jan-1", "dead", "in_flight", evidence),
        ("janitor:jan-1", "in_flight", "succeeded", evidence),
    ]
    assert check == ("settled_succeeded", 1, True)
    assert check_trail == [("janitor:jan-1", None), ("janitor:jan-1", "settled_succeeded")]
    assert event == [("payment.authorize.succeeded",)]
    assert posted == [("authorize", 1000, "janitor:jan-1")]
    # A lookup never acts: the provider applied nothing new.
    assert (await fake.effects())["total_effects"] == effects_before
    assert_ledger_balanced(db_url)
    assert_audit_intact(db_url)
    # Settled intents are not looked at again.
    assert (await janitor(database, adapter).run_once()).examined == 0


async def test_no_trace_is_confirmed_on_the_backoff_schedule_then_recorded(
    db_url: str, database: Database, adapter: StripeAdapter, fake: FakeServer
) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        intent_id = insert_intent(conn, "p-none", "charge", "key-never-sent")
        make_dead(conn, intent_id, code="provider_unavailable")
    jan = janitor(database, adapter, not_found_confirmations=2, backoff_base_seconds=60.0)

    assert (await jan.run_once()).results == {"not_found_yet": 1}
    # Not due again until the backoff passed.
    assert (await jan.run_once()).examined == 0
    later = datetime.now(UTC) + timedelta(hours=1)
    assert (await jan.run_once(now=later)).results == {"no_effect": 1}
    assert (await jan.run_once(now=later + timedelta(days=30))).examined == 0
    with psycopg.connect(db_url) as conn:
        status = conn.execute(
            "SELECT status, error_code FROM outbox.payment_intents WHERE id = %s", (intent_id,)
        ).fetchone()
        check = conn.execute(
            "SELECT result, checks, not_found, detail FROM outbox.janitor_checks WHERE intent_id = %s",
            (intent_id,),
        ).fetchone()
    # Nothing happened at the provider: the intent waits for an operator, who may re-drive it.
    assert status == ("dead", "provider_unavailable")
    assert check is not None and check[:3] == ("no_effect", 2, 2)
    assert "safe to re-drive" in check[3]
    assert (await fake.effects())["total_effects"] == 0


async def test_a_lookup_that_fails_is_retried_later(db_url: str, database: Database) -> None:
    async with stripe_adapter("http://127.0.0.1:9") as unreachable:
        with psycopg.connect(db_url, autocommit=True) as conn:
            intent_id = insert_intent(conn, "p-fail", "charge", "key-fail")
            make_dead(conn, intent_id)
        jan = janitor(database, unreachable, backoff_base_seconds=30.0)
        assert (await jan.run_once()).results == {"lookup_failed": 1}
        with psycopg.connect(db_url) as conn:
            row = conn.execute(
                "SELECT result, settled_at, next_check_at > now() + interval '20 seconds'"
                " FROM outbox.janitor_checks WHERE intent_id = %s",
                (intent_id,),
            ).fetchone()
        assert row == ("lookup_failed", None, True)
        assert (await jan.run_once()).examined == 0  # not before its backoff
        later = datetime.now(UTC) + timedelta(minutes=5)
        assert (await jan.run_once(now=later)).results == {"lookup_failed": 1}


async def test_intent_past_the_key_lifetime_is_never_resent_and_the_janitor_settles_it(
    db_url: str, database: Database, adapter: StripeAdapter, fake: FakeServer
) -> None:
    # First attempt took effect 25 hours ago; the reply was lost, a retry was scheduled,
    # and the relay fleet was away for a day.
    applied = await adapter.execute(
        Command(
            intent_id=7,
            payment_id="p-old",
            action=Action.CHARGE,
            idempotency_key="key-old",
            amount_minor=2500,
            currency="EUR",
            payment_method="pm_card_visa",
        )
    )
    assert isinstance(applied, Succeeded)
    with psycopg.connect(db_url, autocommit=True) as conn:
        intent_id = insert_intent(conn, "p-old", "charge", "key-old", amount=2500)
        fresh = insert_intent(conn, "p-new", "charge", "key-new", amount=10)
        conn.execute(
            "UPDATE outbox.payment_intents SET attempts = 1, error_code = 'provider_timeout',"
            " created_at = now() - interval '25 hours' WHERE id = %s",
            (intent_id,),
        )
    claimed = await Store(database).claim("stripe", 10, lease_seconds=30, instance="relay-x")
    assert [c.id for c in claimed] == [fresh]  # the old one is not handed out...
    with psycopg.connect(db_url) as conn:
        parked = conn.execute(
            "SELECT status, attempts, error_code, lease_token FROM outbox.payment_intents"
            " WHERE id = %s",
            (intent_id,),
        ).fetchone()
    assert parked == ("dead", 1, "idempotency_key_expired", None)  # ...it is parked for a lookup

    assert (await janitor(database, adapter).run_once()).results == {"settled_succeeded": 1}
    with psycopg.connect(db_url) as conn:
        settled = conn.execute(
            "SELECT status, amount_applied_minor FROM outbox.payment_intents WHERE id = %s",
            (intent_id,),
        ).fetchone()
    assert settled == ("succeeded", 2500)
    by_key = (await fake.effects())["effects_by_key"]
    assert by_key["key-old"]["count"] == 1  # exactly once, a day later


async def test_a_retry_write_back_past_the_key_lifetime_parks_the_intent(db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        intent_id = insert_intent(conn, "p-late", "charge", "key-late")
        conn.execute(
            "UPDATE outbox.payment_intents SET status = 'in_flight', attempts = 3, lease_token = 9,"
            " lease_expires_at = now() + interval '1 minute',"
            " created_at = now() - interval '2 days' WHERE id = %s",
            (intent_id,),
        )
        # The relay's retry write-back (in_flight -> pending) becomes dead instead.
        conn.execute(
            "UPDATE outbox.payment_intents SET status = 'pending', lease_token = NULL,"
            " lease_expires_at = NULL WHERE id = %s",
            (intent_id,),
        )
        row = conn.execute(
            "SELECT status, error_code, completed_at IS NOT NULL FROM outbox.payment_intents"
            " WHERE id = %s",
            (intent_id,),
        ).fetchone()
        assert row == ("dead", "idempotency_key_expired", True)
        # A lifetime set per provider is honoured.
        conn.execute("INSERT INTO outbox.provider_policies VALUES ('stripe', interval '7 days')")
        other = insert_intent(conn, "p-late2", "charge", "key-late2")
        conn.execute(
            "UPDATE outbox.payment_intents SET status = 'in_flight', attempts = 3, lease_token = 9,"
            " lease_expires_at = now(), created_at = now() - interval '2 days' WHERE id = %s",
            (other,),
        )
        conn.execute(
            "UPDATE outbox.payment_intents SET status = 'pending', lease_token = NULL,"
            " lease_expires_at = NULL WHERE id = %s",
            (other,),
        )
        still = conn.execute(
            "SELECT status FROM outbox.payment_intents WHERE id = %s", (other,)
        ).fetchone()
    assert still == ("pending",)


def test_backoff_doubles_and_is_capped() -> None:
    mid = lambda: 0.5  # noqa: E731  (no jitter at the middle of the range)
    assert [next_check_delay(n, 60, 3600, mid) for n in (1, 2, 3, 4, 7, 20)] == [
        60,
        120,
        240,
        480,
        3600,
        3600,
    ]
    assert next_check_delay(1, 60, 3600, lambda: 0.0) == 45
    assert next_check_delay(1, 60, 3600, lambda: 1.0) == 75


class _LookupsFail(StripeAdapter):
    """The relay's own lookups fail (a search index lagging behind, a failing GET), so the
    relay cannot settle what its ambiguous attempts did and gives up on the intent."""

    async def lookup(self, command: Command) -> Outcome:
        return Ambiguous("lookup_failed", "lookup failed: the provider did not answer it")


@pytest.mark.parametrize(
    ("fault", "max_attempts"),
    [
        # Stripe stores the 500 for the key and replays it: every retry is ambiguous too.
        ("rate_500_after_effect", 3),
        # A retry would replay the stored success, so the budget is one attempt.
        ("rate_timeout_after_effect", 1),
    ],
)
async def test_janitor_settles_a_real_effect_then_failure_to_the_providers_truth(
    db_url: str,
    database: Database,
    fake: FakeServer,
    adapter: StripeAdapter,
    fault: str,
    max_attempts: int,
) -> None:
    """End to end: the fake provider applies the charge, then answers 500 or never answers
    in time; the relay's retries and lookups run out and the intent ends dead; the janitor
    looks it up and settles it as succeeded, with the provider's one effect and no second."""
    blind = _LookupsFail(
        name="stripe", api_key=API_KEY, base_url=fake.url, read_timeout_seconds=0.3
    )
    real = adapter
    try:
        await fake.configure(**{fault: 1.0}, timeout_seconds=1.0)
        insert_intents(
            db_url,
            [
                {
                    "payment_id": "p-fault",
                    "action": "charge",
                    "amount_minor": 1234,
                    "payment_method": "pm_card_visa",
                }
            ],
        )
        relay = make_relay(db_url, blind, instance="fault-relay", max_attempts=max_attempts)
        await run_until_settled(db_url, [relay])
        with psycopg.connect(db_url) as conn:
            died = conn.execute(
                "SELECT id, status, attempts, idempotency_key FROM outbox.payment_intents"
                " WHERE payment_id = 'p-fault'"
            ).fetchone()
        assert died is not None
        intent_id, status, attempts, key = died
        assert (status, attempts) == ("dead", max_attempts)
        effects = await fake.effects()
        assert effects["faults_injected"][fault.removeprefix("rate_")] >= 1
        assert effects["effects_by_key"][key]["count"] == 1  # the charge did happen

        await fake.configure()  # the provider answers normally again
        done = await janitor(database, real).run_once()
        assert done.results == {"settled_succeeded": 1}
        assert (await janitor(database, real).run_once()).results == {}  # settled once

        with psycopg.connect(db_url) as conn:
            intent = conn.execute(
                "SELECT status, amount_applied_minor, provider_reference LIKE 'pi_%%'"
                " FROM outbox.payment_intents WHERE id = %s",
                (intent_id,),
            ).fetchone()
            payment = conn.execute(
                "SELECT state, authorized_minor, captured_minor FROM outbox.payments"
                " WHERE payment_id = 'p-fault'"
            ).fetchone()
            check = conn.execute(
                "SELECT result FROM outbox.janitor_checks WHERE intent_id = %s", (intent_id,)
            ).fetchone()
        assert intent == ("succeeded", 1234, True)
        assert payment == ("captured", 1234, 1234)
        assert check == ("settled_succeeded",)
        effects = await fake.effects()
        assert effects["total_effects"] == 1
        assert effects["effects_by_key"][key]["kinds"] == ["charge"]
        assert_ledger_balanced(db_url)
        assert_audit_intact(db_url)
    finally:
        await blind.aclose()
