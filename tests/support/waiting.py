"""Wait until a condition holds: one helper for async tests, one for blocking code.

Both poll ``check`` until it returns something truthy and return that value. The guard is
a liveness guard, not a speed limit: it only turns a hang into a failure that names
``what`` was awaited. ``check`` of :func:`wait_until` may be a plain or an async function.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import pytest

__all__ = ["GUARD_SECONDS", "block_until", "wait_until"]

GUARD_SECONDS = 300.0  # generous: a loaded 2-core machine is slow, not hung


async def wait_until(
    check: Callable[[], Any] | Callable[[], Awaitable[Any]],
    what: str = "",
    *,
    guard_seconds: float = GUARD_SECONDS,
    every: float = 0.05,
) -> Any:
    """Poll ``check`` every ``every`` seconds inside the event loop; return its first
    truthy result; fail the test after ``guard_seconds``."""
    with anyio.move_on_after(guard_seconds):
        while True:
            result = check()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return result
            await anyio.sleep(every)
    pytest.fail(_hang(what or _name(check), guard_seconds))


def block_until(
    check: Callable[[], Any],
    what: str = "",
    *,
    guard_seconds: float = GUARD_SECONDS,
    every: float = 0.1,
) -> Any:
    """The same for code outside an event loop (threads, child processes): sleeps
    between polls; returns ``check``'s first truthy result."""
    deadline = time.monotonic() + guard_seconds
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() >= deadline:
            pytest.fail(_hang(what or _name(check), guard_seconds))
        time.sleep(every)


def _name(check: Callable[..., Any]) -> str:
    name = getattr(check, "__name__", repr(check))
    return "a condition" if name == "<lambda>" else name


def _hang(what: str, guard_seconds: float) -> str:
    return f"gave up waiting for {what} after {guard_seconds:g} s (a hang guard, no speed limit)"
