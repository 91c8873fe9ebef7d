"""Drain: how fast one relay empties a backlog, with full bookkeeping.

N intents (default 100,000) over N/2 payments are inserted beforehand with COPY (the
outbox's insert triggers run): per payment an authorize, then a capture that waits
``blocked`` until the authorize is written, so the drain exercises per-payment order and
promotion as well as the claim and the write-back (intent, payment, audit rows, ledger
lines, result event). One relay then drains it, in this process, twice:

* with an in-process adapter that answers every call at once (ZeroLatencyProvider in
  benchmarks/_common.py): the relay's own ceiling;
* with the fake Stripe-compatible provider over HTTP (its own process, no latency, no
  faults), through the Stripe adapter the relay ships.

The relay logs as in production (JSON lines), into /dev/null. Prints intents/s and the
relay's CPU per intent; writes benchmarks/results/drain.json. benchmarks/sql_limit.py
compares the first figure with the database's own limit.

    python benchmarks/drain.py [--intents 100000] [--http-intents N] [--quick]
    python benchmarks/drain.py --profile      # + pyinstrument profile of the in-process run
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import (
    BENCH_API_KEY,
    RESULTS,
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
from relay.config import ProviderSettings
from relay.db import Database
from relay.lanes import Lane
from relay.main import build_lane
from relay.retry_policy import RetryPolicy
from relay.runtime import Relay, RelayOptions


async def drain(
    url: str,
    lane: Lane,
    intents: int,
    *,
    batch_size: int,
    max_in_flight: int,
    pool_size: int,
    profile: Path | None = None,
) -> dict[str, Any]:
    """Run one relay until ``intents`` outcomes are committed; return rate and CPU."""
    relay = Relay(
        Database(url, pool_size=pool_size, name="bench-drain"),
        {lane.provider: lane},
        RetryPolicy(base_seconds=1.0, cap_seconds=300.0, max_attempts=8),
        RelayOptions(
            instance="bench-drain",
            batch_size=batch_size,
            max_in_flight=max_in_flight,
            lease_seconds=60,
        ),
        rng=random.Random(1).random,
    )
    profiler = None
    if profile is not None:
        from pyinstrument import Profiler

        profiler = Profiler(interval=0.001, async_mode="disabled")
    await relay.db.open()
    try:
        async with anyio.create_task_group() as tg:
            cpu0, started = time.process_time(), time.perf_counter()
            if profiler is not None:
                profiler.start()
            await tg.start(relay.run)
            # The completer counts committed outcomes: no polling query competes with the
            # relay for the database, and a 5 ms check costs the relay nothing noticeable.
            while relay.completer.written < intents:  # noqa: ASYNC110
                await anyio.sleep(0.005)
            elapsed = time.perf_counter() - started
            cpu = time.process_time() - cpu0
            if profiler is not None:
                profiler.stop()
            relay.stop()
    finally:
        await lane.adapter.aclose()
        await relay.db.close()
    if profiler is not None and profile is not None:
        await anyio.Path(profile).write_text(
            profiler.output_text(unicode=False, color=False, show_all=False)
        )
        await anyio.Path(profile.with_suffix(".html")).write_text(profiler.output_html())
    return {
        "intents": intents,
        "seconds": elapsed,
        "intents_per_second": intents / elapsed,
        "relay_cpu_ms_per_intent": cpu / intents * 1000,
        "relay_cpu_share": cpu / elapsed,
    }


def run_variant(label: str, intents: int, args: argparse.Namespace, **kw: Any) -> dict[str, Any]:
    with scratch_database("drain") as url:
        started = time.perf_counter()
        insert_backlog(url, intents)
        print(
            f"  {label}: {intents:,} intents inserted in {time.perf_counter() - started:.0f} s"
            f" (load {load_average()}); draining ...",
            flush=True,
        )
        lane = kw.pop("lane_factory")()
        result = anyio.run(
            lambda: drain(
                url,
                lane,
                intents,
                batch_size=args.batch_size,
                max_in_flight=args.max_in_flight,
                pool_size=args.pool_size,
                **kw,
            )
        )
        counts = status_counts(url)
    result["statuses"] = counts
    result["load_average_after"] = load_average()
    if counts.get("succeeded", 0) != intents:
        raise SystemExit(f"{label}: not every intent succeeded: {counts}")
    print(
        f"  {label}: {result['intents_per_second']:,.0f} intents/s"
        f" ({result['relay_cpu_ms_per_intent']:.2f} ms relay CPU per intent)",
        flush=True,
    )
    return result


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--intents", type=int, default=100_000, help="in-process run (100000)")
    parser.add_argument(
        "--http-intents", type=int, help="fake-provider run (default: --intents); 0 skips it"
    )
    parser.add_argument("--batch-size", type=int, default=100, help="RELAY_BATCH_SIZE (100)")
    parser.add_argument("--max-in-flight", type=int, default=256, help="RELAY_MAX_IN_FLIGHT")
    parser.add_argument("--pool-size", type=int, default=4, help="RELAY_DB_POOL_SIZE (4)")
    parser.add_argument(
        "--concurrency",
        type=int,
        default=100,
        help="lane concurrency of the in-process run (default 100: a full batch per claim)",
    )
    parser.add_argument(
        "--http-concurrency", type=int, default=32, help="lane concurrency over HTTP (32)"
    )
    parser.add_argument("--quick", action="store_true", help="5,000 and 1,000 intents")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="profile the in-process run with pyinstrument (pip install pyinstrument): "
        "benchmarks/results/drain_profile.txt and .html",
    )
    args = parser.parse_args()
    if args.quick:
        args.intents = 5_000
        args.http_intents = 1_000 if args.http_intents is None else args.http_intents
    http_intents = args.intents if args.http_intents is None else args.http_intents
    quiet_relay_logging()
    print(
        f"drain: authorize + capture per payment; batch {args.batch_size},"
        f" max in flight {args.max_in_flight}, pool {args.pool_size}"
    )
    results: dict[str, dict[str, Any]] = {}
    profile = RESULTS / "drain_profile.txt" if args.profile else None
    if profile is not None:
        RESULTS.mkdir(exist_ok=True)
    results["in-process adapter"] = run_variant(
        "in-process adapter",
        args.intents,
        args,
        lane_factory=lambda: Lane(
            "stripe",
            ZeroLatencyProvider(),
            concurrency=args.concurrency,
            timeout_seconds=10.0,
        ),
        profile=profile,
    )
    if http_intents:
        fake = FakeProvider()
        try:
            results["fake provider over HTTP"] = run_variant(
                "fake provider over HTTP",
                http_intents,
                args,
                lane_factory=lambda: build_lane(
                    "stripe",
                    ProviderSettings(
                        base_url=fake.url,
                        api_key=BENCH_API_KEY,
                        concurrency=args.http_concurrency,
                    ),
                ),
            )
        finally:
            fake.stop()
    rows = [("relay drain", "intents", "intents/s", "relay CPU ms/intent")]
    rows += [
        (
            label,
            f"{r['intents']:,}",
            f"{r['intents_per_second']:,.0f}",
            f"{r['relay_cpu_ms_per_intent']:.2f}",
        )
        for label, r in results.items()
    ]
    print(table(rows))
    path = write_result(
        "drain",
        {
            "workload": "authorize then capture per payment (N/2 payments)",
            "batch_size": args.batch_size,
            "max_in_flight": args.max_in_flight,
            "pool_size": args.pool_size,
            "concurrency": args.concurrency,
            "http_concurrency": args.http_concurrency,
            "quick": args.quick,
            "runs": results,
            "in_process_intents_per_second": results["in-process adapter"]["intents_per_second"],
        },
    )
    print(f"written {path}" + (f" and {profile}" if profile else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
