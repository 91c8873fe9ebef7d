"""Pickup latency at the highest insert rate the application side reaches (issue 23, goal 4).

Pickup is the time from an intent's INSERT being committed to a relay's claim of it being
committed: the claim is what takes the intent (its lease, its creation's audit rows since
sql/0019); the provider call follows in the same process without touching the database.

Method. A relay runs in this process with the production defaults (LISTEN on
outbox_payment_intents, per-relay wake-up wishes of sql/0031, jittered polling, batch
100, two write-back writers) and an in-process adapter that answers at once, so nothing
but the relay and the database stands between an insert and its claim. Inserter
processes (--inserters, default 4) play the application: one charge for a new payment
per transaction (the INSERT of benchmarks/latency.py), each recording the intent's id,
the database's ``created_at`` (``now()`` of the inserting transaction, its start) and the
wall clock right after its COMMIT returned. The relay's ``Store.claim`` is wrapped: the
wall clock right after the claim returned (its commit) is the claim time of every row it
took; the adapter records the call. All clocks are this host's (PostgreSQL runs on it), read
in different processes. The database keeps no commit time of its own
(``track_commit_timestamp`` is off by default and a claim's ``updated_at`` is overwritten
by the write-back), so:

    pickup          = claim returned - insert's COMMIT returned   (the figure; goal p99 <= 25 ms)
    pickup from db  = claim returned - created_at                 (adds the INSERT and its commit)
    call            = provider call  - insert's COMMIT returned
    claim wait      = claim sent     - insert's COMMIT returned   (how long before a claim started)

Phases, each on a fresh scratch database with its own relay:

1. ``max``: the inserters insert as fast as they can (closed loop) while the relay works:
   the highest insert rate the application side reaches here, and the pickup at it.
2. Open loop at fractions (--fractions, default 0.5 and 0.9) of the rate phase 1
   reached: each inserter keeps a fixed schedule; one that falls behind its slot inserts at
   once and the lag is reported.

The first --warmup seconds of each phase are left out. An intent not claimed by the end
of the drain wait counts as infinitely late. Also counted per phase: the relay's claims
(rows per claim, time in the database), the NOTIFYs it received, its wake-ups, and the
CPU of the relay process. The machine is shared: the load average is printed with each
phase. Writes benchmarks/results/pickup_latency.json with the code's fingerprint;
RELAY_DATABASE_URL names the server (scratch databases are made on it).

With --floor, two more phases run the relay's claim statement alone, back to back on one
connection of its own process (no relay, no provider calls, no write-backs competing for
the cores), first at the rate the relay's closed loop reached, then closed loop: the pickup
no relay built on that claim (its lease, its creation audit rows, its commit) can beat on
this machine.

    python benchmarks/pickup_latency.py [--seconds 20] [--fractions 0.5,0.9] [--quick] [--floor]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import (
    ZeroLatencyProvider,
    cpu_seconds,
    load_average,
    percentile,
    quiet_relay_logging,
    scratch_database,
    table,
    write_result,
)
from benchmarks.latency import ms
from provider_adapters.base import Command
from relay.core.lanes import Lane
from relay.core.runtime import Relay, RelayOptions
from relay.domain.intents import IntentRow
from relay.domain.retry_policy import RetryPolicy
from relay.infra.db import Database, listen_forever
from relay.infra.queries import QUERIES

INSERT = (
    "INSERT INTO outbox.payment_intents (payment_id, action, provider, amount_minor, currency,"
    " payment_method) VALUES (%s, 'charge', 'stripe', 1000, 'EUR', 'pm_card_visa')"
    " RETURNING id, created_at"
)
INF = float("inf")


def inserter(
    url: str, worker: int, workers: int, rate: float, start: float, seconds: float, out: Any
) -> None:
    """One application connection. ``rate`` 0: as fast as it can until start + seconds;
    else its share of a fixed schedule. Puts [(id, commit returned, created_at, lag)]."""
    records: list[tuple[int, float, float, float]] = []
    with psycopg.connect(url) as conn:
        conn.execute("SELECT 1")
        conn.commit()
        end = start + seconds
        wait = start - time.time()
        if wait > 0:
            time.sleep(wait)
        n = 0
        while True:
            if rate:
                due = start + (n * workers + worker) / rate
                if due >= end:
                    break
                wait = due - time.time()
                if wait > 0:
                    time.sleep(wait)
            else:
                due = time.time()
                if due >= end:
                    break
            row = conn.execute(INSERT, (f"pick-{worker}-{n}",)).fetchone()
            conn.commit()
            committed = time.time()
            assert row is not None
            records.append((row[0], committed, row[1].timestamp(), max(committed - due, 0.0)))
            n += 1
    out.put(records)


def bare_claimer(url: str, start: float, seconds: float, out: Any) -> None:
    """The floor: the relay's claim statement back to back on one connection, and nothing
    else (no calls, no write-backs, no event loop). Puts [(id, sent, returned)] and
    [(sent, rows, seconds)] per claim. After an empty claim it waits 0.5 ms (a relay waits
    for a NOTIFY), which can add up to that much to the floor's pickup."""
    taken: list[tuple[int, float, float]] = []
    claims: list[tuple[float, int, float]] = []
    params = {"provider": "stripe", "limit": 100, "lease_seconds": 600, "instance": "floor"}
    with psycopg.connect(url, autocommit=True) as conn:
        wait = start - time.time()
        if wait > 0:
            time.sleep(wait)
        while time.time() < start + seconds + 2.0:
            sent = time.time()
            rows = conn.execute(QUERIES["claim_intents"], params | {"now": None}, prepare=True)
            ids = [row[0] for row in rows.fetchall()]
            returned = time.time()
            claims.append((sent, len(ids), returned - sent))
            taken += [(i, sent, returned) for i in ids]
            if not ids:
                time.sleep(0.0005)  # a relay with nothing to claim waits for a NOTIFY
    out.put((taken, claims))


def measure_floor(
    url: str, rate: float, seconds: float, inserters: int, warmup: float
) -> dict[str, Any]:
    """Pickup by a bare claim loop (:func:`bare_claimer`) at ``rate`` (0: closed loop)."""
    context = multiprocessing.get_context("spawn")
    queue, claimer_queue = context.Queue(), context.Queue()
    start = time.time() + 1.5
    procs = [
        context.Process(target=inserter, args=(url, k, inserters, rate, start, seconds, queue))
        for k in range(inserters)
    ]
    claimer = context.Process(target=bare_claimer, args=(url, start, seconds, claimer_queue))
    for proc in [*procs, claimer]:
        proc.start()
    records: list[tuple[int, float, float, float]] = []
    for _ in procs:
        records += queue.get()
    taken, claims = claimer_queue.get()
    for proc in [*procs, claimer]:
        proc.join()
    claimed = {i: (sent, returned) for i, sent, returned in taken}
    # As the relay's phases count them: the claims sent while the inserters ran.
    last = max(r[1] for r in records)
    window = [(n, seconds_in) for sent, n, seconds_in in claims if start <= sent <= last]
    return {
        "target_rate": rate or "max",
        **pickup_figures(records, claimed, window, start, warmup),
        "notifies_received": None,  # no relay, no LISTEN: not measured
        "relay_cpu_share": None,
        "load_average_after": load_average(),
    }


def quantiles(values: list[float]) -> dict[str, float]:
    return {f"p{q}": percentile(values, q) for q in (50, 95, 99)} | {"max": max(values)}


def pickup_figures(
    records: list[tuple[int, float, float, float]],
    claimed: dict[int, tuple[float, float]],
    claims: list[tuple[int, float]],
    start: float,
    warmup: float,
) -> dict[str, Any]:
    """What every phase reports, relay or floor: inserts (id, commit returned, created_at,
    lag), the claim of each id (sent, returned) and the window's claims (rows, seconds)."""
    measured = [r for r in records if r[1] >= start + warmup]
    busy = [c for c in claims if c[0]]
    return {
        "inserted": len(records),
        "insert_rate_achieved": len(records) / (max(r[1] for r in records) - start),
        "measured": len(measured),
        "unclaimed": sum(1 for i, *_ in measured if i not in claimed),
        "pickup_ms": quantiles(
            [(claimed.get(i, (INF, INF))[1] - t) * 1000 for i, t, _, _ in measured]
        ),
        "claim_wait_ms": quantiles(
            [(claimed.get(i, (INF, INF))[0] - t) * 1000 for i, t, _, _ in measured]
        ),
        "claims": len(claims),
        "claims_empty": len(claims) - len(busy),
        "rows_per_claim_mean": statistics.mean(n for n, _ in busy) if busy else 0.0,
        "claim_ms": quantiles([d * 1000 for _, d in claims] or [0.0]),
    }


async def measure(
    url: str, rate: float, seconds: float, inserters: int, warmup: float, drain_timeout: float
) -> dict[str, Any]:
    """One phase: a relay, the inserters at ``rate`` (0: closed loop), the timings."""
    claimed: dict[int, tuple[float, float]] = {}  # id -> (claim sent, claim returned)
    called: dict[int, float] = {}
    claims: list[tuple[int, float]] = []  # (rows, seconds in the claim)
    wakes: Counter[str] = Counter()

    def on_call(command: Command) -> None:
        called.setdefault(command.intent_id, time.time())

    lane = Lane("stripe", ZeroLatencyProvider(on_call=on_call), concurrency=100, timeout_seconds=10)
    relay = Relay(
        Database(url, pool_size=4, name="bench-pickup"),
        {"stripe": lane},
        RetryPolicy(base_seconds=1.0, cap_seconds=300.0, max_attempts=8),
        RelayOptions(instance="bench-pickup"),  # production defaults
        rng=random.Random(1).random,
    )
    claim = relay.store.claim

    async def timed_claim(*args: Any, **kwargs: Any) -> list[IntentRow]:
        sent = time.time()
        rows = await claim(*args, **kwargs)
        returned = time.time()
        claims.append((len(rows), returned - sent))
        for row in rows:
            claimed.setdefault(row.id, (sent, returned))
        return rows

    relay.store.claim = timed_claim  # type: ignore[method-assign]
    wake = relay.wake

    def counted_wake() -> None:
        wakes["any"] += 1
        wake()

    def notified() -> None:
        wakes["notify"] += 1
        counted_wake()

    async def listen() -> None:  # Relay._listen with the NOTIFYs counted
        await listen_forever(relay.db.conninfo, notified, also=relay.also_wake)

    relay.wake = counted_wake  # type: ignore[method-assign]
    relay._listen = listen  # type: ignore[method-assign]
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    await relay.db.open()
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(relay.run)
            await anyio.sleep(1.0)  # pool and LISTEN connected, the relay idle and waiting
            start = time.time() + 1.5  # the inserters' processes start meanwhile
            procs = [
                context.Process(
                    target=inserter, args=(url, k, inserters, rate, start, seconds, queue)
                )
                for k in range(inserters)
            ]
            for proc in procs:
                proc.start()
            await anyio.sleep(max(start - time.time(), 0))
            cpu_before, claims_before = cpu_seconds(os.getpid()), len(claims)
            records: list[tuple[int, float, float, float]] = []
            for _ in procs:
                records += await anyio.to_thread.run_sync(queue.get)
            inserted_until = time.time()
            cpu = cpu_seconds(os.getpid()) - cpu_before
            window_claims = claims[claims_before:]
            for proc in procs:
                await anyio.to_thread.run_sync(proc.join)
            with anyio.move_on_after(drain_timeout):
                while len(claimed) < len(records):  # noqa: ASYNC110 - a plain progress check
                    await anyio.sleep(0.05)
            relay.stop()
    finally:
        await relay.db.close()
    measured = [r for r in records if r[1] >= start + warmup]
    from_db = [(claimed.get(i, (INF, INF))[1] - c) * 1000 for i, _, c, _ in measured]
    call = [(called.get(i, INF) - t) * 1000 for i, t, _, _ in measured]
    insert_ms = [(t - c) * 1000 for _, t, c, _ in measured]
    last = max(r[1] for r in records)
    return {
        "target_rate": rate or "max",
        "seconds": seconds,
        **pickup_figures(records, claimed, window_claims, start, warmup),
        "insert_lag_ms_p99": percentile([r[3] * 1000 for r in records], 99),
        "insert_ms_created_at_to_commit_p50": statistics.median(insert_ms),
        "claimed_in_window": sum(1 for i, *_ in records if claimed.get(i, (INF, INF))[1] <= last),
        "pickup_from_created_at_ms": quantiles(from_db),
        "call_ms": quantiles(call),
        "notifies_received": wakes["notify"],
        "wakes": wakes["any"],
        "relay_cpu_share": cpu / (inserted_until - start),
        "load_average_after": load_average(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=20.0, help="insert phase (20 s)")
    parser.add_argument("--inserters", type=int, default=4, help="application connections (4)")
    parser.add_argument(
        "--fractions",
        default="0.5,0.9",
        help="open-loop phases, as fractions of the closed loop's rate (0.5,0.9); '' for none",
    )
    parser.add_argument("--warmup", type=float, default=3.0, help="left out of each phase (3 s)")
    parser.add_argument(
        "--drain-timeout", type=float, default=60.0, help="wait for the last claims (60 s)"
    )
    parser.add_argument("--quick", action="store_true", help="8 s phases, 2 s warm-up")
    parser.add_argument(
        "--floor",
        action="store_true",
        help="also the floor: the claim statement alone, back to back on one connection (no"
        " relay, no calls, no write-backs), at the relay's closed-loop rate and closed loop",
    )
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.warmup, args.drain_timeout = 8.0, 2.0, 20.0
    fractions = [float(f) for f in args.fractions.split(",") if f.strip()]
    quiet_relay_logging()
    phases: list[dict[str, Any]] = []

    def phase(rate: float, label: str, *, floor: bool = False) -> dict[str, Any]:
        with scratch_database("pickup") as url:
            print(f"  {label}: {args.seconds:g} s (load {load_average()})", flush=True)
            if floor:
                result = measure_floor(url, rate, args.seconds, args.inserters, args.warmup)
            else:
                result = anyio.run(
                    measure,
                    url,
                    rate,
                    args.seconds,
                    args.inserters,
                    args.warmup,
                    args.drain_timeout,
                )
        result["phase"] = label
        print(
            f"  {label}: inserted {result['insert_rate_achieved']:,.0f}/s, pickup p50/p95/p99"
            f" {ms(result['pickup_ms']['p50'])} / {ms(result['pickup_ms']['p95'])} /"
            f" {ms(result['pickup_ms']['p99'])} ms, {result['claims']:,} claims,"
            f" {result['notifies_received'] or 0:,} NOTIFYs (load {load_average()})",
            flush=True,
        )
        phases.append(result)
        return result

    top = phase(0.0, "max (closed loop)")
    for fraction in fractions:
        rate = fraction * top["insert_rate_achieved"]
        phase(rate, f"{fraction:g} x max = {rate:,.0f}/s")
    if args.floor:
        rate = top["insert_rate_achieved"]
        phase(rate, f"floor: claim alone at {rate:,.0f}/s", floor=True)
        phase(0.0, "floor: claim alone, closed loop", floor=True)
    rows: list[tuple[str, ...]] = [
        (
            "phase",
            "inserted/s",
            "pickup p50",
            "p95",
            "p99 (goal <= 25)",
            "max",
            "claim wait p50",
            "p99",
            "claim ms p50",
            "p95",
            "claims",
            "rows/claim",
            "NOTIFYs",
            "relay CPU",
        )
    ]
    for r in phases:
        rows.append(
            (
                r["phase"],
                f"{r['insert_rate_achieved']:,.0f}",
                *(ms(r["pickup_ms"][p]) for p in ("p50", "p95", "p99", "max")),
                ms(r["claim_wait_ms"]["p50"]),
                ms(r["claim_wait_ms"]["p99"]),
                ms(r["claim_ms"]["p50"]),
                ms(r["claim_ms"]["p95"]),
                f"{r['claims']:,}",
                f"{r['rows_per_claim_mean']:.1f}",
                "-" if r["notifies_received"] is None else f"{r['notifies_received']:,}",
                "-" if r["relay_cpu_share"] is None else f"{r['relay_cpu_share']:.0%}",
            )
        )
    print("latencies in ms")
    print(table(rows))
    path = write_result(
        "pickup_latency",
        {
            "inserters": args.inserters,
            "seconds": args.seconds,
            "warmup": args.warmup,
            "quick": args.quick,
            "phases": phases,
        },
    )
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
