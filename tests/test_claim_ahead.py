"""Claiming ahead (``RELAY_PROVIDERS__<NAME>__CLAIM_AHEAD``): a lane claims intents beyond
its call slots, which wait in claim order for one. Seen from the provider's side (the fake
provider's request log) and the database: calls never exceed the lane's slots, each
intent is called once under its key, an intent that waited until its lease could no
longer cover a call is handed back unattempted, and a stop hands back those still waiting.
"""

from __future__ import annotations

from collections import Counter

import psycopg
import pytest
from prometheus_client import REGISTRY

from provider_adapters.fake import FaultConfig
from tests.support.fake_server import running_fake
from tests.support.intents import insert_charges
from tests.support.relays import count_status, max_concurrency, provider, relay_for, running
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

TERMINAL = ("succeeded", "failed", "dead")


def _released(provider_name: str, reason: str) -> float:
    value = REGISTRY.get_sample_value(
        "outbox_relay_leases_released_total", {"provider": provider_name, "reason": reason}
    )
    return value or 0.0


async def _attempts(db_url: str, provider_name: str) -> dict[str, tuple[str, int]]:
    async with await psycopg.AsyncConnection.connect(db_url) as conn:
        cur = await conn.execute(
            "SELECT idempotency_key, status, attempts FROM outbox.payment_intents"
            " WHERE provider = %s",
            (provider_name,),
        )
        return {str(key): (str(status), int(n)) for key, status, n in await cur.fetchall()}


async def test_claimed_ahead_intents_wait_for_a_slot_and_each_is_called_once(
    db_url: str,
) -> None:
    async with running_fake(FaultConfig(latency_ms=100)) as fake:
        relay = relay_for(db_url, {"ahead": provider(fake.url, concurrency=3, claim_ahead=6)})
        lane = relay.lanes["ahead"]
        insert_charges(db_url, "ahead", 40, "ahead")
        peak_claimed = 0
        async with running(relay):

            async def finished() -> bool:
                nonlocal peak_claimed
                peak_claimed = max(peak_claimed, lane.in_flight)
                return await count_status(db_url, "ahead", TERMINAL) == 40

            await wait_until(finished, "every intent finished", every=0.01)
            log = await fake.request_log()

    rows = await _attempts(db_url, "ahead")
    assert {status for status, _ in rows.values()} == {"succeeded"}
    assert peak_claimed > 3, "the lane claimed beyond its call slots"
    assert max_concurrency(log) == 3, "calls never exceeded the lane's slots"
    calls = Counter(entry["idempotency_key"] for entry in log)
    assert calls == Counter(dict.fromkeys(rows, 1)), "each intent called once, under its key"
    assert all(attempts == 1 for _, attempts in rows.values())


async def test_an_intent_that_waited_past_its_lease_margin_is_handed_back_unattempted(
    db_url: str,
) -> None:
    # Lease 4 s, call deadline 2 + 0.5 + 1 = 3.5 s, calls of 1 s, one slot: an intent that
    # queued behind a call has at most 3 s of lease left, too little for a call. The read
    # timeout is twice the fake's latency, so a loaded machine does not turn a call into a
    # timeout (and a second attempt).
    released_before = _released("tight", "lease_too_short")
    async with running_fake(FaultConfig(latency_ms=1000)) as fake:
        relay = relay_for(
            db_url,
            {
                "tight": provider(
                    fake.url,
                    concurrency=1,
                    claim_ahead=2,
                    timeout_ms=2000,
                    connect_timeout_ms=500,
                )
            },
            lease_seconds=4.0,
        )
        assert relay.lanes["tight"].call_deadline_seconds == 3.5
        insert_charges(db_url, "tight", 3, "tight")
        async with running(relay):

            async def finished() -> bool:
                return await count_status(db_url, "tight", TERMINAL) == 3

            await wait_until(finished, "every intent finished")
            log = await fake.request_log()
        lease_lost = relay.completer.lease_lost

    rows = await _attempts(db_url, "tight")
    assert {status for status, _ in rows.values()} == {"succeeded"}
    assert _released("tight", "lease_too_short") - released_before >= 2
    calls = Counter(entry["idempotency_key"] for entry in log)
    assert calls == Counter(dict.fromkeys(rows, 1)), "a handed-back intent was never called"
    assert all(attempts == 1 for _, attempts in rows.values()), "hand-backs cost no attempt"
    assert lease_lost == 0


async def test_stop_hands_back_the_intents_waiting_for_a_slot(db_url: str) -> None:
    released_before = _released("queued", "shutdown")
    async with running_fake(FaultConfig(latency_ms=1000)) as fake:
        relay = relay_for(db_url, {"queued": provider(fake.url, concurrency=1, claim_ahead=4)})
        lane = relay.lanes["queued"]
        insert_charges(db_url, "queued", 5, "queued")
        async with running(relay):
            await wait_until(lambda: lane.in_flight == 5, "one call and four intents queued")

            async def slot_holder_sent() -> bool:
                # Claimed is not sent: under load the stop could come before the call left,
                # and the shutdown then (rightly) hands the slot holder back as well.
                return len(await fake.request_log()) >= 1

            await wait_until(slot_holder_sent, "the slot holder's call reached the provider")
        log = await fake.request_log()

    rows = await _attempts(db_url, "queued")
    assert len(log) == 1, "only the intent holding the slot reached the provider"
    assert sorted(status for status, _ in rows.values()) == ["pending"] * 4 + ["succeeded"]
    assert sorted(attempts for _, attempts in rows.values()) == [0, 0, 0, 0, 1]
    assert _released("queued", "shutdown") - released_before == 4
