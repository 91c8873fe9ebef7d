"""Exponential backoff with full jitter, Retry-After honoured, attempts capped.

Pure logic, no I/O; the random source is injected so tests never sleep.

* ``backoff_seconds(n)`` lies in ``[0, min(cap, base * 2**(n-1))]`` before Retry-After;
* with Retry-After ``r`` the delay is at least ``min(r, 3600)``;
* ``exhausted(n)`` is true once ``n >= max_attempts``: the intent goes ``dead``.

The worst-case retry window (:meth:`RetryPolicy.worst_case_total_seconds`) must stay
inside the provider's idempotency-key lifetime (Stripe keeps keys at least 24 h).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["IDEMPOTENCY_KEY_LIFETIME_SECONDS", "RetryPolicy", "capped_doubling", "half_jitter"]

IDEMPOTENCY_KEY_LIFETIME_SECONDS = 24 * 3600
_RETRY_AFTER_CEILING = 3600.0
_MAX_EXPONENT = 62  # 2**62 * base overflows nothing and exceeds any sane cap


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    base_seconds: float
    cap_seconds: float
    max_attempts: int

    def __post_init__(self) -> None:
        if not self.base_seconds > 0:
            raise ValueError(f"base_seconds must be > 0, got {self.base_seconds}")
        if self.cap_seconds < self.base_seconds:
            raise ValueError(
                f"cap_seconds ({self.cap_seconds}) must be >= base_seconds ({self.base_seconds})"
            )
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")

    def ceiling_seconds(self, attempt: int) -> float:
        """Largest delay after failed attempt ``attempt`` (1-based), before Retry-After."""
        return capped_doubling(self.base_seconds, self.cap_seconds, attempt)

    def backoff_seconds(
        self,
        attempt: int,
        rng: Callable[[], float],
        retry_after_seconds: float | None = None,
    ) -> float:
        delay = rng() * self.ceiling_seconds(attempt)
        if retry_after_seconds is not None and retry_after_seconds > 0:
            delay = max(delay, min(retry_after_seconds, _RETRY_AFTER_CEILING))
        return delay

    def exhausted(self, attempts_made: int) -> bool:
        return attempts_made >= self.max_attempts

    def worst_case_total_seconds(self) -> float:
        """Sum of the delay ceilings between the first and the last attempt."""
        return sum(self.ceiling_seconds(n) for n in range(1, self.max_attempts))


def capped_doubling(base_seconds: float, cap_seconds: float, attempt: int) -> float:
    """The bound of the wait after failure ``attempt`` (1-based): ``base``, doubling per
    failure, at most ``cap``. Every backoff of the relay (retries, reconnects, start-up)
    uses it."""
    exponent = min(max(attempt - 1, 0), _MAX_EXPONENT)
    return min(cap_seconds, base_seconds * float(2**exponent))


def half_jitter(bound_seconds: float, rng: Callable[[], float]) -> float:
    """A wait between half of ``bound`` and all of it: replicas spread out, yet none
    retries much sooner than the bound says."""
    return bound_seconds * (0.5 + rng() / 2)
