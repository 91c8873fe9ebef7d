"""An in-process provider with Stripe's idempotency semantics and zero latency.

For benchmarks and for relay tests that need a provider but not HTTP. It keeps payments
and refunds in memory, replays the first result of a key, and counts applied effects per
idempotency key, like the fake HTTP provider. Payment methods follow Stripe's test
tokens: ``pm_card_chargeDeclined*`` declines, anything else succeeds.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass, field

from provider_adapters.base import (
    Action,
    Command,
    Declined,
    Invalid,
    Outcome,
    Retryable,
    Succeeded,
)

__all__ = ["MemoryProvider"]


@dataclass
class _Payment:
    id: str
    amount: int
    currency: str
    status: str  # requires_capture | succeeded | canceled
    received: int = 0
    refunded: int = 0


@dataclass
class MemoryProvider:
    name: str = "memory"
    effects: Counter[str] = field(default_factory=Counter)
    calls: int = 0
    _results: dict[str, Outcome] = field(default_factory=dict)
    _payments: dict[str, _Payment] = field(default_factory=dict)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    async def execute(self, command: Command) -> Outcome:
        self.calls += 1
        if command.idempotency_key in self._results:
            stored = self._results[command.idempotency_key]
            if isinstance(stored, Succeeded):
                return Succeeded(
                    stored.provider_reference,
                    stored.payment_reference,
                    stored.amount_minor,
                    stored.currency,
                    replayed=True,
                )
            return stored
        outcome = self._apply(command)
        self._results[command.idempotency_key] = outcome
        return outcome

    async def lookup(self, command: Command) -> Outcome:
        return self._results.get(
            command.idempotency_key, Retryable("not_found", "no attempt with this key")
        )

    async def aclose(self) -> None:
        return None

    def _apply(self, command: Command) -> Outcome:
        if command.action in (Action.AUTHORIZE, Action.CHARGE):
            if (command.payment_method or "").startswith("pm_card_chargeDeclined"):
                return Declined("card_declined", "Your card was declined.")
            pid = f"pi_mem_{next(self._ids)}"
            charge = command.action is Action.CHARGE
            self._payments[pid] = _Payment(
                pid,
                command.amount_minor,
                command.currency,
                "succeeded" if charge else "requires_capture",
                received=command.amount_minor if charge else 0,
            )
            self.effects[command.idempotency_key] += 1
            return Succeeded(pid, pid, command.amount_minor, command.currency)
        payment = self._payments.get(command.payment_reference or "")
        if payment is None:
            return Invalid("resource_missing", f"no such payment: {command.payment_reference}")
        if command.action is Action.CAPTURE:
            if payment.status != "requires_capture" or command.amount_minor > payment.amount:
                return Invalid("payment_intent_unexpected_state", "cannot capture")
            payment.status, payment.received = "succeeded", command.amount_minor
            self.effects[command.idempotency_key] += 1
            return Succeeded(payment.id, payment.id, command.amount_minor, payment.currency)
        if command.action is Action.VOID:
            if payment.status != "requires_capture":
                return Invalid("payment_intent_unexpected_state", "cannot cancel")
            payment.status = "canceled"
            self.effects[command.idempotency_key] += 1
            return Succeeded(payment.id, payment.id, command.amount_minor, payment.currency)
        if (
            payment.status != "succeeded"
            or payment.refunded + command.amount_minor > payment.received
        ):
            return Invalid("amount_too_large", "refund exceeds the captured amount")
        payment.refunded += command.amount_minor
        self.effects[command.idempotency_key] += 1
        return Succeeded(
            f"re_mem_{next(self._ids)}", payment.id, command.amount_minor, payment.currency
        )
