"""What tests/test_crash.py promises to cover, checked without running it (it is slow)."""

from __future__ import annotations

import random

import pytest

from relay.cli.demo import build_workload
from tests.test_crash import MIN_INTENTS, MIN_PAYMENTS, PAYMENTS, chaos_seconds


def test_every_seed_gives_enough_intents_over_enough_payments() -> None:
    # PAYMENTS payments alone gave 2,007 intents for the default seed and fewer than 2,000
    # for about half the others.
    short = 0
    for seed in range(300):
        rows = build_workload(PAYMENTS, random.Random(seed), "crash", min_intents=MIN_INTENTS)
        payments = {r.payment_id for r in rows}
        assert len(rows) >= MIN_INTENTS and len(payments) >= max(MIN_PAYMENTS, PAYMENTS), seed
        short += len(build_workload(PAYMENTS, random.Random(seed), "crash")) < MIN_INTENTS
    assert short > 0, "the guarantee is exercised: some seeds need extra payments"


def test_the_extra_payments_keep_the_seeds_workload_as_it_was() -> None:
    plain = build_workload(PAYMENTS, random.Random(3), "crash")
    topped = build_workload(PAYMENTS, random.Random(3), "crash", min_intents=len(plain) + 50)
    assert topped[: len(plain)] == plain and len(topped) >= len(plain) + 50


@pytest.mark.parametrize(
    ("value", "seconds"), [(None, 22.0), ("60", 60.0), ("20", 20.0), ("5", 20.0), ("nan", 20.0)]
)
def test_chaos_never_lasts_less_than_20_seconds(value: str | None, seconds: float) -> None:
    environ = {} if value is None else {"RELAY_TEST_CHAOS_SECONDS": value}
    assert chaos_seconds(environ) == seconds
