"""The Stripe SDK's transport: a lane's own pooled HTTPX client, through the SDK's public API.

``stripe.HTTPXClient`` builds its ``httpx.AsyncClient`` itself and takes neither a client
nor a transport, so the lane's pool (:class:`~provider_adapters.http_pool.ShardedTransport`,
sized to the lane's concurrency) is plugged in the way the SDK documents for custom
clients instead: a subclass of ``stripe.HTTPClient`` implementing its async methods.
Requests are sent as ``stripe.HTTPXClient`` sends them (same method, URL, headers and
body bytes); a transport failure is raised as ``stripe.APIConnectionError`` with the HTTPX
error as ``__cause__``, which is what
:func:`~provider_adapters.stripe_errors.classify_connection_error` reads to tell "never
sent" from "maybe applied". The SDK's retries stay the SDK's: the adapter turns them off.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, Awaitable, Mapping
from typing import Any

import anyio
import httpx
import stripe

__all__ = ["PooledStripeHTTPClient"]

_CONNECTION_ERROR = (
    "Unexpected error communicating with Stripe: the request failed in transport "
    "(Network error: {name})"
)


class PooledStripeHTTPClient(stripe.HTTPClient):
    """A ``stripe.HTTPClient`` for async use only, sending every request through ``client``.

    Every SDK request goes through ``client`` (so through its transport); ``close_async``
    closes ``client``. The synchronous methods raise ``RuntimeError``: the relay is async.
    """

    # The SDK reports this in its telemetry and User-Agent ("httplib"), as HTTPXClient does.
    name = "httpx"

    def __init__(self, client: httpx.AsyncClient) -> None:
        super().__init__()
        self._httpx = client

    async def request_async(
        self, method: str, url: str, headers: Mapping[str, str], post_data: Any = None
    ) -> tuple[bytes, int, Mapping[str, str]]:
        try:
            response = await self._httpx.request(method, url, headers=headers, content=post_data)
        except Exception as exc:
            raise _connection_error(exc) from exc
        return response.content, response.status_code, response.headers

    async def request_stream_async(
        self, method: str, url: str, headers: Mapping[str, str], post_data: Any = None
    ) -> tuple[AsyncIterable[bytes], int, Mapping[str, str]]:
        request = self._httpx.build_request(method, url, headers=headers, content=post_data)
        try:
            response = await self._httpx.send(request, stream=True)
        except Exception as exc:
            raise _connection_error(exc) from exc
        return response.aiter_bytes(), response.status_code, response.headers

    async def close_async(self) -> None:
        await self._httpx.aclose()

    def sleep_async(self, secs: float) -> Awaitable[None]:
        return anyio.sleep(secs)

    def close(self) -> None:
        """Nothing synchronous to close; ``close_async`` closes the pool."""


def _connection_error(exc: Exception) -> stripe.APIConnectionError:
    # The SDK leaves this constructor unannotated.
    return stripe.APIConnectionError(  # type: ignore[no-untyped-call]
        _CONNECTION_ERROR.format(name=type(exc).__name__), should_retry=True
    )
