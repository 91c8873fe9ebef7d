"""Stripe exceptions onto the five outcome classes. Pure logic, no I/O.

==========================================  ============================================
Stripe says                                 outcome
==========================================  ============================================
CardError (402)                             Declined(decline_code or code)
RateLimitError (429)                        Retryable(rate_limited, Retry-After honoured)
409 idempotency_key_in_use                  Retryable(idempotency_key_in_use)
lock_timeout                                Retryable(lock_timeout)
APIConnectionError before sending           Retryable(provider_unreachable)
APIConnectionError after sending            Ambiguous(provider_timeout)
5xx                                         Ambiguous(provider_error_5xx), settled by lookup
5xx with Stripe-Should-Retry: true          Retryable(provider_unavailable)
InvalidRequestError (400/404)               Invalid(invalid_request / resource_missing...)
AuthenticationError (401)                   Invalid(authentication_failed)
PermissionError (403)                       Invalid(permission_denied)
IdempotencyError                            Invalid(idempotency_error)
a reply that is not valid JSON              Ambiguous(invalid_provider_reply)
==========================================  ============================================

``Stripe-Should-Retry: false`` never yields Retryable. Messages never carry the API key.
This is the reading of the reply's shape; the relay acts on the class of the code's row in
the error catalogue (provider_adapters/error_catalogue.py, applied by the lane), which may
differ for a code that is not ambiguous.
"""

from __future__ import annotations

import re
from typing import Any

import aiohttp
import stripe

from provider_adapters.base import Ambiguous, Declined, Invalid, Outcome, Retryable

__all__ = ["classify_connection_error", "classify_stripe_error", "retry_after_seconds", "safe_code"]

# A provider's error or decline code becomes the intent's error_code and a metric label:
# only a short snake_case word is taken as it is (never a card number, a newline or 1 MB).
_CODE = re.compile(r"[a-z][a-z0-9_]{0,63}")

# aiohttp errors raised before any byte of the request could reach the provider: no
# connection (refused, DNS, TLS handshake: ClientConnectorError and its subclasses), no
# connection within the connect timeout (which also bounds the wait for a free pooled
# connection), or a URL that cannot be requested. A reset, a disconnect or a read timeout
# on an open connection may follow a request the provider applied: ambiguous.
_NOT_SENT: tuple[type[BaseException], ...] = (
    aiohttp.ClientConnectorError,
    aiohttp.ConnectionTimeoutError,
    aiohttp.InvalidURL,
    aiohttp.NonHttpUrlClientError,
)


def _header(headers: Any, name: str) -> str | None:
    if not headers:
        return None
    for key, value in dict(headers).items():
        if str(key).lower() == name.lower():
            return str(value)
    return None


def retry_after_seconds(headers: Any) -> float | None:
    raw = _header(headers, "Retry-After")
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        return None
    return value if value >= 0 else None


def _error_body(exc: stripe.StripeError) -> dict[str, Any]:
    body = exc.json_body
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        error: dict[str, Any] = body["error"]
        return error
    return {}


def _message(exc: stripe.StripeError, fallback: str) -> str:
    text = str(_error_body(exc).get("message") or getattr(exc, "user_message", None) or fallback)
    return text[:300]


def safe_code(value: Any, fallback: str) -> str:
    """``value`` when it is a plausible provider code (snake_case, at most 64 characters),
    else ``fallback``: the provider's reply is data, not trusted text."""
    return value if isinstance(value, str) and _CODE.fullmatch(value) else fallback


def classify_connection_error(exc: BaseException) -> Outcome:
    """A transport failure: retryable only if nothing can have been sent."""
    cause = exc.__cause__ if isinstance(exc, stripe.APIConnectionError) else exc
    name = type(cause).__name__ if cause is not None else type(exc).__name__
    if isinstance(cause, _NOT_SENT):
        return Retryable("provider_unreachable", f"could not connect to the provider ({name})")
    return Ambiguous(
        "provider_timeout",
        f"the request may have reached the provider but no reply came ({name})",
    )


def classify_stripe_error(exc: stripe.StripeError) -> Outcome:
    outcome = _classify(exc)
    if isinstance(outcome, Retryable) and (
        (_header(exc.headers, "Stripe-Should-Retry") or "").lower() == "false"
    ):
        return Ambiguous(outcome.code, outcome.message + " (provider said not to retry)")
    return outcome


def _classify(exc: stripe.StripeError) -> Outcome:
    status = exc.http_status or 0
    error = _error_body(exc)
    code = str(error.get("code") or exc.code or "")
    should_retry = (_header(exc.headers, "Stripe-Should-Retry") or "").lower()

    if isinstance(exc, stripe.APIConnectionError):
        return classify_connection_error(exc)
    if isinstance(exc, stripe.CardError):
        decline = safe_code(error.get("decline_code") or code, "card_declined")
        return Declined(decline, _message(exc, "the card was declined"))
    # Stripe sends lock_timeout as a 429, which the SDK raises as RateLimitError: check the
    # code first so the documented Retryable(lock_timeout) is what the relay records.
    if code == "lock_timeout":
        return Retryable(
            "lock_timeout", _message(exc, "lock timeout"), retry_after_seconds(exc.headers)
        )
    if isinstance(exc, stripe.RateLimitError) or status == 429:
        return Retryable(
            "rate_limited", _message(exc, "rate limited"), retry_after_seconds(exc.headers)
        )
    if isinstance(exc, stripe.IdempotencyError) or error.get("type") == "idempotency_error":
        return Invalid("idempotency_error", _message(exc, "idempotency key reused"))
    if status == 409 or code == "idempotency_key_in_use":
        return Retryable(
            "idempotency_key_in_use", _message(exc, "key in use"), retry_after_seconds(exc.headers)
        )
    if isinstance(exc, stripe.AuthenticationError) or status == 401:
        return Invalid("authentication_failed", "the provider refused the API key (401)")
    if isinstance(exc, stripe.PermissionError) or status == 403:
        return Invalid("permission_denied", _message(exc, "permission denied (403)"))
    if isinstance(exc, stripe.InvalidRequestError) or status in (400, 404):
        return Invalid(safe_code(code, "invalid_request"), _message(exc, "invalid request"))
    if status >= 500:
        if should_retry == "true":
            return Retryable(
                "provider_unavailable",
                _message(exc, f"HTTP {status}"),
                retry_after_seconds(exc.headers),
            )
        return Ambiguous("provider_error_5xx", f"HTTP {status}: {_message(exc, 'server error')}")
    if isinstance(exc, stripe.APIError) and 200 <= status < 300:
        return Ambiguous("invalid_provider_reply", "the provider's reply was not valid JSON")
    return Ambiguous("provider_error", f"HTTP {status}: {_message(exc, type(exc).__name__)}")
