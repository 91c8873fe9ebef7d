"""Which providers no running relay serves: the one rule behind the
``outbox_relay_unserved_intents`` gauge (relay/service/depth.py) and `outbox-relay status`'s
UNSERVED lines (relay/operations/status.py).

Each relay reports the providers it serves (``outbox.relay_instances``, written by
relay/service/instances.py); whether a report is live is the statement ``relay_instances``
(queries.sql). Guarantees, each tested:

* a provider is unserved when no live relay reports serving it and it has waiting intents
  (``blocked``, ``pending``, ``in_flight``); its figure is their count;
* a provider whose intents are all finished or dead is never unserved: dead intents wait
  for an operator, not for a relay;
* a report that is not live serves nothing.
"""

from __future__ import annotations

from collections.abc import Iterable

from relay.domain.intents import WAITING_STATUSES

__all__ = ["unserved_intents"]


def unserved_intents(
    counts: Iterable[tuple[str, str, int]],
    relays: Iterable[tuple[Iterable[str], bool]],
) -> dict[str, int]:
    """Waiting intents per provider that no live relay serves.

    ``counts``: (provider, status, intents) rows, any statuses, a provider's status possibly
    over several rows; ``relays``: (providers served, live) per reported relay."""
    served = {provider for providers, live in relays if live for provider in providers}
    unserved: dict[str, int] = {}
    for provider, status, intents in counts:
        if status in WAITING_STATUSES and provider not in served and intents:
            unserved[provider] = unserved.get(provider, 0) + int(intents)
    return unserved
