"""Provider outcome -> the row the relay writes (pure)."""

from __future__ import annotations

import dataclasses

import pytest

from provider_adapters.base import Action, Ambiguous, Declined, Invalid, Retryable, Succeeded
from relay.domain.intents import IntentRow
from relay.domain.outcome_mapping import from_outcome, from_rejection
from relay.domain.retry_policy import RetryPolicy
from relay.domain.state_machine import PaymentSnapshot, PaymentState, Rejection

POLICY = RetryPolicy(base_seconds=1.0, cap_seconds=60.0, max_attempts=3)


def intent(action: Action = Action.AUTHORIZE, attempts: int = 1) -> IntentRow:
    return IntentRow(
        id=7,
        payment_id="p",
        action=action,
        provider="stripe",
        amount_minor=1000,
        currency="EUR",
        payment_method="pm_card_visa",
        idempotency_key="k",
        attempts=attempts,
        lease_token=99,
        traceparent=None,
        payment=PaymentSnapshot(PaymentState.NEW, "EUR"),
    )


def test_success_moves_payment_and_records_amount() -> None:
    wb = from_outcome(intent(), 1000, Succeeded("pi_1", "pi_1", 1000, "eur"), POLICY, lambda: 0.5)
    assert (wb.status, wb.amount_applied_minor, wb.provider_reference) == (
        "succeeded",
        1000,
        "pi_1",
    )
    assert wb.payment is not None and wb.payment.state is PaymentState.AUTHORIZED
    assert wb.lease_token == 99


def test_success_with_another_amount_or_currency_is_not_success() -> None:
    for reply in (Succeeded("pi_1", "pi_1", 999, "EUR"), Succeeded("pi_1", "pi_1", 1000, "USD")):
        wb = from_outcome(intent(), 1000, reply, POLICY, lambda: 0.5)
        assert (wb.status, wb.error_code, wb.payment) == ("dead", "provider_amount_mismatch", None)


def test_decline_fails_intent_and_payment() -> None:
    wb = from_outcome(intent(), 1000, Declined("card_declined", "no"), POLICY, lambda: 0.5)
    assert (wb.status, wb.error_code) == ("failed", "card_declined")
    assert wb.payment is not None and wb.payment.state is PaymentState.FAILED


def test_invalid_is_dead_at_once() -> None:
    wb = from_outcome(
        intent(attempts=1), 1000, Invalid("invalid_request", "bad"), POLICY, lambda: 0.5
    )
    assert (wb.status, wb.error_code, wb.error_message) == ("dead", "invalid_request", "bad")


def test_retryable_and_ambiguous_back_off_then_die_at_the_cap() -> None:
    for outcome in (Retryable("rate_limited", "429", 30.0), Ambiguous("provider_timeout", "t/o")):
        first = from_outcome(intent(attempts=1), 1000, outcome, POLICY, lambda: 0.5)
        assert first.status == "pending" and first.payment is None
        if isinstance(outcome, Retryable):
            assert first.retry_delay_seconds == 30.0  # Retry-After beats the jitter
        else:
            assert first.retry_delay_seconds == 0.5
        last = from_outcome(intent(attempts=3), 1000, outcome, POLICY, lambda: 0.5)
        assert last.status == "dead" and "after 3 attempts" in (last.error_message or "")


def test_rejection_fails_without_payment_change() -> None:
    wb = from_rejection(intent(Action.CAPTURE), Rejection("payment_not_authorized", "nope"))
    assert (wb.status, wb.error_code, wb.payment) == ("failed", "payment_not_authorized", None)


def test_long_messages_are_clipped() -> None:
    wb = from_outcome(intent(), 1000, Invalid("x", "m" * 5000), POLICY, lambda: 0.5)
    assert wb.error_message is not None and len(wb.error_message) == 500


def test_an_intent_read_without_a_lease_is_never_written_back() -> None:
    unleased = dataclasses.replace(intent(), lease_token=None)
    with pytest.raises(ValueError, match="without a lease"):
        from_outcome(unleased, 1000, Succeeded("pi_1", "pi_1", 1000, "EUR"), POLICY, lambda: 0.5)
    with pytest.raises(ValueError, match="without a lease"):
        from_rejection(unleased, Rejection("nothing_to_capture", "no authorization"))


def test_accepted_for_later_confirmation_awaits_unbooked_even_at_the_attempt_cap() -> None:
    accepted = Ambiguous("awaiting_confirmation", "received", "8515131751004933")
    for attempts in (1, 3):  # the cap does not apply: the call is never sent again
        wb = from_outcome(intent(Action.CAPTURE, attempts), 700, accepted, POLICY, lambda: 0.5)
        assert (wb.status, wb.provider_reference, wb.amount_applied_minor) == (
            "awaiting_confirmation",
            "8515131751004933",
            700,  # the amount requested (the payment's awaiting_minor), not applied
        )
        assert wb.payment is None, "no state or confirmed amount moves before confirmation"
    # Without a reference nothing could match the confirmation: an ordinary ambiguous retry.
    unnamed = from_outcome(
        intent(Action.CAPTURE), 700, Ambiguous("awaiting_confirmation", "received"), POLICY,
        lambda: 0.5,
    )  # fmt: skip
    assert unnamed.status == "pending"


@pytest.mark.parametrize(
    ("outcome", "unsent"),
    [
        (Retryable("provider_unreachable", "connection refused"), True),
        (Retryable("connection_error", "connect timeout"), True),
        (Retryable("rate_limited", "429", retry_after_seconds=1.0), False),
        (Ambiguous("timeout", "read timed out"), False),
    ],
)
@pytest.mark.parametrize(("attempts", "status"), [(1, "pending"), (3, "dead")])
def test_an_attempt_that_never_connected_is_written_back_as_unsent(
    outcome: Retryable | Ambiguous, unsent: bool, attempts: int, status: str
) -> None:
    # Whether retried or given up, the write-back says whether the request left the relay:
    # sql/0064 lets only a payment whose attempts all went unsent fail over.
    wb = from_outcome(intent(attempts=attempts), 1000, outcome, POLICY, lambda: 0.5)
    assert (wb.status, wb.unsent) == (status, unsent)
