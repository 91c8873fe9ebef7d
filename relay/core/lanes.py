"""A lane per provider: the bulkhead around one provider.

Each lane has its own adapter (and so its own HTTP connection pool), slot count, call
deadline, circuit breaker and token-bucket rate limit. The claim loop asks
:meth:`Lane.claimable` before claiming, so a slow or failing provider fills or closes its
own lane and no other, and intents of a provider whose breaker is open stay unclaimed with
their attempts untouched.

Every provider call runs under a deadline a little above the adapter's own timeouts;
hitting it counts as ambiguous (the request may have been sent), never as failure.

A lane may claim ahead (``claim_ahead``): up to that many intents beyond its call slots,
waiting in claim order for a slot, so that calls never wait for a claim round trip and
claims come in larger batches (the loop claims again once half that room is free). An
intent that waited must still be able to finish its call within its lease: the runtime
hands it back, unattempted, when the lease left is shorter than the lane's call deadline
(:attr:`Lane.call_deadline_seconds`).

The breaker's cool-down and the bucket's refill are read from the lane's :class:`Clock`,
and a call waiting for a token sleeps on it, so a test that injects a clock decides when
time passes. The call deadline stays on the event loop's clock: it bounds real I/O.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Literal

import anyio

from provider_adapters.base import Ambiguous, Command, Outcome, ProviderAdapter, Retryable
from provider_adapters.error_catalogue import catalogued_outcome
from relay.core.clock import SYSTEM_CLOCK, Clock
from relay.domain.breaker import BreakerState, CircuitBreaker
from relay.domain.rate_limit import TokenBucket
from relay.infra import metrics

__all__ = ["BreakerSettings", "Lane", "RateLimit"]

# Claims are sized to the tokens a lane gets within this horizon, so claimed intents do
# not sit on their leases waiting for the rate limit.
CLAIM_HORIZON_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class BreakerSettings:
    """The lane's circuit breaker (relay/domain/breaker.py); defaults as in production."""

    failure_threshold: int = 5
    cooldown_seconds: float = 30.0
    half_open_probes: int = 1


@dataclass(frozen=True, slots=True)
class RateLimit:
    """At most ``burst + per_second * t`` calls start in any interval of length t."""

    per_second: float
    burst: int


class Lane:
    def __init__(
        self,
        provider: str,
        adapter: ProviderAdapter,
        *,
        concurrency: int,
        timeout_seconds: float,
        breaker: BreakerSettings = BreakerSettings(),
        rate_limit: RateLimit | None = None,
        clock: Clock = SYSTEM_CLOCK,
        claim_ahead: int = 0,
    ) -> None:
        if claim_ahead < 0:
            raise ValueError("claim_ahead must be 0 or more")
        self.provider = provider
        self.adapter = adapter
        # The error catalogue's provider column for this lane's codes (stripe, adyen).
        self.kind = str(getattr(adapter, "kind", provider))
        self.concurrency = concurrency
        self.timeout_seconds = timeout_seconds
        self.clock = clock
        self.breaker = CircuitBreaker(
            failure_threshold=breaker.failure_threshold,
            cooldown_seconds=breaker.cooldown_seconds,
            half_open_probes=breaker.half_open_probes,
            clock=clock.now,
        )
        self.bucket = (
            None
            if rate_limit is None
            else TokenBucket(rate=rate_limit.per_second, burst=rate_limit.burst, clock=clock.now)
        )
        self.claim_ahead = claim_ahead
        self.in_flight = 0  # claimed and not yet finished
        self.waiting = 0  # claimed, not yet admitted to the provider
        # The lane's own metric children, looked up once (labels() takes a lock per call).
        self._in_flight_gauge = metrics.IN_FLIGHT.labels(provider=provider)
        self._breaker_gauge = metrics.BREAKER_STATE.labels(provider=provider)
        self._call_seconds: dict[str, Any] = {}
        self._free_calls = concurrency  # call slots nobody holds
        self._slot_queue: deque[_SlotTicket] = deque()  # claimed intents waiting for one
        self._report_breaker()

    # -- capacity ------------------------------------------------------------------------

    @property
    def free_slots(self) -> int:
        """Room for claimed intents: the call slots plus the claim-ahead, less those held."""
        return max(self.concurrency + self.claim_ahead - self.in_flight, 0)

    @property
    def call_deadline_seconds(self) -> float:
        """The longest one provider call may take on this lane (the guard of :meth:`execute`)."""
        return self.timeout_seconds + 1.0

    def claimable(self) -> int:
        """How many intents the claim loop may claim for this lane right now."""
        room = self.free_slots
        if self._slot_queue and room < (self.claim_ahead + 1) // 2:
            # Intents claimed ahead keep every call slot busy: wait until half the
            # claim-ahead room is free and claim it in one batch.
            return 0
        allowance = self.breaker.allowance()
        self._report_breaker()
        if allowance is not None:
            room = min(room, allowance - self.waiting)
        if self.bucket is not None:
            room = min(room, self.bucket.obtainable_within(CLAIM_HORIZON_SECONDS) - self.waiting)
        return max(room, 0)

    def seconds_until_capacity(self) -> float | None:
        """When a lane blocked by its breaker or rate limit may take work again."""
        if self.free_slots == 0:
            return None  # a finishing call wakes the loop
        if self.breaker.state is BreakerState.OPEN:
            return self.breaker.seconds_until_half_open()
        if self.bucket is not None:
            return self.bucket.seconds_until_token()
        return None

    def acquire(self) -> None:
        self.in_flight += 1
        self.waiting += 1
        self._in_flight_gauge.set(self.in_flight)

    def release(self, *, admission_asked: bool) -> None:
        """A claimed intent is done; ``admission_asked``: :meth:`admit` ran for it."""
        self.in_flight -= 1
        if not admission_asked:
            self.waiting -= 1
        self._in_flight_gauge.set(self.in_flight)

    # -- calls ---------------------------------------------------------------------------

    async def take_call_slot(self, stop: anyio.Event) -> Literal["now", "waited"] | None:
        """A call slot for a claimed intent, in claim order: ``"now"`` when one was free,
        ``"waited"`` after queueing for one (only with ``claim_ahead``), None when the relay
        stopped first (hand the intent back). Give it back with :meth:`give_call_slot`."""
        if self._free_calls > 0 and not self._slot_queue:
            self._free_calls -= 1
            return "now"
        ticket = _SlotTicket()
        self._slot_queue.append(ticket)
        try:
            while not ticket.granted:
                if stop.is_set():
                    self._slot_queue.remove(ticket)
                    return None
                await ticket.event.wait()
                ticket.event = anyio.Event()
        except BaseException:
            if ticket.granted:
                self.give_call_slot()  # handed over as we were cancelled: pass it on
            else:
                self._slot_queue.remove(ticket)
            raise
        return "waited"

    def give_call_slot(self) -> None:
        """A call slot is free again: hand it to the longest-waiting intent, if any."""
        if self._slot_queue:
            ticket = self._slot_queue.popleft()
            ticket.granted = True
            ticket.event.set()
        else:
            self._free_calls += 1

    def stop_waiting(self) -> None:
        """The relay stops: every intent waiting for a call slot is handed back."""
        for ticket in self._slot_queue:
            ticket.event.set()

    async def admit(self, stop: anyio.Event) -> bool:
        """Wait for a rate-limit token, then pass the breaker; False: do not call.

        False when the relay is stopping or the breaker refuses; the caller hands the
        intent back without consuming its attempt.
        """
        try:
            if self.bucket is not None:
                while not self.bucket.try_take():
                    await self._sleep_unless_stopped(self.bucket.seconds_until_token(), stop)
                    if stop.is_set():
                        return False
            admitted = not stop.is_set() and self.breaker.try_start()
            self._report_breaker()
            if not admitted and self.bucket is not None:
                self.bucket.give_back()  # no call: the provider's budget is spent on calls only
            return admitted
        finally:
            self.waiting -= 1

    async def execute(self, command: Command) -> Outcome:
        """The adapter's outcome in the error catalogue's class for its code
        (:func:`~provider_adapters.error_catalogue.catalogued_outcome`). The breaker
        counts the adapter's own reading: it measures the provider's health, which a
        row that makes a refusal retryable does not change."""
        outcome = await self._guarded(command, lookup=False)
        # A request the provider accepted for later confirmation is a healthy answer: it
        # must not open the breaker (every Adyen capture would count as a failure).
        accepted = isinstance(outcome, Ambiguous) and outcome.awaits_confirmation
        if isinstance(outcome, Retryable | Ambiguous) and not accepted:
            self.breaker.record_failure()
        else:
            self.breaker.record_success()
        self._report_breaker()
        return catalogued_outcome(self.kind, outcome)

    async def lookup(self, command: Command) -> Outcome:
        return await self._guarded(command, lookup=True)

    def cancel_admission(self) -> None:
        """Undo :meth:`admit` for a call that will not be made: its breaker probe and its
        rate-limit token go back, so the provider's budget is spent on calls only."""
        self.breaker.cancel_start()
        if self.bucket is not None:
            self.bucket.give_back()

    async def _sleep_unless_stopped(self, seconds: float, stop: anyio.Event) -> None:
        """Return after ``seconds`` on the lane's clock, or as soon as ``stop`` is set."""
        if self.clock.sleep is anyio.sleep:
            # The event loop's own clock (every production lane): a deadline on the stop
            # wait, without a task per token wait.
            with anyio.move_on_after(seconds):
                await stop.wait()
            return
        async with anyio.create_task_group() as waits:

            async def sleep_then_end() -> None:
                await self.clock.sleep(seconds)
                waits.cancel_scope.cancel()

            waits.start_soon(sleep_then_end)
            await stop.wait()
            waits.cancel_scope.cancel()

    async def _guarded(self, command: Command, *, lookup: bool) -> Outcome:
        started = time.perf_counter()
        call = self.adapter.lookup if lookup else self.adapter.execute
        outcome: Outcome = Ambiguous(
            "provider_timeout",
            f"no answer within the lane deadline of {self.timeout_seconds:g} s",
        )
        with anyio.move_on_after(self.call_deadline_seconds):
            outcome = await call(command)
        action = str(command.action)
        histogram = self._call_seconds.get(action)
        if histogram is None:
            histogram = metrics.PROVIDER_CALL_SECONDS.labels(provider=self.provider, action=action)
            self._call_seconds[action] = histogram
        histogram.observe(time.perf_counter() - started)
        return outcome

    def _report_breaker(self) -> None:
        self._breaker_gauge.set(int(self.breaker.state))


class _SlotTicket:
    """A claimed intent's place in the queue for a call slot."""

    __slots__ = ("event", "granted")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.granted = False
