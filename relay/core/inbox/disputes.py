"""Disputes and chargebacks: the withdrawn amount, its return when won, and the exception
an operator works."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from psycopg import AsyncConnection
from psycopg.rows import TupleRow, dict_row

from provider_adapters.base import (
    DisputeClosed,
    DisputeOpened,
    NotificationReader,
)
from relay.core.inbox.common import (
    Applied,
    ApplierBase,
    Claimed,
    formatter,
)
from relay.infra.db import fetch
from relay.infra.queries import QUERIES


class Disputes(ApplierBase):
    """Disputes opened, closed, or refused by the payment's state."""

    async def _dispute_opened(
        self,
        conn: AsyncConnection[TupleRow],
        row: Claimed,
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
                f"inquiry {fact.dispute_id} of {formatter(payment)(amount)}: no funds withdrawn; "
                f"exception {exception}",
                payment_id,
            )
        _, exception = await self._withdraw(conn, row, payment, fact, amount)
        return Applied(
            "applied",
            f"dispute {fact.dispute_id}: the provider withdrew {formatter(payment)(amount)} "
            f"(ledger: disputed); exception {exception}",
            payment_id,
        )

    async def _dispute_closed(
        self,
        conn: AsyncConnection[TupleRow],
        row: Claimed,
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
        money = formatter(payment)
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
        won = fact.outcome == "won"
        if won and withdrawn:
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
        # Won: the withdrawal comes back (dispute_reversal) and the payment holds it again.
        # Lost: the withdrawal stays, final, in the ledger's disputed postings.
        status = "won" if won else "lost"
        (updated,) = await fetch(
            conn,
            "inbox_record_dispute",
            {
                "payment_id": payment_id,
                "disputed_minor": 0 if won else withdrawn,
                "dispute_status": status,
                "dispute_reference": fact.dispute_id,
            },
            row=dict_row,
        )
        await self._event(
            conn,
            row,
            payment_id,
            f"payment.dispute.{status}",
            updated,
            currency,
            {"dispute": fact.dispute_id, "amount_minor": withdrawn, "returned": won},
        )
        outcome = (
            f"{money(withdrawn)} returned (ledger: dispute_reversal)"
            if won
            else f"the withdrawal of {money(withdrawn)} is final (its ledger posting stays "
            "in disputed)"
        )
        return Applied(
            "applied", notes + f"dispute {fact.dispute_id} {status}: {outcome}", payment_id
        )

    async def _dispute_refused(
        self,
        conn: AsyncConnection[TupleRow],
        row: Claimed,
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
        money = formatter(payment)
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
        row: Claimed,
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
        row: Claimed,
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
            f"the customer disputes {formatter(payment)(amount)} of {fact.payment_reference} "
            f"({fact.reason}); answer it at the provider before its deadline",
        )

    # -- shared effects -----------------------------------------------------------------
