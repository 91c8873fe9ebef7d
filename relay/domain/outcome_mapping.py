"""From a provider outcome (or a state-machine rejection) to the row the relay writes.

Pure logic, no I/O. Guarantees, each tested:

* succeeded -> intent ``succeeded``, payment moved by :func:`apply_success` with the
  amount the provider confirmed; a confirmed amount or currency that differs from the
  command is never recorded as success (the intent goes ``dead`` for an operator);
* declined -> intent ``failed``; an authorize/charge decline fails the payment;
* retryable or ambiguous -> intent ``pending`` again after a full-jitter backoff (same
  idempotency key), or ``dead`` once ``max_attempts`` attempts were made;
* invalid -> intent ``dead`` at once, with the provider's reason;
* rejection -> intent ``failed`` with the state machine's error code; no provider call.
"""

from __future__ import annotations

from collections.abc import Callable

from provider_adapters.base import (
    AWAITING_CONFIRMATION,
    Ambiguous,
    Declined,
    Invalid,
    Outcome,
    Retryable,
    Succeeded,
)
from relay.domain.intents import IntentRow, WriteBack
from relay.domain.retry_policy import RetryPolicy
from relay.domain.state_machine import Rejection, apply_decline, apply_success

__all__ = ["from_outcome", "from_rejection"]

_MAX_MESSAGE = 500


def _clip(message: str) -> str:
    return message if len(message) <= _MAX_MESSAGE else message[: _MAX_MESSAGE - 1] + "…"


def from_rejection(intent: IntentRow, rejection: Rejection) -> WriteBack:
    return WriteBack(
        intent_id=intent.id,
        lease_token=intent.require_lease(),
        payment_id=intent.payment_id,
        status="failed",
        error_code=rejection.error_code,
        error_message=_clip(rejection.message),
    )


def from_outcome(
    intent: IntentRow,
    amount_minor: int,
    outcome: Outcome,
    policy: RetryPolicy,
    rng: Callable[[], float],
) -> WriteBack:
    base = {
        "intent_id": intent.id,
        "lease_token": intent.require_lease(),
        "payment_id": intent.payment_id,
    }
    match outcome:
        case Succeeded():
            if outcome.amount_minor != amount_minor or (
                outcome.currency.upper() != intent.currency.upper()
            ):
                return WriteBack(
                    **base,  # type: ignore[arg-type]
                    status="dead",
                    provider_reference=outcome.provider_reference,
                    error_code="provider_amount_mismatch",
                    error_message=(
                        f"provider confirmed {outcome.amount_minor} {outcome.currency.upper()} "
                        f"for a command of {amount_minor} {intent.currency}; not recorded as "
                        "success, check the payment at the provider"
                    ),
                )
            payment = apply_success(
                intent.action, amount_minor, intent.payment, outcome.payment_reference
            )
            return WriteBack(
                **base,  # type: ignore[arg-type]
                status="succeeded",
                provider_reference=outcome.provider_reference,
                amount_applied_minor=amount_minor,
                payment=payment,
            )
        case Declined():
            after = apply_decline(intent.action, intent.payment)
            return WriteBack(
                **base,  # type: ignore[arg-type]
                status="failed",
                error_code=outcome.code,
                error_message=_clip(outcome.message),
                payment=after if after != intent.payment else None,
            )
        case Invalid():
            return WriteBack(
                **base,  # type: ignore[arg-type]
                status="dead",
                error_code=outcome.code,
                error_message=_clip(outcome.message),
            )
        case Ambiguous(provider_reference=reference) if (
            outcome.awaits_confirmation and reference is not None
        ):
            # Accepted, confirmed later (sql/0038): no retry, no lease, nothing booked; the
            # confirmation finishes it through the inbox. Not an attempt towards the cap.
            return WriteBack(
                **base,  # type: ignore[arg-type]
                status="awaiting_confirmation",
                provider_reference=reference,
                amount_applied_minor=amount_minor,
                error_code=AWAITING_CONFIRMATION,
                error_message=_clip(outcome.message),
            )
        case Retryable() | Ambiguous():
            retry_after = outcome.retry_after_seconds if isinstance(outcome, Retryable) else None
            # Nothing reached the provider: recorded, so that a routed payment's first
            # intent whose attempts all went unsent may still fail over (sql/0064).
            unsent = isinstance(outcome, Retryable) and outcome.unsent
            if policy.exhausted(intent.attempts):
                return WriteBack(
                    **base,  # type: ignore[arg-type]
                    status="dead",
                    error_code=outcome.code,
                    error_message=_clip(
                        f"gave up after {intent.attempts} attempts; last: {outcome.message}"
                    ),
                    unsent=unsent,
                )
            return WriteBack(
                **base,  # type: ignore[arg-type]
                status="pending",
                retry_delay_seconds=policy.backoff_seconds(intent.attempts, rng, retry_after),
                error_code=outcome.code,
                error_message=_clip(outcome.message),
                unsent=unsent,
            )
    raise AssertionError(f"unknown outcome {outcome!r}")  # pragma: no cover
