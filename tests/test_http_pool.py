"""The lane's sharded HTTP pool (provider_adapters/http_pool.py) against a real local server:
every call of a full lane runs at once (no shard queues while another has room), each
shard's slot is freed when its response closes or its request fails, and HTTPX's own
errors come through unchanged (the Stripe adapter classifies them)."""

from __future__ import annotations

import anyio
import httpx
import pytest
from aiohttp import web

from provider_adapters.http_pool import ShardedTransport
from tests.processes import free_port

pytestmark = pytest.mark.anyio


async def _serve(port: int, seen: dict[str, int]) -> web.AppRunner:
    async def handler(request: web.Request) -> web.Response:
        seen["now"] += 1
        seen["peak"] = max(seen["peak"], seen["now"])
        peer = request.transport.get_extra_info("peername") if request.transport else None
        seen[f"peer:{peer}"] = 1
        try:
            await anyio.sleep(0.2)
        finally:
            seen["now"] -= 1
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/call", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


async def test_a_full_lane_runs_every_call_at_once_and_frees_every_slot() -> None:
    port = free_port()
    seen: dict[str, int] = {"now": 0, "peak": 0}
    runner = await _serve(port, seen)
    transport = ShardedTransport(20)
    try:
        assert transport.shards == 3
        async with httpx.AsyncClient(transport=transport, timeout=30) as client:

            async def call() -> None:
                response = await client.post(f"http://127.0.0.1:{port}/call", json={})
                assert response.json() == {"ok": True}

            for _ in range(2):  # the second round reuses the kept-alive connections
                async with anyio.create_task_group() as tg:
                    for _ in range(20):
                        tg.start_soon(call)
                assert transport._open == [0, 0, 0]
    finally:
        await runner.cleanup()
    assert seen["peak"] == 20, "every call of a full lane was in flight at once"
    peers = [key for key in seen if key.startswith("peer:")]
    assert 20 <= len(peers) <= 21, "one connection per concurrent call, reused, never more"


async def test_a_failed_request_frees_its_slot_and_keeps_httpx_errors() -> None:
    transport = ShardedTransport(4)
    async with httpx.AsyncClient(transport=transport, timeout=5) as client:
        with pytest.raises(httpx.ConnectError):
            await client.post(f"http://127.0.0.1:{free_port()}/call", json={})
    assert transport._open == [0]
