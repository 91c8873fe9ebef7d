"""A TCP proxy in front of RabbitMQ that a test can cut, blackhole and restore (the broker path).

Runs on an anyio event loop: in an async test with ``await tg.start(proxy.serve)``, or
from synchronous code in a blocking portal (``portal.start_task_soon(proxy.serve)``; call
:meth:`TcpProxy.cut`, :meth:`TcpProxy.blackhole` and :meth:`TcpProxy.restore` through
``portal.call``).

Three kinds of trouble:

* :meth:`TcpProxy.cut` closes every link and refuses new ones: both ends learn at once;
* :meth:`TcpProxy.blackhole` stops forwarding, in one direction or both, without closing
  anything (a partition, a dropped route, a dead NAT entry): bytes wait unread, heartbeats
  and confirms go missing, and only timeouts on either end can tell the link is dead. New
  connections are accepted and held the same way. :meth:`TcpProxy.restore` lets the held
  bytes flow again, as TCP retransmission would after the partition heals;
* :meth:`TcpProxy.slow` delays every chunk in one direction: a slow broker or path, whose
  confirms come late but come;
* :meth:`TcpProxy.refuse` closes the listening socket for good: a new connection is
  refused, so a client knows nothing it sends can have arrived (a provider that is down,
  as opposed to :meth:`TcpProxy.cut`, whose accepted-then-closed connections may follow a
  sent request).
"""

from __future__ import annotations

from typing import Literal
from urllib.parse import urlsplit, urlunsplit

import anyio
from anyio.abc import SocketAttribute, SocketStream, TaskStatus

__all__ = ["Direction", "TcpProxy"]

Direction = Literal["to_broker", "to_client"]


class TcpProxy:
    """Forwards a local port to the broker; see the module docstring for the failure modes."""

    def __init__(self, upstream_url: str) -> None:
        parts = urlsplit(upstream_url)
        self._upstream = (parts.hostname or "127.0.0.1", parts.port or 5672)
        self._parts = parts
        self._cut = False
        self._holes: frozenset[Direction] = frozenset()
        self._healed = anyio.Event()
        self._delays: dict[Direction, float] = {}
        self._links: set[anyio.CancelScope] = set()
        self._listening: anyio.CancelScope | None = None  # made in serve(): needs a loop
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
            with anyio.CancelScope() as self._listening:
                await listener.serve(self._handle)

    def refuse(self) -> None:
        """Close the listening socket and every link: connecting is refused from now on."""
        self.cut()
        if self._listening is not None:
            self._listening.cancel()

    def cut(self) -> None:
        self._cut = True
        for link in list(self._links):
            link.cancel()

    def blackhole(self, *, to_broker: bool = True, to_client: bool = True) -> None:
        """Stop forwarding (client to broker, broker to client, or both); close nothing."""
        holes: set[Direction] = set()
        if to_broker:
            holes.add("to_broker")
        if to_client:
            holes.add("to_client")
        if not self._holes:
            self._healed = anyio.Event()
        self._holes = frozenset(holes)

    def slow(self, direction: Direction, seconds: float) -> None:
        """Hold each chunk going ``direction`` for ``seconds`` before forwarding it."""
        self._delays[direction] = seconds

    def restore(self) -> None:
        self._cut = False
        self._holes = frozenset()
        self._delays.clear()
        self._healed.set()

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
                            tg.start_soon(self._pipe, client, upstream, link, "to_broker")
                            tg.start_soon(self._pipe, upstream, client, link, "to_client")
                    finally:
                        self._links.discard(link)

    async def _flowing(self, direction: Direction) -> None:
        while direction in self._holes:
            await self._healed.wait()

    async def _pipe(
        self,
        source: SocketStream,
        sink: SocketStream,
        link: anyio.CancelScope,
        direction: Direction,
    ) -> None:
        try:
            while True:
                await self._flowing(direction)
                chunk = await source.receive()
                if delay := self._delays.get(direction):
                    await anyio.sleep(delay)
                await self._flowing(direction)  # a chunk read as the hole opened waits too
                await sink.send(chunk)
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass
        link.cancel()  # one side gone: drop the other
