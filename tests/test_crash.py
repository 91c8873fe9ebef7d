"""Crash test: real relay processes SIGKILLed at random while a faulty provider answers.

Three or more relays and the fake provider run as OS processes; intents arrive in waves
while relays are killed with SIGKILL at random for at least 20 s and restarted. Then:
every intent is terminal, every succeeded intent has exactly one effect at the provider,
no key has more than one, no failed or dead intent has any, and every payment's amounts
equal the sums of its succeeded intents.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from relay.cli.demo import build_workload
from tests.invariants import (
    assert_audit_intact,
    assert_exactly_once,
    assert_ledger_balanced,
    unfinished,
)
from tests.invariants import intents as all_intents
from tests.processes import FakeProviderProcess, RelayProcess
from tests.support.intents import insert_workload
from tests.support.waiting import block_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RELAYS = 3
PAYMENTS = 900
# What the crash test must cover (issue 2), whatever RELAY_TEST_SEED is: the workload adds
# payments past PAYMENTS until it has MIN_INTENTS intents.
MIN_INTENTS = 2000
MIN_PAYMENTS = 500
MIN_CHAOS_SECONDS = 20.0


def chaos_seconds(environ: Mapping[str, str]) -> float:
    """RELAY_TEST_CHAOS_SECONDS (default 22), never below the 20 s of chaos required: a
    shorter run would pass without testing what the test claims."""
    seconds = float(environ.get("RELAY_TEST_CHAOS_SECONDS", "22"))
    return seconds if seconds >= MIN_CHAOS_SECONDS else MIN_CHAOS_SECONDS  # nan too


CHAOS_SECONDS = chaos_seconds(os.environ)
# The chaos goes on until both hold: a loaded machine makes each round slower, and the
# test is about the kills, so it counts them instead of trusting the clock.
MIN_KILLS = 15


def test_sigkilled_relays_lose_nothing_and_duplicate_nothing(db_url: str, tmp_path: Path) -> None:
    rng = random.Random(int(os.environ.get("RELAY_TEST_SEED", "20261125")))
    rows = build_workload(PAYMENTS, rng, "crash", min_intents=MIN_INTENTS)
    assert len(rows) >= MIN_INTENTS and len({r.payment_id for r in rows}) >= MIN_PAYMENTS

    fake = FakeProviderProcess(
        tmp_path,
        "--seed",
        "11",
        "--latency-ms",
        "15",
        "--rate-429",
        "0.03",
        "--rate-503",
        "0.03",
        "--rate-timeout-after-effect",
        "0.03",
        "--rate-500-after-effect",
        "0.03",
        "--rate-malformed",
        "0.02",
        "--timeout-seconds",
        "2",
    )
    env = {
        "RELAY_DATABASE_URL": db_url,
        "RELAY_PROVIDERS__STRIPE__API_KEY": "sk_test_crash",
        "RELAY_PROVIDERS__STRIPE__BASE_URL": fake.url,
        "RELAY_PROVIDERS__STRIPE__TIMEOUT_MS": "1000",
        "RELAY_PROVIDERS__STRIPE__CONNECT_TIMEOUT_MS": "500",
        "RELAY_PROVIDERS__STRIPE__CONCURRENCY": "16",
        # Long enough that a loaded machine's slow write-back is not taken for a dead relay.
        "RELAY_LEASE_SECONDS": "6",
        "RELAY_MAX_ATTEMPTS": "25",
        "RELAY_BACKOFF_BASE_SECONDS": "0.05",
        "RELAY_BACKOFF_CAP_SECONDS": "1",
        "RELAY_POLL_INTERVAL_SECONDS": "0.1",
        "RELAY_POLL_MAX_INTERVAL_SECONDS": "0.5",
        "RELAY_SHUTDOWN_GRACE_SECONDS": "5",
        "RELAY_LOG_FORMAT": "json",
    }
    relays = [RelayProcess(f"crash-relay-{n}", env, tmp_path) for n in range(RELAYS)]
    # Keep payments' intents in insertion order across waves: a wave is a slice of payments.
    by_payment: dict[str, list[Any]] = {}
    for row in rows:
        by_payment.setdefault(row.payment_id, []).append(row)
    payment_ids = list(by_payment)
    waves = [[r for pid in payment_ids[i::8] for r in by_payment[pid]] for i in range(8)]
    try:
        for relay in relays:
            relay.start()
        chaos_started = time.monotonic()
        wave_every = CHAOS_SECONDS * 0.7 / len(waves)
        next_wave = chaos_started
        inserted = 0
        # The guard only stops a machine too slow to kill anything from looping forever.
        while (
            time.monotonic() - chaos_started < CHAOS_SECONDS
            or sum(relay.kills for relay in relays) < MIN_KILLS
        ) and time.monotonic() - chaos_started < CHAOS_SECONDS * 10:
            if waves and time.monotonic() >= next_wave:
                wave = waves.pop(0)
                insert_workload(db_url, wave)
                inserted += len(wave)
                next_wave += wave_every
            victim = rng.choice(relays)
            victim.kill()
            time.sleep(rng.uniform(0.05, 0.6))
            victim.start()
            time.sleep(rng.uniform(0.1, 0.8))
        for wave in waves:
            insert_workload(db_url, wave)
            inserted += len(wave)
        assert inserted == len(rows)
        for relay in relays:
            if not relay.running:
                relay.start()
        block_until(lambda: unfinished(db_url) == 0, "every intent finished", every=0.5)
        for relay in relays:
            relay.wait_ready()
        exit_codes = [relay.terminate() for relay in relays]
        effects = fake.effects()
    finally:
        for relay in relays:
            relay.kill()
        fake.stop()

    kills = sum(relay.kills for relay in relays)
    assert kills >= MIN_KILLS, f"only {kills} SIGKILLs happened"
    assert exit_codes == [0] * RELAYS, "SIGTERM drains and exits 0"
    faults: dict[str, int] = effects["faults_injected"]  # type: ignore[assignment]
    assert faults["timeout_after_effect"] > 0 and faults["500_after_effect"] > 0

    assert_exactly_once(db_url, effects, expected_intents=len(rows))
    # Money you can audit: one balanced posting per succeeded intent, equal to the
    # payments' amounts, and an unbroken audit trail, however often relays were killed.
    assert_ledger_balanced(db_url)
    assert_audit_intact(db_url)
    intents = all_intents(db_url)
    dead = [i for i in intents if i[3] == "dead"]
    assert dead == [], f"no intent should exhaust 25 attempts here: {dead[:5]}"
    assert any(i[5] > 1 for i in intents), "some intents were re-driven after a kill or fault"
    succeeded = sum(1 for i in intents if i[3] == "succeeded")
    print(
        f"\ncrash test: {len(intents)} intents, {succeeded} succeeded, {kills} SIGKILLs, "
        f"faults {faults}"
    )
