"""Failover for new payments (issue 20, sql/0064), against real PostgreSQL and two fakes.

The primary's fake sits behind a TCP proxy. First the proxy accepts and drops connections (a
request may have left: ambiguous); then it refuses them (nothing can leave). A relay that
serves only the primary moves routed new payments to the rule's next target, on a connect
failure (fenced by its lease) and, once its breaker is open, unclaimed; a second relay,
serving only the fallback, completes them. Never moved: the payment with an ambiguous
attempt, and the payment whose provider the application named.
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import psycopg
import pytest
from prometheus_client import REGISTRY

from provider_adapters.base import Action, Command, Retryable
from provider_adapters.fake import FaultConfig
from relay.core.lanes import Lane
from relay.core.runtime import Relay
from relay.domain.breaker import BreakerState
from relay.infra.queries import QUERIES
from relay.operations.providers import set_provider, set_rule
from relay.service.main import build_lane
from tests.invariants import assert_audit_intact
from tests.login_roles import login_role
from tests.processes import free_port
from tests.support.adyen import adyen_adapter
from tests.support.cli import run_cli
from tests.support.fake_server import FakeServer, running_fake
from tests.support.intents import register_provider
from tests.support.providers import stripe_adapter
from tests.support.relays import provider, relay_with_lanes, running
from tests.support.waiting import wait_until
from tests.tcp_proxy import TcpProxy

pytestmark = pytest.mark.anyio

FIRST = (
    "INSERT INTO outbox.payment_intents (payment_id, action, provider, amount_minor, currency,"
    " payment_method) VALUES (%s, 'authorize', %s, 1000, 'EUR', 'pm_card_visa')"
)


def _relay(db_url: str, instance: str, name: str, lane: Lane) -> Relay:
    # 50 attempts: half the fallback's calls answer 503, and no payment may die of it.
    return relay_with_lanes(db_url, {name: lane}, instance=instance, max_attempts=50, seed=3)


def _intents(conn: psycopg.Connection) -> dict[str, dict[str, Any]]:
    cur = conn.cursor(row_factory=psycopg.rows.dict_row)
    rows = cur.execute(
        "SELECT i.payment_id, i.id, i.provider, i.status, i.attempts, i.unsent_attempts,"
        " i.idempotency_key, i.error_code, p.provider AS payment_provider, p.failed_over_from"
        " FROM outbox.payment_intents AS i JOIN outbox.payments AS p USING (payment_id)"
    ).fetchall()
    return {row["payment_id"]: row for row in rows}


def _failovers(trigger: str) -> float:
    labels = {"from_provider": "stripe", "to_provider": "backup", "trigger": trigger}
    return REGISTRY.get_sample_value("outbox_relay_failovers_total", labels) or 0.0


async def _effect_keys(fake: FakeServer) -> set[str]:
    return set((await fake.effects())["effects_by_key"])


async def test_new_payments_fail_over_only_when_nothing_reached_the_primary(
    db_url: str, conn: psycopg.Connection
) -> None:
    register_provider(conn, "stripe")
    register_provider(conn, "backup")
    set_rule(
        conn,
        operator="alice",
        name="main",
        fields={"providers": ["stripe", "backup"]},
        reason="stripe first, backup when it is down",
        create=True,
    )
    before = {t: _failovers(t) for t in ("connect_failed", "breaker_open")}
    # Half the fallback's calls answer 503 (nothing happened, retry): its attempts repeat.
    async with (
        running_fake() as primary,
        running_fake(FaultConfig(rate_503=0.5, seed=11)) as fallback,
        anyio.create_task_group() as proxies,
    ):
        proxy = TcpProxy(primary.url)
        await proxies.start(proxy.serve)
        primary_settings = provider(
            proxy.url, breaker_failure_threshold=3, breaker_cooldown_seconds=600.0
        )

        # 1. The proxy drops each connection it accepted: the request may have left.
        proxy.cut()
        conn.execute(FIRST, ("ambiguous", None))
        # running() closes each relay's lanes when it stops.
        lane_a0 = build_lane("stripe", primary_settings)
        async with running(_relay(db_url, "relay-a0", "stripe", lane_a0)):
            await wait_until(
                lambda: (
                    _intents(conn)["ambiguous"]["attempts"] >= 1
                    and _intents(conn)["ambiguous"]["status"] == "pending"
                ),
                "an ambiguous attempt of the first payment",
            )
        ambiguous = _intents(conn)["ambiguous"]
        assert ambiguous["unsent_attempts"] == 0, ambiguous

        # 2. The primary refuses connections: nothing can reach it.
        proxy.refuse()
        first_wave = [f"new{n}" for n in range(4)]
        for pid in first_wave:
            conn.execute(FIRST, (pid, None))
        conn.execute(FIRST, ("named", "stripe"))  # the application chose the provider
        lane_a = build_lane("stripe", primary_settings)
        lane_b = build_lane("backup", provider(fallback.url, breaker_failure_threshold=1000))
        relay_a = _relay(db_url, "relay-a", "stripe", lane_a)
        relay_b = _relay(db_url, "relay-b", "backup", lane_b)
        async with running(relay_a), running(relay_b):
            await wait_until(
                lambda: (
                    lane_a.breaker.state is BreakerState.OPEN
                    and all(_intents(conn)[p]["provider"] == "backup" for p in first_wave)
                ),
                "the primary's breaker open and the first wave moved",
            )
            # Inserted behind the open breaker: relay-a claims nothing, its sweep moves them.
            second_wave = [f"later{n}" for n in range(3)]
            for pid in second_wave:
                conn.execute(FIRST, (pid, None))
            moved = first_wave + second_wave
            await wait_until(
                lambda: all(_intents(conn)[p]["status"] == "succeeded" for p in moved),
                "every moved payment succeeded at the fallback",
            )
        rows = _intents(conn)
        # One failover counted per moved payment, by what moved it: a connect failure
        # (the first wave, until the breaker opened) or the open breaker's sweep.
        counted = {t: _failovers(t) - before[t] for t in before}
        assert counted["connect_failed"] >= 1, counted
        assert counted["breaker_open"] >= len(second_wave), counted
        assert sum(counted.values()) == len(moved), counted

        # Never moved: an intent that may have reached its provider, a named provider.
        for pid in ("ambiguous", "named"):
            assert rows[pid]["provider"] == rows[pid]["payment_provider"] == "stripe", rows[pid]
            assert rows[pid]["failed_over_from"] is None
        assert rows["ambiguous"]["idempotency_key"] == ambiguous["idempotency_key"]
        # Its attempts through the cut may have left; every later one was refused (unsent).
        may_have_left = rows["ambiguous"]["attempts"] - rows["ambiguous"]["unsent_attempts"]
        assert may_have_left == ambiguous["attempts"], (ambiguous, rows["ambiguous"])

        # Moved ones: at the fallback, under a new key, every attempt there with that key.
        audit = conn.cursor(row_factory=psycopg.rows.dict_row)
        original: dict[str, str] = {}
        for pid in moved:
            row = rows[pid]
            assert row["payment_provider"] == "backup" and row["failed_over_from"] == ["stripe"]
            (change,) = audit.execute(
                "SELECT actor, reason, before, after FROM outbox.audit_log"
                " WHERE entity = 'intent' AND entity_id = %s AND after ->> 'provider' = 'backup'",
                (str(row["id"]),),
            ).fetchall()
            assert change["actor"] == "relay:relay-a", change
            assert change["reason"].startswith("failover from stripe to backup (rule main v1)")
            assert change["before"]["provider"] == "stripe"
            assert change["after"]["idempotency_key"] == row["idempotency_key"]
            original[pid] = change["before"]["idempotency_key"]
            assert original[pid] != row["idempotency_key"]
            assert audit.execute(
                "SELECT count(*) AS n FROM outbox.audit_log WHERE entity = 'payment'"
                " AND entity_id = %s AND before ->> 'provider' = 'stripe'"
                " AND after ->> 'provider' = 'backup'",
                (pid,),
            ).fetchone() == {"n": 1}

        sent = Counter(r.headers.get("Idempotency-Key") for r in fallback.posts())
        new_keys = {rows[pid]["idempotency_key"] for pid in moved}
        assert set(sent) == new_keys, "the fallback saw only the new keys"
        for pid in moved:
            assert sent[rows[pid]["idempotency_key"]] == rows[pid]["attempts"]
        assert sum(sent.values()) > len(moved), "some payment took several attempts there"

        # No payment has an effect at both providers; each moved one exactly one at the fallback.
        at_primary = await _effect_keys(primary)
        at_fallback = (await fallback.effects())["effects_by_key"]
        assert {k: v["count"] for k, v in at_fallback.items()} == {k: 1 for k in new_keys}
        for pid in moved:
            assert original[pid] not in at_primary and original[pid] not in at_fallback
        assert ambiguous["idempotency_key"] not in at_fallback
        proxies.cancel_scope.cancel()  # last: nothing after it in this block would run

    assert_audit_intact(db_url)


def test_which_intents_may_fail_over(db_url: str, conn: psycopg.Connection) -> None:
    """The rules of sql/0064 one by one, on the named statements the relay runs, as the
    relay's own database role."""
    with (
        login_role(db_url, "outbox_relay") as relay_url,
        psycopg.connect(relay_url, autocommit=True) as relay,
    ):
        _which_intents_may_fail_over(db_url, conn, relay)


def _which_intents_may_fail_over(
    db_url: str, conn: psycopg.Connection, relay: psycopg.Connection
) -> None:
    for name in ("stripe", "backup", "off"):
        register_provider(conn, name)
    set_provider(conn, operator="alice", name="off", enabled=False, reason="kill switch")
    set_rule(
        conn,
        operator="alice",
        name="main",
        fields={"providers": ["stripe", "off", "backup"]},
        reason="t",
        create=True,
    )
    relay.execute("SELECT set_config('outbox.actor', 'relay:t', false)")

    def claim() -> list[tuple[int, int]]:
        params = {"provider": "stripe", "limit": 10, "lease_seconds": 60, "instance": "t"}
        rows = relay.execute(QUERIES["claim_intents"], {**params, "now": None}).fetchall()
        return [(row[0], row[9]) for row in rows]  # id, lease_token

    # A relay died during the call (its lease expired): the request may have left.
    conn.execute(FIRST, ("crashed", None))
    assert len(claim()) == 1
    later = datetime.now(UTC) + timedelta(hours=1)
    relay.execute(QUERIES["requeue_expired_leases"], {"limit": 10, "now": later})
    # A claimed intent whose attempt could not connect: fenced by its lease token.
    conn.execute(FIRST, ("claimed", None))
    ((claimed_id, token),) = claim()
    fence = {"id": claimed_id, "why": "could not connect"}
    assert (
        relay.execute(QUERIES["fail_over_claimed"], {**fence, "lease_token": token + 1}).fetchall()
        == []
    )
    (moved,) = relay.execute(
        QUERIES["fail_over_claimed"], {**fence, "lease_token": token}
    ).fetchall()
    assert moved[2:4] == ("stripe", "backup")  # past the disabled target

    conn.execute(FIRST, ("fresh", None))
    conn.execute(FIRST, ("named", "stripe"))
    conn.execute(FIRST, ("with_capture", None))
    conn.execute(
        "INSERT INTO outbox.payment_intents (payment_id, action, currency) "
        "VALUES ('with_capture', 'capture', 'EUR')"
    )
    # The application's own key, already taken at the fallback by what the new key would be.
    keyed = FIRST.replace("payment_method)", "payment_method, idempotency_key)").replace(
        "'pm_card_visa')", "'pm_card_visa', %s)"
    )
    conn.execute(keyed, ("squatter", "backup", "k1.fo.backup"))
    conn.execute(keyed, ("own_key", None, "k1"))
    sweep = {"limit": 10, "why": "breaker open"}
    rows = relay.execute(QUERIES["fail_over_pending"], {**sweep, "provider": "stripe"}).fetchall()
    assert sorted(r[1] for r in rows) == ["fresh", "own_key", "with_capture"]
    new_keys = {r[1]: r[4] for r in rows}
    assert new_keys["fresh"].endswith(".fo.backup")
    assert new_keys["own_key"].startswith("outbox_fo_")  # made unique by the intent's id
    providers = dict(
        conn.execute(
            "SELECT payment_id || ':' || action, provider FROM outbox.payment_intents"
        ).fetchall()
    )
    assert providers == {
        "crashed:authorize": "stripe",
        "claimed:authorize": "backup",
        "fresh:authorize": "backup",
        "named:authorize": "stripe",
        "own_key:authorize": "backup",
        "squatter:authorize": "backup",
        "with_capture:authorize": "backup",
        "with_capture:capture": "backup",  # blocked behind it, follows its payment
    }
    # An operator re-drives the crashed one once it is dead: its attempts count from 0 again,
    # and it still never fails over (maybe_sent keeps what the count showed).
    conn.execute(
        "UPDATE outbox.payment_intents SET status = 'dead', completed_at = now()"
        " WHERE payment_id = 'crashed'"
    )
    conn.execute(
        "SELECT outbox.retry_dead_intents(ARRAY[id], 'alice', true)"
        " FROM outbox.payment_intents WHERE payment_id = 'crashed'"
    )
    assert conn.execute(
        "SELECT status, attempts, maybe_sent FROM outbox.payment_intents"
        " WHERE payment_id = 'crashed'"
    ).fetchone() == ("pending", 0, True)
    assert (
        relay.execute(QUERIES["fail_over_pending"], {**sweep, "provider": "stripe"}).fetchall()
        == []
    )
    # Never back to a provider it left, never to a disabled one: nothing left to move to.
    assert (
        relay.execute(QUERIES["fail_over_pending"], {**sweep, "provider": "backup"}).fetchall()
        == []
    )

    shown = run_cli("intents", "show", str(claimed_id), env={"RELAY_DATABASE_URL": db_url})
    assert "failed over from stripe to backup" in shown.stdout, shown.stdout
    assert "failover from stripe to backup (rule main v1): could not connect" in shown.stdout
    assert_audit_intact(db_url)


async def test_a_refused_connection_is_unsent_for_both_adapters() -> None:
    """What makes an attempt count as unsent (UNSENT_CODES) is what each real adapter says
    when connecting is refused; a connection dropped after it was accepted is not unsent."""
    refused = f"http://127.0.0.1:{free_port()}"  # nothing listens there: connecting is refused
    command = Command(1, "p1", Action.AUTHORIZE, "k1", 1000, "EUR", "pm_card_visa", exponent=2)
    async with adyen_adapter(refused) as adyen, stripe_adapter(refused) as stripe:
        for adapter in (adyen, stripe):
            outcome = await adapter.execute(command)
            assert isinstance(outcome, Retryable) and outcome.unsent, outcome
    async with running_fake() as fake:
        proxy = TcpProxy(fake.url)
        async with anyio.create_task_group() as tg:
            await tg.start(proxy.serve)
            proxy.cut()  # accepts, then closes: the request may have left
            async with stripe_adapter(proxy.url) as stripe:
                outcome = await stripe.execute(command)
            assert not (isinstance(outcome, Retryable) and outcome.unsent), outcome
            tg.cancel_scope.cancel()
