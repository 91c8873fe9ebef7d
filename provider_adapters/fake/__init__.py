"""A fake Stripe-compatible provider: the subset our adapter uses, with faults on demand.

``outbox-relay fake-provider --port N`` (or ``python -m provider_adapters.fake``) serves
it. ``GET /_fake/effects`` returns the effects applied per idempotency key, so tests can
prove exactly-once; ``POST /_fake/config`` replaces the fault settings at run time.
"""

from __future__ import annotations

import argparse
import os

import anyio
from aiohttp import web

from provider_adapters.fake.cards import cards_help
from provider_adapters.fake.faults import FaultConfig
from provider_adapters.fake.server import create_app

__all__ = ["FaultConfig", "add_cli_arguments", "create_app", "run_from_args", "serve"]


async def serve(host: str, port: int, faults: FaultConfig) -> None:
    """Serve until cancelled."""
    runner = web.AppRunner(create_app(faults), access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        print(f"fake provider listening on http://{host}:{port}", flush=True)
        await anyio.sleep_forever()
    finally:
        with anyio.CancelScope(shield=True):
            await runner.cleanup()


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """The fake's options, and its test cards (from cards.TEST_CARDS) under them in --help.

    The parser's description and epilog are printed as written (the card table is
    aligned in columns): pass a description wrapped by hand.
    """
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = cards_help()
    env = FaultConfig.from_env()
    parser.add_argument(
        "--host",
        default=os.environ.get("FAKE_PROVIDER_HOST", "127.0.0.1"),
        help="address to listen on; 0.0.0.0 for every interface, e.g. in a container "
        "(default %(default)s, or FAKE_PROVIDER_HOST)",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=int(os.environ.get("FAKE_PROVIDER_PORT", "12111")),
        help="port to listen on (default %(default)s, or FAKE_PROVIDER_PORT)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=env.seed,
        help="seed for reproducible faults (default: "
        + ("random" if env.seed is None else "%(default)s")
        + ")",
    )
    parser.add_argument(
        "--latency-ms",
        type=int,
        default=env.latency_ms,
        help="delay added to every POST (default %(default)s)",
    )
    parser.add_argument(
        "--latency-jitter-ms",
        type=int,
        default=env.latency_jitter_ms,
        help="random extra delay up to this (default %(default)s)",
    )
    parser.add_argument(
        "--rate-429",
        type=float,
        default=env.rate_429,
        help="share of POSTs answered 429 with Retry-After, nothing applied (default %(default)s)",
    )
    parser.add_argument(
        "--rate-503",
        type=float,
        default=env.rate_503,
        help="share of POSTs answered 503, nothing applied (default %(default)s)",
    )
    parser.add_argument(
        "--rate-timeout-after-effect",
        type=float,
        default=env.rate_timeout_after_effect,
        help="share of effects applied, then answered only after --timeout-seconds "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--rate-500-after-effect",
        type=float,
        default=env.rate_500_after_effect,
        help="share of effects applied, then answered 500, stored and replayed "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--rate-malformed",
        type=float,
        default=env.rate_malformed,
        help="share of effects applied, then answered with a malformed body (default %(default)s)",
    )
    parser.add_argument(
        "--timeout-seconds",
        type=float,
        default=env.timeout_seconds,
        help="how long a timeout fault holds the reply (default %(default)s)",
    )


def run_from_args(args: argparse.Namespace) -> int:
    faults = FaultConfig(
        latency_ms=args.latency_ms,
        latency_jitter_ms=args.latency_jitter_ms,
        rate_429=args.rate_429,
        rate_503=args.rate_503,
        rate_timeout_after_effect=args.rate_timeout_after_effect,
        rate_500_after_effect=args.rate_500_after_effect,
        rate_malformed=args.rate_malformed,
        timeout_seconds=args.timeout_seconds,
        seed=args.seed,
    )

    async def main() -> None:
        import signal

        async with anyio.create_task_group() as tg:
            tg.start_soon(serve, args.host, args.port, faults)
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    tg.cancel_scope.cancel()
                    break

    anyio.run(main)
    return 0
