"""A fake Adyen Checkout API (v71 paths): payments, captures, cancels, refunds, reversals.

What it reproduces, from ../shared/PROVIDERS.md and Adyen's published OpenAPI file
(CheckoutService-v71.json; tests/test_adyen_fake.py checks the bodies against the fields
and enums copied from it):

* ``POST /v{N}/payments`` answers 200 with a ``resultCode``; a refusal is 200 with
  ``Refused``, ``refusalReason`` and ``refusalReasonCode`` (test cards in :data:`CARDS`).
  ``captureDelayHours: 0`` captures at once (the relay's charge).
* modifications answer **201** with ``status: "received"`` and their own ``pspReference``;
  the outcome is decided later and sent as a signed webhook (CAPTURE, CAPTURE_FAILED,
  CANCELLATION, REFUND, REFUND_FAILED) when ``webhook_url`` is set. A capture above what
  is left of the authorisation, or a refund above what is captured, is accepted too and
  fails by webhook (no effect), as Adyen's asynchronous modifications do.
* ``Idempotency-Key`` (at most 64 characters, else 422): the first final answer is kept
  for 31 days of fake time and replayed; a second request while the first still runs gets
  422 errorCode 704 ("request already processed or in progress"). A reused key with a
  different body replays by default; ``mismatch_error`` makes it a 422 instead (what Adyen
  does there is unconfirmed).
* faults: 429 and 503 before any effect (not stored), 500 after the effect (stored and
  replayed), a reply lost after the effect (the connection is closed), a malformed 200/201
  body after the effect; ``X-API-Key`` must match, else 401.
* ``GET /_fake/effects``: effects applied per idempotency key (an authorisation placed, a
  capture, a charge, a refund, a cancellation); ``POST /_fake/config`` changes faults;
  ``POST /_fake/advance`` moves the fake clock (``{"days": 32}``) past the replay window;
  ``GET /_fake/webhooks`` lists the notifications sent or due (each delivered until a 2xx);
  ``POST /_fake/webhooks/resend`` delivers some again (late, repeated);
  ``POST /_fake/dashboard`` makes what happens outside the API: a chargeback, its
  reversal, an expiry, a technical cancel, or a CAPTURE_FAILED / REFUND_FAILED of an
  earlier successful modification. ``luhn_psp`` makes every pspReference 16 digits that
  pass the Luhn check.

No effect is applied for a refusal, an error or a replay.
"""

from __future__ import annotations

import asyncio
import json
import random
import secrets
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import aiohttp
from aiohttp import web

from provider_adapters.adyen_webhooks import sign_item

__all__ = [
    "API_KEY",
    "CARDS",
    "HMAC_KEY_HEX",
    "MERCHANT_ACCOUNT",
    "AdyenFaults",
    "create_adyen_app",
]

API_KEY = "AQE_test_outbox_relay"
MERCHANT_ACCOUNT = "OutboxRelayTest"
HMAC_KEY_HEX = "44782DEF547AAA06C910C43932B1EB0C71FC68D9D0C057550C48EC2ACF6BA056"
REPLAY_DAYS = 31
MAX_KEY_LENGTH = 64

# storedPaymentMethodId -> (resultCode, refusalReason, refusalReasonCode). Adyen's test
# refusal reasons (docs.adyen.com/development-resources/refusal-reasons); the Stripe-style
# names let the shared contract suite drive both fakes with the same commands.
CARDS: dict[str, tuple[str, str, str]] = {
    "pm_card_chargeDeclined": ("Refused", "Refused", "2"),
    "adyen_refused": ("Refused", "Refused", "2"),
    "adyen_blocked": ("Refused", "Blocked Card", "5"),
    "adyen_expired": ("Refused", "Expired Card", "6"),
    "pm_card_chargeDeclinedInsufficientFunds": ("Refused", "Not enough balance", "12"),
    "adyen_not_enough_balance": ("Refused", "Not enough balance", "12"),
    "adyen_fraud": ("Refused", "FRAUD", "20"),
    "adyen_cvc_declined": ("Refused", "CVC Declined", "24"),
    # A refusal the error catalogue classes as invalid (our amount), not as a decline.
    "adyen_invalid_amount": ("Refused", "Invalid Amount", "7"),
    "adyen_error": ("Error", "Acquirer Error", "4"),
    "adyen_pending": ("Pending", "", ""),
    "adyen_redirect": ("RedirectShopper", "", ""),
}


@dataclass
class AdyenFaults:
    """Fault rates (0..1), the webhook target and its switches; all replaceable at run time."""

    seed: int | None = None
    rate_429: float = 0.0
    rate_503: float = 0.0
    rate_500_after_effect: float = 0.0
    rate_drop_after_effect: float = 0.0  # the connection closes: a timeout after effect
    rate_malformed_after_effect: float = 0.0
    latency_ms: int = 0
    mismatch_error: bool = False
    webhook_url: str | None = None
    webhook_delay_ms: int = 0
    webhook_duplicate: bool = False
    webhook_reorder: bool = False
    # Every pspReference all digits and passing the Luhn check, as about one in ten real
    # ones do (the inbox must neither refuse nor redact them).
    luhn_psp: bool = False
    hmac_key_hex: str = HMAC_KEY_HEX

    def replace(self, changes: dict[str, Any]) -> AdyenFaults:
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"unknown fault settings {unknown}; known: {sorted(known)}")
        return AdyenFaults(**{**asdict(self), **changes})


@dataclass
class _Payment:
    psp: str
    currency: str
    authorised: int
    captured: int = 0
    refunded: int = 0
    cancelled: bool = False
    reference: str = ""


@dataclass
class _Stored:
    status: int
    body: dict[str, Any]
    at_days: float


@dataclass
class _State:
    faults: AdyenFaults
    rng: random.Random
    days: float = 0.0
    payments: dict[str, _Payment] = field(default_factory=dict)
    stored: dict[str, _Stored] = field(default_factory=dict)
    bodies: dict[str, str] = field(default_factory=dict)
    running: set[str] = field(default_factory=set)
    effects: Counter[str] = field(default_factory=Counter)
    webhooks: list[dict[str, Any]] = field(default_factory=list)
    requests: Counter[str] = field(default_factory=Counter)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    # One client for every delivery (a session per POST cost a connection each and slowed
    # the fake's own API answers), and a bound on deliveries at once, as Adyen's queue has.
    session: aiohttp.ClientSession | None = None
    deliveries: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(8))


def _psp() -> str:
    # 16 characters, as Adyen's; digits and capitals like the real ones.
    return "".join(secrets.choice("0123456789ABCDEFGHJKLMNPQRSTUVWXYZ") for _ in range(16))


def luhn_valid(digits: str) -> bool:
    total = 0
    for position, char in enumerate(reversed(digits)):
        d = int(char)
        if position % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def luhn_psp() -> str:
    """16 digits whose Luhn checksum holds: a card number to the card rule."""
    body = "".join(secrets.choice("0123456789") for _ in range(15))
    return next(body + c for c in "0123456789" if luhn_valid(body + c))


def _error(status: int, code: str, message: str, error_type: str) -> web.Response:
    body = {
        "status": status,
        "errorCode": code,
        "message": message,
        "errorType": error_type,
        "pspReference": _psp(),
    }
    return web.json_response(body, status=status)


def _money(body: dict[str, Any]) -> tuple[int, str] | web.Response:
    amount = body.get("amount")
    value = amount.get("value") if isinstance(amount, dict) else None
    currency = amount.get("currency") if isinstance(amount, dict) else None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return _error(422, "137", "Invalid amount specified", "validation")
    if not isinstance(currency, str) or len(currency) != 3:
        return _error(422, "138", "Invalid currency specified", "validation")
    return value, currency


def create_adyen_app(faults: AdyenFaults | None = None) -> web.Application:
    config = faults or AdyenFaults()
    state = _State(config, random.Random(config.seed))
    app = web.Application()

    def roll(rate: float) -> bool:
        return rate > 0 and state.rng.random() < rate

    def new_psp() -> str:
        return luhn_psp() if state.faults.luhn_psp else _psp()

    def notify(item: dict[str, Any]) -> None:
        item = {
            "merchantAccountCode": MERCHANT_ACCOUNT,
            "eventDate": "2026-12-07T12:00:00+01:00",
            "paymentMethod": "visa",
            "reason": "",
            **item,
        }
        key = bytes.fromhex(state.faults.hmac_key_hex)
        item["additionalData"] = {"hmacSignature": sign_item(item, key)}
        state.webhooks.append(item)
        if state.faults.webhook_url:
            copies = 2 if state.faults.webhook_duplicate else 1
            for _ in range(copies):
                deliver_again(item)

    async def _deliver(item: dict[str, Any]) -> None:
        delay = state.faults.webhook_delay_ms / 1000
        if state.faults.webhook_reorder:
            delay += state.rng.random() * max(delay, 0.05) * 2
        await asyncio.sleep(delay)
        signed = {k: v for k, v in item.items() if not k.startswith("_")}
        payload = {"live": "false", "notificationItems": [{"NotificationRequestItem": signed}]}
        # Like Adyen: retried until a 2xx (here every 0.1 s doubling to 2 s, 200 tries).
        wait = 0.1
        for _ in range(200):
            url = state.faults.webhook_url
            if url is None:
                return
            if state.session is None:
                state.session = aiohttp.ClientSession()
            try:
                async with state.deliveries, state.session.post(url, json=payload) as response:
                    if 200 <= response.status < 300:
                        item["_delivered"] = item.get("_delivered", 0) + 1
                        return
            except (aiohttp.ClientError, OSError):
                pass
            item["_delivery_failures"] = item.get("_delivery_failures", 0) + 1
            await asyncio.sleep(wait)
            wait = min(wait * 2, 2.0)

    def deliver_again(item: dict[str, Any]) -> None:
        task = asyncio.get_running_loop().create_task(_deliver(item))
        state.tasks.add(task)
        task.add_done_callback(state.tasks.discard)

    def authorise(body: dict[str, Any], key: str) -> tuple[int, dict[str, Any]]:
        method = body.get("paymentMethod")
        stored_id = method.get("storedPaymentMethodId") if isinstance(method, dict) else None
        money = _money(body)
        assert not isinstance(money, web.Response)
        value, currency = money
        psp = new_psp()
        reply: dict[str, Any] = {
            "pspReference": psp,
            "merchantReference": body.get("reference", ""),
            "amount": {"value": value, "currency": currency},
        }
        result = CARDS.get(str(stored_id), ("Authorised", "", ""))
        reply["resultCode"] = result[0]
        if result[0] in ("Refused", "Error"):
            reply["refusalReason"], reply["refusalReasonCode"] = result[1], result[2]
            notify_auth(psp, body, value, currency, success=False, reason=result[1])
            return 200, reply
        if result[0] not in ("Authorised", "Pending"):
            return 200, reply
        # Pending: Adyen decides later; here the authorisation is placed and its
        # AUTHORISATION notification (success true) follows, as for an Authorised one.
        payment = _Payment(psp, currency, value, reference=str(body.get("reference", "")))
        state.payments[psp] = payment
        state.effects[key] += 1
        notify_auth(psp, body, value, currency, success=True, reason="")
        if body.get("captureDelayHours") == 0:
            payment.captured = value
            notify(
                {
                    "pspReference": new_psp(),
                    "originalReference": psp,
                    "merchantReference": payment.reference,
                    "amount": {"value": value, "currency": currency},
                    "eventCode": "CAPTURE",
                    "success": "true",
                }
            )
        return 200, reply

    def notify_auth(
        psp: str, body: dict[str, Any], value: int, currency: str, *, success: bool, reason: str
    ) -> None:
        notify(
            {
                "pspReference": psp,
                "merchantReference": str(body.get("reference", "")),
                "amount": {"value": value, "currency": currency},
                "eventCode": "AUTHORISATION",
                "success": "true" if success else "false",
                "reason": reason,
            }
        )

    def modify(kind: str, psp: str, body: dict[str, Any], key: str) -> tuple[int, dict[str, Any]]:
        payment = state.payments.get(psp)
        if payment is None:
            return 422, {
                "status": 422,
                "errorCode": "167",
                "message": "Original pspReference required for this operation",
                "errorType": "validation",
                "pspReference": _psp(),
            }
        mod_psp = new_psp()
        reply: dict[str, Any] = {
            "merchantAccount": body.get("merchantAccount"),
            "paymentPspReference": psp,
            "pspReference": mod_psp,
            "status": "received",
        }
        if "reference" in body:
            reply["reference"] = body["reference"]
        value = 0
        if kind in ("captures", "refunds"):
            money = _money(body)
            assert not isinstance(money, web.Response)
            value, currency = money
            reply["amount"] = {"value": value, "currency": currency}
            if currency != payment.currency:
                return 422, {
                    "status": 422,
                    "errorCode": "138",
                    "message": "Invalid currency specified",
                    "errorType": "validation",
                    "pspReference": _psp(),
                }
        event = {"captures": "CAPTURE", "refunds": "REFUND", "cancels": "CANCELLATION"}.get(
            kind, "CANCEL_OR_REFUND"
        )
        ok = True
        if kind == "captures":
            ok = not payment.cancelled and payment.captured == 0 and value <= payment.authorised
            if ok:
                payment.captured = value
        elif kind == "refunds":
            ok = payment.refunded + value <= payment.captured
            if ok:
                payment.refunded += value
        elif kind == "cancels":
            ok = payment.captured == 0 and not payment.cancelled
            if ok:
                payment.cancelled = True
        else:  # reversals: cancel if not captured, else refund the rest
            if payment.captured == 0 and not payment.cancelled:
                payment.cancelled = True
            elif payment.captured > payment.refunded:
                value = payment.captured - payment.refunded
                payment.refunded = payment.captured
            else:
                ok = False
        if ok:
            state.effects[key] += 1
        failed_event = {"CAPTURE": "CAPTURE_FAILED", "REFUND": "REFUND_FAILED"}.get(event)
        notify(
            {
                "pspReference": mod_psp,
                "originalReference": psp,
                "merchantReference": payment.reference,
                "amount": {"value": value, "currency": payment.currency},
                # CAPTURE_FAILED and REFUND_FAILED arrive with success "true": the event
                # itself is the failure; a failed cancellation is CANCELLATION "false".
                "eventCode": event if ok or failed_event is None else failed_event,
                "success": "true" if ok or failed_event is not None else "false",
                "reason": "" if ok else "Insufficient in-process funds on the payment",
            }
        )
        return 201, reply

    async def handle(request: web.Request, kind: str) -> web.StreamResponse:
        state.requests[kind] += 1
        if request.headers.get("X-API-Key") != API_KEY:
            return _error(401, "000", "HTTP Status Response - Unauthorized", "security")
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            return _error(400, "702", "Structure of the request is malformed", "validation")
        if not isinstance(body, dict):
            return _error(400, "702", "Structure of the request is malformed", "validation")
        if body.get("merchantAccount") != MERCHANT_ACCOUNT:
            return _error(403, "901", "Invalid Merchant Account", "security")
        if kind != "cancels" and kind != "reversals":
            money = _money(body)
            if isinstance(money, web.Response):
                return money
        if kind == "payments":
            missing = [f for f in ("paymentMethod", "reference", "returnUrl") if f not in body]
            if missing:
                return _error(422, "130", f"Required field missing: {missing[0]}", "validation")
        key = request.headers.get("Idempotency-Key", "")
        if len(key) > MAX_KEY_LENGTH:
            return _error(422, "702", "Idempotency-Key longer than 64 characters", "validation")
        if state.faults.latency_ms:
            await asyncio.sleep(state.faults.latency_ms / 1000)
        if roll(state.faults.rate_429):
            return _error(429, "429", "Too many requests", "security")
        if roll(state.faults.rate_503):
            return _error(503, "000", "Service unavailable", "internal")
        fingerprint = f"{request.path} {json.dumps(body, sort_keys=True)}"
        if key:
            if key in state.running:
                return _error(422, "704", "request already processed or in progress", "validation")
            stored = state.stored.get(key)
            if stored is not None and state.days - stored.at_days <= REPLAY_DAYS:
                if state.faults.mismatch_error and state.bodies.get(key) != fingerprint:
                    return _error(
                        422, "702", "Idempotency-Key reused with another request", "validation"
                    )
                return web.json_response(stored.body, status=stored.status)
            state.running.add(key)
        try:
            if state.faults.latency_ms:
                await asyncio.sleep(state.faults.latency_ms / 1000)
            if kind == "payments":
                status, reply = authorise(body, key)
            else:
                status, reply = modify(kind, request.match_info["psp"], body, key)
            if status < 300 and roll(state.faults.rate_500_after_effect):
                status, reply = (
                    500,
                    {
                        "status": 500,
                        "errorCode": "905",
                        "message": "Payment details are not supported",
                        "errorType": "internal",
                    },
                )
            if key:
                state.stored[key] = _Stored(status, reply, state.days)
                state.bodies[key] = fingerprint
        finally:
            state.running.discard(key)
        if status < 300 and roll(state.faults.rate_drop_after_effect):
            transport = request.transport
            if transport is not None:
                transport.close()
            raise asyncio.CancelledError  # aiohttp drops the reply
        if status < 300 and roll(state.faults.rate_malformed_after_effect):
            return web.Response(
                status=status, body=b'{"pspReference": ', content_type="application/json"
            )
        return web.json_response(reply, status=status)

    def route(kind: str) -> Any:
        async def handler(request: web.Request) -> web.StreamResponse:
            return await handle(request, kind)

        return handler

    async def effects(_: web.Request) -> web.Response:
        return web.json_response(
            {
                "effects_by_key": {k: {"count": n} for k, n in state.effects.items()},
                "total": sum(state.effects.values()),
                "requests": dict(state.requests),
            }
        )

    async def configure(request: web.Request) -> web.Response:
        try:
            state.faults = state.faults.replace(await request.json())
        except (ValueError, TypeError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response(asdict(state.faults))

    async def advance(request: web.Request) -> web.Response:
        body = await request.json()
        state.days += float(body.get("days", 0))
        return web.json_response({"days": state.days})

    async def webhooks(_: web.Request) -> web.Response:
        return web.json_response({"notifications": state.webhooks})

    async def resend(request: web.Request) -> web.Response:
        """Deliver again the notifications matching ``pspReference`` / ``eventCode`` (all
        when the body names neither): a late or repeated delivery on demand."""
        body = await request.json() if request.can_read_body else {}
        chosen = [
            item
            for item in state.webhooks
            if all(item.get(k) == body[k] for k in ("pspReference", "eventCode") if k in body)
        ]
        for item in chosen:
            deliver_again(item)
        return web.json_response({"resent": len(chosen)})

    async def dashboard(request: web.Request) -> web.Response:
        """What happens at Adyen outside the API, for one payment (``psp``): ``event``
        CHARGEBACK, NOTIFICATION_OF_CHARGEBACK, CHARGEBACK_REVERSED (``amount``), EXPIRE,
        TECHNICAL_CANCEL; or CAPTURE_FAILED / REFUND_FAILED of an earlier successful
        modification (``modification``: its pspReference), which undoes it here."""
        body = await request.json()
        event = str(body.get("event"))
        payment = state.payments.get(str(body.get("psp")))
        if payment is None:
            return web.json_response({"error": "no such payment"}, status=404)
        value = int(body.get("amount", 0))
        reference = new_psp()
        original: str | None = payment.psp
        if event in ("CAPTURE_FAILED", "REFUND_FAILED"):
            reference = str(body.get("modification"))
            found = [
                w
                for w in state.webhooks
                if w.get("pspReference") == reference and w.get("success") == "true"
            ]
            if not found:
                return web.json_response({"error": "no such modification"}, status=404)
            value = int(found[0]["amount"]["value"])
            if event == "CAPTURE_FAILED":
                payment.captured -= value
            else:
                payment.refunded -= value
        elif event in ("EXPIRE", "TECHNICAL_CANCEL"):
            payment.cancelled = True
            value = payment.authorised
        elif event not in ("CHARGEBACK", "NOTIFICATION_OF_CHARGEBACK", "CHARGEBACK_REVERSED"):
            return web.json_response({"error": f"unknown event {event}"}, status=400)
        if event.startswith(("CHARGEBACK", "NOTIFICATION_OF")):
            # Dispute notifications name the disputed payment itself.
            reference, original = payment.psp, None
        item: dict[str, Any] = {
            "pspReference": reference,
            "merchantReference": payment.reference,
            "amount": {"value": value, "currency": payment.currency},
            "eventCode": event,
            "success": "true",
            "reason": str(body.get("reason", "")),
        }
        if original is not None:
            item["originalReference"] = original
        notify(item)
        return web.json_response(state.webhooks[-1])

    app.router.add_post(r"/v{version:\d+}/payments", route("payments"))
    for kind in ("captures", "cancels", "refunds", "reversals"):
        app.router.add_post(r"/v{version:\d+}/payments/{psp}/" + kind, route(kind))
    app.router.add_get("/_fake/effects", effects)
    app.router.add_post("/_fake/config", configure)
    app.router.add_post("/_fake/advance", advance)
    app.router.add_get("/_fake/webhooks", webhooks)
    app.router.add_post("/_fake/webhooks/resend", resend)
    app.router.add_post("/_fake/dashboard", dashboard)

    async def close_deliveries(_: web.Application) -> None:
        for task in list(state.tasks):
            task.cancel()
        if state.session is not None:
            await state.session.close()

    app.on_cleanup.append(close_deliveries)
    return app


def main(argv: list[str] | None = None) -> int:
    """``python -m provider_adapters.fake.adyen --port N [--webhook-url URL ...]``."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m provider_adapters.fake.adyen",
        description="Serve the fake Adyen Checkout API (v71 paths) with faults on demand; "
        f"API key {API_KEY}, merchant account {MERCHANT_ACCOUNT}.",
        epilog="test cards (storedPaymentMethodId): "
        + ", ".join(f"{k} -> {v[0]} {v[1]}".rstrip() for k, v in CARDS.items()),
    )
    parser.add_argument("--host", default="127.0.0.1", help="address (default %(default)s)")
    parser.add_argument("--port", type=int, default=12112, help="port (default %(default)s)")
    parser.add_argument("--seed", type=int, default=None, help="seed for reproducible faults")
    parser.add_argument("--latency-ms", type=int, default=0, help="delay added to every POST")
    for name in ("429", "503", "500-after-effect", "drop-after-effect", "malformed-after-effect"):
        parser.add_argument(f"--rate-{name}", type=float, default=0.0, help="0..1")
    parser.add_argument("--webhook-url", default=None, help="POST signed notifications here")
    parser.add_argument("--webhook-delay-ms", type=int, default=0, help="delay each delivery")
    parser.add_argument(
        "--webhook-duplicate", action="store_true", help="deliver every notification twice"
    )
    parser.add_argument(
        "--webhook-reorder", action="store_true", help="random extra delay: out of order"
    )
    parser.add_argument(
        "--luhn-psp",
        action="store_true",
        help="every pspReference 16 digits passing the Luhn check (like ~1 in 10 real ones)",
    )
    parser.add_argument(
        "--mismatch-error",
        action="store_true",
        help="a reused key with another body is a 422 (default: replay; Adyen's answer is "
        "unconfirmed)",
    )
    args = parser.parse_args(argv)
    faults = AdyenFaults(
        seed=args.seed,
        latency_ms=args.latency_ms,
        rate_429=args.rate_429,
        rate_503=args.rate_503,
        rate_500_after_effect=args.rate_500_after_effect,
        rate_drop_after_effect=args.rate_drop_after_effect,
        rate_malformed_after_effect=args.rate_malformed_after_effect,
        webhook_url=args.webhook_url,
        webhook_delay_ms=args.webhook_delay_ms,
        webhook_duplicate=args.webhook_duplicate,
        webhook_reorder=args.webhook_reorder,
        mismatch_error=args.mismatch_error,
        luhn_psp=args.luhn_psp,
    )
    print(f"fake Adyen listening on http://{args.host}:{args.port}", flush=True)
    web.run_app(create_adyen_app(faults), host=args.host, port=args.port, print=None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
