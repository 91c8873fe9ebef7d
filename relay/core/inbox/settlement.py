"""Notifications that settle an intent of ours whose outcome we did not know (dead, or
pending a retry after an ambiguous reply), through the relay's own fenced write-back."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

from psycopg import AsyncConnection
from psycopg.rows import TupleRow, dict_row, tuple_row

from provider_adapters.base import (
    Declined,
    NotificationReader,
    PaymentSettled,
    Succeeded,
)
from relay.core.inbox.common import (
    NO_RETRY,
    Applied,
    ApplierBase,
    Claimed,
    Retry,
    exponent_of,
)
from relay.domain.intents import IntentRow
from relay.domain.money import format_minor
from relay.domain.outcome_mapping import from_outcome
from relay.domain.state_machine import Rejection, decide
from relay.infra.db import fetch
from relay.infra.queries import QUERIES


class Settlement(ApplierBase):
    """Settles our own intents from a notification, as the janitor's lookup would."""

    async def _settle(
        self,
        conn: AsyncConnection[TupleRow],
        row: Claimed,
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
        row: Claimed,
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
            raise Retry(
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
            raise Retry(
                f"intent {intent.id} changed meanwhile; looked at again shortly", 1.0, payment_id
            )
        leased = replace(intent, lease_token=int(taken[0]["lease_token"]))
        write_back = from_outcome(leased, decision.amount_minor, outcome, NO_RETRY, self.rng)
        if isinstance(outcome, Succeeded):
            shown = format_minor(
                outcome.amount_minor, outcome.currency, exponent_of(intent, outcome.currency)
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
