"""Adyen client cost: the official (synchronous) ``Adyen`` package in worker threads
against the relay's AdyenAdapter on aiohttp, at a lane's concurrency, in one run.

The fake Adyen Checkout API runs in its own process (``python -m
provider_adapters.fake.adyen``) with --latency-ms (default 20, a fast provider), so the
client's own cost shows. Each variant sends --calls authorisations (POST /payments with an
Idempotency-Key) with --concurrency in flight:

* ``adapter``: AdyenAdapter.execute, the lane's aiohttp session, in the event loop;
* ``official``: ``Adyen.Adyen().checkout.payments_api.payments`` (the package's own
  request building and its ``requests`` client), each call in ``anyio.to_thread``
  under a CapacityLimiter of --concurrency: what the relay would have to do to keep a
  blocking client off the event loop.

Prints calls/s, this process's CPU per call, and the ratios (adapter / official); writes
benchmarks/results/adyen_client.json. Needs the ``Adyen`` package (``pip install Adyen``;
not a dependency of the relay: this script is why it is not one).

    python benchmarks/adyen_client.py [--calls 2000] [--concurrency 32] [--latency-ms 20]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import free_port, load_average, machine, table, write_result
from provider_adapters.adyen import AdyenAdapter
from provider_adapters.base import Action, Command, Succeeded
from provider_adapters.fake.adyen import API_KEY, MERCHANT_ACCOUNT


def _command(i: int, variant: str) -> Command:
    return Command(
        intent_id=i,
        payment_id=f"{variant}-{i}",
        action=Action.AUTHORIZE,
        idempotency_key=f"{variant}-{i}",
        amount_minor=1000,
        currency="EUR",
        payment_method="stored_visa",
    )


async def run_adapter(url: str, calls: int, concurrency: int) -> tuple[float, float, int]:
    adapter = AdyenAdapter(
        name="adyen",
        api_key=API_KEY,
        merchant_account=MERCHANT_ACCOUNT,
        base_url=url,
        max_connections=concurrency,
    )
    ok = 0
    limiter = anyio.CapacityLimiter(concurrency)

    async def one(i: int) -> None:
        nonlocal ok
        async with limiter:
            if isinstance(await adapter.execute(_command(i, "adapter")), Succeeded):
                ok += 1

    await adapter.execute(_command(-1, "warm"))
    wall, cpu = time.perf_counter(), time.process_time()
    async with anyio.create_task_group() as tg:
        for i in range(calls):
            tg.start_soon(one, i)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    await adapter.aclose()
    return wall, cpu, ok


async def run_official(url: str, calls: int, concurrency: int) -> tuple[float, float, int]:
    import importlib

    # Not a dependency of the relay (see the docstring); imported by name so that type
    # checking does not need it installed.
    adyen_package: Any = importlib.import_module("Adyen")
    adyen = adyen_package.Adyen()
    adyen.client.xapikey = API_KEY
    adyen.client.platform = "test"
    api = adyen.checkout.payments_api
    api.baseUrl = f"{url}/v71"
    ok = 0
    limiter = anyio.CapacityLimiter(concurrency)

    def call(i: int) -> bool:
        body: dict[str, Any] = {
            "amount": {"value": 1000, "currency": "EUR"},
            "merchantAccount": MERCHANT_ACCOUNT,
            "reference": f"official-{i}",
            "returnUrl": "https://outbox-relay.invalid/return",
            "paymentMethod": {"type": "scheme", "storedPaymentMethodId": "stored_visa"},
        }
        result = api.payments(body, idempotency_key=f"official-{i}")
        return bool(result.message.get("resultCode") == "Authorised")

    async def one(i: int) -> None:
        nonlocal ok
        if await anyio.to_thread.run_sync(call, i, limiter=limiter):
            ok += 1

    await anyio.to_thread.run_sync(call, -1)
    wall, cpu = time.perf_counter(), time.process_time()
    async with anyio.create_task_group() as tg:
        for i in range(calls):
            tg.start_soon(one, i)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return wall, cpu, ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--latency-ms", type=int, default=20)
    args = parser.parse_args()
    port = free_port()
    fake = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "provider_adapters.fake.adyen",
            "--port",
            str(port),
            "--latency-ms",
            str(args.latency_ms),
        ],
        stdout=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                httpx.get(f"{url}/_fake/effects", timeout=1).raise_for_status()
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        rows: dict[str, dict[str, float]] = {}
        for name, runner in (("adapter", run_adapter), ("official", run_official)):
            wall, cpu, ok = anyio.run(runner, url, args.calls, args.concurrency)
            if ok != args.calls:
                print(f"{name}: only {ok} of {args.calls} calls authorised", file=sys.stderr)
                return 1
            rows[name] = {
                "calls_per_second": args.calls / wall,
                "cpu_ms_per_call": 1000 * cpu / args.calls,
            }
    finally:
        fake.terminate()
        fake.wait()
    ratio_rate = rows["adapter"]["calls_per_second"] / rows["official"]["calls_per_second"]
    ratio_cpu = rows["official"]["cpu_ms_per_call"] / rows["adapter"]["cpu_ms_per_call"]
    lines: list[tuple[str, ...]] = [("variant", "calls/s", "client CPU ms/call")]
    lines += [
        (n, f"{r['calls_per_second']:.0f}", f"{r['cpu_ms_per_call']:.2f}") for n, r in rows.items()
    ]
    print(table(lines))
    print(
        f"adapter / official: {ratio_rate:.2f}x the calls/s, "
        f"official uses {ratio_cpu:.2f}x the CPU per call "
        f"({args.calls} calls, {args.concurrency} in flight, fake latency {args.latency_ms} ms, "
        f"load {load_average()})"
    )
    write_result(
        "adyen_client",
        {
            "machine": machine(),
            "settings": vars(args),
            "variants": rows,
            "adapter_over_official_rate": ratio_rate,
            "official_over_adapter_cpu": ratio_cpu,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
