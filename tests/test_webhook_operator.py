"""What an operator sees of the inbox, and how long it keeps notifications.

* `webhooks list` counts by provider, type and status and lists the latest; `webhooks
  show` prints one notification by inbox id or event id with its stored (redacted) payload,
  and says so when there is none; `intents show` lists the notifications that touched the
  intent's payment;
* retention deletes applied and ignored notifications older than the configured age and
  never a received one; a late duplicate of a kept notification still meets its key.
"""

from __future__ import annotations

import json
import socket
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from relay.core.inbox import purge_applied
from relay.infra.db import Database
from tests.support.cli import run_cli
from tests.support.intents import insert_intents

pytestmark = [pytest.mark.integration]


def _store(db_url: str, event_id: str, event_type: str, body: dict[str, object]) -> int:
    with psycopg.connect(db_url, autocommit=True) as conn:
        row = conn.execute(
            "INSERT INTO outbox.webhook_inbox (provider, event_id, event_type, payload)"
            " VALUES ('stripe', %s, %s, %s) RETURNING id",
            (event_id, event_type, json.dumps(body)),
        ).fetchone()
    assert row is not None
    return int(row[0])


def _finish(
    db_url: str, inbox_id: int, status: str, payment_id: str | None, ago: timedelta
) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(
            "UPDATE outbox.webhook_inbox SET status = %s, payment_id = %s, applied_at = %s,"
            " result = 'recorded for the test' WHERE id = %s",
            (status, payment_id, datetime.now(UTC) - ago, inbox_id),
        )


def test_webhooks_list_and_show(db_url: str) -> None:
    env = {"RELAY_DATABASE_URL": db_url}
    empty = run_cli("webhooks", "list", env=env)
    assert empty.returncode == 0 and "the inbox is empty" in empty.stdout
    applied = _store(
        db_url, "evt_a", "charge.refunded", {"id": "evt_a", "note": "4242 4242 4242 4242"}
    )
    _finish(db_url, applied, "applied", "pay-1", timedelta(minutes=1))
    _store(db_url, "evt_b", "customer.created", {"id": "evt_b"})
    listed = run_cli("webhooks", "list", env=env)
    assert listed.returncode == 0, listed.stderr
    assert "charge.refunded" in listed.stdout and "customer.created" in listed.stdout
    assert "evt_a" in listed.stdout and "received" in listed.stdout
    as_json = json.loads(
        run_cli("webhooks", "list", "--status", "applied", "--json", env=env).stdout
    )
    assert [n["event_id"] for n in as_json["notifications"]] == ["evt_a"]

    shown = run_cli("webhooks", "show", "evt_a", env=env)
    assert shown.returncode == 0, shown.stderr
    assert "recorded for the test" in shown.stdout
    assert "[card number redacted]" in shown.stdout and "4242" not in shown.stdout
    by_id = json.loads(run_cli("webhooks", "show", str(applied), "--json", env=env).stdout)
    assert by_id["event_id"] == "evt_a"
    missing = run_cli("webhooks", "show", "evt_nope", env=env)
    assert missing.returncode == 1 and "no notification 'evt_nope'" in missing.stderr


def test_intents_show_lists_the_notifications_of_the_payment(db_url: str) -> None:
    (intent_id,) = insert_intents(
        db_url,
        [
            {
                "payment_id": "pay-1",
                "action": "charge",
                "amount_minor": 100,
                "payment_method": "pm_card_visa",
            }
        ],
    )
    inbox_id = _store(db_url, "evt_c", "charge.dispute.created", {"id": "evt_c"})
    _finish(db_url, inbox_id, "applied", "pay-1", timedelta(seconds=5))
    shown = run_cli("intents", "show", str(intent_id), env={"RELAY_DATABASE_URL": db_url})
    assert shown.returncode == 0, shown.stderr
    assert "webhook notifications of the payment (1)" in shown.stdout
    assert "evt_c" in shown.stdout and "charge.dispute.created" in shown.stdout


@pytest.mark.anyio
async def test_retention_deletes_only_finished_notifications_past_their_age(db_url: str) -> None:
    old_applied = _store(db_url, "evt_old", "charge.refunded", {"id": "evt_old"})
    _finish(db_url, old_applied, "applied", None, timedelta(days=40))
    old_ignored = _store(db_url, "evt_ign", "customer.created", {"id": "evt_ign"})
    _finish(db_url, old_ignored, "ignored", None, timedelta(days=40))
    recent = _store(db_url, "evt_recent", "charge.refunded", {"id": "evt_recent"})
    _finish(db_url, recent, "applied", None, timedelta(days=3))
    _store(db_url, "evt_waiting", "charge.refunded", {"id": "evt_waiting"})
    with psycopg.connect(db_url, autocommit=True) as conn:
        # received long ago and never applied: an operator must see it, never deleted
        conn.execute(
            "UPDATE outbox.webhook_inbox SET received_at = now() - interval '60 days'"
            " WHERE event_id = 'evt_waiting'"
        )
    db = Database(db_url, pool_size=1, name="retention-test")
    await db.open()
    try:
        deleted = await purge_applied(db, older_than_seconds=744 * 3600, limit=100)
    finally:
        await db.close()
    assert deleted == 2
    with psycopg.connect(db_url) as conn:
        left = [r[0] for r in conn.execute("SELECT event_id FROM outbox.webhook_inbox ORDER BY id")]
        # A late duplicate of a kept notification still meets its key.
        duplicate = conn.execute(
            "INSERT INTO outbox.webhook_inbox (provider, event_id, event_type, payload)"
            " VALUES ('stripe', 'evt_recent', 'charge.refunded', '{}')"
            " ON CONFLICT ON CONSTRAINT webhook_inbox_event_once DO NOTHING RETURNING id"
        ).fetchall()
    assert left == ["evt_recent", "evt_waiting"]
    assert duplicate == []


def test_webhooks_serve_refuses_to_start_without_an_endpoint_or_a_free_port(db_url: str) -> None:
    bare = run_cli("webhooks", "serve", env={"RELAY_DATABASE_URL": db_url})
    assert bare.returncode == 2
    assert "RELAY_WEBHOOKS__STRIPE__SECRETS_FILE" in bare.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = run_cli(
            "webhooks",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            env={"RELAY_DATABASE_URL": db_url, "RELAY_WEBHOOKS__STRIPE__SECRETS": '["whsec_x"]'},
        )
    assert busy.returncode == 2
    assert (
        busy.stderr.startswith("error: cannot listen on 127.0.0.1:")
        and "Traceback" not in busy.stderr
    )


@pytest.mark.anyio
async def test_the_depth_sampler_reports_notifications_nobody_applied(db_url: str) -> None:
    from prometheus_client import REGISTRY

    from relay.service.depth import DepthSampler

    waiting = _store(db_url, "evt_wait", "charge.refunded", {"id": "evt_wait"})
    done = _store(db_url, "evt_done", "charge.refunded", {"id": "evt_done"})
    _finish(db_url, done, "applied", None, timedelta(seconds=1))
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(
            "UPDATE outbox.webhook_inbox SET received_at = now() - interval '10 minutes'"
            " WHERE id = %s",
            (waiting,),
        )
    db = Database(db_url, pool_size=1, name="depth-test")
    await db.open()
    try:
        sample = await DepthSampler(db, providers=["stripe"]).sample()
    finally:
        await db.close()
    assert sample.webhooks_waiting == {"stripe": 1}
    assert 590 <= sample.webhooks_oldest_seconds["stripe"] <= 3600
    assert REGISTRY.get_sample_value("outbox_relay_webhooks_waiting", {"provider": "stripe"}) == 1
