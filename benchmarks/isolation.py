"""Isolation: a healthy provider's throughput alone, and beside a sick neighbour.

The relay runs in this process with two lanes; each provider is the fake provider in its
own process. Three sick neighbours: slow (every answer after --sick-latency-ms), failing (every
call 503: the breaker opens) and slow-and-flaky (slow successes, half the calls 503, which
rarely trips the breaker: the worst case). The sick lane has the default breaker and the
relay the default retry policy. Prints intents/s of the healthy provider in both
runs and their ratio (goal >= 0.95); writes benchmarks/results/isolation.json.

    python benchmarks/isolation.py [--intents 5000]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import anyio
import psycopg
from pydantic import SecretStr

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import FakeProvider, scratch_database, table, write_result
from relay.core.runtime import Relay, RelayOptions
from relay.domain.retry_policy import RetryPolicy
from relay.infra.config import ProviderSettings
from relay.infra.db import Database
from relay.service.main import build_lane


def insert(url: str, provider: str, count: int, prefix: str) -> None:
    with (
        psycopg.connect(url) as conn,
        conn.cursor() as cur,
        cur.copy(
            "COPY outbox.payment_intents (payment_id, action, provider, amount_minor, currency,"
            " payment_method) FROM STDIN"
        ) as copy,
    ):
        for n in range(count):
            copy.write_row((f"{prefix}-{n}", "charge", provider, 1000, "EUR", "pm_card_visa"))


async def drain(url: str, providers: dict[str, ProviderSettings], healthy: int) -> float:
    lanes = {name: build_lane(name, spec) for name, spec in providers.items()}
    relay = Relay(
        Database(url, pool_size=4, name="bench-isolation"),
        lanes,
        RetryPolicy(base_seconds=1.0, cap_seconds=300.0, max_attempts=8),  # the defaults
        RelayOptions(
            instance="bench",
            batch_size=100,
            max_in_flight=512,
            lease_seconds=60,
            shutdown_grace_seconds=0.5,  # the sick lane's calls need not finish
        ),
        rng=random.Random(1).random,
    )
    await relay.db.open()
    try:
        async with anyio.create_task_group() as tg:
            started = time.perf_counter()
            await tg.start(relay.run)
            async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
                while True:
                    cur = await conn.execute(
                        "SELECT count(*) FROM outbox.payment_intents"
                        " WHERE provider = 'healthy' AND status = 'succeeded'"
                    )
                    row = await cur.fetchone()
                    assert row is not None
                    if row[0] >= healthy:
                        break
                    await anyio.sleep(0.02)
            elapsed = time.perf_counter() - started
            relay.stop()
    finally:
        for lane in lanes.values():
            await lane.adapter.aclose()
        await relay.db.close()
    return healthy / elapsed


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--intents", type=int, default=3_000, help="healthy intents per run")
    parser.add_argument("--sick-latency-ms", type=int, default=2_000)
    parser.add_argument("--concurrency", type=int, default=32, help="each lane's concurrency")
    args = parser.parse_args()
    healthy_fake = FakeProvider()
    latency = str(args.sick_latency_ms)
    sick_fakes = {
        "slow": FakeProvider("--latency-ms", latency),
        "failing": FakeProvider("--rate-503", "1.0"),
        "slow and flaky": FakeProvider("--latency-ms", latency, "--rate-503", "0.5"),
    }
    key = SecretStr("sk_test_bench")
    healthy = ProviderSettings(base_url=healthy_fake.url, api_key=key, concurrency=args.concurrency)
    results: dict[str, float] = {}
    try:
        runs: list[tuple[str, dict[str, ProviderSettings]]] = [("alone", {"healthy": healthy})]
        for label, fake in sick_fakes.items():
            # The sick lane runs with the default breaker, as a user would run it: what
            # it costs the healthy lane is the question, with every defence on.
            sick = ProviderSettings(base_url=fake.url, api_key=key, concurrency=args.concurrency)
            runs.append((f"beside a {label} provider", {"healthy": healthy, "sick": sick}))
        for label, providers in runs:
            with scratch_database("isolation") as url:
                insert(url, "healthy", args.intents, "h")
                if "sick" in providers:
                    insert(url, "sick", 2_000, "s")
                rate = anyio.run(drain, url, providers, args.intents)
                results[label] = rate
                print(f"  healthy {label}: {rate:,.0f} intents/s", flush=True)
    finally:
        healthy_fake.stop()
        for fake in sick_fakes.values():
            fake.stop()
    alone = results["alone"]
    rows = [("healthy provider", "intents/s", "ratio to alone (goal >= 0.95)")]
    rows += [(label, f"{rate:,.0f}", f"{rate / alone:.2f}") for label, rate in results.items()]
    print(table(rows))
    path = write_result(
        "isolation",
        {
            "intents": args.intents,
            "sick_latency_ms": args.sick_latency_ms,
            "concurrency": args.concurrency,
            "intents_per_second": results,
            "ratios": {label: rate / alone for label, rate in results.items() if label != "alone"},
        },
    )
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
