"""Stripe exceptions onto the five outcome classes (pure, no I/O).

Every exception here is built the way stripe-python 16 builds it from an HTTP reply
(``_APIRequestor.specific_v1_api_error``: which class for which status, which positional
arguments) or from a transport failure (``AIOHTTPClient._handle_request_error``: an
``APIConnectionError`` raised *from* the aiohttp error, built here as aiohttp builds it),
so the mapping is tested against what the adapter really receives, not against hand-made
look-alikes.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import ssl
from typing import Any

import aiohttp
import pytest
import stripe
from aiohttp.client_reqrep import ConnectionKey
from multidict import CIMultiDict, CIMultiDictProxy

from provider_adapters.base import (
    Action,
    Ambiguous,
    Command,
    Declined,
    Invalid,
    Outcome,
    ProviderAdapter,
    Retryable,
    Succeeded,
)
from provider_adapters.memory import MemoryProvider
from provider_adapters.stripe import StripeAdapter
from provider_adapters.stripe_errors import (
    classify_connection_error,
    classify_stripe_error,
    retry_after_seconds,
)

# -- how the SDK builds its exceptions ---------------------------------------------------


def _body(error: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    resp = {"error": error}
    return json.dumps(resp), resp


def sdk_error(
    status: int, error: dict[str, Any], headers: dict[str, str] | None = None
) -> stripe.StripeError:
    """Mirror of stripe-python's ``specific_v1_api_error`` for a JSON error reply."""
    rbody, resp = _body(error)
    rheaders = headers or {}
    message, param, code = error.get("message"), error.get("param"), error.get("code")
    if status == 429 or (status == 400 and code == "rate_limit"):
        return stripe.RateLimitError(message, rbody, status, resp, rheaders)
    if status in (400, 404):
        if error.get("type") == "idempotency_error":
            return stripe.IdempotencyError(message, rbody, status, resp, rheaders)
        return stripe.InvalidRequestError(message, param, code, rbody, status, resp, rheaders)
    if status == 401:
        return stripe.AuthenticationError(message, rbody, status, resp, rheaders)
    if status == 402:
        return stripe.CardError(message, param, code, rbody, status, resp, rheaders)
    if status == 403:
        return stripe.PermissionError(message, rbody, status, resp, rheaders)
    return stripe.APIError(message, rbody, status, resp, rheaders)


def connection_error(cause: BaseException) -> stripe.APIConnectionError:
    """What ``AIOHTTPClient._handle_request_error`` raises: the aiohttp error is ``__cause__``."""
    try:
        raise stripe.APIConnectionError(
            "Unexpected error communicating with Stripe.", should_retry=True
        ) from cause
    except stripe.APIConnectionError as exc:
        return exc


def unparsable_reply(status: int) -> stripe.APIError:
    """What ``_interpret_response`` raises when a reply body is not JSON (note: the SDK
    passes the response headers in the ``json_body`` position)."""
    rbody = b'{"id": "pi_1", "amount": '
    return stripe.APIError(
        f"Invalid response body from API: {rbody!r} (HTTP response code was {status})",
        rbody,
        status,
        {"request-id": "req_1"},
    )


def test_sdk_error_mirror_matches_the_installed_sdk() -> None:
    """If a future SDK changes which class a status becomes, this mirror must follow."""
    from stripe._api_requestor import _APIRequestor

    requestor = _APIRequestor._global_instance()
    cases = [
        (400, {"type": "invalid_request_error", "code": "parameter_missing"}),
        (400, {"type": "idempotency_error", "message": "keys..."}),
        (401, {"type": "invalid_request_error", "message": "bad key"}),
        (402, {"type": "card_error", "code": "card_declined"}),
        (403, {"type": "invalid_request_error"}),
        (404, {"type": "invalid_request_error", "code": "resource_missing"}),
        (409, {"type": "invalid_request_error", "code": "idempotency_key_in_use"}),
        (429, {"type": "invalid_request_error", "code": "lock_timeout"}),
        (500, {"type": "api_error"}),
        (503, {"type": "api_error"}),
    ]
    for status, error in cases:
        rbody, resp = _body(error)
        real = requestor.specific_v1_api_error(rbody, status, resp, {}, error)
        mirror = sdk_error(status, error)
        assert type(real) is type(mirror), (status, error)
        assert (real.http_status, real.code, real.json_body) == (
            mirror.http_status,
            mirror.code,
            mirror.json_body,
        )


# -- the mapping, class by class ---------------------------------------------------------

DECLINE = {"type": "card_error", "code": "card_declined", "message": "Your card was declined."}

CASES: list[tuple[str, stripe.StripeError, Outcome]] = [
    (
        "card_error_generic_decline",
        sdk_error(402, {**DECLINE, "decline_code": "generic_decline"}),
        Declined("generic_decline", "Your card was declined."),
    ),
    (
        "card_error_insufficient_funds",
        sdk_error(
            402,
            {**DECLINE, "decline_code": "insufficient_funds", "message": "Insufficient funds."},
        ),
        Declined("insufficient_funds", "Insufficient funds."),
    ),
    (
        "card_error_without_decline_code_uses_code",
        sdk_error(
            402,
            {"type": "card_error", "code": "expired_card", "message": "Your card has expired."},
        ),
        Declined("expired_card", "Your card has expired."),
    ),
    (
        "card_error_without_any_code",
        sdk_error(402, {"type": "card_error", "message": "Declined."}),
        Declined("card_declined", "Declined."),
    ),
    (
        "rate_limit_429",
        sdk_error(
            429,
            {"type": "invalid_request_error", "code": "rate_limit", "message": "Too many"},
            {"Retry-After": "2"},
        ),
        Retryable("rate_limited", "Too many", 2.0),
    ),
    (
        "legacy_rate_limit_400",
        sdk_error(400, {"type": "invalid_request_error", "code": "rate_limit", "message": "Slow"}),
        Retryable("rate_limited", "Slow", None),
    ),
    (
        "idempotency_key_in_use_409",
        sdk_error(
            409,
            {
                "type": "invalid_request_error",
                "code": "idempotency_key_in_use",
                "message": "in progress",
            },
            {"Stripe-Should-Retry": "true"},
        ),
        Retryable("idempotency_key_in_use", "in progress", None),
    ),
    (
        "lock_timeout_429",
        sdk_error(
            429,
            {"type": "invalid_request_error", "code": "lock_timeout", "message": "locked"},
            {"Retry-After": "1"},
        ),
        Retryable("lock_timeout", "locked", 1.0),
    ),
    (
        "server_error_500_is_ambiguous",
        sdk_error(500, {"type": "api_error", "message": "unknown"}),
        Ambiguous("provider_error_5xx", "HTTP 500: unknown"),
    ),
    (
        "server_error_500_should_retry_false",
        sdk_error(
            500, {"type": "api_error", "message": "unknown"}, {"Stripe-Should-Retry": "false"}
        ),
        Ambiguous("provider_error_5xx", "HTTP 500: unknown"),
    ),
    (
        "service_unavailable_503_without_hint_is_ambiguous",
        sdk_error(503, {"type": "api_error", "message": "down"}),
        Ambiguous("provider_error_5xx", "HTTP 503: down"),
    ),
    (
        "invalid_request_400",
        sdk_error(
            400,
            {
                "type": "invalid_request_error",
                "code": "parameter_missing",
                "param": "amount",
                "message": "Missing required param: amount.",
            },
        ),
        Invalid("parameter_missing", "Missing required param: amount."),
    ),
    (
        "invalid_request_without_code",
        sdk_error(400, {"type": "invalid_request_error", "message": "Bad."}),
        Invalid("invalid_request", "Bad."),
    ),
    (
        "resource_missing_404",
        sdk_error(
            404,
            {
                "type": "invalid_request_error",
                "code": "resource_missing",
                "message": "No such payment_intent: 'pi_x'",
            },
        ),
        Invalid("resource_missing", "No such payment_intent: 'pi_x'"),
    ),
    (
        "authentication_401",
        sdk_error(401, {"type": "invalid_request_error", "message": "Invalid API Key"}),
        Invalid("authentication_failed", "the provider refused the API key (401)"),
    ),
    (
        "permission_403",
        sdk_error(403, {"type": "invalid_request_error", "message": "Not allowed."}),
        Invalid("permission_denied", "Not allowed."),
    ),
    (
        "idempotency_error_400",
        sdk_error(
            400, {"type": "idempotency_error", "message": "Keys can only be used with the same..."}
        ),
        Invalid("idempotency_error", "Keys can only be used with the same..."),
    ),
    (
        "unparsable_2xx_reply",
        unparsable_reply(200),
        Ambiguous("invalid_provider_reply", "the provider's reply was not valid JSON"),
    ),
]


@pytest.mark.parametrize(("exc", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_stripe_error_maps_to_outcome(exc: stripe.StripeError, expected: Outcome) -> None:
    assert classify_stripe_error(exc) == expected


def test_every_stripe_error_class_the_adapter_can_receive_is_covered() -> None:
    """A new case must not silently drop a class: each SDK class the v1 API raises is here."""
    covered = {type(exc) for _, exc, _ in CASES} | {stripe.APIConnectionError}
    assert covered >= {
        stripe.CardError,
        stripe.RateLimitError,
        stripe.APIError,
        stripe.InvalidRequestError,
        stripe.AuthenticationError,
        stripe.PermissionError,
        stripe.IdempotencyError,
        stripe.APIConnectionError,
    }


# -- transport failures: was anything sent? ----------------------------------------------

# As aiohttp's connector names the connection it could not open.
KEY = ConnectionKey("api.stripe.com", 443, True, True, None, None, None, None)

NOT_SENT: list[BaseException] = [
    aiohttp.ClientConnectorError(KEY, ConnectionRefusedError(111, "Connection refused")),
    aiohttp.ClientConnectorDNSError(KEY, socket.gaierror(-2, "Name or service not known")),
    aiohttp.ClientConnectorCertificateError(
        KEY, ssl.SSLCertVerificationError(1, "certificate verify failed")
    ),
    # The connect timeout, which also bounds the wait for a free connection in the pool.
    aiohttp.ConnectionTimeoutError("Connection timeout to host https://api.stripe.com"),
    aiohttp.InvalidURL("htp//api.stripe.com/v1/payment_intents"),
    aiohttp.NonHttpUrlClientError("htp://api.stripe.com/v1/payment_intents"),
]
MAYBE_SENT: list[BaseException] = [
    aiohttp.SocketTimeoutError("Timeout on reading data from socket"),
    aiohttp.ServerDisconnectedError(),
    aiohttp.ClientOSError(104, "Connection reset by peer"),
    aiohttp.ClientPayloadError("Response payload is not completed"),
    aiohttp.ClientConnectionResetError("Cannot write to closing transport"),
    ConnectionResetError(104, "Connection reset by peer"),
    TimeoutError(),
]


@pytest.mark.parametrize("cause", NOT_SENT, ids=lambda e: type(e).__name__)
def test_connection_failure_before_sending_is_retryable(cause: BaseException) -> None:
    for outcome in (
        classify_stripe_error(connection_error(cause)),  # through the SDK
        classify_connection_error(cause),  # a raw aiohttp error escaping the SDK
    ):
        assert isinstance(outcome, Retryable)
        assert outcome.code == "provider_unreachable"
        assert type(cause).__name__ in outcome.message


@pytest.mark.parametrize("cause", MAYBE_SENT, ids=lambda e: type(e).__name__)
def test_connection_failure_after_sending_is_ambiguous(cause: BaseException) -> None:
    for outcome in (
        classify_stripe_error(connection_error(cause)),
        classify_connection_error(cause),
    ):
        assert isinstance(outcome, Ambiguous)
        assert outcome.code == "provider_timeout"


def test_connection_error_without_cause_is_ambiguous() -> None:
    """Nothing says the request was not sent, so it may have been."""
    outcome = classify_stripe_error(stripe.APIConnectionError("network error"))
    assert isinstance(outcome, Ambiguous)
    assert outcome.code == "provider_timeout"


# -- Stripe-Should-Retry, both ways ------------------------------------------------------


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_should_retry_true_makes_a_server_error_retryable(status: int) -> None:
    exc = sdk_error(
        status,
        {"type": "api_error", "message": "temporarily unavailable"},
        {"Stripe-Should-Retry": "true", "Retry-After": "3"},
    )
    assert classify_stripe_error(exc) == Retryable(
        "provider_unavailable", "temporarily unavailable", 3.0
    )


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (429, {"type": "invalid_request_error", "code": "rate_limit"}),
        (409, {"type": "invalid_request_error", "code": "idempotency_key_in_use"}),
        (429, {"type": "invalid_request_error", "code": "lock_timeout"}),
        (503, {"type": "api_error"}),
    ],
    ids=["429", "409", "lock_timeout", "503"],
)
def test_should_retry_false_is_never_retryable(status: int, error: dict[str, Any]) -> None:
    retry = classify_stripe_error(sdk_error(status, error, {"Stripe-Should-Retry": "true"}))
    assert isinstance(retry, Retryable)  # the same reply, hint reversed, is retried
    outcome = classify_stripe_error(sdk_error(status, error, {"Stripe-Should-Retry": "false"}))
    assert not isinstance(outcome, Retryable)
    assert isinstance(outcome, Ambiguous)  # settled by lookup, never by a blind retry


@pytest.mark.parametrize("name", ["stripe-should-retry", "STRIPE-SHOULD-RETRY"])
def test_should_retry_header_name_is_case_insensitive(name: str) -> None:
    exc = sdk_error(503, {"type": "api_error"}, {name: "True"})
    assert isinstance(classify_stripe_error(exc), Retryable)


def test_should_retry_in_aiohttp_headers_as_the_sdk_passes_them() -> None:
    """The SDK hands the adapter aiohttp's headers (a case-insensitive multidict proxy)."""
    headers = CIMultiDictProxy(CIMultiDict({"stripe-should-retry": "true", "Retry-After": "7"}))
    exc = sdk_error(503, {"type": "api_error", "message": "down"}, headers)  # type: ignore[arg-type]
    assert classify_stripe_error(exc) == Retryable("provider_unavailable", "down", 7.0)


# -- Retry-After -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"Retry-After": "2"}, 2.0),
        ({"retry-after": "0.5"}, 0.5),
        ({"Retry-After": "0"}, 0.0),
        ({"Retry-After": "-1"}, None),
        ({"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}, None),
        ({}, None),
        (None, None),
    ],
)
def test_retry_after_seconds(headers: dict[str, str] | None, expected: float | None) -> None:
    assert retry_after_seconds(headers) == expected


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (429, {"type": "invalid_request_error", "code": "rate_limit"}),
        (409, {"type": "invalid_request_error", "code": "idempotency_key_in_use"}),
        (429, {"type": "invalid_request_error", "code": "lock_timeout"}),
    ],
    ids=["rate_limit", "key_in_use", "lock_timeout"],
)
def test_retry_after_is_carried_on_retryable(status: int, error: dict[str, Any]) -> None:
    outcome = classify_stripe_error(sdk_error(status, error, {"Retry-After": "11"}))
    assert isinstance(outcome, Retryable)
    assert outcome.retry_after_seconds == 11.0


# -- messages ----------------------------------------------------------------------------


def test_authentication_message_never_echoes_the_key() -> None:
    key = "sk_live_51Habcdefghijklmnop"
    exc = sdk_error(
        401, {"type": "invalid_request_error", "message": f"Invalid API Key provided: {key}"}
    )
    outcome = classify_stripe_error(exc)
    assert isinstance(outcome, Invalid)
    assert key not in outcome.message


def test_long_messages_are_clipped() -> None:
    exc = sdk_error(400, {"type": "invalid_request_error", "message": "x" * 5000})
    outcome = classify_stripe_error(exc)
    assert isinstance(outcome, Invalid)
    assert len(outcome.message) == 300


def test_message_falls_back_when_the_body_has_none() -> None:
    exc = sdk_error(402, {"type": "card_error", "code": "card_declined"})
    assert classify_stripe_error(exc) == Declined("card_declined", "the card was declined")


# -- the outcome classes themselves ------------------------------------------------------


@pytest.mark.parametrize(
    "outcome",
    [
        Succeeded("pi_1", "pi_1", 100, "EUR"),
        Declined("card_declined", "no"),
        Retryable("rate_limited", "slow down", 1.0),
        Ambiguous("provider_timeout", "?"),
        Invalid("invalid_request", "bad"),
    ],
    ids=lambda o: type(o).__name__,
)
def test_outcomes_are_immutable_values(outcome: Outcome) -> None:
    # Outcomes are handed between tasks and compared in tests: they must not change.
    field = dataclasses.fields(outcome)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(outcome, field, "changed")
    assert outcome == dataclasses.replace(outcome)
    assert hash(outcome) == hash(dataclasses.replace(outcome))


def test_outcome_defaults() -> None:
    assert Succeeded("re_1", "pi_1", 5, "EUR").replayed is False
    assert Retryable("x", "y").retry_after_seconds is None
    command = Command(1, "p", Action.CAPTURE, "k", 100, "EUR")
    assert (command.payment_method, command.payment_reference, command.attempt) == (
        None,
        None,
        1,
    )
    assert command.traceparent is None


def test_action_values_match_the_sql_api() -> None:
    assert [a.value for a in Action] == ["authorize", "capture", "charge", "void", "refund"]
    assert Action("refund") is Action.REFUND


@pytest.mark.anyio
async def test_both_adapters_satisfy_the_protocol() -> None:
    adapter = StripeAdapter(name="stripe", api_key="sk_test_x", base_url="http://127.0.0.1:9")
    try:
        assert isinstance(adapter, ProviderAdapter)
    finally:
        await adapter.aclose()  # no request was made: no session was opened
    assert isinstance(MemoryProvider(), ProviderAdapter)
