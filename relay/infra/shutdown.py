"""Shielded writes that a shutdown still bounds.

A write that a cancellation must not cut in half (the final marks of published events, a
janitor's settlement, an inbox apply) runs in a shielded cancel scope. A shield outlasts
every cancellation, so a database that stopped answering would hold the process past its
promised exit. :class:`CutOffShields` gives each such scope its own bound and, once
:meth:`CutOffShields.cut_off` is called, the shutdown's: on the scopes still open as well
as on those opened later. A write cut short rolls back whole; its work is done again by
whoever takes it next (leases expire).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import anyio

__all__ = ["CutOffShields"]


class CutOffShields:
    def __init__(self) -> None:
        self.cut_off_at: float | None = None  # anyio clock
        self._open: set[anyio.CancelScope] = set()

    def cut_off(self, at: float) -> None:
        """End every shielded scope, open or to come, by ``at`` (anyio clock); the
        earliest of several cut-offs holds."""
        self.cut_off_at = at if self.cut_off_at is None else min(self.cut_off_at, at)
        for scope in self._open:
            scope.deadline = min(scope.deadline, self.cut_off_at)

    @contextmanager
    def shielded(self, seconds: float) -> Iterator[anyio.CancelScope]:
        """A shielded scope ending after ``seconds`` or at the cut-off, whichever is first;
        ``scope.cancelled_caught`` tells the caller its write was cut short."""
        deadline = anyio.current_time() + seconds
        if self.cut_off_at is not None:
            deadline = min(deadline, self.cut_off_at)
        with anyio.CancelScope(shield=True, deadline=deadline) as scope:
            self._open.add(scope)
            try:
                yield scope
            finally:
                self._open.discard(scope)
