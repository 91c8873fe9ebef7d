"""HTTP face of the fake provider (aiohttp.web), with Stripe's idempotency semantics.

* the first request with an ``Idempotency-Key`` runs and its final response is stored;
* the same key with the same endpoint and parameters replays it (``Idempotent-Replayed``);
* the same key with other parameters is an ``idempotency_error``;
* a request while the key's first request still runs gets 409 ``idempotency_key_in_use``;
* injected 429/503 answers are not stored (nothing happened), an injected 500 after the
  effect is stored and replayed, like Stripe;
* the ``Stripe-Version`` a request carries is counted (``api_versions`` in
  ``/_fake/effects``, ``stripe_version`` in ``/_fake/requests``) and echoed in the reply's
  ``Stripe-Version`` header, as Stripe does, so a test sees which version was sent.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import anyio
from aiohttp import web

from provider_adapters.fake.faults import FaultConfig, FaultRoller
from provider_adapters.fake.state import Reply, StripeState, stripe_error
from provider_adapters.fake.webhooks import WebhookConfig, WebhookSender, add_routes

__all__ = ["create_app"]

Handler = Callable[[dict[str, Any], str], Reply]
_NOT_STORED_CODES = {"parameter_missing", "parameter_invalid_integer", "parameter_invalid_string"}


def parse_form(pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """Stripe's bracket encoding: ``metadata[k]=v`` -> nested dict, ``expand[]=x`` -> list."""
    result: dict[str, Any] = {}
    for raw_key, value in pairs:
        parts = raw_key.replace("]", "").split("[")
        target: Any = result
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(target, list):
                if last:
                    target.append(value)
                else:
                    target.append({})
                    target = target[-1]
                continue
            if last:
                target[part] = value
            else:
                nxt = parts[i + 1]
                default: Any = [] if nxt == "" or nxt.isdigit() else {}
                target = target.setdefault(part, default)
    return result


def _json(
    status: int, body: dict[str, Any] | bytes, headers: Mapping[str, str] | None = None
) -> web.Response:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return web.Response(
        status=status,
        body=raw,
        content_type="application/json",
        headers={"Request-Id": f"req_{secrets.token_hex(8)}", **(headers or {})},
    )


class _Fake:
    def __init__(
        self, faults: FaultConfig, api_key_prefix: str, webhooks: WebhookConfig | None = None
    ) -> None:
        self.webhooks = WebhookSender(webhooks)
        self.state = StripeState(notify=self.webhooks.event)
        self.roller = FaultRoller(faults)
        self.api_key_prefix = api_key_prefix
        self.stored: dict[str, tuple[str, int, bytes, dict[str, str]]] = {}
        self.in_use: set[str] = set()
        self.requests = 0
        self.faults_injected: Counter[str] = Counter()
        # Requests by the Stripe-Version header they carried ("" when none).
        self.api_versions: Counter[str] = Counter()
        # Every POST with its start and end (monotonic seconds), for tests that check
        # concurrency limits, rate limits and breakers from the provider's side.
        self.request_log: deque[dict[str, Any]] = deque(maxlen=100_000)

    def reset(self) -> None:
        self.state = StripeState(notify=self.webhooks.event)
        self.stored.clear()
        self.in_use.clear()
        self.requests = 0
        self.faults_injected.clear()
        self.api_versions.clear()
        self.request_log.clear()

    def versioned(self, request: web.Request, response: web.Response) -> web.Response:
        """Count the request's Stripe-Version and echo it, as Stripe does."""
        version = request.headers.get("Stripe-Version", "")
        self.api_versions[version] += 1
        if version:
            response.headers["Stripe-Version"] = version
        return response

    def authorised(self, request: web.Request) -> bool:
        header = request.headers.get("Authorization", "")
        return header.startswith("Bearer " + self.api_key_prefix)

    async def post(self, request: web.Request, handler: Handler) -> web.Response:
        entry: dict[str, Any] = {
            "path": request.path,
            "idempotency_key": request.headers.get("Idempotency-Key"),
            "traceparent": request.headers.get("traceparent"),
            "stripe_version": request.headers.get("Stripe-Version"),
            "started": time.monotonic(),
            "finished": None,
            "status": None,
        }
        self.request_log.append(entry)
        try:
            response = await self._post(request, handler)
        finally:
            entry["finished"] = time.monotonic()
        entry["status"] = response.status
        return self.versioned(request, response)

    async def _post(self, request: web.Request, handler: Handler) -> web.Response:
        self.requests += 1
        if not self.authorised(request):
            return _json(*self._auth_error())
        params = parse_form(list((await request.post()).items()))  # type: ignore[arg-type]
        key = request.headers.get("Idempotency-Key", "")
        fingerprint = hashlib.sha256(
            (request.path + json.dumps(params, sort_keys=True)).encode()
        ).hexdigest()
        if key:
            if key in self.in_use:
                return _json(
                    *stripe_error(
                        409,
                        "invalid_request_error",
                        "There is currently another in-progress request using this Idempotent Key "
                        "(that probably means you submitted twice, and the other request is still "
                        "going through). Please try again later.",
                        code="idempotency_key_in_use",
                    ),
                    {"Stripe-Should-Retry": "true"},
                )
            if key in self.stored:
                stored_fp, stored_status, stored_body, stored_headers = self.stored[key]
                if stored_fp != fingerprint:
                    return _json(
                        *stripe_error(
                            400,
                            "idempotency_error",
                            "Keys for idempotent requests can only be used with the same parameters "
                            "they were first used with. Try using a key other than "
                            f"'{key}' if you meant to execute a different request.",
                        )
                    )
                return _json(
                    stored_status,
                    stored_body,
                    {**stored_headers, "Idempotent-Replayed": "true", "Idempotency-Key": key},
                )
        before = self.roller.before()
        if before == "429":
            self.faults_injected["429"] += 1
            return _json(
                *stripe_error(
                    429,
                    "invalid_request_error",
                    "Too many requests hit the API too quickly.",
                    code="rate_limit",
                ),
                {"Retry-After": "1", "Stripe-Should-Retry": "true"},
            )
        if before == "503":
            self.faults_injected["503"] += 1
            return _json(
                *stripe_error(503, "api_error", "The service is temporarily unavailable."),
                {"Stripe-Should-Retry": "true"},
            )
        if key:
            self.in_use.add(key)
        try:
            # The key is held while the request "runs" (latency included), so a concurrent
            # request with it gets 409 as at Stripe; everything from the key checks to
            # in_use.add above is synchronous, so two requests can never both apply it.
            latency = self.roller.latency_seconds()
            if latency:
                await anyio.sleep(latency)
            effects_before = len(self.state.effects)
            status, body = handler(params, key)
            applied = len(self.state.effects) > effects_before
            raw = json.dumps(body).encode()
            error_code = body.get("error", {}).get("code") if status >= 400 else None
            if key and error_code not in _NOT_STORED_CODES:
                self.stored[key] = (fingerprint, status, raw, {})
            after = self.roller.after() if applied else None
            if after is not None:
                self.faults_injected[after] += 1
            if after == "500_after_effect":
                status_500, body_500 = stripe_error(
                    500, "api_error", "An unknown error occurred on Stripe's end."
                )
                raw_500 = json.dumps(body_500).encode()
                headers = {"Stripe-Should-Retry": "false"}
                if key:
                    self.stored[key] = (fingerprint, status_500, raw_500, headers)
                return _json(status_500, raw_500, headers)
            if after == "timeout_after_effect":
                if key:
                    self.in_use.discard(key)  # a retry meanwhile replays the stored reply
                await anyio.sleep(self.roller.config.timeout_seconds)
                return _json(status, raw)
            if after == "malformed":
                return _json(status, self.roller.malformed_body(body))
            return _json(status, raw)
        finally:
            if key:
                self.in_use.discard(key)

    def _auth_error(self) -> Reply:
        return stripe_error(
            401,
            "invalid_request_error",
            f"Invalid API Key provided. Use a test key starting with {self.api_key_prefix}.",
        )


def create_app(
    faults: FaultConfig | None = None,
    api_key_prefix: str = "sk_test_",
    webhooks: WebhookConfig | None = None,
) -> web.Application:
    fake = _Fake(faults or FaultConfig(), api_key_prefix, webhooks)
    app = web.Application()
    add_routes(app, fake.webhooks)

    async def dashboard(request: web.Request) -> web.Response:
        """POST /_fake/dashboard/{refund,dispute} {"payment_intent": ..., "amount": ...}:
        a change made outside the API (an operator's dashboard refund, a card holder's
        dispute), reported only by webhook; POST /_fake/dashboard/dispute/close
        {"dispute": "dp_...", "status": "won"|"lost"}: the dispute's outcome."""
        try:
            body = await request.json()
        except ValueError:
            return _json(*stripe_error(400, "invalid_request_error", "body must be JSON"))
        if not isinstance(body, dict):
            return _json(*stripe_error(400, "invalid_request_error", "body must be an object"))
        params = {k: str(v) for k, v in body.items()}
        change = request.match_info["change"]
        if change == "refund":
            return _json(*fake.state.dashboard_refund(params))
        if change == "refund/settle":
            return _json(*fake.state.settle_refund(params))
        if change == "dispute/close":
            return _json(*fake.state.close_dispute(params))
        return _json(*fake.state.open_dispute(params))

    app.router.add_post(
        "/_fake/dashboard/{change:refund|refund/settle|dispute|dispute/close}", dashboard
    )

    def post(
        handler: Callable[[web.Request], Handler],
    ) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def view(request: web.Request) -> web.Response:
            return await fake.post(request, handler(request))

        return view

    def get(
        reader: Callable[[web.Request], Reply],
    ) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def view(request: web.Request) -> web.Response:
            fake.requests += 1
            if not fake.authorised(request):
                return fake.versioned(request, _json(*fake._auth_error()))
            return fake.versioned(request, _json(*reader(request)))

        return view

    def create_pi(request: web.Request) -> Handler:
        return fake.state.create_payment_intent

    def confirm_pi(request: web.Request) -> Handler:
        return lambda p, k: fake.state.confirm_payment_intent(request.match_info["id"], p, k)

    def capture_pi(request: web.Request) -> Handler:
        return lambda p, k: fake.state.capture_payment_intent(request.match_info["id"], p, k)

    def cancel_pi(request: web.Request) -> Handler:
        return lambda p, k: fake.state.cancel_payment_intent(request.match_info["id"], p, k)

    def create_refund(request: web.Request) -> Handler:
        return fake.state.create_refund

    def search_pi(request: web.Request) -> Reply:
        return fake.state.search_payment_intents(request.query.get("query", ""))

    def retrieve_pi(request: web.Request) -> Reply:
        return fake.state.retrieve_payment_intent(request.match_info["id"])

    def retrieve_refund(request: web.Request) -> Reply:
        return fake.state.retrieve_refund(request.match_info["id"])

    def list_refunds(request: web.Request) -> Reply:
        return fake.state.list_refunds(request.query.get("payment_intent"))

    app.router.add_post("/v1/payment_intents", post(create_pi))
    app.router.add_post("/v1/payment_intents/{id}/confirm", post(confirm_pi))
    app.router.add_post("/v1/payment_intents/{id}/capture", post(capture_pi))
    app.router.add_post("/v1/payment_intents/{id}/cancel", post(cancel_pi))
    app.router.add_get("/v1/payment_intents/search", get(search_pi))
    app.router.add_get("/v1/payment_intents/{id}", get(retrieve_pi))
    app.router.add_post("/v1/refunds", post(create_refund))
    app.router.add_get("/v1/refunds/{id}", get(retrieve_refund))
    app.router.add_get("/v1/refunds", get(list_refunds))

    def list_balance_transactions(request: web.Request) -> Reply:
        return fake.state.settlement.list(request.query)

    app.router.add_get("/v1/balance_transactions", get(list_balance_transactions))

    async def discrepancies(request: web.Request) -> web.Response:
        """POST {"kind": ..., "source": ...}: make the settlement data disagree (settlement.py)."""
        if request.method == "POST":
            try:
                spec = await request.json()
            except ValueError:
                return _json(*stripe_error(400, "invalid_request_error", "body must be JSON"))
            if not isinstance(spec, dict):
                return _json(*stripe_error(400, "invalid_request_error", "body must be an object"))
            return _json(*fake.state.settlement.inject(spec))
        return _json(200, {"injected": fake.state.settlement.injected})

    async def fees(request: web.Request) -> web.Response:
        """POST {"bps": 290, "fixed_minor": 30}: the fee on charges from now on."""
        schedule = fake.state.settlement.fees
        if request.method == "POST":
            try:
                body = await request.json()
                schedule.bps = int(body.get("bps", schedule.bps))
                schedule.fixed_minor = int(body.get("fixed_minor", schedule.fixed_minor))
            except (ValueError, TypeError, AttributeError) as exc:
                return _json(
                    *stripe_error(400, "invalid_request_error", f"bad fee schedule: {exc}")
                )
        return _json(200, {"bps": schedule.bps, "fixed_minor": schedule.fixed_minor})

    async def settlement_currency(request: web.Request) -> web.Response:
        """POST {"currency": "eur", "rates": {"usd": "0.9123"}}: settle in another currency."""
        settlement = fake.state.settlement
        if request.method == "POST":
            try:
                spec = await request.json()
            except ValueError:
                return _json(*stripe_error(400, "invalid_request_error", "body must be JSON"))
            if not isinstance(spec, dict):
                return _json(*stripe_error(400, "invalid_request_error", "body must be an object"))
            return _json(*settlement.settle_in(spec))
        return _json(
            200, {"currency": settlement.account_currency, "rates": settlement.exchange_rates}
        )

    app.router.add_route("*", "/_fake/settlement_currency", settlement_currency)
    app.router.add_route("*", "/_fake/discrepancies", discrepancies)
    app.router.add_route("*", "/_fake/fees", fees)

    async def effects(_request: web.Request) -> web.Response:
        return _json(
            200,
            {
                "effects_by_key": fake.state.effects_by_key(),
                "total_effects": len(fake.state.effects),
                "requests": fake.requests,
                "api_versions": dict(fake.api_versions),
                "faults_injected": {
                    name: fake.faults_injected[name]
                    for name in (
                        "429",
                        "503",
                        "timeout_after_effect",
                        "500_after_effect",
                        "malformed",
                    )
                },
            },
        )

    async def reset(_request: web.Request) -> web.Response:
        fake.reset()
        return _json(200, {"reset": True})

    async def config(request: web.Request) -> web.Response:
        if request.method == "POST":
            try:
                new = FaultConfig.from_json(await request.json())
            except (ValueError, TypeError) as exc:
                return _json(*stripe_error(400, "invalid_request_error", str(exc)))
            fake.roller = FaultRoller(new)
        return _json(200, fake.roller.config.to_json())

    async def requests(_request: web.Request) -> web.Response:
        return _json(200, {"requests": list(fake.request_log)})

    app.router.add_get("/_fake/effects", effects)
    app.router.add_get("/_fake/requests", requests)
    app.router.add_post("/_fake/reset", reset)
    app.router.add_route("*", "/_fake/config", config)
    return app
