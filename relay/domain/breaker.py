"""Circuit breaker per provider lane: closed, open, half-open. Pure logic, clock injected.

* closed: calls flow; ``failure_threshold`` consecutive failures open the breaker.
* open: no calls, and the claim loop claims nothing for the lane, so the intents keep
  their attempts; after ``cooldown_seconds`` the breaker turns half-open.
* half-open: at most ``half_open_probes`` calls at once are let through; a success
  closes the breaker, a failure re-opens it for another cool-down.

A "failure" is a provider that did not answer usefully (retryable or ambiguous outcome,
lane deadline). A decline or an invalid request is an answer: the provider is healthy.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable

__all__ = ["BreakerState", "CircuitBreaker"]


class BreakerState(enum.IntEnum):
    """Values are the ``outbox_relay_breaker_state`` gauge's."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class CircuitBreaker:
    def __init__(
        self,
        *,
        failure_threshold: int,
        cooldown_seconds: float,
        half_open_probes: int,
        clock: Callable[[], float],
    ) -> None:
        if failure_threshold < 1 or half_open_probes < 1 or cooldown_seconds < 0:
            raise ValueError(
                "failure_threshold and half_open_probes must be >= 1, cooldown_seconds >= 0"
            )
        self.failure_threshold = failure_threshold
        self.cooldown_seconds = cooldown_seconds
        self.half_open_probes = half_open_probes
        self._clock = clock
        self._state = BreakerState.CLOSED
        self._consecutive_failures = 0
        self._opened_at = 0.0
        self._probes_out = 0
        self.times_opened = 0
        # (clock time, new state): for metrics, logs and tests reading the breaker's story.
        self.transitions: deque[tuple[float, BreakerState]] = deque(maxlen=1_000)

    @property
    def state(self) -> BreakerState:
        if (
            self._state is BreakerState.OPEN
            and self._clock() - self._opened_at >= self.cooldown_seconds
        ):
            self._state = BreakerState.HALF_OPEN
            self._probes_out = 0
            self.transitions.append((self._opened_at + self.cooldown_seconds, self._state))
        return self._state

    def allowance(self) -> int | None:
        """How many more calls may start now: None means unlimited (closed)."""
        state = self.state
        if state is BreakerState.CLOSED:
            return None
        if state is BreakerState.OPEN:
            return 0
        return max(self.half_open_probes - self._probes_out, 0)

    def seconds_until_half_open(self) -> float:
        if self.state is not BreakerState.OPEN:
            return 0.0
        return max(self.cooldown_seconds - (self._clock() - self._opened_at), 0.0)

    def try_start(self) -> bool:
        """Reserve the right to make one call; False while open or out of probes."""
        allowance = self.allowance()
        if allowance is None:
            return True
        if allowance <= 0:
            return False
        self._probes_out += 1
        return True

    def record_success(self) -> None:
        self._consecutive_failures = 0
        if self._state is not BreakerState.CLOSED:
            self._state = BreakerState.CLOSED
            self._probes_out = 0
            self.transitions.append((self._clock(), self._state))

    def record_failure(self) -> None:
        state = self.state
        if state is BreakerState.HALF_OPEN:
            self._open()
            return
        if state is BreakerState.OPEN:
            return  # a call that started before the breaker opened
        self._consecutive_failures += 1
        if self._consecutive_failures >= self.failure_threshold:
            self._open()

    def cancel_start(self) -> None:
        """A reserved call did not happen (shutdown): give the probe back."""
        if self._state is BreakerState.HALF_OPEN and self._probes_out > 0:
            self._probes_out -= 1

    def _open(self) -> None:
        self._state = BreakerState.OPEN
        self._opened_at = self._clock()
        self._consecutive_failures = 0
        self._probes_out = 0
        self.times_opened += 1
        self.transitions.append((self._opened_at, self._state))
