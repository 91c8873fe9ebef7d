"""The fault campaign: every fault the relay is meant to survive, at once, then every invariant.

One campaign owns a PostgreSQL (pgserver, so it can restart it), runs three relay processes
that publish through a TCP proxy in front of the real RabbitMQ (a vhost of its own, an
exchange and a quorum queue bound with '#', a consumer on it), and two providers side by
side, each relay with a lane for both: the fake Stripe-compatible provider with every fault
class it has, and the fake Adyen Checkout API with the same classes in Adyen's shape (no
"500 after the effect": Adyen replays the stored 500 for the key, so such an authorisation
ends dead with its effect, which the exactly-once check would count; tests/test_adyen_crash.py
covers it). Adyen answers captures, cancels and refunds ``received`` and confirms them by
signed webhooks, each delivered twice and out of order, to a webhook receiver process
(``outbox-relay webhooks serve``); the relays' inbox appliers finish the intents awaiting
them. Intents arrive in waves (relay.cli.demo.build_workload and build_adyen_workload: the
same mix for both providers) while a schedule drawn from the seed injects, one after the
other:

* ``kill``     SIGKILL a random relay (mid-call or mid-write-back) and start it again;
* ``zombie``   SIGSTOP the relay holding the most claims until other relays have re-claimed
               them (its lease expired), then SIGCONT: its write-backs must be fenced;
* ``drain``    SIGTERM a relay under load (it must drain and exit 0) and start it again;
* ``pg``       restart PostgreSQL (immediate stop: every connection drops);
* ``broker``   cut the AMQP path (every link dropped, new ones refused) while outcomes keep
               coming, then restore it;
* ``provider`` switch both fake providers to another fault class (429, 503, timeout after
               the effect, 500 after the effect (Stripe only), malformed reply, a mix, or none).

The schedule counts faults, never seconds: a slow, shared machine runs the same campaign,
only slower. Then everything is left to finish (a generous guard turns a hang into a
failure), the relays are SIGTERMed (exit 0 expected), and every invariant is checked.

Run it longer with ``python -m tests.fault_campaign --rounds 200`` or ``--minutes 30``
(``--help`` lists the flags); ``tests/test_fault_campaign.py`` runs a CI-sized one.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import aio_pika
import anyio
import psycopg
from aio_pika.abc import AbstractIncomingMessage
from anyio.abc import TaskStatus
from anyio.from_thread import BlockingPortal, start_blocking_portal

from provider_adapters.adyen import adyen_idempotency_key
from provider_adapters.fake.adyen import API_KEY as ADYEN_API_KEY
from provider_adapters.fake.adyen import HMAC_KEY_HEX
from provider_adapters.fake.adyen import MERCHANT_ACCOUNT as ADYEN_MERCHANT
from relay.cli.demo import Row, build_adyen_workload, build_workload
from relay.infra.migrate import migrate
from tests.invariants import (
    TERMINAL,
    assert_audit_intact,
    assert_exactly_once,
    assert_ledger_balanced,
)
from tests.processes import (
    AdyenFakeProcess,
    FakeProviderProcess,
    RelayProcess,
    WebhookReceiverProcess,
)
from tests.tcp_proxy import TcpProxy

__all__ = ["CampaignConfig", "CampaignReport", "main", "run_campaign"]

FAULT_KINDS = ("kill", "zombie", "drain", "pg", "broker", "provider")
PROVIDER_CLASSES = ("429", "503", "timeout_after_effect", "500_after_effect", "malformed")

# Fault rates of each provider phase: a low rate of every class all along (so each shows up
# however the schedule falls), and one class turned up at a time.
_BASELINE = {
    "rate_429": 0.015,
    "rate_503": 0.015,
    "rate_timeout_after_effect": 0.015,
    "rate_500_after_effect": 0.015,
    "rate_malformed": 0.015,
}
PROVIDER_PHASES: dict[str, dict[str, float]] = {
    "mixed": {name: 0.03 for name in _BASELINE},
    "429": {**_BASELINE, "rate_429": 0.25},
    "503": {**_BASELINE, "rate_503": 0.25},
    "timeout_after_effect": {**_BASELINE, "rate_timeout_after_effect": 0.12},
    "500_after_effect": {**_BASELINE, "rate_500_after_effect": 0.15},
    "malformed": {**_BASELINE, "rate_malformed": 0.15},
    "none": {},
}
# The Adyen fake's switches for the same classes (provider_adapters/fake/adyen.py).
_ADYEN_FAULTS = {
    "rate_429": "rate_429",
    "rate_503": "rate_503",
    "rate_timeout_after_effect": "rate_drop_after_effect",
    "rate_malformed": "rate_malformed_after_effect",
}


@dataclass
class CampaignConfig:
    seed: int = 20261125
    payments: int = 500  # per cycle; build_workload makes about 2.3 intents per payment
    adyen_payments: int = 80  # per cycle, beside Stripe's (~2.3 intents each); 0: Stripe only
    rounds: int = 40  # faults per cycle
    minutes: float = 0.0  # > 0: repeat cycles (fresh workload each) until this much has run
    relays: int = 3
    waves: int = 0  # insert waves per cycle; 0: one before each fault, so each lands under load
    lease_seconds: float = 4.0
    max_attempts: int = 30
    amqp_url: str = os.environ.get("RELAY_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
    guard_seconds: float = 420.0  # a hang guard for the final settle, never a speed limit
    workdir: Path | None = None  # logs go here; a temporary directory when None
    keep_logs: bool = False
    verbose: bool = False


@dataclass
class Zombie:
    relay: str
    held: dict[int, int]  # intent id -> lease token held when stopped
    reclaimed: set[int]  # of those, taken over by another relay before SIGCONT
    fenced: set[int]  # of those, the zombie's write-backs refused (its `lease_lost` lines)
    log_offset: int  # the relay's log size at SIGCONT
    stalled: bool = False  # some claims were not taken over within the guard
    open_transactions: int = 0  # its sessions left inside a transaction while it was stopped
    lock_waiters: int = 0  # sessions of other relays waiting on a lock meanwhile


@dataclass
class CampaignReport:
    config: CampaignConfig
    faults: Counter[str] = field(default_factory=Counter)
    provider_phases: list[str] = field(default_factory=list)
    provider_faults: dict[str, int] = field(default_factory=dict)
    zombies: list[Zombie] = field(default_factory=list)
    drain_exit_codes: list[int | None] = field(default_factory=list)
    final_exit_codes: list[int | None] = field(default_factory=list)
    unexpected_exits: list[str] = field(default_factory=list)
    slow_rounds: int = 0
    inserted: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    # (provider, status) -> intents at the end; status 'redriven': attempts > 1
    by_provider: Counter[tuple[str, str]] = field(default_factory=Counter)
    events: int = 0
    delivered: int = 0
    unique_delivered: int = 0
    fenced_write_backs: int = 0
    fenced_by_zombies: int = 0
    fenced_event_marks: int = 0
    redriven: int = 0
    # Adyen: notifications the fake sent, deliveries answered 2xx, inbox rows, and intents
    # that awaited their confirmation and were finished by it.
    adyen_notifications: int = 0
    adyen_deliveries: int = 0
    adyen_inbox_rows: int = 0
    adyen_confirmed: int = 0
    elapsed_seconds: float = 0.0
    checks: list[tuple[str, str | None]] = field(default_factory=list)  # (name, failure)
    log_dir: Path | None = None

    @property
    def failures(self) -> list[str]:
        return [f"{name}: {problem}" for name, problem in self.checks if problem is not None]

    def summary(self) -> str:
        c = self.config
        held = sum(len(z.held) for z in self.zombies)
        reclaimed = sum(len(z.reclaimed) for z in self.zombies)
        drains_ok = sum(1 for code in self.drain_exit_codes if code == 0)
        lines = [
            f"fault campaign: seed {c.seed}, {self.faults.total()} faults over "
            f"{c.relays} relays, lease {c.lease_seconds:g} s, "
            f"{self.elapsed_seconds:.0f} s on this machine (not a limit)",
            "",
            "  faults injected                      count",
            f"  relay SIGKILL                      {self.faults['kill']:>7}",
            f"  zombie (SIGSTOP past lease, CONT)  {self.faults['zombie']:>7}"
            f"   claims held {held}, taken over {reclaimed}",
            f"    stopped inside a transaction     {sum(z.open_transactions > 0 for z in self.zombies):>7}"
            f"   claims left locked (not taken over in time) "
            f"{sum(z.stalled for z in self.zombies)}, lock waiters seen "
            f"{sum(z.lock_waiters for z in self.zombies)}",
            f"  SIGTERM under load + restart       {self.faults['drain']:>7}"
            f"   exit 0: {drains_ok}/{len(self.drain_exit_codes)}",
            f"  PostgreSQL restart                 {self.faults['pg']:>7}",
            f"  RabbitMQ path cut + restored       {self.faults['broker']:>7}",
            f"  provider fault class switched      {self.faults['provider']:>7}"
            f"   {' > '.join(self.provider_phases)}",
        ]
        for name in PROVIDER_CLASSES:
            lines.append(f"  provider {name:<26}{self.provider_faults.get(name, 0):>7}")
        lines += [
            "",
            "  outcomes",
            f"  intents inserted                   {self.inserted:>7}",
            f"  succeeded                          {self.outcomes['succeeded']:>7}",
            f"  failed                             {self.outcomes['failed']:>7}",
            f"  dead                               {self.outcomes['dead']:>7}",
            *(
                f"    {provider:<10} succeeded {self.by_provider[(provider, 'succeeded')]},"
                f" failed {self.by_provider[(provider, 'failed')]},"
                f" dead {self.by_provider[(provider, 'dead')]},"
                f" re-driven {self.by_provider[(provider, 'redriven')]}"
                for provider in sorted({p for p, _ in self.by_provider})
            ),
            f"  re-driven (attempts > 1)           {self.redriven:>7}",
            f"  events in outbox.events            {self.events:>7}",
            f"  messages delivered to the queue    {self.delivered:>7}",
            f"  duplicates deduplicated            {self.delivered - self.unique_delivered:>7}",
            f"  fenced write-backs (lease_lost)    {self.fenced_write_backs:>7}"
            f"   by zombies: {self.fenced_by_zombies}",
            f"  fenced event marks                 {self.fenced_event_marks:>7}",
            f"  rounds that made no progress       {self.slow_rounds:>7}",
            f"  Adyen notifications sent           {self.adyen_notifications:>7}"
            f"   deliveries {self.adyen_deliveries}, stored once each: "
            f"{self.adyen_inbox_rows}",
            f"  Adyen intents settled by webhook   {self.adyen_confirmed:>7}",
            "",
            "  invariants",
        ]
        for name, problem in self.checks:
            lines.append(f"  {'ok  ' if problem is None else 'FAIL'} {name}")
            if problem is not None:
                lines.append(f"       {problem}")
        if self.log_dir is not None:
            lines.append(f"  logs: {self.log_dir}")
        return "\n".join(lines)


# -- infrastructure the campaign owns ----------------------------------------------------


class OwnedPostgres:
    """A PostgreSQL the campaign may stop and start (pgserver in a temporary directory).

    The data directory gets a directory of its own under the system's temp dir, never the
    campaign's workdir: pgserver runs the server as the user ``pgserver`` when started as
    root, and pytest resets its own temp root to mode 0700 whenever a session starts.
    """

    def __init__(self) -> None:
        import pgserver

        self.workdir = Path(tempfile.mkdtemp(prefix="fault-campaign-pg-"))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
            self.server: Any = pgserver.get_server(  # type: ignore[attr-defined]
                self.workdir / "pgdata", cleanup_mode="stop"
            )
        self.url = str(self.server.get_uri())

    def restart(self, down_seconds: float) -> None:
        from pgserver._commands import pg_ctl  # type: ignore[attr-defined,import-untyped]

        pg_ctl(
            ["-w", "-m", "immediate", "stop"],
            pgdata=self.server.pgdata,
            user=self.server.system_user,
        )
        time.sleep(down_seconds)
        self.server.ensure_postgres_running()

    def cleanup(self) -> None:
        try:
            self.server.cleanup()
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)


@dataclass(frozen=True, slots=True)
class Delivery:
    message_id: str | None
    ordering_key: str | None
    sequence: int | None
    routing_key: str | None
    body: Any


class Broker:
    """A vhost of the campaign's own (rabbitmqctl), an exchange, a quorum queue bound with
    '#', and a consumer that records every delivery. Without rabbitmqctl: unique names in
    the URL's vhost, deleted afterwards."""

    def __init__(self, amqp_url: str, tag: str) -> None:
        self.tag = tag
        self.exchange = f"fault-campaign.{tag}"
        self.queue = f"fault-campaign.{tag}.all"
        self.vhost: str | None = None
        self._base = amqp_url
        self.url = amqp_url
        self.received: list[Delivery] = []
        self._connection: aio_pika.abc.AbstractConnection | None = None

    def create_vhost(self) -> None:
        if shutil.which("rabbitmqctl") is None:
            return
        vhost = f"fault-campaign-{self.tag}"
        user = urlsplit(self._base).username or "guest"
        try:
            _rabbitmqctl("add_vhost", vhost)
            self.vhost = vhost
            _rabbitmqctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
            self.delete_vhost()
            return
        parts = urlsplit(self._base)
        self.url = urlunsplit(parts._replace(path="/" + quote(vhost, safe="")))

    def delete_vhost(self) -> None:
        if self.vhost is not None:
            with contextlib.suppress(subprocess.CalledProcessError, subprocess.TimeoutExpired):
                _rabbitmqctl("delete_vhost", self.vhost)
            self.vhost = None

    async def consume(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        # Plain, not robust: the consumer's own path is never cut (the relays' is), and a
        # robust connection's reconnect callbacks could outlive the event loop.
        connection = await aio_pika.connect(self.url, timeout=20)
        self._connection = connection
        try:
            channel = await connection.channel()
            exchange = await channel.declare_exchange(
                self.exchange, aio_pika.ExchangeType.TOPIC, durable=True
            )
            queue = await channel.declare_queue(
                self.queue, durable=True, arguments={"x-queue-type": "quorum"}
            )
            await queue.bind(exchange, routing_key="#")
            await queue.consume(self._on_message)
            task_status.started()
            await anyio.sleep_forever()
        finally:
            with anyio.CancelScope(shield=True):
                if self.vhost is None:  # a shared vhost: delete what we declared
                    with contextlib.suppress(Exception):
                        cleanup = await connection.channel()
                        await cleanup.queue_delete(self.queue, if_unused=False, if_empty=False)
                        await cleanup.exchange_delete(self.exchange)
                await connection.close()

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        async with message.process():
            headers = dict(message.headers)
            sequence = headers.get("sequence")
            ordering_key = headers.get("ordering-key")
            self.received.append(
                Delivery(
                    message_id=message.message_id,
                    ordering_key=str(ordering_key) if ordering_key is not None else None,
                    sequence=int(sequence) if isinstance(sequence, int) else None,
                    routing_key=message.routing_key,
                    body=json.loads(message.body),
                )
            )

    def unique(self) -> dict[str, Delivery]:
        """First delivery of each message_id, in arrival order (a consumer's dedup)."""
        first: dict[str, Delivery] = {}
        for delivery in list(self.received):
            if delivery.message_id is not None:
                first.setdefault(delivery.message_id, delivery)
        return first


def _lease_lost_ids(log_path: Path, offset: int) -> set[int]:
    """Intent ids of the relay's fenced write-backs (`lease_lost`) logged after ``offset``."""
    ids: set[int] = set()
    with log_path.open("rb") as log:
        log.seek(offset)
        for raw in log:
            if b'"lease_lost"' in raw:
                with contextlib.suppress(ValueError):
                    line = json.loads(raw)
                    if line.get("event") == "lease_lost":
                        ids.add(int(line["intent_id"]))
    return ids


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


# -- the campaign --------------------------------------------------------------------------


def _schedule(rng: random.Random, rounds: int) -> list[str]:
    """Every kind at least once (when rounds allow), kills the most; shuffled by the seed."""
    share = {"zombie": 7, "drain": 10, "pg": 8, "broker": 7, "provider": 5}
    kinds: list[str] = []
    for kind, every in share.items():
        kinds += [kind] * max(1, rounds // every)
    kinds = kinds[:rounds]
    kinds += ["kill"] * (rounds - len(kinds))
    rng.shuffle(kinds)
    return kinds


class CampaignRelay(RelayProcess):
    """A relay process whose instance name changes with every start (``campaign-relay-0-3``),
    as a restarted pod's would: claims, audit rows and sessions of a killed predecessor are
    then never mistaken for the live process's. One log file per relay across its starts."""

    @property
    def instance(self) -> str:
        return self.env["RELAY_INSTANCE_NAME"]

    def start(self) -> None:
        self.env["RELAY_INSTANCE_NAME"] = f"{self.name}-{self.starts + 1}"
        super().start()


def _waves(rows: list[Row], count: int) -> list[list[Row]]:
    """Slices of payments; a payment's intents stay in one wave, in insertion order."""
    by_payment: dict[str, list[Row]] = {}
    for row in rows:
        by_payment.setdefault(row.payment_id, []).append(row)
    ids = list(by_payment)
    return [[r for pid in ids[i::count] for r in by_payment[pid]] for i in range(count)]


class Campaign:
    def __init__(self, config: CampaignConfig, workdir: Path, report: CampaignReport) -> None:
        self.config = config
        self.workdir = workdir
        self.report = report
        self.rng = random.Random(config.seed)
        self.pg: OwnedPostgres | None = None
        self.broker: Broker | None = None
        self.proxy: TcpProxy | None = None
        self.portal: BlockingPortal | None = None
        self.fake: FakeProviderProcess | None = None
        self.adyen: AdyenFakeProcess | None = None
        self.relays: list[CampaignRelay] = []
        self.stopped: set[str] = set()
        self._phase_cycle: list[str] = []

    # -- helpers ---------------------------------------------------------------------------

    def log(self, message: str) -> None:
        if self.config.verbose:
            print(f"[campaign {time.strftime('%H:%M:%S')}] {message}", flush=True)

    @property
    def db_url(self) -> str:
        assert self.pg is not None
        return self.pg.url

    def scalar(self, sql: str, *params: object) -> Any:
        """One value; retried while the database restarts (the guard turns a hang into a
        failure)."""
        deadline = time.monotonic() + self.config.guard_seconds
        while True:
            try:
                with psycopg.connect(self.db_url, connect_timeout=5) as conn:
                    row = conn.execute(sql, params).fetchone()  # type: ignore[arg-type]
                return None if row is None else row[0]
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def terminal_count(self) -> int:
        return int(
            self.scalar(
                "SELECT count(*) FROM outbox.payment_intents WHERE status = ANY(%s)",
                list(TERMINAL),
            )
        )

    def unfinished(self) -> int:
        """Intents still on their way: pending, in flight, or blocked behind one of those.
        (Blocked behind a dead intent is waiting for an operator: the invariants report it,
        and waiting for it would only run into the hang guard.)"""
        return int(
            self.scalar(
                "SELECT count(*) FROM outbox.payment_intents i"
                " WHERE i.status IN ('pending', 'in_flight')"
                " OR (i.status = 'blocked' AND NOT EXISTS ("
                "   SELECT 1 FROM outbox.payment_intents d WHERE d.payment_id = i.payment_id"
                "   AND d.status = 'dead' AND d.payment_seq < i.payment_seq))"
            )
        )

    def wait(self, what: str, predicate: Callable[[], bool], guard: float) -> bool:
        deadline = time.monotonic() + guard
        while not predicate():
            if time.monotonic() > deadline:
                self.log(f"guard reached while waiting for: {what}")
                return False
            time.sleep(0.1)
        return True

    def wait_progress(self, terminal: int) -> bool:
        return self.wait("progress", lambda: self.terminal_count() >= terminal, 60)

    def insert(self, rows: list[Row]) -> None:
        """One wave in one transaction; retried if the database was away (an insert whose
        commit outcome is unknown is looked up, never inserted twice)."""
        deadline = time.monotonic() + self.config.guard_seconds
        marker = rows[0].payment_id
        while True:
            try:
                with psycopg.connect(self.db_url, connect_timeout=5) as conn, conn.cursor() as cur:
                    cur.executemany(
                        "INSERT INTO outbox.payment_intents (payment_id, action, provider,"
                        " amount_minor, currency, payment_method)"
                        " VALUES (%s, %s, %s, %s, %s, %s)",
                        [
                            (
                                r.payment_id,
                                r.action,
                                r.provider,
                                r.amount_minor,
                                r.currency,
                                r.payment_method,
                            )
                            for r in rows
                        ],
                    )
                break
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
                if self.scalar(
                    "SELECT count(*) FROM outbox.payment_intents WHERE payment_id = %s", marker
                ):
                    break
        self.report.inserted += len(rows)

    def check_relays(self) -> None:
        """A relay must never exit on its own: record it, and start it again."""
        for relay in self.relays:
            if relay.name in self.stopped or relay.running:
                continue
            code = relay.proc.returncode if relay.proc is not None else None
            self.report.unexpected_exits.append(f"{relay.name} exited with {code}")
            relay.start()

    # -- faults ----------------------------------------------------------------------------

    def running_relays(self) -> list[CampaignRelay]:
        return [r for r in self.relays if r.running and r.name not in self.stopped]

    def fault_kill(self) -> None:
        victim = self.rng.choice(self.running_relays())
        self.log(f"SIGKILL {victim.name}")
        victim.kill()
        time.sleep(self.rng.uniform(0.05, 0.5))
        victim.start()

    def fault_drain(self) -> None:
        victim = self.rng.choice(self.running_relays())
        victim.wait_ready()
        self.log(f"SIGTERM {victim.name}")
        code = victim.terminate(timeout=60)
        self.report.drain_exit_codes.append(code)
        victim.start()

    def _claims(self) -> dict[str, dict[int, int]]:
        held: dict[str, dict[int, int]] = defaultdict(dict)
        with psycopg.connect(self.db_url, connect_timeout=5) as conn:
            for intent_id, token, owner in conn.execute(
                "SELECT id, lease_token, claimed_by FROM outbox.payment_intents"
                " WHERE status = 'in_flight'"
            ):
                held[owner][intent_id] = token
        return held

    def fault_zombie(self) -> None:
        candidates = self.running_relays()
        # Wait (briefly) for a relay that holds claims: a zombie with none proves little.
        held: dict[str, dict[int, int]] = {}
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            held = self._claims()
            if any(held.get(r.instance) for r in candidates):
                break
            time.sleep(0.05)
        victim = max(candidates, key=lambda r: len(held.get(r.instance, {})))
        assert victim.proc is not None
        victim.proc.send_signal(signal.SIGSTOP)
        self.stopped.add(victim.name)
        # Claims can be taken between the snapshot and the stop: take it again now.
        mine = self._claims().get(victim.instance, {})
        self.log(f"SIGSTOP {victim.name} holding {len(mine)} claims")

        def moved() -> int:
            with psycopg.connect(self.db_url, connect_timeout=5) as conn:
                rows = conn.execute(
                    "SELECT id, lease_token, status FROM outbox.payment_intents WHERE id = ANY(%s)",
                    (list(mine),),
                ).fetchall()
            return sum(1 for i, token, status in rows if status != "in_flight" or token != mine[i])

        stopped_at = time.monotonic()
        stopped_db = self.scalar("SELECT clock_timestamp()")
        stalled = False
        if mine:
            # Past its lease: the other relays' reapers requeue its claims and re-claim them.
            # Not all of them if it was paused inside a write-back transaction: its row locks
            # hold until it resumes (docs/reliability.md, "Known limits").
            stalled = not self.wait(
                f"{victim.name}'s claims re-claimed",
                lambda: moved() == len(mine),
                guard=self.config.lease_seconds * 3 + 15,
            )
        # Never less than a lease and a bit, so it is a zombie even with nothing held.
        rest = self.config.lease_seconds * 1.5 - (time.monotonic() - stopped_at)
        if rest > 0:
            time.sleep(rest)
        with psycopg.connect(self.db_url, connect_timeout=5) as conn:
            open_queries = [
                " ".join(str(query).split())[:70]
                for (query,) in conn.execute(
                    "SELECT query FROM pg_stat_activity"
                    " WHERE application_name = %s AND xact_start IS NOT NULL",
                    (victim.instance,),
                )
            ]
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
            ).fetchone()
        open_transactions, lock_waiters = len(open_queries), int(row[0]) if row else 0
        if open_queries:
            self.log(f"{victim.name} was stopped inside a transaction: {open_queries}")
        # Taken over: another relay's audit rows on the intent since the stop (a reaper's
        # requeue, a claim, an outcome). The zombie's own write-backs must now be fenced.
        with psycopg.connect(self.db_url, connect_timeout=5) as conn:
            reclaimed = {
                int(row[0])
                for row in conn.execute(
                    "SELECT DISTINCT entity_id FROM outbox.audit_log WHERE entity = 'intent'"
                    " AND entity_id = ANY(%s) AND actor <> %s AND at > %s",
                    ([str(i) for i in mine], f"relay:{victim.instance}", stopped_db),
                )
            }
        offset = victim.log_path.stat().st_size
        victim.proc.send_signal(signal.SIGCONT)
        self.stopped.discard(victim.name)
        self.log(f"SIGCONT {victim.name}: {len(reclaimed)}/{len(mine)} claims were taken over")
        fenced: set[int] = set()

        def all_fenced() -> bool:
            fenced.update(_lease_lost_ids(victim.log_path, offset))
            return reclaimed <= fenced

        # Count-based: the zombie finishes its calls and tries to write each outcome back.
        self.wait(
            f"{victim.name}'s write-backs fenced", all_fenced, self.config.lease_seconds * 2 + 30
        )
        self.report.zombies.append(
            Zombie(
                victim.name,
                mine,
                reclaimed,
                fenced & reclaimed,
                offset,
                stalled,
                open_transactions,
                lock_waiters,
            )
        )

    def fault_pg(self) -> None:
        assert self.pg is not None
        self.log("PostgreSQL immediate stop")
        self.pg.restart(down_seconds=self.rng.uniform(0.3, 3.0))
        self.wait("database back", lambda: self.scalar("SELECT 1") == 1, guard=120)
        self.log("PostgreSQL started")

    def fault_broker(self) -> None:
        assert self.portal is not None and self.proxy is not None
        before = self.terminal_count()
        self.portal.call(self.proxy.cut)
        self.log("AMQP path cut")
        # Outcomes keep being written while the broker is unreachable: hold the cut until
        # some have been (count-based), within a guard.
        target = before + min(self.rng.randint(10, 40), self.unfinished())
        self.wait("outcomes written while cut", lambda: self.terminal_count() >= target, 30)
        self.portal.call(self.proxy.restore)
        self.log("AMQP path restored")

    def next_phase(self) -> str:
        if not self._phase_cycle:
            self._phase_cycle = [p for p in PROVIDER_PHASES if p != "mixed"] + ["mixed"]
            self.rng.shuffle(self._phase_cycle)
        return self._phase_cycle.pop()

    def set_phase(self, phase: str) -> None:
        assert self.fake is not None
        self.fake.configure(self._fault_config(phase))
        if self.adyen is not None:
            self.adyen.configure(self._adyen_fault_config(phase))
        self.report.provider_phases.append(phase)

    def _adyen_fault_config(self, phase: str) -> dict[str, Any]:
        """The phase for the fake Adyen: its switch for each class (every switch set, so
        the previous phase's rates end), and no 500 after the effect (module docstring)."""
        rates = PROVIDER_PHASES[phase]
        return {
            "latency_ms": 10,
            "seed": self.rng.randrange(1 << 30),
            **{adyen: rates.get(ours, 0.0) for ours, adyen in _ADYEN_FAULTS.items()},
        }

    def _fault_config(self, phase: str) -> dict[str, Any]:
        return {
            "latency_ms": 10,
            "latency_jitter_ms": 20,
            "timeout_seconds": 2.0,
            "seed": self.rng.randrange(1 << 30),
            **PROVIDER_PHASES[phase],
        }

    def fault_provider(self) -> None:
        phase = self.next_phase()
        self.log(f"provider phase {phase}")
        self.set_phase(phase)

    # -- the run ---------------------------------------------------------------------------

    def relay_env(self, amqp_url: str) -> dict[str, str]:
        assert self.fake is not None and self.broker is not None
        c = self.config
        return {
            "RELAY_DATABASE_URL": self.db_url,
            "RELAY_PROVIDERS__STRIPE__API_KEY": "sk_test_fault_campaign",
            "RELAY_PROVIDERS__STRIPE__BASE_URL": self.fake.url,
            "RELAY_PROVIDERS__STRIPE__TIMEOUT_MS": "1000",
            "RELAY_PROVIDERS__STRIPE__CONNECT_TIMEOUT_MS": "500",
            "RELAY_PROVIDERS__STRIPE__CONCURRENCY": "16",
            # A breaker that opens is fine (it is one more fault); one that stays open for
            # the default 30 s would only slow the campaign down.
            "RELAY_PROVIDERS__STRIPE__BREAKER_FAILURE_THRESHOLD": "10",
            "RELAY_PROVIDERS__STRIPE__BREAKER_COOLDOWN_SECONDS": "1",
            **(
                {
                    "RELAY_PROVIDERS__ADYEN__KIND": "adyen",
                    "RELAY_PROVIDERS__ADYEN__API_KEY": ADYEN_API_KEY,
                    "RELAY_PROVIDERS__ADYEN__MERCHANT_ACCOUNT": ADYEN_MERCHANT,
                    "RELAY_PROVIDERS__ADYEN__BASE_URL": self.adyen.url,
                    "RELAY_PROVIDERS__ADYEN__TIMEOUT_MS": "1000",
                    "RELAY_PROVIDERS__ADYEN__CONNECT_TIMEOUT_MS": "500",
                    "RELAY_PROVIDERS__ADYEN__CONCURRENCY": "16",
                    "RELAY_PROVIDERS__ADYEN__BREAKER_FAILURE_THRESHOLD": "10",
                    "RELAY_PROVIDERS__ADYEN__BREAKER_COOLDOWN_SECONDS": "1",
                }
                if self.adyen is not None
                else {}
            ),
            "RELAY_LEASE_SECONDS": f"{c.lease_seconds:g}",
            "RELAY_MAX_ATTEMPTS": str(c.max_attempts),
            "RELAY_BACKOFF_BASE_SECONDS": "0.05",
            "RELAY_BACKOFF_CAP_SECONDS": "1",
            "RELAY_POLL_INTERVAL_SECONDS": "0.1",
            "RELAY_POLL_MAX_INTERVAL_SECONDS": "0.5",
            "RELAY_SHUTDOWN_GRACE_SECONDS": "5",
            "RELAY_DB_POOL_SIZE": "4",
            "RELAY_AMQP_URL": amqp_url,
            "RELAY_EVENTS_EXCHANGE": self.broker.exchange,
            "RELAY_PUBLISH_TIMEOUT_SECONDS": f"{min(2.0, c.lease_seconds / 2):g}",
            "RELAY_PUBLISH_WINDOW": "50",
            "RELAY_AMQP_RECONNECT_BASE_SECONDS": "0.1",
            "RELAY_AMQP_RECONNECT_CAP_SECONDS": "1",
            "RELAY_LOG_FORMAT": "json",
        }

    def run(self) -> None:
        c = self.config
        started = time.monotonic()
        tag = uuid.uuid4().hex[:10]
        with contextlib.ExitStack() as stack:
            self.pg = OwnedPostgres()
            stack.callback(self.pg.cleanup)
            migrate(self.db_url)
            self.broker = Broker(c.amqp_url, tag)
            self.broker.create_vhost()
            stack.callback(self.broker.delete_vhost)
            self.portal = portal = stack.enter_context(start_blocking_portal())
            # Cancel the consumer and the proxy (they serve forever) before the vhost goes.
            stack.callback(lambda: portal.call(portal.stop, True))
            self.portal.start_task(self.broker.consume)
            self.proxy = TcpProxy(self.broker.url)
            self.portal.start_task(self.proxy.serve)
            self.fake = FakeProviderProcess(self.workdir, "--seed", str(c.seed))
            stack.callback(self.fake.stop)
            if c.adyen_payments:
                # Adyen's notifications go to a receiver process; each is delivered twice,
                # out of order, and retried by the fake until a 2xx (PostgreSQL restarts).
                receiver = WebhookReceiverProcess(self.workdir, self.db_url, [HMAC_KEY_HEX])
                stack.callback(receiver.stop)
                self.adyen = AdyenFakeProcess(
                    self.workdir, "--seed", str(c.seed), "--webhook-url", receiver.adyen_url,
                    "--webhook-delay-ms", "50", "--webhook-duplicate", "--webhook-reorder",
                )  # fmt: skip
                stack.callback(self.adyen.stop)
            self.set_phase("mixed")
            env = self.relay_env(self.proxy.url)
            self.relays = [
                CampaignRelay(f"campaign-relay-{n}", env, self.workdir) for n in range(c.relays)
            ]
            stack.callback(self._kill_all)
            for relay in self.relays:
                relay.start()
            for relay in self.relays:
                relay.wait_ready()

            cycle = 0
            while True:
                self.run_cycle(cycle)
                cycle += 1
                if not c.minutes or time.monotonic() - started >= c.minutes * 60:
                    break
            self.finish()
            self.check()
            self.report.elapsed_seconds = time.monotonic() - started

    def _kill_all(self) -> None:
        for relay in self.relays:
            if relay.proc is not None and relay.name in self.stopped:
                relay.proc.send_signal(signal.SIGCONT)
            relay.kill()

    def run_cycle(self, cycle: int) -> None:
        c = self.config
        rows = build_workload(c.payments, self.rng, f"campaign-c{cycle}")
        rows += build_adyen_workload(c.adyen_payments, self.rng, f"campaign-c{cycle}-adyen")
        waves = _waves(rows, c.waves or c.rounds)
        schedule = _schedule(self.rng, c.rounds)
        every = max(1, c.rounds // len(waves))
        step = max(5, len(rows) // (c.rounds + len(waves)))
        self.log(f"cycle {cycle}: {len(rows)} intents, {len(waves)} waves, faults {schedule}")
        for number, kind in enumerate(schedule):
            if waves and number % every == 0:
                self.insert(waves.pop(0))
            self.check_relays()
            before = self.terminal_count()
            getattr(self, f"fault_{kind}")()
            self.report.faults[kind] += 1
            # Let the system work between faults: a number of outcomes, not seconds.
            if not self.wait_progress(before + min(step, self.unfinished())):
                self.report.slow_rounds += 1
        for wave in waves:
            self.insert(wave)

    def finish(self) -> None:
        assert self.broker is not None and self.portal is not None and self.proxy is not None
        c = self.config
        self.portal.call(self.proxy.restore)
        self.check_relays()
        self.log("settling")
        settled = self.wait(
            "every intent terminal", lambda: self.unfinished() == 0, c.guard_seconds
        )
        total = int(self.scalar("SELECT count(*) FROM outbox.events"))

        def delivered() -> bool:
            pending = self.scalar("SELECT count(*) FROM outbox.events WHERE status <> 'published'")
            return pending == 0 and len(self.broker.unique()) >= total  # type: ignore[union-attr]

        published = self.wait("every event delivered", delivered, c.guard_seconds)
        if self.adyen is not None:
            adyen = self.adyen

            def inbox_settled() -> bool:
                notes = adyen.notifications()
                waiting = self.scalar(
                    "SELECT count(*) FROM outbox.webhook_inbox WHERE status = 'received'"
                )
                return all(int(n.get("_delivered", 0)) >= 2 for n in notes) and waiting == 0  # type: ignore[call-overload]

            if not self.wait(
                "every Adyen notification delivered twice and applied",
                inbox_settled,
                c.guard_seconds,
            ):
                self.report.checks.append(
                    ("Adyen notifications delivered within the hang guard", "not all")
                )
        self.check_relays()
        for relay in self.relays:
            relay.wait_ready()
        self.report.final_exit_codes = [relay.terminate(timeout=60) for relay in self.relays]
        if not settled:
            self.report.checks.append(("settle within the hang guard", "intents left unfinished"))
        if not published:
            self.report.checks.append(("events delivered within the hang guard", "not all"))

    # -- invariants ------------------------------------------------------------------------

    def _check(self, name: str, check: Callable[[], None]) -> None:
        try:
            check()
        except AssertionError as exc:
            detail = str(exc).strip().splitlines()
            self.report.checks.append((name, " | ".join(detail[:6]) or "assertion failed"))
        else:
            self.report.checks.append((name, None))

    def check(self) -> None:
        assert self.fake is not None
        report = self.report
        effects = self.fake.effects()
        report.provider_faults = dict(effects["faults_injected"])  # type: ignore[call-overload]
        if self.adyen is not None:
            effects = self._with_adyen_effects(effects, self.adyen.effects())
        with psycopg.connect(self.db_url) as conn:
            report.by_provider = Counter(
                {
                    (provider, status): n
                    for provider, status, n in conn.execute(
                        "SELECT provider, status, count(*) FROM outbox.payment_intents"
                        " GROUP BY provider, status"
                        " UNION ALL SELECT provider, 'redriven', count(*)"
                        " FROM outbox.payment_intents WHERE attempts > 1 GROUP BY provider"
                    ).fetchall()
                }
            )
            report.outcomes = Counter(
                dict(
                    conn.execute(
                        "SELECT status, count(*) FROM outbox.payment_intents GROUP BY status"
                    ).fetchall()
                )
            )
            report.redriven = conn.execute(
                "SELECT count(*) FROM outbox.payment_intents WHERE attempts > 1"
            ).fetchone()[0]  # type: ignore[index]
        self._count_fenced()

        self._check("no relay exited on its own", self._relays_never_crashed)
        self._check("SIGTERM drains and exits 0 (under load and at the end)", self._drains_exit_0)
        self._check(
            "nothing lost, all terminal, one effect per succeeded intent, none for "
            "failed/dead, no key with two effects, payment amounts = sums",
            lambda: assert_exactly_once(self.db_url, effects, expected_intents=report.inserted),
        )
        self._check("ledger balanced, one posting per succeeded intent", self._ledger)
        self._check("audit chain verified", lambda: assert_audit_intact(self.db_url))
        self._check("one result event per terminal intent", self._one_event_per_intent)
        self._check(
            "events complete: delivered set (dedup by message_id) = outbox.events, "
            "in per-payment order",
            self._events_complete,
        )
        self._check("zombies were fenced (their write-backs refused)", self._zombies_fenced)
        self._check("every fault kind and provider fault class happened", self._coverage)
        if self.adyen is not None:
            self._check("both providers served side by side", self._both_providers)
            self._check(
                "Adyen's captures, cancels and refunds each finished once by their webhook "
                "(delivered twice, out of order); none left awaiting; each stored once",
                self._adyen_confirmed_once,
            )

    def _with_adyen_effects(self, stripe: dict[str, Any], adyen: dict[str, Any]) -> dict[str, Any]:
        """One effects document for both fakes, keyed by the intents' own keys (the Adyen
        fake counts the Idempotency-Key as sent: a key over 64 characters is hashed)."""
        with psycopg.connect(self.db_url) as conn:
            keys = [
                key
                for (key,) in conn.execute(
                    "SELECT idempotency_key FROM outbox.payment_intents WHERE provider = 'adyen'"
                ).fetchall()
            ]
        ours = {adyen_idempotency_key(key): key for key in keys}
        by_key = dict(stripe["effects_by_key"])
        for sent, entry in adyen["effects_by_key"].items():
            key = ours.get(sent, f"adyen:{sent}")  # an effect of no intent of ours still counts
            assert key not in by_key, f"key {key} has effects at both providers"
            by_key[key] = entry
        return {**stripe, "effects_by_key": by_key}

    def _adyen_confirmed_once(self) -> None:
        assert self.adyen is not None
        notes = self.adyen.notifications()
        unique = {(n["pspReference"], n["eventCode"], n["success"]) for n in notes}
        report = self.report
        report.adyen_notifications = len(notes)
        report.adyen_deliveries = sum(int(n.get("_delivered", 0)) for n in notes)  # type: ignore[call-overload]
        with psycopg.connect(self.db_url) as conn:
            inbox = conn.execute(
                "SELECT count(*), count(*) FILTER (WHERE status = 'received')"
                " FROM outbox.webhook_inbox WHERE provider = 'adyen'"
            ).fetchone()
            awaiting = conn.execute(
                "SELECT (SELECT count(*) FROM outbox.payment_intents"
                "        WHERE status = 'awaiting_confirmation'),"
                "       (SELECT count(*) FROM outbox.payments WHERE awaiting_action IS NOT NULL)"
            ).fetchone()
            # Every modification Adyen accepted names its pspReference; its confirmation
            # (or failure) is one applied inbox row with that reference.
            accepted = conn.execute(
                """
                SELECT i.id, i.status, count(w.id) FILTER (WHERE w.status = 'applied')
                FROM outbox.payment_intents AS i
                LEFT JOIN outbox.webhook_inbox AS w
                  ON w.provider = 'adyen' AND w.payment_id = i.payment_id
                 AND w.event_type <> 'AUTHORISATION'
                 AND w.payload #>> '{notificationItems,0,NotificationRequestItem,pspReference}'
                     = i.provider_reference
                WHERE i.provider = 'adyen' AND i.action IN ('capture', 'void', 'refund')
                  AND i.provider_reference IS NOT NULL
                GROUP BY i.id, i.status
                """
            ).fetchall()
        assert inbox is not None and awaiting is not None
        report.adyen_inbox_rows = inbox[0]
        report.adyen_confirmed = sum(1 for _, _, applied in accepted if applied == 1)
        assert awaiting == (0, 0), f"awaiting a confirmation: intents, payments {awaiting}"
        assert inbox == (len(unique), 0), (
            f"inbox rows (all, unapplied) {inbox}; {len(unique)} distinct notifications"
        )
        wrong = [(i, status, n) for i, status, n in accepted if n != 1 or status == "dead"]
        assert not wrong, f"(intent, status, applied confirmations) {wrong[:10]}"
        assert report.adyen_confirmed > 0, "no Adyen modification was confirmed by webhook"

    def _both_providers(self) -> None:
        served = {
            provider
            for (provider, status), n in self.report.by_provider.items()
            if status == "succeeded" and n
        }
        assert served >= {"stripe", "adyen"}, f"succeeded intents only for {sorted(served)}"

    def _ledger(self) -> None:
        assert_ledger_balanced(self.db_url)

    def _relays_never_crashed(self) -> None:
        assert self.report.unexpected_exits == [], self.report.unexpected_exits

    def _drains_exit_0(self) -> None:
        codes = self.report.drain_exit_codes + self.report.final_exit_codes
        assert codes and all(code == 0 for code in codes), f"exit codes {codes}"

    def _one_event_per_intent(self) -> None:
        with psycopg.connect(self.db_url) as conn:
            rows = conn.execute(
                "SELECT i.id, i.status, count(e.id), array_agg(e.payload #>> '{intent,status}')"
                " FROM outbox.payment_intents i LEFT JOIN outbox.events e"
                "   ON (e.payload #>> '{intent,id}')::bigint = i.id"
                " GROUP BY i.id, i.status"
            ).fetchall()
        wrong = [r for r in rows if r[2] != 1 or r[3] != [r[1]]]
        assert wrong == [], f"{len(wrong)} intents without exactly one matching event: {wrong[:5]}"

    def _events_complete(self) -> None:
        assert self.broker is not None
        with psycopg.connect(self.db_url) as conn:
            events = {
                row[0]: row[1:]
                for row in conn.execute(
                    "SELECT event_id::text, ordering_key, seq, status FROM outbox.events"
                )
            }
            intents = conn.execute(
                "SELECT payment_id, id FROM outbox.payment_intents ORDER BY payment_id, payment_seq"
            ).fetchall()
        unique = self.broker.unique()
        self.report.events = len(events)
        self.report.delivered = len(self.broker.received)
        self.report.unique_delivered = len(unique)
        assert {row[2] for row in events.values()} == {"published"}, "every event published"
        missing = set(events) - set(unique)
        unknown = set(unique) - set(events)
        assert not missing and not unknown, (
            f"{len(missing)} events never delivered (e.g. {sorted(missing)[:3]}), "
            f"{len(unknown)} unknown messages delivered"
        )
        # Per payment, after dedup, first occurrences come in sequence order 1, 2, 3...
        seqs: dict[str, list[int]] = defaultdict(list)
        arrived: dict[str, list[int]] = defaultdict(list)
        for message_id, delivery in unique.items():
            key, seq, _ = events[message_id]
            assert delivery.ordering_key == key and delivery.sequence == seq, (
                f"headers of {message_id} disagree with the table: "
                f"{delivery.ordering_key}/{delivery.sequence} vs {key}/{seq}"
            )
            seqs[key].append(seq)
            arrived[delivery.body["payment_id"]].append(int(delivery.body["intent"]["id"]))
        disorder = {k: s for k, s in seqs.items() if s != list(range(1, len(s) + 1))}
        assert disorder == {}, f"out of order: {list(disorder.items())[:3]}"
        expected: dict[str, list[int]] = defaultdict(list)
        for payment_id, intent_id in intents:
            expected[payment_id].append(intent_id)
        wrong = [p for p in expected if arrived.get(p) != expected[p]]
        assert wrong == [], (
            f"{len(wrong)} payments' outcomes arrived in another order than their intents: "
            f"{[(p, arrived.get(p), expected[p]) for p in wrong[:3]]}"
        )

    def _count_fenced(self) -> None:
        report = self.report
        report.fenced_by_zombies = sum(len(z.fenced) for z in report.zombies)
        for relay in self.relays:
            if not relay.log_path.exists():
                continue
            with relay.log_path.open("rb") as log:
                for raw in log:
                    if b"lease_lost" not in raw:
                        continue
                    with contextlib.suppress(ValueError):
                        event = json.loads(raw).get("event")
                        report.fenced_write_backs += event == "lease_lost"
                        report.fenced_event_marks += event == "event_lease_lost"

    def _zombies_fenced(self) -> None:
        zombies = self.report.zombies
        assert sum(len(z.reclaimed) for z in zombies) > 0 or not zombies, (
            "no zombie held a claim that another relay took over: the fault proved nothing"
        )
        unfenced = {z.relay: sorted(z.reclaimed - z.fenced)[:5] for z in zombies}
        assert all(z.fenced == z.reclaimed for z in zombies), (
            f"claims taken over from a stopped relay whose write-back was not fenced: {unfenced}"
        )

    def _coverage(self) -> None:
        faults = self.report.faults
        rounds = self.config.rounds
        expected = [k for k in FAULT_KINDS if rounds >= len(FAULT_KINDS) or faults[k]]
        assert all(faults[k] > 0 for k in expected), f"faults {dict(faults)}"
        missing = [k for k in PROVIDER_CLASSES if not self.report.provider_faults.get(k)]
        assert missing == [], f"provider fault classes never injected: {missing}"


def run_campaign(config: CampaignConfig) -> CampaignReport:
    """Run one campaign; the report holds the summary and each invariant's result."""
    report = CampaignReport(config)
    owned = config.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="fault-campaign-")) if owned else config.workdir
    assert workdir is not None
    workdir.mkdir(parents=True, exist_ok=True)
    report.log_dir = workdir
    try:
        Campaign(config, workdir, report).run()
    finally:
        if owned and not config.keep_logs and not report.failures:
            shutil.rmtree(workdir, ignore_errors=True)
            report.log_dir = None
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.fault_campaign",
        description=(
            "Run the relay's fault campaign: relays SIGKILLed, zombies SIGSTOPped past their "
            "lease, PostgreSQL restarted, the RabbitMQ path cut, every provider fault class, "
            "Stripe and Adyen side by side; "
            "then check every invariant and print a summary. Needs pgserver (the campaign "
            "restarts its own PostgreSQL) and RabbitMQ (RELAY_TEST_AMQP_URL)."
        ),
    )
    defaults = CampaignConfig()
    parser.add_argument("--seed", type=int, default=defaults.seed, help="schedule and workload")
    parser.add_argument(
        "--rounds", type=int, default=defaults.rounds, help="faults per cycle (default %(default)s)"
    )
    parser.add_argument(
        "--payments",
        type=int,
        default=defaults.payments,
        help="payments per cycle, ~2.3 intents each (default %(default)s)",
    )
    parser.add_argument(
        "--adyen-payments",
        type=int,
        default=defaults.adyen_payments,
        help="Adyen payments per cycle beside Stripe's, ~2.3 intents each; 0: Stripe only "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--minutes",
        type=float,
        default=0.0,
        help="repeat cycles, each with a fresh workload, until this many minutes have run",
    )
    parser.add_argument("--relays", type=int, default=defaults.relays, help="relay processes")
    parser.add_argument(
        "--lease-seconds", type=float, default=defaults.lease_seconds, help="RELAY_LEASE_SECONDS"
    )
    parser.add_argument("--amqp-url", default=defaults.amqp_url, help="the real RabbitMQ")
    parser.add_argument("--workdir", type=Path, help="keep logs here (default: a temp dir)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    args = parser.parse_args(argv)
    config = CampaignConfig(
        seed=args.seed,
        rounds=args.rounds,
        payments=args.payments,
        adyen_payments=args.adyen_payments,
        minutes=args.minutes,
        relays=args.relays,
        lease_seconds=args.lease_seconds,
        amqp_url=args.amqp_url,
        workdir=args.workdir,
        keep_logs=args.workdir is not None,
        verbose=not args.quiet,
    )
    report = run_campaign(config)
    print(report.summary())
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
