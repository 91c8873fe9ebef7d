"""Latency: from the application's COMMIT to the provider call, and to the outcome committed.

Method. Inserter processes (--inserters, default 4) play the application: each commits
one charge for a new payment per transaction, on a fixed schedule that together makes
--rate intents/s (open loop: an insert that falls behind its slot goes at once, and the
lag is reported). Each records, per intent id, the wall clock (time.time()) right after
COMMIT returned. The relay runs in this process with the production defaults (LISTEN,
jittered polling, batch 100) and an in-process adapter that answers at once and records
time.time() when it is called. The outcome's commit time is the relay's clock right
after its write-back transaction's COMMIT returned (Store.complete_fenced wrapped here), the
mirror image of the insert side; the row's completed_at is now() of the write-back
transaction, which is earlier than its commit, so it is not used. All clocks are the
same host clock, read in different processes. An intent that had no call or no outcome
by the end of the drain wait counts as infinitely late. The first --warmup seconds of
inserts are left out.

    pickup  = provider call - insert commit
    outcome = write-back commit - insert commit

Prints p50, p95 and p99 per rate (goal: pickup p99 <= 25 ms at 1,000 intents/s); writes
benchmarks/results/latency.json.

    python benchmarks/latency.py [--rates 1000] [--seconds 30] [--quick]
"""

from __future__ import annotations

import argparse
import multiprocessing
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import (
    ZeroLatencyProvider,
    load_average,
    percentile,
    quiet_relay_logging,
    scratch_database,
    table,
    write_result,
)
from provider_adapters.base import Command
from relay.core.lanes import Lane
from relay.core.runtime import Relay, RelayOptions
from relay.domain.intents import WriteBack
from relay.domain.retry_policy import RetryPolicy
from relay.infra.db import Database

INSERT = (
    "INSERT INTO outbox.payment_intents (payment_id, action, provider, amount_minor, currency,"
    " payment_method) VALUES (%s, 'charge', 'stripe', 1000, 'EUR', 'pm_card_visa') RETURNING id"
)


def inserter(
    url: str, worker: int, workers: int, rate: float, start: float, seconds: float, out: Any
) -> None:
    """One application connection: its share of the schedule, (id, commit time, lag)."""
    records: list[tuple[int, float, float]] = []
    with psycopg.connect(url) as conn:
        conn.execute("SELECT 1")
        conn.commit()
        n = 0
        while True:
            due = start + (n * workers + worker) / rate
            if due >= start + seconds:
                break
            wait = due - time.time()
            if wait > 0:
                time.sleep(wait)
            row = conn.execute(INSERT, (f"lat-{worker}-{n}",)).fetchone()
            conn.commit()
            committed = time.time()
            assert row is not None
            records.append((row[0], committed, max(committed - due, 0.0)))
            n += 1
    out.put(records)


async def measure(
    url: str, rate: float, seconds: float, inserters: int, drain_timeout: float
) -> dict[str, Any]:
    called: dict[int, float] = {}
    written: dict[int, float] = {}

    def on_call(command: Command) -> None:
        called.setdefault(command.intent_id, time.time())

    lane = Lane("stripe", ZeroLatencyProvider(on_call=on_call), concurrency=100, timeout_seconds=10)
    relay = Relay(
        Database(url, pool_size=4, name="bench-latency"),
        {"stripe": lane},
        RetryPolicy(base_seconds=1.0, cap_seconds=300.0, max_attempts=8),
        RelayOptions(instance="bench-latency"),  # production defaults
        rng=random.Random(1).random,
    )
    # The completer writes outcomes through complete_fenced (complete wraps it).
    complete_fenced = relay.store.complete_fenced

    async def timed_complete(batch: Sequence[WriteBack], **kwargs: Any) -> set[tuple[int, int]]:
        fenced = await complete_fenced(batch, **kwargs)
        now = time.time()
        for intent_id, _ in fenced:
            written.setdefault(intent_id, now)
        return fenced

    relay.store.complete_fenced = timed_complete  # type: ignore[method-assign]
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    await relay.db.open()
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(relay.run)
            await anyio.sleep(1.0)  # pool and LISTEN connected, plans warm
            start = time.time() + 1.0
            procs = [
                context.Process(
                    target=inserter, args=(url, k, inserters, rate, start, seconds, queue)
                )
                for k in range(inserters)
            ]
            for proc in procs:
                proc.start()
            records: list[tuple[int, float, float]] = []
            for _ in procs:
                records += await anyio.to_thread.run_sync(queue.get)
            for proc in procs:
                await anyio.to_thread.run_sync(proc.join)
            inserted_until = time.time()
            with anyio.move_on_after(drain_timeout):
                while len(written) < len(records):  # noqa: ASYNC110 - a plain progress check
                    await anyio.sleep(0.05)
            relay.stop()
    finally:
        await relay.db.close()
    measured = [r for r in records if r[1] >= start + min(3.0, seconds / 4)]
    inf = float("inf")
    pickup = [(called.get(i, inf) - t) * 1000 for i, t, _ in measured]
    outcome = [(written.get(i, inf) - t) * 1000 for i, t, _ in measured]
    lags = [lag * 1000 for _, _, lag in records]
    finished_in_window = sum(1 for i, _, _ in records if written.get(i, inf) <= inserted_until)
    return {
        "rate": rate,
        "seconds": seconds,
        "inserted": len(records),
        "insert_rate_achieved": len(records) / (max(r[1] for r in records) - start),
        "insert_lag_ms_p99": percentile(lags, 99),
        "relay_rate_while_inserting": finished_in_window / (inserted_until - start),
        "measured": len(measured),
        "unfinished": sum(1 for i, _, _ in measured if i not in written),
        "pickup_ms": {f"p{q}": percentile(pickup, q) for q in (50, 95, 99)},
        "outcome_ms": {f"p{q}": percentile(outcome, q) for q in (50, 95, 99)},
        "load_average_after": load_average(),
    }


def ms(value: float) -> str:
    return "never" if value == float("inf") else f"{value:,.1f}"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--rates", default="1000", help="comma-separated intents/s to test (default 1000)"
    )
    parser.add_argument("--seconds", type=float, default=30.0, help="insert phase per rate (30)")
    parser.add_argument("--inserters", type=int, default=4, help="application connections (4)")
    parser.add_argument(
        "--drain-timeout", type=float, default=60.0, help="wait for the last outcomes (60 s)"
    )
    parser.add_argument("--quick", action="store_true", help="8 s per rate, 20 s drain wait")
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.drain_timeout = 8.0, 20.0
    rates = [float(r) for r in args.rates.split(",")]
    quiet_relay_logging()
    results: dict[str, dict[str, Any]] = {}
    for rate in rates:
        with scratch_database("latency") as url:
            print(f"  {rate:,.0f} intents/s for {args.seconds:g} s (load {load_average()})")
            result = anyio.run(measure, url, rate, args.seconds, args.inserters, args.drain_timeout)
        results[f"{rate:g}"] = result
        print(
            f"  {rate:,.0f}/s: inserted at {result['insert_rate_achieved']:,.0f}/s, relay kept"
            f" {result['relay_rate_while_inserting']:,.0f}/s, pickup p99"
            f" {ms(result['pickup_ms']['p99'])} ms",
            flush=True,
        )
    rows: list[tuple[str, ...]] = [
        (
            "target/s",
            "inserted/s",
            "relayed/s",
            "pickup p50",
            "p95",
            "p99 (goal <= 25)",
            "outcome p50",
            "p95",
            "p99",
            "unfinished",
        )
    ]
    for r in results.values():
        rows.append(
            (
                f"{r['rate']:,.0f}",
                f"{r['insert_rate_achieved']:,.0f}",
                f"{r['relay_rate_while_inserting']:,.0f}",
                *(ms(r["pickup_ms"][p]) for p in ("p50", "p95", "p99")),
                *(ms(r["outcome_ms"][p]) for p in ("p50", "p95", "p99")),
                f"{r['unfinished']:,}",
            )
        )
    print("latencies in ms")
    print(table(rows))
    path = write_result(
        "latency",
        {"inserters": args.inserters, "quick": args.quick, "runs": results},
    )
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
