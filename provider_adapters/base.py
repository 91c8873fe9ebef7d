"""The one small contract between the relay and a payment provider.

An adapter turns a :class:`Command` into exactly one :data:`Outcome`. Provider
exceptions never cross this boundary: every failure is mapped onto one of the five
outcome classes, and the relay decides what to do with it (see DESIGN.md's outcome
taxonomy). Adapters hold no database state and never open a transaction.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "AWAITING_CONFIRMATION",
    "UNSENT_CODES",
    "Action",
    "Ambiguous",
    "AuthorisationEnded",
    "BalanceTransaction",
    "BatchNotificationReader",
    "CaptureReported",
    "Command",
    "ConfirmationReported",
    "Declined",
    "DisputeClosed",
    "DisputeOpened",
    "Fact",
    "Invalid",
    "Notification",
    "NotificationReader",
    "NotificationRejected",
    "Outcome",
    "PaymentSettled",
    "ProviderAdapter",
    "RefundsReported",
    "ReportedRefund",
    "Retryable",
    "SettlementReports",
    "SettlementUnavailable",
    "Succeeded",
    "Unhandled",
    "UntestedApiVersion",
]


class Action(StrEnum):
    AUTHORIZE = "authorize"
    CAPTURE = "capture"
    CHARGE = "charge"
    VOID = "void"
    REFUND = "refund"


@dataclass(frozen=True, slots=True)
class Command:
    """What the relay asks a provider to do, with every amount already resolved.

    ``amount_minor`` is always concrete: for a capture or refund whose intent said NULL
    ("the full remaining amount") the state machine has computed it; for a void it is the
    held amount being released (used to verify the reply, not sent).
    ``payment_reference`` is the provider's id of the payment object (Stripe: ``pi_...``),
    known once the payment was authorised or charged; ``None`` for authorize and charge.
    The ``idempotency_key`` is the same on every attempt of one intent.
    ``exponent`` is the currency's ISO 4217 exponent from ``outbox.currencies``; an adapter
    whose provider counts the currency differently (provider_adapters/currency_units.py)
    converts with it, and refuses the command when it is needed and missing.
    """

    intent_id: int
    payment_id: str
    action: Action
    idempotency_key: str
    amount_minor: int
    currency: str
    payment_method: str | None = None
    payment_reference: str | None = None
    attempt: int = 1
    traceparent: str | None = None
    exponent: int | None = None


@dataclass(frozen=True, slots=True)
class Succeeded:
    """The provider applied the effect (or had applied it: a replay counts the same).

    ``provider_reference`` names the object this intent created or changed
    (``pi_...`` for authorize/charge/capture/void, ``re_...`` for a refund);
    ``payment_reference`` is always the payment object's id (``pi_...``).
    ``amount_minor`` and ``currency`` are what the provider's reply said, already checked
    against the command.
    """

    provider_reference: str
    payment_reference: str
    amount_minor: int
    currency: str
    replayed: bool = False


@dataclass(frozen=True, slots=True)
class Declined:
    """A terminal business refusal (card_declined, insufficient_funds...). No effect."""

    code: str
    message: str


# The codes of a Retryable outcome whose request provably never left the relay: no
# connection could be made (refused, DNS, TLS handshake, connect timeout), so no byte of it
# reached the provider (stripe_errors.classify_connection_error, AdyenAdapter's connect
# failure). Only these let a routed payment's first intent fail over (sql/0064); a 429 or a
# 503 was an answer from the provider, which may keep state for the key.
UNSENT_CODES = frozenset({"provider_unreachable", "connection_error"})


@dataclass(frozen=True, slots=True)
class Retryable:
    """Nothing happened at the provider; try again later with the same key."""

    code: str
    message: str
    retry_after_seconds: float | None = None

    @property
    def unsent(self) -> bool:
        """The request never reached the provider: connecting failed (:data:`UNSENT_CODES`)."""
        return self.code in UNSENT_CODES


# The code of an Ambiguous outcome for a request the provider accepted and will confirm
# later (Adyen's "received"): the provider answered, so it is healthy (the lane's breaker
# counts it as a success), but the effect is not final.
AWAITING_CONFIRMATION = "awaiting_confirmation"


@dataclass(frozen=True, slots=True)
class Ambiguous:
    """The effect may or may not have happened; settle it with :meth:`lookup`.

    ``provider_reference``, when set, names what the provider holds for this attempt
    (Adyen: the modification's pspReference of a request it answered ``received``, whose
    outcome comes later by webhook), so that the confirmation can be matched to it.
    """

    code: str
    message: str
    provider_reference: str | None = None

    @property
    def awaits_confirmation(self) -> bool:
        """The provider accepted the request and confirms it later (Adyen's ``received``,
        a Stripe refund ``pending``): a healthy answer, settled by its notification, not
        by a lookup."""
        return self.code == AWAITING_CONFIRMATION


@dataclass(frozen=True, slots=True)
class Invalid:
    """Our bug or bad data (400, 401, 403, idempotency misuse). Retrying cannot help."""

    code: str
    message: str


Outcome = Succeeded | Declined | Retryable | Ambiguous | Invalid


class UntestedApiVersion(ValueError):
    """A provider API version the adapter was not tested against, without the override."""


@runtime_checkable
class ProviderAdapter(Protocol):
    """One provider, one adapter instance per lane; safe for concurrent use."""

    name: str

    async def execute(self, command: Command) -> Outcome:
        """Send the command once, with ``command.idempotency_key``; never raise."""
        ...

    async def lookup(self, command: Command) -> Outcome:
        """Find out what an earlier attempt of ``command`` did; never raise.

        Returns :class:`Succeeded` when the provider shows the effect, :class:`Declined`
        when it shows a terminal refusal, :class:`Retryable` (code ``not_found``) when it
        shows no trace of the attempt, and :class:`Ambiguous` when the lookup itself failed.
        """
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...


@dataclass(frozen=True, slots=True)
class BalanceTransaction:
    """One movement of money in the provider's books (Stripe: a balance transaction).

    ``amount_minor`` is signed (a refund is negative), ``fee_minor`` what the provider
    kept, ``net_minor`` the rest, all in ISO 4217 minor units (the adapter converts from
    the provider's own units); ``currency`` is upper case. ``source_id`` is the object
    the relay knows the movement by: the payment (``pi_...``) for a charge or capture, the
    refund (``re_...``) for a refund; ``source_status`` is that object's status there.
    """

    id: str
    type: str
    amount_minor: int
    fee_minor: int
    net_minor: int
    currency: str
    source_id: str | None
    source_status: str | None
    created: datetime
    # Settled in another currency than the source's: the rate the provider used (amount
    # of the source's currency x exchange_rate = ``amount_minor``), exact; None: no
    # conversion.
    exchange_rate: Decimal | None = None


@runtime_checkable
class SettlementReports(Protocol):
    """Optional: an adapter that can list the provider's settlement data (reconciliation)."""

    def balance_transactions(
        self, since: datetime, until: datetime, *, exponents: Mapping[str, int] | None = None
    ) -> AsyncIterator[BalanceTransaction]:
        """Every balance transaction created in [since, until] (whole seconds, inclusive),
        page by page, amounts converted to ISO minor units with ``exponents`` (currency
        code -> ISO 4217 exponent, from outbox.currencies); raises
        :class:`SettlementUnavailable` when the provider cannot be read or converted."""
        ...


class SettlementUnavailable(Exception):
    """The provider's settlement data could not be read (network, auth, a bad reply)."""

    code = "settlement_unavailable"


# -- notifications (webhooks) -----------------------------------------------------------------


class NotificationRejected(Exception):
    """A notification that is not trusted. ``reason`` is a stable label (the receiver's
    metric and its 4xx body): missing_signature, bad_signature, stale_timestamp,
    invalid_utf8, malformed_json, too_deep, not_an_event."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


@dataclass(frozen=True, slots=True)
class Notification:
    """A verified notification: its provider's event identity, type and time, and the
    parsed body (a JSON object)."""

    event_id: str
    event_type: str
    created: datetime | None
    body: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class PaymentSettled:
    """The provider says how one of our calls ended (Stripe: payment_intent.succeeded or
    .payment_failed). ``idempotency_key`` is the key our call carried, when the object
    names it; the relay settles that intent through :meth:`NotificationReader.settle`."""

    payment_reference: str
    idempotency_key: str | None
    succeeded: bool


@dataclass(frozen=True, slots=True)
class ReportedRefund:
    refund_id: str
    amount: int  # provider units
    idempotency_key: str | None  # ours when the refund carries our key
    # succeeded or pending (money moved or moving); failed or canceled (listed so that our
    # refund awaiting its confirmation learns it failed; no money moved)
    status: str = "succeeded"


@dataclass(frozen=True, slots=True)
class RefundsReported:
    """The provider's totals of a payment after a refund (ours or not); provider units."""

    payment_reference: str
    currency: str
    captured_total: int
    refunded_total: int
    refunds: tuple[ReportedRefund, ...]


@dataclass(frozen=True, slots=True)
class CaptureReported:
    """The provider captured the payment's charge (ours, or by another system); its
    captured total in provider units."""

    payment_reference: str
    charge_id: str
    currency: str
    captured_total: int


@dataclass(frozen=True, slots=True)
class DisputeOpened:
    """A card holder disputed a payment: the provider withdraws ``amount``, except for an
    inquiry (``inquiry``: Stripe's ``warning_*`` statuses), which withdraws nothing."""

    payment_reference: str
    dispute_id: str
    amount: int  # provider units
    currency: str
    reason: str
    inquiry: bool = False


@dataclass(frozen=True, slots=True)
class DisputeClosed:
    """A dispute's outcome: ``won`` returns the withdrawn funds, ``lost`` keeps them for
    good; ``inquiry`` closes an inquiry that withdrew nothing."""

    payment_reference: str
    dispute_id: str
    amount: int  # provider units
    currency: str
    reason: str
    outcome: str  # won | lost | inquiry


@dataclass(frozen=True, slots=True)
class ConfirmationReported:
    """The provider confirms, or fails, a request it accepted earlier and answered "not final"
    (Adyen's AUTHORISATION, CAPTURE, CAPTURE_FAILED, CANCELLATION, REFUND, REFUND_FAILED).

    ``reference`` names the request (the modification's pspReference; for an authorisation
    the payment's), as the adapter's :class:`Ambiguous` ``provider_reference`` named it;
    ``payment_reference`` the payment. ``succeeded`` False is a failure; ``withdrawn`` marks
    a failure that may follow a success already reported (CAPTURE_FAILED, REFUND_FAILED):
    what the success booked is then reversed. ``amount`` is in provider units."""

    reference: str
    payment_reference: str
    action: Action
    succeeded: bool
    withdrawn: bool
    amount: int
    currency: str
    reason: str
    event: str
    # Our payment_id as the request's reference named it (Adyen: merchantReference), to
    # find the payment when the provider's reference is not recorded yet.
    merchant_reference: str | None = None


@dataclass(frozen=True, slots=True)
class AuthorisationEnded:
    """The provider released an authorisation nobody asked it to release (Adyen's
    TECHNICAL_CANCEL, EXPIRE): the hold is gone, no money moved."""

    payment_reference: str
    event: str
    reason: str


@dataclass(frozen=True, slots=True)
class Unhandled:
    why: str


Fact = (
    PaymentSettled
    | RefundsReported
    | CaptureReported
    | DisputeOpened
    | DisputeClosed
    | ConfirmationReported
    | AuthorisationEnded
    | Unhandled
)


@runtime_checkable
class NotificationReader(Protocol):
    """One provider's notifications: verify a delivery, read what it says. Pure apart
    from the clock (the signature's tolerance); never touches the network."""

    name: str

    def verify(self, body: bytes, headers: Mapping[str, str]) -> Notification:
        """The verified notification, or :class:`NotificationRejected` with its reason."""
        ...

    def read(self, body: Mapping[str, Any]) -> Fact:
        """What a stored (verified) body says, in the relay's words."""
        ...

    def settle(self, command: Command, body: Mapping[str, Any]) -> Outcome:
        """The outcome of ``command`` as this body shows it, exactly as a lookup would
        map the same object (Succeeded, Declined, or Retryable ``not_found``)."""
        ...

    def minor_units(self, amount: int, currency: str, exponent: int | None) -> int:
        """The provider's units of ``currency`` as ISO 4217 minor units."""
        ...


@runtime_checkable
class BatchNotificationReader(Protocol):
    """A provider whose one delivery carries several notifications (Adyen's
    ``notificationItems``): every item is verified, each is stored as its own inbox row, and
    the delivery is acknowledged with :attr:`acknowledgement`."""

    acknowledgement: str

    def verify_items(self, body: bytes, headers: Mapping[str, str]) -> Sequence[Notification]:
        """Every notification of the delivery, each verified; NotificationRejected (nothing
        stored) when any one fails."""
        ...
