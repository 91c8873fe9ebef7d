"""The applier's loop: claim received notifications (SKIP LOCKED, a lease, a fencing
token), apply each in one transaction of its own, hand back what must wait."""

from __future__ import annotations

from datetime import UTC, datetime

import anyio
import structlog
from psycopg.rows import dict_row

from provider_adapters.base import (
    AuthorisationEnded,
    CaptureReported,
    ConfirmationReported,
    DisputeOpened,
    PaymentSettled,
    RefundsReported,
    Unhandled,
)
from relay.core.inbox.common import (
    Applied,
    Claimed,
    Retry,
    log,
)
from relay.core.inbox.confirmations import Confirmations
from relay.core.inbox.disputes import Disputes
from relay.core.inbox.reported_money import ReportedMoney
from relay.domain.retry_policy import capped_doubling, half_jitter
from relay.infra import metrics
from relay.infra.db import RETRYABLE_DB_ERRORS, fetch
from relay.infra.queries import QUERIES


class InboxApplier(ReportedMoney, Confirmations, Disputes):
    """Applies the inbox rows of the providers in ``readers`` (one reader per provider
    instance name, the name of its receiving route)."""

    def cut_off(self, at: float) -> None:
        """The shutdown's in-flight cut-off (anyio clock): an apply still running then is
        cancelled. Its transaction rolls back whole (nothing is half-applied) and its row,
        still claimed, is applied by a relay that claims it after the lease."""
        self._applying.cut_off(at)

    def wake(self) -> None:
        """A notification arrived (LISTEN): claim now instead of at the next poll."""
        self._wake.set()

    async def run_forever(self) -> None:
        """Claim and apply until the relay drains; a full batch means more is due. Every
        ``overdue_sweep_seconds`` the confirmation deadline is checked too."""
        next_sweep = anyio.current_time()
        while not self.stopping():
            try:
                done = await self.run_once()
                if anyio.current_time() >= next_sweep:
                    next_sweep = anyio.current_time() + self.options.overdue_sweep_seconds
                    await self.sweep_overdue()
            except RETRYABLE_DB_ERRORS as exc:
                log.warning("inbox_db_error", error=type(exc).__name__)
                done = 0
            if done < self.options.batch_size:
                with anyio.move_on_after(self.options.poll_interval_seconds * (0.5 + self.rng())):
                    await self._wake.wait()
                self._wake = anyio.Event()

    async def run_once(self, *, now: datetime | None = None) -> int:
        """Claim one batch and apply each notification; return how many were claimed."""
        if not self.readers:
            return 0
        claimed = await self._claim(now)
        limiter = anyio.CapacityLimiter(self.options.concurrency)

        async def one(row: Claimed) -> None:
            async with limiter:
                if self.stopping():
                    return  # claimed, not started: its lease ends and another relay applies it
                # A stop waits for an apply in progress (one short transaction), but not
                # past the shutdown's in-flight cut-off (cut_off()) nor past the lease (by
                # then the row is claimable again); a transaction cut short rolls back whole.
                started = anyio.current_time()
                with self._applying.shielded(self.options.lease_seconds) as scope:
                    try:
                        await self._apply_one(row)
                    except RETRYABLE_DB_ERRORS as exc:
                        # The database went away mid-apply (a restart, a failover): the
                        # transaction rolled back whole and the row is applied again after
                        # its lease. Raised out of this task group it would arrive in
                        # run_forever as an ExceptionGroup, which its handler does not match,
                        # and end the relay (found by the fault campaign's PostgreSQL
                        # restarts).
                        log.warning("inbox_db_error", error=type(exc).__name__, inbox_id=row.id)
                if scope.cancelled_caught:
                    reason = "shutdown" if self.stopping() else "lease"
                    log.warning(
                        "inbox_apply_cut_off",
                        inbox_id=row.id,
                        event_id=row.event_id,
                        reason=reason,
                        after_seconds=round(anyio.current_time() - started, 3),
                        remedy="rolled back; applied after the lease by the relay that "
                        "claims it next",
                    )

        async with anyio.create_task_group() as tg:
            for row in claimed:
                tg.start_soon(one, row)
        return len(claimed)

    async def _claim(self, now: datetime | None) -> list[Claimed]:
        rows = await self.db.fetch_all(
            "inbox_claim",
            {
                "providers": sorted(self.readers),
                "limit": self.options.batch_size,
                "lease_seconds": self.options.lease_seconds,
                "instance": self.options.instance,
                "now": now,
            },
            row=dict_row,
        )
        return [Claimed(**row) for row in rows]

    async def _apply_one(self, row: Claimed) -> Applied:
        with structlog.contextvars.bound_contextvars(
            inbox_id=row.id, event_id=row.event_id, event_type=row.event_type
        ):
            try:
                done = await self._apply(row)
            except RETRYABLE_DB_ERRORS:
                raise  # the lease expires; the row is applied again then
            except Exception as exc:
                # A row the database refuses, or a body shaped beyond what the reader
                # checks, must not stop the loop: it is retried with backoff and shows its
                # error in `webhooks show` (cancellation is not an Exception: it passes).
                delay = half_jitter(
                    capped_doubling(
                        self.options.retry_base_seconds,
                        self.options.retry_cap_seconds,
                        row.attempts,
                    ),
                    self.rng,
                )
                message = f"{type(exc).__name__}: {str(exc)[:300]}"
                log.error("inbox_apply_failed", error=message, retry_in=round(delay, 2))
                await self._hand_back(row, delay, message, None)
                return Applied("retry", message, retry_in=delay)
            if done.status in ("applied", "ignored"):
                metrics.WEBHOOKS_APPLIED.labels(provider=row.provider, status=done.status).inc()
                if row.event_created_at is not None:
                    lag = (datetime.now(UTC) - row.event_created_at).total_seconds()
                    metrics.WEBHOOK_APPLY_LAG.labels(provider=row.provider).observe(max(lag, 0.0))
            log.info("inbox_applied", status=done.status, result=done.result)
            return done

    async def _hand_back(
        self, row: Claimed, delay: float, error: str, payment_id: str | None
    ) -> None:
        async with self.db.pool.connection() as conn:
            await fetch(
                conn,
                "inbox_retry",
                {
                    "id": row.id,
                    "lease_token": row.lease_token,
                    "delay_seconds": delay,
                    "error": error[:500],
                    "payment_id": payment_id,
                },
                row=dict_row,
            )

    async def _apply(self, row: Claimed) -> Applied:
        reader = self.readers[row.provider]
        fact = reader.read(row.payload)
        reason = f"webhook {row.provider} {row.event_id} ({row.event_type})"
        try:
            async with self.db.pool.connection() as conn, conn.transaction():
                await conn.execute(QUERIES["set_actor"], {"actor": self.actor, "reason": reason})
                if not await fetch(
                    conn,
                    "inbox_take",
                    {"id": row.id, "lease_token": row.lease_token},
                    row=dict_row,
                ):
                    return Applied("lease_lost", "a newer claim holds this notification")
                if isinstance(fact, Unhandled):
                    done = Applied("ignored", fact.why)
                elif isinstance(fact, PaymentSettled):
                    done = await self._settle(conn, row, reader, fact, reason)
                elif isinstance(fact, RefundsReported):
                    done = await self._refunds(conn, row, reader, fact)
                elif isinstance(fact, CaptureReported):
                    done = await self._capture(conn, row, reader, fact)
                elif isinstance(fact, ConfirmationReported):
                    done = await self._confirm(conn, row, reader, fact, reason)
                elif isinstance(fact, AuthorisationEnded):
                    done = await self._authorisation_ended(conn, row, fact)
                elif isinstance(fact, DisputeOpened):
                    done = await self._dispute_opened(conn, row, reader, fact)
                else:
                    done = await self._dispute_closed(conn, row, reader, fact)
                await fetch(
                    conn,
                    "inbox_finish",
                    {
                        "id": row.id,
                        "lease_token": row.lease_token,
                        "status": done.status,
                        "result": done.result[:1000],
                        "payment_id": done.payment_id,
                    },
                    row=dict_row,
                )
                return done
        except Retry as retry:
            await self._hand_back(row, retry.delay, retry.result, retry.payment_id)
            return Applied("retry", retry.result, retry.payment_id, retry.delay)

    # -- payment_intent.succeeded / payment_failed --------------------------------------
