"""The fake provider's webhooks: Stripe-shaped events, signed like Stripe, delivered like
Stripe (at least once, in no particular order, retried with backoff until a 2xx).

Signing follows ../shared/PROVIDERS.md, written here from the algorithm (not with the
SDK, so the receiver's SDK verification checks an independent implementation): the header
is ``t=<unix seconds>,v1=<hex>``, the signed string ``"<t>.<raw body>"``, HMAC-SHA256 keyed
with the secret's UTF-8 bytes including its ``whsec_`` prefix. Each delivery attempt is
signed anew with the time of sending, as Stripe does.

What a test or a demo can turn (``WebhookConfig``, ``POST /_fake/webhooks/config``):
``delay_ms`` before the first attempt; ``duplicates`` deliveries of every event;
``reorder_ms``, a random extra delay per delivery up to this, so events overtake each
other; retries after a non-2xx answer or a connection error, ``retry_base_ms`` doubling up
to ``retry_cap_ms`` (jittered), for at most ``max_age_seconds``; ``bad_signature_rate``,
the share of attempts signed with a wrong secret (the fault switch).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import heapq
import hmac
import itertools
import json
import random
import secrets
import string
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import aiohttp
from aiohttp import web

__all__ = ["WebhookConfig", "WebhookSender", "sign", "signature_header"]

API_VERSION = "2024-06-20"


def sign(signed_payload: str, secret: str) -> str:
    """HMAC-SHA256 hex digest of ``signed_payload`` keyed by the secret's UTF-8 bytes."""
    return hmac.new(
        secret.encode("utf-8"), signed_payload.encode("utf-8"), hashlib.sha256
    ).hexdigest()


def signature_header(body: str, secret: str, timestamp: int, *, extra: tuple[str, ...] = ()) -> str:
    """``Stripe-Signature`` for ``body`` at ``timestamp``; ``extra`` secrets add further
    ``v1`` values (as Stripe does while an endpoint's secret is rolled)."""
    values = [f"v1={sign(f'{timestamp}.{body}', s)}" for s in (secret, *extra)]
    return ",".join([f"t={timestamp}", *values])


# Stripe's ids are 24 letters and digits after the prefix. Hex would put a 13-digit run that
# passes Luhn in about 1 event id in 280, which the inbox refuses as a card number (as it
# should: no real Stripe id looks like one).
_ID_ALPHABET = string.ascii_letters + string.digits


def _event_id() -> str:
    return "evt_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


@dataclass
class WebhookConfig:
    url: str | None = None
    secret: str = "whsec_fake"
    delay_ms: int = 0
    duplicates: int = 1
    reorder_ms: int = 0
    retry_base_ms: int = 200
    retry_cap_ms: int = 10_000
    max_age_seconds: float = 3 * 24 * 3600.0  # Stripe retries for up to 3 days
    bad_signature_rate: float = 0.0
    concurrency: int = 16
    timeout_seconds: float = 10.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.duplicates < 1:
            raise ValueError("duplicates must be at least 1")
        if not 0.0 <= self.bad_signature_rate <= 1.0:
            raise ValueError("bad_signature_rate must be between 0 and 1")
        if min(self.delay_ms, self.reorder_ms, self.retry_base_ms, self.retry_cap_ms) < 0:
            raise ValueError("delays must be >= 0")
        if self.concurrency < 1:
            raise ValueError("concurrency must be at least 1")

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> WebhookConfig:
        known = {spec.name for spec in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown webhook settings: {sorted(unknown)}; known: {sorted(known)}")
        return cls(**dict(data))

    def to_json(self) -> dict[str, Any]:
        shown = asdict(self)
        shown["secret"] = self.secret[:6] + "…"
        return shown


@dataclass(order=True)
class _Delivery:
    due: float
    seq: int
    event: dict[str, Any] = field(compare=False)
    first_at: float = field(compare=False, default=0.0)
    attempts: int = field(compare=False, default=0)


class WebhookSender:
    """Queues events and delivers them to ``config.url``; one instance per fake server."""

    def __init__(self, config: WebhookConfig | None = None) -> None:
        self.config = config or WebhookConfig()
        self._rng = random.Random(self.config.seed)
        self._queue: list[_Delivery] = []
        self._seq = itertools.count()
        self._wake = asyncio.Event()
        # Per event id: attempts and the statuses answered (None: no answer).
        self.log: dict[str, dict[str, Any]] = {}
        self.sent = 0
        self.acknowledged = 0
        # Deliveries taken off the queue and not finished: pending until they end, or a
        # test that waits for "nothing pending" would look before the POST arrives.
        self._in_flight = 0

    def configure(self, config: WebhookConfig) -> None:
        self.config = config
        self._rng = random.Random(config.seed)
        self._wake.set()

    def pending(self) -> int:
        """Deliveries queued or under way."""
        return len(self._queue) + self._in_flight

    def event(
        self, event_type: str, obj: Mapping[str, Any], key: str | None = None
    ) -> dict[str, Any]:
        """Build a Stripe event for ``obj`` and queue its deliveries (none without a URL)."""
        if not self.config.url:
            return {}
        event = {
            "id": _event_id(),
            "object": "event",
            "api_version": API_VERSION,
            "created": int(time.time()),
            "type": event_type,
            "livemode": False,
            "pending_webhooks": 1,
            "request": {"id": None, "idempotency_key": key},
            "data": {"object": json.loads(json.dumps(obj))},
        }
        now = time.monotonic()
        for _ in range(self.config.duplicates):
            due = now + self.config.delay_ms / 1000
            if self.config.reorder_ms:
                due += self._rng.uniform(0, self.config.reorder_ms / 1000)
            heapq.heappush(self._queue, _Delivery(due, next(self._seq), event, now))
        self._wake.set()
        return event

    async def run(self) -> None:
        """Deliver due events until cancelled, ``config.concurrency`` at once."""
        limit = asyncio.Semaphore(self.config.concurrency)
        tasks: set[asyncio.Task[None]] = set()
        async with aiohttp.ClientSession() as session:
            try:
                while True:
                    now = time.monotonic()
                    if self._queue and self._queue[0].due <= now:
                        delivery = heapq.heappop(self._queue)
                        self._in_flight += 1
                        await limit.acquire()
                        task = asyncio.ensure_future(self._deliver(session, delivery, limit))
                        tasks.add(task)
                        task.add_done_callback(tasks.discard)
                        continue
                    wait = self._queue[0].due - now if self._queue else None
                    self._wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), wait)
            finally:
                for task in tasks:
                    task.cancel()

    async def _deliver(
        self, session: aiohttp.ClientSession, delivery: _Delivery, limit: asyncio.Semaphore
    ) -> None:
        try:
            await self._attempt(session, delivery)
        finally:
            self._in_flight -= 1
            limit.release()

    async def _attempt(self, session: aiohttp.ClientSession, delivery: _Delivery) -> None:
        config = self.config
        event = delivery.event
        body = json.dumps(event)
        secret = config.secret
        if config.bad_signature_rate and self._rng.random() < config.bad_signature_rate:
            secret = "whsec_not_the_endpoint_secret"
        header = signature_header(body, secret, int(time.time()))
        delivery.attempts += 1
        entry = self.log.setdefault(event["id"], {"type": event["type"], "statuses": []})
        status: int | None = None
        self.sent += 1
        try:
            async with session.post(
                config.url or "",
                data=body.encode(),
                headers={
                    "Content-Type": "application/json; charset=utf-8",
                    "Stripe-Signature": header,
                    "User-Agent": "Stripe/1.0 (+https://stripe.com/docs/webhooks)",
                },
                timeout=aiohttp.ClientTimeout(total=config.timeout_seconds),
            ) as response:
                status = response.status
                await response.read()
        except (aiohttp.ClientError, TimeoutError, OSError):
            status = None
        entry["statuses"].append(status)
        if status is not None and 200 <= status < 300:
            self.acknowledged += 1
            return
        age = time.monotonic() - delivery.first_at
        if age >= config.max_age_seconds:
            entry["gave_up"] = True
            return
        backoff = min(config.retry_base_ms * 2 ** (delivery.attempts - 1), config.retry_cap_ms)
        delivery.due = time.monotonic() + backoff / 1000 * (0.5 + self._rng.random() / 2)
        delivery.seq = next(self._seq)
        heapq.heappush(self._queue, delivery)
        self._wake.set()


def add_routes(app: web.Application, sender: WebhookSender) -> None:
    """``/_fake/webhooks/config`` (GET/POST) and ``/_fake/webhooks`` (the delivery log);
    the sender runs for the app's lifetime."""

    async def lifetime(_app: web.Application) -> AsyncIterator[None]:
        task = asyncio.ensure_future(sender.run())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    app.cleanup_ctx.append(lifetime)

    async def config(request: web.Request) -> web.Response:
        if request.method == "POST":
            try:
                sender.configure(WebhookConfig.from_json(await request.json()))
            except (ValueError, TypeError) as exc:
                return web.json_response({"error": {"message": str(exc)}}, status=400)
        return web.json_response(sender.config.to_json())

    async def deliveries(_request: web.Request) -> web.Response:
        return web.json_response(
            {
                "pending": sender.pending(),
                "sent": sender.sent,
                "acknowledged": sender.acknowledged,
                "events": sender.log,
            }
        )

    app.router.add_route("*", "/_fake/webhooks/config", config)
    app.router.add_get("/_fake/webhooks", deliveries)
