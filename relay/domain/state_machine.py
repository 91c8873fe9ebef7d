"""Which command a payment's state allows, and what a success does to the payment.

Pure logic, no I/O. The relay calls :func:`decide` before any provider call: a command the
payment's state does not allow ends ``failed`` with a precise ``error_code`` and the
provider never sees it. After a provider success, :func:`apply_success` gives the
payment's next amounts and state; after a decline, :func:`apply_decline` does.

Payment states and who moves a payment out of them:

========================  ==========================================================
``new``                   an authorize or charge moves it on
``authorized``            a capture (full or partial) or a void
``captured``              a refund (partial or full)
``partially_refunded``    further refunds, up to the captured amount
``refunded``              terminal
``voided``                terminal
``failed``                a new authorize or charge (e.g. another card) may retry
========================  ==========================================================

An intent the provider accepted but has not confirmed (``awaiting_confirmation``) changes
no state and no confirmed amount: the confirmation, through the inbox, applies
:func:`apply_success` (or a decline) then. Meanwhile ``awaiting_action`` names it and no later
intent of the payment is decided at all: the relay parks it until the confirmation.

A dispute (chargeback, reported by the provider's notifications) is not a state of its
own but amounts beside it: ``disputed_minor`` is what the provider withdrew and has not
returned, ``dispute_status`` is ``open``, ``won`` or ``lost``. While a dispute is open a
refund is refused (``payment_disputed``: the provider refuses it too, and the dispute's
outcome decides the money); a lost dispute's amount is gone, so it is never refundable.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum

from provider_adapters.base import Action

__all__ = [
    "Dispatch",
    "PaymentSnapshot",
    "PaymentState",
    "Rejection",
    "apply_decline",
    "apply_success",
    "decide",
]


class PaymentState(StrEnum):
    NEW = "new"
    AUTHORIZED = "authorized"
    CAPTURED = "captured"
    PARTIALLY_REFUNDED = "partially_refunded"
    REFUNDED = "refunded"
    VOIDED = "voided"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class PaymentSnapshot:
    state: PaymentState
    currency: str
    authorized_minor: int = 0
    captured_minor: int = 0
    refunded_minor: int = 0
    provider_reference: str | None = None
    disputed_minor: int = 0
    dispute_status: str | None = None
    # The action the provider accepted and has not confirmed (sql/0038); None: nothing awaits.
    # While it is set no later intent of the payment is sent (docs/webhooks.md).
    awaiting_action: str | None = None

    @property
    def refundable_minor(self) -> int:
        return self.captured_minor - self.refunded_minor - self.disputed_minor


@dataclass(frozen=True, slots=True)
class Dispatch:
    """The command may go to the provider with this concrete amount."""

    amount_minor: int


@dataclass(frozen=True, slots=True)
class Rejection:
    """The command fails terminally without reaching the provider."""

    error_code: str
    message: str


_STARTABLE = frozenset({PaymentState.NEW, PaymentState.FAILED})
_REFUNDABLE = frozenset({PaymentState.CAPTURED, PaymentState.PARTIALLY_REFUNDED})


def _wrong_state(action: Action, payment: PaymentSnapshot, needs: str) -> Rejection:
    if payment.state is PaymentState.VOIDED:
        code = "payment_voided"
    elif payment.state is PaymentState.REFUNDED:
        code = "payment_fully_refunded"
    elif action in (Action.CAPTURE, Action.VOID):
        code = "payment_not_authorized"
    elif action is Action.REFUND:
        code = "payment_not_captured"
    else:
        code = "payment_already_started"
    return Rejection(code, f"cannot {action} a payment in state '{payment.state}'; {needs}")


def decide(
    action: Action, amount_minor: int | None, payment: PaymentSnapshot
) -> Dispatch | Rejection:
    """Check ``action`` against ``payment``; resolve a NULL amount to the full remainder.

    Guarantees: a :class:`Dispatch` amount is always > 0; a capture never exceeds the
    authorised amount; a refund never takes refunds above the captured amount; a void
    only releases an open authorisation.
    """
    if amount_minor is not None and amount_minor <= 0:
        return Rejection("amount_not_positive", f"amount_minor must be > 0, got {amount_minor}")
    match action:
        case Action.AUTHORIZE | Action.CHARGE:
            if payment.state not in _STARTABLE:
                return _wrong_state(action, payment, "it needs a new or failed payment")
            if amount_minor is None:
                return Rejection("amount_required", f"{action} needs amount_minor")
            return Dispatch(amount_minor)
        case Action.CAPTURE:
            if payment.state is not PaymentState.AUTHORIZED:
                return _wrong_state(action, payment, "it needs an authorized payment")
            amount = payment.authorized_minor if amount_minor is None else amount_minor
            if amount > payment.authorized_minor:
                return Rejection(
                    "capture_exceeds_authorized",
                    f"capture of {amount} exceeds the authorized {payment.authorized_minor}",
                )
            return Dispatch(amount)
        case Action.VOID:
            if payment.state is not PaymentState.AUTHORIZED:
                return _wrong_state(action, payment, "only an open authorization can be voided")
            if amount_minor is not None and amount_minor != payment.authorized_minor:
                return Rejection(
                    "void_amount_mismatch",
                    f"a void releases the whole hold of {payment.authorized_minor}, "
                    f"not {amount_minor}; leave amount_minor NULL",
                )
            return Dispatch(payment.authorized_minor)
        case Action.REFUND:
            if payment.state not in _REFUNDABLE:
                return _wrong_state(action, payment, "it needs a captured payment")
            if payment.dispute_status == "open":
                return Rejection(
                    "payment_disputed",
                    f"cannot refund a payment under an open dispute "
                    f"({payment.disputed_minor} withdrawn by the provider); "
                    "answer the dispute at the provider and refund after it closes",
                )
            remaining = payment.refundable_minor
            amount = remaining if amount_minor is None else amount_minor
            if amount > remaining:
                return Rejection(
                    "refund_exceeds_captured",
                    f"refund of {amount} exceeds the {remaining} still refundable "
                    f"(captured {payment.captured_minor}, refunded {payment.refunded_minor}"
                    + (
                        f", lost to a dispute {payment.disputed_minor}"
                        if payment.disputed_minor
                        else ""
                    )
                    + ")",
                )
            return Dispatch(amount)
    raise AssertionError(f"unhandled action {action!r}")  # pragma: no cover


def apply_success(
    action: Action, amount_minor: int, payment: PaymentSnapshot, payment_reference: str
) -> PaymentSnapshot:
    """The payment after the provider applied ``action`` for ``amount_minor``."""
    match action:
        case Action.AUTHORIZE:
            return replace(
                payment,
                state=PaymentState.AUTHORIZED,
                authorized_minor=amount_minor,
                captured_minor=0,
                refunded_minor=0,
                provider_reference=payment_reference,
            )
        case Action.CHARGE:
            return replace(
                payment,
                state=PaymentState.CAPTURED,
                authorized_minor=amount_minor,
                captured_minor=amount_minor,
                refunded_minor=0,
                provider_reference=payment_reference,
            )
        case Action.CAPTURE:
            return replace(payment, state=PaymentState.CAPTURED, captured_minor=amount_minor)
        case Action.VOID:
            return replace(payment, state=PaymentState.VOIDED)
        case Action.REFUND:
            refunded = payment.refunded_minor + amount_minor
            state = (
                PaymentState.REFUNDED
                if refunded >= payment.captured_minor
                else PaymentState.PARTIALLY_REFUNDED
            )
            return replace(payment, state=state, refunded_minor=refunded)
    raise AssertionError(f"unhandled action {action!r}")  # pragma: no cover


def apply_decline(action: Action, payment: PaymentSnapshot) -> PaymentSnapshot:
    """A decline of authorize or charge fails the payment; other declines change nothing."""
    if action in (Action.AUTHORIZE, Action.CHARGE):
        return replace(payment, state=PaymentState.FAILED)
    return payment
