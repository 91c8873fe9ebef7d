"""The provider call's own CPU: what bounds a relay draining over HTTP (issue 23, goal 1).

The goal compares one relay draining over HTTP (the official Stripe SDK against the fake
provider) with the same relay's in-process drain. Both drains run in one Python process;
the relay's CPU per intent over HTTP is its in-process cost plus the provider call's. This
script measures the call alone, in this process, against the fake provider (its own
process, no latency), with C calls in flight (default 32, the drain's), in variants
alternated round by round:

* ``sdk, typed call``: ``stripe.StripeClient(...).v1.payment_intents.create_async`` with
  the SDK's own ``AIOHTTPClient``, retries off, the reply built into StripeObjects;
* ``sdk, raw_request``: the same request through ``StripeClient.raw_request_async``, the
  reply left as the SDK parsed it: how the relay's adapter calls, and the floor for it;
* ``relay's adapter``: the lane the relay builds (``relay.service.main.build_lane``):
  the SDK on the lane's session, plus our request, reply checks, breaker and metrics.

A third variant, ``lane, in-process adapter``, times the lane around the in-process adapter
that benchmarks/drain.py's in-process run uses: that part of the in-process relay's work is
what a provider call over HTTP replaces.

It prints calls/s and milliseconds of this process's CPU per call (the fake's CPU is its
own). With ``benchmarks/results/drain.json`` present (run ``benchmarks/drain.py`` just
before, on the same machine), it also prints the ceiling that the call's CPU puts on the
goal: one Python process gets at most one core, so over HTTP the relay drains at most
``1 / (relay CPU per in-process intent - the in-process lane call + the adapter's call)``
intents/s, and dividing that by the in-process drain's measured rate bounds HTTP /
in-process from above (the HTTP path's other costs, more and smaller claims and
write-backs, only lower it).

    python benchmarks/adapter_cost.py [--calls 4000] [--concurrency 32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import stripe
from pydantic import SecretStr

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import (
    BENCH_API_KEY,
    RESULTS,
    FakeProvider,
    cpu_seconds,
    load_average,
    quiet_relay_logging,
    table,
    write_result,
)
from benchmarks.drain import IN_PROCESS, zero_latency_lane
from provider_adapters.base import Action, Command, Succeeded
from relay.infra.config import ProviderSettings
from relay.service.main import build_lane

if TYPE_CHECKING:
    from stripe.params import PaymentIntentCreateParams

SDK = "sdk, typed call"
SDK_RAW = "sdk, raw_request"
ADAPTER = "relay's adapter"
LANE = "lane, in-process adapter"


def command(n: int, label: str) -> Command:
    return Command(
        intent_id=n,
        payment_id=f"adapter-cost-{label}-{n}",
        action=Action.CHARGE,
        idempotency_key=f"adapter-cost-{label}-{os.getpid()}-{time.time_ns()}-{n}",
        amount_minor=1000,
        currency="EUR",
        payment_method="pm_card_visa",
        exponent=2,
    )


async def timed(
    calls: int, concurrency: int, call: Callable[[int], Awaitable[None]]
) -> dict[str, float]:
    """``calls`` calls, ``concurrency`` at a time; wall and this process's CPU."""
    await call(-1)  # connections opened and the SDK's first-call work done outside the window
    numbers = iter(range(calls))

    async def worker() -> None:
        for n in numbers:
            await call(n)

    cpu_before, started = cpu_seconds(os.getpid()), time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(concurrency):
            tg.start_soon(worker)
    wall = time.perf_counter() - started
    cpu = cpu_seconds(os.getpid()) - cpu_before
    return {
        "calls_per_second": calls / wall,
        "cpu_ms_per_call": cpu / calls * 1000,
        "cpu_share": cpu / wall,
    }


def charge_params(c: Command) -> PaymentIntentCreateParams:
    """The body of a charge, as both SDK variants send it."""
    return {
        "amount": c.amount_minor,
        "currency": "eur",
        "payment_method": "pm_card_visa",
        "confirm": True,
        "metadata": {"outbox_idempotency_key": c.idempotency_key},
        "automatic_payment_methods": {"enabled": True, "allow_redirects": "never"},
    }


async def with_sdk(
    url: str,
    calls: int,
    concurrency: int,
    send: Callable[[stripe.StripeClient, Command], Awaitable[object]],
) -> dict[str, float]:
    """``send`` through the bare SDK on its own AIOHTTPClient, retries off."""
    http_client = stripe.AIOHTTPClient()
    client = stripe.StripeClient(
        BENCH_API_KEY,
        base_addresses={"api": url},
        http_client=http_client,
        max_network_retries=0,
    )
    # The SDK's aiohttp session; stripe leaves close_async unannotated.
    close_session: Callable[[], Awaitable[None]] = http_client.close_async

    async def call(n: int) -> None:
        await send(client, command(n, "sdk"))

    try:
        return await timed(calls, concurrency, call)
    finally:
        await close_session()


async def sdk_alone(url: str, calls: int, concurrency: int) -> dict[str, float]:
    return await with_sdk(
        url,
        calls,
        concurrency,
        lambda client, c: client.v1.payment_intents.create_async(
            charge_params(c), {"idempotency_key": c.idempotency_key}
        ),
    )


async def sdk_raw(url: str, calls: int, concurrency: int) -> dict[str, float]:
    """The same request through the SDK's raw_request, as the relay's adapter sends it: the
    SDK's request and error handling, the reply left as parsed JSON."""
    return await with_sdk(
        url,
        calls,
        concurrency,
        lambda client, c: client.raw_request_async(
            "post", "/v1/payment_intents", **charge_params(c), idempotency_key=c.idempotency_key
        ),
    )


async def relay_adapter(url: str, calls: int, concurrency: int) -> dict[str, float]:
    lane = build_lane(
        "stripe",
        ProviderSettings(base_url=url, api_key=SecretStr(BENCH_API_KEY), concurrency=concurrency),
    )

    async def call(n: int) -> None:
        outcome = await lane.execute(command(n, "adapter"))
        if not isinstance(outcome, Succeeded):
            raise RuntimeError(f"the fake provider did not accept the charge: {outcome!r}")

    try:
        return await timed(calls, concurrency, call)
    finally:
        await lane.adapter.aclose()


async def in_process_lane(url: str, calls: int, concurrency: int) -> dict[str, float]:
    """The lane around the in-process adapter the drain uses: the part of the in-process
    relay's CPU per intent that a provider call over HTTP replaces, not adds to."""
    del url
    lane = zero_latency_lane(concurrency)

    async def call(n: int) -> None:
        await lane.execute(command(n, "lane"))

    return await timed(calls, concurrency, call)


def in_process_drain() -> dict[str, float] | None:
    """The last drain.json's in-process figures (medians over its rounds), if any."""
    path = RESULTS / "drain.json"
    if not path.exists():
        return None
    runs = [
        r[IN_PROCESS] for r in json.loads(path.read_text()).get("rounds", []) if IN_PROCESS in r
    ]
    if not runs:
        return None
    return {
        "intents_per_second": statistics.median(r["intents_per_second"] for r in runs),
        "relay_cpu_ms_per_intent": statistics.median(r["relay_cpu_ms_per_intent"] for r in runs),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--calls", type=int, default=4000, help="calls per variant and round (4000)"
    )
    parser.add_argument("--concurrency", type=int, default=32, help="calls in flight (32)")
    parser.add_argument("--rounds", type=int, default=3, help="alternations, medians kept (3)")
    args = parser.parse_args()
    quiet_relay_logging()
    fake = FakeProvider()
    variants: dict[str, Callable[[str, int, int], Awaitable[dict[str, float]]]] = {
        SDK: sdk_alone,
        SDK_RAW: sdk_raw,
        ADAPTER: relay_adapter,
        LANE: in_process_lane,
    }
    rounds: dict[str, list[dict[str, float]]] = {label: [] for label in variants}
    try:
        for number in range(args.rounds):
            order = list(variants)
            if number % 2:
                order.reverse()
            for label in order:
                result = anyio.run(variants[label], fake.url, args.calls, args.concurrency)
                rounds[label].append(result)
                print(
                    f"  round {number + 1}, {label}: {result['calls_per_second']:,.0f} calls/s,"
                    f" {result['cpu_ms_per_call']:.3f} ms CPU per call"
                    f" ({result['cpu_share']:.0%} of a core; load {load_average()})",
                    flush=True,
                )
    finally:
        fake.stop()
    medians = {
        label: {key: statistics.median(r[key] for r in results) for key in results[0]}
        for label, results in rounds.items()
    }
    rows: list[tuple[str, ...]] = [("variant", "calls/s", "CPU ms per call", "share of a core")]
    for label, m in medians.items():
        rows.append(
            (
                label,
                f"{m['calls_per_second']:,.0f}",
                f"{m['cpu_ms_per_call']:.3f}",
                f"{m['cpu_share']:.0%}",
            )
        )
    print(
        f"medians of {args.rounds} rounds, {args.calls:,} calls each, {args.concurrency} in flight"
    )
    print(table(rows))
    drain = in_process_drain()
    ceiling: dict[str, float] | None = None
    if drain is not None:
        relay_ms = drain["relay_cpu_ms_per_intent"]
        rate = drain["intents_per_second"]
        # Over HTTP the relay does its in-process work with the lane's call replaced: the
        # lane around the in-process adapter is in relay_ms already and in adapter_ms again.
        http_ms = relay_ms - medians[LANE]["cpu_ms_per_call"] + medians[ADAPTER]["cpu_ms_per_call"]
        bare_ms = relay_ms - medians[LANE]["cpu_ms_per_call"] + medians[SDK_RAW]["cpu_ms_per_call"]
        ceiling = {
            "in_process_intents_per_second": rate,
            "in_process_relay_cpu_ms_per_intent": relay_ms,
            "http_relay_cpu_ms_per_intent_at_least": http_ms,
            "http_ceiling_intents_per_second": 1000 / http_ms,
            "ratio_ceiling": 1000 / http_ms / rate,
            "ratio_ceiling_sdk_alone": 1000 / bare_ms / rate,
        }
        print(
            f"in-process drain (drain.json): {rate:,.0f} intents/s at {relay_ms:.3f} ms relay CPU"
            f" per intent, of which the lane's in-process call {medians[LANE]['cpu_ms_per_call']:.3f}."
            f" Over HTTP that call costs {medians[ADAPTER]['cpu_ms_per_call']:.3f} ms, so at one"
            f" full core the relay drains at most 1 / {http_ms:.3f} ms ="
            f" {ceiling['http_ceiling_intents_per_second']:,.0f}/s: HTTP / in-process <="
            f" {ceiling['ratio_ceiling']:.2f} (the SDK's raw_request alone in place of the lane and our adapter:"
            f" <= {ceiling['ratio_ceiling_sdk_alone']:.2f}); goal >= 0.50"
        )
    else:
        print("no benchmarks/results/drain.json: run benchmarks/drain.py first for the ceiling")
    path = write_result(
        "adapter_cost",
        {
            "calls": args.calls,
            "concurrency": args.concurrency,
            "rounds": rounds,
            "medians": medians,
            "ceiling": ceiling,
        },
    )
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
