"""The time a lane reads and waits on, injectable so tests can drive it by hand.

A :class:`Clock` is a pair: ``now()`` in seconds on a monotonic scale, and ``sleep(s)``
that returns once ``now()`` has moved on by at least ``s``. :data:`SYSTEM_CLOCK` is the
real one (``time.monotonic``, which is also the asyncio event loop's clock, and
``anyio.sleep``); a test passes its own pair and moves time itself.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import anyio

__all__ = ["SYSTEM_CLOCK", "Clock"]


@dataclass(frozen=True, slots=True)
class Clock:
    now: Callable[[], float]
    sleep: Callable[[float], Awaitable[None]]


SYSTEM_CLOCK = Clock(now=time.monotonic, sleep=anyio.sleep)
