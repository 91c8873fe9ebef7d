"""Apply the webhook inbox exactly once: claim, then one transaction per notification.

Relays claim received notifications like intents (``inbox_claim``: SKIP LOCKED, a lease
carried by ``available_at``, a fencing token) and commit the claim; each notification is
then applied in ONE transaction that first re-locks its row under the same token
(``inbox_take``; a lease that expired and was claimed again writes nothing), writes its
effects and marks it applied. A relay killed mid-apply rolls that transaction back; the
row is claimable again when the lease ends and is applied once by whoever claims it.

What applying means (Stripe's facts, :mod:`provider_adapters.stripe_webhooks`):

* :class:`PaymentSettled` for an intent whose outcome we do not know (``dead``, or
  ``pending`` a retry after an ambiguous reply): the notification's PaymentIntent is read
  exactly as the janitor's lookup reads it (``NotificationReader.settle``) and written
  through the relay's own fenced write-back (``Store.complete_in``: intent, payment,
  ledger, result event, promotion), so the janitor has nothing left to do. An intent in
  flight is left to its relay: the notification is looked at again after that lease. An
  intent already finished changes nothing, and the row says so.
* :class:`RefundsReported`: a refund we did not make (the provider's totals exceed what
  the payment and our own refunds in flight explain) is recorded: payment total and
  state, ledger posting, ``payment.refund.external`` event; when the payment's state
  cannot take it, a reconciliation exception instead. Totals at or below what the payment
  knows are an older or repeated notification: nothing changes, and the row says why.
* :class:`DisputeOpened`: the provider withdrew the disputed amount: the payment's
  ``disputed_minor`` and ``dispute_status`` (open), a ``dispute`` ledger posting
  (receivable to disputed, sql/0035), a ``dispute`` exception for an operator and a
  ``payment.dispute.opened`` event. An inquiry withdraws nothing: exception and event only.
* :class:`DisputeClosed`: won returns the funds (``dispute_reversal`` posting,
  ``payment.dispute.won``); lost leaves the posting as final (``payment.dispute.lost``).
  One dispute per payment: a duplicate or older notification changes nothing, and an
  outcome that overtakes its opening records the opening first.
* Near-real-time reconciliation: after a notification carrying totals is applied, the
  provider's captured and refunded totals are compared with the payment's ledger in the
  same transaction; a difference opens an ``amount_mismatch`` exception at once (unless
  an intent of the payment is still unresolved: its own write-back is the next change).
* :class:`Unhandled`: marked ``ignored`` with the reason, never an error.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import anyio
import structlog
from psycopg import AsyncConnection
from psycopg.rows import TupleRow, dict_row, tuple_row
from psycopg.types.json import Jsonb

from provider_adapters.base import (
    Action,
    AuthorisationEnded,
    CaptureReported,
    ConfirmationReported,
    Declined,
    DisputeClosed,
    DisputeOpened,
    NotificationReader,
    PaymentSettled,
    RefundsReported,
    Succeeded,
    Unhandled,
)
from relay.core.store import Store
from relay.domain.intents import IntentRow
from relay.domain.money import format_minor
from relay.domain.outcome_mapping import from_outcome
from relay.domain.retry_policy import RetryPolicy, capped_doubling, half_jitter
from relay.domain.state_machine import Rejection, decide
from relay.infra import metrics
from relay.infra.db import RETRYABLE_DB_ERRORS, Database, fetch
from relay.infra.queries import QUERIES

__all__ = [
    "Applied",
    "InboxApplier",
    "InboxOptions",
    "purge_applied",
    "refund_state",
    "store_notification",
]

log = structlog.get_logger("relay.core.inbox")

# The write-back of a settled intent never retries (it is a decided outcome).
_NO_RETRY = RetryPolicy(base_seconds=1.0, cap_seconds=1.0, max_attempts=1)


@dataclass(frozen=True, slots=True)
class InboxOptions:
    instance: str
    batch_size: int = 50
    lease_seconds: float = 30.0
    poll_interval_seconds: float = 0.5
    retry_base_seconds: float = 1.0
    retry_cap_seconds: float = 300.0
    # Notifications applied at once, each in its own transaction on its own connection
    # (two of one payment queue on the payment's lock). The relay's pool is shared with
    # claims and write-backs: Settings.effective_webhooks_apply_concurrency() sizes it so
    # the claim loop and the writers keep their connections.
    concurrency: int = 2
    # An intent awaiting its provider's confirmation longer than this opens a
    # confirmation_overdue exception (RELAY_CONFIRMATION_DEADLINE_SECONDS); the sweep runs
    # at most every ``overdue_sweep_seconds``.
    confirmation_deadline_seconds: float = 86_400.0
    overdue_sweep_seconds: float = 30.0


@dataclass(frozen=True, slots=True)
class Applied:
    """What applying one notification did: ``status`` applied, ignored, retry (handed
    back) or lease_lost; ``result`` is the operator-facing sentence."""

    status: str
    result: str
    payment_id: str | None = None
    retry_in: float = 0.0


@dataclass(frozen=True, slots=True)
class _Claimed:
    id: int
    provider: str
    event_id: str
    event_type: str
    event_created_at: datetime | None
    received_at: datetime
    payload: dict[str, Any]
    lease_token: int
    attempts: int


def refund_state(captured_minor: int, refunded_minor: int) -> str:
    """The payment's state once ``refunded_minor`` of ``captured_minor`` is refunded."""
    return "refunded" if refunded_minor >= captured_minor else "partially_refunded"


def _formatter(payment: Mapping[str, Any]) -> Callable[[int], str]:
    """Amounts of this payment as a person reads them (issue 17: ``1.00 EUR``, never
    ``100 EUR``), in its currency with its exponent, through :func:`format_minor`."""
    currency, exponent = str(payment["currency"]), payment["exponent"]
    return lambda amount_minor: format_minor(amount_minor, currency, exponent)


def _exponent_of(intent: IntentRow, currency: str) -> int | None:
    """The intent's exponent when ``currency`` is the intent's; otherwise unknown here, and
    :func:`format_minor` names the amount as minor units rather than guess a scale."""
    return intent.exponent if currency == intent.currency else None


class _Retry(Exception):
    def __init__(self, result: str, delay: float, payment_id: str | None) -> None:
        super().__init__(result)
        self.result, self.delay, self.payment_id = result, delay, payment_id


class InboxApplier:
    """Applies the inbox rows of the providers in ``readers`` (one reader per provider
    instance name, the name of its receiving route)."""

    def __init__(
        self,
        db: Database,
        readers: Mapping[str, NotificationReader],
        options: InboxOptions,
        *,
        rng: Callable[[], float] = random.random,
        stopping: Callable[[], bool] = lambda: False,
    ) -> None:
        self.db = db
        self.readers = dict(readers)
        self.options = options
        self.rng = rng
        self.stopping = stopping
        self.actor = f"relay:{options.instance}"
        self.store = Store(db, actor=self.actor)
        self._wake = anyio.Event()
        # Applies in progress, and the instant (anyio clock) the relay's shutdown cuts them
        # off: set by cut_off(), which Relay.stop() calls with its in-flight cut-off.
        self._applying: set[anyio.CancelScope] = set()
        self._cut_off_at: float | None = None

    def cut_off(self, at: float) -> None:
        """The shutdown's in-flight cut-off (anyio clock): an apply still running then is
        cancelled. Its transaction rolls back whole (nothing is half-applied) and its row,
        still claimed, is applied by a relay that claims it after the lease."""
        self._cut_off_at = at if self._cut_off_at is None else min(self._cut_off_at, at)
        for scope in self._applying:
            scope.deadline = min(scope.deadline, at)

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

        async def one(row: _Claimed) -> None:
            async with limiter:
                if self.stopping():
                    return  # claimed, not started: its lease ends and another relay applies it
                # A stop waits for an apply in progress (one short transaction), but not
                # past the shutdown's in-flight cut-off (cut_off()) nor past the lease (by
                # then the row is claimable again); a transaction cut short rolls back whole.
                started = anyio.current_time()
                deadline = started + self.options.lease_seconds
                if self._cut_off_at is not None:
                    deadline = min(deadline, self._cut_off_at)
                with anyio.CancelScope(shield=True, deadline=deadline) as scope:
                    self._applying.add(scope)
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
                    finally:
                        self._applying.discard(scope)
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

    async def _claim(self, now: datetime | None) -> list[_Claimed]:
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
        return [_Claimed(**row) for row in rows]

    async def _apply_one(self, row: _Claimed) -> Applied:
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
        self, row: _Claimed, delay: float, error: str, payment_id: str | None
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

    async def _apply(self, row: _Claimed) -> Applied:
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
        except _Retry as retry:
            await self._hand_back(row, retry.delay, retry.result, retry.payment_id)
            return Applied("retry", retry.result, retry.payment_id, retry.delay)

    # -- payment_intent.succeeded / payment_failed --------------------------------------

    async def _settle(
        self,
        conn: AsyncConnection[TupleRow],
        row: _Claimed,
        reader: NotificationReader,
        fact: PaymentSettled,
        reason: str,
    ) -> Applied:
        key = fact.idempotency_key
        if key is None:
            return Applied(
                "applied",
                f"{fact.payment_reference} carries no idempotency key of ours; nothing changed",
            )
        return await self._settle_key(conn, row, reader, key, reason)

    async def _settle_key(
        self,
        conn: AsyncConnection[TupleRow],
        row: _Claimed,
        reader: NotificationReader,
        key: str,
        reason: str,
    ) -> Applied:
        """Settle the intent our call carried ``key`` for, if its outcome is unknown, by
        what the notification shows, through the relay's own write-back."""
        params = {"provider": row.provider, "idempotency_key": key}
        owners = await fetch(conn, "inbox_intent_payment", params, row=dict_row)
        if not owners:
            return Applied("applied", "no intent of ours carries this key; nothing changed")
        payment_id = str(owners[0]["payment_id"])
        await conn.execute(QUERIES["lock_payments"], {"payment_ids": [payment_id]})
        (found,) = await fetch(conn, "inbox_intent_by_key", params, row=dict_row)
        status = found.pop("status")
        found.pop("completed_at")
        lease_expires_at = found.pop("lease_expires_at")
        intent = IntentRow.from_columns(**found)
        if status in ("succeeded", "failed"):
            return Applied(
                "applied",
                f"intent {intent.id} is already {status}: older than what the payment knows; "
                "nothing changed",
                payment_id,
            )
        if status == "in_flight":
            # Its write-back usually commits within milliseconds; a relay that died holding
            # it is found again when the lease ends. Look again soon, never later than that.
            wait = 1.0
            if lease_expires_at is not None:
                remaining = (lease_expires_at - datetime.now(UTC)).total_seconds()
                wait = min(max(remaining, 0.0) + 0.2, 1.0)
            raise _Retry(
                f"intent {intent.id} is in flight; looked at again shortly",
                wait,
                payment_id,
            )
        if status == "blocked" or (status == "pending" and intent.attempts == 0):
            return Applied(
                "applied",
                f"intent {intent.id} was never sent ({status}); nothing changed",
                payment_id,
            )
        decision = decide(intent.action, intent.amount_minor, intent.payment)
        if isinstance(decision, Rejection):
            return Applied(
                "applied",
                f"the payment ({intent.payment.state}) no longer allows intent {intent.id}'s "
                f"{intent.action} ({decision.error_code}); nothing changed",
                payment_id,
            )
        outcome = reader.settle(intent.command(decision.amount_minor), row.payload)
        if not isinstance(outcome, Succeeded | Declined):
            return Applied(
                "applied",
                f"the notification shows no outcome of intent {intent.id} ({status}) "
                f"({getattr(outcome, 'code', type(outcome).__name__)}); nothing changed",
                payment_id,
            )
        taken = await fetch(
            conn,
            "inbox_take_intent",
            {
                "id": intent.id,
                "lease_seconds": self.options.lease_seconds,
                "instance": self.options.instance,
            },
            row=dict_row,
        )
        if not taken or taken[0]["status"] != "in_flight":
            # A relay claimed it (or the key-lifetime guard parked it) since it was read:
            # look again once that settles, rather than call the notification applied.
            raise _Retry(
                f"intent {intent.id} changed meanwhile; looked at again shortly", 1.0, payment_id
            )
        leased = replace(intent, lease_token=int(taken[0]["lease_token"]))
        write_back = from_outcome(leased, decision.amount_minor, outcome, _NO_RETRY, self.rng)
        if isinstance(outcome, Succeeded):
            shown = format_minor(
                outcome.amount_minor, outcome.currency, _exponent_of(intent, outcome.currency)
            )
            evidence = (
                f"{reason}: the provider shows the {intent.action} applied "
                f"({outcome.provider_reference}, {shown})"
            )
        else:
            evidence = f"{reason}: the provider shows a decline ({outcome.code})"
        written = await self.store.complete_in(conn, [write_back], reason=evidence)
        if intent.id not in written:
            return Applied("applied", f"intent {intent.id} was not written; nothing changed")
        late = ""
        if status == "awaiting_confirmation":
            (resolved,) = await fetch(
                conn,
                "inbox_resolve_overdue",
                {"intent_id": intent.id, "resolution": f"{evidence}; {write_back.status}"},
                row=tuple_row,
            )
            late = f"; exception {resolved[0]} resolved (confirmed late)" if resolved[0] else ""
        return Applied(
            "applied",
            f"settled intent {intent.id} ({status} before) as {write_back.status}" + late,
            payment_id,
        )

    # -- asynchronous outcomes: confirmations (sql/0038) ---------------------------------

    async def sweep_overdue(self, *, now: datetime | None = None, limit: int = 100) -> list[int]:
        """Open a ``confirmation_overdue`` exception for each intent of these providers that
        has awaited its confirmation longer than the deadline; return the exceptions opened
        (an intent's exception is opened once; a late confirmation resolves it)."""
        if not self.readers:
            return []
        opened: list[int] = []
        async with self.db.pool.connection() as conn, conn.transaction():
            await conn.execute(
                QUERIES["set_actor"],
                {"actor": self.actor, "reason": "confirmation deadline passed"},
            )
            overdue = await fetch(
                conn,
                "awaiting_overdue",
                {
                    "providers": sorted(self.readers),
                    "deadline_seconds": self.options.confirmation_deadline_seconds,
                    "now": now,
                    "limit": limit,
                },
                row=dict_row,
            )
            for intent in overdue:
                (found,) = await fetch(
                    conn,
                    "open_overdue_confirmation",
                    {
                        "intent_id": intent["id"],
                        "detail": (
                            f"the provider accepted intent {intent['id']}'s {intent['action']} "
                            f"but sent no confirmation within "
                            f"{self.options.confirmation_deadline_seconds:g} s (awaiting since "
                            f"{intent['updated_at'].isoformat()}); check it at the provider: a "
                            "late confirmation still settles it and resolves this exception"
                        ),
                    },
                    row=tuple_row,
                )
                if found[0] is not None:
                    opened.append(int(found[0]))
                    log.warning(
                        "confirmation_overdue",
                        intent_id=intent["id"],
                        payment_id=intent["payment_id"],
                        exception_id=int(found[0]),
                    )
        return opened

    async def _confirm(
        self,
        conn: AsyncConnection[TupleRow],
        row: _Claimed,
        reader: NotificationReader,
        fact: ConfirmationReported,
        reason: str,
    ) -> Applied:
        """Finish, once, the intent whose call the provider accepted as ``fact.reference``;
        a failure reported after a success (CAPTURE_FAILED, REFUND_FAILED) reverses what
        the success booked. Duplicates and older notifications change nothing."""
        payment = await self._payment(conn, row.provider, fact.payment_reference)
        if payment is None and fact.merchant_reference:
            rows = await fetch(
                conn,
                "inbox_payment_by_id",
                {"provider": row.provider, "payment_id": fact.merchant_reference},
                row=dict_row,
            )
            payment = rows[0] if rows else None
        if payment is None:
            return Applied(
                "applied", f"no payment of ours is {fact.payment_reference}; nothing changed"
            )
        payment_id = str(payment["payment_id"])
        actions = (
            [str(Action.AUTHORIZE), str(Action.CHARGE)]
            if fact.action is Action.AUTHORIZE
            else [str(fact.action)]
        )
        found = await fetch(
            conn,
            "inbox_intent_by_reference",
            {"payment_id": payment_id, "reference": fact.reference, "actions": actions},
            row=dict_row,
        )
        what = f"{fact.event} {'true' if fact.succeeded or fact.withdrawn else 'false'}"
        by_reference = bool(found)
        if not found:
            # No intent recorded this reference: its reply is not written yet (in flight),
            # was lost, or was a stored error Adyen replays under the key (pending a retry,
            # or dead). The first unsettled intent of that action on the payment is the one
            # the notification is about (one intent of a payment runs at a time), if the
            # amounts agree.
            found = await fetch(
                conn,
                "inbox_intent_unsettled_of_action",
                {"payment_id": payment_id, "actions": actions},
                row=dict_row,
            )
            if not found:
                return Applied(
                    "applied",
                    f"{what}: no intent of ours was accepted as {fact.reference}; nothing changed",
                    payment_id,
                )
        columns = found[0]
        status = columns.pop("status")
        applied = columns.pop("amount_applied_minor")
        columns.pop("awaiting_minor")
        intent = IntentRow.from_columns(**columns)
        if status == "in_flight":
            delay = half_jitter(capped_doubling(0.5, 5.0, row.attempts), self.rng)
            raise _Retry(
                f"intent {intent.id} is in flight; looked at again shortly", delay, payment_id
            )
        if status == "succeeded" and fact.withdrawn:
            return await self._reverse(conn, row, intent, payment, int(applied or 0), fact)
        unsettled = status in ("awaiting_confirmation", "dead") or (
            status == "pending" and intent.attempts > 0
        )
        if not unsettled:
            return Applied(
                "applied",
                f"{what}: intent {intent.id} is already {status}"
                + (" (never sent)" if status == "pending" else "")
                + ": older than what the payment knows; nothing changed",
                payment_id,
            )
        decision = decide(intent.action, intent.amount_minor, intent.payment)
        if isinstance(decision, Rejection):
            return Applied(
                "applied",
                f"the payment no longer allows intent {intent.id} ({decision.error_code}); "
                "nothing changed",
                payment_id,
            )
        reported = reader.minor_units(fact.amount, fact.currency, payment["exponent"])
        if (
            not by_reference
            and intent.action is not Action.VOID
            and (reported != decision.amount_minor or fact.currency != intent.currency)
        ):
            return Applied(
                "applied",
                f"{what} of {fact.currency} {reported} does not match intent {intent.id}'s "
                f"{intent.action} of {intent.currency} {decision.amount_minor}; nothing changed",
                payment_id,
            )
        if fact.succeeded:
            confirmed = decision.amount_minor if intent.action is Action.VOID else reported
            outcome: Succeeded | Declined = Succeeded(
                fact.reference,
                fact.payment_reference,
                confirmed,
                fact.currency if intent.action is not Action.VOID else intent.currency,
            )
            evidence = f"{reason}: the provider confirms the {intent.action}"
        else:
            code = fact.event.lower() if fact.withdrawn else f"{fact.event.lower()}_refused"
            outcome = Declined(code, fact.reason or f"the provider reports {what}")
            evidence = f"{reason}: the provider reports {what} ({fact.reason or 'no reason'})"
        taken = await fetch(
            conn,
            "inbox_take_intent",
            {
                "id": intent.id,
                "lease_seconds": self.options.lease_seconds,
                "instance": self.options.instance,
            },
            row=dict_row,
        )
        if not taken:  # pragma: no cover - the payment's lock serialises confirmations
            raise _Retry(f"intent {intent.id} changed meanwhile", 1.0, payment_id)
        leased = replace(intent, lease_token=int(taken[0]["lease_token"]))
        write_back = from_outcome(leased, decision.amount_minor, outcome, _NO_RETRY, self.rng)
        written = await self.store.complete_in(conn, [write_back], reason=evidence)
        if intent.id not in written:  # pragma: no cover - fenced by the lease just taken
            raise _Retry(f"intent {intent.id} was not written", 1.0, payment_id)
        (resolved,) = await fetch(
            conn,
            "inbox_resolve_overdue",
            {"intent_id": intent.id, "resolution": f"{evidence}; intent {write_back.status}"},
            row=tuple_row,
        )
        late = f"; exception {resolved[0]} resolved (confirmed late)" if resolved[0] else ""
        return Applied(
            "applied",
            f"{what} finished intent {intent.id} ({status}) as "
            f"{write_back.status}"
            + (
                f" ({write_back.error_code})"
                if write_back.error_code and write_back.status != "succeeded"
                else ""
            )
            + late,
            payment_id,
        )

    async def _reverse(
        self,
        conn: AsyncConnection[TupleRow],
        row: _Claimed,
        intent: IntentRow,
        payment: Mapping[str, Any],
        applied: int,
        fact: ConfirmationReported,
    ) -> Applied:
        """The provider withdrew a capture or refund it had confirmed: the payment's amount
        and state back, the posting reversed exactly (sql/0038), an event; once."""
        payment_id = str(payment["payment_id"])
        money = _formatter(payment)
        (done,) = await fetch(conn, "inbox_reversed", {"intent_id": intent.id}, row=dict_row)
        if done["reversed"]:
            return Applied(
                "applied",
                f"{fact.event}: intent {intent.id}'s {intent.action} is already reversed; "
                "nothing changed",
                payment_id,
            )
        captured, refunded = int(payment["captured_minor"]), int(payment["refunded_minor"])
        if intent.action is Action.CAPTURE:
            if refunded or int(payment["disputed_minor"]) or payment["state"] != "captured":
                exception = await self._exception(
                    conn,
                    row,
                    "external_change",
                    f"withdrawn:{fact.reference}",
                    payment,
                    captured,
                    captured - applied,
                    f"{fact.event} withdraws the capture of {money(applied)} (intent "
                    f"{intent.id}) from a payment already {payment['state']}, refunded "
                    f"{money(refunded)}: an operator decides",
                )
                return Applied(
                    "applied",
                    f"{fact.event} cannot be reversed automatically; exception {exception}",
                    payment_id,
                )
            after = {"captured_minor": captured - applied, "refunded_minor": refunded}
            state = "authorized" if captured - applied == 0 else "captured"
        else:
            after = {"captured_minor": captured, "refunded_minor": refunded - applied}
            state = "captured" if refunded - applied == 0 else "partially_refunded"
        (updated,) = await fetch(
            conn,
            "inbox_record_reversal",
            {"payment_id": payment_id, "state": state, **after},
            row=dict_row,
        )
        await fetch(
            conn,
            "inbox_post_reversal",
            {"inbox_id": row.id, "intent_id": intent.id},
            row=tuple_row,
        )
        await self._event(
            conn,
            row,
            payment_id,
            f"payment.{intent.action}.reversed",
            updated,
            str(payment["currency"]),
            {
                "intent_id": intent.id,
                "amount_minor": applied,
                "event": fact.event,
                "reason": fact.reason,
            },
        )
        return Applied(
            "applied",
            f"{fact.event}: the {intent.action} of {money(applied)} (intent {intent.id}) is "
            f"withdrawn: payment {state}, ledger {intent.action}_reversal",
            payment_id,
        )

    async def _authorisation_ended(
        self, conn: AsyncConnection[TupleRow], row: _Claimed, fact: AuthorisationEnded
    ) -> Applied:
        """The provider released an open authorisation by itself: the payment is voided
        (its hold released in the ledger by a void posting) and an event says why."""
        payment = await self._payment(conn, row.provider, fact.payment_reference)
        if payment is None:
            return Applied(
                "applied", f"no payment of ours is {fact.payment_reference}; nothing changed"
            )
        payment_id = str(payment["payment_id"])
        if payment["state"] != "authorized" or int(payment["unresolved"]):
            return Applied(
                "applied",
                f"{fact.event}: the payment is {payment['state']}"
                + (" with an intent unresolved" if int(payment["unresolved"]) else "")
                + "; nothing changed",
                payment_id,
            )
        (updated,) = await fetch(
            conn, "inbox_record_authorisation_ended", {"payment_id": payment_id}, row=dict_row
        )
        await conn.execute(
            QUERIES["inbox_post_ledger"],
            {
                "inbox_id": row.id,
                "payment_id": payment_id,
                "kind": "void",
                "amount_minor": int(payment["authorized_minor"]),
                "reference": fact.payment_reference,
            },
        )
        await self._event(
            conn,
            row,
            payment_id,
            "payment.authorization.ended",
            updated,
            str(payment["currency"]),
            {"event": fact.event, "reason": fact.reason},
        )
        return Applied(
            "applied",
            f"{fact.event}: the provider released the authorisation of "
            f"{_formatter(payment)(int(payment['authorized_minor']))}; payment voided",
            payment_id,
        )

    # -- refunds ------------------------------------------------------------------------

    async def _payment(
        self, conn: AsyncConnection[TupleRow], provider: str, reference: str
    ) -> dict[str, Any] | None:
        rows = await fetch(
            conn,
            "inbox_payment_by_reference",
            {"provider": provider, "reference": reference},
            row=dict_row,
        )
        return rows[0] if rows else None

    async def _refunds(
        self,
        conn: AsyncConnection[TupleRow],
        row: _Claimed,
        reader: NotificationReader,
        fact: RefundsReported,
    ) -> Applied:
        payment = await self._payment(conn, row.provider, fact.payment_reference)
        if payment is None:
            return Applied(
                "applied", f"no payment of ours is {fact.payment_reference}; nothing changed"
            )
        payment_id = str(payment["payment_id"])
        # Our own refunds whose outcome we do not know (dead, or pending a retry after an
        # ambiguous reply) are settled first, exactly as a PaymentIntent notification
        # settles a charge; then the totals say what is left to explain.
        settled = await self._settle_our_refunds(conn, row, reader, fact)
        if settled:
            payment = await self._payment(conn, row.provider, fact.payment_reference)
            assert payment is not None  # locked by this transaction
        exponent = payment["exponent"]
        currency = str(payment["currency"])
        money = _formatter(payment)
        if fact.currency != currency:
            exception = await self._exception(
                conn,
                row,
                "currency_mismatch",
                f"webhook:{fact.payment_reference}:currency",
                payment,
                None,
                None,
                f"the provider reports refunds in {fact.currency}, the payment is in {currency}",
            )
            return Applied("applied", f"currency differs; exception {exception}", payment_id)
        provider_refunded = reader.minor_units(fact.refunded_total, currency, exponent)
        provider_captured = reader.minor_units(fact.captured_total, currency, exponent)
        # Our own refunds the payment does not show yet: their intents' write-backs record
        # them (in flight now, or settled by the janitor or their own notification).
        ours_pending = await self._our_unrecorded_refunds(
            conn, row, reader, fact, currency, exponent
        )
        known = int(payment["refunded_minor"])
        external = provider_refunded - known - ours_pending
        if external <= 0:
            result = (
                "".join(f"{note}; " for note in settled)
                + f"the provider shows {money(provider_refunded)} refunded, "
                f"the payment {money(known)}"
                + (f" and {money(ours_pending)} of ours in flight" if ours_pending else "")
                + ": older than what the payment knows; nothing changed"
            )
            mismatch = ""
            if external == 0:
                # Current, not older: comparable with the ledger as it stands.
                mismatch = await self._compare_with_ledger(
                    conn, row, payment, provider_captured, provider_refunded - ours_pending
                )
            return Applied("applied", result + mismatch, payment_id)
        captured = int(payment["captured_minor"])
        if (
            payment["state"] not in ("captured", "partially_refunded")
            or known + external > captured
        ):
            exception = await self._exception(
                conn,
                row,
                "external_change",
                f"webhook:{fact.payment_reference}:refund",
                payment,
                known,
                provider_refunded,
                f"the provider shows {money(provider_refunded)} refunded, which the payment "
                f"({payment['state']}, {money(captured)} captured, {money(known)} refunded) "
                "cannot take: "
                "a change made outside the relay",
            )
            return Applied(
                "applied",
                f"a refund of {money(external)} made outside the relay contradicts the payment "
                f"({payment['state']}); exception {exception} opened",
                payment_id,
            )
        refunded = known + external
        state = refund_state(captured, refunded)
        (updated,) = await fetch(
            conn,
            "inbox_record_refund",
            {"payment_id": payment_id, "refunded_minor": refunded, "state": state},
            row=dict_row,
        )
        new_refund = next((r.refund_id for r in fact.refunds if r.idempotency_key is None), None)
        await conn.execute(
            QUERIES["inbox_post_ledger"],
            {
                "inbox_id": row.id,
                "payment_id": payment_id,
                "kind": "refund",
                "amount_minor": external,
                "reference": new_refund,
            },
        )
        await self._event(
            conn,
            row,
            payment_id,
            "payment.refund.external",
            updated,
            currency,
            {"amount_minor": external, "refund": new_refund},
        )
        mismatch = await self._compare_with_ledger(
            conn, row, payment, provider_captured, provider_refunded - ours_pending
        )
        return Applied(
            "applied",
            f"recorded a refund of {money(external)} made outside the relay; the payment "
            f"is {state} ({money(refunded)} of {money(captured)} refunded)" + mismatch,
            payment_id,
        )

    async def _settle_our_refunds(
        self,
        conn: AsyncConnection[TupleRow],
        row: _Claimed,
        reader: NotificationReader,
        fact: RefundsReported,
    ) -> list[str]:
        notes: list[str] = []
        reason = f"webhook {row.provider} {row.event_id} ({row.event_type})"
        for refund in fact.refunds:
            if refund.idempotency_key is None:
                continue
            found = await fetch(
                conn,
                "inbox_intent_by_key",
                {"provider": row.provider, "idempotency_key": refund.idempotency_key},
                row=dict_row,
            )
            if not found:
                continue
            status, attempts = found[0]["status"], found[0]["attempts"]
            if status == "in_flight":
                # Its relay writes it within moments (or its lease ends): the totals are
                # read again then, so this refund is neither missed nor counted twice.
                raise _Retry(
                    f"our refund intent {found[0]['id']} is in flight; looked at again shortly",
                    1.0,
                    str(found[0]["payment_id"]),
                )
            if status in ("dead", "awaiting_confirmation") or (
                status == "pending" and attempts > 0
            ):
                done = await self._settle_key(conn, row, reader, refund.idempotency_key, reason)
                if done.result.startswith("settled"):
                    notes.append(done.result)
        return notes

    async def _our_unrecorded_refunds(
        self,
        conn: AsyncConnection[TupleRow],
        row: _Claimed,
        reader: NotificationReader,
        fact: RefundsReported,
        currency: str,
        exponent: int | None,
    ) -> int:
        total = 0
        for refund in fact.refunds:
            if refund.idempotency_key is None:
                continue
            found = await fetch(
                conn,
                "inbox_intent_by_key",
                {"provider": row.provider, "idempotency_key": refund.idempotency_key},
                row=dict_row,
            )
            if (
                found
                and found[0]["status"] != "succeeded"
                and refund.status in ("succeeded", "pending")
            ):
                total += reader.minor_units(refund.amount, currency, exponent)
        return total

    # -- captures -----------------------------------------------------------------------

    async def _capture(
        self,
        conn: AsyncConnection[TupleRow],
        row: _Claimed,
        reader: NotificationReader,
        fact: CaptureReported,
    ) -> Applied:
        """A capture we did not send (another system captured a charge we only
        authorised) is recorded like a dashboard refund: payment, ledger posting naming
        the notification, ``payment.capture.external``. Ours (a capture intent of the
        payment not written yet) is left to its write-back or the janitor's lookup."""
        payment = await self._payment(conn, row.provider, fact.payment_reference)
        if payment is None:
            return Applied(
                "applied", f"no payment of ours is {fact.payment_reference}; nothing changed"
            )
        payment_id = str(payment["payment_id"])
        currency = str(payment["currency"])
        money = _formatter(payment)
        if fact.currency != currency:
            exception = await self._exception(
                conn,
                row,
                "currency_mismatch",
                f"webhook:{fact.payment_reference}:currency",
                payment,
                None,
                None,
                f"the provider reports a capture in {fact.currency}, the payment is in {currency}",
            )
            return Applied("applied", f"currency differs; exception {exception}", payment_id)
        captured = reader.minor_units(fact.captured_total, currency, payment["exponent"])
        known = int(payment["captured_minor"])
        if captured <= known:
            return Applied(
                "applied",
                f"the provider shows {money(captured)} captured, the payment {money(known)}: "
                "older than what the payment knows; nothing changed",
                payment_id,
            )
        ours = await fetch(
            conn, "inbox_unresolved_captures", {"payment_id": payment_id}, row=dict_row
        )
        for intent in ours:
            if intent["status"] == "in_flight":
                raise _Retry(
                    f"our capture intent {intent['id']} is in flight; looked at again shortly",
                    1.0,
                    payment_id,
                )
        if ours:
            return Applied(
                "applied",
                f"our capture intent {ours[0]['id']} is {ours[0]['status']}: its write-back or "
                "the janitor's lookup records this capture; nothing changed",
                payment_id,
            )
        authorized = int(payment["authorized_minor"])
        if payment["state"] != "authorized" or captured > authorized:
            exception = await self._exception(
                conn,
                row,
                "external_change",
                f"webhook:{fact.payment_reference}:capture",
                payment,
                known,
                captured,
                f"the provider shows {money(captured)} captured, which the payment "
                f"({payment['state']}, {money(authorized)} authorized) cannot take: a change made "
                "outside the relay",
            )
            return Applied(
                "applied",
                f"a capture of {money(captured)} made outside the relay contradicts the payment "
                f"({payment['state']}); exception {exception} opened",
                payment_id,
            )
        (updated,) = await fetch(
            conn,
            "inbox_record_capture",
            {"payment_id": payment_id, "captured_minor": captured},
            row=dict_row,
        )
        await conn.execute(
            QUERIES["inbox_post_ledger"],
            {
                "inbox_id": row.id,
                "payment_id": payment_id,
                "kind": "capture",
                "amount_minor": captured,
                "reference": fact.charge_id,
            },
        )
        await self._event(
            conn,
            row,
            payment_id,
            "payment.capture.external",
            updated,
            currency,
            {"amount_minor": captured, "charge": fact.charge_id},
        )
        return Applied(
            "applied",
            f"recorded a capture of {money(captured)} made outside the relay "
            f"({money(authorized)} authorized; the hold is released)",
            payment_id,
        )

    # -- disputes -----------------------------------------------------------------------
    #
    # One dispute per payment (a charge is disputed once). Its funds leave the receivable
    # when it opens (ledger kind `dispute`, sql/0035) and come back when it is won
    # (`dispute_reversal`); a lost dispute's posting stays, final. The payment's
    # dispute_reference and dispute_status say what is already recorded, so a duplicate
    # or an older notification changes nothing, and a `closed` that overtakes its
    # `created` records the opening first (the late `created` then changes nothing).

    async def _dispute_opened(
        self,
        conn: AsyncConnection[TupleRow],
        row: _Claimed,
        reader: NotificationReader,
        fact: DisputeOpened,
    ) -> Applied:
        payment = await self._payment(conn, row.provider, fact.payment_reference)
        if payment is None:
            return Applied(
                "applied", f"no payment of ours is {fact.payment_reference}; nothing changed"
            )
        payment_id = str(payment["payment_id"])
        known = payment["dispute_reference"]
        if known == fact.dispute_id:
            return Applied(
                "applied",
                f"dispute {fact.dispute_id} is already recorded ({payment['dispute_status']}): "
                "older than what the payment knows; nothing changed",
                payment_id,
            )
        refused = await self._dispute_refused(conn, row, reader, payment, fact)
        if refused is not None:
            return refused
        amount = reader.minor_units(fact.amount, fact.currency, payment["exponent"])
        if fact.inquiry:
            # An inquiry withdraws nothing: the operator answers it, the money stays.
            exception = await self._dispute_exception(conn, row, payment, fact, amount)
            await self._event(
                conn,
                row,
                payment_id,
                "payment.dispute.opened",
                payment,
                str(payment["currency"]),
                {
                    "dispute": fact.dispute_id,
                    "amount_minor": amount,
                    "reason": fact.reason,
                    "inquiry": True,
                    "exception_id": exception,
                },
            )
            return Applied(
                "applied",
                f"inquiry {fact.dispute_id} of {_formatter(payment)(amount)}: no funds withdrawn; "
                f"exception {exception}",
                payment_id,
            )
        _, exception = await self._withdraw(conn, row, payment, fact, amount)
        return Applied(
            "applied",
            f"dispute {fact.dispute_id}: the provider withdrew {_formatter(payment)(amount)} "
            f"(ledger: disputed); exception {exception}",
            payment_id,
        )

    async def _dispute_closed(
        self,
        conn: AsyncConnection[TupleRow],
        row: _Claimed,
        reader: NotificationReader,
        fact: DisputeClosed,
    ) -> Applied:
        payment = await self._payment(conn, row.provider, fact.payment_reference)
        if payment is None:
            return Applied(
                "applied", f"no payment of ours is {fact.payment_reference}; nothing changed"
            )
        payment_id = str(payment["payment_id"])
        currency = str(payment["currency"])
        money = _formatter(payment)
        if fact.outcome == "inquiry":
            return Applied(
                "applied",
                f"inquiry {fact.dispute_id} closed; no funds moved; nothing changed",
                payment_id,
            )
        if payment["dispute_reference"] == fact.dispute_id and payment["dispute_status"] in (
            "won",
            "lost",
        ):
            return Applied(
                "applied",
                f"dispute {fact.dispute_id} is already {payment['dispute_status']}: "
                "older than what the payment knows; nothing changed",
                payment_id,
            )
        notes = ""
        if payment["dispute_reference"] != fact.dispute_id:
            refused = await self._dispute_refused(conn, row, reader, payment, fact)
            if refused is not None:
                return refused
            # The outcome overtook the opening (or the opening was never delivered):
            # record the withdrawal first, as the opening would have.
            amount = reader.minor_units(fact.amount, fact.currency, payment["exponent"])
            payment, _ = await self._withdraw(conn, row, payment, fact, amount)
            notes = f"recorded the opening of dispute {fact.dispute_id} first ({money(amount)}); "
        withdrawn = int(payment["disputed_minor"])
        if fact.outcome == "won":
            if withdrawn:
                await conn.execute(
                    QUERIES["inbox_post_ledger"],
                    {
                        "inbox_id": row.id,
                        "payment_id": payment_id,
                        "kind": "dispute_reversal",
                        "amount_minor": withdrawn,
                        "reference": fact.dispute_id,
                    },
                )
            (updated,) = await fetch(
                conn,
                "inbox_record_dispute",
                {
                    "payment_id": payment_id,
                    "disputed_minor": 0,
                    "dispute_status": "won",
                    "dispute_reference": fact.dispute_id,
                },
                row=dict_row,
            )
            await self._event(
                conn,
                row,
                payment_id,
                "payment.dispute.won",
                updated,
                currency,
                {"dispute": fact.dispute_id, "amount_minor": withdrawn, "returned": True},
            )
            return Applied(
                "applied",
                notes + f"dispute {fact.dispute_id} won: {money(withdrawn)} returned "
                "(ledger: dispute_reversal)",
                payment_id,
            )
        (updated,) = await fetch(
            conn,
            "inbox_record_dispute",
            {
                "payment_id": payment_id,
                "disputed_minor": withdrawn,
                "dispute_status": "lost",
                "dispute_reference": fact.dispute_id,
            },
            row=dict_row,
        )
        await self._event(
            conn,
            row,
            payment_id,
            "payment.dispute.lost",
            updated,
            currency,
            {"dispute": fact.dispute_id, "amount_minor": withdrawn, "returned": False},
        )
        return Applied(
            "applied",
            notes + f"dispute {fact.dispute_id} lost: the withdrawal of {money(withdrawn)} "
            "is final (its ledger posting stays in disputed)",
            payment_id,
        )

    async def _dispute_refused(
        self,
        conn: AsyncConnection[TupleRow],
        row: _Claimed,
        reader: NotificationReader,
        payment: Mapping[str, Any],
        fact: DisputeOpened | DisputeClosed,
    ) -> Applied | None:
        """An exception instead of money when the payment cannot take the dispute: another
        currency, a second dispute, or more than the payment holds."""
        payment_id = str(payment["payment_id"])
        currency = str(payment["currency"])
        if fact.currency != currency:
            exception = await self._exception(
                conn,
                row,
                "currency_mismatch",
                f"dispute:{fact.dispute_id}:currency",
                payment,
                None,
                None,
                f"dispute {fact.dispute_id} is in {fact.currency}, the payment in {currency}",
            )
            return Applied("applied", f"currency differs; exception {exception}", payment_id)
        amount = reader.minor_units(fact.amount, fact.currency, payment["exponent"])
        money = _formatter(payment)
        holds = (
            int(payment["captured_minor"])
            - int(payment["refunded_minor"])
            - int(payment["disputed_minor"])
        )
        other = payment["dispute_reference"]
        if other is not None or amount > holds:
            why = (
                f"the payment already has dispute {other} ({payment['dispute_status']})"
                if other is not None
                else f"the payment holds {money(holds)} "
                f"(captured {money(int(payment['captured_minor']))}, "
                f"refunded {money(int(payment['refunded_minor']))})"
            )
            exception = await self._exception(
                conn,
                row,
                "external_change",
                f"dispute:{fact.dispute_id}:refused",
                payment,
                holds,
                amount,
                f"dispute {fact.dispute_id} of {money(amount)} cannot be recorded: {why}",
            )
            return Applied(
                "applied",
                f"dispute {fact.dispute_id} not recorded ({why}); exception {exception}",
                payment_id,
            )
        return None

    async def _withdraw(
        self,
        conn: AsyncConnection[TupleRow],
        row: _Claimed,
        payment: Mapping[str, Any],
        fact: DisputeOpened | DisputeClosed,
        amount: int,
    ) -> tuple[dict[str, Any], int]:
        """The opening of a dispute: the provider withdrew ``amount``. Payment, ledger
        posting, exception and ``payment.dispute.opened``; the payment as updated."""
        payment_id = str(payment["payment_id"])
        if amount > 0:
            await conn.execute(
                QUERIES["inbox_post_ledger"],
                {
                    "inbox_id": row.id,
                    "payment_id": payment_id,
                    "kind": "dispute",
                    "amount_minor": amount,
                    "reference": fact.dispute_id,
                },
            )
        (updated,) = await fetch(
            conn,
            "inbox_record_dispute",
            {
                "payment_id": payment_id,
                "disputed_minor": int(payment["disputed_minor"]) + amount,
                "dispute_status": "open",
                "dispute_reference": fact.dispute_id,
            },
            row=dict_row,
        )
        exception = await self._dispute_exception(conn, row, payment, fact, amount)
        await self._event(
            conn,
            row,
            payment_id,
            "payment.dispute.opened",
            updated,
            str(payment["currency"]),
            {
                "dispute": fact.dispute_id,
                "amount_minor": amount,
                "reason": fact.reason,
                "exception_id": exception,
            },
        )
        return {**payment, **updated}, exception

    async def _dispute_exception(
        self,
        conn: AsyncConnection[TupleRow],
        row: _Claimed,
        payment: Mapping[str, Any],
        fact: DisputeOpened | DisputeClosed,
        amount: int,
    ) -> int:
        return await self._exception(
            conn,
            row,
            "dispute",
            f"dispute:{fact.dispute_id}",
            payment,
            int(payment["captured_minor"]) - int(payment["refunded_minor"]),
            amount,
            f"the customer disputes {_formatter(payment)(amount)} of {fact.payment_reference} "
            f"({fact.reason}); answer it at the provider before its deadline",
        )

    # -- shared effects -----------------------------------------------------------------

    async def _compare_with_ledger(
        self,
        conn: AsyncConnection[TupleRow],
        row: _Claimed,
        payment: Mapping[str, Any],
        provider_captured: int,
        provider_refunded: int,
    ) -> str:
        """The notification's totals against the payment's ledger, now; an exception on a
        difference. Skipped while an intent of the payment is unresolved (its write-back
        is the next change, and would make any difference a false alarm)."""
        if int(payment["unresolved"]):
            return ""
        (ledger,) = await fetch(
            conn, "inbox_ledger_totals", {"payment_id": payment["payment_id"]}, row=dict_row
        )
        ours = (int(ledger["captured"]), int(ledger["refunded"]))
        money = _formatter(payment)
        theirs = (provider_captured, provider_refunded)
        if ours == theirs:
            return ""
        exception = await self._exception(
            conn,
            row,
            "amount_mismatch",
            f"webhook:{payment['provider_reference']}:totals",
            payment,
            ours[0] - ours[1],
            theirs[0] - theirs[1],
            f"the provider shows {money(theirs[0])} captured and {money(theirs[1])} refunded, "
            f"the ledger {money(ours[0])} and {money(ours[1])}",
        )
        return f"; the ledger differs from the provider: exception {exception}"

    async def _exception(
        self,
        conn: AsyncConnection[TupleRow],
        row: _Claimed,
        kind: str,
        match_key: str,
        payment: Mapping[str, Any],
        internal: int | None,
        theirs: int | None,
        detail: str,
    ) -> int:
        cur = await conn.execute(
            QUERIES["inbox_open_exception"],
            {
                "inbox_id": row.id,
                "provider": row.provider,
                "kind": kind,
                "match_key": match_key[:255],
                "payment_id": payment["payment_id"],
                "currency": payment["currency"],
                "internal_minor": internal,
                "provider_minor": theirs,
                "detail": detail[:1000],
                "occurred_at": row.event_created_at or row.received_at,
            },
        )
        found = await cur.fetchone()
        assert found is not None
        log.warning("inbox_exception", kind=kind, exception_id=found[0])
        return int(found[0])

    async def _event(
        self,
        conn: AsyncConnection[TupleRow],
        row: _Claimed,
        payment_id: str,
        event_type: str,
        payment: Mapping[str, Any],
        currency: str,
        change: Mapping[str, Any],
    ) -> None:
        payload = {
            "notification": {
                "provider": row.provider,
                "event_id": row.event_id,
                "type": row.event_type,
                "created": row.event_created_at.isoformat() if row.event_created_at else None,
            },
            "payment": {
                "state": payment["state"],
                "currency": currency,
                "authorized_minor": payment["authorized_minor"],
                "captured_minor": payment["captured_minor"],
                "refunded_minor": payment["refunded_minor"],
                "disputed_minor": payment.get("disputed_minor", 0),
                "dispute_status": payment.get("dispute_status"),
                "provider_reference": payment["provider_reference"],
            },
            "change": dict(change),
        }
        await conn.execute(
            QUERIES["inbox_event"],
            {"payment_id": payment_id, "event_type": event_type, "payload": Jsonb(payload)},
        )


async def store_notification(
    db: Database,
    provider: str,
    event_id: str,
    event_type: str,
    created: datetime | None,
    body_text: str,
) -> bool:
    """Insert one verified notification (the raw verified text, parsed by PostgreSQL, so
    what is stored is what was signed, redacted of card numbers by the table's trigger);
    committed when this returns. False: a duplicate, already stored."""
    rows = await db.fetch_all(
        "inbox_insert",
        {
            "provider": provider,
            "event_id": event_id,
            "event_type": event_type,
            "event_created_at": created,
            "payload": body_text,
        },
    )
    return bool(rows)


async def purge_applied(
    db: Database, *, older_than_seconds: float, limit: int, now: datetime | None = None
) -> int:
    """Delete up to ``limit`` applied or ignored notifications older than the retention;
    return how many. Received ones are never deleted."""
    rows = await db.fetch_all(
        "inbox_retention", {"older_than_seconds": older_than_seconds, "limit": limit, "now": now}
    )
    return len(rows)
