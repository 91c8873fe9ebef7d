"""Provider latency: with 100 ms per provider call and lane concurrency C, the achieved
throughput against the ideal C / 0.1 s.

For each C one relay (in this process, default settings otherwise, max in flight raised
to C when C is larger) drains C / 0.1 x --seconds charges. Two providers:

* the fake Stripe-compatible provider in its own process with --latency-ms 100, through
  the Stripe adapter the relay ships (HTTP, the SDK's request building and parsing);
* an in-process adapter that sleeps 100 ms and succeeds (no HTTP): what the relay's own
  loop, claims and write-backs allow.

The rate is taken over the steady part of the drain, from 10 % to 90 % of the outcomes
committed (ramp-up and tail left out). Prints intents/s and the ratio to C / 0.1 s;
writes benchmarks/results/provider_latency.json.

    python benchmarks/provider_latency.py [--concurrency 8,32,64] [--seconds 20] [--quick]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
from pydantic import SecretStr

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import (
    BENCH_API_KEY,
    FakeProvider,
    ZeroLatencyProvider,
    insert_backlog,
    load_average,
    quiet_relay_logging,
    scratch_database,
    status_counts,
    table,
    write_result,
)
from relay.core.lanes import Lane
from relay.core.runtime import Relay, RelayOptions
from relay.domain.retry_policy import RetryPolicy
from relay.infra.config import ProviderSettings
from relay.infra.db import Database
from relay.service.main import build_lane


async def steady_rate(url: str, lane: Lane, intents: int) -> float:
    relay = Relay(
        Database(url, pool_size=4, name="bench-provider-latency"),
        {lane.provider: lane},
        RetryPolicy(base_seconds=1.0, cap_seconds=300.0, max_attempts=8),
        RelayOptions(instance="bench-provider-latency", max_in_flight=max(256, lane.concurrency)),
        rng=random.Random(1).random,
    )
    marks: list[tuple[float, int]] = []
    await relay.db.open()
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(relay.run)
            while relay.completer.written < intents:
                marks.append((time.perf_counter(), relay.completer.written))
                await anyio.sleep(0.01)
            marks.append((time.perf_counter(), relay.completer.written))
            relay.stop()
    finally:
        await lane.adapter.aclose()
        await relay.db.close()
    low = next(m for m in marks if m[1] >= intents * 0.1)
    high = next(m for m in marks if m[1] >= intents * 0.9)
    return (high[1] - low[1]) / (high[0] - low[0])


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--concurrency", default="8,32,64", help="values of C (8,32,64)")
    parser.add_argument("--latency-ms", type=int, default=100, help="provider latency (100)")
    parser.add_argument("--seconds", type=float, default=20.0, help="ideal drain time per run")
    parser.add_argument("--quick", action="store_true", help="C = 8 and 32, 3 s each")
    args = parser.parse_args()
    if args.quick:
        args.concurrency, args.seconds = "8,32", 3.0
    latency = args.latency_ms / 1000
    quiet_relay_logging()
    fake = FakeProvider("--latency-ms", str(args.latency_ms))
    results: list[dict[str, Any]] = []
    try:
        for c in (int(v) for v in args.concurrency.split(",")):
            ideal = c / latency
            intents = int(ideal * args.seconds)

            def over_http(c: int = c) -> Lane:
                return build_lane(
                    "stripe",
                    ProviderSettings(
                        base_url=fake.url, api_key=SecretStr(BENCH_API_KEY), concurrency=c
                    ),
                )

            def sleeping(c: int = c) -> Lane:
                return Lane(
                    "stripe",
                    ZeroLatencyProvider(latency=latency),
                    concurrency=c,
                    timeout_seconds=10.0,
                )

            lanes: dict[str, Callable[[], Lane]] = {
                "fake provider over HTTP (Stripe adapter)": over_http,
                "in-process adapter sleeping": sleeping,
            }
            for label, make_lane in lanes.items():
                with scratch_database("provider_latency") as url:
                    insert_backlog(url, intents, pairs=False)
                    rate = anyio.run(steady_rate, url, make_lane(), intents)
                    counts = status_counts(url)
                if counts.get("succeeded", 0) != intents:
                    raise SystemExit(f"{label}, C={c}: not every intent succeeded: {counts}")
                results.append(
                    {
                        "provider": label,
                        "concurrency": c,
                        "intents": intents,
                        "ideal_per_second": ideal,
                        "intents_per_second": rate,
                        "ratio": rate / ideal,
                        "load_average_after": load_average(),
                    }
                )
                print(
                    f"  C={c}, {label}: {rate:,.0f}/s of {ideal:,.0f}/s ideal"
                    f" (load {load_average()})",
                    flush=True,
                )
    finally:
        fake.stop()
    rows = [("provider", "C", "intents/s", "C / latency", "ratio")]
    rows += [
        (
            r["provider"],
            str(r["concurrency"]),
            f"{r['intents_per_second']:,.0f}",
            f"{r['ideal_per_second']:,.0f}",
            f"{r['ratio']:.2f}",
        )
        for r in results
    ]
    print(f"provider latency {args.latency_ms} ms; steady rate over 10-90 % of the drain")
    print(table(rows))
    path = write_result(
        "provider_latency",
        {
            "latency_ms": args.latency_ms,
            "seconds": args.seconds,
            "quick": args.quick,
            "runs": results,
        },
    )
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
