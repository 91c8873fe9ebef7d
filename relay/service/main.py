"""`outbox-relay run`: wire settings into a relay and own its lifetime.

One task group owns everything. SIGTERM or SIGINT stops claiming and drains within
RELAY_SHUTDOWN_GRACE_SECONDS, then exits 0; a second signal exits at once (leases then
expire normally and other replicas re-drive the intents under the same keys).
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Mapping
from functools import partial
from typing import Any

import anyio
import psycopg
import structlog
from anyio.abc import TaskStatus
from psycopg.rows import dict_row

from provider_adapters.base import ProviderAdapter
from provider_adapters.registry import (
    NOTIFICATION_KINDS,
    api_versions,
    build_adapter,
    build_notification_reader,
)
from relay.core.clock import SYSTEM_CLOCK, Clock
from relay.core.inbox import InboxApplier, InboxOptions
from relay.core.janitor import Janitor, JanitorOptions
from relay.core.lanes import BreakerSettings, Lane, RateLimit
from relay.core.runtime import SHUTDOWN_FLUSH_MIN_SECONDS, Relay, RelayOptions
from relay.domain.key_lifetimes import compare_key_lifetimes, describe_seconds
from relay.domain.retry_policy import RetryPolicy, capped_doubling, half_jitter
from relay.domain.version_pins import pin_mismatches
from relay.events.publisher import Publisher, publisher_from_settings
from relay.infra import metrics
from relay.infra.config import ProviderSettings, Settings, find_unknown_variables
from relay.infra.db import INBOX_NOTIFY_CHANNEL, RETRYABLE_DB_ERRORS, Database
from relay.infra.db_startup import (
    DatabaseNotYet,
    StartupRefused,
    check_conninfo,
    probe_database,
)
from relay.infra.migrate import discover
from relay.infra.redaction import describe_conninfo
from relay.service.depth import DepthSampler
from relay.service.flow_sweep import FlowSweeper
from relay.service.fx_fetch import EcbFetcher
from relay.service.guard_rails import GuardRails
from relay.service.health import HealthState, Heartbeat, serve_http
from relay.service.instances import InstanceHeartbeat
from relay.service.retention import sweep_forever, sweep_inbox_forever

__all__ = [
    "build_inbox_applier",
    "build_janitor",
    "build_relay",
    "check_key_lifetimes",
    "check_registered_api_versions",
    "log_unknown_variables",
    "pinned_api_version",
    "run_relay",
]

log = structlog.get_logger("relay.service.main")


def log_unknown_variables(environ: Mapping[str, str]) -> None:
    """One warning log line per ``RELAY_*`` variable the relay does not read, with the
    nearest known name: under `run` a misspelt setting shows in the log like any other
    event (JSON in production), not as a bare line on stderr."""
    for unknown in find_unknown_variables(environ):
        log.warning(
            "unknown_setting_ignored",
            variable=unknown.name,
            did_you_mean=unknown.nearest,
            remedy="fix the name, or see the README's configuration table",
        )


def build_lane(name: str, provider: ProviderSettings, *, clock: Clock = SYSTEM_CLOCK) -> Lane:
    """The lane for one configured provider; ``clock`` drives its breaker and rate limit."""
    adapter = build_adapter(name, provider)
    pinned = pinned_api_version(adapter)
    if pinned is not None:
        metrics.PROVIDER_API_VERSION.labels(
            provider=name,
            kind=pinned["kind"],
            version=pinned["version"],
            tested=str(pinned["tested"]).lower(),
        ).set(1)
        if not pinned["tested"]:
            # Allowed only by an explicit override (config refuses it otherwise): say so.
            log.warning(
                "provider_api_version_untested",
                provider=name,
                kind=pinned["kind"],
                api_version=pinned["version"],
                tested_versions=pinned["tested_versions"],
                remedy="a canary only: README 'Moving to a new provider API version'",
            )
    return Lane(
        name,
        adapter,
        concurrency=provider.concurrency,
        claim_ahead=provider.claim_ahead,
        timeout_seconds=(provider.connect_timeout_ms + provider.timeout_ms) / 1000,
        breaker=BreakerSettings(
            failure_threshold=provider.breaker_failure_threshold,
            cooldown_seconds=provider.breaker_cooldown_seconds,
            half_open_probes=provider.breaker_half_open_probes,
        ),
        rate_limit=(
            RateLimit(per_second=provider.rate_limit_per_second, burst=provider.rate_limit_burst)
            if provider.rate_limit_per_second
            else None
        ),
        clock=clock,
    )


def pinned_api_version(adapter: ProviderAdapter) -> dict[str, Any] | None:
    """What ``adapter`` pins: kind, version, whether it was tested, the tested versions;
    None for an adapter without versions (the in-memory provider)."""
    kind = getattr(adapter, "kind", None)
    version = getattr(adapter, "api_version", None)
    if not isinstance(kind, str) or not isinstance(version, str):
        return None
    tested = list(api_versions(kind).tested)
    return {
        "kind": kind,
        "version": version,
        "tested": version in tested,
        "tested_versions": tested,
    }


async def _fetch_at_start(relay: Relay, statement: str, params: dict[str, Any]) -> list[Any] | None:
    """The rows of a start-up check's statement; retried while the database that just
    answered the probe hiccups; None when the relay was stopped meanwhile."""
    while True:
        try:
            return await relay.db.fetch_all(statement, params)
        except RETRYABLE_DB_ERRORS as exc:
            log.warning("startup_check_retry", statement=statement, error=type(exc).__name__)
            with anyio.move_on_after(1.0):
                await relay.wait_stopped()
            if relay.stopping:
                return None


async def check_key_lifetimes(relay: Relay) -> None:
    """Refuse to start (StartupRefused) when the database lets a provider's intents be sent
    again after the provider forgets their idempotency keys; note a shorter lifetime
    (relay/domain/key_lifetimes.py)."""
    stated = {
        name: getattr(lane.adapter, "idempotency_key_lifetime_seconds", None)
        for name, lane in relay.lanes.items()
    }
    rows = await _fetch_at_start(relay, "provider_key_lifetimes", {"providers": sorted(stated)})
    if rows is None:
        return
    for lifetime in compare_key_lifetimes({name: seconds for name, seconds in rows}, stated):
        if lifetime.unsafe:
            raise StartupRefused(
                "idempotency_key_lifetime_too_long", lifetime.refusal(), lifetime.remedy()
            )
        if lifetime.shorter:
            log.info(
                "idempotency_key_lifetime_shorter",
                provider=lifetime.provider,
                database=describe_seconds(lifetime.database_seconds),
                provider_keeps=describe_seconds(lifetime.provider_seconds),
                effect="intents already sent are parked dead (idempotency_key_expired) "
                "sooner than the provider requires",
            )


async def check_registered_api_versions(
    relay: Relay, configured: Mapping[str, str | None] | None = None
) -> None:
    """Refuse to start (StartupRefused) when a provider this relay serves is pinned by the
    registry (sql/0070) to an API version other than the one its adapter sends: the split
    between two instances of a kind (docs/routing.md, "API version canary") would send
    payments with a version the routing did not choose. ``configured``: each provider's
    RELAY_PROVIDERS__<NAME>__API_VERSION (None: unset, the adapter's default), for the
    message. A running relay is not stopped when the registry changes later: `status`
    names it (relay/operations/status.py)."""
    pinned = {
        name: version
        for name, lane in relay.lanes.items()
        if isinstance(version := getattr(lane.adapter, "api_version", None), str)
    }
    if not pinned:
        return
    try:
        rows = await _fetch_at_start(
            relay, "registered_api_versions", {"providers": sorted(pinned)}
        )
    except (psycopg.errors.UndefinedColumn, psycopg.errors.UndefinedTable):
        # The schema is behind this release (its pre-deploy migrations not run yet): the
        # registry records no versions, so there is nothing to differ from.
        log.warning(
            "api_version_check_skipped",
            reason="the schema predates sql/0070",
            remedy="run `outbox-relay migrate` before deploying relays",
        )
        return
    if rows is None:
        return
    found = pin_mismatches(pinned, {name: version for name, _kind, version in rows}, configured)
    if not found:
        return
    raise StartupRefused(
        "api_version_differs_from_registry",
        "; ".join(m.refusal() for m in found),
        "; ".join(m.remedy() for m in found),
    )


def build_relay(settings: Settings, database_url: str) -> Relay:
    lanes = {name: build_lane(name, provider) for name, provider in settings.providers.items()}
    policy = RetryPolicy(
        base_seconds=settings.backoff_base_seconds,
        cap_seconds=settings.backoff_cap_seconds,
        max_attempts=settings.max_attempts,
    )
    options = RelayOptions(
        instance=settings.instance_name,
        batch_size=settings.batch_size,
        max_in_flight=settings.max_in_flight,
        lease_seconds=settings.lease_seconds,
        poll_interval_seconds=settings.poll_interval_seconds,
        poll_max_interval_seconds=settings.poll_max_interval_seconds,
        completer_batch_size=settings.completer_batch_size,
        completer_flush_seconds=settings.completer_flush_ms / 1000,
        completer_writers=settings.effective_completer_writers(),
        shutdown_grace_seconds=settings.shutdown_grace_seconds,
    )
    db = Database(
        database_url,
        pool_size=settings.db_pool_size,
        name=settings.instance_name,
        # Twice the lease: by then the intents it holds are being re-driven anyway.
        idle_in_transaction_seconds=2 * settings.lease_seconds,
    )
    return Relay(db, lanes, policy, options)


def build_janitor(settings: Settings, relay: Relay) -> Janitor:
    """The janitor shares the relay's pool and lanes (and so each provider's bulkhead)."""
    return Janitor(
        relay.db,
        relay.lanes,
        JanitorOptions(
            instance=settings.instance_name,
            interval_seconds=settings.janitor_interval_seconds,
            batch_size=settings.janitor_batch_size,
            backoff_base_seconds=settings.janitor_backoff_base_seconds,
            backoff_cap_seconds=settings.janitor_backoff_cap_seconds,
            not_found_confirmations=settings.janitor_not_found_confirmations,
            lease_seconds=settings.lease_seconds,
        ),
        stopping=lambda: relay.stopping,
    )


def build_inbox_applier(settings: Settings, relay: Relay) -> InboxApplier:
    """Applies the inbox rows of the providers this relay serves, on the relay's pool.
    Reading a stored notification needs no signing secret (the receiver verified it)."""
    readers = {
        name: build_notification_reader(name, provider.kind)
        for name, provider in settings.providers.items()
        if provider.kind in NOTIFICATION_KINDS
    }
    return InboxApplier(
        relay.db,
        readers,
        InboxOptions(
            instance=settings.instance_name,
            batch_size=settings.webhooks_apply_batch_size,
            lease_seconds=settings.lease_seconds,
            poll_interval_seconds=settings.poll_max_interval_seconds,
            concurrency=settings.effective_webhooks_apply_concurrency(),
            confirmation_deadline_seconds=settings.confirmation_deadline_seconds,
            overdue_sweep_seconds=min(30.0, settings.confirmation_deadline_seconds / 4),
        ),
        stopping=lambda: relay.stopping,
    )


async def run_relay(settings: Settings, database_url: str) -> int:
    """Run until stopped; 0 after a drain. Raises StartupRefused when the database cannot
    be used and waiting would not change that (malformed URL, login refused, no schema)."""
    check_conninfo(database_url)
    relay = build_relay(settings, database_url)
    publisher = publisher_from_settings(settings, relay.db)  # None: RELAY_AMQP_URL unset
    # The loop turns at least every poll interval; a database call may add the pool
    # timeout (30 s). Anything far beyond is a wedged loop.
    stale_after = max(120.0, 4 * settings.poll_max_interval_seconds)
    loops = [Heartbeat("write-back", stale_after, busy_since=relay.completer.busy_since)]
    if publisher is not None:
        loops.append(
            Heartbeat(
                "event publisher",
                max(stale_after, publisher.stale_after_seconds()),
                last_turn=lambda: publisher.heartbeat,
            )
        )
    health = HealthState(
        heartbeat=lambda: relay.heartbeat,
        database_ok=lambda: relay.database_ok,
        draining=lambda: relay.stopping,
        stale_after_seconds=stale_after,
        expected_schema=discover()[-1].version,
        loops=loops,
    )
    try:
        async with anyio.create_task_group() as tg:
            if settings.http_port:
                await tg.start(serve_http, settings.http_host, settings.http_port, health)
            await tg.start(_watch_signals, relay, publisher, tg.cancel_scope)
            # Nothing that needs the database starts before it answers with the schema:
            # a refusal that waiting cannot heal ends start-up (StartupRefused).
            if not await _wait_for_database(database_url, relay, health):
                tg.cancel_scope.cancel()  # stopped while waiting: nothing to drain
                return 0
            await relay.db.open()
            # A database that would resend keys the provider forgot stops start-up.
            await check_key_lifetimes(relay)
            # A relay whose pinned API version is not the registry's for a provider stops
            # start-up: the routing's split between versions must mean what it says.
            await check_registered_api_versions(
                relay, {name: p.api_version for name, p in settings.providers.items()}
            )
            # What this relay serves, reported before it claims (and before the sampler
            # counts unserved intents), and withdrawn when it stops cleanly.
            serving = InstanceHeartbeat(
                relay.db,
                instance=settings.instance_name,
                providers=relay.lanes,
                interval_seconds=settings.heartbeat_interval_seconds,
                rng=relay.rng,
                api_versions={
                    name: pinned
                    for name, lane in relay.lanes.items()
                    if (pinned := pinned_api_version(lane.adapter)) is not None
                },
            )
            await tg.start(serving.run)
            tg.start_soon(_watch_schema, relay, health)
            tg.start_soon(
                partial(
                    sweep_forever,
                    relay.store,
                    older_than_seconds=settings.retention_hours * 3600,
                    batch_size=settings.retention_batch_size,
                    interval_seconds=settings.retention_interval_seconds,
                )
            )
            if settings.janitor_enabled:
                janitor = build_janitor(settings, relay)
                relay.also_cut_off.append(janitor.cut_off)  # its settlements are shielded
                tg.start_soon(janitor.run_forever)
            if settings.webhooks_apply:
                applier = build_inbox_applier(settings, relay)
                # Woken through the relay's own LISTEN connection: no connection of its own.
                relay.also_wake[INBOX_NOTIFY_CHANNEL] = applier.wake
                # An apply obeys the relay's shutdown deadline like a provider call.
                relay.also_cut_off.append(applier.cut_off)
                tg.start_soon(applier.run_forever)
                tg.start_soon(
                    partial(
                        sweep_inbox_forever,
                        relay.db,
                        older_than_seconds=settings.webhooks_retention_hours * 3600,
                        batch_size=settings.retention_batch_size,
                        interval_seconds=settings.retention_interval_seconds,
                    )
                )
            if settings.depth_interval_seconds:
                sampler = DepthSampler(
                    relay.db,
                    interval_seconds=settings.depth_interval_seconds,
                    providers=relay.lanes,
                )
                tg.start_soon(sampler.run)
            if settings.guard_rails_interval_seconds:
                guard_rails = GuardRails(
                    relay.db,
                    instance=settings.instance_name,
                    interval_seconds=settings.guard_rails_interval_seconds,
                    rng=relay.rng,
                )
                tg.start_soon(guard_rails.run)
            if settings.flow_sweep_interval_seconds:
                flow_sweeper = FlowSweeper(
                    relay.db,
                    instance=settings.instance_name,
                    interval_seconds=settings.flow_sweep_interval_seconds,
                    rng=relay.rng,
                )
                tg.start_soon(flow_sweeper.run)
            if settings.fx_ecb_url:
                fetcher = EcbFetcher(
                    relay.db, settings.fx_ecb_url, interval_seconds=settings.fx_ecb_interval_seconds
                )
                tg.start_soon(fetcher.run)
            if publisher is not None:
                await tg.start(publisher.run)
            await tg.start(relay.run)
            health.started = True
            log.info(
                "relay_ready",
                instance=settings.instance_name,
                providers=sorted(relay.lanes),
                lease_seconds=settings.lease_seconds,
                database=describe_conninfo(database_url),
                # The pool's split (README, RELAY_DB_POOL_SIZE): 1 claims + writers + applies.
                pool_size=settings.db_pool_size,
                write_back_writers=settings.effective_completer_writers(),
                webhook_applies=(
                    settings.effective_webhooks_apply_concurrency()
                    if settings.webhooks_apply
                    else 0
                ),
            )
            await relay.finished.wait()
            if publisher is not None:
                publisher.stop()  # final flush of what the drain wrote, within the grace
                await publisher.finished.wait()
            # Within the same deadline: past it, this is cancelled and the row ages out.
            await _withdraw(serving)
            tg.cancel_scope.cancel()
    finally:
        await _close(relay)
    # The process's last line: with the `draining` line's timestamp it shows how long the
    # shutdown took (the README promises at most the grace + 1 s).
    log.info("relay_exit", exit_code=0, draining=relay.stopping)
    return 0


_SCHEMA_UNKNOWN: tuple[type[Exception], ...] = (
    *RETRYABLE_DB_ERRORS,
    psycopg.errors.UndefinedTable,
)


# Start-up waits for a database that may heal: 0.5 s, doubling, at most 30 s (jittered).
STARTUP_BACKOFF_BASE_SECONDS = 0.5
STARTUP_BACKOFF_CAP_SECONDS = 30.0
# The last part of the promised grace + 1 s: the tasks are cancelled this long before it
# ends, then the provider clients and the pool get CLOSE_STEP_SECONDS each, and the rest
# is left for the last log line and the interpreter's exit.
CLOSE_SECONDS = 0.5
CLOSE_STEP_SECONDS = 0.2


async def _wait_for_database(database_url: str, relay: Relay, health: HealthState) -> bool:
    """Probe until the database answers with the schema (True) or the relay is stopped
    (False); one log line and one /readyz reason per backoff step."""
    failures = 0
    while not relay.stopping:
        try:
            health.schema_version = await probe_database(database_url)
        except DatabaseNotYet as exc:
            failures += 1
            delay = half_jitter(
                capped_doubling(
                    STARTUP_BACKOFF_BASE_SECONDS, STARTUP_BACKOFF_CAP_SECONDS, failures
                ),
                relay.rng,
            )
            health.extra_problems[:] = [f"waiting for the database: {exc.reason}"]
            log.warning(
                "database_not_ready",
                reason=exc.reason,
                attempt=failures,
                retry_in=round(delay, 3),
                database=describe_conninfo(database_url),
            )
            with anyio.move_on_after(delay):
                await relay.wait_stopped()
            continue
        health.extra_problems.clear()
        return True
    return False


async def _withdraw(serving: InstanceHeartbeat) -> None:
    """Delete this relay's row, within CLOSE_SECONDS: a database that does not answer
    must not hold the exit, and the row then ages out."""
    with anyio.move_on_after(CLOSE_SECONDS) as scope:
        try:
            await serving.withdraw()
        except psycopg.Error as exc:
            log.warning("relay_withdraw_failed", error=type(exc).__name__, remedy="it ages out")
            return
    if scope.cancelled_caught:
        log.warning("relay_withdraw_failed", error="no answer", remedy="it ages out")
    else:
        log.info("relay_withdrawn", instance=serving.instance)


async def _close(relay: Relay) -> None:
    """Close the provider clients and the pool, within CLOSE_STEP_SECONDS each if
    stopping: a database or provider that does not answer must not hold the exit."""
    bound = None if relay.shutdown_deadline is None else CLOSE_STEP_SECONDS
    with anyio.CancelScope(shield=True), anyio.move_on_after(bound if bound else float("inf")):
        for lane in relay.lanes.values():
            await lane.adapter.aclose()
    await relay.db.close(wait_seconds=bound if bound else 5.0)


async def _watch_schema(relay: Relay, health: HealthState) -> None:
    """Keep readiness's view of the schema version current (a migration may run later)."""
    while True:
        try:
            rows = await relay.db.fetch_all("schema_version", row=dict_row)
            health.schema_version = rows[0]["version"] if rows else None
        except _SCHEMA_UNKNOWN:
            health.schema_version = None
        await anyio.sleep(10.0)


async def _watch_signals(
    relay: Relay,
    publisher: Publisher | None = None,
    everything: anyio.CancelScope | None = None,
    *,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        task_status.started()
        async for signum in signals:
            if relay.stopping:
                log.warning("second_signal_exit_now", signal=signal.Signals(signum).name)
                os._exit(1)
            log.info(
                "draining",
                signal=signal.Signals(signum).name,
                in_flight=relay.in_flight,
                grace_seconds=relay.options.shutdown_grace_seconds,
            )
            relay.stop()
            deadline = relay.shutdown_deadline
            hard_stop_at = (
                None if deadline is None else deadline + SHUTDOWN_FLUSH_MIN_SECONDS - CLOSE_SECONDS
            )
            if publisher is not None:
                # Its shielded final marks end by the hard stop too: a shield outlasts a
                # cancellation, and a database that stopped answering would hold the exit.
                publisher.start_draining(hard_stop_at=hard_stop_at)
            if everything is not None and deadline is not None and hard_stop_at is not None:
                # The one deadline holds whatever is down: a task still waiting on the
                # database, the broker or a provider then is cancelled (the drain and the
                # final flush end by it on their own when those answer).
                # Closing the clients and the pool after it fits in the promised
                # grace + 1 s too: the tasks are cancelled CLOSE_SECONDS earlier.
                everything.deadline = hard_stop_at
                _exit_if_still_running(deadline + SHUTDOWN_FLUSH_MIN_SECONDS + 2 * CLOSE_SECONDS)


def _exit_if_still_running(deadline: float) -> None:
    """A last resort: if a shielded cleanup somewhere still holds the process at
    ``deadline`` (anyio clock), exit without it rather than break the promised bound."""
    delay = max(deadline - anyio.current_time(), 0.0)

    def exit_now() -> None:
        log.error("shutdown_deadline_exceeded_exit_now", remedy="leases expire; re-driven")
        os._exit(1)

    timer = threading.Timer(delay, exit_now)
    timer.daemon = True  # a normal exit does not wait for it
    timer.start()
