"""Adyen's standard notifications (webhooks): verified item by item, read into facts.

Verification is :func:`provider_adapters.adyen_webhooks.verify_body`: every item's HMAC
against every active key (two while a key is rotated); one bad item refuses the whole
delivery, so nothing unverified is stored. Each verified item becomes its own inbox row, its
payload ``{"live": ..., "notificationItems": [{"NotificationRequestItem": item}]}`` (the
item's signed fields as they came), and the delivery is acknowledged with ``[accepted]``.

The event id is Adyen's deduplication key, (pspReference, eventCode, success), written
``<pspReference in groups of 8>:<eventCode>:<success>``, e.g. ``79140733:81342284:CAPTURE:true``:
a pspReference is often 16 digits, about one in ten of which pass the Luhn check, and the
inbox refuses an event id holding 13 digits in a row that pass it (sql/0023's card rule);
the ':' keeps every digit run at 8. A status that arrives "false" then "true" is two rows.

What each item becomes (:meth:`AdyenNotifications.read`):

==========================================  ===============================================
AUTHORISATION true / false                   :class:`ConfirmationReported` authorize
CAPTURE true / false, CAPTURE_FAILED          ... capture (CAPTURE_FAILED: ``withdrawn``)
CANCELLATION true / false                     ... void
REFUND true / false, REFUND_FAILED            ... refund (REFUND_FAILED: ``withdrawn``)
NOTIFICATION_OF_CHARGEBACK                    :class:`DisputeOpened` inquiry (nothing withdrawn yet)
CHARGEBACK                                    :class:`DisputeOpened` (funds withdrawn)
CHARGEBACK_REVERSED                           :class:`DisputeClosed` won (funds returned)
TECHNICAL_CANCEL, EXPIRE                      :class:`AuthorisationEnded`
anything else                                 :class:`Unhandled` (stored, acknowledged, ignored)
==========================================  ===============================================

One dispute per payment, as for Stripe: its id is ``chargeback:<the payment's pspReference>``.
Pure logic, no I/O; no exception but :class:`NotificationRejected` leaves :meth:`verify_items`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from provider_adapters.adyen_webhooks import HmacKeys, InvalidWebhook, verify_body
from provider_adapters.base import (
    Action,
    AuthorisationEnded,
    Command,
    ConfirmationReported,
    DisputeClosed,
    DisputeOpened,
    Fact,
    Notification,
    NotificationRejected,
    Outcome,
    Retryable,
    Unhandled,
)
from provider_adapters.currency_units import ADYEN_UNITS

__all__ = ["AdyenNotifications", "event_id", "item_of"]

# eventCode -> (action, withdrawn): a failure event that may follow a reported success.
_CONFIRMING: dict[str, tuple[Action, bool]] = {
    "AUTHORISATION": (Action.AUTHORIZE, False),
    "CAPTURE": (Action.CAPTURE, False),
    "CAPTURE_FAILED": (Action.CAPTURE, True),
    "CANCELLATION": (Action.VOID, False),
    "REFUND": (Action.REFUND, False),
    "REFUND_FAILED": (Action.REFUND, True),
}
_ENDED = {"TECHNICAL_CANCEL", "EXPIRE"}
_DISPUTES = {"NOTIFICATION_OF_CHARGEBACK", "CHARGEBACK", "CHARGEBACK_REVERSED"}


def event_id(item: Mapping[str, Any]) -> str:
    """The inbox's event id of one item: (pspReference, eventCode, success), the reference
    split in groups of 8 characters by ':' so that no 13 digits follow each other."""
    psp = str(item.get("pspReference") or "")
    groups = ":".join(psp[i : i + 8] for i in range(0, len(psp), 8))
    return f"{groups}:{item.get('eventCode')}:{item.get('success')}"


def item_of(body: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The one notification item of a stored row's payload."""
    items = body.get("notificationItems")
    if not isinstance(items, list) or not items or not isinstance(items[0], Mapping):
        return None
    item = items[0].get("NotificationRequestItem")
    return item if isinstance(item, Mapping) else None


def _when(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


class AdyenNotifications:
    """One Adyen webhook endpoint: its active HMAC keys (hex). Without keys it reads stored
    notifications (what a relay needs) and verifies none."""

    acknowledgement = "[accepted]"

    def __init__(self, name: str, hex_keys: Sequence[str] = ()) -> None:
        self.name = name
        self._keys = HmacKeys.from_hex(hex_keys) if hex_keys else None

    # -- verify ------------------------------------------------------------------------------

    def verify_items(self, body: bytes, headers: Mapping[str, str]) -> list[Notification]:
        if self._keys is None:
            raise NotificationRejected("bad_signature", "no HMAC key is configured")
        try:
            verified = verify_body(body, self._keys)
            live = json.loads(body).get("live")
        except InvalidWebhook as exc:
            reason = "malformed_json" if exc.code == "body_not_json" else "bad_signature"
            if exc.code in ("no_items", "item_malformed"):
                reason = "not_an_event"
            raise NotificationRejected(reason, str(exc)) from None
        except RecursionError:
            raise NotificationRejected("too_deep", "the body nests too deeply") from None
        found: list[Notification] = []
        for position, one in enumerate(verified, start=1):
            item = one.item
            psp, code = item.get("pspReference"), item.get("eventCode")
            if not isinstance(psp, str) or not psp or not isinstance(code, str) or not code:
                raise NotificationRejected(
                    "not_an_event", f"item {position} has no pspReference and eventCode"
                )
            if item.get("success") not in ("true", "false"):
                raise NotificationRejected(
                    "not_an_event", f'item {position}\'s success is not "true" or "false"'
                )
            payload = {"live": live, "notificationItems": [{"NotificationRequestItem": item}]}
            found.append(Notification(event_id(item), code, _when(item.get("eventDate")), payload))
        return found

    def verify(self, body: bytes, headers: Mapping[str, str]) -> Notification:
        """The first item (NotificationReader's single form); the receiver stores them all
        through :meth:`verify_items`."""
        return self.verify_items(body, headers)[0]

    # -- read --------------------------------------------------------------------------------

    def read(self, body: Mapping[str, Any]) -> Fact:
        item = item_of(body)
        if item is None:
            return Unhandled("the payload holds no NotificationRequestItem")
        code = str(item.get("eventCode"))
        psp = item.get("pspReference")
        original = item.get("originalReference") or None
        raw_amount = item.get("amount")
        amount: Mapping[str, Any] = raw_amount if isinstance(raw_amount, Mapping) else {}
        value, currency = amount.get("value"), amount.get("currency")
        success = item.get("success") == "true"
        reason = str(item.get("reason") or "")[:200]
        if not isinstance(psp, str):
            return Unhandled(f"{code} without a pspReference")
        if code in _CONFIRMING:
            action, withdrawn = _CONFIRMING[code]
            if (
                isinstance(value, bool)
                or not isinstance(value, int)
                or not isinstance(currency, str)
            ):
                return Unhandled(f"{code} without an amount")
            payment = psp if action is Action.AUTHORIZE else original
            if not isinstance(payment, str):
                return Unhandled(f"{code} without the payment's originalReference")
            return ConfirmationReported(
                reference=psp,
                payment_reference=payment,
                action=action,
                succeeded=success and not withdrawn,
                withdrawn=withdrawn,
                amount=value,
                currency=currency.upper(),
                reason=reason,
                event=code,
                merchant_reference=str(item.get("merchantReference") or "") or None,
            )
        payment_reference = original if isinstance(original, str) else psp
        if code in _ENDED:
            if not success:
                return Unhandled(f"{code} with success false changes nothing")
            return AuthorisationEnded(payment_reference, code, reason)
        if code in _DISPUTES:
            if not success:
                return Unhandled(f"{code} with success false changes nothing")
            if (
                isinstance(value, bool)
                or not isinstance(value, int)
                or not isinstance(currency, str)
            ):
                return Unhandled(f"{code} without an amount")
            dispute = f"chargeback:{payment_reference}"
            if code == "CHARGEBACK_REVERSED":
                return DisputeClosed(
                    payment_reference, dispute, value, currency.upper(), reason or code, "won"
                )
            return DisputeOpened(
                payment_reference=payment_reference,
                dispute_id=dispute,
                amount=value,
                currency=currency.upper(),
                reason=reason or code.lower(),
                inquiry=code == "NOTIFICATION_OF_CHARGEBACK",
            )
        return Unhandled(f"{code} is not an event code the relay applies")

    def settle(self, command: Command, body: Mapping[str, Any]) -> Outcome:
        # Adyen's notifications carry no idempotency key of ours: confirmations are matched
        # by pspReference (ConfirmationReported), never settled by key.
        return Retryable("not_found", "an Adyen notification names no idempotency key")

    def minor_units(self, amount: int, currency: str, exponent: int | None) -> int:
        return ADYEN_UNITS.from_provider(amount, currency, exponent)
