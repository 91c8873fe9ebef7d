"""Debounced wake-ups: inserts NOTIFY only while a relay waits for one (sql/0007)."""

from __future__ import annotations

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
