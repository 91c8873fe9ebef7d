"""Commands for adapter tests, and the checks every adapter call must pass.

``command(action, key)`` is a EUR command of 1000 minor units whose payment id derives from
``key``; authorize and charge carry a payment method. ``outcome_of`` fails the test unless
an adapter's answer is exactly one of the five outcome classes of provider_adapters/base.py.
"""

from __future__ import annotations

from typing import cast, get_args

from provider_adapters.base import Action, Command, Outcome, ProviderAdapter, Succeeded

__all__ = ["authorized", "charged", "command", "outcome_of", "succeeded"]


def command(
    action: Action,
    key: str,
    amount: int = 1000,
    *,
    reference: str | None = None,
    method: str | None = "pm_card_visa",
    traceparent: str | None = None,
) -> Command:
    return Command(
        intent_id=abs(hash(key)) % 10_000,
        payment_id=f"pay-{key}",
        action=action,
        idempotency_key=key,
        amount_minor=amount,
        currency="EUR",
        payment_method=method if action in (Action.AUTHORIZE, Action.CHARGE) else None,
        payment_reference=reference,
        traceparent=traceparent,
    )


def outcome_of(answer: object) -> Outcome:
    """``answer``, checked to be one outcome of the taxonomy (never an exception, never
    anything else)."""
    assert isinstance(answer, get_args(Outcome)), answer
    return cast(Outcome, answer)


async def succeeded(adapter: ProviderAdapter, cmd: Command) -> Succeeded:
    outcome = outcome_of(await adapter.execute(cmd))
    assert isinstance(outcome, Succeeded), outcome
    return outcome


async def authorized(adapter: ProviderAdapter, key: str, amount: int = 1000) -> str:
    """The payment reference of a new authorization."""
    return (await succeeded(adapter, command(Action.AUTHORIZE, key, amount))).payment_reference


async def charged(adapter: ProviderAdapter, key: str, amount: int = 1000) -> str:
    """The payment reference of a new charge."""
    return (await succeeded(adapter, command(Action.CHARGE, key, amount))).payment_reference
