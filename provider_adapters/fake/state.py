"""The fake provider's money state: PaymentIntents, Refunds and the effects applied.

Pure logic, no I/O. Every operation returns ``(http_status, body)`` in Stripe's shapes.
An *effect* is a change of money state: an authorisation placed, a capture, a charge, a
refund, or a cancellation that releases a hold. Declines and errors are not effects.

Amounts are in Stripe's units and follow Stripe's rules for them
(provider_adapters/currency_units.py: ISK in multiples of 100, three-decimal currencies
with the last digit 0); an amount off that grid is refused with a 400, as at Stripe.
"""

from __future__ import annotations

import itertools
import re
import secrets
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from provider_adapters.currency_units import STRIPE_UNITS
from provider_adapters.fake.cards import card
from provider_adapters.fake.settlement import Settlement

__all__ = ["Effect", "StripeState", "stripe_error"]

Reply = tuple[int, dict[str, Any]]

# metadata['KEY']:'VALUE' (either quote), where a backslash escapes the next character
# inside a quoted string, as in Stripe's search query language.
_QUOTED = r"'((?:[^'\\]|\\.)*)'" + r'|"((?:[^"\\]|\\.)*)"'
_SEARCH = re.compile(rf"^metadata\[(?:{_QUOTED})\]:(?:{_QUOTED})$", re.DOTALL)
_ESCAPED = re.compile(r"\\(.)", re.DOTALL)


def stripe_error(
    status: int,
    type_: str,
    message: str,
    *,
    code: str | None = None,
    param: str | None = None,
    **extra: Any,
) -> Reply:
    error: dict[str, Any] = {"type": type_, "message": message}
    if code:
        error["code"] = code
    if param:
        error["param"] = param
    error.update(extra)
    return status, {"error": error}


@dataclass
class Effect:
    key: str
    kind: str
    object_id: str
    payment_intent: str
    amount: int
    currency: str


@dataclass
class StripeState:
    intents: dict[str, dict[str, Any]] = field(default_factory=dict)
    refunds: dict[str, dict[str, Any]] = field(default_factory=dict)
    effects: list[Effect] = field(default_factory=list)
    _seq: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    # Balance transactions for reconciliation (settlement.py), fed by every effect.
    settlement: Settlement = field(init=False)
    disputes: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Called with (event type, object, idempotency key) for every change a Stripe webhook
    # reports (webhooks.py queues and delivers them); None: no webhooks.
    notify: Callable[[str, dict[str, Any], str | None], Any] | None = None
    # New refunds are created `pending` (as some payment methods' are) and finish only by
    # settle_refund (POST /_fake/dashboard/refund/settle): refund.updated / refund.failed.
    refunds_pending: bool = False

    def __post_init__(self) -> None:
        self.settlement = Settlement(self.refunds)

    # -- helpers -------------------------------------------------------------------------

    def _id(self, prefix: str) -> str:
        # 'x' between counter and random tail: no run of 13 digits, which the adapter
        # would refuse as card-like (a real Stripe id is random base 62).
        return f"{prefix}_{next(self._seq):06d}x{secrets.token_hex(6)}"

    def _effect(self, key: str, kind: str, obj: str, pi: str, amount: int, currency: str) -> None:
        self.effects.append(Effect(key, kind, obj, pi, amount, currency))
        charge = self.intents.get(pi, {}).get("latest_charge")
        self.settlement.record(kind, obj, pi, amount, currency, charge)

    def _emit(self, event_type: str, obj: dict[str, Any], key: str | None) -> None:
        if self.notify is not None:
            self.notify(event_type, dict(obj), key or None)

    def charge_object(self, pi: dict[str, Any]) -> dict[str, Any]:
        """The PaymentIntent's latest charge as Stripe shows it, with its refunds."""
        refunds = [dict(r) for r in self.refunds.values() if r["payment_intent"] == pi["id"]]
        refunds.reverse()  # newest first
        refunded = sum(r["amount"] for r in refunds if r["status"] == "succeeded")
        return {
            "id": pi["latest_charge"],
            "object": "charge",
            "amount": pi["amount"],
            "amount_captured": pi["amount_received"],
            "amount_refunded": refunded,
            "currency": pi["currency"],
            "payment_intent": pi["id"],
            "captured": pi["amount_received"] > 0,
            "refunded": refunded >= pi["amount_received"] > 0,
            "disputed": any(d["payment_intent"] == pi["id"] for d in self.disputes.values()),
            "metadata": dict(pi["metadata"]),
            "refunds": {"object": "list", "data": refunds, "has_more": False},
            "created": pi["created"],
        }

    def effects_by_key(self) -> dict[str, dict[str, Any]]:
        grouped: dict[str, dict[str, Any]] = defaultdict(
            lambda: {"count": 0, "kinds": [], "amount": 0, "currency": None, "object": None}
        )
        for effect in self.effects:
            entry = grouped[effect.key]
            entry["count"] += 1
            entry["kinds"].append(effect.kind)
            entry["amount"] += effect.amount
            entry["currency"] = effect.currency
            entry["object"] = effect.object_id
        return dict(grouped)

    @staticmethod
    def _int(params: dict[str, Any], name: str, *, required: bool) -> int | Reply | None:
        raw = params.get(name)
        if raw is None:
            if required:
                return stripe_error(
                    400,
                    "invalid_request_error",
                    f"Missing required param: {name}.",
                    code="parameter_missing",
                    param=name,
                )
            return None
        try:
            value = int(str(raw))
        except ValueError:
            return stripe_error(
                400,
                "invalid_request_error",
                f"Invalid integer: {raw}",
                code="parameter_invalid_integer",
                param=name,
            )
        if value <= 0:
            return stripe_error(
                400,
                "invalid_request_error",
                "This value must be greater than or equal to 1.",
                code="parameter_invalid_integer",
                param=name,
            )
        return value

    @staticmethod
    def _off_grid(amount: int, currency: str, param: str) -> Reply | None:
        """Stripe's refusal of an amount its rules for the currency do not allow."""
        step = STRIPE_UNITS.granularity(currency)
        if amount % step == 0:
            return None
        # The code Stripe documents for ISK (support.stripe.com, "Deprecation of
        # fractional ISK charges"); the fake uses it for every currency's grid.
        return stripe_error(
            400,
            "invalid_request_error",
            f"Invalid amount. Amounts in {currency.upper()} must be evenly divisible by "
            f"{step}. See https://stripe.com/docs/currencies#special-cases.",
            code="invalid_charge_amount_no_decimal_compatible",
            param=param,
        )

    # -- payment intents -----------------------------------------------------------------

    def create_payment_intent(self, params: dict[str, Any], key: str) -> Reply:
        amount = self._int(params, "amount", required=True)
        if isinstance(amount, tuple):
            return amount
        currency = str(params.get("currency") or "").lower()
        if not re.fullmatch(r"[a-z]{3}", currency):
            return stripe_error(
                400,
                "invalid_request_error",
                "Missing or invalid currency.",
                code="parameter_missing",
                param="currency",
            )
        assert amount is not None  # required=True
        refused = self._off_grid(amount, currency, "amount")
        if refused is not None:
            return refused
        capture_method = str(params.get("capture_method") or "automatic")
        if capture_method not in ("automatic", "manual", "automatic_async"):
            return stripe_error(
                400,
                "invalid_request_error",
                "Invalid capture_method.",
                code="parameter_invalid_string",
                param="capture_method",
            )
        metadata = params.get("metadata") or {}
        if not isinstance(metadata, dict):
            return stripe_error(
                400,
                "invalid_request_error",
                "Invalid metadata.",
                code="parameter_invalid_string",
                param="metadata",
            )
        pi_id = self._id("pi")
        pi: dict[str, Any] = {
            "id": pi_id,
            "object": "payment_intent",
            "amount": amount,
            "amount_capturable": 0,
            "amount_received": 0,
            "currency": currency,
            "capture_method": "automatic"
            if capture_method == "automatic_async"
            else capture_method,
            "payment_method": params.get("payment_method"),
            "metadata": {str(k): str(v) for k, v in metadata.items()},
            "status": "requires_payment_method"
            if not params.get("payment_method")
            else "requires_confirmation",
            "created": int(time.time()),
            "livemode": False,
            "latest_charge": None,
            "last_payment_error": None,
            "canceled_at": None,
            "cancellation_reason": None,
        }
        self.intents[pi_id] = pi
        if str(params.get("confirm", "")).lower() == "true":
            return self._confirm(pi, params.get("payment_method"), key)
        return 200, dict(pi)

    def confirm_payment_intent(self, pi_id: str, params: dict[str, Any], key: str) -> Reply:
        pi = self.intents.get(pi_id)
        if pi is None:
            return self._missing("payment_intent", pi_id)
        if pi["status"] not in ("requires_payment_method", "requires_confirmation"):
            return self._unexpected(pi, "confirm")
        return self._confirm(pi, params.get("payment_method") or pi["payment_method"], key)

    def _confirm(self, pi: dict[str, Any], method: Any, key: str) -> Reply:
        if not method:
            return stripe_error(
                400,
                "invalid_request_error",
                "You cannot confirm this PaymentIntent because it's missing a payment method.",
                code="payment_intent_unexpected_state",
            )
        method = str(method)
        pi["payment_method"] = method
        test_card = card(method)
        if test_card is None:
            return stripe_error(
                400,
                "invalid_request_error",
                f"No such PaymentMethod: '{method}'",
                code="resource_missing",
                param="payment_method",
            )
        if test_card.declines:
            error: dict[str, Any] = {
                "type": "card_error",
                "code": test_card.code,
                "message": test_card.message,
            }
            if test_card.decline_code:
                error["decline_code"] = test_card.decline_code
            pi["status"] = "requires_payment_method"
            pi["last_payment_error"] = dict(error)
            error["payment_intent"] = dict(pi)
            self._emit("payment_intent.payment_failed", pi, key)
            return 402, {"error": error}
        charge_id = self._id("ch")
        pi["latest_charge"] = charge_id
        pi["last_payment_error"] = None
        if pi["capture_method"] == "manual":
            pi["status"] = "requires_capture"
            pi["amount_capturable"] = pi["amount"]
            self._effect(key, "authorize", pi["id"], pi["id"], pi["amount"], pi["currency"])
            self._emit("payment_intent.amount_capturable_updated", pi, key)
        else:
            pi["status"] = "succeeded"
            pi["amount_received"] = pi["amount"]
            self._effect(key, "charge", pi["id"], pi["id"], pi["amount"], pi["currency"])
            self._emit("payment_intent.succeeded", pi, key)
        return 200, dict(pi)

    def capture_payment_intent(self, pi_id: str, params: dict[str, Any], key: str) -> Reply:
        pi = self.intents.get(pi_id)
        if pi is None:
            return self._missing("payment_intent", pi_id)
        if pi["status"] != "requires_capture":
            return self._unexpected(pi, "capture")
        amount = self._int(params, "amount_to_capture", required=False)
        if isinstance(amount, tuple):
            return amount
        amount = pi["amount_capturable"] if amount is None else amount
        refused = self._off_grid(amount, pi["currency"], "amount_to_capture")
        if refused is not None:
            return refused
        if amount > pi["amount_capturable"]:
            return stripe_error(
                400,
                "invalid_request_error",
                "The amount to capture exceeds the capturable amount.",
                code="amount_too_large",
                param="amount_to_capture",
            )
        pi["status"] = "succeeded"
        pi["amount_received"] = amount
        pi["amount_capturable"] = 0
        self._effect(key, "capture", pi["id"], pi["id"], amount, pi["currency"])
        self._emit("payment_intent.succeeded", pi, key)
        return 200, dict(pi)

    def cancel_payment_intent(self, pi_id: str, params: dict[str, Any], key: str) -> Reply:
        pi = self.intents.get(pi_id)
        if pi is None:
            return self._missing("payment_intent", pi_id)
        if pi["status"] in ("succeeded", "canceled"):
            return self._unexpected(pi, "cancel")
        released = pi["status"] == "requires_capture"
        held = pi["amount_capturable"]
        pi["status"] = "canceled"
        pi["amount_capturable"] = 0
        pi["canceled_at"] = int(time.time())
        pi["cancellation_reason"] = params.get("cancellation_reason") or "requested_by_customer"
        if released:
            self._effect(key, "void", pi["id"], pi["id"], held, pi["currency"])
        self._emit("payment_intent.canceled", pi, key)
        return 200, dict(pi)

    def retrieve_payment_intent(self, pi_id: str) -> Reply:
        pi = self.intents.get(pi_id)
        return (200, dict(pi)) if pi else self._missing("payment_intent", pi_id)

    def search_payment_intents(self, query: str) -> Reply:
        match = _SEARCH.match(query.strip())
        if match is None:
            return stripe_error(
                400,
                "invalid_request_error",
                "Only metadata['KEY']:'VALUE' queries are supported here.",
                code="parameter_invalid_string",
                param="query",
            )
        key_single, key_double, value_single, value_double = match.groups()
        name = _ESCAPED.sub(r"\1", key_single if key_single is not None else key_double)
        value = _ESCAPED.sub(r"\1", value_single if value_single is not None else value_double)
        data = [dict(pi) for pi in self.intents.values() if pi["metadata"].get(name) == value]
        return 200, {
            "object": "search_result",
            "data": data,
            "has_more": False,
            "next_page": None,
            "url": "/v1/payment_intents/search",
            "total_count": len(data),
        }

    # -- refunds -------------------------------------------------------------------------

    def create_refund(self, params: dict[str, Any], key: str) -> Reply:
        pi_id = params.get("payment_intent")
        if not pi_id:
            return stripe_error(
                400,
                "invalid_request_error",
                "Missing payment_intent.",
                code="parameter_missing",
                param="payment_intent",
            )
        pi = self.intents.get(str(pi_id))
        if pi is None:
            return self._missing("payment_intent", str(pi_id))
        if pi["status"] != "succeeded":
            return stripe_error(
                400,
                "invalid_request_error",
                f"This PaymentIntent ({pi['id']}) does not have a successful charge to refund.",
                code="charge_not_refundable",
            )
        refunded = sum(
            r["amount"]
            for r in self.refunds.values()
            if r["payment_intent"] == pi["id"] and r["status"] == "succeeded"
        )
        remaining = pi["amount_received"] - refunded
        amount = self._int(params, "amount", required=False)
        if isinstance(amount, tuple):
            return amount
        amount = remaining if amount is None else amount
        refused = self._off_grid(amount, pi["currency"], "amount")
        if refused is not None:
            return refused
        if amount <= 0 or amount > remaining:
            return stripe_error(
                400,
                "invalid_request_error",
                f"Refund amount ({amount}) is greater than unrefunded amount "
                f"on charge ({remaining})",
                code="amount_too_large",
                param="amount",
            )
        metadata = params.get("metadata") or {}
        refund = {
            "id": self._id("re"),
            "object": "refund",
            "amount": amount,
            "currency": pi["currency"],
            "payment_intent": pi["id"],
            "charge": pi["latest_charge"],
            "status": "pending" if self.refunds_pending else "succeeded",
            "metadata": {str(k): str(v) for k, v in metadata.items()},
            "created": int(time.time()),
        }
        self.refunds[refund["id"]] = refund
        self._effect(key, "refund", refund["id"], pi["id"], amount, pi["currency"])
        self._emit("charge.refunded", self.charge_object(pi), key)
        return 200, dict(refund)

    # -- changes outside the API (the dashboard, the card network) -----------------------

    def dashboard_refund(self, params: dict[str, Any]) -> Reply:
        """A refund an operator makes in the provider's dashboard: no idempotency key of
        ours, none of our metadata; reported by charge.refunded like any refund."""
        key = f"dashboard_{secrets.token_hex(6)}"
        return self.create_refund({k: v for k, v in params.items() if k != "metadata"}, key)

    def settle_refund(self, params: dict[str, Any]) -> Reply:
        """A pending refund finishes: ``{"refund": "re_...", "status": "succeeded"}`` (or
        ``failed``); reported by refund.updated (refund.failed). ``{"pending": "true"}`` alone
        switches pending refunds on (``false``: off)."""
        if "pending" in params and "refund" not in params:
            self.refunds_pending = params["pending"] == "true"
            return 200, {"refunds_pending": self.refunds_pending}
        refund = self.refunds.get(str(params.get("refund")))
        status = str(params.get("status"))
        if refund is None or refund["status"] != "pending" or status not in ("succeeded", "failed"):
            return stripe_error(400, "invalid_request_error", "no pending refund to settle so")
        refund["status"] = status
        if status == "failed":
            refund["failure_reason"] = "lost_or_stolen_card"
        # As Stripe: the refund's own event (its object is the Refund).
        self._emit("refund.updated" if status == "succeeded" else "refund.failed", refund, None)
        return 200, dict(refund)

    def open_dispute(self, params: dict[str, Any]) -> Reply:
        """The card holder disputes a charge (charge.dispute.created)."""
        pi = self.intents.get(str(params.get("payment_intent") or ""))
        if pi is None or not pi.get("latest_charge") or pi["amount_received"] <= 0:
            return stripe_error(
                400, "invalid_request_error", "payment_intent must name a captured payment"
            )
        amount = self._int(params, "amount", required=False)
        if isinstance(amount, tuple):
            return amount
        dispute = {
            "id": self._id("dp"),
            "object": "dispute",
            "amount": pi["amount_received"] if amount is None else amount,
            "currency": pi["currency"],
            "charge": pi["latest_charge"],
            "payment_intent": pi["id"],
            "reason": str(params.get("reason") or "fraudulent"),
            "status": "needs_response",
            "created": int(time.time()),
        }
        self.disputes[dispute["id"]] = dispute
        self._emit("charge.dispute.created", dispute, None)
        return 200, dict(dispute)

    def close_dispute(self, params: dict[str, Any]) -> Reply:
        """The card network decides a dispute (charge.dispute.closed): ``won`` returns the
        withdrawn funds to the merchant, ``lost`` keeps them with the card holder."""
        dispute = self.disputes.get(str(params.get("dispute") or ""))
        if dispute is None:
            return stripe_error(400, "invalid_request_error", "dispute must name an open dispute")
        status = str(params.get("status") or "")
        if status not in ("won", "lost"):
            return stripe_error(
                400, "invalid_request_error", "status must be won or lost", param="status"
            )
        if dispute["status"] in ("won", "lost"):
            return stripe_error(
                400,
                "invalid_request_error",
                f"dispute {dispute['id']} is already {dispute['status']}",
            )
        dispute["status"] = status
        self._emit("charge.dispute.closed", dispute, None)
        return 200, dict(dispute)

    def retrieve_refund(self, re_id: str) -> Reply:
        refund = self.refunds.get(re_id)
        return (200, dict(refund)) if refund else self._missing("refund", re_id)

    def list_refunds(self, pi_id: str | None) -> Reply:
        data = [
            dict(r) for r in self.refunds.values() if pi_id is None or r["payment_intent"] == pi_id
        ]
        data.reverse()  # Stripe lists newest first
        return 200, {"object": "list", "data": data, "has_more": False, "url": "/v1/refunds"}

    # -- errors --------------------------------------------------------------------------

    @staticmethod
    def _missing(kind: str, object_id: str) -> Reply:
        return stripe_error(
            404,
            "invalid_request_error",
            f"No such {kind}: '{object_id}'",
            code="resource_missing",
            param="id",
        )

    @staticmethod
    def _unexpected(pi: dict[str, Any], verb: str) -> Reply:
        return stripe_error(
            400,
            "invalid_request_error",
            f"This PaymentIntent could not be {verb}d because it has a status of {pi['status']}.",
            code="payment_intent_unexpected_state",
            payment_intent=dict(pi),
        )
