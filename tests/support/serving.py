"""An aiohttp application served in-process for a test, on a free port of 127.0.0.1 (port
0, so two tests never race for a port), stopped when the block ends, however it ends."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiohttp import web

__all__ = ["serving"]


@asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[str]:
    """Serve ``app``; yields its base URL (``http://127.0.0.1:PORT``)."""
    # A reply held open (a fake's "timeout after effect") must not keep the test waiting
    # at shutdown.
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()
