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
from provider_adapters.fake.webhooks import WebhookConfig

__all__ = [
    "FaultConfig",
    "WebhookConfig",
    "add_cli_arguments",
    "create_app",
    "run_from_args",
    "serve",
]


async def serve(
    host: str, port: int, faults: FaultConfig, webhooks: WebhookConfig | None = None
) -> None:
    """Serve until cancelled."""
    runner = web.AppRunner(create_app(faults, webhooks=webhooks), access_log=None)
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
    hooks = parser.add_argument_group(
        "webhooks",
        "Stripe-shaped events for every change (payment_intent.succeeded, charge.refunded, "
        "charge.dispute.created, ...), signed like Stripe, retried with backoff until 2xx. "
        "POST /_fake/dashboard/refund or /_fake/dashboard/dispute with "
        '{"payment_intent": "pi_...", "amount": N} makes a change outside the API; '
        'POST /_fake/dashboard/dispute/close with {"dispute": "dp_...", "status": "won"} '
        "(or lost) decides a dispute (charge.dispute.closed).",
    )
    hooks.add_argument(
        "--webhook-url", help="deliver events here, e.g. http://127.0.0.1:9110/webhooks/stripe"
    )
    hooks.add_argument(
        "--webhook-secret",
        default=os.environ.get("FAKE_PROVIDER_WEBHOOK_SECRET", "whsec_fake"),
        help="the endpoint's signing secret (default whsec_fake, or FAKE_PROVIDER_WEBHOOK_SECRET)",
    )
    hooks.add_argument(
        "--webhook-delay-ms", type=int, default=0, help="delay before the first attempt"
    )
    hooks.add_argument("--webhook-duplicates", type=int, default=1, help="deliveries of each event")
    hooks.add_argument(
        "--webhook-reorder-ms",
        type=int,
        default=0,
        help="random extra delay per delivery, up to this",
    )
    hooks.add_argument(
        "--webhook-retry-base-ms", type=int, default=200, help="first retry delay; doubles"
    )
    hooks.add_argument(
        "--webhook-retry-cap-ms", type=int, default=10_000, help="longest retry delay"
    )
    hooks.add_argument(
        "--webhook-bad-signature-rate",
        type=float,
        default=0.0,
        help="share of attempts signed with a wrong secret (fault switch)",
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
    webhooks = WebhookConfig(
        url=args.webhook_url,
        secret=args.webhook_secret,
        delay_ms=args.webhook_delay_ms,
        duplicates=args.webhook_duplicates,
        reorder_ms=args.webhook_reorder_ms,
        retry_base_ms=args.webhook_retry_base_ms,
        retry_cap_ms=args.webhook_retry_cap_ms,
        bad_signature_rate=args.webhook_bad_signature_rate,
        seed=args.seed,
    )

    async def main() -> None:
        import signal

        async with anyio.create_task_group() as tg:
            tg.start_soon(serve, args.host, args.port, faults, webhooks)
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    tg.cancel_scope.cancel()
                    break

    anyio.run(main)
    return 0
