"""Batch completer: many outcomes, one transaction, like River's batch completer.

Workers :meth:`submit` write-backs; the completer flushes when ``batch_size`` are pending
or ``flush_seconds`` after the first one arrived. ``writers`` transactions are in flight
at once, each on its own connection; outcomes are routed by payment_id, so one payment's
outcomes stay in one stream (in order) and concurrent batches lock disjoint payments and
event streams (no deadlock between them). The bounded buffer is the back-pressure:
when the database is slow, submitters wait, so claims slow down instead of memory growing.
A database error never drops an outcome: the batch is retried with backoff until it is
written (if the relay dies meanwhile, the leases expire and the intents are re-driven
under the same idempotency keys). On close, pending outcomes are flushed in a shielded
scope bounded by the shutdown deadline the relay passes (``close(give_up_at=...)``): a
write still failing or still running then is abandoned.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Sequence

import anyio
import psycopg
import structlog
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from relay.core.store import Store
from relay.domain.intents import WriteBack
from relay.infra import metrics
from relay.infra.db import RETRYABLE_DB_ERRORS
from relay.infra.shutdown import CutOffShields

__all__ = ["Completer"]

log = structlog.get_logger("relay.core.completer")


class Completer:
    def __init__(
        self,
        store: Store,
        *,
        batch_size: int = 500,
        flush_seconds: float = 0.01,
        buffer: int = 2_000,
        writers: int = 2,
        on_flushed: Callable[[int], None] = lambda _n: None,
    ) -> None:
        if writers < 1:
            raise ValueError("writers must be at least 1")
        self._store = store
        self._batch_size = batch_size
        self._flush_seconds = flush_seconds
        streams = [
            anyio.create_memory_object_stream[WriteBack](max(1, buffer // writers))
            for _ in range(writers)
        ]
        self._sends: list[MemoryObjectSendStream[WriteBack]] = [send for send, _ in streams]
        self._receives: list[MemoryObjectReceiveStream[WriteBack]] = [r for _, r in streams]
        self._on_flushed = on_flushed
        # Writes in progress run shielded; close() puts the shutdown deadline on those
        # already waiting for the database and on those still to start.
        self._flushes = CutOffShields()
        # Start (anyio clock) of each database write in progress, for liveness: a write
        # that never returns wedges its stream, and a restart is what frees it.
        self._writing: dict[object, float] = {}
        self.lease_lost = 0
        self.written = 0

    async def submit(self, write_back: WriteBack) -> None:
        stream = zlib.crc32(write_back.payment_id.encode()) % len(self._sends)
        await self._sends[stream].send(write_back)

    def busy_since(self) -> float | None:
        """When the oldest database write in progress started (anyio clock); None when
        none runs. Each retry after a database error starts anew: an outage is waited
        out, only a single write that never returns looks wedged."""
        return min(self._writing.values(), default=None)

    @property
    def give_up_at(self) -> float | None:
        """The instant (anyio clock) after which pending writes are abandoned, once closed."""
        return self._flushes.cut_off_at

    def close(self, *, give_up_at: float | None = None) -> None:
        """No more submissions; :meth:`run` flushes what is pending and returns.

        With ``give_up_at`` (an instant on anyio's clock), a write that still fails or is
        still running then is abandoned: its intents stay ``in_flight`` until their leases
        expire and are re-driven under the same keys. The caller passes its shutdown
        deadline, so the flush cannot add its own grace on top of the drain's.
        """
        if give_up_at is not None:
            self._flushes.cut_off(give_up_at)
        for send in self._sends:
            send.close()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run every writer; return once all are closed and flushed."""
        async with anyio.create_task_group() as tg:
            for receive in self._receives:
                tg.start_soon(self._run_writer, receive)
            task_status.started()

    async def _run_writer(self, receive: MemoryObjectReceiveStream[WriteBack]) -> None:
        async with receive:
            while True:
                try:
                    first = await receive.receive()
                except anyio.EndOfStream:
                    return
                batch = [first]
                with anyio.move_on_after(self._flush_seconds):
                    while len(batch) < self._batch_size:
                        try:
                            batch.append(await receive.receive())
                        except anyio.EndOfStream:
                            break
                # A flush in progress finishes even when the relay is being cancelled, but
                # not past the shutdown deadline: a database that does not answer (pool
                # timeout, a hung connection) must not hold the process beyond it.
                with self._flushes.shielded(math.inf) as flush:
                    await self._write(batch)
                if flush.cancelled_caught:
                    log.error(
                        "write_back_abandoned",
                        rows=len(batch),
                        remedy="leases expire and the intents are re-driven under the same keys",
                    )

    async def _write(self, batch: Sequence[WriteBack]) -> None:
        delay = 0.05
        while True:
            try:
                attempt = object()
                self._writing[attempt] = anyio.current_time()
                try:
                    with metrics.WRITE_BACK_SECONDS.time():
                        written = await self._store.complete_fenced(batch)
                finally:
                    del self._writing[attempt]
                break
            except RETRYABLE_DB_ERRORS as exc:
                if self.give_up_at is not None and anyio.current_time() > self.give_up_at:
                    log.error(
                        "write_back_abandoned",
                        rows=len(batch),
                        remedy="leases expire and the intents are re-driven under the same keys",
                    )
                    return
                log.warning(
                    "write_back_retry", rows=len(batch), error=type(exc).__name__, retry_in=delay
                )
                await anyio.sleep(delay)
                delay = min(delay * 2, 5.0)
            except psycopg.Error as exc:
                if len(batch) == 1:
                    written = await self._write_refused(batch[0], exc)
                    break
                # One bad row must not hold the others back: write them one by one.
                for item in batch:
                    await self._write([item])
                return
        self.written += len(written)
        for item in batch:
            if (item.intent_id, item.lease_token) in written:
                metrics.INTENTS_WRITTEN.labels(status=item.status).inc()
                _count_outcome(item)
            else:
                self.lease_lost += 1
                metrics.LEASE_LOST.inc()
                log.info(
                    "lease_lost",
                    intent_id=item.intent_id,
                    remedy="a newer claim exists; nothing to do",
                )
        self._on_flushed(len(written))

    async def _write_refused(self, item: WriteBack, exc: psycopg.Error) -> set[tuple[int, int]]:
        """The database refused this outcome: park the intent dead for an operator."""
        sqlstate = getattr(exc, "sqlstate", None)
        log.error("write_back_refused", intent_id=item.intent_id, sqlstate=sqlstate)
        dead = WriteBack(
            intent_id=item.intent_id,
            lease_token=item.lease_token,
            payment_id=item.payment_id,
            status="dead",
            provider_reference=item.provider_reference,
            error_code="write_back_refused",
            error_message=(
                f"the database refused the outcome '{item.status}' (SQLSTATE {sqlstate}); "
                "check the payment at the provider, then re-drive or cancel"
            ),
            provider=item.provider,
            action=item.action,
            outcome="refused",
        )
        try:
            return await self._store.complete_fenced([dead])
        except psycopg.Error:
            log.exception("write_back_refused_twice", intent_id=item.intent_id)
            return set()


def _count_outcome(item: WriteBack) -> None:
    """Count a committed outcome: an intent that ended, or a retry that was scheduled."""
    if not item.provider:
        return  # written without labels (tests, tools): nothing to count by
    if item.status in ("succeeded", "failed", "dead"):
        metrics.INTENTS_FINISHED.labels(
            provider=item.provider, action=item.action, outcome=item.outcome or item.status
        ).inc()
    elif item.status == "pending":
        metrics.RETRIES.labels(provider=item.provider, action=item.action).inc()
