"""A TCP proxy in front of RabbitMQ that a test can cut and restore (the broker path).

Runs on an anyio event loop: in an async test with ``await tg.start(proxy.serve)``, or
from synchronous code in a blocking portal (``portal.start_task_soon(proxy.serve)``; call
:meth:`TcpProxy.cut` and :meth:`TcpProxy.restore` through ``portal.call``).
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

import anyio
from anyio.abc import SocketAttribute, SocketStream, TaskStatus

__all__ = ["TcpProxy"]


class TcpProxy:
    """Forwards a local port to the broker; :meth:`cut` drops every link and refuses new ones."""

    def __init__(self, upstream_url: str) -> None:
        parts = urlsplit(upstream_url)
        self._upstream = (parts.hostname or "127.0.0.1", parts.port or 5672)
        self._parts = parts
        self._cut = False
        self._links: set[anyio.CancelScope] = set()
        self.port = 0

    @property
    def url(self) -> str:
        userinfo = self._parts.netloc.rpartition("@")[0]
        netloc = f"{userinfo}@127.0.0.1:{self.port}" if userinfo else f"127.0.0.1:{self.port}"
        return urlunsplit(self._parts._replace(netloc=netloc))

    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        self.port = listener.listeners[0].extra(SocketAttribute.local_port)
        task_status.started()
        async with listener:
            await listener.serve(self._handle)

    def cut(self) -> None:
        self._cut = True
        for link in list(self._links):
            link.cancel()

    def restore(self) -> None:
        self._cut = False

    async def _handle(self, client: SocketStream) -> None:
        async with client:
            if self._cut:
                return
            try:
                upstream = await anyio.connect_tcp(*self._upstream)
            except OSError:
                return
            async with upstream:
                with anyio.CancelScope() as link:
                    self._links.add(link)
                    try:
                        async with anyio.create_task_group() as tg:
                            tg.start_soon(self._pipe, client, upstream, link)
                            tg.start_soon(self._pipe, upstream, client, link)
                    finally:
                        self._links.discard(link)

    @staticmethod
    async def _pipe(source: SocketStream, sink: SocketStream, link: anyio.CancelScope) -> None:
        try:
            async for chunk in source:
                await sink.send(chunk)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass
        link.cancel()  # one side gone: drop the other
