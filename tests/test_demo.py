"""`outbox-relay demo`: option ranges, the end of the wait, and the deadline."""

from __future__ import annotations

import subprocess
import sys
import time

import anyio
import psycopg
import pytest

from relay.cli.demo import wait_for_workload
from relay.cli.main import build_parser
from tests.support.cli import BASE_ENV, run_cli
from tests.support.intents import insert_intents


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--rate-429", "1.5"),
        ("--rate-503", "-0.1"),
        ("--rate-timeout-after-effect", "nan"),
        ("--rate-500-after-effect", "lots"),
        ("--rate-malformed", "2"),
        ("--payments", "0"),
        ("--relays", "0"),
        ("--latency-ms", "-1"),
        ("--deadline-seconds", "0"),
        ("--deadline-seconds", "inf"),
    ],
)
def test_an_option_out_of_range_is_a_usage_error_naming_it(
    capsys: pytest.CaptureFixture[str], option: str, value: str
) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["demo", option, value])
    assert exited.value.code == 2
    assert f"argument {option}: expected" in capsys.readouterr().err


def test_a_bad_rate_stops_the_demo_before_it_starts_anything() -> None:
    result = run_cli(
        "demo", "--rate-429", "1.5", env={"RELAY_DATABASE_URL": "postgresql://127.0.0.1:1/nowhere"}
    )
    assert result.returncode == 2
    assert "argument --rate-429" in result.stderr
    assert "Traceback" not in result.stderr


def _intents(prefix: str) -> list[dict[str, object]]:
    charge = {"action": "charge", "amount_minor": 100, "payment_method": "pm_card_visa"}
    return [
        {"payment_id": f"{prefix}-0", **charge},
        {"payment_id": f"{prefix}-0", "action": "refund"},
        {"payment_id": f"{prefix}-0", "action": "refund"},
        {"payment_id": f"{prefix}-1", **charge},
    ]


@pytest.mark.integration
@pytest.mark.anyio
async def test_the_wait_ends_when_the_rest_waits_behind_a_dead_intent(db_url: str) -> None:
    insert_intents(db_url, _intents("wait"))
    with psycopg.connect(db_url) as conn:
        conn.execute(
            "UPDATE outbox.payment_intents SET status = 'dead', error_code = 'invalid',"
            " completed_at = now() WHERE payment_id = 'wait-0' AND action = 'charge'"
        )
        conn.execute(
            "UPDATE outbox.payment_intents SET status = 'failed', error_code = 'card_declined',"
            " completed_at = now() WHERE payment_id = 'wait-1'"
        )
    # The two refunds stay blocked behind the dead charge until an operator acts; without
    # counting them as finished the wait would run to its deadline.
    with anyio.fail_after(60):
        stuck = await wait_for_workload(
            db_url, "wait", 4, time.perf_counter(), deadline_seconds=3600, database_kept=True
        )
    assert stuck == []


@pytest.mark.integration
@pytest.mark.anyio
async def test_past_the_deadline_the_wait_names_what_is_stuck(db_url: str) -> None:
    insert_intents(db_url, _intents("late"))  # no relay runs: nothing ever finishes
    stuck = await wait_for_workload(
        db_url, "late", 4, time.perf_counter(), deadline_seconds=0.5, database_kept=True
    )
    assert stuck[0].startswith("error: the workload did not finish within --deadline-seconds")
    assert "4 intent(s) unfinished (blocked 2, pending 2)" in stuck[0]
    with psycopg.connect(db_url) as conn:
        first = conn.execute("SELECT min(id) FROM outbox.payment_intents").fetchone()
    assert first is not None
    assert any(f"intent {first[0]} (late-0, charge): pending" in line for line in stuck)
    assert not any(line.startswith("  ... and") for line in stuck), "all four are named"
    # The database is the user's: the command it suggests reads it after the demo.
    assert "`outbox-relay intents show ID` (same RELAY_DATABASE_URL)" in stuck[-1]


@pytest.mark.integration
@pytest.mark.anyio
async def test_past_the_deadline_an_embedded_database_s_intents_are_shown_in_full(
    db_url: str,
) -> None:
    """The embedded database is deleted as the demo exits: `intents show` cannot work
    afterwards, so the lines carry the details and say how many were left unnamed."""
    insert_intents(db_url, _intents("gone-a") + _intents("gone-b") + _intents("gone-c"))
    with psycopg.connect(db_url) as conn:
        conn.execute(
            "UPDATE outbox.payment_intents SET attempts = 2, error_code = 'rate_limited',"
            " error_message = 'Too many requests', available_at = now() + interval '1 hour'"
            " WHERE payment_id = 'gone-a-0' AND action = 'charge'"
        )
    stuck = await wait_for_workload(
        db_url, "gone", 12, time.perf_counter(), deadline_seconds=0.5, database_kept=False
    )
    assert "12 intent(s) unfinished" in stuck[0]
    named = [line for line in stuck if line.startswith("  intent ")]
    assert len(named) == 5
    assert stuck[len(named) + 1] == "  ... and 7 more"
    assert "(gone-a-0, charge): pending, 2 attempt(s), last error rate_limited" in named[0]
    assert "(Too many requests), next attempt in" in named[0]
    assert "embedded PostgreSQL is deleted as the demo exits" in stuck[-1]
    assert "(same RELAY_DATABASE_URL)" not in stuck[-1]


def test_no_runtime_dir_warning_when_the_embedded_postgresql_starts() -> None:
    """pgserver asks platformdirs for a runtime directory when imported; without
    XDG_RUNTIME_DIR (containers, root shells) that printed a RuntimeDirWarning."""
    script = (
        "from relay.infra.embedded_pg import embedded_postgres\n"
        "with embedded_postgres() as url:\n"
        "    print('started')\n"
    )
    env = {k: v for k, v in BASE_ENV.items() if k != "XDG_RUNTIME_DIR"}
    result = subprocess.run(
        [sys.executable, "-W", "default", "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,  # a hang guard
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "started\n"
    assert "Warning" not in result.stderr, result.stderr


@pytest.mark.integration
def test_a_small_demo_finishes_and_passes_its_check(db_url: str) -> None:
    result = run_cli(
        "demo",
        "--payments",
        "15",
        "--adyen-payments",
        "20",
        "--deadline-seconds",
        "120",
        env={"RELAY_DATABASE_URL": db_url},
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "exactly-once check passed" in result.stdout
    # Both providers side by side, each checked against its own fake's effects.
    assert "succeeded intents (adyen, stripe)" in result.stdout
    assert "inserted " in result.stdout and "for 15 Stripe and 20 Adyen payments" in result.stdout
    lines = result.stdout.splitlines()
    assert any(line.startswith("adyen    charge") for line in lines)
    # Adyen's modifications were sent, awaited their webhook, and were settled by it: the
    # table's last column counts those per action, and none is left awaiting.
    for action in ("capture", "void", "refund"):
        (row,) = [line for line in lines if line.startswith(f"adyen    {action} ")]
        succeeded, by_webhook = int(row.split()[2]), int(row.split()[-1])
        assert succeeded > 0 and by_webhook == succeeded, row
    assert any("awaiting confirmation" in line for line in lines if "terminal" in line)
    (notes,) = [line for line in lines if line.startswith("Adyen notifications:")]
    assert "waiting 0" in notes, notes
    assert "none left awaiting a confirmation" in result.stdout


def test_the_adyen_workload_has_stripe_s_mix() -> None:
    """Adyen's captures, cancels and refunds are confirmed by webhook in the demo: its
    payments get every action, in the same flows as Stripe's, with Adyen's refusals."""
    import random

    from relay.cli.demo import ADYEN_ACTIONS, build_adyen_workload

    rows = build_adyen_workload(400, random.Random(3), "aw")
    assert {r.provider for r in rows} == {"adyen"}
    assert {r.action for r in rows} == set(ADYEN_ACTIONS)
    assert {r.payment_method for r in rows if r.payment_method} >= {
        "pm_card_visa",
        "adyen_refused",
    }
    assert not any(str(r.payment_method).startswith("pm_card_chargeDeclined") for r in rows)
    by_payment: dict[str, list[str]] = {}
    for row in rows:
        by_payment.setdefault(row.payment_id, []).append(row.action)
    flows = {tuple(actions) for actions in by_payment.values()}
    assert ("authorize", "capture", "refund") in flows
    assert ("authorize", "void") in flows
    assert ("charge", "refund") in flows
