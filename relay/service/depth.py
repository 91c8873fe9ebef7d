"""Queue-depth gauges, sampled in the background: never a database query per scrape.

One :class:`DepthSampler` per relay process counts the unresolved intents by provider and
status (``blocked``, ``pending``, ``in_flight``, ``dead``), the wait of the oldest due
pending intent and the unpublished result events, every ``interval_seconds`` (jittered so
replicas do not query in step), and sets the gauges. The count reads only
``payment_intents_depth_idx`` (sql/0006), a partial index over unresolved rows: its cost
follows the backlog, not the table.

Guarantees, each tested:

* after a sample, ``outbox_relay_queue_depth{provider,status}`` equals the database's count
  for every provider seen since start (0 once its rows are gone: no stale series);
* ``outbox_relay_dead_letters{provider}`` equals the ``dead`` depth;
* ``outbox_relay_oldest_pending_age_seconds{provider}`` is ``now - min(available_at)`` over
  due pending intents, 0 when none is due;
* ``outbox_relay_reconciliation_open_exceptions{provider}`` and
  ``outbox_relay_reconciliation_open_delta_minor{provider,currency}`` follow the open
  exceptions of sql/0005 (``outbox.reconciliation_open_delta``), 0 once they are resolved;
* ``outbox_relay_unserved_intents{provider}`` counts the blocked, pending and in-flight
  intents of a provider that neither this relay nor any live relay of
  ``outbox.relay_instances`` serves (the rule: :func:`relay.domain.serving.unserved_intents`;
  the rows: relay/service/instances.py, its own task), 0 for a served one: such intents
  wait forever, and the alert OutboxRelayUnservedIntents names the provider;
* ``outbox_relay_fx_rate_age_seconds{base,quote,source}`` is the age of the newest rate
  of each pair and source kind (sql/0027), for the alert OutboxRelayFxRateStale; a pair's rates
  are never deleted, so its series never goes stale;
* ``outbox_relay_fx_difference_minor{provider,currency,kind}`` sums the FX difference
  journal (sql/0029), whose rows are never deleted either;
* a failed sample (database away) leaves the gauges as they were and is retried next
  interval; ``outbox_relay_queue_depth_sampled_timestamp_seconds`` tells how old they are.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable
from datetime import datetime

from psycopg.rows import dict_row

from relay.domain.serving import unserved_intents
from relay.infra import metrics
from relay.infra.db import Database, every_interval
from relay.infra.redaction import safe_label

__all__ = ["UNRESOLVED_STATUSES", "DepthSample", "DepthSampler"]


UNRESOLVED_STATUSES = ("blocked", "pending", "in_flight", "dead")


class DepthSample:
    """One sample: counts per (provider, status), oldest due pending wait per provider."""

    __slots__ = (
        "awaiting",
        "awaiting_oldest_seconds",
        "counts",
        "fx_difference_minor",
        "fx_rate_age_seconds",
        "oldest_pending_seconds",
        "oldest_unpublished_seconds",
        "reconciliation_delta_minor",
        "reconciliation_exceptions",
        "unpublished",
        "unserved",
        "webhooks_oldest_seconds",
        "webhooks_waiting",
    )

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str], int] = {}
        self.oldest_pending_seconds: dict[str, float] = {}
        self.unpublished = 0
        self.oldest_unpublished_seconds = 0.0
        self.reconciliation_exceptions: dict[str, int] = {}
        self.reconciliation_delta_minor: dict[tuple[str, str], int] = {}
        # Waiting intents of the providers no live relay serves (by label).
        self.unserved: dict[str, int] = {}
        # Stored notifications not yet applied, per provider (sql/0023's inbox).
        self.webhooks_waiting: dict[str, int] = {}
        self.webhooks_oldest_seconds: dict[str, float] = {}
        # Intents awaiting their provider's confirmation (sql/0038), per provider.
        self.awaiting: dict[str, int] = {}
        self.awaiting_oldest_seconds: dict[str, float] = {}
        # (base, quote, source kind) -> seconds since its newest rate was published.
        self.fx_rate_age_seconds: dict[tuple[str, str, str], float] = {}
        # (provider, currency, kind) -> sum of the FX difference journal, minor units.
        self.fx_difference_minor: dict[tuple[str, str, str], int] = {}


class DepthSampler:
    def __init__(
        self,
        db: Database,
        *,
        interval_seconds: float = 5.0,
        providers: Iterable[str] = (),
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.db = db
        self.interval_seconds = interval_seconds
        self.rng = rng
        # The providers this relay claims for: served, whatever the table says.
        self.serves = sorted(set(providers))
        # Every provider ever reported: its series drop to 0 rather than go stale.
        self.known: set[str] = {safe_label(p) for p in self.serves}
        self.known_deltas: set[tuple[str, str]] = set()
        self.samples = 0

    async def sample(self, *, now: datetime | None = None) -> DepthSample:
        """Query the database once and set the gauges; raises on a database error."""
        result = DepthSample()
        relays = [
            (relay["providers"], relay["live"])
            for relay in await self.db.fetch_all("relay_instances", {"now": now}, row=dict_row)
        ]
        depth = await self.db.fetch_all("queue_depth", {"now": now}, row=dict_row)
        unserved = unserved_intents(
            ((row["provider"], row["status"], row["intents"]) for row in depth),
            [*relays, (self.serves, True)],
        )
        for provider, intents in unserved.items():
            label = safe_label(provider)
            result.unserved[label] = result.unserved.get(label, 0) + intents
        for row in depth:
            key = (safe_label(row["provider"]), row["status"])
            result.counts[key] = result.counts.get(key, 0) + int(row["intents"])
            if row["status"] == "pending":
                previous = result.oldest_pending_seconds.get(key[0], 0.0)
                oldest = float(row["oldest_pending_seconds"])
                result.oldest_pending_seconds[key[0]] = max(previous, oldest)
        events, *_ = await self.db.fetch_all("unpublished_events", {"now": now}, row=dict_row)
        result.unpublished = int(events["events"])
        result.oldest_unpublished_seconds = float(events["oldest_seconds"])
        for row in await self.db.fetch_all("reconciliation_open", row=dict_row):
            label = safe_label(row["provider"])
            result.reconciliation_exceptions[label] = result.reconciliation_exceptions.get(
                label, 0
            ) + int(row["exceptions"])
            key = (label, safe_label(row["currency"]))
            result.reconciliation_delta_minor[key] = result.reconciliation_delta_minor.get(
                key, 0
            ) + int(row["delta_minor"])
        for row in await self.db.fetch_all("inbox_waiting", {"now": now}, row=dict_row):
            label = safe_label(row["provider"])
            result.webhooks_waiting[label] = int(row["notifications"])
            result.webhooks_oldest_seconds[label] = float(row["oldest_seconds"])
        for row in await self.db.fetch_all("awaiting_depth", {"now": now}, row=dict_row):
            label = safe_label(row["provider"])
            result.awaiting[label] = result.awaiting.get(label, 0) + int(row["intents"])
            result.awaiting_oldest_seconds[label] = max(
                result.awaiting_oldest_seconds.get(label, 0.0), float(row["oldest_seconds"])
            )
        for row in await self.db.fetch_all("fx_rate_ages", {"now": now}, row=dict_row):
            pair = (
                safe_label(row["base"]),
                safe_label(row["quote"]),
                safe_label(row["source_kind"]),
            )
            result.fx_rate_age_seconds[pair] = float(row["age_seconds"])
        for row in await self.db.fetch_all("fx_difference_totals", row=dict_row):
            kind = (safe_label(row["provider"]), safe_label(row["currency"]), str(row["kind"]))
            result.fx_difference_minor[kind] = int(row["difference_minor"])
        self._publish(result)
        return result

    def _publish(self, result: DepthSample) -> None:
        self.known.update(provider for provider, _ in result.counts)
        self.known.update(result.reconciliation_exceptions)
        self.known.update(result.webhooks_waiting)
        self.known.update(result.awaiting)
        self.known_deltas.update(result.reconciliation_delta_minor)
        for provider, currency in self.known_deltas:
            metrics.RECONCILIATION_OPEN_DELTA_MINOR.labels(
                provider=provider, currency=currency
            ).set(result.reconciliation_delta_minor.get((provider, currency), 0))
        for provider in self.known:
            metrics.RECONCILIATION_OPEN_EXCEPTIONS.labels(provider=provider).set(
                result.reconciliation_exceptions.get(provider, 0)
            )
            for status in UNRESOLVED_STATUSES:
                metrics.QUEUE_DEPTH.labels(provider=provider, status=status).set(
                    result.counts.get((provider, status), 0)
                )
            metrics.DEAD_LETTERS.labels(provider=provider).set(
                result.counts.get((provider, "dead"), 0)
            )
            metrics.OLDEST_PENDING_AGE_SECONDS.labels(provider=provider).set(
                result.oldest_pending_seconds.get(provider, 0.0)
            )
            metrics.UNSERVED_INTENTS.labels(provider=provider).set(result.unserved.get(provider, 0))
            metrics.WEBHOOKS_WAITING.labels(provider=provider).set(
                result.webhooks_waiting.get(provider, 0)
            )
            metrics.OLDEST_WEBHOOK_WAITING_AGE_SECONDS.labels(provider=provider).set(
                result.webhooks_oldest_seconds.get(provider, 0.0)
            )
            metrics.AWAITING_CONFIRMATION.labels(provider=provider).set(
                result.awaiting.get(provider, 0)
            )
            metrics.OLDEST_AWAITING_CONFIRMATION_AGE_SECONDS.labels(provider=provider).set(
                result.awaiting_oldest_seconds.get(provider, 0.0)
            )
        for (base, quote, source), age in result.fx_rate_age_seconds.items():
            metrics.FX_RATE_AGE_SECONDS.labels(base=base, quote=quote, source=source).set(age)
        for (provider, currency, kind), total in result.fx_difference_minor.items():
            metrics.FX_DIFFERENCE_MINOR.labels(provider=provider, currency=currency, kind=kind).set(
                total
            )
        metrics.UNPUBLISHED_EVENTS.set(result.unpublished)
        metrics.OLDEST_UNPUBLISHED_AGE_SECONDS.set(result.oldest_unpublished_seconds)
        metrics.DEPTH_SAMPLED_AT.set(time.time())
        self.samples += 1

    async def run(self) -> None:
        """Sample every ``interval_seconds`` (x0.75-1.25 jitter) until cancelled."""
        await every_interval("depth_sample", self.sample, self.interval_seconds, self.rng)
