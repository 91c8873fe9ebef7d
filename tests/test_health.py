"""Probes: /healthz fails only for a wedged loop (never while draining), /readyz accepts a
schema at or above the relay's own migration and names the one that is behind.

Every test owns the clock: HealthState reads a fake one, so nothing here sleeps.
"""

from __future__ import annotations

from collections.abc import Sequence

import anyio
import pytest
from aiohttp.test_utils import TestClient, TestServer

from relay.core.completer import Completer
from relay.domain.intents import WriteBack
from relay.infra.migrate import discover
from relay.service.health import HealthState, Heartbeat, build_app

STALE = 120.0
LATEST = discover()[-1].version
NEXT = f"{int(LATEST) + 1:04d}"
PREVIOUS = f"{int(LATEST) - 1:04d}"


class Clock:
    def __init__(self) -> None:
        self.now = 10_000.0

    def __call__(self) -> float:
        return self.now


class Loops:
    """What the runtime exposes to the probes, set by hand."""

    def __init__(self, clock: Clock) -> None:
        self.claim_turn = clock.now
        self.publisher_turn = clock.now
        self.write_started: float | None = None
        self.draining = False
        self.database_ok = True


def _state(clock: Clock, loops: Loops, schema: str | None = LATEST) -> HealthState:
    state = HealthState(
        heartbeat=lambda: loops.claim_turn,
        database_ok=lambda: loops.database_ok,
        draining=lambda: loops.draining,
        stale_after_seconds=STALE,
        expected_schema=LATEST,
        schema_version=schema,
        loops=[
            Heartbeat("write-back", STALE, busy_since=lambda: loops.write_started),
            Heartbeat("event publisher", 2 * STALE, last_turn=lambda: loops.publisher_turn),
        ],
        clock=clock,
    )
    state.started = True
    return state


# -- liveness ----------------------------------------------------------------------------


def test_live_while_every_loop_turns() -> None:
    clock = Clock()
    loops = Loops(clock)
    state = _state(clock, loops)
    for _ in range(10):
        clock.now += STALE / 2
        loops.claim_turn = loops.publisher_turn = clock.now
        assert state.liveness_problems() == []


def test_a_wedged_claim_loop_fails_liveness() -> None:
    clock = Clock()
    loops = Loops(clock)
    state = _state(clock, loops)
    clock.now += STALE + 1
    loops.publisher_turn = clock.now
    assert state.liveness_problems() == ["claim loop has not turned for 121 s"]


def test_a_wedged_write_back_fails_liveness_an_idle_one_does_not() -> None:
    clock = Clock()
    loops = Loops(clock)
    state = _state(clock, loops)
    clock.now += 10 * STALE  # idle for long: no write in progress, nothing is wrong
    loops.claim_turn = loops.publisher_turn = clock.now
    assert state.liveness_problems() == []
    loops.write_started = clock.now
    clock.now += STALE + 5
    loops.claim_turn = loops.publisher_turn = clock.now
    assert state.liveness_problems() == ["write-back has been stuck for 125 s"]
    loops.write_started = None  # the write returned (or failed and is retried anew)
    assert state.liveness_problems() == []


def test_a_wedged_publisher_fails_liveness_past_its_own_bound() -> None:
    clock = Clock()
    loops = Loops(clock)
    state = _state(clock, loops)
    clock.now += STALE + 1
    loops.claim_turn = clock.now
    assert state.liveness_problems() == [], "the publisher's bound is its own (2 x STALE)"
    clock.now += STALE
    loops.claim_turn = clock.now
    assert state.liveness_problems() == ["event publisher has not turned for 241 s"]


def test_draining_is_alive_however_long_the_drain_takes() -> None:
    clock = Clock()
    loops = Loops(clock)
    state = _state(clock, loops)
    loops.draining = True
    loops.write_started = clock.now
    for _ in range(10):  # a grace far longer than the stale bound: the loops stop turning
        clock.now += STALE
        assert state.liveness_problems() == []
        assert "draining" in state.readiness_problems()


@pytest.mark.anyio
async def test_healthz_answers_503_for_a_wedged_loop_and_200_while_draining() -> None:
    clock = Clock()
    loops = Loops(clock)
    state = _state(clock, loops)
    async with TestClient(TestServer(build_app(state))) as client:
        assert (await client.get("/healthz")).status == 200
        clock.now += STALE + 1  # the claim loop stopped turning
        wedged = await client.get("/healthz")
        assert wedged.status == 503
        assert (await wedged.json())["problems"] == ["claim loop has not turned for 121 s"]
        loops.draining = True  # the same stopped loop, now because of a drain
        assert (await client.get("/healthz")).status == 200
        ready = await client.get("/readyz")
        assert ready.status == 503
        assert (await ready.json())["problems"] == ["draining"]


# -- the write-back's heartbeat -----------------------------------------------------------


class _SlowStore:
    def __init__(self) -> None:
        self.started = anyio.Event()
        self.release = anyio.Event()

    async def complete_fenced(self, batch: Sequence[WriteBack]) -> set[tuple[int, int]]:
        self.started.set()
        await self.release.wait()
        return {(w.intent_id, w.lease_token) for w in batch}


@pytest.mark.anyio
async def test_the_completer_reports_a_write_in_progress_and_only_then() -> None:
    store = _SlowStore()
    completer = Completer(store, flush_seconds=0.0)  # type: ignore[arg-type]
    with anyio.fail_after(60):  # a hang guard, no speed limit
        async with anyio.create_task_group() as tg:
            await tg.start(completer.run)
            try:
                assert completer.busy_since() is None
                before = anyio.current_time()
                await completer.submit(
                    WriteBack(intent_id=1, lease_token=1, payment_id="p1", status="succeeded")
                )
                await store.started.wait()
                since = completer.busy_since()
                assert since is not None and since >= before
            finally:
                store.release.set()  # the write is shielded: a failure must not leave it hung
                completer.close()
    assert completer.busy_since() is None and completer.written == 1


# -- readiness and the schema --------------------------------------------------------------


@pytest.mark.parametrize("schema", [LATEST, NEXT, "9999"])
def test_ready_at_or_above_the_relays_migration(schema: str) -> None:
    """A rolling upgrade migrates first: the relays still on the old version stay ready."""
    clock = Clock()
    assert _state(clock, Loops(clock), schema=schema).readiness_problems() == []


def test_not_ready_when_the_schema_is_behind_and_told_to_migrate() -> None:
    clock = Clock()
    problems = _state(clock, Loops(clock), schema=PREVIOUS).readiness_problems()
    assert problems == [
        f"schema behind: at {PREVIOUS}, relay needs {LATEST}: run `outbox-relay migrate`"
    ]


def test_not_ready_without_a_schema() -> None:
    clock = Clock()
    (problem,) = _state(clock, Loops(clock), schema=None).readiness_problems()
    assert "no migration applied" in problem and "outbox-relay migrate" in problem


def test_versions_compare_as_numbers() -> None:
    """'10000' sorts before '9999' as text; a schema five digits long is still ahead."""
    clock = Clock()
    assert _state(clock, Loops(clock), schema="10000").readiness_problems() == []
