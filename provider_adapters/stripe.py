"""The Stripe adapter, on the official SDK's async API over the lane's own aiohttp session.

The SDK's own network retries are off: the relay owns retries, so every attempt is one
request carrying the intent's idempotency key. Replies are validated (object, id, amount,
currency, status) before :class:`Succeeded` is returned; anything else is ambiguous and
the relay settles it with :meth:`StripeAdapter.lookup`. No exception leaves this module.

The API version is pinned here, not left to the SDK: every request carries
``Stripe-Version: <api_version>`` (:data:`DEFAULT_API_VERSION`, the version this adapter and
the fake were tested with, unless configured), set once on the client
(``StripeClient(stripe_version=...)``, which the SDK's requestor sends as the header on every
call). Upgrading the ``stripe`` package therefore never changes the version the relay
speaks; a version outside :data:`TESTED_API_VERSIONS` is refused
(:class:`~provider_adapters.base.UntestedApiVersion`) unless explicitly allowed.

Amounts cross this boundary in ISO 4217 minor units and are sent in Stripe's units
(:data:`~provider_adapters.currency_units.STRIPE_UNITS`: ISK x100, MGA /100, three-decimal
amounts ending in 0); a command Stripe cannot represent is refused before any request.
"""

from __future__ import annotations

import math
import re
from collections.abc import AsyncIterator, Mapping
from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from urllib.parse import quote_plus

import aiohttp
import stripe

from provider_adapters.base import (
    AWAITING_CONFIRMATION,
    Action,
    Ambiguous,
    BalanceTransaction,
    Command,
    Declined,
    Invalid,
    Outcome,
    Retryable,
    SettlementUnavailable,
    Succeeded,
    UntestedApiVersion,
)
from provider_adapters.currency_units import STRIPE_UNITS, AmountNotRepresentable
from provider_adapters.stripe_errors import (
    classify_connection_error,
    classify_stripe_error,
    safe_code,
)
from provider_adapters.stripe_http import LaneSession

__all__ = [
    "DEFAULT_API_VERSION",
    "IDEMPOTENCY_KEY_LIFETIME_SECONDS",
    "TESTED_API_VERSIONS",
    "StripeAdapter",
    "payment_intent_outcome",
    "verified_outcome",
]

# The Stripe-Version this adapter and its fake were tested with (the pin of the SDK the
# tests ran, stripe 16.1.0). A new version joins TESTED_API_VERSIONS only after the
# contract suite and the fault campaign passed against it (README "Moving to a new
# provider API version").
DEFAULT_API_VERSION = "2026-10-28.endive"
TESTED_API_VERSIONS = (DEFAULT_API_VERSION,)
# Stripe keeps an idempotency key (and replays its first answer) for at least 24 hours.
IDEMPOTENCY_KEY_LIFETIME_SECONDS = 24 * 3600

_KEY_FIELD = "outbox_idempotency_key"
_EXPECTED_STATUS = {
    Action.AUTHORIZE: {"requires_capture"},
    Action.CHARGE: {"succeeded"},
    Action.CAPTURE: {"succeeded"},
    Action.VOID: {"canceled"},
    Action.REFUND: {"succeeded", "pending"},
}


# A Stripe object id: a prefix and a random base-62 tail. It is stored (provider_reference)
# and published, so nothing else is taken: no separators, no control characters, no
# megabyte ids, and no card-like run (13 to 19 digits passing Luhn; never part of an id).
_OBJECT_ID = re.compile(r"[a-z]{2,4}_[A-Za-z0-9_]{1,250}")
_DIGIT_RUN = re.compile(r"[0-9]{13,}")


def _luhn(digits: str) -> bool:
    total = 0
    for position, char in enumerate(reversed(digits)):
        d = int(char) * (2 if position % 2 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


def _object_id(value: Any, prefix: str) -> bool:
    return (
        isinstance(value, str)
        and value.startswith(prefix)
        and _OBJECT_ID.fullmatch(value) is not None
        and not any(len(run) <= 19 and _luhn(run) for run in _DIGIT_RUN.findall(value))
    )


class _InvalidReply(Exception):
    """The provider answered 2xx with something we cannot trust."""


def _search_string(value: str) -> str:
    """``value`` as a quoted string of Stripe's search query language: a backslash escapes
    a quote or a backslash inside the quotes. An application's key may hold either (any
    printable ASCII), and unescaped it ends the string early: the search then fails or
    matches something else, and an ambiguous outcome of that key is never settled."""
    escaped = value.replace("\\", "\\\\").replace("'", "\\'").replace('"', '\\"')
    return f"'{escaped}'"


def _field(obj: Any, name: str) -> Any:
    try:
        return obj[name]
    except (KeyError, TypeError, IndexError):
        return None


def _stripe_amount(command: Command) -> int:
    """The command's amount in Stripe's units; AmountNotRepresentable if it has none."""
    return STRIPE_UNITS.to_provider(command.amount_minor, command.currency, command.exponent)


def _int_field(obj: Any, name: str) -> int:
    value = _field(obj, name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _InvalidReply(f"{name} is {type(value).__name__}, expected an integer")
    return value


class _RawReply:
    """A ``raw_request`` reply read as the typed objects were: its JSON field by field, and
    its HTTP response as ``last_response`` (whose ``Idempotent-Replayed`` header says a
    replay)."""

    def __init__(self, response: Any) -> None:
        self.last_response = response
        self._data = response.data

    def __getitem__(self, name: str) -> Any:
        return self._data[name]


class _StatusAs:
    """``obj`` read field by field, its ``status`` shown as ``status`` (a pending refund is
    checked as a succeeded one would be: id, currency, amount)."""

    def __init__(self, obj: Any, status: str) -> None:
        self._obj, self._status = obj, status

    def __getitem__(self, name: str) -> Any:
        return self._status if name == "status" else self._obj[name]


def verified_outcome(command: Command, reply: Any) -> Outcome:
    # A refund Stripe has not finished (status pending) is accepted, not confirmed: it waits
    # for its charge.refund.updated like an Adyen modification for its webhook (issue 19);
    # a refund that failed or was canceled moved no money.
    if command.action is Action.REFUND and _field(reply, "object") == "refund":
        status, object_id = _field(reply, "status"), _field(reply, "id")
        if status in ("failed", "canceled") and _object_id(object_id, "re_"):
            reason = _field(reply, "failure_reason")
            return Declined(
                "refund_failed",
                f"Stripe reports refund {object_id} {status}"
                + (f" ({reason})" if isinstance(reason, str) else ""),
            )
        if status == "pending":
            verified = verified_outcome(command, _StatusAs(reply, "succeeded"))
            if isinstance(verified, Succeeded):
                return Ambiguous(
                    AWAITING_CONFIRMATION,
                    f"Stripe accepted refund {verified.provider_reference} as pending; its "
                    "outcome comes by charge.refund.updated (not final until then)",
                    verified.provider_reference,
                )
            return verified
    try:
        return _verify(command, reply)
    except _InvalidReply as exc:
        return Ambiguous("invalid_provider_reply", str(exc))
    except Exception as exc:  # a reply shaped beyond anything checked above
        return Ambiguous("invalid_provider_reply", f"unreadable reply ({type(exc).__name__})")


def _verify(command: Command, reply: Any) -> Succeeded:
    is_refund = command.action is Action.REFUND
    expected_object, prefix = ("refund", "re_") if is_refund else ("payment_intent", "pi_")
    if _field(reply, "object") != expected_object:
        raise _InvalidReply(f"object is {_field(reply, 'object')!r}, expected {expected_object}")
    object_id = _field(reply, "id")
    if not _object_id(object_id, prefix):
        raise _InvalidReply(f"id ({type(object_id).__name__}) is not a {expected_object} id")
    currency = _field(reply, "currency")
    if not isinstance(currency, str) or currency.upper() != command.currency.upper():
        raise _InvalidReply(f"currency {currency!r} differs from {command.currency}")
    status = _field(reply, "status")
    if not isinstance(status, str) or status not in _EXPECTED_STATUS[command.action]:
        raise _InvalidReply(f"status {status!r} is not what {command.action} leads to")
    amount_field = {
        Action.AUTHORIZE: "amount_capturable",
        Action.CHARGE: "amount_received",
        Action.CAPTURE: "amount_received",
        Action.VOID: "amount",
        Action.REFUND: "amount",
    }[command.action]
    # Compared in Stripe's units, the ones the request carried.
    try:
        expected = _stripe_amount(command)
    except AmountNotRepresentable as exc:
        raise _InvalidReply(str(exc)) from None
    amount = _int_field(reply, amount_field)
    if amount != expected:
        raise _InvalidReply(f"{amount_field} {amount} differs from {expected}")
    # The payment's own amount is what an authorize or charge asked for (and what a
    # void releases, checked above); only after a capture may it exceed the command's.
    total = _int_field(reply, "amount")
    if command.action in (Action.AUTHORIZE, Action.CHARGE) and total != expected:
        raise _InvalidReply(f"amount {total} differs from {expected}")
    payment_reference = _field(reply, "payment_intent") if is_refund else object_id
    if not _object_id(payment_reference, "pi_") or (
        is_refund and payment_reference != command.payment_reference
    ):
        raise _InvalidReply("the refund names no payment_intent, or another one")
    headers: Mapping[str, str] = getattr(getattr(reply, "last_response", None), "headers", {}) or {}
    replayed = str(headers.get("idempotent-replayed", headers.get("Idempotent-Replayed", "")))
    return Succeeded(
        provider_reference=object_id,
        payment_reference=payment_reference,
        amount_minor=command.amount_minor,
        currency=command.currency,
        replayed=replayed.lower() == "true",
    )


def payment_intent_outcome(command: Command, pi: Any) -> Outcome | None:
    """What a PaymentIntent shows about an authorize or charge ``command``: the effect
    (verified as a reply would be), a decline, or None (no outcome yet). The lookup and
    the webhook inbox read a PaymentIntent through this one function."""
    status = _field(pi, "status")
    if not isinstance(status, str):
        return None
    if status in _EXPECTED_STATUS[command.action] or (
        command.action is Action.AUTHORIZE
        and status in ("succeeded", "canceled")
        and _field(pi, "amount_capturable") == 0
        and status == "canceled"
    ):
        return verified_outcome(command, pi)
    error = _field(pi, "last_payment_error")
    if status == "requires_payment_method" and error:
        code = safe_code(_field(error, "decline_code") or _field(error, "code"), "card_declined")
        return Declined(code, str(_field(error, "message") or "declined")[:300])
    return None


class StripeAdapter:
    kind = "stripe"  # the error catalogue's provider column
    idempotency_key_lifetime_seconds = IDEMPOTENCY_KEY_LIFETIME_SECONDS

    def __init__(
        self,
        *,
        name: str,
        api_key: str,
        base_url: str = "https://api.stripe.com",
        connect_timeout_seconds: float = 3.0,
        read_timeout_seconds: float = 10.0,
        max_connections: int = 20,
        api_version: str = DEFAULT_API_VERSION,
        allow_untested_version: bool = False,
    ) -> None:
        if api_version not in TESTED_API_VERSIONS and not allow_untested_version:
            raise UntestedApiVersion(
                f"Stripe API version {api_version!r} was not tested with this adapter "
                f"(tested: {', '.join(TESTED_API_VERSIONS)}); set the provider's "
                "allow_untested_api_version to start anyway"
            )
        self.name = name
        self.api_version = api_version
        self.untested_version = api_version not in TESTED_API_VERSIONS
        self._api_key = api_key
        self._base_url = base_url
        # The lane's own connections, sized to its concurrency (bulkhead), opened on the
        # first call in the running loop (stripe_http.py says why).
        self._session = LaneSession(
            max_connections=max_connections,
            connect_timeout_seconds=connect_timeout_seconds,
            read_timeout_seconds=read_timeout_seconds,
        )
        self._sdk: stripe.StripeClient | None = None

    @property
    def _client(self) -> stripe.StripeClient:
        """The SDK on the lane's session, built at the first call (in the running loop)."""
        sdk = self._sdk
        if sdk is None:
            sdk = self._sdk = stripe.StripeClient(
                self._api_key,
                # Sent as Stripe-Version on every request this client makes.
                stripe_version=self.api_version,
                base_addresses={"api": self._base_url},
                http_client=self._session.http_client(),
                max_network_retries=0,
            )
        return sdk

    async def aclose(self) -> None:
        """Close the lane's connections; awaited by the lane's owner, in its own task."""
        self._sdk = None
        await self._session.aclose()

    # -- execute -------------------------------------------------------------------------

    def _options(self, command: Command) -> dict[str, Any]:
        options: dict[str, Any] = {"idempotency_key": command.idempotency_key}
        options.update(self._trace_options(command))
        return options

    @staticmethod
    def _trace_options(command: Command) -> dict[str, Any]:
        """The intent's trace context as a header, for calls and lookups alike (a lookup
        settles the same intent, so it belongs to the same trace)."""
        return {"headers": {"traceparent": command.traceparent}} if command.traceparent else {}

    def _metadata(self, command: Command) -> dict[str, str]:
        return {
            _KEY_FIELD: command.idempotency_key,
            "outbox_payment_id": command.payment_id[:500],
            "outbox_intent_id": str(command.intent_id),
        }

    async def execute(self, command: Command) -> Outcome:
        # The SDK's raw_request: its request (form encoding, auth, Stripe-Version, the
        # idempotency key and our headers as options) and its error handling (an error
        # reply raises the same StripeError subclasses) as the typed services, without
        # building StripeObjects from the reply: a sixth of the relay's CPU per call over
        # HTTP (docs/performance.md). The reply is read as the SDK parsed it, field by
        # field (_field), as the typed objects were.
        client = self._client
        options: Any = self._options(command)
        try:
            amount = _stripe_amount(command)
        except AmountNotRepresentable as exc:
            # Our data, not the provider's answer: refused before any request, so the
            # intent goes dead at once with the reason and nothing happened at Stripe.
            return Invalid(exc.code, str(exc))
        params: dict[str, Any]
        if command.action in (Action.AUTHORIZE, Action.CHARGE):
            path = "/v1/payment_intents"
            params = {
                "amount": amount,
                "currency": command.currency.lower(),
                "payment_method": command.payment_method or "",
                "confirm": True,
                "capture_method": "manual" if command.action is Action.AUTHORIZE else "automatic",
                "metadata": self._metadata(command),
                "automatic_payment_methods": {"enabled": True, "allow_redirects": "never"},
            }
        elif command.payment_reference is None:
            return Ambiguous(
                "missing_payment_reference",
                f"{command.action} needs the payment's provider reference",
            )
        elif command.action is Action.CAPTURE:
            path = f"/v1/payment_intents/{quote_plus(command.payment_reference)}/capture"
            params = {"amount_to_capture": amount}
        elif command.action is Action.VOID:
            path = f"/v1/payment_intents/{quote_plus(command.payment_reference)}/cancel"
            params = {}
        else:
            path = "/v1/refunds"
            params = {
                "payment_intent": command.payment_reference,
                "amount": amount,
                "metadata": self._metadata(command),
            }
        try:
            reply = _RawReply(await client.raw_request_async("post", path, **params, **options))
        except stripe.StripeError as exc:
            return classify_stripe_error(exc)
        except (aiohttp.ClientError, OSError) as exc:
            return classify_connection_error(exc)
        except Exception as exc:  # never let a provider surprise cross the boundary
            return Ambiguous("invalid_provider_reply", f"unexpected {type(exc).__name__}")
        return verified_outcome(command, reply)

    # -- lookup --------------------------------------------------------------------------

    async def lookup(self, command: Command) -> Outcome:
        try:
            return await self._lookup(command)
        except stripe.StripeError as exc:
            outcome = classify_stripe_error(exc)
            code = getattr(outcome, "code", type(exc).__name__)
            return Ambiguous("lookup_failed", f"lookup failed: {code}")
        except Exception as exc:
            return Ambiguous("lookup_failed", f"lookup failed: {type(exc).__name__}")

    async def _lookup(self, command: Command) -> Outcome:
        v1 = self._client.v1
        not_found = Retryable("not_found", "the provider shows no effect of this key")
        trace: Any = self._trace_options(command)
        try:
            _stripe_amount(command)
        except AmountNotRepresentable as exc:
            # execute() refuses such a command before any request: nothing was sent under
            # this key, so there is nothing to find (and a capture's PaymentIntent found
            # by reference would belong to another command).
            return Retryable("not_found", f"never sent: {exc}")
        if command.action in (Action.AUTHORIZE, Action.CHARGE):
            query = f"metadata['{_KEY_FIELD}']:{_search_string(command.idempotency_key)}"
            result: Any = await v1.payment_intents.search_async({"query": query}, trace)
            for pi in _field(result, "data") or []:
                found = payment_intent_outcome(command, pi)
                if found is not None:
                    return found
            return not_found
        if command.payment_reference is None:
            return Ambiguous("missing_payment_reference", "no payment reference to look up")
        if command.action is Action.REFUND:
            refunds: Any = await v1.refunds.list_async(
                {"payment_intent": command.payment_reference, "limit": 100}, trace
            )
            for refund in _field(refunds, "data") or []:
                if _field(_field(refund, "metadata"), _KEY_FIELD) == command.idempotency_key:
                    return verified_outcome(command, refund)
            return not_found
        pi = await v1.payment_intents.retrieve_async(command.payment_reference, None, trace)
        status = _field(pi, "status")
        if status in _EXPECTED_STATUS[command.action]:
            return verified_outcome(command, pi)
        return not_found

    # -- settlement (reconciliation) -----------------------------------------------------

    async def balance_transactions(
        self,
        since: datetime,
        until: datetime,
        *,
        exponents: Mapping[str, int] | None = None,
        page_size: int = 100,
    ) -> AsyncIterator[BalanceTransaction]:
        """Every balance transaction created in [since, until], newest first, 100 a page,
        each with its source expanded so a charge names its PaymentIntent.

        Amounts are converted to ISO 4217 minor units with ``exponents`` (code -> exponent,
        from outbox.currencies); without them, a currency Stripe counts differently from
        ISO (ISK, MGA) cannot be converted and the listing fails."""
        v1 = self._client.v1
        params: Any = {
            "created": {"gte": math.floor(since.timestamp()), "lte": math.ceil(until.timestamp())},
            "limit": page_size,
            "expand": ["data.source"],
        }
        while True:
            try:
                page: Any = await v1.balance_transactions.list_async(params)
            except (stripe.StripeError, aiohttp.ClientError, OSError) as exc:
                raise SettlementUnavailable(
                    f"listing balance transactions failed: {type(exc).__name__}"
                ) from None
            data = _field(page, "data") or []
            for txn in data:
                yield _in_iso_units(_balance_transaction(txn), exponents or {})
            if not _field(page, "has_more") or not data:
                return
            params = {**params, "starting_after": _field(data[-1], "id")}


def _in_iso_units(txn: BalanceTransaction, exponents: Mapping[str, int]) -> BalanceTransaction:
    """A balance transaction's amounts, from Stripe's units into ISO minor units."""
    exponent = exponents.get(txn.currency)
    try:
        return replace(
            txn,
            amount_minor=STRIPE_UNITS.from_provider(txn.amount_minor, txn.currency, exponent),
            fee_minor=STRIPE_UNITS.from_provider(txn.fee_minor, txn.currency, exponent),
            net_minor=STRIPE_UNITS.from_provider(txn.net_minor, txn.currency, exponent),
        )
    except AmountNotRepresentable as exc:
        raise SettlementUnavailable(f"balance transaction {txn.id!r}: {exc}") from None


def _balance_transaction(txn: Any) -> BalanceTransaction:
    source = _field(txn, "source")
    source_id: str | None
    source_status: str | None = None
    if isinstance(source, str) or source is None:
        source_id = source
    else:
        source_status = _field(source, "status")
        # A charge is known to the relay by its PaymentIntent; anything else by its own id.
        source_id = (
            _field(source, "payment_intent") if _field(source, "object") == "charge" else None
        ) or _field(source, "id")
    currency = _field(txn, "currency")
    try:
        return BalanceTransaction(
            id=str(_field(txn, "id")),
            type=str(_field(txn, "type")),
            amount_minor=_int_field(txn, "amount"),
            fee_minor=_int_field(txn, "fee"),
            net_minor=_int_field(txn, "net"),
            currency=currency.upper() if isinstance(currency, str) else "",
            source_id=source_id if isinstance(source_id, str) else None,
            source_status=source_status if isinstance(source_status, str) else None,
            created=datetime.fromtimestamp(_int_field(txn, "created"), UTC),
            exchange_rate=_exchange_rate(txn),
        )
    except _InvalidReply as exc:
        raise SettlementUnavailable(f"balance transaction {_field(txn, 'id')!r}: {exc}") from None


def _exchange_rate(txn: Any) -> Decimal | None:
    """The balance transaction's ``exchange_rate``, exact.

    Stripe sends a JSON number and the SDK hands it over as a float; its shortest repr
    is the decimal the JSON carried (a rate has far fewer than 15 significant digits),
    so the float goes no further than this line."""
    value = _field(txn, "exchange_rate")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise _InvalidReply(f"exchange_rate is {type(value).__name__}, not a number")
    try:
        rate = Decimal(repr(value) if not isinstance(value, str) else value)
    except ArithmeticError:
        raise _InvalidReply(f"exchange_rate {value!r} is not a number") from None
    if not rate.is_finite() or rate <= 0:
        raise _InvalidReply(f"exchange_rate {value!r} is not a positive number")
    return rate
