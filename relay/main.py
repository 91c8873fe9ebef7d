"""`outbox-relay run`: wire settings into a relay and own its lifetime.

One task group owns everything. SIGTERM or SIGINT stops claiming and drains within
RELAY_SHUTDOWN_GRACE_SECONDS, then exits 0; a second signal exits at once (leases then
expire normally and other replicas re-drive the intents under the same keys).
"""

from __future__ import annotations

import os
import signal

import anyio
import structlog
from anyio.abc import TaskStatus
from prometheus_client import start_http_server

from provider_adapters.registry import build_adapter
from relay.config import Settings
from relay.db import Database
from relay.lanes import Lane
from relay.retry_policy import RetryPolicy
from relay.runtime import Relay, RelayOptions

__all__ = ["build_relay", "run_relay"]

log = structlog.get_logger("relay.main")


def build_relay(settings: Settings, database_url: str) -> Relay:
    lanes = {
        name: Lane(
            name,
            build_adapter(name, provider),
            concurrency=provider.concurrency,
            timeout_seconds=(provider.connect_timeout_ms + provider.timeout_ms) / 1000,
        )
        for name, provider in settings.providers.items()
    }
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
        shutdown_grace_seconds=settings.shutdown_grace_seconds,
    )
    db = Database(database_url, pool_size=settings.db_pool_size, name=settings.instance_name)
    return Relay(db, lanes, policy, options)


async def run_relay(settings: Settings, database_url: str) -> int:
    relay = build_relay(settings, database_url)
    if settings.metrics_port is not None:
        start_http_server(settings.metrics_port)
    await relay.db.open()
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(_watch_signals, relay)
            await tg.start(relay.run)
            log.info(
                "relay_ready",
                instance=settings.instance_name,
                providers=sorted(relay.lanes),
                lease_seconds=settings.lease_seconds,
            )
            await relay.finished.wait()
            tg.cancel_scope.cancel()
    finally:
        for lane in relay.lanes.values():
            with anyio.CancelScope(shield=True):
                await lane.adapter.aclose()
        await relay.db.close()
    return 0


async def _watch_signals(
    relay: Relay, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
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
