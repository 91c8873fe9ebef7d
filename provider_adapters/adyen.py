"""The Adyen adapter: Checkout API (v71 by default) over the lane's own aiohttp session.

Why not the official ``Adyen`` package: it is synchronous (its HTTP clients are
``requests``, ``pycurl`` or ``urllib``), so each call would block the event loop or take a
worker thread per call in flight; at a lane's concurrency of 32 that is 32 threads, each
holding a blocking socket, and cancellation by the lane's deadline cannot reach a thread.
It also returns plain dicts (no response models to validate against), raises one exception
type for every HTTP error with the body as text, and its webhook helper checks only the
first item (../shared/PROVIDERS.md). What it would give us is request building for five
JSON POSTs. So the adapter calls the documented REST API directly with aiohttp, the client
the relay already runs the Stripe SDK on (docs/performance.md: the cheapest per call),
with the lane's connection limit as its bulkhead. docs/providers.md has the longer note.

Guarantees, each tested (tests/test_adyen_adapter.py, tests/test_adapter_contract.py):

* every POST carries ``Idempotency-Key``: the intent's stored key when it fits Adyen's 64
  characters, else ``sha256:`` and the key's SHA-256 in base64url (50 characters); the same
  on every attempt, so a retry replays the first answer for 31 days;
* amounts are sent in Adyen's units (CLP and ISK x100, CVE and IDR /100,
  :data:`~provider_adapters.currency_units.ADYEN_UNITS`); an amount Adyen cannot represent
  is refused (Invalid) before any request;
* ``Authorised`` is :class:`Succeeded` after its amount, currency and pspReference are
  checked; ``Refused`` is :class:`Declined` with a code from the refusal reason; a shopper
  action (redirect, 3-D Secure) is :class:`Invalid`, the relay cannot perform one;
* a modification (capture, cancel, refund) answered ``201 received`` is **not** a success:
  Adyen confirms or fails it later by webhook. Until the webhook inbox (issue 18) can finish
  the intent, it is :class:`Ambiguous` with code ``awaiting_confirmation`` and the
  modification's pspReference as ``provider_reference``; a retry under the same key
  replays ``received`` and changes nothing at Adyen;
* :meth:`AdyenAdapter.lookup` cannot settle anything: the Checkout API has no endpoint to
  read a payment or a modification by reference or key. It answers :class:`Ambiguous`
  (``lookup_unavailable``); the outcome is settled by webhook and the settlement report.

No exception leaves this module.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import ssl
from typing import Any

import aiohttp

from provider_adapters.base import (
    AWAITING_CONFIRMATION,
    Action,
    Ambiguous,
    Command,
    Declined,
    Invalid,
    Outcome,
    Retryable,
    Succeeded,
    UntestedApiVersion,
)
from provider_adapters.currency_units import ADYEN_UNITS, AmountNotRepresentable

__all__ = [
    "DEFAULT_API_VERSION",
    "IDEMPOTENCY_KEY_LIFETIME_SECONDS",
    "TESTED_API_VERSIONS",
    "AdyenAdapter",
    "UntestedApiVersion",
    "adyen_idempotency_key",
]

DEFAULT_API_VERSION = "v71"
TESTED_API_VERSIONS = ("v71",)
# Adyen keeps an idempotency key (and replays its first answer) for at least 31 days.
IDEMPOTENCY_KEY_LIFETIME_SECONDS = 31 * 24 * 3600
MAX_KEY_LENGTH = 64
_PSP = re.compile(r"[A-Z0-9]{16}")
_PRINTABLE = re.compile(r"[!-~]{1,64}")

# Adyen's refusalReasonCode -> our declined code (docs.adyen.com refusal reasons).
_REFUSALS = {
    "2": "refused",
    "3": "referral",
    "4": "acquirer_error",
    "5": "blocked_card",
    "6": "expired_card",
    "7": "invalid_amount",
    "8": "invalid_card_number",
    "9": "issuer_unavailable",
    "10": "not_supported",
    "11": "3d_not_authenticated",
    "12": "not_enough_balance",
    "14": "acquirer_fraud",
    "15": "cancelled",
    "16": "shopper_cancelled",
    "17": "invalid_pin",
    "18": "pin_tries_exceeded",
    "19": "pin_validation_not_possible",
    "20": "fraud",
    "22": "fraud_cancelled",
    "23": "transaction_not_permitted",
    "24": "cvc_declined",
    "25": "restricted_card",
    "26": "revocation_of_auth",
    "27": "declined_non_generic",
    "28": "withdrawal_amount_exceeded",
    "29": "withdrawal_count_exceeded",
    "31": "issuer_suspected_fraud",
    "32": "avs_declined",
    "33": "card_requires_online_pin",
    "34": "no_checking_account",
    "35": "no_savings_account",
    "36": "mobile_pin_required",
    "37": "contactless_fallback",
    "38": "authentication_required",
}
_SHOPPER_ACTION = {
    "RedirectShopper",
    "IdentifyShopper",
    "ChallengeShopper",
    "PresentToShopper",
    "AuthenticationFinished",
    "AuthenticationNotRequired",
}
_MODIFICATION_PATH = {Action.CAPTURE: "captures", Action.VOID: "cancels", Action.REFUND: "refunds"}


def adyen_idempotency_key(key: str) -> str:
    """The intent's key as Adyen takes it: itself when it is 1 to 64 printable ASCII
    characters, else ``sha256:`` + base64url(SHA-256(key)) without padding (50 characters).
    A function of the key alone, so every attempt of an intent sends the same header."""
    if _PRINTABLE.fullmatch(key):
        return key
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return "sha256:" + base64.urlsafe_b64encode(digest).decode("ascii").rstrip("=")


class _InvalidReply(Exception):
    """Adyen answered 2xx with something we cannot trust."""


def _clip(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _safe(value: Any, fallback: str) -> str:
    text = str(value) if isinstance(value, str | int) and not isinstance(value, bool) else ""
    return text if re.fullmatch(r"[A-Za-z0-9_.\- ]{1,80}", text) else fallback


class AdyenAdapter:
    kind = "adyen"  # the error catalogue's provider column
    idempotency_key_lifetime_seconds = IDEMPOTENCY_KEY_LIFETIME_SECONDS

    def __init__(
        self,
        *,
        name: str,
        api_key: str,
        merchant_account: str,
        base_url: str = "https://checkout-test.adyen.com",
        api_version: str = DEFAULT_API_VERSION,
        allow_untested_version: bool = False,
        return_url: str = "https://outbox-relay.invalid/return",
        connect_timeout_seconds: float = 3.0,
        read_timeout_seconds: float = 10.0,
        max_connections: int = 20,
    ) -> None:
        if api_version not in TESTED_API_VERSIONS and not allow_untested_version:
            raise UntestedApiVersion(
                f"Adyen Checkout API version {api_version!r} was not tested with this "
                f"adapter (tested: {', '.join(TESTED_API_VERSIONS)}); set the provider's "
                "allow_untested_api_version to start anyway"
            )
        if not merchant_account:
            raise ValueError("merchant_account is required for Adyen")
        self.name = name
        self.api_version = api_version
        self.untested_version = api_version not in TESTED_API_VERSIONS
        self._api_key = api_key
        self._merchant_account = merchant_account
        self._base = f"{base_url.rstrip('/')}/{api_version}"
        self._return_url = return_url
        self._max_connections = max_connections
        self._timeout = aiohttp.ClientTimeout(
            total=None,
            connect=connect_timeout_seconds,
            sock_connect=connect_timeout_seconds,
            sock_read=read_timeout_seconds,
        )
        self._session: aiohttp.ClientSession | None = None

    def _http(self) -> aiohttp.ClientSession:
        # Opened in the running loop on first use (aiohttp binds a session to its loop).
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=self._max_connections, ssl=ssl.create_default_context()
            )
            self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout)
        return self._session

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    # -- execute -------------------------------------------------------------------------

    def _request(self, command: Command, amount: int) -> tuple[str, dict[str, Any]]:
        money = {"value": amount, "currency": command.currency.upper()}
        if command.action in (Action.AUTHORIZE, Action.CHARGE):
            body: dict[str, Any] = {
                "amount": money,
                "merchantAccount": self._merchant_account,
                "reference": command.payment_id[:80],
                "returnUrl": self._return_url,
                "paymentMethod": {
                    "type": "scheme",
                    "storedPaymentMethodId": command.payment_method or "",
                },
                "shopperReference": command.payment_id[:256],
                "shopperInteraction": "ContAuth",
                "recurringProcessingModel": "UnscheduledCardOnFile",
                "metadata": {"outbox_intent_id": str(command.intent_id)},
            }
            if command.action is Action.CHARGE:
                body["captureDelayHours"] = 0
            return "/payments", body
        path = f"/payments/{command.payment_reference}/{_MODIFICATION_PATH[command.action]}"
        body = {
            "merchantAccount": self._merchant_account,
            "reference": f"intent-{command.intent_id}",
        }
        if command.action is not Action.VOID:
            body["amount"] = money
        return path, body

    async def execute(self, command: Command) -> Outcome:
        try:
            amount = ADYEN_UNITS.to_provider(
                command.amount_minor, command.currency, command.exponent
            )
        except AmountNotRepresentable as exc:
            return Invalid(exc.code, str(exc))
        if command.action not in (Action.AUTHORIZE, Action.CHARGE) and not (
            command.payment_reference and _PSP.fullmatch(command.payment_reference)
        ):
            return Invalid(
                "missing_payment_reference",
                f"{command.action} needs the payment's Adyen pspReference (16 characters)",
            )
        path, body = self._request(command, amount)
        headers = {
            "X-API-Key": self._api_key,
            "Idempotency-Key": adyen_idempotency_key(command.idempotency_key),
            "Content-Type": "application/json",
        }
        if command.traceparent:
            headers["traceparent"] = command.traceparent
        sent = False
        try:
            async with self._http().post(
                self._base + path, data=json.dumps(body), headers=headers
            ) as response:
                sent = True
                status = response.status
                retry_after = response.headers.get("Retry-After")
                raw = await response.read()
        except aiohttp.ClientConnectorError as exc:
            return Retryable("connection_error", f"could not connect: {type(exc).__name__}")
        except (aiohttp.ClientError, OSError) as exc:
            # Sent (or possibly sent) and no complete answer: the same key settles it.
            what = "the reply broke off" if sent else "the request was cut"
            return Ambiguous("connection_lost", f"{what}: {type(exc).__name__}")
        except Exception as exc:  # never let a surprise cross the boundary
            return Ambiguous("invalid_provider_reply", f"unexpected {type(exc).__name__}")
        return self._answer(command, amount, status, raw, retry_after)

    def _answer(
        self, command: Command, amount: int, status: int, raw: bytes, retry_after: str | None
    ) -> Outcome:
        try:
            reply = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            reply = None
        if status >= 300:
            return self._error(status, reply if isinstance(reply, dict) else {}, retry_after)
        if not isinstance(reply, dict):
            return Ambiguous(
                "invalid_provider_reply", f"HTTP {status} with a body that is not JSON"
            )
        try:
            if command.action in (Action.AUTHORIZE, Action.CHARGE):
                return self._payment(command, amount, reply)
            return self._modification(command, amount, status, reply)
        except _InvalidReply as exc:
            return Ambiguous("invalid_provider_reply", str(exc))
        except Exception as exc:
            return Ambiguous("invalid_provider_reply", f"unreadable reply ({type(exc).__name__})")

    @staticmethod
    def _error(status: int, reply: dict[str, Any], retry_after: str | None) -> Outcome:
        code = _safe(reply.get("errorCode"), "")
        message = _clip(str(reply.get("message") or f"HTTP {status}"))
        if status == 429:
            try:
                after = float(retry_after) if retry_after else None
            except ValueError:
                after = None
            return Retryable("rate_limited", message, after)
        if status == 422 and code == "704":
            # The first request under this key is still running at Adyen: ask again later,
            # the same key then replays its answer.
            return Retryable("idempotency_in_progress", message)
        if status in (401, 403):
            return Invalid("authentication_failed" if status == 401 else "forbidden", message)
        if status in (502, 503, 504):
            return Retryable("provider_unavailable", f"HTTP {status}: {message}")
        if status >= 500:
            return Ambiguous("provider_error", f"HTTP {status}: {message}")
        return Invalid(f"adyen_{code}" if code else f"http_{status}", message)

    def _check_amount(self, reply: dict[str, Any], command: Command, amount: int) -> None:
        money = reply.get("amount")
        if not isinstance(money, dict):
            raise _InvalidReply("the reply carries no amount")
        value, currency = money.get("value"), money.get("currency")
        if isinstance(value, bool) or value != amount:
            raise _InvalidReply(f"amount.value {value!r} differs from {amount}")
        if not isinstance(currency, str) or currency.upper() != command.currency.upper():
            raise _InvalidReply(f"amount.currency {currency!r} differs from {command.currency}")

    def _payment(self, command: Command, amount: int, reply: dict[str, Any]) -> Outcome:
        result = reply.get("resultCode")
        psp = reply.get("pspReference")
        if result == "Authorised":
            if not isinstance(psp, str) or not _PSP.fullmatch(psp):
                raise _InvalidReply("pspReference is not a 16-character Adyen reference")
            if "amount" in reply:  # optional in the schema; checked when present
                self._check_amount(reply, command, amount)
            return Succeeded(psp, psp, command.amount_minor, command.currency)
        if result == "Refused":
            code = _safe(reply.get("refusalReasonCode"), "")
            return Declined(
                _REFUSALS.get(code, f"refused_{code}" if code else "refused"),
                _clip(str(reply.get("refusalReason") or "refused")),
            )
        if result == "Error":
            code = _safe(reply.get("refusalReasonCode"), "")
            return Declined(
                _REFUSALS.get(code, "adyen_error"),
                _clip(str(reply.get("refusalReason") or "Adyen answered Error")),
            )
        if result == "Cancelled":
            return Declined("cancelled", "Adyen answered Cancelled")
        if result in ("Pending", "Received"):
            return Ambiguous(
                AWAITING_CONFIRMATION,
                f"Adyen answered {result}: the outcome comes by AUTHORISATION webhook",
                psp if isinstance(psp, str) and _PSP.fullmatch(psp) else None,
            )
        if result in _SHOPPER_ACTION:
            return Invalid(
                "shopper_action_required",
                f"Adyen answered {result}: the payment needs the shopper, which a relay "
                "cannot involve; use a stored payment method that needs no authentication",
            )
        if result == "PartiallyAuthorised":
            return Ambiguous(
                "partially_authorised",
                "Adyen authorised part of the amount; an operator decides (cancel it or "
                "accept the partial amount)",
                psp if isinstance(psp, str) and _PSP.fullmatch(psp) else None,
            )
        raise _InvalidReply(f"resultCode {str(result)[:40]!r} is not one Adyen documents")

    def _modification(
        self, command: Command, amount: int, status: int, reply: dict[str, Any]
    ) -> Outcome:
        if status != 201 or reply.get("status") != "received":
            raise _InvalidReply(f"HTTP {status}, status {str(reply.get('status'))[:20]!r}")
        psp = reply.get("pspReference")
        if not isinstance(psp, str) or not _PSP.fullmatch(psp):
            raise _InvalidReply("pspReference is not a 16-character Adyen reference")
        if reply.get("paymentPspReference") != command.payment_reference:
            raise _InvalidReply("paymentPspReference names another payment")
        if command.action is not Action.VOID:
            self._check_amount(reply, command, amount)
        return Ambiguous(
            AWAITING_CONFIRMATION,
            f"Adyen received the {command.action} as {psp}; its outcome comes by webhook "
            "(not final until then)",
            psp,
        )

    # -- lookup --------------------------------------------------------------------------

    async def lookup(self, command: Command) -> Outcome:
        return Ambiguous(
            "lookup_unavailable",
            "Adyen's Checkout API offers no lookup of a payment or modification; the "
            "outcome is settled by webhook or the settlement report",
        )
