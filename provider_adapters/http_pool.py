"""A lane's HTTP connection pool, split into small pools behind one HTTPX transport.

Why: httpcore checks every pooled connection (``has_expired``: a ``getpeername`` and a
readability poll each) whenever a request is queued or a response closes, so one pool of
C connections costs O(C) per request and O(C²) per round of C concurrent calls. Measured
with 100 ms provider latency (benchmarks/provider_latency.py): C = 32 reached 88 % of C /
latency, C = 64 only 16 %, the relay's CPU spent in that scan. Shards of at most
``SHARD_SIZE`` connections keep each scan short; a request goes to the shard with the
fewest open exchanges. The lane's concurrency still bounds the calls in flight, so the
connections in use never exceed it; errors are HTTPX's own, unchanged.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable

import httpx

__all__ = ["SHARD_SIZE", "ShardedTransport"]

SHARD_SIZE = 8


class ShardedTransport(httpx.AsyncBaseTransport):
    def __init__(self, max_connections: int, *, shard_size: int = SHARD_SIZE) -> None:
        shards = max(1, math.ceil(max_connections / shard_size))
        per_shard = math.ceil(max_connections / shards)
        limits = httpx.Limits(max_connections=per_shard, max_keepalive_connections=per_shard)
        self._shards = [httpx.AsyncHTTPTransport(limits=limits) for _ in range(shards)]
        self._open = [0] * shards

    @property
    def shards(self) -> int:
        return len(self._shards)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        shard = min(range(len(self._shards)), key=self._open.__getitem__)
        self._open[shard] += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self._open[shard] -= 1

        try:
            response = await self._shards[shard].handle_async_request(request)
        except BaseException:
            release()
            raise
        assert isinstance(response.stream, httpx.AsyncByteStream)
        response.stream = _ReleasingStream(response.stream, release)
        return response

    async def aclose(self) -> None:
        for shard in self._shards:
            await shard.aclose()


class _ReleasingStream(httpx.AsyncByteStream):
    """The response body; closing it (HTTPX always does) frees the shard's slot."""

    def __init__(self, stream: httpx.AsyncByteStream, release: Callable[[], None]) -> None:
        self._stream = stream
        self._release = release

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._stream:
            yield chunk

    async def aclose(self) -> None:
        try:
            await self._stream.aclose()
        finally:
            self._release()
