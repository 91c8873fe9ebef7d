"""Debounced wake-ups: inserts NOTIFY only while a relay waits for one (sql/0007)."""

from __future__ import annotations

import threading
import time

import anyio
import psycopg
import pytest

from provider_adapters.base import Command, Outcome
from provider_adapters.memory import MemoryProvider
from tests.support.intents import insert_intent, insert_intents
from tests.support.relays import count_status, make_relay, running
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration


def _notified_after_insert(db_url: str, payment_id: str) -> bool:
    with psycopg.connect(db_url, autocommit=True) as listener, psycopg.connect(db_url) as app:
        listener.execute("LISTEN outbox_payment_intents")
        insert_intent(
            app,
            payment_id=payment_id,
            action="charge",
            amount_minor=100,
            payment_method="pm_card_visa",
        )
        app.commit()
        # Bounded wait for a notification that may (correctly) never come.
        return any(True for _ in listener.notifies(timeout=1.0, stop_after=1))


def _wanted(db_url: str) -> bool:
    with psycopg.connect(db_url) as conn:
        row = conn.execute("SELECT wanted FROM outbox.relay_wakeup").fetchone()
    assert row is not None
    return bool(row[0])


def test_inserts_notify_only_while_wakeups_are_wanted(db_url: str) -> None:
    assert _wanted(db_url), "a fresh installation notifies"
    assert _notified_after_insert(db_url, "w-1")
    with psycopg.connect(db_url) as conn:
        conn.execute("UPDATE outbox.relay_wakeup SET wanted = false")
    assert not _notified_after_insert(db_url, "w-2")
    with psycopg.connect(db_url) as conn:
        conn.execute("DELETE FROM outbox.relay_wakeup")
    assert _notified_after_insert(db_url, "w-3"), "no flag row: notify, the safe default"


class GatedProvider(MemoryProvider):
    """A provider that holds every call until the test opens the gate."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = anyio.Event()

    async def execute(self, command: Command) -> Outcome:
        await self.gate.wait()
        return await super().execute(command)


@pytest.mark.anyio
async def test_saturated_relay_stops_wakeups_and_asks_again_when_idle(db_url: str) -> None:
    provider = GatedProvider()
    relay = make_relay(db_url, provider, concurrency=2)
    lane = relay.lanes["stripe"]

    async def wanted() -> bool:
        return await anyio.to_thread.run_sync(_wanted, db_url)

    async def not_wanted() -> bool:
        return not await wanted()

    async with running(relay):
        await wait_until(wanted, "the idle relay to want wake-ups")
        await anyio.to_thread.run_sync(
            insert_intents,
            db_url,
            [
                {
                    "payment_id": f"sat-{n}",
                    "action": "charge",
                    "amount_minor": 100,
                    "payment_method": "pm_card_visa",
                }
                for n in range(5)
            ],
        )
        await wait_until(lambda: lane.in_flight == 2, "both slots held by gated calls")
        await wait_until(not_wanted, "the saturated relay to stop wake-ups")
        assert lane.in_flight == 2 and lane.free_slots == 0, "stopped because it is full"
        assert provider.effects == {}, "no call has finished: the relay is still saturated"

        provider.gate.set()

        async def all_done() -> bool:
            return relay.completer.written >= 5

        await wait_until(all_done, "the five intents written back")
        # Only the relay itself turned wake-ups off above: wanting them again is its doing.
        await wait_until(wanted, "the relay, idle again, to ask for wake-ups")
        assert lane.in_flight == 0

    assert await count_status(db_url, "stripe", ("succeeded",)) == 5
    assert provider.effects == {key: 1 for key in provider.effects} and len(provider.effects) == 5


# -- each relay's wish counts on its own (sql/0031) --------------------------------------


def _wishes(db_url: str) -> list[str]:
    with psycopg.connect(db_url) as conn:
        rows = conn.execute(
            "SELECT instance FROM outbox.relay_wakeup_wants ORDER BY instance"
        ).fetchall()
    return [row[0] for row in rows]


@pytest.mark.anyio
async def test_a_saturated_relay_keeps_wakeups_on_while_another_relay_waits(db_url: str) -> None:
    """Two relays' statements, as their claim loops send them: the idle one's wish keeps
    inserts notifying when the busy one says it needs no wake-ups, and only the last
    relay to become saturated turns them off."""
    idle = make_relay(db_url, MemoryProvider(), instance="relay-idle")
    busy = make_relay(db_url, MemoryProvider(), instance="relay-busy")
    await idle.db.open()
    await busy.db.open()
    try:
        await busy.store.set_wakeups(wanted=False, instance="relay-busy")
        assert not await anyio.to_thread.run_sync(_wanted, db_url), "nobody waits: off"
        await idle.store.set_wakeups(wanted=True, instance="relay-idle")
        await busy.store.set_wakeups(wanted=True, instance="relay-busy")
        await busy.store.set_wakeups(wanted=False, instance="relay-busy")
        assert await anyio.to_thread.run_sync(_wanted, db_url), "relay-idle still waits"
        assert await anyio.to_thread.run_sync(_wishes, db_url) == ["relay-idle"]
        assert await anyio.to_thread.run_sync(_notified_after_insert, db_url, "w-idle")
        await idle.store.set_wakeups(wanted=False, instance="relay-idle")
        assert not await anyio.to_thread.run_sync(_wanted, db_url), "both saturated: off"
        assert await anyio.to_thread.run_sync(_wishes, db_url) == []
    finally:
        await idle.db.close()
        await busy.db.close()


@pytest.mark.anyio
async def test_the_wish_of_a_relay_that_is_gone_does_not_count(db_url: str) -> None:
    """A relay that died while idle leaves its wish; once its heartbeat is stale (the rule
    of sql/0018) the next saturated relay removes it and turns wake-ups off. A wish from
    a relay with no heartbeat row counts: notifying is the safe side."""
    with psycopg.connect(db_url) as conn:
        conn.execute("INSERT INTO outbox.relay_wakeup_wants (instance) VALUES ('gone'), ('silent')")
        conn.execute(
            "INSERT INTO outbox.relay_instances (instance, providers,"
            " heartbeat_interval_seconds, heartbeat_at)"
            " VALUES ('gone', '{stripe}', 5, now() - interval '10 minutes')"
        )
    busy = make_relay(db_url, MemoryProvider(), instance="relay-busy")
    await busy.db.open()
    try:
        await busy.store.set_wakeups(wanted=False, instance="relay-busy")
        assert await anyio.to_thread.run_sync(_wanted, db_url), "'silent' may be alive"
        assert await anyio.to_thread.run_sync(_wishes, db_url) == ["silent"]
        with psycopg.connect(db_url) as conn:
            conn.execute("DELETE FROM outbox.relay_wakeup_wants WHERE instance = 'silent'")
        await busy.store.set_wakeups(wanted=False, instance="relay-busy")
        assert not await anyio.to_thread.run_sync(_wanted, db_url)
    finally:
        await busy.db.close()


@pytest.mark.anyio
async def test_an_idle_relay_is_still_woken_after_another_became_saturated(db_url: str) -> None:
    """Two running relays, each serving its own provider. relay-idle asks for wake-ups;
    then relay-busy fills both its slots with gated calls and says it needs none. Inserts
    go on notifying: relay-idle, which would otherwise poll only every 30 s, takes its
    provider's next intent at once. (With one flag for all relays, relay-busy's word
    silenced relay-idle.)"""
    gated = GatedProvider()
    busy = make_relay(db_url, gated, instance="relay-busy", concurrency=2)
    served = MemoryProvider()
    idle = make_relay(
        db_url,
        served,
        provider="other",
        instance="relay-idle",
        poll_interval_seconds=30.0,
        poll_max_interval_seconds=30.0,
    )
    charge = {"action": "charge", "amount_minor": 100, "payment_method": "pm_card_visa"}
    async with running(idle):
        await wait_until(lambda: anyio.to_thread.run_sync(_wishes, db_url), "relay-idle asks")
        async with running(busy):
            rows = [{**charge, "payment_id": f"busy-{n}"} for n in range(2)]
            await anyio.to_thread.run_sync(insert_intents, db_url, rows)
            await wait_until(lambda: busy.lanes["stripe"].in_flight == 2, "relay-busy full")
            await wait_until(lambda: busy._wakeups_wanted is False, "relay-busy to say so")
            assert await anyio.to_thread.run_sync(_wanted, db_url), "relay-idle still waits"
            late = [{**charge, "payment_id": "other-1", "provider": "other"}]
            await anyio.to_thread.run_sync(insert_intents, db_url, late)
            await wait_until(lambda: len(served.effects) == 1, "relay-idle to charge it")
            gated.gate.set()
            await wait_until(lambda: busy.completer.written >= 2, "relay-busy's two written")


def test_a_wish_made_while_a_skip_decides_is_never_undone(db_url: str) -> None:
    """The race the two statements are written for: relay-a, saturated, holds the flag's
    lock and decides; relay-b asks for wake-ups meanwhile and commits only after relay-a
    has decided. relay-b's request waits for relay-a and then sets the flag, so inserts
    notify again (a want_wakeups that skipped an already-true flag would leave it off)."""
    from relay.infra.queries import QUERIES

    decided = threading.Event()
    errors: list[BaseException] = []

    def relay_b() -> None:
        try:
            with psycopg.connect(db_url) as conn:  # one transaction, committed on exit
                conn.execute(QUERIES["want_wakeups"], {"instance": "relay-b"})
                decided.wait(timeout=30)
        except BaseException as exc:  # reported by the test thread
            errors.append(exc)

    with psycopg.connect(db_url) as relay_a:
        relay_a.execute(QUERIES["lock_wakeup_flag"])
        wisher = threading.Thread(target=relay_b)
        wisher.start()
        time.sleep(0.5)  # relay-b's statement is under way (waiting, or done uncommitted)
        relay_a.execute(QUERIES["skip_wakeups"], {"instance": "relay-a"})
        relay_a.commit()
        decided.set()
        wisher.join(timeout=30)
    assert not wisher.is_alive() and errors == []
    assert _wishes(db_url) == ["relay-b"]
    assert _wanted(db_url), "relay-b waits: inserts must notify"
