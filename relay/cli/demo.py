"""`outbox-relay demo`: the whole path on one machine, with faults on, checked at the end.

Starts (or uses) PostgreSQL, migrates, serves the fake Stripe-compatible provider and the
fake Adyen Checkout API side by side, with a webhook receiver process (`webhooks serve`) to
which the fake Adyen sends its signed notifications, inserts the same mixed workload for
each, runs relays (one lane per provider, each applying the inbox) until every intent is
terminal while showing progress (Adyen's captures, cancels and refunds await their
webhook), then prints a summary and checks exactly-once against each provider's own effect
counts and that nothing is left awaiting a confirmation. Exit status 0 only if every check
holds.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import os
import random
import secrets
import socket
import string
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import aiohttp
import anyio
import psycopg

from relay.cli.tables import clip

__all__ = [
    "ADYEN_ACTIONS",
    "build_adyen_workload",
    "build_workload",
    "run_demo",
    "wait_for_workload",
]

# (code, one major unit in minor units, the smallest step Stripe takes: three-decimal
# currencies only with the last digit 0, see provider_adapters/currency_units.py)
CURRENCIES = [("EUR", 100, 1), ("USD", 100, 1), ("JPY", 1, 1), ("GBP", 100, 1), ("KWD", 1000, 10)]


@dataclass(frozen=True, slots=True)
class Row:
    payment_id: str
    action: str
    amount_minor: int | None
    currency: str
    payment_method: str | None = None
    provider: str = "stripe"


# Adyen confirms a capture, a cancel and a refund only by webhook (`201 received`): such an
# intent waits as awaiting_confirmation until the demo's webhook receiver stores Adyen's
# signed notification and a relay's inbox applier finishes it. Adyen payments get the same
# mix as Stripe's (build_workload), with Adyen's test refusals (provider_adapters/fake/
# adyen.py CARDS) for the declines.
ADYEN_ACTIONS = ("authorize", "capture", "charge", "void", "refund")
_ADYEN_DECLINES = ["adyen_refused", "adyen_not_enough_balance", "adyen_fraud", "adyen_expired"]
_STRIPE_DECLINES = ["pm_card_chargeDeclined", "pm_card_chargeDeclinedInsufficientFunds"]


def build_adyen_workload(payments: int, rng: random.Random, prefix: str) -> list[Row]:
    """``payments`` Adyen payments with the mix of :func:`build_workload`: authorise,
    capture (confirmed by webhook), void and refund (confirmed by webhook), charges, Adyen's
    refusals, and commands the state machine refuses before any call."""
    return build_workload(payments, rng, prefix, provider="adyen")


def build_workload(
    payments: int,
    rng: random.Random,
    prefix: str,
    *,
    min_intents: int = 0,
    provider: str = "stripe",
) -> list[Row]:
    """A mix a payments team would recognise, including a few invalid commands.

    ``payments`` payments, and more while there are fewer than ``min_intents`` intents: a
    payment has one to four, so a bare count of payments gives a seed-dependent total.
    The first ``payments`` payments are the same for one seed whatever ``min_intents`` is.
    ``provider``: the provider of every row; "adyen" declines with Adyen's test refusals.
    """
    declines = _ADYEN_DECLINES if provider == "adyen" else _STRIPE_DECLINES
    rows: list[Row] = []
    n = 0
    while n < payments or len(rows) < min_intents:
        pid = f"{prefix}-{n:05d}"
        n += 1
        currency, unit, step = rng.choice(CURRENCIES)
        amount = rng.randint(5, 500) * unit
        roll = rng.random()
        if roll < 0.35:  # authorize -> capture (sometimes partial) -> partial refund
            captured = amount if rng.random() < 0.6 else amount - unit
            rows += [
                Row(pid, "authorize", amount, currency, "pm_card_visa"),
                Row(pid, "capture", None if captured == amount else captured, currency),
                Row(pid, "refund", max(captured // 3 // step * step, step), currency),
            ]
        elif roll < 0.60:  # one-step charge, sometimes fully refunded
            rows.append(Row(pid, "charge", amount, currency, "pm_card_mastercard"))
            if rng.random() < 0.4:
                rows.append(Row(pid, "refund", None, currency))
        elif roll < 0.72:  # authorize then void
            rows += [
                Row(pid, "authorize", amount, currency, "pm_card_visa"),
                Row(pid, "void", None, currency),
            ]
        elif roll < 0.84:  # declines
            card = rng.choice(declines)
            rows.append(Row(pid, rng.choice(["charge", "authorize"]), amount, currency, card))
        elif roll < 0.92:  # invalid: refund above the captured amount
            rows += [
                Row(pid, "charge", amount, currency, "pm_card_visa"),
                Row(pid, "refund", amount + unit, currency),
            ]
        else:  # invalid: capture before authorize, capture after void
            rows += [
                Row(pid, "capture", amount, currency),
                Row(pid, "authorize", amount, currency, "pm_card_amex"),
                Row(pid, "void", None, currency),
                Row(pid, "capture", None, currency),
            ]
    if provider != "stripe":
        rows = [dataclasses.replace(row, provider=provider) for row in rows]
    return rows


@contextlib.contextmanager
def _database(explicit: str | None) -> Iterator[str]:
    if explicit:
        yield explicit
        return
    from relay.infra.embedded_pg import embedded_postgres

    print("starting an embedded PostgreSQL (RELAY_DATABASE_URL is unset) ...", flush=True)
    with embedded_postgres() as url:
        yield url


def run_demo(args: argparse.Namespace) -> int:
    from relay.infra.config import ConfigError, load_settings

    try:
        explicit = load_settings().resolved_database_url()
    except ConfigError as exc:
        print("error: invalid configuration:", *exc.lines, sep="\n  ", file=sys.stderr)
        return 2
    from relay.infra.embedded_pg import EmbeddedPostgresUnavailable

    try:
        with _database(explicit) as url:
            return anyio.run(_demo, url, args, explicit is not None)
    except EmbeddedPostgresUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


async def _demo(url: str, args: argparse.Namespace, database_kept: bool) -> int:
    async with contextlib.AsyncExitStack() as stack:
        return await _demo_in(stack, url, args, database_kept)


@contextlib.asynccontextmanager
async def _webhook_receiver(url: str, hmac_key: str) -> AsyncIterator[str]:
    """`outbox-relay webhooks serve` as a child process with one Adyen route verifying with
    ``hmac_key`` (from a file, as the Helm chart mounts it); yields the route's URL. In the
    demo's own process it shared the event loop with the relays and slowed them down."""
    with tempfile.TemporaryDirectory(prefix="outbox-relay-demo-") as tmp:
        proc, log, port = _spawn_receiver(Path(tmp), url, hmac_key)
        base = f"http://127.0.0.1:{port}"
        try:
            async with aiohttp.ClientSession() as client:
                with anyio.fail_after(60):  # a hang guard: it answers in about a second
                    while True:
                        if proc.poll() is not None:
                            log.close()
                            raise RuntimeError(
                                "the webhook receiver exited at start: "
                                + (Path(tmp) / "webhooks.log").read_text()[-2000:]
                            )
                        with contextlib.suppress(aiohttp.ClientError, OSError):
                            async with client.get(f"{base}/healthz") as reply:
                                if reply.status == 200:
                                    break
                        await anyio.sleep(0.1)
            yield f"{base}/webhooks/adyen"
        finally:
            proc.terminate()
            try:
                await anyio.to_thread.run_sync(proc.wait, 10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()


def _spawn_receiver(
    tmp: Path, url: str, hmac_key: str
) -> tuple[subprocess.Popen[bytes], IO[bytes], int]:
    keys = tmp / "adyen-hmac-keys"
    keys.write_text(hmac_key + "\n")
    keys.chmod(0o600)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    env = {
        # None of the caller's relay settings: only this route, this database.
        **{k: v for k, v in os.environ.items() if not k.startswith("RELAY_")},
        "RELAY_DATABASE_URL": url,
        "RELAY_WEBHOOKS__ADYEN__KIND": "adyen",
        "RELAY_WEBHOOKS__ADYEN__SECRETS_FILE": str(keys),
        "RELAY_LOG_FORMAT": "json",
    }
    log = open(tmp / "webhooks.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "relay", "webhooks", "serve", "--host", "127.0.0.1",
         "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    return proc, log, port


async def _demo_in(
    stack: contextlib.AsyncExitStack, url: str, args: argparse.Namespace, database_kept: bool
) -> int:
    from aiohttp import web

    from provider_adapters.adyen import AdyenAdapter
    from provider_adapters.fake import FaultConfig, create_app
    from provider_adapters.fake.adyen import API_KEY as ADYEN_API_KEY
    from provider_adapters.fake.adyen import MERCHANT_ACCOUNT as ADYEN_MERCHANT
    from provider_adapters.fake.adyen import AdyenFaults, create_adyen_app
    from provider_adapters.registry import build_notification_reader
    from provider_adapters.stripe import StripeAdapter
    from relay.core.inbox import InboxApplier, InboxOptions
    from relay.core.lanes import Lane
    from relay.core.runtime import Relay, RelayOptions
    from relay.domain.retry_policy import RetryPolicy
    from relay.infra.db import INBOX_NOTIFY_CHANNEL, Database
    from relay.infra.logs import configure_logging
    from relay.infra.migrate import migrate

    configure_logging("console", level=40)  # errors only: the demo prints its own progress
    applied = await anyio.to_thread.run_sync(lambda: migrate(url))
    print(f"schema ready ({len(applied)} migration(s) applied)")

    faults = FaultConfig(
        latency_ms=args.latency_ms,
        rate_429=args.rate_429,
        rate_503=args.rate_503,
        rate_timeout_after_effect=args.rate_timeout_after_effect,
        rate_500_after_effect=args.rate_500_after_effect,
        rate_malformed=args.rate_malformed,
        timeout_seconds=2.0,
        seed=args.seed,
    )
    runner = web.AppRunner(create_app(faults))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    base_url = f"http://127.0.0.1:{port}"
    print(
        f"fake provider on {base_url} with faults: 429 {args.rate_429:.0%}, "
        f"503 {args.rate_503:.0%}, effect-then-timeout {args.rate_timeout_after_effect:.0%}, "
        f"effect-then-500 {args.rate_500_after_effect:.0%}, "
        f"malformed {args.rate_malformed:.0%}"
    )

    adyen_payments = args.payments // 3 if args.adyen_payments is None else args.adyen_payments
    adyen_runner = None
    adyen_url = ""
    if adyen_payments:
        # Adyen confirms captures, cancels and refunds only by webhook: the webhook receiver
        # (`outbox-relay webhooks serve`, its own process as in production) verifies every
        # item with this run's HMAC key and stores it in the inbox; the relays' inbox
        # appliers finish the awaiting intents.
        hmac_key = secrets.token_hex(32).upper()
        webhook_url = await stack.enter_async_context(_webhook_receiver(url, hmac_key))
        # The same fault classes, in Adyen's shape. A 500 after the effect is not injected:
        # Adyen replays the stored 500 for the key, so such an authorisation ends dead with
        # one effect at the fake (its AUTHORISATION webhook only records it), which the
        # demo's exactly-once check would count. Every notification is delivered twice, out
        # of order: the inbox stores each once and applies it once.
        adyen_faults = AdyenFaults(
            seed=args.seed,
            latency_ms=args.latency_ms,
            rate_429=args.rate_429,
            rate_503=args.rate_503,
            rate_drop_after_effect=args.rate_timeout_after_effect,
            rate_malformed_after_effect=args.rate_malformed,
            webhook_url=webhook_url,
            webhook_delay_ms=20,
            webhook_duplicate=True,
            webhook_reorder=True,
            hmac_key_hex=hmac_key,
        )
        adyen_runner = web.AppRunner(create_adyen_app(adyen_faults))
        await adyen_runner.setup()
        adyen_site = web.TCPSite(adyen_runner, "127.0.0.1", 0)
        await adyen_site.start()
        adyen_url = f"http://127.0.0.1:{adyen_runner.addresses[0][1]}"
        print(
            f"fake Adyen on {adyen_url} (Checkout v71) with the same faults but effect-then-500;"
            f" it confirms captures, cancels and refunds by signed webhooks, each sent twice and"
            f" out of order, to the webhook receiver on {webhook_url}"
        )

    await anyio.to_thread.run_sync(_exchange_rates, url)

    rng = random.Random(args.seed)
    # Letters only: this run's ids must differ from earlier runs' in the same database, and
    # a long run of digits in an id could take the shape of a card number and be refused.
    prefix = "demo-" + "".join(random.SystemRandom().choices(string.ascii_lowercase, k=10))
    rows = build_workload(args.payments, rng, prefix)
    rows += build_adyen_workload(adyen_payments, rng, prefix + "-adyen")
    await anyio.to_thread.run_sync(_insert, url, rows)
    print(
        f"inserted {len(rows)} intents for {args.payments} Stripe and {adyen_payments} Adyen "
        "payments"
    )

    relays = []
    appliers: list[InboxApplier] = []
    for n in range(args.relays):
        adapter = StripeAdapter(
            name="stripe",
            api_key="sk_test_demo",
            base_url=base_url,
            connect_timeout_seconds=1.0,
            read_timeout_seconds=1.0,
            max_connections=32,
        )
        lanes = {"stripe": Lane("stripe", adapter, concurrency=32, timeout_seconds=2.0)}
        if adyen_runner is not None:
            adyen = AdyenAdapter(
                name="adyen",
                api_key=ADYEN_API_KEY,
                merchant_account=ADYEN_MERCHANT,
                base_url=adyen_url,
                connect_timeout_seconds=1.0,
                read_timeout_seconds=1.0,
                max_connections=32,
            )
            lanes["adyen"] = Lane("adyen", adyen, concurrency=32, timeout_seconds=2.0)
        relays.append(
            Relay(
                Database(url, pool_size=3, name=f"demo-relay-{n}"),
                lanes,
                RetryPolicy(base_seconds=0.05, cap_seconds=1.0, max_attempts=10),
                RelayOptions(
                    instance=f"demo-relay-{n}",
                    lease_seconds=10.0,
                    poll_interval_seconds=0.1,
                    poll_max_interval_seconds=0.5,
                    shutdown_grace_seconds=5.0,
                ),
                rng=random.Random(args.seed + n).random,
            )
        )
        if adyen_runner is not None:
            relay = relays[-1]
            # Its own small pool: on the relay's, under the demo's load, an apply waited for
            # a connection behind the claims and write-backs for seconds.
            applier = InboxApplier(
                Database(url, pool_size=6, name=f"demo-inbox-{n}"),
                {"adyen": build_notification_reader("adyen", "adyen")},
                InboxOptions(
                    instance=f"demo-relay-{n}",
                    lease_seconds=10.0,
                    poll_interval_seconds=0.5,
                    # A confirmation that arrives before its intent's reply is written back
                    # (a reply lost, a write-back batched) is handed back: ask again soon.
                    retry_base_seconds=0.05,
                    retry_cap_seconds=0.5,
                    concurrency=6,
                ),
                rng=random.Random(args.seed + n).random,
                stopping=functools.partial(lambda r: r.stopping, relay),
            )
            relay.also_wake[INBOX_NOTIFY_CHANNEL] = applier.wake
            relay.also_cut_off.append(applier.cut_off)
            appliers.append(applier)
    started = time.perf_counter()
    try:
        async with anyio.create_task_group() as tg:
            for relay in relays:
                await relay.db.open()
                await tg.start(relay.run)
            for applier in appliers:
                await applier.db.open()
                tg.start_soon(applier.run_forever)
            print(
                f"relaying with {len(relays)} relay(s)"
                + (", each applying Adyen's notifications" if appliers else "")
                + " ..."
            )
            stuck = await wait_for_workload(
                url,
                prefix,
                len(rows),
                started,
                deadline_seconds=args.deadline_seconds,
                database_kept=database_kept,
                confirmations=bool(appliers),
            )
            for relay in relays:
                relay.stop()
    finally:
        for applier in appliers:
            await applier.db.close()
        for relay in relays:
            await relay.db.close()
            for lane in relay.lanes.values():
                await lane.adapter.aclose()
    elapsed = time.perf_counter() - started
    async with aiohttp.ClientSession() as client:
        async with client.get(f"{base_url}/_fake/effects") as reply:
            effects = {"stripe": await reply.json()}
        if adyen_runner is not None:
            async with client.get(f"{adyen_url}/_fake/effects") as reply:
                effects["adyen"] = await reply.json()
            async with client.get(f"{adyen_url}/_fake/webhooks") as reply:
                effects["adyen"]["notifications"] = (await reply.json())["notifications"]
    await runner.cleanup()
    if adyen_runner is not None:
        await adyen_runner.cleanup()
    if stuck:
        print(*stuck, sep="\n", file=sys.stderr)
        return 1
    return await anyio.to_thread.run_sync(_summarise, url, prefix, effects, elapsed, len(rows))


def _exchange_rates(url: str) -> None:
    """The fake ECB rate server, yesterday's rates imported, one conversion shown."""
    from datetime import UTC, datetime, timedelta

    from provider_adapters.fake.rates import FakeRateServer
    from relay.domain.fx import parse_ecb_xml
    from relay.domain.money import format_minor
    from relay.finance import fx

    yesterday = (datetime.now(UTC) - timedelta(days=1)).date().isoformat()
    with FakeRateServer(yesterday) as server:
        document = parse_ecb_xml(fx.fetch_document(server.url))
    with psycopg.connect(url, autocommit=True) as conn:
        report = fx.import_document(
            conn,
            document,
            source_kind="ecb",
            source_name="fake ECB",
            operator="demo",
            source_url=server.url,
        )
        converted = fx.convert(conn, 10000, "EUR", "USD")
    print(
        f"exchange rates: {report.rates_in_document} ECB reference rates from a fake rate "
        f"server ({report.inserted} new); 100.00 EUR = "
        f"{format_minor(converted['converted_minor'], 'USD', converted['to_exponent'])} at "
        f"{converted['rate'].rstrip('0').rstrip('.')} (rate #{converted['rate_id']}; "
        "outbox-relay fx show lists the rates in force)"
    )


def _insert(url: str, rows: list[Row]) -> None:
    with psycopg.connect(url) as conn, conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO outbox.payment_intents (payment_id, action, provider, amount_minor,"
            " currency, payment_method, metadata) VALUES (%s, %s, %s, %s, %s, %s,"
            ' \'{"source": "demo"}\')',
            [
                (r.payment_id, r.action, r.provider, r.amount_minor, r.currency, r.payment_method)
                for r in rows
            ],
        )


# A blocked intent behind a dead one of its payment waits for an operator, not for the
# relays: for the demo it is finished, as "stalled".
_STATUS = """
    CASE WHEN i.status = 'blocked' AND EXISTS (
             SELECT 1 FROM outbox.payment_intents AS d
             WHERE d.payment_id = i.payment_id AND d.status = 'dead'
               AND d.payment_seq < i.payment_seq)
         THEN 'stalled' ELSE i.status END
"""
_FINISHED = ("succeeded", "failed", "dead", "stalled")


def _counts(url: str, prefix: str) -> Counter[str]:
    """Intents of this run by status, with 'stalled' for those blocked behind a dead one."""
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            f"SELECT {_STATUS} AS status, count(*) FROM outbox.payment_intents AS i"
            " WHERE i.payment_id LIKE %s GROUP BY 1",
            (prefix + "-%",),
        ).fetchall()
    return Counter({status: count for status, count in rows})


# Intents of this run the provider accepted and then confirmed (or failed) by a webhook the
# inbox applied: the modification's pspReference is the intent's provider_reference.
_CONFIRMED_BY_WEBHOOK = """
    SELECT i.provider, i.action, count(*) FROM outbox.payment_intents AS i
    WHERE i.payment_id LIKE %s AND i.status IN ('succeeded', 'failed')
      AND i.provider_reference IS NOT NULL
      AND EXISTS (
          SELECT 1 FROM outbox.webhook_inbox AS w
          WHERE w.payment_id = i.payment_id AND w.provider = i.provider
            AND w.status = 'applied' AND w.event_type <> 'AUTHORISATION'
            AND w.payload #>> '{notificationItems,0,NotificationRequestItem,pspReference}'
                = i.provider_reference)
    GROUP BY 1, 2
"""


def _confirmed(url: str, prefix: str) -> Counter[tuple[str, str]]:
    """Intents of this run finished by their provider's confirmation, by (provider, action)."""
    with psycopg.connect(url) as conn:
        rows = conn.execute(_CONFIRMED_BY_WEBHOOK, (prefix + "-%",)).fetchall()
    return Counter({(provider, action): n for provider, action, n in rows})


# Unfinished intents named one by one past the deadline; the rest are counted.
_SHOWN = 5
_MESSAGE_CHARS = 120


def _stuck(url: str, prefix: str, deadline_seconds: float, *, database_kept: bool) -> list[str]:
    """What did not finish: counts by status and the first few intents in detail (the
    embedded database is deleted as the demo exits: these lines are all that is left)."""
    counts = _counts(url, prefix)
    waiting = {s: n for s, n in sorted(counts.items()) if s not in _FINISHED}
    unfinished = sum(waiting.values())
    with psycopg.connect(url) as conn:
        first = conn.execute(
            f"SELECT i.id, i.payment_id, i.action, i.status, i.attempts, i.error_code,"
            f" i.error_message, i.claimed_by,"
            f" extract(epoch FROM i.available_at - clock_timestamp())::float8"
            f" FROM outbox.payment_intents AS i WHERE i.payment_id LIKE %s"
            f" AND {_STATUS} NOT IN ('succeeded', 'failed', 'dead', 'stalled')"
            " ORDER BY i.id LIMIT %s",
            (prefix + "-%", _SHOWN),
        ).fetchall()
    lines = [
        f"error: the workload did not finish within --deadline-seconds {deadline_seconds:g}: "
        f"{unfinished} intent(s) unfinished ("
        + ", ".join(f"{status} {n}" for status, n in waiting.items())
        + ")"
    ]
    for i, payment_id, action, status, attempts, code, message, holder, due_in in first:
        line = f"  intent {i} ({payment_id}, {action}): {status}, {attempts} attempt(s)"
        if code:
            line += f", last error {code}"
            if message:
                line += f" ({clip(message, _MESSAGE_CHARS)})"
        if status == "in_flight" and holder:
            line += f", held by {holder}"
        elif status == "pending" and due_in is not None and due_in > 0:
            line += f", next attempt in {due_in:.1f} s"
        lines.append(line)
    if unfinished > len(first):
        lines.append(f"  ... and {unfinished - len(first)} more")
    if database_kept:
        lines.append(
            "  look at one with `outbox-relay intents show ID` (same RELAY_DATABASE_URL); "
            "allow more time with --deadline-seconds"
        )
    else:
        lines.append(
            "  the embedded PostgreSQL is deleted as the demo exits, so the lines above are "
            "all that is left of them; to look further with `outbox-relay intents show ID`, "
            "run the demo against a PostgreSQL of yours (RELAY_DATABASE_URL); allow more "
            "time with --deadline-seconds"
        )
    return lines


async def wait_for_workload(
    url: str,
    prefix: str,
    total: int,
    started: float,
    *,
    deadline_seconds: float,
    database_kept: bool,
    confirmations: bool = False,
) -> list[str]:
    """Show progress until every intent of the run is finished (terminal, or blocked behind
    a dead intent of its payment); return [] then, or, past ``deadline_seconds``, the lines
    that name what is stuck. ``database_kept``: the database outlives the demo (a
    RELAY_DATABASE_URL), so the lines may point at commands that read it afterwards.
    ``confirmations``: show how many intents their provider's webhook has settled."""
    with anyio.move_on_after(deadline_seconds):
        await _show_progress(url, prefix, total, started, confirmations=confirmations)
        return []
    print(flush=True)  # end an interactive progress line
    return await anyio.to_thread.run_sync(
        functools.partial(_stuck, url, prefix, deadline_seconds, database_kept=database_kept)
    )


async def _show_progress(
    url: str, prefix: str, total: int, started: float, *, confirmations: bool
) -> None:
    interactive = sys.stdout.isatty()
    last_print = 0.0
    while True:
        counts = await anyio.to_thread.run_sync(_counts, url, prefix)
        confirmed = (
            (await anyio.to_thread.run_sync(_confirmed, url, prefix)).total()
            if confirmations
            else 0
        )
        finished = sum(counts[s] for s in _FINISHED)
        done = counts["succeeded"] + counts["failed"] + counts["dead"]
        now = time.perf_counter()
        if finished >= total or interactive or now - last_print >= 2.0:
            rate = done / max(now - started, 1e-9)
            line = (
                f"  {done:>6}/{total} terminal  succeeded {counts['succeeded']}  "
                f"failed {counts['failed']}  dead {counts['dead']}  "
                f"in flight {counts['in_flight']}  "
                f"awaiting confirmation {counts['awaiting_confirmation']}  "
            )
            if confirmations:
                line += f"settled by webhook {confirmed}  "
            line += f"{rate:,.0f} intents/s"
            if counts["stalled"]:
                line += f"  behind a dead intent {counts['stalled']}"
            print(
                ("\r" + line) if interactive else line, end="" if interactive else "\n", flush=True
            )
            last_print = now
        if finished >= total:
            if interactive:
                print()
            return
        await anyio.sleep(0.25)


_PROBLEMS_SHOWN = 20


def _provider_key(provider: str, key: str) -> str:
    """The key as the provider received it (Adyen takes at most 64 characters)."""
    if provider == "adyen":
        from provider_adapters.adyen import adyen_idempotency_key

        return adyen_idempotency_key(key)
    return key


def _summarise(
    url: str, prefix: str, effects: dict[str, dict[str, Any]], elapsed: float, total: int
) -> int:
    """``effects``: each fake's /_fake/effects, by provider name."""
    by_provider: dict[str, dict[str, Any]] = {
        name: reply.get("effects_by_key", {}) for name, reply in effects.items()
    }
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT provider, action, status, idempotency_key, error_code"
            " FROM outbox.payment_intents WHERE payment_id LIKE %s",
            (prefix + "-%",),
        ).fetchall()
        mismatched = conn.execute(
            """
            SELECT count(*) FROM outbox.payments p
            JOIN LATERAL (
                SELECT coalesce(sum(amount_applied_minor) FILTER (WHERE action IN ('authorize','charge')), 0) AS a,
                       coalesce(sum(amount_applied_minor) FILTER (WHERE action IN ('capture','charge')), 0) AS c,
                       coalesce(sum(amount_applied_minor) FILTER (WHERE action = 'refund'), 0) AS r
                FROM outbox.payment_intents i
                WHERE i.payment_id = p.payment_id AND i.status = 'succeeded'
            ) s ON true
            WHERE p.payment_id LIKE %s
              AND (p.authorized_minor, p.captured_minor, p.refunded_minor) <> (s.a, s.c, s.r)
            """,
            (prefix + "-%",),
        ).fetchone()
        inbox: Counter[str] = Counter(
            dict(
                conn.execute(
                    "SELECT status, count(*) FROM outbox.webhook_inbox"
                    " WHERE payment_id LIKE %s GROUP BY 1",
                    (prefix + "-%",),
                ).fetchall()
            )
        )
    confirmed = _confirmed(url, prefix)
    # (action, status, the key as the provider saw it, error_code) by provider
    intents = [(a, st, _provider_key(p, k), code) for p, a, st, k, code in rows]
    providers = sorted({p for p, *_ in rows})
    actions = ["authorize", "capture", "charge", "void", "refund"]
    statuses = ["succeeded", "failed", "dead"]
    table: Counter[tuple[str, str, str]] = Counter((p, a, st) for p, a, st, _, _ in rows)
    print()
    # "by webhook": of the succeeded and failed, those the provider accepted first and
    # confirmed (or failed) later by a notification the inbox applied.
    print(
        f"{'provider':<9}{'action':<11}"
        + "".join(f"{st:>11}" for st in statuses)
        + f"{'by webhook':>12}"
    )
    for provider in providers:
        for action in actions:
            counts = [table[(provider, action, st)] for st in statuses]
            if any(counts):
                print(
                    f"{provider:<9}{action:<11}"
                    + "".join(f"{n:>11}" for n in counts)
                    + f"{confirmed[(provider, action)]:>12}"
                )
    errors = Counter(code for _, status, _, code in intents if status != "succeeded" and code)
    print("failures by error_code: " + ", ".join(f"{c} {n}" for c, n in errors.most_common()))
    print(
        f"{total} intents in {elapsed:.1f} s: {total / elapsed:,.0f} intents/s "
        f"(fake provider latency and injected faults included)"
    )
    faults = effects.get("stripe", {}).get("faults_injected", {})
    print("faults injected (Stripe): " + ", ".join(f"{k} {v}" for k, v in faults.items()))
    notes = effects.get("adyen", {}).get("notifications")
    if notes is not None:
        deliveries = sum(int(n.get("_delivered", 0)) for n in notes)
        print(
            f"Adyen notifications: {len(notes)} sent, {deliveries} deliveries (each sent twice, "
            f"out of order); inbox rows {inbox.total()} (applied {inbox['applied']}, ignored "
            f"{inbox['ignored']}, waiting {inbox['received']}); "
            f"{sum(n for (p, _), n in confirmed.items() if p == 'adyen')} Adyen intents "
            "settled by their confirmation"
        )

    problems = []
    for provider, action, status, raw_key, _ in rows:
        key = _provider_key(provider, raw_key)
        count = by_provider.get(provider, {}).get(key, {}).get("count", 0)
        if status == "succeeded" and count != 1:
            problems.append(f"succeeded {provider} {action} {key} has {count} effects")
        if status != "succeeded" and count != 0:
            problems.append(f"{status} {provider} {action} {key} has {count} effects")
    for provider in providers:
        ours = {_provider_key(p, k) for p, _, _, k, _ in rows if p == provider}
        problems += [
            f"{provider} key {k} applied {v['count']} times"
            for k, v in by_provider.get(provider, {}).items()
            if k in ours and v["count"] > 1
        ]
    if mismatched and mismatched[0]:
        problems.append(f"{mismatched[0]} payments whose amounts differ from their intents")
    stalled = _counts(url, prefix)["stalled"]
    if stalled:
        print(
            f"{stalled} intent(s) wait behind a dead intent of their payment, as they should: "
            "an operator resolves the dead one (`outbox-relay dead-letters`)"
        )
    awaiting = Counter(p for p, _, st, _, _ in rows if st == "awaiting_confirmation")
    problems += [
        f"{n} {provider} intents still awaiting their confirmation"
        for provider, n in sorted(awaiting.items())
    ]
    unfinished = sum(1 for _, s, _, _ in intents if s not in statuses) - stalled - awaiting.total()
    if unfinished:
        problems.append(f"{unfinished} intents not terminal")
    succeeded = sum(1 for _, s, _, _ in intents if s == "succeeded")
    if problems:
        print(f"EXACTLY-ONCE CHECK FAILED ({len(problems)} problem(s)):")
        for line in problems[:_PROBLEMS_SHOWN]:
            print(f"  {line}")
        if len(problems) > _PROBLEMS_SHOWN:
            print(f"  ... and {len(problems) - _PROBLEMS_SHOWN} more")
        return 1
    print(
        f"exactly-once check passed: {succeeded} succeeded intents ({', '.join(providers)}), "
        "each with exactly one effect at its provider (Adyen's captures, cancels and refunds "
        "included, confirmed by webhook); no key applied twice; none left awaiting a "
        "confirmation; payment amounts match their intents"
    )
    return 0
