"""Drain: how fast one relay empties a backlog, with full bookkeeping.

N intents (default 100,000) over N/2 payments are inserted beforehand with COPY (the
outbox's insert triggers run): per payment an authorize, then a capture that waits
``blocked`` until the authorize is written, so the drain exercises per-payment order and
promotion as well as the claim and the write-back (intent, payment, audit rows, ledger
lines, result event). One relay then drains it, in this process, twice (with --http-fleet,
a third drain by relay processes follows):

* with an in-process adapter that answers every call at once (ZeroLatencyProvider in
  benchmarks/_common.py): the relay's own ceiling;
* with the fake Stripe-compatible provider over HTTP (its own process, no latency, no
  faults), through the Stripe adapter the relay ships.

--charges makes every backlog one charge per payment. --http-provider adyen runs the HTTP
drain through the Adyen adapter against the fake Adyen Checkout API instead; it implies
--charges (Adyen confirms a capture by webhook, which this drain does not send).

With --http-fleet N, the HTTP backlog is also drained by N `outbox-relay run` processes
started together, with the same settings: what a relay that used more than one core
would reach on this machine.

The relay logs as in production (JSON lines), into /dev/null. Prints intents/s, the
relay's CPU per intent, the whole machine's (the share of its cores busy during the drain,
and that CPU per intent: relay, database, fake provider, kernel), how long the database
made each claim and write-back take (and how busy the write-back connections were
together: up to 200 % with two), and the ratio the one HTTP relay would reach at a full
core (1 / its CPU per intent, against the in-process rate); writes
benchmarks/results/drain.json. benchmarks/sql_limit.py compares the in-process figure
with the database's own limit, measured in the same run.

    python benchmarks/drain.py [--intents 100000] [--http-intents N] [--http-fleet N] [--quick]
    python benchmarks/drain.py --http-provider adyen       # the Adyen adapter (charges)
    python benchmarks/drain.py --profile      # + pyinstrument profile of the in-process run
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import anyio
from pydantic import SecretStr

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import (
    BENCH_API_KEY,
    RESULTS,
    FakeProvider,
    ZeroLatencyProvider,
    cpu_seconds,
    insert_backlog,
    load_average,
    machine_busy_share,
    machine_cores,
    machine_ticks,
    quiet_relay_logging,
    scratch_database,
    status_counts,
    table,
    write_result,
)
from provider_adapters.fake.adyen import API_KEY as ADYEN_API_KEY
from provider_adapters.fake.adyen import MERCHANT_ACCOUNT as ADYEN_MERCHANT_ACCOUNT
from relay.core.lanes import Lane
from relay.core.runtime import Relay, RelayOptions
from relay.domain.retry_policy import RetryPolicy
from relay.infra.config import ProviderSettings
from relay.infra.db import Database
from relay.service.main import build_lane

P = ParamSpec("P")
R = TypeVar("R")


async def drain(
    url: str,
    lane: Lane,
    intents: int,
    *,
    batch_size: int,
    max_in_flight: int,
    pool_size: int,
    writers: int,
    profile: Path | None = None,
    provider_pid: int | None = None,
) -> dict[str, Any]:
    """Run one relay until ``intents`` outcomes are committed; return rate and CPU (this
    process's: the relay, and the benchmark's 5 ms check beside it), the machine's, and
    with ``provider_pid`` that process's (the fake provider's), over the same window."""
    relay = Relay(
        Database(url, pool_size=pool_size, name="bench-drain"),
        {lane.provider: lane},
        RetryPolicy(base_seconds=1.0, cap_seconds=300.0, max_attempts=8),
        RelayOptions(
            instance="bench-drain",
            batch_size=batch_size,
            max_in_flight=max_in_flight,
            lease_seconds=60,
            completer_writers=writers,
        ),
        rng=random.Random(1).random,
    )
    timings: dict[str, list[tuple[float, int]]] = {
        "claim": [],
        "write_back": [],
        "wakeup_flag_write": [],
    }

    def timed(name: str, method: Callable[P, Awaitable[R]]) -> Callable[P, Coroutine[Any, Any, R]]:
        """``method`` with the same signature, its calls timed. The wrapper itself reads its
        arguments and result untyped (claim returns its rows, complete_fenced takes its batch
        first), so the timed path runs no more than it did before it was typed."""
        call: Callable[..., Awaitable[Any]] = method

        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            result = await call(*args, **kwargs)
            size = len(result) if name == "claim" else len(args[0]) if args else 0
            timings[name].append((time.perf_counter() - t0, size))
            return result

        return wrapper

    # Store.claim and Store.complete_fenced timed on this instance (the claim loop and the
    # completer call them through relay.store): how long the database makes each one wait.
    relay.store.claim = timed("claim", relay.store.claim)  # type: ignore[method-assign]
    relay.store.complete_fenced = timed(  # type: ignore[method-assign]
        "write_back", relay.store.complete_fenced
    )
    # What asking for wake-ups per relay (sql/0031) costs the relay: how often and how long.
    relay.store.set_wakeups = timed(  # type: ignore[method-assign]
        "wakeup_flag_write", relay.store.set_wakeups
    )
    profiler = None
    if profile is not None:
        from pyinstrument import Profiler

        profiler = Profiler(interval=0.001, async_mode="disabled")
    await relay.db.open()
    try:
        async with anyio.create_task_group() as tg:
            cpu0, started = time.process_time(), time.perf_counter()
            provider_cpu0 = cpu_seconds(provider_pid) if provider_pid else 0.0
            machine0 = machine_ticks()
            if profiler is not None:
                profiler.start()
            await tg.start(relay.run)
            # The completer counts committed outcomes: no polling query competes with the
            # relay for the database, and a 5 ms check costs the relay nothing noticeable.
            # A mark every 0.2 s shows whether the rate holds as the tables grow.
            marks: list[tuple[float, int]] = []
            while relay.completer.written < intents:
                if not marks or time.perf_counter() - marks[-1][0] >= 0.2:
                    marks.append((time.perf_counter(), relay.completer.written))
                await anyio.sleep(0.005)
            elapsed = time.perf_counter() - started
            machine = machine_busy_share(machine0, machine_ticks())
            provider_cpu = cpu_seconds(provider_pid) - provider_cpu0 if provider_pid else 0.0
            marks.append((time.perf_counter(), relay.completer.written))
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
        **_machine_figures(machine, elapsed, intents),
        **(
            {
                "provider_cpu_ms_per_intent": provider_cpu / intents * 1000,
                "provider_cpu_share": provider_cpu / elapsed,
            }
            if provider_pid
            else {}
        ),
        # Does the rate hold as the tables grow? Rates over the first and last fifth.
        "intents_per_second_first_fifth": _window_rate(marks, 0.0, 0.2 * intents),
        "intents_per_second_last_fifth": _window_rate(marks, 0.8 * intents, intents),
        **{
            f"{name}s": {
                "count": len(calls),
                "mean_rows": sum(n for _, n in calls) / max(len(calls), 1),
                "mean_ms": sum(t for t, _ in calls) / max(len(calls), 1) * 1000,
                "max_ms": max((t for t, _ in calls), default=0.0) * 1000,
                "busy_share": sum(t for t, _ in calls) / elapsed,
            }
            for name, calls in timings.items()
        },
    }


def _machine_figures(busy_share: float, seconds: float, intents: int) -> dict[str, float]:
    """The whole machine during a drain: the share of its cores busy (the relay, the
    database, the fake provider and anything else), and that CPU per intent."""
    cores = machine_cores()
    return {
        "machine_busy_share": busy_share,
        "machine_cpu_ms_per_intent": busy_share * cores * seconds / intents * 1000,
    }


def _window_rate(marks: list[tuple[float, int]], low: float, high: float) -> float:
    i = next(n for n, m in enumerate(marks) if m[1] >= low)
    j = next(n for n, m in enumerate(marks) if m[1] >= high)
    first, last = marks[min(i, max(j - 1, 0))], marks[j]
    return (last[1] - first[1]) / max(last[0] - first[0], 1e-9)


def run_variant(
    label: str,
    intents: int,
    lane_factory: Callable[[], Lane],
    *,
    batch_size: int = 100,
    max_in_flight: int = 256,
    pool_size: int = 4,
    writers: int = 2,
    profile: Path | None = None,
    provider_pid: int | None = None,
    provider: str = "stripe",
    pairs: bool = True,
) -> dict[str, Any]:
    """Fill a scratch database with ``intents`` for ``provider`` (authorize then capture
    per payment, or with ``pairs`` false one charge per payment) and drain it with one
    relay; with ``provider_pid``, also the CPU that process (the fake provider) used."""
    with scratch_database("drain") as url:
        started = time.perf_counter()
        insert_backlog(url, intents, provider=provider, pairs=pairs)
        print(
            f"  {label}: {intents:,} intents inserted in {time.perf_counter() - started:.0f} s"
            f" (load {load_average()}); draining ...",
            flush=True,
        )
        lane = lane_factory()
        result = anyio.run(
            lambda: drain(
                url,
                lane,
                intents,
                batch_size=batch_size,
                max_in_flight=max_in_flight,
                pool_size=pool_size,
                writers=writers,
                profile=profile,
                provider_pid=provider_pid,
            )
        )
        counts = status_counts(url)
    result["statuses"] = counts
    result["load_average_after"] = load_average()
    if counts.get("succeeded", 0) != intents:
        raise SystemExit(f"{label}: not every intent succeeded: {counts}")
    provider = (
        f"; fake provider {result['provider_cpu_share'] * 100:.0f} % of a core"
        if provider_pid
        else ""
    )
    print(
        f"  {label}: {result['intents_per_second']:,.0f} intents/s"
        f" ({result['relay_cpu_ms_per_intent']:.2f} ms relay CPU per intent, relay at"
        f" {result['relay_cpu_share'] * 100:.0f} % of a core{provider}; machine"
        f" {result['machine_busy_share'] * 100:.0f} % busy; first fifth"
        f" {result['intents_per_second_first_fifth']:,.0f}/s, last fifth"
        f" {result['intents_per_second_last_fifth']:,.0f}/s)",
        flush=True,
    )
    claims, writes = result["claims"], result["write_backs"]
    print(
        f"    claims: {claims['count']:,} of {claims['mean_rows']:.0f} rows,"
        f" {claims['mean_ms']:.0f} ms mean, {claims['max_ms']:.0f} ms max;"
        f" write-backs: {writes['count']:,} of {writes['mean_rows']:.0f} rows,"
        f" {writes['mean_ms']:.0f} ms mean, {writes['max_ms']:.0f} ms max,"
        f" busy {writes['busy_share'] * 100:.0f} % of the drain;"
        f" wake-up flag writes: {result['wakeup_flag_writes']['count']},"
        f" {result['wakeup_flag_writes']['mean_ms']:.1f} ms mean",
        flush=True,
    )
    return result


IN_PROCESS = "in-process adapter"
HTTP = "fake provider over HTTP"


def fleet_label(relays: int) -> str:
    return f"{HTTP}, {relays} relay processes"


def run_fleet(
    intents: int,
    relays: int,
    provider_url: str,
    provider_pid: int,
    *,
    batch_size: int,
    max_in_flight: int,
    pool_size: int,
    writers: int,
    concurrency: int,
    claim_ahead: int | None,
    pairs: bool,
) -> dict[str, Any]:
    """The HTTP drain by ``relays`` `outbox-relay run` processes on this machine (a fleet
    sharing its cores), with the in-process relay's settings: does a relay that used more
    than one core get further? Each process runs whatever `run` runs (heartbeats, sweeps)."""
    from benchmarks.sidecar_scale import drain as fleet_drain

    label = fleet_label(relays)
    settings = {
        "batch_size": str(batch_size),
        "max_in_flight": str(max_in_flight),
        "db_pool_size": str(pool_size),
        "completer_writers": str(writers),
        "providers__stripe__concurrency": str(concurrency),
        **({"providers__stripe__claim_ahead": str(claim_ahead)} if claim_ahead is not None else {}),
    }
    with scratch_database("drain") as url:
        print(f"  {label}: {intents:,} intents (load {load_average()}); draining ...", flush=True)
        fleet = fleet_drain(
            url,
            provider_url,
            relays,
            intents,
            "fleet",
            pairs=pairs,
            provider_pid=provider_pid,
            **settings,
        )
        provider_cpu = fleet["provider_cpu_seconds"]
        counts = status_counts(url)
    if counts.get("succeeded", 0) != intents or fleet["sent_more_than_once"]:
        raise SystemExit(f"{label}: not every intent succeeded once: {counts}, {fleet}")
    result = {
        "intents": intents,
        "relays": relays,
        "seconds": fleet["seconds"],
        "intents_per_second": fleet["intents_per_second"],
        "relay_cpu_ms_per_intent": fleet["relays_cpu_ms_per_intent"],
        "relay_cpu_share": fleet["relays_cpu_share_of_one_core"],
        "provider_cpu_ms_per_intent": provider_cpu / intents * 1000,
        "provider_cpu_share": provider_cpu / fleet["seconds"],
        **_machine_figures(fleet["machine_busy_share"], fleet["seconds"], intents),
        "statuses": counts,
        "load_average_after": fleet["load_average_after"],
    }
    print(
        f"  {label}: {result['intents_per_second']:,.0f} intents/s"
        f" ({result['relay_cpu_ms_per_intent']:.2f} ms relays' CPU per intent, relays at"
        f" {result['relay_cpu_share'] * 100:.0f} % of a core together; fake provider"
        f" {result['provider_cpu_share'] * 100:.0f} % of a core; machine"
        f" {result['machine_busy_share'] * 100:.0f} % busy)",
        flush=True,
    )
    return result


def zero_latency_lane(concurrency: int = 100) -> Lane:
    return Lane("stripe", ZeroLatencyProvider(), concurrency=concurrency, timeout_seconds=10.0)


def _one_process_ceilings(rounds: list[dict[str, dict[str, Any]]]) -> list[float]:
    """Per round: the HTTP rate one relay process would reach at 100 % of a core, at the
    CPU per intent it used, over the in-process rate. Python runs a relay on one core."""
    return [
        1000 / r[HTTP]["relay_cpu_ms_per_intent"] / r[IN_PROCESS]["intents_per_second"]
        for r in rounds
        if HTTP in r and IN_PROCESS in r
    ]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--intents", type=int, default=100_000, help="in-process run (100000); 0 skips it"
    )
    parser.add_argument(
        "--http-intents", type=int, help="fake-provider run (default: --intents); 0 skips it"
    )
    parser.add_argument("--batch-size", type=int, default=100, help="RELAY_BATCH_SIZE (100)")
    parser.add_argument("--max-in-flight", type=int, default=256, help="RELAY_MAX_IN_FLIGHT")
    parser.add_argument("--pool-size", type=int, default=4, help="RELAY_DB_POOL_SIZE (4)")
    parser.add_argument(
        "--writers", type=int, default=2, help="RELAY_COMPLETER_WRITERS (2): write-backs in flight"
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=100,
        help="lane concurrency of the in-process run (default 100: a full batch per claim)",
    )
    parser.add_argument(
        "--http-concurrency", type=int, default=32, help="lane concurrency over HTTP (32)"
    )
    parser.add_argument(
        "--http-claim-ahead",
        type=int,
        default=None,
        help="RELAY_PROVIDERS__<NAME>__CLAIM_AHEAD over HTTP (default: the setting's)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="alternate the runs this many times, each on a fresh backlog, and print the"
        " median of the per-round ratios (for a machine whose speed drifts)",
    )
    parser.add_argument(
        "--http-fleet",
        type=int,
        default=0,
        metavar="N",
        help="also drain the HTTP backlog with N `outbox-relay run` processes on this machine,"
        " with the same settings (default 0: not run): what more than one core per relay"
        " buys; Stripe only",
    )
    parser.add_argument(
        "--http-provider",
        choices=("stripe", "adyen"),
        default="stripe",
        help="the HTTP run's provider: the Stripe adapter (official SDK) against the fake"
        " Stripe-compatible provider (default), or the Adyen adapter against the fake Adyen"
        " Checkout API; adyen implies --charges (Adyen confirms captures by webhook)",
    )
    parser.add_argument(
        "--charges",
        action="store_true",
        help="one charge per payment in every run, instead of authorize then capture",
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
    adyen = args.http_provider == "adyen"
    if adyen and args.http_fleet:
        parser.error("--http-fleet runs `outbox-relay run` against the Stripe-compatible fake only")
    pairs = not (args.charges or adyen)
    workload = "authorize + capture per payment" if pairs else "one charge per payment"
    quiet_relay_logging()
    print(
        f"drain: {workload};"
        + (f" HTTP to the fake {'Adyen' if adyen else 'Stripe'} API;" if http_intents else "")
        + f" batch {args.batch_size},"
        f" max in flight {args.max_in_flight}, pool {args.pool_size}, writers {args.writers}"
    )
    results: dict[str, dict[str, Any]] = {}
    profile = RESULTS / "drain_profile.txt" if args.profile else None
    if profile is not None:
        RESULTS.mkdir(exist_ok=True)
    settings = {
        "batch_size": args.batch_size,
        "max_in_flight": args.max_in_flight,
        "pool_size": args.pool_size,
        "writers": args.writers,
    }
    fake = FakeProvider(adyen=adyen) if http_intents else None
    rounds: list[dict[str, dict[str, Any]]] = []
    try:

        def run(label: str) -> dict[str, Any]:
            if label == fleet_label(args.http_fleet):
                assert fake is not None
                return run_fleet(
                    http_intents,
                    args.http_fleet,
                    fake.url,
                    fake.proc.pid,
                    concurrency=args.http_concurrency,
                    claim_ahead=args.http_claim_ahead,
                    pairs=pairs,
                    **settings,
                )
            if label == IN_PROCESS:
                return run_variant(
                    IN_PROCESS,
                    args.intents,
                    lambda: zero_latency_lane(args.concurrency),
                    profile=profile,
                    pairs=pairs,
                    **settings,
                )
            assert fake is not None
            claim_ahead = (
                {} if args.http_claim_ahead is None else {"claim_ahead": args.http_claim_ahead}
            )
            if adyen:
                http_settings = ProviderSettings(
                    kind="adyen",
                    base_url=fake.url,
                    api_key=SecretStr(ADYEN_API_KEY),
                    merchant_account=ADYEN_MERCHANT_ACCOUNT,
                    concurrency=args.http_concurrency,
                    **claim_ahead,
                )
            else:
                http_settings = ProviderSettings(
                    base_url=fake.url,
                    api_key=SecretStr(BENCH_API_KEY),
                    concurrency=args.http_concurrency,
                    **claim_ahead,
                )
            return run_variant(
                HTTP,
                http_intents,
                lambda: build_lane(args.http_provider, http_settings),
                provider_pid=fake.proc.pid,
                provider=args.http_provider,
                pairs=pairs,
                **settings,
            )

        labels = [label for label, n in ((IN_PROCESS, args.intents), (HTTP, http_intents)) if n]
        if args.http_fleet and http_intents:
            labels.append(fleet_label(args.http_fleet))
        for number in range(args.rounds):
            if args.rounds > 1:
                print(f" round {number + 1} of {args.rounds}", flush=True)
            # Reversed every other round: a machine that slows down or speeds up during the
            # run moves both sides of the ratio alike.
            order = labels if number % 2 == 0 else labels[::-1]
            rounds.append({label: run(label) for label in order})
    finally:
        if fake is not None:
            fake.stop()
    round_ratios = [
        r[HTTP]["intents_per_second"] / r[IN_PROCESS]["intents_per_second"]
        for r in rounds
        if HTTP in r and IN_PROCESS in r
    ]
    results = rounds[-1]
    in_process = results.get(IN_PROCESS, {}).get("intents_per_second")
    ratios = {
        label: r["intents_per_second"] / in_process
        for label, r in results.items()
        if in_process and label != IN_PROCESS
    }
    if len(round_ratios) > 1:
        print(
            f"HTTP / in-process per round: {', '.join(f'{x:.2f}' for x in round_ratios)};"
            f" median {statistics.median(round_ratios):.2f} (the table shows the last round)"
        )
    rows = [
        (
            "relay drain",
            "intents",
            "intents/s",
            "first 1/5",
            "last 1/5",
            "relay CPU ms/intent",
            "machine busy",
            "machine CPU ms/intent",
            "ratio to in-process",
        )
    ]
    rows += [
        (
            label,
            f"{r['intents']:,}",
            f"{r['intents_per_second']:,.0f}",
            f"{r['intents_per_second_first_fifth']:,.0f}" if "claims" in r else "",
            f"{r['intents_per_second_last_fifth']:,.0f}" if "claims" in r else "",
            f"{r['relay_cpu_ms_per_intent']:.2f}",
            f"{r['machine_busy_share'] * 100:.0f} %",
            f"{r['machine_cpu_ms_per_intent']:.2f}",
            f"{ratios[label]:.2f}" if label in ratios else ("1.00" if label == IN_PROCESS else ""),
        )
        for label, r in results.items()
    ]
    print(table(rows))
    ceilings = _one_process_ceilings(rounds)
    if ceilings:
        print(
            "HTTP / in-process if the one HTTP relay ran at a full core (1 / its CPU per"
            f" intent, against the same round's in-process rate): {', '.join(f'{x:.2f}' for x in ceilings)}"
        )
    path = write_result(
        "drain",
        {
            "workload": (
                "authorize then capture per payment (N/2 payments)"
                if pairs
                else "one charge per payment"
            ),
            "http_provider": args.http_provider,
            "batch_size": args.batch_size,
            "max_in_flight": args.max_in_flight,
            "pool_size": args.pool_size,
            "writers": args.writers,
            "concurrency": args.concurrency,
            "http_concurrency": args.http_concurrency,
            "http_claim_ahead": args.http_claim_ahead,  # None: the setting's default
            "quick": args.quick,
            "runs": results,
            "in_process_intents_per_second": in_process,
            "ratios_to_in_process": ratios,
            "http_to_in_process_per_round": round_ratios,
            "http_to_in_process_median": (
                statistics.median(round_ratios) if round_ratios else None
            ),
            "http_fleet": args.http_fleet,
            "http_to_in_process_at_a_full_core_per_round": ceilings,
            "rounds": rounds,
        },
    )
    print(f"written {path}" + (f" and {profile}" if profile else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
