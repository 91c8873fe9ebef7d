"""The provider API version a relay pins against the one the registry records (sql/0070).

Pure logic, no I/O. The registry (``outbox.providers.api_version``) may record the version
an instance is pinned to, so that one provider kind can be registered twice (``stripe`` on
the current version, ``stripe_next`` on a newer one) and a split rule moves new payments
between the two (docs/routing.md, "API version canary"). The split means something only if
every relay serving a name sends that name's version. Guarantees, each tested:

* a provider whose relay pins a version other than the registry's is a mismatch; a relay
  refuses to start with one (relay/service/main.py), naming the variable, both versions
  and what to do;
* a provider the registry records no version for (NULL), or that the relay does not serve,
  is not compared;
* ``outbox-relay status`` applies the same rule to every running relay's report, so a
  registry changed after a relay started shows as ``API VERSION MISMATCH``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["PinMismatch", "pin_mismatches"]


@dataclass(frozen=True, slots=True)
class PinMismatch:
    """One provider name whose relay-side version differs from the registry's."""

    provider: str
    relay_version: str
    registry_version: str
    # API_VERSION was set (False: the adapter's default; None: not known, e.g. in status)
    configured: bool | None = None

    @property
    def variable(self) -> str:
        return f"RELAY_PROVIDERS__{self.provider.upper()}__API_VERSION"

    def refusal(self) -> str:
        pinned = (
            f"is unset, so the adapter's default {self.relay_version}"
            if self.configured is False
            else f"is {self.relay_version}"
        )
        return (
            f"{self.variable} {pinned}, but the provider registry pins {self.provider} to "
            f"{self.registry_version}: this relay would send {self.provider}'s payments with "
            "a version the routing does not expect"
        )

    def remedy(self) -> str:
        return (
            f"set {self.variable}={self.registry_version} (and __ALLOW_UNTESTED_API_VERSION=true "
            "if the adapter was not tested with it), or serve this version under another "
            "provider name; if the registry is wrong, correct it: outbox-relay providers set "
            f"{self.provider} --api-version {self.relay_version} --reason ... "
            '(docs/routing.md, "API version canary")'
        )


def pin_mismatches(
    pinned: Mapping[str, str],
    registered: Mapping[str, str | None],
    configured: Mapping[str, str | None] | None = None,
) -> list[PinMismatch]:
    """Each provider in both maps whose versions differ, by name. ``pinned``: the version
    the relay sends per provider name; ``registered``: the registry's (None: not recorded);
    ``configured``: the relay's API_VERSION settings per name (None: not known)."""
    return [
        PinMismatch(
            name,
            version,
            wanted,
            None if configured is None else configured.get(name) is not None,
        )
        for name, version in sorted(pinned.items())
        if (wanted := registered.get(name)) is not None and wanted != version
    ]
