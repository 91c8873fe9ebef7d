"""Prometheus metrics (prometheus-client). Names follow Prometheus conventions."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

__all__ = [
    "AWAITING_CONFIRMATION",
    "BREAKER_STATE",
    "CLAIM_BATCH",
    "FAILOVERS",
    "GUARD_RAIL_LATENCY_MS",
    "GUARD_RAIL_RATE_BP",
    "GUARD_RAIL_ROLLBACKS",
    "GUARD_RAIL_SAMPLES",
    "GUARD_RAIL_WORSE",
    "INTENTS_ARCHIVED",
    "INTENTS_FINISHED",
    "INTENTS_WRITTEN",
    "IN_FLIGHT",
    "LEASES_RELEASED",
    "LEASE_LOST",
    "OLDEST_AWAITING_CONFIRMATION_AGE_SECONDS",
    "OLDEST_WEBHOOK_WAITING_AGE_SECONDS",
    "PROVIDER_API_VERSION",
    "PROVIDER_CALL_SECONDS",
    "WEBHOOKS_APPLIED",
    "WEBHOOKS_DUPLICATES",
    "WEBHOOKS_RECEIVED",
    "WEBHOOKS_REJECTED",
    "WEBHOOKS_WAITING",
    "WEBHOOK_APPLY_LAG",
    "WRITE_BACK_SECONDS",
]

INTENTS_FINISHED = Counter(
    "outbox_relay_intents_finished_total",
    "Intents that ended (terminal status), counted once when the write-back commits. "
    "outcome: succeeded; declined, rejected (state machine; no call) -> failed; invalid, "
    "exhausted (max attempts), amount_mismatch, refused (database) -> dead.",
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
PROVIDER_API_VERSION = Gauge(
    "outbox_relay_provider_api_version",
    "The provider API version this relay pins, per lane (an info metric: always 1). "
    'tested="false": a version the adapter was not tested with, run only under '
    "RELAY_PROVIDERS__<NAME>__ALLOW_UNTESTED_API_VERSION.",
    ["provider", "kind", "version", "tested"],
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
BREAKER_STATE = Gauge(
    "outbox_relay_breaker_state",
    "Circuit breaker per provider lane: 0 closed, 1 half-open, 2 open.",
    ["provider"],
)
LEASES_RELEASED = Counter(
    "outbox_relay_leases_released_total",
    "Claimed intents handed back without a provider call (shutdown, breaker open, "
    "lease_too_short: claimed ahead and waited too long for a call slot).",
    ["provider", "reason"],
)
FAILOVERS = Counter(
    "outbox_relay_failovers_total",
    "Routed payments' first intents moved to the next target of their rule because they never "
    "reached their provider (sql/0064); trigger: connect_failed (this relay's attempt could "
    "not connect) or breaker_open (moved unclaimed while this relay's breaker was open).",
    ["from_provider", "to_provider", "trigger"],
)
INTENTS_ARCHIVED = Counter(
    "outbox_relay_intents_archived_total",
    "Finished intents moved to outbox.payment_intents_archive by the retention sweeper.",
)
__all__ += ["ORPHANED_BLOCKED_PROMOTED"]
ORPHANED_BLOCKED_PROMOTED = Counter(
    "outbox_relay_orphaned_blocked_promoted_total",
    "Blocked intents promoted by the reaper's sweep because every earlier intent of their "
    "payment was already resolved (inserted under REPEATABLE READ or SERIALIZABLE with a "
    "snapshot older than that resolution). Non-zero is harmless; it shows such inserts.",
    ["provider"],
)

# Result events (relay/events/publisher.py).
__all__ += [
    "AMQP_CONNECTED",
    "EVENTS_PUBLISHED",
    "EVENTS_UNROUTABLE",
    "PUBLISH_LAG_SECONDS",
    "UNPUBLISHED_EVENTS",
]
EVENTS_PUBLISHED = Counter(
    "outbox_relay_events_published_total",
    "Events the relay marked after the broker's answer: published (confirmed) or "
    "unroutable (returned).",
)
EVENTS_UNROUTABLE = Counter(
    "outbox_relay_events_unroutable_total",
    "Events the broker returned (basic.return) because no queue was bound for the routing key.",
)
UNPUBLISHED_EVENTS = Gauge(
    "outbox_relay_unpublished_events", "Events in outbox.events not yet published (all relays)."
)
PUBLISH_LAG_SECONDS = Histogram(
    "outbox_relay_publish_lag_seconds",
    "From the event's insert (its transaction's start) to the broker's confirm.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800),
)
AMQP_CONNECTED = Gauge(
    "outbox_relay_amqp_connected", "1 while the publisher holds a confirmed AMQP channel."
)

# Observability (relay/service/depth.py, relay/core/completer.py, relay/core/runtime.py). Label values come
# from closed sets (status, action, outcome) or validated identifiers (provider, through
# relay.infra.redaction.safe_label where they are read from data): never free text.
__all__ += [
    "ATTEMPTS",
    "DEAD_LETTERS",
    "DEPTH_SAMPLED_AT",
    "OLDEST_PENDING_AGE_SECONDS",
    "OLDEST_UNPUBLISHED_AGE_SECONDS",
    "QUEUE_DEPTH",
    "RECONCILIATION_OPEN_DELTA_MINOR",
    "RECONCILIATION_OPEN_EXCEPTIONS",
    "RETRIES",
    "UNCATALOGUED_CODES",
    "UNSERVED_INTENTS",
]
ATTEMPTS = Counter(
    "outbox_relay_attempts_total",
    "Provider attempts by provider, action and outcome class (succeeded, declined, "
    "retryable, ambiguous, invalid; an ambiguous one settled by lookup counts as settled).",
    ["provider", "action", "outcome"],
)
UNCATALOGUED_CODES = Counter(
    "outbox_relay_uncatalogued_codes_total",
    "Provider codes with no row in provider_adapters/error_catalogue.csv, by provider and "
    "code (the adapter's own sanitised code): handled by the adapter's class, add a row.",
    ["provider", "code"],
)
RETRIES = Counter(
    "outbox_relay_retries_total",
    "Attempts whose write-back scheduled another attempt under the same key.",
    ["provider", "action"],
)
QUEUE_DEPTH = Gauge(
    "outbox_relay_queue_depth",
    "Unresolved intents in the database by provider and status (blocked, pending, "
    "in_flight, dead); sampled every RELAY_DEPTH_INTERVAL_SECONDS, same value on every relay.",
    ["provider", "status"],
)
OLDEST_PENDING_AGE_SECONDS = Gauge(
    "outbox_relay_oldest_pending_age_seconds",
    "How long the oldest due pending intent has waited for a claim (now - available_at).",
    ["provider"],
)
DEAD_LETTERS = Gauge(
    "outbox_relay_dead_letters",
    "Dead intents waiting for an operator (outbox-relay dead-letters list).",
    ["provider"],
)
OLDEST_UNPUBLISHED_AGE_SECONDS = Gauge(
    "outbox_relay_oldest_unpublished_event_age_seconds",
    "Age of the oldest result event not yet published (0 when none waits).",
)
DEPTH_SAMPLED_AT = Gauge(
    "outbox_relay_queue_depth_sampled_timestamp_seconds",
    "Unix time of the last successful queue-depth sample (staleness of the depth gauges).",
)
RECONCILIATION_OPEN_DELTA_MINOR = Gauge(
    "outbox_relay_reconciliation_open_delta_minor",
    "Open reconciliation exceptions' absolute deltas (provider vs ledger), summed, in minor "
    "units, by provider and currency ('-' when an exception has none).",
    ["provider", "currency"],
)
RECONCILIATION_OPEN_EXCEPTIONS = Gauge(
    "outbox_relay_reconciliation_open_exceptions",
    "Reconciliation exceptions open or awaiting approval, by provider.",
    ["provider"],
)
UNSERVED_INTENTS = Gauge(
    "outbox_relay_unserved_intents",
    "Intents waiting (blocked, pending, in_flight) for a provider no live relay serves "
    "(outbox.relay_instances, sql/0018): nobody will claim them until a relay is configured "
    "for it. 0 for a served provider; same value on every relay.",
    ["provider"],
)

# Flow deadlines and authorisations no flow covers (relay/service/flow_sweep.py).
__all__ += ["FLOWS_EXPIRED", "UNCOVERED_AUTHORIZATIONS", "UNCOVERED_AUTHORIZATIONS_VOIDED"]
FLOWS_EXPIRED = Counter(
    "outbox_relay_flows_deadline_advanced_total",
    "Running flows the sweep advanced because a deadline of theirs passed (sql/0083): each "
    "then compensates, unless the step had meanwhile succeeded.",
)
UNCOVERED_AUTHORIZATIONS = Gauge(
    "outbox_relay_uncovered_authorizations",
    "Authorisations no open flow covers and nothing else resolves, older than their "
    "provider's policy allows (outbox.authorization_policies, sql/0084), by policy: alert, "
    "or void (a void that could not be placed). Same value on every relay.",
    ["provider", "policy"],
)
UNCOVERED_AUTHORIZATIONS_VOIDED = Counter(
    "outbox_relay_uncovered_authorizations_voided_total",
    "Voids inserted by the per-provider policy for aged authorisations no flow covers.",
)

# The janitor (relay/core/janitor.py).
__all__ += ["JANITOR_RESULTS"]
JANITOR_RESULTS = Counter(
    "outbox_relay_janitor_results_total",
    "Dead intents the janitor looked up at the provider, by result (settled_succeeded, "
    "settled_failed, no_effect, not_found_yet, lookup_failed, not_settleable, skipped).",
    ["provider", "result"],
)

# -- the webhook inbox (relay/service/webhooks.py receives, relay/core/inbox/ applies) ------

WEBHOOKS_RECEIVED = Counter(
    "outbox_relay_webhooks_received_total",
    "Verified notifications stored in the inbox (committed before the 2xx answer).",
    ["provider"],
)
WEBHOOKS_DUPLICATES = Counter(
    "outbox_relay_webhooks_duplicates_total",
    "Verified notifications already in the inbox (same provider event id): acknowledged, "
    "not stored again.",
    ["provider"],
)
WEBHOOKS_REJECTED = Counter(
    "outbox_relay_webhooks_rejected_total",
    "Deliveries refused with a 4xx and never stored, by reason: missing_signature, "
    "bad_signature, stale_timestamp, invalid_utf8, malformed_json, too_deep, not_an_event, "
    "too_large, unknown_route, unstorable.",
    ["provider", "reason"],
)
WEBHOOKS_APPLIED = Counter(
    "outbox_relay_webhooks_applied_total",
    "Notifications applied (status applied) or set aside (ignored: a type the relay does "
    "not handle), counted when the transaction commits.",
    ["provider", "status"],
)
WEBHOOKS_WAITING = Gauge(
    "outbox_relay_webhooks_waiting",
    "Stored notifications not yet applied (status received), sampled from the database.",
    ["provider"],
)
AWAITING_CONFIRMATION = Gauge(
    "outbox_relay_awaiting_confirmation",
    "Intents the provider accepted and has not confirmed yet (status awaiting_confirmation), "
    "sampled from the database.",
    ["provider"],
)
OLDEST_AWAITING_CONFIRMATION_AGE_SECONDS = Gauge(
    "outbox_relay_oldest_awaiting_confirmation_age_seconds",
    "How long the oldest intent has awaited its provider's confirmation: grows when the "
    "provider's webhooks do not arrive (RELAY_CONFIRMATION_DEADLINE_SECONDS opens an exception).",
    ["provider"],
)
OLDEST_WEBHOOK_WAITING_AGE_SECONDS = Gauge(
    "outbox_relay_webhooks_oldest_waiting_age_seconds",
    "Age of the oldest stored notification not yet applied, sampled from the database: "
    "grows when no relay applies the provider's notifications or one keeps failing.",
    ["provider"],
)
WEBHOOK_APPLY_LAG = Histogram(
    "outbox_relay_webhook_apply_lag_seconds",
    "From the provider's event time to the notification's applying transaction committed.",
    ["provider"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 21600, 86400),
)
# sql/0027: exchange rates. The age of the newest rate of each pair and source kind, from
# its publication time: the alert OutboxRelayFxRateStale fires before convert_v1 refuses it.
FX_RATE_AGE_SECONDS = Gauge(
    "outbox_relay_fx_rate_age_seconds",
    "Seconds since the newest rate of the pair (base/quote) from this source kind was published.",
    ["base", "quote", "source"],
)
FX_FETCHES = Counter(
    "outbox_relay_fx_fetches_total",
    "Periodic ECB rate fetches (RELAY_FX_ECB_URL) by result: imported, failed.",
    ["result"],
)
FX_RATES_IMPORTED = Counter(
    "outbox_relay_fx_rates_imported_total",
    "Rates recorded by the periodic ECB fetch (a rate already recorded is not counted).",
)
FX_DIFFERENCE_MINOR = Gauge(
    "outbox_relay_fx_difference_minor",
    "Sum of the FX difference journal (outbox.fx_postings: actual - expected) in minor units, "
    "by provider, currency and kind (refund_at_charge_rate, settlement).",
    ["provider", "currency", "kind"],
)
# sql/0067: guard rails of canary splits (relay/service/guard_rails.py). Every relay sets
# the same figures from the database: aggregate the gauges with max.
GUARD_RAIL_ROLLBACKS = Counter(
    "outbox_relay_guard_rail_rollbacks_total",
    "Canaries this relay rolled back to weight 0 because their outcomes were worse than the "
    "baseline's (counted by the one relay whose rollback committed), by rule and canary.",
    ["rule", "canary"],
)
GUARD_RAIL_RATE_BP = Gauge(
    "outbox_relay_guard_rail_rate_bp",
    "A guarded split's outcome rate per side over the guard's window, in basis points of the "
    "side's samples: measure failures (declined + errors) or ambiguous; side canary or baseline.",
    ["rule", "side", "provider", "measure"],
)
GUARD_RAIL_SAMPLES = Gauge(
    "outbox_relay_guard_rail_samples",
    "Payments with an outcome per side of a guarded split, over the guard's window.",
    ["rule", "side", "provider"],
)
GUARD_RAIL_LATENCY_MS = Gauge(
    "outbox_relay_guard_rail_latency_ms",
    "A guarded split's latency per side at the guard's percentile (INSERT to outcome), ms.",
    ["rule", "side", "provider"],
)
GUARD_RAIL_WORSE = Gauge(
    "outbox_relay_guard_rail_canary_worse",
    "1 while a guarded canary's outcomes are worse than its baseline's by a margin, with "
    "enough samples (it is then rolled back); 0 otherwise.",
    ["rule"],
)
