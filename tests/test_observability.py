"""Metrics, logs and trace context, checked against the database with real processes.

A relay process runs a mixed workload against the fake provider while a second lane
points at a closed port (its breaker opens) and a third provider has no lane at all (its
intents wait). /metrics is scraped during and after the run; every counter and gauge is
compared with what the database says.
"""

from __future__ import annotations

import json
import random
import re
import secrets
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import httpx
import psycopg
import pytest
import structlog
from prometheus_client import REGISTRY
from prometheus_client.metrics import MetricWrapperBase

from relay.cli.demo import build_workload
from relay.infra import metrics as relay_metrics
from relay.infra.db import Database, again_next_interval
from relay.infra.queries import QUERIES
from relay.infra.tracing import parse_traceparent
from relay.service.depth import DepthSampler
from relay.service.instances import InstanceHeartbeat
from tests.processes import FakeProviderProcess, RelayProcess, free_port
from tests.scrape import scrape
from tests.support.sql import rows as _rows
from tests.support.waiting import block_until, wait_until

pytestmark = pytest.mark.integration

INSERT = (
    "INSERT INTO outbox.payment_intents (payment_id, action, provider, amount_minor, currency,"
    " payment_method, metadata) VALUES (%s, %s, %s, %s, %s, %s, %s)"
)


def _traceparent() -> str:
    # The card rule (issue 17) reads metadata whole, traceparents included: about one random
    # trace id in a hundred holds a Luhn-valid run of 13 digits and would be refused at
    # INSERT. Drawn again until no 13 digits follow each other, as outbox.new_event_id() does.
    while True:
        traceparent = f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"
        if not re.search(r"[0-9](?:-?[0-9]){12}", traceparent):
            return traceparent


def _scalar(db_url: str, sql: str, *params: object) -> Any:
    return _rows(db_url, sql, *params)[0][0]


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[FakeProviderProcess]:
    provider = FakeProviderProcess(
        tmp_path, "--seed", "5", "--latency-ms", "20", "--rate-503", "0.1"
    )
    yield provider
    provider.stop()


def test_metrics_agree_with_the_database_during_and_after_a_run(
    db_url: str, fake: FakeProviderProcess, tmp_path: Path
) -> None:
    traced = {f"obs-traced-{n}": _traceparent() for n in range(4)}
    with psycopg.connect(db_url) as conn, conn.cursor() as cur:
        rows = build_workload(80, random.Random(3), "obs")
        cur.executemany(
            INSERT,
            [
                (
                    r.payment_id,
                    r.action,
                    "stripe",
                    r.amount_minor,
                    r.currency,
                    r.payment_method,
                    "{}",
                )
                for r in rows
            ],
        )
        for n in range(3):  # unknown card: invalid at the provider, dead; the capture waits
            cur.execute(
                INSERT,
                (f"obs-dead-{n}", "authorize", "stripe", 500, "EUR", "pm_card_unknown", "{}"),
            )
            cur.execute(INSERT, (f"obs-dead-{n}", "capture", "stripe", None, "EUR", None, "{}"))
        for payment_id, traceparent in traced.items():
            metadata = json.dumps({"traceparent": traceparent})
            cur.execute(
                INSERT, (payment_id, "charge", "stripe", 700, "EUR", "pm_card_visa", metadata)
            )
        for n in range(5):  # no lane for acme: these wait
            cur.execute(
                INSERT, (f"obs-acme-{n}", "charge", "acme", 100, "USD", "pm_card_visa", "{}")
            )
        for n in range(3):  # flaky: connection refused, the breaker opens
            cur.execute(
                INSERT, (f"obs-flaky-{n}", "charge", "flaky", 100, "USD", "pm_card_visa", "{}")
            )

    relay = RelayProcess(
        "obs-relay",
        {
            "RELAY_DATABASE_URL": db_url,
            "RELAY_PROVIDERS__STRIPE__API_KEY": "sk_test_observability",
            "RELAY_PROVIDERS__STRIPE__BASE_URL": fake.url,
            "RELAY_PROVIDERS__STRIPE__BREAKER_FAILURE_THRESHOLD": "1000",
            "RELAY_PROVIDERS__FLAKY__API_KEY": "sk_test_flaky",
            "RELAY_PROVIDERS__FLAKY__BASE_URL": f"http://127.0.0.1:{free_port()}",
            "RELAY_PROVIDERS__FLAKY__CONNECT_TIMEOUT_MS": "500",
            "RELAY_PROVIDERS__FLAKY__BREAKER_FAILURE_THRESHOLD": "2",
            "RELAY_PROVIDERS__FLAKY__BREAKER_COOLDOWN_SECONDS": "3600",
            "RELAY_MAX_ATTEMPTS": "50",
            "RELAY_BACKOFF_BASE_SECONDS": "0.05",
            "RELAY_BACKOFF_CAP_SECONDS": "0.3",
            "RELAY_POLL_INTERVAL_SECONDS": "0.1",
            "RELAY_POLL_MAX_INTERVAL_SECONDS": "0.3",
            "RELAY_DEPTH_INTERVAL_SECONDS": "0.2",
            "RELAY_LOG_FORMAT": "json",
        },
        tmp_path,
    )
    relay.start()
    try:
        relay.wait_ready()
        port = relay.http_port

        # -- during the run: counters never run ahead of the database ------------------------
        block_until(
            lambda: (
                _scalar(
                    db_url, "SELECT count(*) FROM outbox.payment_intents WHERE status = 'succeeded'"
                )
                >= 20
            )
        )
        during = scrape(port)
        succeeded_after = _scalar(
            db_url,
            "SELECT count(*) FROM outbox.payment_intents WHERE status = 'succeeded' AND provider = 'stripe'",
        )
        counted = during.total(
            "outbox_relay_intents_finished_total", provider="stripe", outcome="succeeded"
        )
        assert 0 < counted <= succeeded_after
        assert during.total("outbox_relay_attempts_total", provider="stripe") >= counted
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
        assert httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200

        # -- after the run: everything the stripe lane can finish is finished ----------------
        block_until(
            lambda: (
                _scalar(
                    db_url,
                    "SELECT count(*) FROM outbox.payment_intents"
                    " WHERE provider = 'stripe' AND status IN ('pending', 'in_flight')",
                )
                == 0
                and _scalar(
                    db_url,
                    "SELECT count(*) FROM outbox.payment_intents"
                    " WHERE provider = 'flaky' AND status = 'in_flight'",
                )
                == 0
            )
        )
        block_until(lambda: scrape(port).value("outbox_relay_breaker_state", provider="flaky") == 2)
        done_at = time.time()
        # Two samples after the database settled: the second one's query began after it.
        first = block_until(
            lambda: (
                (v := scrape(port).value("outbox_relay_queue_depth_sampled_timestamp_seconds"))
                and v > done_at
                and v
            )
        )
        block_until(
            lambda: (
                (scrape(port).value("outbox_relay_queue_depth_sampled_timestamp_seconds") or 0)
                > first
            )
        )
        after = scrape(port)
        sampled_at = after.value("outbox_relay_queue_depth_sampled_timestamp_seconds")
        assert sampled_at is not None
        db = {
            (provider, action, status): (count, attempts)
            for provider, action, status, count, attempts in _rows(
                db_url,
                "SELECT provider, action, status, count(*), sum(attempts)"
                " FROM outbox.payment_intents GROUP BY 1, 2, 3",
            )
        }
        requests = httpx.get(f"{fake.url}/_fake/requests", timeout=30).json()["requests"]
        events = dict(
            _rows(
                db_url,
                "SELECT payment_id, traceparent FROM outbox.events WHERE payment_id LIKE 'obs-traced-%%'",
            )
        )
        keys = dict(
            _rows(
                db_url,
                "SELECT payment_id, idempotency_key FROM outbox.payment_intents"
                " WHERE payment_id LIKE 'obs-traced-%%'",
            )
        )
        oldest_acme = _scalar(
            db_url,
            "SELECT extract(epoch FROM min(available_at))::float8 FROM outbox.payment_intents"
            " WHERE provider = 'acme' AND status = 'pending'",
        )
        unpublished = _scalar(
            db_url, "SELECT count(*) FROM outbox.events WHERE status IN ('blocked', 'pending')"
        )
        reported = _rows(db_url, "SELECT providers FROM outbox.relay_instances")
    finally:
        relay.terminate()
        relay.kill()

    # Finished intents, by provider, action and why they ended, equal the database's rows.
    ended_as = {
        "succeeded": ("succeeded",),
        "failed": ("declined", "rejected"),
        "dead": ("invalid", "exhausted", "amount_mismatch", "refused"),
    }
    for (provider, action, status), (count, _) in db.items():
        if status in ended_as:
            counted = sum(
                after.total(
                    "outbox_relay_intents_finished_total",
                    provider=provider,
                    action=action,
                    outcome=outcome,
                )
                for outcome in ended_as[status]
            )
            assert counted == count, (provider, action, status)
    finished_total = after.total("outbox_relay_intents_finished_total")
    assert finished_total == sum(c for (_, _, s), (c, _) in db.items() if s in ended_as)
    # The charge success rate, derived from the counters, is the database's.
    charges = sum(
        c for (p, a, s), (c, _) in db.items() if a == "charge" and p == "stripe" and s in ended_as
    )
    charged = db.get(("stripe", "charge", "succeeded"), (0, 0))[0]
    rate = after.total(
        "outbox_relay_intents_finished_total", action="charge", outcome="succeeded"
    ) / (after.total("outbox_relay_intents_finished_total", action="charge"))
    assert rate == charged / charges

    # Attempts: every claim of a stripe intent was one provider attempt, except rejections
    # (the state machine refused them before any call).
    stripe_attempts = sum(a for (p, _, _), (_, a) in db.items() if p == "stripe")
    rejected = after.total(
        "outbox_relay_intents_finished_total", provider="stripe", outcome="rejected"
    )
    assert (
        after.total("outbox_relay_attempts_total", provider="stripe") + rejected == stripe_attempts
    )
    # Retries: each attempt before the last of a finished intent scheduled one.
    terminal = {"succeeded", "failed", "dead"}
    expected_retries = sum(
        a - c for (p, _, s), (c, a) in db.items() if p == "stripe" and s in terminal
    )
    assert after.total("outbox_relay_retries_total", provider="stripe") == expected_retries
    assert expected_retries > 0, "the fake's 503s caused retries"
    flaky_attempts = sum(a for (p, _, _), (_, a) in db.items() if p == "flaky")
    assert after.total("outbox_relay_retries_total", provider="flaky") == flaky_attempts > 0

    # Queue depth, dead letters and the oldest pending wait, as sampled.
    def depth(provider: str, status: str) -> int:
        return sum(c for (p, _, s), (c, _) in db.items() if p == provider and s == status)

    for provider in ("stripe", "acme", "flaky"):
        for status in ("blocked", "pending", "in_flight", "dead"):
            gauge = after.value("outbox_relay_queue_depth", provider=provider, status=status)
            assert gauge == depth(provider, status), (provider, status)
        assert after.value("outbox_relay_dead_letters", provider=provider) == depth(
            provider, "dead"
        )
    assert depth("stripe", "dead") == 3 and depth("stripe", "blocked") == 3
    assert depth("acme", "pending") == 5
    acme_age = after.value("outbox_relay_oldest_pending_age_seconds", provider="acme")
    assert acme_age is not None
    assert abs(acme_age - (sampled_at - oldest_acme)) < 1.0
    assert after.value("outbox_relay_oldest_pending_age_seconds", provider="stripe") == 0
    # acme has no lane on any relay: its waiting intents are unserved. A lane whose breaker
    # is open still serves its provider.
    assert after.value("outbox_relay_unserved_intents", provider="acme") == 5
    assert after.value("outbox_relay_unserved_intents", provider="stripe") == 0
    assert after.value("outbox_relay_unserved_intents", provider="flaky") == 0
    assert reported == [(["flaky", "stripe"],)]
    # A clean stop took the report back.
    assert _rows(db_url, "SELECT providers FROM outbox.relay_instances") == []
    assert after.value("outbox_relay_unpublished_events") == unpublished > 0
    assert after.value("outbox_relay_in_flight", provider="stripe") == 0
    assert after.value("outbox_relay_breaker_state", provider="flaky") == 2
    assert after.value("outbox_relay_breaker_state", provider="stripe") == 0
    assert after.total("outbox_relay_claim_batch_size_count") > 0
    assert after.total("outbox_relay_write_back_seconds_count") > 0
    assert after.total(
        "outbox_relay_provider_call_seconds_count", provider="stripe"
    ) >= after.total("outbox_relay_attempts_total", provider="stripe")

    # Trace context: at the provider, in the events, in the logs.
    for payment_id, traceparent in traced.items():
        sent = {r["traceparent"] for r in requests if r["idempotency_key"] == keys[payment_id]}
        assert sent == {traceparent}
        assert events[payment_id] == traceparent
    lines = [json.loads(line) for line in relay.log_path.read_text().splitlines() if line.strip()]
    attempted = [e for e in lines if e.get("event") == "intent_attempted"]
    assert attempted
    for entry in attempted:
        assert {
            "intent_id",
            "payment_id",
            "provider",
            "attempt",
            "trace_id",
            "level",
            "timestamp",
        } <= set(entry)
    trace_ids = {e["payment_id"]: e["trace_id"] for e in attempted if e["payment_id"] in traced}
    assert trace_ids == {p: t.split("-")[1] for p, t in traced.items()}


# -- the sampler alone, with the test's clock ---------------------------------------------------


def _value(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


@pytest.mark.anyio
async def test_depth_sampler_sets_every_gauge_from_one_cheap_query(db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        for n in range(4):
            conn.execute(INSERT, (f"ds-{n}", "charge", "sampled", 100, "EUR", "pm_card_visa", "{}"))
        conn.execute(INSERT, ("ds-0", "refund", "sampled", None, "EUR", None, "{}"))  # blocked
        conn.execute(
            "UPDATE outbox.payment_intents SET status = 'dead', completed_at = now()"
            " WHERE payment_id = 'ds-1'"
        )
        conn.execute(
            "UPDATE outbox.payment_intents SET status = 'in_flight', lease_token = 1,"
            " lease_expires_at = now() + interval '1 minute' WHERE payment_id = 'ds-2'"
        )
        conn.execute(
            "UPDATE outbox.payment_intents SET available_at = %s WHERE payment_id = 'ds-3'",
            (datetime(2030, 1, 1, 11, 0, tzinfo=UTC),),
        )
        conn.execute(
            "UPDATE outbox.payment_intents SET available_at = %s WHERE payment_id = 'ds-0'"
            " AND action = 'charge'",
            (datetime(2030, 1, 1, 11, 58, 30, tzinfo=UTC),),
        )
    db = Database(db_url, pool_size=1)
    await db.open()
    try:
        sampler = DepthSampler(db, providers=["sampled", "idle"])
        now = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
        sample = await sampler.sample(now=now)
        assert sample.counts == {
            ("sampled", "pending"): 2,
            ("sampled", "blocked"): 1,
            ("sampled", "dead"): 1,
            ("sampled", "in_flight"): 1,
        }
        assert _value("outbox_relay_queue_depth", provider="sampled", status="pending") == 2
        assert _value("outbox_relay_queue_depth", provider="sampled", status="blocked") == 1
        assert _value("outbox_relay_queue_depth", provider="sampled", status="in_flight") == 1
        assert _value("outbox_relay_dead_letters", provider="sampled") == 1
        assert _value("outbox_relay_queue_depth", provider="idle", status="pending") == 0
        # The oldest DUE pending intent: 11:00 (ds-3), one hour before `now`.
        assert _value("outbox_relay_oldest_pending_age_seconds", provider="sampled") == 3600.0
        later = await sampler.sample(now=now - timedelta(hours=2))  # nothing due yet
        assert later.oldest_pending_seconds == {"sampled": 0.0}

        with psycopg.connect(db_url, autocommit=True) as conn:
            conn.execute("DELETE FROM outbox.payment_intents WHERE provider = 'sampled'")
        await sampler.sample(now=now)
        for status in ("blocked", "pending", "in_flight", "dead"):
            assert _value("outbox_relay_queue_depth", provider="sampled", status=status) == 0
        assert _value("outbox_relay_oldest_pending_age_seconds", provider="sampled") == 0
    finally:
        await db.close()


@pytest.mark.anyio
async def test_unserved_intents_count_providers_no_live_relay_serves(db_url: str) -> None:
    """Each relay's heartbeat (relay/service/instances.py) upserts its row of
    outbox.relay_instances; a provider none of the live rows (nor the sampling relay)
    serves has its blocked, pending and in-flight intents counted as unserved (dead ones
    wait for an operator, not a relay). A row is gone after max(3 intervals, 30 s) without
    a heartbeat, pruned after a day, and deleted at once when its relay withdraws."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        for n in range(2):
            conn.execute(INSERT, (f"pp-{n}", "charge", "paypal", 100, "EUR", "pm_card_visa", "{}"))
        conn.execute(INSERT, ("pp-0", "refund", "paypal", None, "EUR", None, "{}"))  # blocked
        conn.execute(INSERT, ("pp-dead", "charge", "paypal", 100, "EUR", "pm_card_visa", "{}"))
        conn.execute(INSERT, ("st-0", "charge", "stripe", 100, "EUR", "pm_card_visa", "{}"))
        conn.execute(
            "UPDATE outbox.payment_intents SET status = 'dead', completed_at = now()"
            " WHERE payment_id = 'pp-dead'"
        )
    db = Database(db_url, pool_size=1)
    await db.open()
    try:
        # The sampler of a stripe relay that has not reported yet: it serves stripe anyway.
        sampler = DepthSampler(db, providers=["stripe"], interval_seconds=5)
        paypal_relay = InstanceHeartbeat(
            db, instance="relay-b", providers=["paypal"], interval_seconds=5
        )
        now = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)

        sample = await sampler.sample(now=now)
        assert sample.unserved == {"paypal": 3}
        assert _value("outbox_relay_unserved_intents", provider="paypal") == 3
        assert _value("outbox_relay_unserved_intents", provider="stripe") == 0

        await paypal_relay.beat(now=now)  # a relay for paypal starts
        sample = await sampler.sample(now=now + timedelta(seconds=29))
        assert sample.unserved == {}
        assert _value("outbox_relay_unserved_intents", provider="paypal") == 0

        # relay-b stopped reporting 31 s ago (> 3 x 5 s, > 30 s): gone.
        sample = await sampler.sample(now=now + timedelta(seconds=31))
        assert sample.unserved == {"paypal": 3}
        assert _value("outbox_relay_unserved_intents", provider="paypal") == 3
        rows = "SELECT instance, providers FROM outbox.relay_instances ORDER BY instance"
        assert _rows(db_url, rows) == [("relay-b", ["paypal"])]

        stripe_relay = InstanceHeartbeat(
            db, instance="relay-a", providers=["stripe"], interval_seconds=5
        )
        await stripe_relay.beat(now=now + timedelta(days=1, seconds=1))
        assert _rows(db_url, rows) == [("relay-a", ["stripe"])]  # relay-b pruned

        await paypal_relay.beat(now=now + timedelta(days=1, seconds=2))
        await paypal_relay.withdraw()  # a clean stop: its row is gone at once
        assert _rows(db_url, rows) == [("relay-a", ["stripe"])]
    finally:
        await db.close()


@pytest.mark.anyio
async def test_the_heartbeat_beats_on_its_own_until_withdrawn(db_url: str) -> None:
    """run() reports before it says started, beats every interval on its own (no sampler),
    and withdraw() stops it and deletes the row."""
    db = Database(db_url, pool_size=2)
    await db.open()
    rows = "SELECT instance, providers FROM outbox.relay_instances"
    try:
        heartbeat = InstanceHeartbeat(
            db, instance="relay-own", providers=["stripe", "adyen"], interval_seconds=0.05
        )
        async with anyio.create_task_group() as tg:
            await tg.start(heartbeat.run)
            assert _rows(db_url, rows) == [("relay-own", ["adyen", "stripe"])]
            await wait_until(lambda: heartbeat.beats >= 3, "three beats")
            await heartbeat.withdraw()
        assert _rows(db_url, rows) == []
        beats = heartbeat.beats
        await anyio.sleep(0.2)  # four intervals: a beat would have come by now
        assert heartbeat.beats == beats
        assert _rows(db_url, rows) == []
    finally:
        await db.close()


def _exposed_name(metric: MetricWrapperBase) -> str:
    (family,) = metric.describe()
    # prometheus-client keeps a counter's family name without its `_total` sample suffix.
    return f"{family.name}_total" if family.type == "counter" else family.name


def test_every_metric_is_in_the_readme_table() -> None:
    registered = {
        _exposed_name(value)
        for value in vars(relay_metrics).values()
        if isinstance(value, MetricWrapperBase)
    }
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    table = readme.split("| metric | meaning |", 1)[1].split("\n\n", 1)[0]
    listed = set(re.findall(r"`(outbox_relay_[a-z0-9_]+)", table))
    assert len(registered) > 20
    assert registered - listed == set(), (
        "registered in relay/infra/metrics.py, missing in the README"
    )
    assert listed - registered == set(), "in the README's table, registered nowhere"


def test_queue_depth_can_be_answered_from_the_partial_index_alone(conn: psycopg.Connection) -> None:
    conn.execute("SET enable_seqscan = off")
    conn.execute("SET enable_bitmapscan = off")
    plan = "\n".join(
        row[0]
        for row in conn.execute(
            "EXPLAIN " + QUERIES["queue_depth"].replace("%(now)s", "NULL")  # type: ignore[operator]
        )
    )
    assert "payment_intents_depth_idx" in plan and "Seq Scan" not in plan


# -- trace context validated at INSERT ------------------------------------------------------------

VALID = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.mark.anyio
async def test_reconciliation_gauges_follow_the_open_exceptions(db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        run = conn.execute(
            "INSERT INTO outbox.reconciliation_runs (provider, window_start, window_end)"
            " VALUES ('recon', now() - interval '1 day', now()) RETURNING id"
        ).fetchone()
        assert run is not None
        for key, kind, currency, delta in [
            ("pi_1", "amount_mismatch", "EUR", -150),
            ("pi_2", "missing_internal", "EUR", 2000),
            ("pi_3", "amount_mismatch", "JPY", 7),
        ]:
            conn.execute(
                "INSERT INTO outbox.reconciliation_exceptions (provider, kind, match_key, currency,"
                " delta_minor, detail, occurred_at, first_run_id, last_run_id)"
                " VALUES ('recon', %s, %s, %s, %s, 'test', now(), %s, %s)",
                (kind, key, currency, delta, run[0], run[0]),
            )
    db = Database(db_url, pool_size=1)
    await db.open()
    try:
        sampler = DepthSampler(db)
        await sampler.sample()
        assert _value("outbox_relay_reconciliation_open_exceptions", provider="recon") == 3
        assert (
            _value("outbox_relay_reconciliation_open_delta_minor", provider="recon", currency="EUR")
            == 2150
        )
        assert (
            _value("outbox_relay_reconciliation_open_delta_minor", provider="recon", currency="JPY")
            == 7
        )
        with psycopg.connect(db_url, autocommit=True) as conn:
            conn.execute(
                "UPDATE outbox.reconciliation_exceptions SET status = 'resolved'"
                " WHERE currency = 'EUR'"
            )
        await sampler.sample()
        assert _value("outbox_relay_reconciliation_open_exceptions", provider="recon") == 1
        assert (
            _value("outbox_relay_reconciliation_open_delta_minor", provider="recon", currency="EUR")
            == 0
        )
    finally:
        await db.close()


@pytest.mark.parametrize(
    "value",
    [
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",  # zero trace id
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",  # zero parent id
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",  # upper case
        "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # unknown version
        "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",  # short trace id
        VALID + "-extra",
        "4111 1111 1111 1111",
        42,
        None,
    ],
)
def test_a_malformed_traceparent_is_refused_at_insert(
    conn: psycopg.Connection, value: object
) -> None:
    with pytest.raises(psycopg.errors.CheckViolation) as refused:
        conn.execute(
            INSERT,
            (
                "tp-bad",
                "charge",
                "stripe",
                100,
                "EUR",
                "pm_card_visa",
                json.dumps({"traceparent": value}),
            ),
        )
    # A value holding a Luhn-valid run of 13-19 digits (separators ignored) is refused by
    # the card rule first (sql/0019), which fires before every other rule of the table: a
    # card, and also the all-zero trace id, whose 32 zeros pass Luhn.
    card_like = isinstance(value, str) and (value.startswith("4111") or "0" * 13 in value)
    expected = (
        "payment_intents_metadata_not_card_number"
        if card_like
        else "payment_intents_traceparent_w3c"
    )
    assert refused.value.diag.constraint_name == expected
    assert refused.value.diag.column_name == "metadata"
    assert "4111" not in str(refused.value), "the value is not echoed"
    assert parse_traceparent(value) is None


def test_a_valid_traceparent_is_stored_and_parsed(conn: psycopg.Connection) -> None:
    conn.execute(
        INSERT,
        (
            "tp-ok",
            "charge",
            "stripe",
            100,
            "EUR",
            "pm_card_visa",
            json.dumps({"traceparent": VALID}),
        ),
    )
    conn.execute(INSERT, ("tp-none", "charge", "stripe", 100, "EUR", "pm_card_visa", "{}"))
    stored = conn.execute(
        "SELECT metadata ->> 'traceparent' FROM outbox.payment_intents WHERE payment_id = 'tp-ok'"
    ).fetchone()
    assert stored == (VALID,)
    context = parse_traceparent(VALID)
    assert context is not None
    assert (context.trace_id, context.parent_id, context.flags) == (
        "4bf92f3577b34da6a3ce929d0e0e4736",
        "00f067aa0ba902b7",
        "01",
    )
    assert context.traceparent == VALID
    with pytest.raises(psycopg.errors.CheckViolation):
        conn.execute(
            'UPDATE outbox.payment_intents SET metadata = \'{"traceparent": "nope"}\''
            " WHERE payment_id = 'tp-none'"
        )


def test_a_background_job_s_database_error_ends_its_turn_not_the_relay() -> None:
    """again_next_interval (the depth sampler's and the heartbeat's turn): an error that may
    heal is a debug line, any other database error a warning that says to migrate, and
    anything that is not a database error goes through."""
    with structlog.testing.capture_logs() as logged:
        with again_next_interval("job"):
            raise psycopg.OperationalError("connection lost")
        with again_next_interval("job"):
            raise psycopg.errors.UndefinedTable("relation outbox.relay_instances")
    assert [(e["event"], e["log_level"]) for e in logged] == [
        ("job_db_error", "debug"),
        ("job_failed", "warning"),
    ]
    assert logged[1]["remedy"] == "run `outbox-relay migrate`"
    with pytest.raises(ValueError), again_next_interval("job"):
        raise ValueError("a bug, not the database")
