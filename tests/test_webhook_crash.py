"""Crashes around the inbox, with real processes killed by SIGKILL.

* The receiver dies between the commit and its answer: the provider saw no answer and
  retries; the next receiver finds the row stored, acknowledges the duplicate, and the
  notification is applied once.
* A relay dies in the middle of applying (its transaction holds the notification and waits
  for the payment's lock): nothing of it stays; after the lease another relay applies the
  notification once.

The receiver's death is caused by RELAY_TEST_WEBHOOKS_SIGKILL_AFTER_COMMIT, which makes the
process send itself SIGKILL right after the commit: a real kill of a real process at the
one instant a test cannot otherwise hit.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
import httpx
import psycopg
import pytest
from psycopg.rows import dict_row

from relay.infra.db import Database
from tests.processes import FakeProviderProcess, RelayProcess, free_port
from tests.support.cli import BASE_ENV
from tests.support.fake_server import API_KEY
from tests.support.intents import insert_intents
from tests.support.providers import stripe_adapter
from tests.support.relays import make_relay, run_until_settled
from tests.support.waiting import block_until
from tests.support.webhooks import SECRET, applier, inbox_rows

pytestmark = [pytest.mark.integration, pytest.mark.slow]


class ReceiverProcess:
    def __init__(self, db_url: str, port: int, log_dir: Path, *, kill_after_commit: bool) -> None:
        env = {
            **BASE_ENV,
            "RELAY_DATABASE_URL": db_url,
            "RELAY_WEBHOOKS__STRIPE__SECRETS": json.dumps([SECRET]),
            "RELAY_LOG_FORMAT": "json",
        }
        if kill_after_commit:
            env["RELAY_TEST_WEBHOOKS_SIGKILL_AFTER_COMMIT"] = "1"
        self.port = port
        self.log_path = log_dir / f"receiver-{port}-{int(kill_after_commit)}.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "relay",
                    "webhooks",
                    "serve",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                ],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        block_until(self._listening, "the receiver to listen", guard_seconds=60)

    def _listening(self) -> bool:
        if b"webhooks listening" in self.log_path.read_bytes():
            return True
        if self.proc.poll() is not None:
            raise RuntimeError(f"receiver exited at start; see {self.log_path}")
        return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)


def test_receiver_killed_between_commit_and_answer(db_url: str, tmp_path: Path) -> None:
    port = free_port()
    fake = FakeProviderProcess(tmp_path)
    first = second = None
    try:
        httpx.post(
            f"{fake.url}/_fake/webhooks/config",
            json={
                "url": f"http://127.0.0.1:{port}/webhooks/stripe",
                "secret": SECRET,
                "retry_base_ms": 200,
                "retry_cap_ms": 1000,
            },
            timeout=10,
        ).raise_for_status()
        first = ReceiverProcess(db_url, port, tmp_path, kill_after_commit=True)
        created = httpx.post(
            f"{fake.url}/v1/payment_intents",
            data={
                "amount": "1500",
                "currency": "eur",
                "payment_method": "pm_card_visa",
                "confirm": "true",
            },
            headers={"Authorization": f"Bearer {API_KEY}"},
            timeout=10,
        )
        assert created.status_code == 200
        assert first.proc.wait(120) == -signal.SIGKILL, "the receiver killed itself after commit"
        assert len(inbox_rows(db_url)) == 1, "the row committed before the kill"

        second = ReceiverProcess(db_url, port, tmp_path, kill_after_commit=False)

        def acknowledged() -> dict[str, Any] | None:
            log = httpx.get(f"{fake.url}/_fake/webhooks", timeout=10).json()
            done = [e for e in log["events"].values() if 200 in e["statuses"]]
            return done[0] if done else None

        event = block_until(acknowledged, "the fake's retry to be acknowledged")
        assert event["statuses"][0] is None, "the first attempt got no answer"
        assert event["statuses"][-1] == 200
        (row,) = inbox_rows(db_url)
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        assert 'outbox_relay_webhooks_duplicates_total{provider="stripe"} 1.0' in metrics

        async def apply() -> int:
            db = Database(db_url, pool_size=2, name="crash-apply")
            await db.open()
            try:
                inbox = applier(db)
                return await inbox.run_once() + await inbox.run_once()
            finally:
                await db.close()

        assert anyio.run(apply) == 1, "one notification, applied once"
        (row,) = inbox_rows(db_url)
        assert row["status"] == "applied"
    finally:
        for receiver in (first, second):
            if receiver is not None:
                receiver.stop()
        fake.stop()


def _captured_payment(db_url: str, fake_url: str) -> str:
    async def run() -> None:
        insert_intents(
            db_url,
            [
                {
                    "payment_id": "pay-k",
                    "action": "charge",
                    "amount_minor": 4000,
                    "payment_method": "pm_card_visa",
                }
            ],
        )
        async with stripe_adapter(fake_url) as adapter:
            await run_until_settled(db_url, [make_relay(db_url, adapter, instance="setup")])

    anyio.run(run)
    with psycopg.connect(db_url) as conn:
        row = conn.execute(
            "SELECT provider_reference FROM outbox.payments WHERE payment_id = 'pay-k'"
        ).fetchone()
    assert row is not None
    return str(row[0])


def _store_dashboard_refund(db_url: str, reference: str) -> None:
    """A refund of 700 made in the dashboard, stored as the receiver stores it."""
    body = json.dumps(
        {
            "id": "evt_dashboard_refund",
            "object": "event",
            "type": "charge.refunded",
            "created": int(time.time()),
            "data": {
                "object": {
                    "id": "ch_k",
                    "object": "charge",
                    "payment_intent": reference,
                    "currency": "eur",
                    "amount_captured": 4000,
                    "amount_refunded": 700,
                    "refunds": {
                        "object": "list",
                        "data": [
                            {
                                "id": "re_dash",
                                "amount": 700,
                                "status": "succeeded",
                                "metadata": {},
                            }
                        ],
                    },
                }
            },
        }
    )
    # Stored as the receiver stores it (its own crash is the test above).
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO outbox.webhook_inbox (provider, event_id, event_type, payload)"
            " VALUES ('stripe', 'evt_dashboard_refund', 'charge.refunded', %s)",
            (body,),
        )


def test_relay_killed_mid_apply_applies_once_after_the_lease(db_url: str, tmp_path: Path) -> None:
    fake = FakeProviderProcess(tmp_path)
    try:
        reference = _captured_payment(db_url, fake.url)
        _store_dashboard_refund(db_url, reference)
        env = {
            **BASE_ENV,
            "RELAY_DATABASE_URL": db_url,
            "RELAY_PROVIDERS__STRIPE__API_KEY": API_KEY,
            "RELAY_PROVIDERS__STRIPE__BASE_URL": fake.url,
            "RELAY_PROVIDERS__STRIPE__TIMEOUT_MS": "2000",
            "RELAY_LEASE_SECONDS": "3",
            "RELAY_JANITOR_ENABLED": "false",
            "RELAY_LOG_FORMAT": "json",
        }
        relay = RelayProcess("inbox-relay-1", env, tmp_path)
        holder = psycopg.connect(db_url)
        try:
            # Hold the payment's lock: the relay's apply transaction takes the notification
            # (inbox_take) and then waits here, in the middle of applying.
            holder.execute("SELECT 1 FROM outbox.payments WHERE payment_id = 'pay-k' FOR UPDATE")
            relay.start()

            def waiting_mid_apply() -> bool:
                with psycopg.connect(db_url, autocommit=True) as conn:
                    row = conn.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE application_name ="
                        " 'inbox-relay-1' AND wait_event_type = 'Lock'"
                        " AND datname = current_database()"
                    ).fetchone()
                return bool(row and row[0])

            block_until(waiting_mid_apply, "the relay to wait inside its apply transaction")
            relay.kill()
        finally:
            holder.rollback()
            holder.close()
        (row,) = inbox_rows(db_url)
        assert row["status"] == "received" and row["attempts"] == 1
        with psycopg.connect(db_url) as conn:
            refunded = conn.execute(
                "SELECT refunded_minor FROM outbox.payments WHERE payment_id = 'pay-k'"
            ).fetchone()
        assert refunded == (0,), "nothing of the killed apply stayed"

        second = RelayProcess("inbox-relay-2", env, tmp_path)
        second.start()
        try:
            block_until(
                lambda: inbox_rows(db_url)[0]["status"] == "applied",
                "the second relay to apply the notification after the lease",
            )
            # The applier is woken through the relay's own LISTEN connection: the inbox
            # costs a relay no connection of its own (sidecars count them).
            with psycopg.connect(db_url, autocommit=True) as conn:
                listening = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE application_name = 'outbox-relay-listen' AND datname = current_database()"
                ).fetchone()
            assert listening == (1,)
        finally:
            second.terminate()
        (row,) = inbox_rows(db_url)
        assert row["attempts"] == 2
        with psycopg.connect(db_url) as conn:
            cur = conn.cursor(row_factory=dict_row)
            payment = cur.execute(
                "SELECT state, refunded_minor FROM outbox.payments WHERE payment_id = 'pay-k'"
            ).fetchone()
            postings = cur.execute(
                "SELECT amount_minor FROM outbox.ledger_transactions WHERE inbox_id IS NOT NULL"
            ).fetchall()
            events = cur.execute(
                "SELECT count(*) AS n FROM outbox.events WHERE event_type = 'payment.refund.external'"
            ).fetchone()
        assert payment == {"state": "partially_refunded", "refunded_minor": 700}
        assert postings == [{"amount_minor": 700}]
        assert events == {"n": 1}
    finally:
        fake.stop()


# The relay's shutdown promise (README, "Shutdown"): SIGTERM drains in-flight work within
# RELAY_SHUTDOWN_GRACE_SECONDS and the process exits within the grace plus the final
# flush's minimum (1 s), whatever is down. An apply waiting on a lock is in-flight work.
SHUTDOWN_GRACE_SECONDS = 2.0
APPLY_LEASE_SECONDS = 8.0  # longer than grace + 1 s: the lease must not be what ends it


def _log_events(path: Path) -> list[dict[str, Any]]:
    events = []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return events


def _logged_at(events: list[dict[str, Any]], name: str) -> datetime:
    found = [e for e in events if e.get("event") == name]
    assert found, f"no {name} line in the relay's log"
    return datetime.fromisoformat(found[-1]["timestamp"])


def test_sigterm_cuts_off_an_apply_at_the_shutdown_deadline(db_url: str, tmp_path: Path) -> None:
    """An apply that waits on a lock used to hold the shutdown until its lease ended; it
    is cancelled at the relay's in-flight cut-off, rolls back whole, and is applied once
    after the lease by another relay. Timings are the relay's own log timestamps."""
    fake = FakeProviderProcess(tmp_path)
    try:
        reference = _captured_payment(db_url, fake.url)
        _store_dashboard_refund(db_url, reference)
        env = {
            **BASE_ENV,
            "RELAY_DATABASE_URL": db_url,
            "RELAY_PROVIDERS__STRIPE__API_KEY": API_KEY,
            "RELAY_PROVIDERS__STRIPE__BASE_URL": fake.url,
            "RELAY_PROVIDERS__STRIPE__TIMEOUT_MS": "2000",
            "RELAY_LEASE_SECONDS": str(APPLY_LEASE_SECONDS),
            "RELAY_SHUTDOWN_GRACE_SECONDS": str(SHUTDOWN_GRACE_SECONDS),
            "RELAY_JANITOR_ENABLED": "false",
            "RELAY_LOG_FORMAT": "json",
        }
        relay = RelayProcess("inbox-stop-1", env, tmp_path)
        holder = psycopg.connect(db_url)
        try:
            holder.execute("SELECT 1 FROM outbox.payments WHERE payment_id = 'pay-k' FOR UPDATE")
            relay.start()
            relay.wait_ready()

            def waiting_mid_apply() -> bool:
                with psycopg.connect(db_url, autocommit=True) as conn:
                    row = conn.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE application_name ="
                        " 'inbox-stop-1' AND wait_event_type = 'Lock'"
                        " AND datname = current_database()"
                    ).fetchone()
                return bool(row and row[0])

            block_until(waiting_mid_apply, "the relay to wait inside its apply transaction")
            assert relay.proc is not None
            relay.proc.send_signal(signal.SIGTERM)
            try:
                code = relay.proc.wait(120)  # a hang guard only
            except subprocess.TimeoutExpired:
                relay.kill()
                pytest.fail(f"the relay did not exit after SIGTERM; see {relay.log_path}")
        finally:
            holder.rollback()
            holder.close()
        events = _log_events(relay.log_path)
        names = [e.get("event") for e in events]
        assert "shutdown_deadline_exceeded_exit_now" not in names, relay.log_path
        assert code == 0, f"exit {code}; see {relay.log_path}"
        draining = _logged_at(events, "draining")
        cut_off = _logged_at(events, "inbox_apply_cut_off")
        exited = _logged_at(events, "relay_exit")
        assert (cut_off - draining).total_seconds() <= SHUTDOWN_GRACE_SECONDS
        assert (exited - draining).total_seconds() <= SHUTDOWN_GRACE_SECONDS + 1.0, (
            f"exited {(exited - draining).total_seconds():.2f} s after the signal"
        )
        (row,) = inbox_rows(db_url)
        assert row["status"] == "received" and row["attempts"] == 1
        with psycopg.connect(db_url) as conn:
            refunded = conn.execute(
                "SELECT refunded_minor FROM outbox.payments WHERE payment_id = 'pay-k'"
            ).fetchone()
        assert refunded == (0,), "nothing of the cut-off apply stayed"

        second = RelayProcess("inbox-stop-2", env, tmp_path)
        second.start()
        try:
            block_until(
                lambda: inbox_rows(db_url)[0]["status"] == "applied",
                "the second relay to apply the notification after the lease",
            )
        finally:
            second.terminate()
        with psycopg.connect(db_url) as conn:
            postings = conn.execute(
                "SELECT amount_minor FROM outbox.ledger_transactions WHERE inbox_id IS NOT NULL"
            ).fetchall()
            refunded = conn.execute(
                "SELECT refunded_minor FROM outbox.payments WHERE payment_id = 'pay-k'"
            ).fetchone()
        assert postings == [(700,)] and refunded == (700,), "applied once"
    finally:
        fake.stop()


def _store_refund_of(db_url: str, event_id: str, reference: str) -> None:
    body = json.dumps(
        {
            "id": event_id,
            "object": "event",
            "type": "charge.refunded",
            "created": int(time.time()),
            "data": {
                "object": {
                    "id": "ch_" + event_id,
                    "object": "charge",
                    "payment_intent": reference,
                    "currency": "eur",
                    "amount_captured": 4000,
                    "amount_refunded": 100,
                    "refunds": {"object": "list", "data": []},
                }
            },
        }
    )
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO outbox.webhook_inbox (provider, event_id, event_type, payload)"
            " VALUES ('stripe', %s, 'charge.refunded', %s)",
            (event_id, body),
        )


def test_applies_waiting_on_locks_leave_the_claim_loop_its_connections(
    db_url: str, tmp_path: Path
) -> None:
    """RELAY_DB_POOL_SIZE=3 with two write-back writers leaves one connection for applies,
    whatever RELAY_WEBHOOKS_APPLY_CONCURRENCY asks: two applies waiting on payments'
    locks used to hold two of the three, and a new intent's claim and write-back then
    shared what was left (at a pool of 2, nothing: the relay stopped)."""
    fake = FakeProviderProcess(tmp_path)
    try:

        async def charge_two() -> None:
            insert_intents(
                db_url,
                [
                    {
                        "payment_id": p,
                        "action": "charge",
                        "amount_minor": 4000,
                        "payment_method": "pm_card_visa",
                    }
                    for p in ("pay-a", "pay-b")
                ],
            )
            async with stripe_adapter(fake.url) as adapter:
                await run_until_settled(db_url, [make_relay(db_url, adapter, instance="setup")])

        anyio.run(charge_two)
        with psycopg.connect(db_url) as conn:
            refs = dict(conn.execute("SELECT payment_id, provider_reference FROM outbox.payments"))
        _store_refund_of(db_url, "evt_a", refs["pay-a"])
        _store_refund_of(db_url, "evt_b", refs["pay-b"])
        env = {
            **BASE_ENV,
            "RELAY_DATABASE_URL": db_url,
            "RELAY_PROVIDERS__STRIPE__API_KEY": API_KEY,
            "RELAY_PROVIDERS__STRIPE__BASE_URL": fake.url,
            "RELAY_PROVIDERS__STRIPE__TIMEOUT_MS": "2000",
            "RELAY_DB_POOL_SIZE": "3",
            "RELAY_WEBHOOKS_APPLY_CONCURRENCY": "2",
            "RELAY_JANITOR_ENABLED": "false",
            "RELAY_LOG_FORMAT": "json",
        }
        relay = RelayProcess("inbox-pool-1", env, tmp_path)
        holder = psycopg.connect(db_url)

        def waiting_on_locks() -> int:
            with psycopg.connect(db_url, autocommit=True) as conn:
                row = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name ="
                    " 'inbox-pool-1' AND wait_event_type = 'Lock'"
                    " AND datname = current_database()"
                ).fetchone()
            return int(row[0]) if row else 0

        try:
            holder.execute(
                "SELECT 1 FROM outbox.payments WHERE payment_id IN ('pay-a', 'pay-b') FOR UPDATE"
            )
            relay.start()
            relay.wait_ready()
            block_until(waiting_on_locks, "an apply to wait on a payment's lock")
            insert_intents(
                db_url,
                [
                    {
                        "payment_id": "pay-c",
                        "action": "charge",
                        "amount_minor": 700,
                        "payment_method": "pm_card_visa",
                    }
                ],
            )

            def charged() -> bool:
                with psycopg.connect(db_url) as conn:
                    row = conn.execute(
                        "SELECT status FROM outbox.payment_intents WHERE payment_id = 'pay-c'"
                    ).fetchone()
                return row == ("succeeded",)

            block_until(charged, "the new intent claimed, charged and written back")
            # The second notification was claimed too, but waits for an apply slot, not
            # on a connection of the pool.
            assert waiting_on_locks() == 1
        finally:
            holder.rollback()
            holder.close()
        block_until(
            lambda: all(r["status"] == "applied" for r in inbox_rows(db_url)),
            "both notifications applied once the locks are gone",
        )
        relay.terminate()
        ready = [e for e in _log_events(relay.log_path) if e.get("event") == "relay_ready"]
        assert ready[-1]["pool_size"] == 3
        assert (ready[-1]["write_back_writers"], ready[-1]["webhook_applies"]) == (2, 1)
    finally:
        fake.stop()
