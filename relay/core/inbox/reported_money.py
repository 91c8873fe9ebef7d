"""Totals the provider reports (refunds, captures), including changes we did not make:
recorded once, compared with the ledger at once."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from psycopg import AsyncConnection
from psycopg.rows import TupleRow, dict_row

from provider_adapters.base import (
    CaptureReported,
    NotificationReader,
    RefundsReported,
)
from relay.core.inbox.common import (
    Applied,
    Claimed,
    Retry,
    formatter,
    refund_state,
)
from relay.core.inbox.settlement import Settlement
from relay.infra.db import fetch
from relay.infra.queries import QUERIES


class ReportedMoney(Settlement):
    """Refunds and captures the provider reports, ours or made elsewhere."""

    async def _refunds(
        self,
        conn: AsyncConnection[TupleRow],
        row: Claimed,
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
        money = formatter(payment)
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
        row: Claimed,
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
                raise Retry(
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
        row: Claimed,
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
        row: Claimed,
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
        money = formatter(payment)
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
                raise Retry(
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

    async def _compare_with_ledger(
        self,
        conn: AsyncConnection[TupleRow],
        row: Claimed,
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
        money = formatter(payment)
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
