"""The fake Stripe-compatible provider served in-process for a test, on a free port.

The server is the shipped one (``provider_adapters.fake.create_app``), bound to port 0 as
``relay/cli/demo.py`` does so two tests never race for a port. The only addition is a
recording middleware, appended from here, so tests can see the headers each request
carried (``traceparent``, ``Idempotency-Key``) without changing the server, and when it
arrived on a clock of the test's choosing (``running_fake(clock=...)``); a test may add its
own middlewares inside it (``running_fake(middlewares=...)``: replies mangled on the way out).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import stripe
from aiohttp import web

from provider_adapters.fake import FaultConfig, create_app
from tests.support.serving import serving

API_KEY = "sk_test_outbox_relay"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Middleware = Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class SeenRequest:
    method: str
    path: str
    headers: dict[str, str]
    at: float = 0.0  # the clock given to running_fake when the request arrived (else 0)


@dataclass
class FakeServer:
    url: str
    control: httpx.AsyncClient
    seen: list[SeenRequest] = field(default_factory=list)

    async def effects(self) -> dict[str, Any]:
        response = await self.control.get("/_fake/effects")
        response.raise_for_status()
        body: dict[str, Any] = response.json()
        return body

    async def effect_count(self, key: str) -> int:
        entry = (await self.effects())["effects_by_key"].get(key)
        return 0 if entry is None else int(entry["count"])

    async def configure(self, **faults: Any) -> None:
        response = await self.control.post("/_fake/config", json=faults)
        response.raise_for_status()

    async def request_log(self) -> list[dict[str, Any]]:
        """The server's own log of POSTs with start and end times (monotonic seconds)."""
        response = await self.control.get("/_fake/requests")
        response.raise_for_status()
        entries: list[dict[str, Any]] = response.json()["requests"]
        return entries

    def posts(self) -> list[SeenRequest]:
        return [r for r in self.seen if r.method == "POST" and r.path.startswith("/v1/")]


def stripe_client(
    url: str, *, api_key: str = API_KEY, timeout: float = 5.0
) -> tuple[stripe.StripeClient, stripe.HTTPXClient]:
    """The official SDK, async over HTTPX, its own retries off (as the adapter runs it)."""
    http = stripe.HTTPXClient(timeout=timeout)
    client = stripe.StripeClient(
        api_key, base_addresses={"api": url}, http_client=http, max_network_retries=0
    )
    return client, http


@asynccontextmanager
async def running_fake(
    faults: FaultConfig | None = None,
    *,
    clock: Callable[[], float] | None = None,
    middlewares: Iterable[Middleware] = (),
) -> AsyncIterator[FakeServer]:
    """The fake provider on a free port of 127.0.0.1, recording every request it sees;
    ``middlewares`` wrap its handlers inside the recorder (e.g. to mangle its replies)."""
    app = create_app(faults)
    seen: list[SeenRequest] = []

    @web.middleware
    async def record(request: web.Request, handler: Handler) -> web.StreamResponse:
        at = 0.0 if clock is None else clock()
        seen.append(SeenRequest(request.method, request.path, dict(request.headers), at))
        return await handler(request)

    app.middlewares.append(record)
    app.middlewares.extend(middlewares)
    async with serving(app) as url, httpx.AsyncClient(base_url=url, timeout=5.0) as control:
        yield FakeServer(url, control, seen)
