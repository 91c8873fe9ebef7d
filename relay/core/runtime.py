"""The relay loop: claim, dispatch through lanes, hand outcomes to the completer.

One task group owns every task. Guarantees:

* no transaction or row lock is held while a provider is called: the claim commits first;
* the state machine is checked before any provider call, so an invalid command never
  reaches the provider;
* every attempt of an intent sends the intent's stored idempotency key;
* an ambiguous reply is settled by a lookup at the provider before anything is written;
* a routed payment's first intent that never reached its provider (its attempts all failed
  to connect, or none was made and this relay's breaker for the provider is open) moves to
  the next target of its routing rule under a new key (sql/0064, docs/routing.md
  "Failover"); one that may have reached it never moves;
* the loop claims only what free lane slots and the global in-flight cap can take;
* on stop: claiming stops, and the whole shutdown fits one deadline,
  ``shutdown_grace_seconds`` counted from the first stop (see :func:`flush_reserve_seconds`):
  in-flight calls get the grace minus a reserve, unstarted intents are released, and the
  final flush of outcomes gets what remains (at least :data:`SHUTDOWN_FLUSH_MIN_SECONDS`);
  anything cut off is re-driven under the same key, at once or after its lease expires.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
from collections.abc import Callable, Mapping

import anyio
import psycopg
import structlog
from anyio.abc import TaskGroup, TaskStatus

from provider_adapters import error_catalogue
from provider_adapters.base import Action, Ambiguous, Command, Declined, Retryable, Succeeded
from relay.core.completer import Completer
from relay.core.lanes import Lane
from relay.core.store import Failover, Store
from relay.domain.breaker import BreakerState
from relay.domain.intents import IntentRow, WriteBack
from relay.domain.outcome_mapping import from_outcome, from_rejection
from relay.domain.retry_policy import RetryPolicy
from relay.domain.state_machine import Rejection, decide
from relay.infra import metrics
from relay.infra.db import RETRYABLE_DB_ERRORS, Database, listen_forever
from relay.infra.redaction import redact_text
from relay.infra.tracing import TraceContext, parse_traceparent

__all__ = ["Relay", "RelayOptions"]

log = structlog.get_logger("relay")

# The end of the shutdown grace is kept for the final flush of outcomes: in-flight calls
# are cut off this long before the deadline (at most a quarter of the grace), so the
# outcomes they produced, and the cut-off calls' hand-backs, are written before it.
SHUTDOWN_FLUSH_RESERVE_SECONDS = 5.0
# The final flush gets at least this long even when nothing of the grace is left (a grace
# of 0, or a drain that overran): enough for one batch against a healthy database.
SHUTDOWN_FLUSH_MIN_SECONDS = 1.0

# The actions that start a payment: only a payment's first intent may fail over (sql/0064).
_FIRST_ACTIONS = (Action.AUTHORIZE, Action.CHARGE)


def flush_reserve_seconds(grace_seconds: float) -> float:
    """The end of the grace kept for the final flush: ``min(5 s, grace / 4)``. In-flight
    calls may run for the grace minus this after the first stop."""
    return min(SHUTDOWN_FLUSH_RESERVE_SECONDS, grace_seconds / 4)


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
        completer_writers: int = 2,
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
        self.completer_writers = completer_writers
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
        self.store = Store(db, actor=f"relay:{options.instance}")
        self.lanes = dict(lanes)
        self.policy = policy
        self.options = options
        self.rng = rng
        self.completer = Completer(
            self.store,
            batch_size=options.completer_batch_size,
            flush_seconds=options.completer_flush_seconds,
            writers=options.completer_writers,
            on_flushed=lambda _n: self.wake(),
        )
        self.in_flight = 0
        self.claimed_total = 0
        self._wake_event = anyio.Event()
        self._stop_event = anyio.Event()
        self._stopping = False
        self._turn_scope = anyio.CancelScope()  # the claim loop's turn, cut short by stop()
        self._wakeups_wanted: bool | None = None  # what this relay last asked inserts
        self.heartbeat = 0.0  # anyio clock of the claim loop's last turn (liveness)
        self.database_ok = False  # the last claim reached the database (readiness)
        self._drained = anyio.Event()
        self.finished = anyio.Event()
        # Set by the first stop(): the instant (anyio clock) the whole shutdown must end.
        self.shutdown_deadline: float | None = None
        # Further NOTIFY channels and whom they wake, listened to on the relay's own LISTEN
        # connection (the inbox applier's): set before run().
        self.also_wake: dict[str, Callable[[], None]] = {}
        # Other in-flight work that must end at this relay's in-flight cut-off (the inbox
        # applier's applies): each is told the instant (anyio clock) by stop().
        self.also_cut_off: list[Callable[[float], None]] = []

    # -- control -------------------------------------------------------------------------

    def wake(self) -> None:
        self._wake_event.set()

    def stop(self) -> None:
        """Stop claiming and drain; :meth:`run` returns when drained or out of grace."""
        if self.shutdown_deadline is None:
            # One deadline for drain, releases and flush, counted from the first signal:
            # the pod's terminationGracePeriodSeconds counts from there too.
            self.shutdown_deadline = anyio.current_time() + self.options.shutdown_grace_seconds
        self._stopping = True
        self._stop_event.set()
        # A turn in progress may finish: a claim that committed must reach its workers, or
        # its intents would sit in flight until their lease expires. Only a turn that hangs
        # (a database that does not answer) is cut short, when in-flight calls are.
        cut_off_at = self._deadline() - flush_reserve_seconds(self.options.shutdown_grace_seconds)
        self._turn_scope.deadline = min(self._turn_scope.deadline, cut_off_at)
        for lane in self.lanes.values():
            lane.stop_waiting()  # intents claimed ahead, waiting for a call slot: hand back
        for cut_off in self.also_cut_off:
            cut_off(cut_off_at)
        self.wake()

    @property
    def stopping(self) -> bool:
        return self._stopping

    async def wait_stopped(self) -> None:
        """Return once :meth:`stop` has been called."""
        await self._stop_event.wait()

    def _deadline(self) -> float:
        """The shutdown deadline. stop() sets it, and is the only way out of the claim loop;
        "now" is only a fallback for the type checker."""
        if self.shutdown_deadline is None:
            return anyio.current_time()
        return self.shutdown_deadline

    # -- main ----------------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async with anyio.create_task_group() as tg:
            await tg.start(self.completer.run)
            async with anyio.create_task_group() as helpers:
                if self.options.listen:
                    helpers.start_soon(self._listen)
                helpers.start_soon(self._reaper)
                helpers.start_soon(self._failover_sweeper)
                task_status.started()
                await self._claim_and_dispatch()
                helpers.cancel_scope.cancel()
            # Workers are done (or cut off): the completer flushes what is pending, then
            # returns; past the shutdown deadline (at least the flush minimum from now) it
            # abandons the rest (leases expire, keys are reused).
            flush_until = max(self._deadline(), anyio.current_time() + SHUTDOWN_FLUSH_MIN_SECONDS)
            self.completer.close(give_up_at=flush_until)
        self.finished.set()
        log.info("relay_stopped", claimed=self.claimed_total, lease_lost=self.completer.lease_lost)

    async def _listen(self) -> None:
        await listen_forever(self.db.conninfo, self.wake, also=self.also_wake)

    async def _reaper(self) -> None:
        interval = min(max(self.options.lease_seconds / 4, 0.5), 15.0)
        while True:
            await anyio.sleep(interval * (0.75 + self.rng() / 2))
            try:
                requeued = await self.store.requeue_expired()
            except RETRYABLE_DB_ERRORS as exc:
                log.warning("reaper_db_error", error=type(exc).__name__)
                requeued = 0
            if requeued:
                log.info("leases_expired_requeued", intents=requeued)
                self.wake()
            await self._promote_orphaned_blocked()

    async def _promote_orphaned_blocked(self) -> None:
        """The safety net for inserts under REPEATABLE READ or SERIALIZABLE: their trigger
        decides ``blocked`` from a snapshot that may predate the write-back resolving the
        earlier intent, and nothing else would ever promote such an intent. One reaper
        interval bounds how long it waits."""
        try:
            promoted = await self.store.promote_orphaned_blocked(list(self.lanes))
        except RETRYABLE_DB_ERRORS as exc:
            log.warning("orphan_sweep_db_error", error=type(exc).__name__)
            return
        if not promoted:
            return
        for _intent_id, _payment_id, provider in promoted:
            metrics.ORPHANED_BLOCKED_PROMOTED.labels(provider=provider).inc()
        log.warning(
            "orphaned_blocked_promoted",
            intents=[intent_id for intent_id, _, _ in promoted],
            remedy="an application inserts under REPEATABLE READ or SERIALIZABLE; "
            "READ COMMITTED avoids the wait",
        )
        self.wake()

    async def _claim_and_dispatch(self) -> None:
        idle = self.options.poll_interval_seconds
        async with anyio.create_task_group() as workers:
            while not self._stopping:
                # stop() gives the turn a deadline: a claim or flag write waiting on a
                # database that does not answer must not hold the loop past the shutdown
                # deadline (what such a claim took is re-driven when its lease expires).
                self._turn_scope = anyio.CancelScope()
                with self._turn_scope:
                    idle = await self._turn(workers, idle)
            # Draining: admissions waiting for a token hand their intents back at once;
            # in-flight calls get the grace minus the flush reserve, then are cut off.
            cut_off_at = self._deadline() - flush_reserve_seconds(
                self.options.shutdown_grace_seconds
            )
            with anyio.CancelScope(deadline=cut_off_at) as grace:
                if self.in_flight:
                    await self._drained.wait()
            if grace.cancelled_caught:
                log.warning("shutdown_grace_exceeded", in_flight=self.in_flight)
                workers.cancel_scope.cancel()

    async def _turn(self, workers: TaskGroup, idle: float) -> float:
        """One turn of the claim loop: claim what fits, else wait for a wake-up or the
        poll interval; the next poll interval (it doubles while nothing comes)."""
        self.heartbeat = anyio.current_time()
        self._wake_event = anyio.Event()
        try:
            claimed, full = await self._claim_once(workers)
            self.database_ok = True
        except RETRYABLE_DB_ERRORS as exc:
            self.database_ok = False
            log.warning("claim_db_error", error=type(exc).__name__, retry_in=idle)
            claimed, full = 0, False
        if claimed and not full:
            return self.options.poll_interval_seconds  # there may be more right away
        if full:
            await self._ask_for_wakeups(False)
        elif not claimed and await self._ask_for_wakeups(True):
            return idle  # once more: inserts committed before the flag did not notify
        if claimed:
            idle = self.options.poll_interval_seconds
        wait = idle * (0.5 + self.rng())  # jitter: replicas don't poll in step
        hints = [h for lane in self.lanes.values() if (h := lane.seconds_until_capacity())]
        if hints:
            # A breaker about to turn half-open or a rate limit about to refill.
            wait = min(wait, max(min(hints), 0.001))
        with anyio.move_on_after(wait):
            await self._wake_event.wait()
        if not self._wake_event.is_set() and not hints:
            idle = min(idle * 2, self.options.poll_max_interval_seconds)
        return idle

    async def _failover_sweeper(self) -> None:
        """Move new payments waiting for a provider whose breaker is open here to the next
        target of their rule (sql/0064 decides which qualify: routed, first intent, nothing
        ever sent): a sweep per poll interval, at once again while sweeps come back full.
        The move is a database write, so the target needs no lane here. A stopping relay
        makes no more moves: the relays that keep running sweep."""
        while not self._stopping:
            more = await self._fail_over_behind_open_breakers()
            if not more:
                interval = self.options.poll_interval_seconds
                await anyio.sleep(interval * (0.75 + self.rng() / 2))

    async def _fail_over_behind_open_breakers(self) -> bool:
        """One sweep of every lane whose breaker is open; True when one moved a full batch
        (more may wait)."""
        more = False
        for lane in self.lanes.values():
            if lane.breaker.state is not BreakerState.OPEN:
                continue
            limit = self.options.batch_size
            try:
                moved = await self.store.fail_over_pending(
                    lane.provider, limit=limit, why="breaker open at relay " + self.options.instance
                )
            except psycopg.Error as exc:
                # Not the claim loop's concern: the intents wait as they would without failover.
                log.warning("failover_sweep_failed", error=type(exc).__name__)
                continue
            more = more or len(moved) >= limit
            for failover in moved:
                _count_failover(failover, "breaker_open")
            if moved:
                self.wake()  # their new provider's lane may be here
        return more

    async def _ask_for_wakeups(self, wanted: bool) -> bool:
        """Tell inserts whether to NOTIFY; True when this changed what we had asked.

        Only an idle relay needs a NOTIFY; a saturated one comes back when a call ends.
        Skipping NOTIFY under load keeps the application's commits from queueing on the
        notification lock. What we asked last is remembered, so this writes only on a
        change. Each relay's wish counts on its own (sql/0031): a saturated relay stops
        the notifications only when no other live relay waits for them.
        """
        if not self.options.listen or self._wakeups_wanted is wanted:
            return False
        try:
            await self.store.set_wakeups(wanted=wanted, instance=self.options.instance)
        except RETRYABLE_DB_ERRORS:
            return False
        self._wakeups_wanted = wanted
        return True

    async def _claim_once(self, workers: TaskGroup) -> tuple[int, bool]:
        """Claim for every lane with capacity; return (claimed, capacity now full)."""
        total = 0
        for lane in self.lanes.values():
            room = min(
                lane.claimable(),
                self.options.max_in_flight - self.in_flight,
                self.options.batch_size,
            )
            if room <= 0:
                continue
            # Before the claim is sent: the database's lease starts later, so a lease
            # counted from here never ends after the real one.
            claimed_at = anyio.current_time()
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
                workers.start_soon(self._process, lane, intent, claimed_at)
            total += len(intents)
            self.claimed_total += len(intents)
        full = self.in_flight >= self.options.max_in_flight or all(
            lane.claimable() == 0 for lane in self.lanes.values()
        )
        return total, full

    async def _process(self, lane: Lane, intent: IntentRow, claimed_at: float) -> None:
        admission = _Admission()
        trace = parse_traceparent(intent.traceparent)
        try:
            with structlog.contextvars.bound_contextvars(
                intent_id=intent.id,
                payment_id=intent.payment_id,
                provider=intent.provider,
                attempt=intent.attempts,
                trace_id=trace.trace_id if trace else None,
            ):
                await self._dispatch(lane, intent, admission, trace, claimed_at)
        finally:
            lane.release(admission_asked=admission.asked)
            self.in_flight -= 1
            if self._stopping and self.in_flight == 0:
                self._drained.set()
            self.wake()

    async def _dispatch(
        self,
        lane: Lane,
        intent: IntentRow,
        admission: _Admission,
        trace: TraceContext | None,  # None for an invalid one, which is never forwarded
        claimed_at: float,  # anyio clock, before the claim was sent
    ) -> None:
        if intent.payment.awaiting_action is not None:
            # An earlier intent of the payment awaits its provider's confirmation: this one
            # is not sent (nor decided: the payment's state is about to change). Parked
            # blocked, unsent; the confirmation's write-back promotes it (docs/webhooks.md).
            log.info("intent_parked", awaiting=intent.payment.awaiting_action)
            await self.completer.submit(
                WriteBack(
                    intent_id=intent.id,
                    lease_token=intent.require_lease(),
                    payment_id=intent.payment_id,
                    status="blocked",
                    error_code="awaiting_earlier_confirmation",
                    error_message=f"an earlier {intent.payment.awaiting_action} of this "
                    "payment awaits the provider's confirmation; sent after it",
                    provider=intent.provider,
                    action=str(intent.action),
                    outcome="parked",
                )
            )
            return
        decision = decide(intent.action, intent.amount_minor, intent.payment)
        if isinstance(decision, Rejection):
            log.info("intent_rejected", error_code=decision.error_code)
            await self.completer.submit(
                _labelled(from_rejection(intent, decision), intent, outcome="rejected")
            )
            return
        command = intent.command(
            decision.amount_minor, traceparent=trace.traceparent if trace else None
        )
        slot = await lane.take_call_slot(self._stop_event)
        if slot is None:  # claimed ahead, and the relay stopped before a slot was free
            await self._hand_back(lane, intent)
            return
        try:
            await self._call(
                lane, intent, command, decision.amount_minor, admission, slot, claimed_at
            )
        finally:
            lane.give_call_slot()

    async def _call(
        self,
        lane: Lane,
        intent: IntentRow,
        command: Command,
        amount_minor: int,
        admission: _Admission,
        slot: str,
        claimed_at: float,
    ) -> None:
        admission.asked = True
        if not await lane.admit(self._stop_event):
            await self._hand_back(lane, intent)
            return
        lease_left = claimed_at + self.options.lease_seconds - anyio.current_time()
        if slot == "waited" and lease_left < lane.call_deadline_seconds:
            # Waited for a call slot so long that the call could outlast the lease (and
            # another relay could claim the intent meanwhile): hand it back unattempted.
            lane.cancel_admission()
            await self._hand_back(lane, intent, reason="lease_too_short")
            return
        try:
            outcome = await lane.execute(command)
            if isinstance(outcome, Ambiguous) and not outcome.awaits_confirmation:
                settled = await lane.lookup(command)
                log.info(
                    "ambiguous_settled_by_lookup",
                    first=outcome.code,
                    lookup=type(settled).__name__,
                )
                if isinstance(settled, Succeeded | Declined):
                    outcome = settled
        except anyio.get_cancelled_exc_class():
            # Cut off at the end of the shutdown grace: the call may have reached the
            # provider, so the attempt counts; hand the intent back for a re-drive under
            # the same key instead of leaving it to lease expiry.
            with (
                anyio.move_on_after(1.0, shield=True),
                contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError),
            ):
                await self.completer.submit(
                    WriteBack(
                        intent_id=intent.id,
                        lease_token=intent.require_lease(),
                        payment_id=intent.payment_id,
                        status="pending",
                        error_code="shutdown_cut_off",
                        error_message="the relay stopped during the provider call; "
                        "retried with the same idempotency key",
                        provider=intent.provider,
                        action=str(intent.action),
                        outcome="cut_off",
                    )
                )
            raise
        kind = type(outcome).__name__.lower()
        metrics.ATTEMPTS.labels(
            provider=intent.provider, action=str(intent.action), outcome=kind
        ).inc()
        _count_uncatalogued(lane, intent, outcome)
        if (
            isinstance(outcome, Retryable)
            and outcome.unsent
            and intent.action in _FIRST_ACTIONS
            and await self._fail_over(intent, outcome)
        ):
            # Nothing reached the provider: a routed payment's first intent moved to the
            # next target of its rule (sql/0064 decides); else the write-back counts the
            # attempt as unsent.
            return
        write_back = _labelled(
            from_outcome(intent, amount_minor, outcome, self.policy, self.rng),
            intent,
            outcome=kind,
        )
        log.info(
            "intent_attempted",
            outcome=kind,
            status=write_back.status,
            error_code=write_back.error_code,
            error_message=write_back.error_message,
        )
        await self.completer.submit(write_back)

    async def _fail_over(self, intent: IntentRow, outcome: Retryable) -> bool:
        """Move the claimed intent whose attempt could not connect to its rule's next target
        instead of writing the attempt back; False when it does not qualify or the database
        failed (then the write-back records the attempt, fenced: if the move did commit,
        the lease token it cleared refuses that write)."""
        why = f"could not connect ({outcome.code}) at relay {self.options.instance}"
        try:
            moved = await self.store.fail_over_claimed(intent.id, intent.require_lease(), why)
        except psycopg.Error as exc:
            log.warning("failover_failed", error=type(exc).__name__)
            return False
        if moved is None:
            return False
        _count_failover(moved, "connect_failed")
        return True

    async def _hand_back(self, lane: Lane, intent: IntentRow, *, reason: str | None = None) -> None:
        """Release a claimed intent that never reached the provider; its attempt is not
        consumed. If the database is away, the lease simply expires."""
        if reason is None:
            reason = "shutdown" if self._stopping else "breaker_open"
        bound = anyio.current_time() + 5.0
        if self.shutdown_deadline is not None:
            bound = min(bound, self.shutdown_deadline)  # a release must not outlast it
        try:
            with anyio.CancelScope(deadline=bound, shield=True):
                await self.store.release([(intent.id, intent.require_lease())])
        except RETRYABLE_DB_ERRORS as exc:
            log.warning("release_failed", error=type(exc).__name__, remedy="the lease expires")
            return
        metrics.LEASES_RELEASED.labels(provider=lane.provider, reason=reason).inc()
        log.info("lease_released", reason=reason)


class _Admission:
    """Whether a worker asked its lane for admission (for the lane's waiting count)."""

    __slots__ = ("asked",)

    def __init__(self) -> None:
        self.asked = False


_DEAD_BECAUSE = {"invalid": "invalid", "succeeded": "amount_mismatch"}


def _labelled(write_back: WriteBack, intent: IntentRow, *, outcome: str) -> WriteBack:
    """Attach the metric labels the completer counts by, and redact the stored message.

    ``outcome`` is the attempt's class (or ``rejected``); the label says why the intent
    ended: declined/rejected (failed), invalid/exhausted/amount_mismatch (dead).
    """
    if write_back.status == "succeeded":
        ended = "succeeded"
    elif write_back.status == "failed":
        ended = "rejected" if outcome == "rejected" else "declined"
    elif write_back.status == "dead":
        ended = _DEAD_BECAUSE.get(outcome, "exhausted")
    else:
        ended = "retry"
    message = write_back.error_message
    return dataclasses.replace(
        write_back,
        provider=intent.provider,
        action=str(intent.action),
        outcome=ended,
        error_message=redact_text(message) if message else message,
    )


def _count_failover(failover: Failover, trigger: str) -> None:
    metrics.FAILOVERS.labels(
        from_provider=failover.from_provider, to_provider=failover.to_provider, trigger=trigger
    ).inc()
    log.warning(
        "intent_failed_over",
        intent_id=failover.intent_id,
        payment_id=failover.payment_id,
        from_provider=failover.from_provider,
        to_provider=failover.to_provider,
        # Every later attempt sends this key: what to search the new provider's logs for.
        idempotency_key=failover.idempotency_key,
        trigger=trigger,
    )


def _count_uncatalogued(lane: Lane, intent: IntentRow, outcome: object) -> None:
    """Count and log a provider code the error catalogue has no row for (it is handled by
    the adapter's class all the same; the count says which row to add)."""
    code = getattr(outcome, "code", None)
    if not isinstance(code, str) or isinstance(outcome, Succeeded):
        return
    provider_kind = str(getattr(lane.adapter, "kind", intent.provider))
    if error_catalogue.lookup(provider_kind, code) is None:
        metrics.UNCATALOGUED_CODES.labels(provider=intent.provider, code=code[:64]).inc()
        log.warning("uncatalogued_provider_code", provider_kind=provider_kind, code=code[:64])
