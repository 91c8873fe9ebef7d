"""Debounced wake-ups: inserts NOTIFY only while a relay waits for one (sql/0007)."""

from __future__ import annotations

import anyio
import psycopg
import pytest

from provider_adapters.base import Command, Outcome
from provider_adapters.memory import MemoryProvider
from tests.lane_harness import running, wait_until
from tests.relay_harness import insert_intents, make_relay

pytestmark = pytest.mark.integration


def _notified_after_insert(db_url: str, payment_id: str) -> bool:
    with psycopg.connect(db_url, autocommit=True) as listener, psycopg.connect(db_url) as app:
        listener.execute("LISTEN outbox_payment_intents")
        app.execute(
            "INSERT INTO outbox.payment_intents (payment_id, action, provider, amount_minor,"
            " currency, payment_method) VALUES (%s, 'charge', 'stripe', 100, 'EUR', 'pm_card_visa')",
            (payment_id,),
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
    async with running(relay):

        async def idle_asked() -> bool:
            return await anyio.to_thread.run_sync(_wanted, db_url)

        await wait_until(idle_asked)  # idle: inserts should wake it
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

        async def saturated() -> bool:
            return not await anyio.to_thread.run_sync(_wanted, db_url)

        await wait_until(saturated)  # both slots held: no NOTIFY needed
        provider.gate.set()

        async def all_done_and_idle() -> bool:
            return relay.completer.written >= 5 and await idle_asked()

        await wait_until(all_done_and_idle)
