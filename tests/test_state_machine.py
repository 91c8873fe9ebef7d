"""Every action in every payment state, plus hypothesis sequences."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from provider_adapters.base import Action
from relay.domain.state_machine import (
    Dispatch,
    PaymentSnapshot,
    PaymentState,
    Rejection,
    apply_decline,
    apply_success,
    decide,
)

S = PaymentState


def snap(
    state: PaymentState, authorized: int = 0, captured: int = 0, refunded: int = 0
) -> PaymentSnapshot:
    return PaymentSnapshot(state, "EUR", authorized, captured, refunded, "pi_1")


STATES = {
    S.NEW: snap(S.NEW),
    S.AUTHORIZED: snap(S.AUTHORIZED, 1000),
    S.CAPTURED: snap(S.CAPTURED, 1000, 800),
    S.PARTIALLY_REFUNDED: snap(S.PARTIALLY_REFUNDED, 1000, 800, 300),
    S.REFUNDED: snap(S.REFUNDED, 1000, 800, 800),
    S.VOIDED: snap(S.VOIDED, 1000),
    S.FAILED: snap(S.FAILED),
}

# (action, state) -> expected: an int amount dispatched, or the rejection code.
EXPECTED: dict[tuple[Action, PaymentState], int | str] = {
    (Action.AUTHORIZE, S.NEW): 500,
    (Action.AUTHORIZE, S.FAILED): 500,
    (Action.AUTHORIZE, S.AUTHORIZED): "payment_already_started",
    (Action.AUTHORIZE, S.CAPTURED): "payment_already_started",
    (Action.AUTHORIZE, S.PARTIALLY_REFUNDED): "payment_already_started",
    (Action.AUTHORIZE, S.REFUNDED): "payment_fully_refunded",
    (Action.AUTHORIZE, S.VOIDED): "payment_voided",
    (Action.CHARGE, S.NEW): 500,
    (Action.CHARGE, S.FAILED): 500,
    (Action.CHARGE, S.AUTHORIZED): "payment_already_started",
    (Action.CHARGE, S.CAPTURED): "payment_already_started",
    (Action.CHARGE, S.PARTIALLY_REFUNDED): "payment_already_started",
    (Action.CHARGE, S.REFUNDED): "payment_fully_refunded",
    (Action.CHARGE, S.VOIDED): "payment_voided",
    (Action.CAPTURE, S.NEW): "payment_not_authorized",
    (Action.CAPTURE, S.FAILED): "payment_not_authorized",
    (Action.CAPTURE, S.AUTHORIZED): 500,
    (Action.CAPTURE, S.CAPTURED): "payment_not_authorized",
    (Action.CAPTURE, S.PARTIALLY_REFUNDED): "payment_not_authorized",
    (Action.CAPTURE, S.REFUNDED): "payment_fully_refunded",
    (Action.CAPTURE, S.VOIDED): "payment_voided",
    (Action.VOID, S.NEW): "payment_not_authorized",
    (Action.VOID, S.FAILED): "payment_not_authorized",
    (Action.VOID, S.AUTHORIZED): "void_amount_mismatch",
    (Action.VOID, S.CAPTURED): "payment_not_authorized",
    (Action.VOID, S.PARTIALLY_REFUNDED): "payment_not_authorized",
    (Action.VOID, S.REFUNDED): "payment_fully_refunded",
    (Action.VOID, S.VOIDED): "payment_voided",
    (Action.REFUND, S.NEW): "payment_not_captured",
    (Action.REFUND, S.FAILED): "payment_not_captured",
    (Action.REFUND, S.AUTHORIZED): "payment_not_captured",
    (Action.REFUND, S.CAPTURED): 500,
    (Action.REFUND, S.PARTIALLY_REFUNDED): 500,
    (Action.REFUND, S.REFUNDED): "payment_fully_refunded",
    (Action.REFUND, S.VOIDED): "payment_voided",
}


def test_table_covers_every_action_in_every_state() -> None:
    assert set(EXPECTED) == {(a, s) for a in Action for s in PaymentState}


@pytest.mark.parametrize(("action", "state"), sorted(EXPECTED, key=str))
def test_every_action_in_every_state(action: Action, state: PaymentState) -> None:
    result = decide(action, 500, STATES[state])
    expected = EXPECTED[(action, state)]
    if isinstance(expected, int):
        assert result == Dispatch(expected)
    else:
        assert isinstance(result, Rejection)
        assert result.error_code == expected
        assert str(state) in result.message or expected == "void_amount_mismatch"


def test_null_amounts_resolve_to_the_full_remainder() -> None:
    assert decide(Action.CAPTURE, None, STATES[S.AUTHORIZED]) == Dispatch(1000)
    assert decide(Action.VOID, None, STATES[S.AUTHORIZED]) == Dispatch(1000)
    assert decide(Action.REFUND, None, STATES[S.CAPTURED]) == Dispatch(800)
    assert decide(Action.REFUND, None, STATES[S.PARTIALLY_REFUNDED]) == Dispatch(500)


def test_limits_are_enforced() -> None:
    over_capture = decide(Action.CAPTURE, 1001, STATES[S.AUTHORIZED])
    assert (
        isinstance(over_capture, Rejection)
        and over_capture.error_code == "capture_exceeds_authorized"
    )
    over_refund = decide(Action.REFUND, 501, STATES[S.PARTIALLY_REFUNDED])
    assert (
        isinstance(over_refund, Rejection) and over_refund.error_code == "refund_exceeds_captured"
    )
    assert decide(Action.REFUND, 500, STATES[S.PARTIALLY_REFUNDED]) == Dispatch(500)
    no_amount = decide(Action.AUTHORIZE, None, STATES[S.NEW])
    assert isinstance(no_amount, Rejection) and no_amount.error_code == "amount_required"
    negative = decide(Action.CAPTURE, 0, STATES[S.AUTHORIZED])
    assert isinstance(negative, Rejection) and negative.error_code == "amount_not_positive"


def test_successes_move_the_payment() -> None:
    authorized = apply_success(Action.AUTHORIZE, 1000, STATES[S.NEW], "pi_9")
    assert (authorized.state, authorized.authorized_minor, authorized.provider_reference) == (
        S.AUTHORIZED,
        1000,
        "pi_9",
    )
    captured = apply_success(Action.CAPTURE, 700, authorized, "pi_9")
    assert (captured.state, captured.captured_minor) == (S.CAPTURED, 700)
    partly = apply_success(Action.REFUND, 200, captured, "pi_9")
    assert (partly.state, partly.refunded_minor) == (S.PARTIALLY_REFUNDED, 200)
    fully = apply_success(Action.REFUND, 500, partly, "pi_9")
    assert (fully.state, fully.refunded_minor) == (S.REFUNDED, 700)
    charged = apply_success(Action.CHARGE, 300, STATES[S.FAILED], "pi_2")
    assert (charged.state, charged.authorized_minor, charged.captured_minor) == (
        S.CAPTURED,
        300,
        300,
    )
    voided = apply_success(Action.VOID, 1000, authorized, "pi_9")
    assert voided.state is S.VOIDED


def test_declines_fail_only_authorize_and_charge() -> None:
    assert apply_decline(Action.AUTHORIZE, STATES[S.NEW]).state is S.FAILED
    assert apply_decline(Action.CHARGE, STATES[S.NEW]).state is S.FAILED
    assert apply_decline(Action.CAPTURE, STATES[S.AUTHORIZED]) == STATES[S.AUTHORIZED]
    assert apply_decline(Action.REFUND, STATES[S.CAPTURED]) == STATES[S.CAPTURED]


commands = st.lists(
    st.tuples(
        st.sampled_from(list(Action)),
        st.one_of(st.none(), st.integers(min_value=-5, max_value=5_000)),
        st.booleans(),  # the provider declines
    ),
    max_size=30,
)


@settings(max_examples=400)
@given(commands)
def test_sequences_keep_money_invariants(sequence: list[tuple[Action, int | None, bool]]) -> None:
    payment = PaymentSnapshot(S.NEW, "EUR")
    for action, amount, declined in sequence:
        decision = decide(action, amount, payment)
        if isinstance(decision, Rejection):
            continue
        assert decision.amount_minor > 0
        if declined:
            payment = apply_decline(action, payment)
        else:
            payment = apply_success(action, decision.amount_minor, payment, "pi_x")
        assert 0 <= payment.refunded_minor <= payment.captured_minor <= payment.authorized_minor
        if payment.state is S.REFUNDED:
            assert payment.refunded_minor == payment.captured_minor
        if payment.state is S.PARTIALLY_REFUNDED:
            assert 0 < payment.refunded_minor < payment.captured_minor
        if payment.state in (S.VOIDED, S.REFUNDED):
            for later in Action:
                assert isinstance(decide(later, None, payment), Rejection)


def test_an_open_dispute_refuses_a_refund_and_a_lost_one_is_not_refundable() -> None:
    captured = PaymentSnapshot(
        state=PaymentState.CAPTURED, currency="EUR", authorized_minor=3000, captured_minor=3000
    )
    open_dispute = replace(captured, disputed_minor=1200, dispute_status="open")
    refused = decide(Action.REFUND, 100, open_dispute)
    assert isinstance(refused, Rejection) and refused.error_code == "payment_disputed"
    lost = replace(captured, disputed_minor=1200, dispute_status="lost")
    assert decide(Action.REFUND, None, lost) == Dispatch(1800)
    too_much = decide(Action.REFUND, 1801, lost)
    assert isinstance(too_much, Rejection) and too_much.error_code == "refund_exceeds_captured"
    assert "lost to a dispute 1200" in too_much.message
    won = replace(captured, disputed_minor=0, dispute_status="won")
    assert decide(Action.REFUND, None, won) == Dispatch(3000)
