"""Adyen's notification items read into the relay's facts (pure), and the event id that
keeps a Luhn-valid pspReference out of the card rule."""

from __future__ import annotations

import re
from typing import Any

import pytest

from provider_adapters.adyen_notifications import AdyenNotifications, event_id
from provider_adapters.base import (
    Action,
    AuthorisationEnded,
    ConfirmationReported,
    DisputeClosed,
    DisputeOpened,
    Unhandled,
)
from provider_adapters.fake.adyen import luhn_psp, luhn_valid

READER = AdyenNotifications("adyen")
PAYMENT = "8813012345678901"
MODIFICATION = "8515131751004933"


def body(code: str, success: str = "true", **fields: Any) -> dict[str, Any]:
    item = {
        "pspReference": MODIFICATION,
        "originalReference": PAYMENT,
        "merchantReference": "order-1",
        "amount": {"value": 1000, "currency": "eur"},
        "eventCode": code,
        "success": success,
        "reason": "",
        **fields,
    }
    return {"live": "false", "notificationItems": [{"NotificationRequestItem": item}]}


@pytest.mark.parametrize(
    ("code", "success", "action", "succeeded", "withdrawn"),
    [
        ("CAPTURE", "true", Action.CAPTURE, True, False),
        ("CAPTURE", "false", Action.CAPTURE, False, False),
        ("CAPTURE_FAILED", "true", Action.CAPTURE, False, True),
        ("CANCELLATION", "true", Action.VOID, True, False),
        ("REFUND", "false", Action.REFUND, False, False),
        ("REFUND_FAILED", "true", Action.REFUND, False, True),
    ],
)
def test_modifications_confirm_the_request_they_name(
    code: str, success: str, action: Action, succeeded: bool, withdrawn: bool
) -> None:
    fact = READER.read(body(code, success))
    assert fact == ConfirmationReported(
        MODIFICATION, PAYMENT, action, succeeded, withdrawn, 1000, "EUR", "", code, "order-1"
    )


def test_an_authorisation_names_the_payment_by_its_own_reference() -> None:
    fact = READER.read(body("AUTHORISATION", "false", originalReference=None, reason="Refused"))
    assert isinstance(fact, ConfirmationReported)
    assert (fact.reference, fact.payment_reference, fact.action, fact.succeeded) == (
        MODIFICATION,
        MODIFICATION,
        Action.AUTHORIZE,
        False,
    )


def test_disputes_and_ended_authorisations() -> None:
    notice = READER.read(body("NOTIFICATION_OF_CHARGEBACK", pspReference=PAYMENT))
    chargeback = READER.read(body("CHARGEBACK", pspReference=PAYMENT, originalReference=None))
    reversed_ = READER.read(body("CHARGEBACK_REVERSED", pspReference=PAYMENT))
    assert isinstance(notice, DisputeOpened) and notice.inquiry
    assert isinstance(chargeback, DisputeOpened) and not chargeback.inquiry
    assert chargeback.dispute_id == notice.dispute_id == f"chargeback:{PAYMENT}"
    assert isinstance(reversed_, DisputeClosed) and reversed_.outcome == "won"
    for code in ("EXPIRE", "TECHNICAL_CANCEL"):
        assert READER.read(body(code)) == AuthorisationEnded(PAYMENT, code, "")
    assert isinstance(READER.read(body("CHARGEBACK", "false")), Unhandled)
    assert isinstance(READER.read(body("REPORT_AVAILABLE")), Unhandled)
    assert isinstance(READER.read(body("CAPTURE", amount=None)), Unhandled)


def test_the_event_id_holds_no_13_digits_in_a_row_for_any_reference() -> None:
    for _ in range(200):
        psp = luhn_psp()
        assert luhn_valid(psp) and len(psp) == 16
        key = event_id({"pspReference": psp, "eventCode": "CAPTURE", "success": "true"})
        assert key == f"{psp[:8]}:{psp[8:]}:CAPTURE:true"
        assert not re.search(r"[0-9]{13}", key)
