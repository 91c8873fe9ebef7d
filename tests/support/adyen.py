"""The fake Adyen Checkout API served in-process for a test, and the adapter pointed at it.

``adyen_on_fake()`` serves ``provider_adapters.fake.adyen.create_adyen_app`` on a free port
with a recording middleware (so tests see each request's headers and body) and yields the
server's handle with an :class:`AdyenAdapter` on it; the adapter's connections are closed
on the way out.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
from aiohttp import web

from provider_adapters.adyen import AdyenAdapter
from provider_adapters.fake.adyen import API_KEY, MERCHANT_ACCOUNT, AdyenFaults, create_adyen_app
from tests.support.serving import serving

__all__ = ["AdyenFake", "SeenPost", "adyen_adapter", "adyen_on_fake", "running_adyen_fake"]


@dataclass(frozen=True)
class SeenPost:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class AdyenFake:
    url: str
    control: httpx.AsyncClient
    seen: list[SeenPost] = field(default_factory=list)

    async def effects(self) -> dict[str, int]:
        response = await self.control.get("/_fake/effects")
        response.raise_for_status()
        return {k: int(v["count"]) for k, v in response.json()["effects_by_key"].items()}

    async def configure(self, **faults: Any) -> None:
        response = await self.control.post("/_fake/config", json=faults)
        response.raise_for_status()

    async def advance_days(self, days: float) -> None:
        response = await self.control.post("/_fake/advance", json={"days": days})
        response.raise_for_status()

    async def notifications(self) -> list[dict[str, Any]]:
        response = await self.control.get("/_fake/webhooks")
        response.raise_for_status()
        items: list[dict[str, Any]] = response.json()["notifications"]
        return items


@asynccontextmanager
async def running_adyen_fake(faults: AdyenFaults | None = None) -> AsyncIterator[AdyenFake]:
    app = create_adyen_app(faults)
    seen: list[SeenPost] = []

    @web.middleware
    async def record(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if request.method == "POST" and not request.path.startswith("/_fake/"):
            seen.append(SeenPost(request.path, dict(request.headers), await request.read()))
        return await handler(request)

    app.middlewares.append(record)
    async with serving(app) as url, httpx.AsyncClient(base_url=url, timeout=5.0) as control:
        yield AdyenFake(url, control, seen)


@asynccontextmanager
async def adyen_adapter(base_url: str, **options: Any) -> AsyncIterator[AdyenAdapter]:
    settings: dict[str, Any] = {
        "name": "adyen",
        "api_key": API_KEY,
        "merchant_account": MERCHANT_ACCOUNT,
        "base_url": base_url,
        **options,
    }
    adapter = AdyenAdapter(**settings)
    try:
        yield adapter
    finally:
        await adapter.aclose()


@asynccontextmanager
async def adyen_on_fake(
    faults: AdyenFaults | None = None, **options: Any
) -> AsyncIterator[tuple[AdyenFake, AdyenAdapter]]:
    async with running_adyen_fake(faults) as fake, adyen_adapter(fake.url, **options) as adapter:
        yield fake, adapter
