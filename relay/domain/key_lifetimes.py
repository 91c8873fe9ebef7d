"""The database's idempotency-key lifetime per provider against what the provider keeps.

Pure logic, no I/O. The database parks an intent that was already sent once it is older
than ``outbox.idempotency_key_lifetime(provider)`` (sql/0005: rows of
``outbox.provider_policies``, ``'*'`` = 24 hours), so that a key the provider may have
forgotten is never sent again (a resend could take effect twice). That is safe only while
the database's lifetime is at most the provider's own: Stripe keeps keys 24 hours, Adyen
31 days (each adapter's ``idempotency_key_lifetime_seconds``). Guarantees, each tested:

* a provider whose database lifetime exceeds its adapter's is *unsafe*: the relay refuses
  to start for it (relay/service/main.py), naming the row to change;
* a shorter database lifetime is safe (an intent is parked earlier than it need be, and
  settled by the janitor or an operator) and only noted;
* an adapter that states no lifetime (the in-memory provider) is not checked.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["KeyLifetime", "compare_key_lifetimes", "describe_seconds"]


def describe_seconds(seconds: float) -> str:
    """``86400`` -> ``24 hours``, ``2678400`` -> ``31 days``, else seconds."""
    if seconds % 86400 == 0 and seconds >= 2 * 86400:
        return f"{int(seconds // 86400)} days"
    if seconds % 3600 == 0:
        return f"{int(seconds // 3600)} hours"
    return f"{seconds:g} seconds"


@dataclass(frozen=True, slots=True)
class KeyLifetime:
    """One provider's two lifetimes, in seconds."""

    provider: str
    database_seconds: float
    provider_seconds: float

    @property
    def unsafe(self) -> bool:
        """The database lets an intent be sent again after the provider forgot its key."""
        return self.database_seconds > self.provider_seconds

    @property
    def shorter(self) -> bool:
        return self.database_seconds < self.provider_seconds

    def refusal(self) -> str:
        return (
            f"outbox.provider_policies lets {self.provider!r} intents be sent again until "
            f"{describe_seconds(self.database_seconds)} after their creation, but this "
            f"provider keeps idempotency keys only {describe_seconds(self.provider_seconds)}: "
            "a resend after that could take effect twice"
        )

    def remedy(self) -> str:
        return (
            "lower it: INSERT INTO outbox.provider_policies VALUES "
            f"('{self.provider}', interval '{describe_seconds(self.provider_seconds)}') "
            "ON CONFLICT (provider) DO UPDATE SET idempotency_key_lifetime = "
            "EXCLUDED.idempotency_key_lifetime (docs/providers.md, idempotency-key lifetimes)"
        )


def compare_key_lifetimes(
    database: Mapping[str, float], adapters: Mapping[str, float | None]
) -> list[KeyLifetime]:
    """Each provider with a stated lifetime and a database lifetime, by name."""
    return [
        KeyLifetime(name, float(database[name]), float(seconds))
        for name, seconds in sorted(adapters.items())
        if seconds is not None and name in database
    ]
