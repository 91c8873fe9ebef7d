"""Prometheus metrics (prometheus-client). Names follow Prometheus conventions."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

__all__ = [
    "CLAIM_BATCH",
    "INTENTS_FINISHED",
    "INTENTS_WRITTEN",
    "IN_FLIGHT",
    "LEASE_LOST",
    "PROVIDER_CALL_SECONDS",
    "WRITE_BACK_SECONDS",
]

INTENTS_FINISHED = Counter(
    "outbox_relay_intents_finished_total",
    "Intents whose attempt ended, by provider, action and outcome class.",
    ["provider", "action", "outcome"],
)
INTENTS_WRITTEN = Counter(
    "outbox_relay_write_backs_total", "Outcomes written to the database, by new status.", ["status"]
)
LEASE_LOST = Counter(
    "outbox_relay_lease_lost_total", "Outcomes not written because a newer claim exists."
)
PROVIDER_CALL_SECONDS = Histogram(
    "outbox_relay_provider_call_seconds", "Provider call latency.", ["provider", "action"]
)
WRITE_BACK_SECONDS = Histogram(
    "outbox_relay_write_back_seconds", "Latency of one batched write-back transaction."
)
CLAIM_BATCH = Histogram(
    "outbox_relay_claim_batch_size",
    "Intents per claim.",
    buckets=(0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000),
)
IN_FLIGHT = Gauge(
    "outbox_relay_in_flight", "Claimed intents being processed, by lane.", ["provider"]
)
