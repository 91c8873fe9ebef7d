"""Crash test with Adyen: real relay processes SIGKILLed at random while the fake Adyen
(a real process) answers modifications ``received`` and confirms them by signed webhooks,
delivered twice and out of order to a real receiver process, which is killed once too.

Then: every intent is terminal, every succeeded intent has exactly one effect at the fake
and no key has two, no intent was sent again after Adyen accepted it, every notification
is applied (duplicates stored once), nothing awaits a confirmation any more, and the
payments' amounts equal their ledger. Every pspReference is 16 digits that pass the Luhn
check (``--luhn-psp``).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from provider_adapters.fake.adyen import API_KEY, HMAC_KEY_HEX, MERCHANT_ACCOUNT
from tests.invariants import assert_exactly_once, assert_ledger_balanced, unfinished
from tests.processes import RelayProcess, free_port
from tests.support.cli import BASE_ENV
from tests.support.intents import insert_intents
from tests.support.waiting import block_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RELAYS = 2
PAYMENTS = 120
MIN_KILLS = 10
MIN_CHAOS_SECONDS = 12.0


class _Process:
    """A long-running child process logging to ``log_path``, ready when ``ready`` is logged."""

    def __init__(self, argv: list[str], env: dict[str, str], log_path: Path, ready: bytes) -> None:
        self.argv, self.env, self.log_path, self.ready = argv, env, log_path, ready
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, env=self.env, stdout=log, stderr=log)

        def up() -> bool:
            if self.ready in self.log_path.read_bytes()[offset:]:
                return True
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"{self.argv[:4]} exited at start; see {self.log_path}")
            return False

        block_until(up, f"{self.log_path.name} ready", guard_seconds=60)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def workload(rng: random.Random) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for n in range(PAYMENTS):
        pid = f"ady-crash-{n}"
        amount = rng.randrange(500, 5000)
        base = {"payment_id": pid, "provider": "adyen", "currency": "EUR"}
        kind = n % 4
        if kind == 0:
            steps = [("authorize", amount), ("capture", amount), ("refund", amount // 3)]
        elif kind == 1:
            steps = [("authorize", amount), ("void", None)]
        elif kind == 2:
            steps = [("charge", amount), ("refund", amount // 2), ("refund", None)]
        else:
            steps = [("authorize", amount), ("capture", amount // 2)]
        for action, value in steps:
            row = {**base, "action": action, "amount_minor": value}
            if action in ("authorize", "charge"):
                row["payment_method"] = "stored_visa"
            rows.append(row)
    return rows


def test_sigkilled_relays_with_adyen_confirm_every_intent_once(db_url: str, tmp_path: Path) -> None:
    rng = random.Random(int(os.environ.get("RELAY_TEST_SEED", "20261207")))
    rows = workload(rng)
    receiver_port, fake_port = free_port(), free_port()
    receiver_url = f"http://127.0.0.1:{receiver_port}/webhooks/adyen"
    fake_url = f"http://127.0.0.1:{fake_port}"
    fake = _Process(
        [
            sys.executable, "-m", "provider_adapters.fake.adyen", "--port", str(fake_port),
            "--seed", "7", "--latency-ms", "10", "--rate-429", "0.03", "--rate-503", "0.03",
            "--rate-drop-after-effect", "0.03", "--rate-500-after-effect", "0.02",
            "--webhook-url", receiver_url, "--webhook-delay-ms", "100",
            "--webhook-duplicate", "--webhook-reorder", "--luhn-psp",
        ],
        {**BASE_ENV},
        tmp_path / "fake-adyen.log",
        b"fake Adyen listening",
    )  # fmt: skip
    receiver = _Process(
        [
            sys.executable, "-m", "relay", "webhooks", "serve",
            "--host", "127.0.0.1", "--port", str(receiver_port),
        ],
        {
            **BASE_ENV,
            "RELAY_DATABASE_URL": db_url,
            "RELAY_WEBHOOKS__ADYEN__KIND": "adyen",
            "RELAY_WEBHOOKS__ADYEN__SECRETS": json.dumps([HMAC_KEY_HEX]),
            "RELAY_LOG_FORMAT": "json",
        },
        tmp_path / "receiver.log",
        b"webhooks_listening",
    )  # fmt: skip
    env = {
        "RELAY_DATABASE_URL": db_url,
        "RELAY_PROVIDERS__ADYEN__KIND": "adyen",
        "RELAY_PROVIDERS__ADYEN__BASE_URL": fake_url,
        "RELAY_PROVIDERS__ADYEN__API_KEY": API_KEY,
        "RELAY_PROVIDERS__ADYEN__MERCHANT_ACCOUNT": MERCHANT_ACCOUNT,
        "RELAY_PROVIDERS__ADYEN__TIMEOUT_MS": "1000",
        "RELAY_PROVIDERS__ADYEN__CONNECT_TIMEOUT_MS": "500",
        "RELAY_LEASE_SECONDS": "6",
        "RELAY_MAX_ATTEMPTS": "25",
        "RELAY_BACKOFF_BASE_SECONDS": "0.05",
        "RELAY_BACKOFF_CAP_SECONDS": "1",
        "RELAY_POLL_INTERVAL_SECONDS": "0.1",
        "RELAY_POLL_MAX_INTERVAL_SECONDS": "0.5",
        "RELAY_SHUTDOWN_GRACE_SECONDS": "5",
        "RELAY_LOG_FORMAT": "json",
    }
    relays = [
        RelayProcess(f"adyen-crash-{n}", {**BASE_ENV, **env}, tmp_path) for n in range(RELAYS)
    ]
    halves = [rows[: len(rows) // 2], rows[len(rows) // 2 :]]
    try:
        for relay in relays:
            relay.start()
        started = time.monotonic()
        insert_intents(db_url, halves.pop(0))
        kills, receiver_killed = 0, False
        while (
            time.monotonic() - started < MIN_CHAOS_SECONDS or kills < MIN_KILLS
        ) and time.monotonic() - started < MIN_CHAOS_SECONDS * 20:
            if halves and time.monotonic() - started > MIN_CHAOS_SECONDS / 3:
                insert_intents(db_url, halves.pop(0))
            if not receiver_killed and time.monotonic() - started > MIN_CHAOS_SECONDS / 2:
                receiver.kill()  # Adyen retries until a 2xx
                time.sleep(0.5)
                receiver.start()
                receiver_killed = True
            victim = rng.choice(relays)
            victim.kill()
            kills += 1
            time.sleep(rng.uniform(0.05, 0.5))
            victim.start()
            time.sleep(rng.uniform(0.2, 0.9))
        for half in halves:
            insert_intents(db_url, half)
        for relay in relays:
            if not relay.running:
                relay.start()
        try:
            block_until(lambda: unfinished(db_url) == 0, "every intent finished", every=0.5)
        except pytest.fail.Exception:
            with psycopg.connect(db_url) as conn:
                stuck = conn.execute(
                    "SELECT id, payment_id, action, status, attempts, error_code, provider_reference"
                    " FROM outbox.payment_intents WHERE status NOT IN ('succeeded', 'failed')"
                    " ORDER BY id LIMIT 10"
                ).fetchall()
                waiting = conn.execute(
                    "SELECT event_id, status, attempts, result, last_error FROM outbox.webhook_inbox"
                    " WHERE status = 'received' OR result LIKE '%%no intent%%' LIMIT 10"
                ).fetchall()
            pytest.fail(f"stuck intents {stuck}; notifications {waiting}")

        def inbox_settled() -> bool:
            notes = httpx.get(f"{fake_url}/_fake/webhooks", timeout=30).json()["notifications"]
            with psycopg.connect(db_url) as conn:
                waiting = conn.execute(
                    "SELECT count(*) FROM outbox.webhook_inbox WHERE status = 'received'"
                ).fetchone()
            return all(n.get("_delivered", 0) >= 2 for n in notes) and waiting == (0,)

        block_until(inbox_settled, "every notification delivered twice and applied", every=0.5)
        effects = httpx.get(f"{fake_url}/_fake/effects", timeout=30).json()
        notes = httpx.get(f"{fake_url}/_fake/webhooks", timeout=30).json()["notifications"]
        for relay in relays:
            relay.wait_ready()
        for relay in relays:
            relay.terminate()
    finally:
        for relay in relays:
            relay.kill()
        receiver.stop()
        fake.stop()
    assert kills >= MIN_KILLS
    assert_exactly_once(db_url, effects, expected_intents=len(rows))
    with psycopg.connect(db_url) as conn:
        statuses = dict(
            conn.execute(
                "SELECT status, count(*) FROM outbox.payment_intents GROUP BY status"
            ).fetchall()
        )
        modifications_resent = conn.execute(
            "SELECT count(*) FROM outbox.payment_intents"
            " WHERE action IN ('capture', 'void', 'refund') AND status = 'succeeded'"
            "   AND provider_reference IS NULL"
        ).fetchone()
        awaiting = conn.execute(
            "SELECT count(*) FROM outbox.payments WHERE awaiting_action IS NOT NULL"
        ).fetchone()
        inbox = conn.execute(
            "SELECT count(*), count(*) FILTER (WHERE status = 'applied') FROM outbox.webhook_inbox"
        ).fetchone()
    assert statuses == {"succeeded": len(rows)}, statuses
    assert modifications_resent == (0,), "every modification names what Adyen accepted"
    assert awaiting == (0,), "nothing awaits a confirmation any more"
    unique = {(n["pspReference"], n["eventCode"], n["success"]) for n in notes}
    assert inbox == (len(unique), len(unique)), "each notification stored once and applied"
    assert_ledger_balanced(db_url)
