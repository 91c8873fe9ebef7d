"""A clock the test moves by hand, for the pure breaker and bucket and for lanes.

``ManualClock()`` reads as a number (``clock()``); ``clock.sleep(s)`` returns only once a
test has :meth:`ManualClock.advance`-d time by ``s`` or more, so nothing waits on real time.
``clock.lane_clock`` is the pair a :class:`relay.core.lanes.Lane` takes.
"""

from __future__ import annotations

import anyio

from relay.core.clock import Clock

__all__ = ["ManualClock"]


class ManualClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self._moved: anyio.Event | None = None  # set by the next advance()
        self.sleepers = 0  # tasks currently waiting in sleep()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move time on; every sleeper whose time has come wakes up."""
        if seconds < 0:
            raise ValueError("a monotonic clock never goes back")
        self.now += seconds
        if self._moved is not None:
            self._moved.set()
            self._moved = None

    async def sleep(self, seconds: float) -> None:
        until = self.now + seconds
        self.sleepers += 1
        try:
            while self.now < until:
                if self._moved is None:
                    self._moved = anyio.Event()
                await self._moved.wait()
        finally:
            self.sleepers -= 1

    @property
    def lane_clock(self) -> Clock:
        return Clock(now=self, sleep=self.sleep)
