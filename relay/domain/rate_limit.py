"""Token bucket per provider lane: ``rate`` calls per second with bursts of ``burst``.

Pure logic with an injected clock. A call takes one token; tokens refill continuously up
to ``burst``. Over any interval of length t, at most ``burst + rate * t`` calls start.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["TokenBucket"]


class TokenBucket:
    def __init__(self, *, rate: float, burst: int, clock: Callable[[], float]) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._updated = clock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._updated) * self.rate)
        self._updated = now

    def available(self) -> float:
        self._refill()
        return self._tokens

    def try_take(self) -> bool:
        """Take a token if one is there."""
        self._refill()
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def give_back(self) -> None:
        """Return a token taken for a call that was not made (up to the burst)."""
        self._refill()
        self._tokens = min(self.burst, self._tokens + 1.0)

    def seconds_until_token(self) -> float:
        self._refill()
        return 0.0 if self._tokens >= 1.0 else (1.0 - self._tokens) / self.rate

    def obtainable_within(self, seconds: float) -> int:
        """Tokens that can be taken between now and ``seconds`` from now (claim sizing)."""
        self._refill()
        return int(min(self.burst, self._tokens) + self.rate * seconds)
