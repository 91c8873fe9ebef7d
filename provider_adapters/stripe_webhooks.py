"""Stripe's notifications (webhooks): verified with the official SDK, read into facts.

Verification is ``stripe.Webhook.construct_event`` against the raw body, with its
tolerance, tried with each active endpoint secret in turn (several are active while a
secret is rolled). The SDK checks the signature before the timestamp, so a delivery whose
signature matches one secret but whose timestamp is too old is ``stale_timestamp``; one
that matches none is ``bad_signature``.

Guarantees, each tested:

* a body that is not UTF-8, not JSON, nested deeper than ``max_depth`` or not an event
  (``id``, ``type``, ``created``) is refused by reason, never parsed twice into anything
  trusted;
* payment_intent.succeeded / .payment_failed become :class:`PaymentSettled` and
  :meth:`settle` maps the PaymentIntent exactly as the adapter's lookup does
  (:func:`provider_adapters.stripe.payment_intent_outcome`); for a refund command it
  finds our refund in the charge's refunds by its key and verifies it as the lookup does;
* charge.refunded and charge.refund.updated become :class:`RefundsReported` with the
  charge's totals; refund.updated and refund.failed (a Refund object: an asynchronous
  refund finished) become :class:`PaymentSettled` for our refund's key, which settles the
  intent awaiting its confirmation; charge.dispute.created becomes :class:`DisputeOpened` (an inquiry,
  status ``warning_*``, marked so) and charge.dispute.closed :class:`DisputeClosed` (won,
  lost, or an inquiry closed: warning_closed); charge.captured becomes
  :class:`CaptureReported` with the charge's captured total; any other type is
  :class:`Unhandled` (stored, acknowledged, visible).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import stripe

from provider_adapters.base import (
    Action,
    CaptureReported,
    Command,
    DisputeClosed,
    DisputeOpened,
    Fact,
    Notification,
    NotificationRejected,
    Outcome,
    PaymentSettled,
    RefundsReported,
    ReportedRefund,
    Retryable,
    Unhandled,
)
from provider_adapters.currency_units import STRIPE_UNITS
from provider_adapters.stripe import payment_intent_outcome, verified_outcome

__all__ = ["StripeNotifications", "json_depth"]

_KEY_FIELD = "outbox_idempotency_key"
_SETTLING = {"payment_intent.succeeded": True, "payment_intent.payment_failed": False}
_REFUNDS = {"charge.refunded", "charge.refund.updated"}
# Events whose object is a Refund (Stripe sends these when a refund's status changes).
_REFUND_OBJECT_EVENTS = {"refund.updated", "refund.failed", "charge.refund.updated"}


def json_depth(value: Any, limit: int) -> int:
    """Nesting depth of a parsed JSON value, counted without recursion; stops past ``limit``."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict | list):
            deepest = max(deepest, depth)
            if deepest > limit:
                return deepest
            children = node.values() if isinstance(node, dict) else node
            stack.extend((child, depth + 1) for child in children)
    return deepest


def _get(obj: Any, *path: str) -> Any:
    for name in path:
        if not isinstance(obj, Mapping):
            return None
        obj = obj.get(name)
    return obj


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


class StripeNotifications:
    """Stripe's webhook endpoint secrets (``whsec_...``), tolerance in seconds. Without
    secrets it still reads stored notifications (what a relay needs) and verifies none."""

    def __init__(
        self,
        name: str,
        secrets: Sequence[str],
        *,
        tolerance_seconds: int = 300,
        max_depth: int = 64,
    ) -> None:
        self.name = name
        self._secrets = tuple(secrets)
        self._tolerance = tolerance_seconds
        self._max_depth = max_depth

    # -- verify ------------------------------------------------------------------------------

    def verify(self, body: bytes, headers: Mapping[str, str]) -> Notification:
        header = headers.get("Stripe-Signature") or headers.get("stripe-signature")
        if not header:
            raise NotificationRejected("missing_signature", "no Stripe-Signature header")
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise NotificationRejected("invalid_utf8", "the body is not UTF-8") from None
        stale = False
        for secret in self._secrets:
            try:
                stripe.WebhookSignature.verify_header(text, header, secret, self._tolerance)
            except stripe.SignatureVerificationError as exc:
                stale = stale or str(exc).startswith("Timestamp outside the tolerance zone")
                continue
            return self._parse(text)
        if stale:
            raise NotificationRejected(
                "stale_timestamp",
                f"the signature's timestamp is older than the tolerance ({self._tolerance} s)",
            )
        raise NotificationRejected(
            "bad_signature", "no Stripe-Signature v1 value matches an active secret"
        )

    def _parse(self, text: str) -> Notification:
        try:
            body = json.loads(text)
        except RecursionError:
            raise NotificationRejected("too_deep", "the body nests too deeply") from None
        except json.JSONDecodeError as exc:
            raise NotificationRejected(
                "malformed_json", f"the body is not JSON ({exc.msg} at {exc.pos})"
            ) from None
        if json_depth(body, self._max_depth) > self._max_depth:
            raise NotificationRejected(
                "too_deep", f"the body nests deeper than {self._max_depth} levels"
            )
        if not isinstance(body, dict):
            raise NotificationRejected("not_an_event", "the body is not a JSON object")
        event_id, event_type, created = body.get("id"), body.get("type"), _int(body.get("created"))
        if not isinstance(event_id, str) or not event_id or not isinstance(event_type, str):
            raise NotificationRejected("not_an_event", "the body has no event id and type")
        when = None
        if created is not None:
            try:
                when = datetime.fromtimestamp(created, UTC)
            except (OverflowError, OSError, ValueError):
                raise NotificationRejected(
                    "not_an_event", "the event's created time is out of range"
                ) from None
        return Notification(event_id=event_id, event_type=event_type, created=when, body=body)

    # -- read --------------------------------------------------------------------------------

    def read(self, body: Mapping[str, Any]) -> Fact:
        event_type = body.get("type")
        obj = _get(body, "data", "object")
        if not isinstance(obj, Mapping):
            return Unhandled("the event carries no data.object")
        if event_type in _SETTLING:
            reference = _text(obj.get("id"))
            if reference is None or obj.get("object") != "payment_intent":
                return Unhandled(f"{event_type} without a PaymentIntent")
            return PaymentSettled(
                payment_reference=reference,
                idempotency_key=_text(_get(obj, "metadata", _KEY_FIELD)),
                succeeded=_SETTLING[event_type],
            )
        if obj.get("object") == "refund" and event_type in _REFUND_OBJECT_EVENTS:
            # A refund's own status changed (an asynchronous refund: pending, then
            # succeeded or failed): it settles our refund intent awaiting its confirmation.
            reference = _text(obj.get("payment_intent"))
            if reference is None:
                return Unhandled(f"{event_type} without the refund's payment_intent")
            return PaymentSettled(
                payment_reference=reference,
                idempotency_key=_text(_get(obj, "metadata", _KEY_FIELD)),
                succeeded=obj.get("status") == "succeeded",
            )
        if event_type in _REFUNDS:
            charge = obj if obj.get("object") == "charge" else None
            reference = _text(_get(charge, "payment_intent"))
            currency = _text(_get(charge, "currency"))
            captured, refunded = (
                _int(_get(charge, "amount_captured")),
                _int(_get(charge, "amount_refunded")),
            )
            if reference is None or currency is None or captured is None or refunded is None:
                return Unhandled(f"{event_type} without a charge's payment_intent and totals")
            refunds = tuple(
                ReportedRefund(
                    refund_id=str(r.get("id")),
                    amount=amount,
                    idempotency_key=_text(_get(r, "metadata", _KEY_FIELD)),
                    status=str(r.get("status")),
                )
                for r in (_get(charge, "refunds", "data") or [])
                if isinstance(r, Mapping)
                and (
                    r.get("status") in ("succeeded", "pending")
                    # a failed refund only when it is ours: it may finish an intent awaiting
                    # its confirmation (it moved no money)
                    or (
                        r.get("status") in ("failed", "canceled")
                        and _text(_get(r, "metadata", _KEY_FIELD)) is not None
                    )
                )
                and (amount := _int(r.get("amount"))) is not None
            )
            return RefundsReported(reference, currency.upper(), captured, refunded, refunds)
        if event_type == "charge.captured":
            reference = _text(obj.get("payment_intent"))
            currency, captured = _text(obj.get("currency")), _int(obj.get("amount_captured"))
            if obj.get("object") != "charge" or None in (reference, currency, captured):
                return Unhandled("charge.captured without a charge's payment_intent and total")
            assert reference is not None and currency is not None and captured is not None
            return CaptureReported(reference, str(obj.get("id")), currency.upper(), captured)
        if event_type in ("charge.dispute.created", "charge.dispute.closed"):
            # stripe-python's Dispute: amount, currency, status, charge, payment_intent.
            reference = _text(obj.get("payment_intent"))
            amount, currency = _int(obj.get("amount")), _text(obj.get("currency"))
            dispute_id, status = _text(obj.get("id")), _text(obj.get("status")) or ""
            if reference is None or amount is None or currency is None or dispute_id is None:
                return Unhandled(f"{event_type} without id, payment_intent, amount and currency")
            reason = str(obj.get("reason") or "unknown")[:100]
            if event_type == "charge.dispute.created":
                return DisputeOpened(
                    payment_reference=reference,
                    dispute_id=dispute_id,
                    amount=amount,
                    currency=currency.upper(),
                    reason=reason,
                    inquiry=status.startswith("warning_"),
                )
            outcome = {"won": "won", "lost": "lost", "warning_closed": "inquiry"}.get(status)
            if outcome is None:
                return Unhandled(f"charge.dispute.closed with status {status!r}")
            return DisputeClosed(reference, dispute_id, amount, currency.upper(), reason, outcome)
        return Unhandled(f"{event_type} is not a type the relay applies")

    def settle(self, command: Command, body: Mapping[str, Any]) -> Outcome:
        pi = _get(body, "data", "object")
        not_found = Retryable("not_found", "the notification shows no outcome of this intent")
        if not isinstance(pi, Mapping):
            return not_found
        if command.action is Action.REFUND:
            if pi.get("object") == "refund":  # refund.updated: the refund itself
                if _get(pi, "metadata", _KEY_FIELD) == command.idempotency_key:
                    return verified_outcome(command, pi)
                return not_found
            # The charge's refunds, as the lookup reads the refunds list: ours by its key.
            for refund in _get(pi, "refunds", "data") or []:
                if _get(refund, "metadata", _KEY_FIELD) == command.idempotency_key:
                    return verified_outcome(command, refund)
            return not_found
        if command.action not in (Action.AUTHORIZE, Action.CHARGE):
            return not_found
        if _get(pi, "metadata", _KEY_FIELD) != command.idempotency_key:
            return not_found
        found = payment_intent_outcome(command, pi)
        return not_found if found is None else found

    def minor_units(self, amount: int, currency: str, exponent: int | None) -> int:
        return STRIPE_UNITS.from_provider(amount, currency, exponent)
