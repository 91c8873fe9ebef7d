"""The relay loop: claim, dispatch through lanes, hand outcomes to the completer.

One task group owns every task. Guarantees:

* no transaction or row lock is held while a provider is called: the claim commits first;
* the state machine is checked before any provider call, so an invalid command never
  reaches the provider;
* every attempt of an intent sends the intent's stored idempotency key;
* an ambiguous reply is settled by a lookup at the provider before anything is written;
* the loop claims only what free lane slots and the global in-flight cap can take;
* on stop: claiming stops, in-flight calls get ``shutdown_grace_seconds`` to finish, and
  pending outcomes are flushed; anything cut off is re-driven after its lease expires.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping

import anyio
import structlog
from anyio.abc import TaskGroup, TaskStatus

from provider_adapters.base import Ambiguous, Command, Declined, Succeeded
from relay import metrics
from relay.completer import Completer
from relay.db import RETRYABLE_DB_ERRORS, Database, listen_forever
from relay.lanes import Lane
from relay.outcome_mapping import from_outcome, from_rejection
from relay.retry_policy import RetryPolicy
from relay.state_machine import Rejection, decide
from relay.store import ClaimedIntent, Store

__all__ = ["Relay", "RelayOptions"]

log = structlog.get_logger("relay")


class RelayOptions:
    def __init__(
        self,
        *,
        instance: str,
        batch_size: int = 100,
        max_in_flight: int = 256,
        lease_seconds: float = 60.0,
        poll_interval_seconds: float = 1.0,
        poll_max_interval_seconds: float = 5.0,
        completer_batch_size: int = 500,
        completer_flush_seconds: float = 0.01,
        shutdown_grace_seconds: float = 30.0,
        listen: bool = True,
    ) -> None:
        self.instance = instance
        self.batch_size = batch_size
        self.max_in_flight = max_in_flight
        self.lease_seconds = lease_seconds
        self.poll_interval_seconds = poll_interval_seconds
        self.poll_max_interval_seconds = poll_max_interval_seconds
        self.completer_batch_size = completer_batch_size
        self.completer_flush_seconds = completer_flush_seconds
        self.shutdown_grace_seconds = shutdown_grace_seconds
        self.listen = listen


class Relay:
    def __init__(
        self,
        db: Database,
        lanes: Mapping[str, Lane],
        policy: RetryPolicy,
        options: RelayOptions,
        *,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.db = db
        self.store = Store(db)
        self.lanes = dict(lanes)
        self.policy = policy
        self.options = options
        self.rng = rng
        self.completer = Completer(
            self.store,
            batch_size=options.completer_batch_size,
            flush_seconds=options.completer_flush_seconds,
            on_flushed=lambda _n: self.wake(),
        )
        self.in_flight = 0
        self.claimed_total = 0
        self._wake_event = anyio.Event()
        self._stopping = False
        self._drained = anyio.Event()
        self.finished = anyio.Event()

    # -- control -------------------------------------------------------------------------

    def wake(self) -> None:
        self._wake_event.set()

    def stop(self) -> None:
        """Stop claiming and drain; :meth:`run` returns when drained or out of grace."""
        self._stopping = True
        self.wake()

    @property
    def stopping(self) -> bool:
        return self._stopping

    # -- main ----------------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async with anyio.create_task_group() as tg:
            await tg.start(self.completer.run)
            async with anyio.create_task_group() as helpers:
                if self.options.listen:
                    helpers.start_soon(self._listen)
                helpers.start_soon(self._reaper)
                task_status.started()
                await self._claim_and_dispatch()
                helpers.cancel_scope.cancel()
            # Workers are done (or cut off): the completer flushes what is pending, then
            # returns; past the grace it abandons the rest (leases expire, keys are reused).
            self.completer.close(give_up_after=self.options.shutdown_grace_seconds)
        self.finished.set()
        log.info("relay_stopped", claimed=self.claimed_total, lease_lost=self.completer.lease_lost)

    async def _listen(self) -> None:
        await listen_forever(self.db.conninfo, self.wake)

    async def _reaper(self) -> None:
        interval = min(max(self.options.lease_seconds / 4, 0.5), 15.0)
        while True:
            await anyio.sleep(interval * (0.75 + self.rng() / 2))
            try:
                requeued = await self.store.requeue_expired()
            except RETRYABLE_DB_ERRORS as exc:
                log.warning("reaper_db_error", error=type(exc).__name__)
                continue
            if requeued:
                log.info("leases_expired_requeued", intents=requeued)
                self.wake()

    async def _claim_and_dispatch(self) -> None:
        idle = self.options.poll_interval_seconds
        async with anyio.create_task_group() as workers:
            while not self._stopping:
                self._wake_event = anyio.Event()
                try:
                    claimed, full = await self._claim_once(workers)
                except RETRYABLE_DB_ERRORS as exc:
                    log.warning("claim_db_error", error=type(exc).__name__, retry_in=idle)
                    claimed, full = 0, False
                if claimed and not full:
                    idle = self.options.poll_interval_seconds
                    continue  # there may be more right away
                if claimed:
                    idle = self.options.poll_interval_seconds
                wait = idle * (0.5 + self.rng())  # jitter: replicas don't poll in step
                with anyio.move_on_after(wait):
                    await self._wake_event.wait()
                if not self._wake_event.is_set():
                    idle = min(idle * 2, self.options.poll_max_interval_seconds)
            # Draining: give in-flight calls their grace, then cut them off.
            with anyio.move_on_after(self.options.shutdown_grace_seconds) as grace:
                if self.in_flight:
                    await self._drained.wait()
            if grace.cancelled_caught:
                log.warning("shutdown_grace_exceeded", in_flight=self.in_flight)
                workers.cancel_scope.cancel()

    async def _claim_once(self, workers: TaskGroup) -> tuple[int, bool]:
        """Claim for every lane with free slots; return (claimed, capacity now full)."""
        total = 0
        for lane in self.lanes.values():
            room = min(
                lane.free_slots,
                self.options.max_in_flight - self.in_flight,
                self.options.batch_size,
            )
            if room <= 0:
                continue
            intents = await self.store.claim(
                lane.provider,
                room,
                lease_seconds=self.options.lease_seconds,
                instance=self.options.instance,
            )
            metrics.CLAIM_BATCH.observe(len(intents))
            for intent in intents:
                lane.acquire()
                self.in_flight += 1
                workers.start_soon(self._process, lane, intent)
            total += len(intents)
            self.claimed_total += len(intents)
            if len(intents) == room and lane.free_slots > 0:
                pass  # more may be waiting; the loop comes straight back
        full = self.in_flight >= self.options.max_in_flight or all(
            lane.free_slots == 0 for lane in self.lanes.values()
        )
        return total, full

    async def _process(self, lane: Lane, intent: ClaimedIntent) -> None:
        try:
            with structlog.contextvars.bound_contextvars(
                intent_id=intent.id,
                payment_id=intent.payment_id,
                provider=intent.provider,
                attempt=intent.attempts,
                trace_id=_trace_id(intent.traceparent),
            ):
                await self._dispatch(lane, intent)
        finally:
            lane.release()
            self.in_flight -= 1
            if self._stopping and self.in_flight == 0:
                self._drained.set()
            self.wake()

    async def _dispatch(self, lane: Lane, intent: ClaimedIntent) -> None:
        decision = decide(intent.action, intent.amount_minor, intent.payment)
        if isinstance(decision, Rejection):
            log.info("intent_rejected", error_code=decision.error_code)
            metrics.INTENTS_FINISHED.labels(
                provider=intent.provider, action=str(intent.action), outcome="rejected"
            ).inc()
            await self.completer.submit(from_rejection(intent, decision))
            return
        command = Command(
            intent_id=intent.id,
            payment_id=intent.payment_id,
            action=intent.action,
            idempotency_key=intent.idempotency_key,
            amount_minor=decision.amount_minor,
            currency=intent.currency,
            payment_method=intent.payment_method,
            payment_reference=intent.payment.provider_reference,
            attempt=intent.attempts,
            traceparent=intent.traceparent,
        )
        outcome = await lane.execute(command)
        if isinstance(outcome, Ambiguous):
            settled = await lane.lookup(command)
            log.info(
                "ambiguous_settled_by_lookup",
                first=outcome.code,
                lookup=type(settled).__name__,
            )
            if isinstance(settled, Succeeded | Declined):
                outcome = settled
        kind = type(outcome).__name__.lower()
        metrics.INTENTS_FINISHED.labels(
            provider=intent.provider, action=str(intent.action), outcome=kind
        ).inc()
        write_back = from_outcome(intent, decision.amount_minor, outcome, self.policy, self.rng)
        log.info(
            "intent_attempted",
            outcome=kind,
            status=write_back.status,
            error_code=write_back.error_code,
        )
        await self.completer.submit(write_back)


def _trace_id(traceparent: str | None) -> str | None:
    if traceparent and len(traceparent) >= 35:
        return traceparent[3:35]
    return None
