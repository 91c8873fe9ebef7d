"""Asynchronous confirmations: an intent the provider accepted (awaiting_confirmation) is
finished, withdrawn or reversed by its notification exactly once; the deadline sweep opens
an exception when none comes."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from datetime import datetime
from typing import Any

from psycopg import AsyncConnection
from psycopg.rows import TupleRow, dict_row, tuple_row

from provider_adapters.base import (
    Action,
    AuthorisationEnded,
    ConfirmationReported,
    Declined,
    NotificationReader,
    Succeeded,
)
from relay.core.inbox.common import (
    NO_RETRY,
    Applied,
    ApplierBase,
    Claimed,
    Retry,
    formatter,
    log,
)
from relay.domain.intents import IntentRow
from relay.domain.outcome_mapping import from_outcome
from relay.domain.retry_policy import capped_doubling, half_jitter
from relay.domain.state_machine import Rejection, decide
from relay.infra.db import fetch
from relay.infra.queries import QUERIES


class Confirmations(ApplierBase):
    """Confirmations of accepted intents, their reversal, ended authorisations, the deadline."""

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
        row: Claimed,
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
            raise Retry(
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
            raise Retry(f"intent {intent.id} changed meanwhile", 1.0, payment_id)
        leased = replace(intent, lease_token=int(taken[0]["lease_token"]))
        write_back = from_outcome(leased, decision.amount_minor, outcome, NO_RETRY, self.rng)
        written = await self.store.complete_in(conn, [write_back], reason=evidence)
        if intent.id not in written:  # pragma: no cover - fenced by the lease just taken
            raise Retry(f"intent {intent.id} was not written", 1.0, payment_id)
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
        row: Claimed,
        intent: IntentRow,
        payment: Mapping[str, Any],
        applied: int,
        fact: ConfirmationReported,
    ) -> Applied:
        """The provider withdrew a capture or refund it had confirmed: the payment's amount
        and state back, the posting reversed exactly (sql/0038), an event; once."""
        payment_id = str(payment["payment_id"])
        money = formatter(payment)
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
        self, conn: AsyncConnection[TupleRow], row: Claimed, fact: AuthorisationEnded
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
            f"{formatter(payment)(int(payment['authorized_minor']))}; payment voided",
            payment_id,
        )

    # -- refunds ------------------------------------------------------------------------
