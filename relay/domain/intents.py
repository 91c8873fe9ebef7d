"""The rows the relay reads about a payment intent and the outcome rows it writes back.

Pure types, no I/O: the claim (``claim_intents``) and the janitor (``janitor_reserve``)
build the same :class:`IntentRow`, as can any tool that reads an intent with its payment;
:mod:`relay.domain.outcome_mapping` turns one into a :class:`WriteBack`. Guarantees, each
tested:

* :meth:`IntentRow.from_columns` takes each column as the parameter of its name in
  queries.sql (``payment_state`` and ``payment_reference`` for the payment's ``state`` and
  ``provider_reference``); an intent read without ``lease_token``, ``traceparent`` or
  ``exponent`` has None there;
* the payment's snapshot carries the intent's currency (a payment has one currency);
* :meth:`IntentRow.require_lease` returns the lease token of a claimed intent and raises
  ``ValueError`` for an intent read without a lease, whose outcome could not be fenced.
"""

from __future__ import annotations

from dataclasses import dataclass

from provider_adapters.base import Action, Command
from relay.domain.state_machine import PaymentSnapshot, PaymentState

__all__ = ["WAITING_STATUSES", "IntentRow", "WriteBack", "payment_from_columns"]

# Statuses of an intent that waits for a relay of its provider to claim it, or to finish
# the claim (a dead one waits for an operator instead): with no live relay serving the
# provider, such an intent waits forever (outbox_relay_unserved_intents, `status`).
WAITING_STATUSES = ("blocked", "pending", "in_flight")


def payment_from_columns(
    currency: str,
    payment_state: str,
    authorized_minor: int,
    captured_minor: int,
    refunded_minor: int,
    payment_reference: str | None,
    disputed_minor: int = 0,
    dispute_status: str | None = None,
    awaiting_action: str | None = None,
) -> PaymentSnapshot:
    """The payment's snapshot from a row's payment columns, named as in queries.sql."""
    return PaymentSnapshot(
        state=PaymentState(payment_state),
        currency=currency,
        authorized_minor=authorized_minor,
        captured_minor=captured_minor,
        refunded_minor=refunded_minor,
        provider_reference=payment_reference,
        disputed_minor=disputed_minor,
        dispute_status=dispute_status,
        awaiting_action=awaiting_action,
    )


@dataclass(frozen=True, slots=True)
class IntentRow:
    """One payment intent with its payment, as read from the database.

    ``lease_token`` is the lease this relay holds on the intent (every intent
    :meth:`relay.core.store.Store.claim` returns has one); None for an intent read
    without a lease (the janitor's reservation of a dead intent, an operator's listing).
    """

    id: int
    payment_id: str
    action: Action
    provider: str
    amount_minor: int | None
    currency: str
    payment_method: str | None
    idempotency_key: str
    attempts: int
    lease_token: int | None
    traceparent: str | None
    payment: PaymentSnapshot
    # The currency's ISO 4217 exponent (outbox.currencies), for adapters whose provider
    # counts the currency differently; None where a caller does not know it.
    exponent: int | None = None

    @classmethod
    def from_columns(
        cls,
        id: int,
        payment_id: str,
        action: str,
        provider: str,
        amount_minor: int | None,
        currency: str,
        payment_method: str | None,
        idempotency_key: str,
        attempts: int,
        payment_state: str,
        authorized_minor: int,
        captured_minor: int,
        refunded_minor: int,
        payment_reference: str | None,
        lease_token: int | None = None,
        traceparent: str | None = None,
        exponent: int | None = None,
        disputed_minor: int = 0,
        dispute_status: str | None = None,
        awaiting_action: str | None = None,
    ) -> IntentRow:
        """The intent of one row, each parameter the column of its name in queries.sql
        (``relay.infra.rows.columns_row(IntentRow.from_columns)``, or ``**`` a dict row)."""
        return cls(
            id=id,
            payment_id=payment_id,
            action=Action(action),
            provider=provider,
            amount_minor=amount_minor,
            currency=currency,
            payment_method=payment_method,
            idempotency_key=idempotency_key,
            attempts=attempts,
            lease_token=lease_token,
            traceparent=traceparent,
            payment=payment_from_columns(
                currency,
                payment_state,
                authorized_minor,
                captured_minor,
                refunded_minor,
                payment_reference,
                disputed_minor,
                dispute_status,
                awaiting_action,
            ),
            exponent=exponent,
        )

    def command(self, amount_minor: int, *, traceparent: str | None = None) -> Command:
        """What the adapter is asked to do for this intent: its stored idempotency key (the
        same on every attempt), the payment's provider reference, and ``amount_minor`` as
        the state machine resolved it (a NULL capture or refund becomes what remains)."""
        return Command(
            intent_id=self.id,
            payment_id=self.payment_id,
            action=self.action,
            idempotency_key=self.idempotency_key,
            amount_minor=amount_minor,
            currency=self.currency,
            payment_method=self.payment_method,
            payment_reference=self.payment.provider_reference,
            attempt=self.attempts,
            traceparent=traceparent,
            exponent=self.exponent,
        )

    def require_lease(self) -> int:
        """The lease token to fence this intent's write-back or release with."""
        if self.lease_token is None:
            raise ValueError(
                f"intent {self.id} was read without a lease: claim or take it before "
                "writing its outcome"
            )
        return self.lease_token


@dataclass(frozen=True, slots=True)
class WriteBack:
    """One outcome to record. ``payment`` is the payment's new state, or None if unchanged."""

    intent_id: int
    lease_token: int
    payment_id: str
    # succeeded | failed | dead | pending (retry) | awaiting_confirmation (accepted, confirmed
    # later: ``amount_applied_minor`` is then the amount requested, kept on the payment as
    # awaiting_minor) | blocked (parked unsent behind an earlier awaiting intent)
    status: str
    retry_delay_seconds: float = 0.0
    provider_reference: str | None = None
    amount_applied_minor: int | None = None
    error_code: str | None = None
    error_message: str | None = None
    payment: PaymentSnapshot | None = None
    # The attempt provably sent nothing (a connect failure, sql/0064): counted in the intent's
    # unsent_attempts, which keeps a routed first intent able to fail over.
    unsent: bool = False
    # Metric labels only (never written): counted by the completer once the row commits.
    provider: str = ""
    action: str = ""
    outcome: str = ""  # why it ended: succeeded, declined, rejected, invalid, exhausted...
