"""Routing decisions, pure: the payment's bucket and the choice a rule makes.

The database decides inside the application's INSERT (sql/0051, ``outbox.route_payment_v1``);
this module is its twin, so the decision can be reasoned about and tested without a
database, and tests check that both agree payment by payment.

* :func:`routing_bucket`: the first 32 bits of sha256(payment_id), big-endian: the same
  payment always draws the same point, whatever the relay, the database or the time.
* :func:`choose`: among the rule's usable targets (registered, enabled, taking the currency),
  in list order: mode ``priority`` takes the first; mode ``split`` takes the target whose
  cumulative weight first exceeds ``bucket % total`` over the targets with weight > 0, and
  the first usable target when no weight is left (a canary rolled back to 0 and the rest
  disabled): the list order is the fallback order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["BUCKETS", "Target", "choose", "routing_bucket", "split_share"]

BUCKETS = 2**32


@dataclass(frozen=True, slots=True)
class Target:
    """One provider of a rule, in list order; ``usable``: registered, enabled, takes the currency."""

    provider: str
    weight: int = 0
    usable: bool = True


def routing_bucket(payment_id: str) -> int:
    """0 .. 2**32 - 1, from sha256 of the payment id (outbox.routing_bucket's twin)."""
    return int.from_bytes(hashlib.sha256(payment_id.encode("utf-8")).digest()[:4], "big")


def choose(mode: str, targets: Sequence[Target], bucket: int) -> str | None:
    """The provider a rule yields for a payment in ``bucket``, or None when none is usable."""
    if mode not in ("priority", "split"):
        raise ValueError(f"mode must be priority or split, got {mode!r}")
    usable = [t for t in targets if t.usable]
    if mode == "split":
        weighted = [t for t in usable if t.weight > 0]
        total = sum(t.weight for t in weighted)
        if total:
            point = bucket % total
            upto = 0
            for target in weighted:
                upto += target.weight
                if point < upto:
                    return target.provider
    return usable[0].provider if usable else None


def split_share(targets: Sequence[Target], provider: str) -> float:
    """The share of new payments ``provider`` gets from a split rule (0.0 to 1.0).

    Exact up to the bias of ``bucket % total`` (below total / 2**32, negligible).
    """
    weighted = [t for t in targets if t.usable and t.weight > 0]
    total = sum(t.weight for t in weighted)
    if not total:
        first = next((t for t in targets if t.usable), None)
        return 1.0 if first is not None and first.provider == provider else 0.0
    return sum(t.weight for t in weighted if t.provider == provider) / total
