"""Webhooks: verified notifications per second into the inbox, and receipt to applied.

Method. A scratch database gets --payments captured payments (charges through an
in-process relay with a provider that answers at once). `outbox-relay webhooks serve`
runs as its own process, as in production. Every body is a Stripe-shaped
`charge.refunded` event, signed like Stripe (HMAC-SHA256 over "<t>.<body>"), built
before the clock starts.

1. Ingest: --events distinct notifications posted by an aiohttp client with --concurrency
   requests in flight; each is verified by the SDK, inserted and committed before its 200.
   Printed: notifications/s, and the ratio to the same client's GET /healthz on the same
   server (the HTTP stack's own ceiling on this machine, measured in the same run).
2. Steady rate: the inbox applier runs in this process (LISTEN wake-up, as in a relay);
   notifications arrive open-loop at --rate per second for --seconds; each reports a
   refund made outside the relay (one minor unit more than the last for its payment), so
   applying it writes the payment, a ledger posting, a result event and the ledger
   comparison. Lag = applied_at (clock_timestamp() in the applying transaction) minus
   received_at (the receiving transaction's now()), both on the database's clock.
   Printed: p50, p95, p99 and the slowest, and that every notification applied.

    python benchmarks/webhooks.py [--events 3000] [--rate 50] [--seconds 20] [--quick]

Writes benchmarks/results/webhooks.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import (
    ZeroLatencyProvider,
    free_port,
    insert_backlog,
    load_average,
    percentile,
    quiet_relay_logging,
    scratch_database,
    table,
    terminal_count,
    write_result,
)
from provider_adapters.fake.webhooks import signature_header
from provider_adapters.registry import build_notification_reader
from relay.core.inbox import InboxApplier, InboxOptions
from relay.core.lanes import Lane
from relay.core.runtime import Relay, RelayOptions
from relay.domain.retry_policy import RetryPolicy
from relay.infra.db import Database, listen_forever

SECRET = "whsec_benchmark"


def capture_payments(url: str, payments: int) -> list[str]:
    """Charge ``payments`` payments through the relay; return their provider references."""
    insert_backlog(url, payments, pairs=False, prefix="wh")

    async def drain() -> None:
        lane = Lane("stripe", ZeroLatencyProvider(), concurrency=100, timeout_seconds=10)
        relay = Relay(
            Database(url, pool_size=4, name="bench-setup"),
            {"stripe": lane},
            RetryPolicy(base_seconds=0.1, cap_seconds=1.0, max_attempts=3),
            RelayOptions(instance="bench-setup", poll_interval_seconds=0.05),
        )
        await relay.db.open()
        try:
            async with anyio.create_task_group() as tg:
                await tg.start(relay.run)
                while terminal_count(url) < payments:  # noqa: ASYNC110 - polls another process's writes
                    await anyio.sleep(0.1)
                relay.stop()
        finally:
            await relay.db.close()

    anyio.run(drain)
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT provider_reference FROM outbox.payments WHERE state = 'captured'"
            " ORDER BY payment_id"
        ).fetchall()
    return [str(r[0]) for r in rows]


def refund_event(event_id: str, reference: str, refunded: int) -> bytes:
    body = {
        "id": event_id,
        "object": "event",
        "api_version": "2024-06-20",
        "created": int(time.time()),
        "type": "charge.refunded",
        "livemode": False,
        "data": {
            "object": {
                "id": "ch_" + reference.removeprefix("pi_"),
                "object": "charge",
                "amount": 1000,
                "amount_captured": 1000,
                "amount_refunded": refunded,
                "currency": "eur",
                "payment_intent": reference,
                "refunded": False,
                "refunds": {
                    "object": "list",
                    "data": [
                        {
                            "id": f"re_{event_id}",
                            "object": "refund",
                            "amount": 1,
                            "status": "succeeded",
                            "metadata": {},
                        }
                    ],
                },
            }
        },
    }
    return json.dumps(body).encode()


def signed(body: bytes) -> dict[str, str]:
    return {
        "Stripe-Signature": signature_header(body.decode(), SECRET, int(time.time())),
        "Content-Type": "application/json",
    }


class Receiver:
    def __init__(self, url: str) -> None:
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
        env.update(
            RELAY_DATABASE_URL=url,
            RELAY_WEBHOOKS__STRIPE__SECRETS=json.dumps([SECRET]),
            RELAY_LOG_FORMAT="json",
            RELAY_DB_POOL_SIZE="8",
        )
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "relay",
                "webhooks",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.base = f"http://127.0.0.1:{self.port}"
        for _ in range(300):
            try:
                with psycopg.connect(url) as conn:
                    conn.execute("SELECT 1")
                import httpx

                if httpx.get(self.base + "/readyz", timeout=1).status_code == 200:
                    return
            except Exception:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("the receiver did not start")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def post_all(
    base: str, bodies: list[bytes], concurrency: int, *, health: bool = False
) -> float:
    """Seconds to deliver every body (or as many GET /healthz), ``concurrency`` at a time."""
    queue = list(reversed(bodies))
    failures = 0

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal failures
        while queue:
            body = queue.pop()
            if health:
                async with session.get(base + "/healthz") as answer:
                    await answer.read()
                    failures += answer.status != 200
                continue
            async with session.post(
                base + "/webhooks/stripe", data=body, headers=signed(body)
            ) as answer:
                await answer.read()
                failures += answer.status != 200

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    if failures:
        raise RuntimeError(f"{failures} deliveries were not answered 200")
    return elapsed


async def steady(url: str, base: str, bodies: list[bytes], rate: float) -> float:
    """Post ``bodies`` open-loop at ``rate``/s while the applier runs; wait until every
    one is applied; return the posting's lateness (s) behind its schedule at worst."""
    db = Database(url, pool_size=5, name="bench-inbox")
    await db.open()
    applier = InboxApplier(
        db,
        {"stripe": build_notification_reader("stripe", "stripe")},
        InboxOptions(instance="bench-inbox", poll_interval_seconds=1.0, concurrency=4),
    )
    worst_late = 0.0
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(applier.run_forever)
            tg.start_soon(
                partial(listen_forever, url, applier.wake, channel="outbox_webhook_inbox")
            )
            await anyio.sleep(0.5)
            async with aiohttp.ClientSession() as session:
                start = time.perf_counter()

                async def one(body: bytes) -> None:
                    async with session.post(
                        base + "/webhooks/stripe", data=body, headers=signed(body)
                    ) as answer:
                        await answer.read()
                        if answer.status != 200:
                            raise RuntimeError(f"answered {answer.status}")

                async with anyio.create_task_group() as senders:
                    for n, body in enumerate(bodies):
                        due = start + n / rate
                        wait = due - time.perf_counter()
                        if wait > 0:
                            await anyio.sleep(wait)
                        worst_late = max(worst_late, time.perf_counter() - due)
                        senders.start_soon(one, body)
            while True:
                with psycopg.connect(url) as conn:
                    row = conn.execute(
                        "SELECT count(*) FROM outbox.webhook_inbox WHERE status = 'received'"
                    ).fetchone()
                if row is not None and row[0] == 0:
                    break
                await anyio.sleep(0.2)
            tg.cancel_scope.cancel()
    finally:
        await db.close()
    return worst_late


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--payments", type=int, default=200)
    parser.add_argument("--events", type=int, default=3000, help="notifications ingested")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rate", type=float, default=50.0, help="steady-phase notifications/s")
    parser.add_argument("--seconds", type=float, default=20.0, help="steady-phase duration")
    parser.add_argument("--quick", action="store_true", help="a one-minute run")
    args = parser.parse_args()
    if args.quick:
        args.events, args.seconds = 1000, 10.0
    quiet_relay_logging()
    with scratch_database("webhooks") as url:
        references = capture_payments(url, args.payments)
        refunded = dict.fromkeys(references, 0)

        def next_body(n: int, phase: str) -> bytes:
            reference = references[n % len(references)]
            refunded[reference] += 1
            return refund_event(f"evt_{phase}_{n:07d}", reference, refunded[reference])

        ingest = [next_body(n, "ingest") for n in range(args.events)]
        receiver = Receiver(url)
        try:
            seconds = asyncio.run(post_all(receiver.base, ingest, args.concurrency))
            health = asyncio.run(post_all(receiver.base, ingest, args.concurrency, health=True))
            # Phase 1's rows are bookkeeping for phase 2: set aside, unapplied.
            with psycopg.connect(url) as conn:
                stored = conn.execute("SELECT count(*) FROM outbox.webhook_inbox").fetchone()
                conn.execute(
                    "UPDATE outbox.webhook_inbox SET status = 'ignored', applied_at = now(),"
                    " result = 'benchmark ingest phase'"
                )
                # Refunds of the ingest phase are not applied: restart the totals.
            refunded.update(dict.fromkeys(references, 0))
            count = int(args.rate * args.seconds)
            steady_bodies = [next_body(n, "steady") for n in range(count)]
            late = anyio.run(steady, url, receiver.base, steady_bodies, args.rate)
        finally:
            receiver.stop()
        with psycopg.connect(url) as conn:
            lags = [
                float(r[0])
                for r in conn.execute(
                    "SELECT extract(epoch FROM applied_at - received_at) FROM outbox.webhook_inbox"
                    " WHERE event_id LIKE 'evt_steady_%' AND status = 'applied'"
                    " AND result LIKE 'recorded a refund%'"
                )
            ]
            exceptions = conn.execute(
                "SELECT count(*) FROM outbox.reconciliation_exceptions"
            ).fetchone()
    assert stored is not None and stored[0] == args.events, "every notification stored once"
    if len(lags) != count:
        raise RuntimeError(f"{count - len(lags)} steady notifications were not applied as refunds")
    ingest_rate = args.events / seconds
    health_rate = args.events / health
    result: dict[str, Any] = {
        "ingest": {
            "events": args.events,
            "concurrency": args.concurrency,
            "notifications_per_second": round(ingest_rate, 1),
            "healthz_per_second": round(health_rate, 1),
            "ratio_to_healthz": round(ingest_rate / health_rate, 3),
        },
        "steady": {
            "rate": args.rate,
            "notifications": count,
            "lag_ms": {
                "p50": round(percentile(lags, 50) * 1000, 1),
                "p95": round(percentile(lags, 95) * 1000, 1),
                "p99": round(percentile(lags, 99) * 1000, 1),
                "max": round(max(lags) * 1000, 1),
            },
            "sender_worst_late_ms": round(late * 1000, 1),
            "exceptions_opened": int(exceptions[0]) if exceptions else None,
        },
        "load_average_after": load_average(),
    }
    print(
        table(
            [
                ("ingest (verified, stored, 200)", "notifications/s", "ratio to GET /healthz"),
                (
                    f"{args.events} at {args.concurrency} in flight",
                    f"{ingest_rate:,.0f}",
                    f"{ingest_rate / health_rate:.2f} ({health_rate:,.0f}/s)",
                ),
            ]
        )
    )
    print()
    lag = result["steady"]["lag_ms"]
    print(
        table(
            [
                ("steady rate", "receipt to applied p50", "p95", "p99", "max"),
                (
                    f"{args.rate:g}/s for {args.seconds:g} s",
                    f"{lag['p50']} ms",
                    f"{lag['p95']} ms",
                    f"{lag['p99']} ms",
                    f"{lag['max']} ms",
                ),
            ]
        )
    )
    print(f"\nwrote {write_result('webhooks', result)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
