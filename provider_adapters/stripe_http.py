"""The Stripe SDK's transport: its own ``stripe.AIOHTTPClient`` on a session the lane owns.

Why aiohttp: the SDK's request building and error handling are why the adapter uses it,
but its HTTPX client cost the relay about 2 ms of CPU per call, most of it in httpx and
httpcore (docs/performance.md, "Provider call cost"); the same SDK on its aiohttp client
costs a fraction of that, with the same requests, replies and exceptions.

:class:`LaneSession` holds what the SDK's ``AIOHTTPClient`` is given: one
``aiohttp.ClientSession`` whose connector keeps at most ``max_connections`` connections
(the lane's concurrency: its bulkhead, never shared with another lane), with a connect
timeout (which also bounds the wait for a free connection) and a read timeout applied to
every call. TLS is verified against the SDK's own CA bundle, as ``AIOHTTPClient`` does
when it builds a session itself.

aiohttp binds a session to the event loop that creates it, and lanes are built before
the loop runs in some callers, so the session is opened on first use and closed by
:meth:`LaneSession.aclose`, which the lane's owner awaits on the way out (the relay's
main task, or a test's). A failure to reach the provider is raised by the SDK as
``stripe.APIConnectionError`` with the aiohttp error as ``__cause__``, which is what
:func:`~provider_adapters.stripe_errors.classify_connection_error` reads to tell "never
sent" from "maybe applied". The SDK's own retries are off (the adapter's choice).
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from typing import Any

import aiohttp
import stripe

__all__ = ["LaneSession"]


class _AIOHTTPClient(stripe.AIOHTTPClient):
    """``stripe.AIOHTTPClient`` whose reply body is read under the same error handling as
    the request: the SDK reads the body outside its ``try``, so a reset or a read timeout
    while the body arrives would escape as a bare aiohttp error instead of the
    ``APIConnectionError`` a failure before the headers gives."""

    async def request_async(
        self, method: str, url: str, headers: Mapping[str, str], post_data: Any = None
    ) -> tuple[bytes, int, Mapping[str, str]]:
        try:
            return await super().request_async(method, url, headers, post_data)
        except stripe.APIConnectionError:
            raise
        except (aiohttp.ClientError, OSError) as exc:
            # TimeoutError is an OSError: a read timeout while the body arrives lands here.
            raise _connection_error(exc) from exc


def _connection_error(exc: BaseException) -> stripe.APIConnectionError:
    # Worded as the SDK words its own; the SDK leaves this constructor unannotated.
    return stripe.APIConnectionError(  # type: ignore[no-untyped-call]
        "Unexpected error communicating with Stripe: the reply broke off "
        f"(Network error: A {type(exc).__name__} was raised)",
        should_retry=True,
    )


class LaneSession:
    """A lane's HTTP session for the Stripe SDK, opened on first use in the running loop."""

    def __init__(
        self,
        *,
        max_connections: int,
        connect_timeout_seconds: float,
        read_timeout_seconds: float,
    ) -> None:
        self.max_connections = max_connections
        self.timeout = aiohttp.ClientTimeout(
            total=None,
            connect=connect_timeout_seconds,
            sock_connect=connect_timeout_seconds,
            sock_read=read_timeout_seconds,
        )
        self._session: aiohttp.ClientSession | None = None
        self._client: stripe.AIOHTTPClient | None = None

    def http_client(self) -> stripe.AIOHTTPClient:
        """The SDK's client on this lane's session; the first call opens the session, and
        must be made in the event loop that will use it."""
        if self._client is None:
            connector = aiohttp.TCPConnector(
                limit=self.max_connections,
                ssl=ssl.create_default_context(cafile=stripe.ca_bundle_path),
            )
            self._session = aiohttp.ClientSession(connector=connector, timeout=self.timeout)
            self._client = _AIOHTTPClient(session=self._session, timeout=self.timeout)
        return self._client

    @property
    def session(self) -> aiohttp.ClientSession | None:
        """The open session (None before the first call and after :meth:`aclose`)."""
        return self._session

    async def aclose(self) -> None:
        """Close the session and its connections; the next call opens a new one."""
        session, self._session, self._client = self._session, None, None
        if session is not None:
            await session.close()
