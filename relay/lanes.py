"""A lane per provider: its own adapter (HTTP pool), slot count and call deadline.

The claim loop only claims what a lane's free slots can take, so a slow provider fills
its own lane and no other. Every provider call runs under a deadline a little above the
adapter's own read timeout; hitting it counts as ambiguous (the request may have been
sent), never as failure.
"""

from __future__ import annotations

import time

import anyio

from provider_adapters.base import Ambiguous, Command, Outcome, ProviderAdapter
from relay import metrics

__all__ = ["Lane"]


class Lane:
    def __init__(
        self, provider: str, adapter: ProviderAdapter, *, concurrency: int, timeout_seconds: float
    ) -> None:
        self.provider = provider
        self.adapter = adapter
        self.concurrency = concurrency
        self.timeout_seconds = timeout_seconds
        self.in_flight = 0

    @property
    def free_slots(self) -> int:
        return max(self.concurrency - self.in_flight, 0)

    def acquire(self) -> None:
        self.in_flight += 1
        metrics.IN_FLIGHT.labels(provider=self.provider).set(self.in_flight)

    def release(self) -> None:
        self.in_flight -= 1
        metrics.IN_FLIGHT.labels(provider=self.provider).set(self.in_flight)

    async def execute(self, command: Command) -> Outcome:
        return await self._guarded(command, lookup=False)

    async def lookup(self, command: Command) -> Outcome:
        return await self._guarded(command, lookup=True)

    async def _guarded(self, command: Command, *, lookup: bool) -> Outcome:
        started = time.perf_counter()
        call = self.adapter.lookup if lookup else self.adapter.execute
        outcome: Outcome = Ambiguous(
            "provider_timeout",
            f"no answer within the lane deadline of {self.timeout_seconds:g} s",
        )
        with anyio.move_on_after(self.timeout_seconds + 1.0):
            outcome = await call(command)
        metrics.PROVIDER_CALL_SECONDS.labels(
            provider=self.provider, action=str(command.action)
        ).observe(time.perf_counter() - started)
        return outcome
