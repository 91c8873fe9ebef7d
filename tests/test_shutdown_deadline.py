"""The whole shutdown fits one deadline counted from the first stop (SIGTERM): in-flight
calls get the grace minus a reserve for the final flush, and the flush of write-backs
ends by that same deadline instead of starting a grace of its own.

The pod's terminationGracePeriodSeconds (the chart requires grace + 15 s) counts from the
signal too, so a flush that began its own grace after the drain could be SIGKILLed.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import anyio
import psycopg
import pytest

from provider_adapters.base import Command, Outcome, Retryable
from relay.core.completer import Completer
from relay.core.lanes import Lane
from relay.core.runtime import (
    SHUTDOWN_FLUSH_MIN_SECONDS,
    Relay,
    RelayOptions,
    flush_reserve_seconds,
)
from relay.domain.intents import WriteBack
from relay.domain.retry_policy import RetryPolicy
from relay.infra.db import Database
from tests.support.intents import insert_intents

pytestmark = pytest.mark.anyio

HANG_GUARD_SECONDS = 60.0  # turns a hang into a failure; no speed limit


def test_flush_reserve_leaves_the_drain_most_of_the_grace() -> None:
    assert flush_reserve_seconds(30.0) == 5.0
    assert flush_reserve_seconds(8.0) == 2.0
    assert flush_reserve_seconds(0.0) == 0.0
    assert SHUTDOWN_FLUSH_MIN_SECONDS > 0


class _HungStore:
    """A database that does not answer a write-back (a partition, a wedged connection)
    until long after any shutdown deadline, then fails like a pool timeout."""

    def __init__(self) -> None:
        self.started = anyio.Event()
        self.cancelled = False

    async def complete_fenced(self, batch: Sequence[WriteBack]) -> set[tuple[int, int]]:
        self.started.set()
        try:
            await anyio.sleep(HANG_GUARD_SECONDS)
        except anyio.get_cancelled_exc_class():
            self.cancelled = True
            raise
        raise psycopg.OperationalError("couldn't get a connection")


async def test_a_hung_write_back_is_abandoned_at_the_deadline() -> None:
    """The shielded flush used to wait for the database however long it took."""
    store = _HungStore()
    completer = Completer(store, flush_seconds=0.0)  # type: ignore[arg-type]
    with anyio.fail_after(2 * HANG_GUARD_SECONDS):
        async with anyio.create_task_group() as tg:
            await tg.start(completer.run)
            await completer.submit(
                WriteBack(intent_id=1, lease_token=1, payment_id="p1", status="succeeded")
            )
            await store.started.wait()  # the write is in progress when the deadline is set
            completer.close(give_up_at=anyio.current_time() + 0.2)
    assert store.cancelled, "the write still running at the deadline was abandoned"
    assert completer.written == 0


class _CallThatOutlastsTheGrace:
    """A provider call that does not end on its own; records when the relay cut it off."""

    name = "slow"

    def __init__(self) -> None:
        self.started = anyio.Event()
        self.cut_off_at: float | None = None

    async def execute(self, command: Command) -> Outcome:
        self.started.set()
        try:
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            self.cut_off_at = anyio.current_time()
            raise
        raise AssertionError("unreachable")

    async def lookup(self, command: Command) -> Outcome:
        return Retryable(code="not_found", message="no trace of the attempt")

    async def aclose(self) -> None:
        return None


async def test_drain_and_flush_share_one_deadline_from_the_stop(db_url: str) -> None:
    grace = 8.0
    adapter = _CallThatOutlastsTheGrace()
    lane = Lane("stripe", adapter, concurrency=4, timeout_seconds=600.0)
    relay = Relay(
        Database(db_url, pool_size=3, name="deadline-relay"),
        {"stripe": lane},
        RetryPolicy(base_seconds=0.01, cap_seconds=0.05, max_attempts=5),
        RelayOptions(
            instance="deadline-relay",
            lease_seconds=600.0,
            poll_interval_seconds=0.05,
            poll_max_interval_seconds=0.2,
            shutdown_grace_seconds=grace,
        ),
        rng=random.Random(1).random,
    )
    insert_intents(
        db_url,
        [
            {
                "payment_id": "p1",
                "action": "authorize",
                "amount_minor": 1000,
                "payment_method": "pm_card_visa",
            }
        ],
    )
    await relay.db.open()
    try:
        with anyio.fail_after(2 * HANG_GUARD_SECONDS):
            async with anyio.create_task_group() as tg:
                await tg.start(relay.run)
                await adapter.started.wait()
                stopped_at = anyio.current_time()
                relay.stop()
                first_deadline = relay.shutdown_deadline
                await anyio.sleep(0.1)
                relay.stop()  # a repeated stop does not move the deadline
                assert relay.shutdown_deadline == first_deadline
                await relay.finished.wait()
    finally:
        await relay.db.close()

    deadline = relay.shutdown_deadline
    assert deadline is not None and deadline >= stopped_at + grace
    # The in-flight call had the grace minus the flush reserve, not the whole grace ...
    assert adapter.cut_off_at is not None
    assert deadline - flush_reserve_seconds(grace) <= adapter.cut_off_at < deadline
    # ... and the flush ends by the same deadline instead of starting a grace of its own.
    assert relay.completer.give_up_at == deadline
    with psycopg.connect(db_url) as conn:
        row = conn.execute(
            "SELECT status, error_code, claimed_by FROM outbox.payment_intents"
        ).fetchone()
    assert row == ("pending", "shutdown_cut_off", None), "handed back, written before exit"
