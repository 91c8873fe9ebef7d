"""Operator commands against a real database: what they print and what they change.

`dead-letters retry` really re-drives (a running relay finishes the intents, under their
first keys, in payment order), `dead-letters cancel` really ends (the next intent of the
payment runs), and every action leaves audit rows naming the operator.
"""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.invariants import assert_exactly_once
from tests.processes import FakeProviderProcess, RelayProcess
from tests.support.cli import BASE_ENV, run_cli
from tests.support.dead_intents import history, insert, make_dead, state
from tests.support.sql import rows
from tests.support.waiting import block_until

pytestmark = pytest.mark.integration


@pytest.fixture
def audited_db(db_url: str) -> str:
    """The test database; its audit trail comes from sql/0005."""
    with psycopg.connect(db_url) as conn:
        present = conn.execute("SELECT to_regclass('outbox.audit_log') IS NOT NULL").fetchone()
    assert present == (True,), "sql/0005 installs outbox.audit_log"
    return db_url


def cli(
    db_url: str, *args: str, stdin: str | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, env={"RELAY_DATABASE_URL": db_url, **env}, stdin=stdin)


# -- help -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [
        ["status"],
        ["dead-letters"],
        ["dead-letters", "list"],
        ["dead-letters", "retry"],
        ["dead-letters", "cancel"],
        ["intents"],
        ["intents", "show"],
    ],
)
def test_every_operator_command_has_help(command: list[str]) -> None:
    result = run_cli(*command, "--help")
    assert result.returncode == 0
    assert result.stdout.startswith("usage: outbox-relay " + " ".join(command))
    assert len(result.stdout.splitlines()) > 5


# -- retry re-drives, with a real relay -----------------------------------------------------------


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[FakeProviderProcess]:
    provider = FakeProviderProcess(tmp_path, "--rate-503", "1.0")
    yield provider
    provider.stop()


def test_retry_redrives_dead_intents_under_their_keys_in_payment_order(
    audited_db: str, fake: FakeProviderProcess, tmp_path: Path
) -> None:
    db_url = audited_db
    auth_a, capture_a, auth_b, capture_b, charge_c = insert(
        db_url,
        ("rd-a", "authorize", 1500, "pm_card_visa"),
        ("rd-a", "capture", None, None),
        ("rd-b", "authorize", 2500, "pm_card_visa"),
        ("rd-b", "capture", 1000, None),
        ("rd-c", "charge", 900, "pm_card_mastercard"),
    )
    keys_before = dict(rows(db_url, "SELECT id, idempotency_key FROM outbox.payment_intents"))
    relay = RelayProcess(
        "redrive-relay",
        {
            "RELAY_DATABASE_URL": db_url,
            "RELAY_PROVIDERS__STRIPE__API_KEY": "sk_test_redrive",
            "RELAY_PROVIDERS__STRIPE__BASE_URL": fake.url,
            "RELAY_PROVIDERS__STRIPE__BREAKER_FAILURE_THRESHOLD": "1000",
            "RELAY_MAX_ATTEMPTS": "2",
            "RELAY_BACKOFF_BASE_SECONDS": "0.05",
            "RELAY_BACKOFF_CAP_SECONDS": "0.1",
            "RELAY_POLL_INTERVAL_SECONDS": "0.1",
            "RELAY_POLL_MAX_INTERVAL_SECONDS": "0.3",
            "RELAY_LOG_FORMAT": "json",
        },
        tmp_path,
    )
    relay.start()
    try:
        relay.wait_ready()
        # Every 503 is retried once, then the intent is dead; the captures wait behind.
        block_until(
            lambda: (
                rows(
                    db_url,
                    "SELECT status, count(*) FROM outbox.payment_intents GROUP BY 1 ORDER BY 1",
                )
                == [("blocked", 2), ("dead", 3)]
            )
        )
        listed = cli(db_url, "dead-letters", "list", "--json")
        assert listed.returncode == 0
        dead = json.loads(listed.stdout)
        assert sorted(d["id"] for d in dead) == [auth_a, auth_b, charge_c]
        error_code = dead[0]["error_code"]
        assert {d["error_code"] for d in dead} == {error_code} and {
            d["attempts"] for d in dead
        } == {2}

        table = cli(db_url, "dead-letters", "list")
        assert table.stdout.splitlines()[0].split()[:4] == ["id", "payment", "provider", "action"]
        assert "15.00 EUR" in table.stdout and error_code in table.stdout

        fake.configure({"rate_503": 0.0})  # the provider is back
        retried = cli(
            db_url,
            "dead-letters",
            "retry",
            "--provider",
            "stripe",
            "--error-code",
            error_code,
            "--yes",
            "--operator",
            "alice",
        )
        assert retried.returncode == 0, retried.stderr
        assert "retried 3 intent(s) as operator:alice" in retried.stdout
        assert "retry: 3/3 (100%)" in retried.stderr
        block_until(
            lambda: (
                rows(db_url, "SELECT DISTINCT status FROM outbox.payment_intents")
                == [("succeeded",)]
            )
        )
        assert relay.terminate(timeout=60) == 0
        effects = fake.effects()
        requests = fake_requests(fake)
    finally:
        relay.kill()

    # Same keys as before, each applied once; the provider saw each key refused, then served.
    assert (
        dict(rows(db_url, "SELECT id, idempotency_key FROM outbox.payment_intents")) == keys_before
    )
    assert_exactly_once(db_url, effects, expected_intents=5)
    for intent_id in (auth_a, auth_b, charge_c):
        statuses = [r["status"] for r in requests if r["idempotency_key"] == keys_before[intent_id]]
        assert statuses[:2] == [503, 503] and statuses[-1] == 200
    # Per-payment order: each capture went to the provider after its authorize succeeded.
    for auth, capture in ((auth_a, capture_a), (auth_b, capture_b)):
        first_capture = next(
            i for i, r in enumerate(requests) if r["idempotency_key"] == keys_before[capture]
        )
        last_auth = max(
            i for i, r in enumerate(requests) if r["idempotency_key"] == keys_before[auth]
        )
        assert last_auth < first_capture
    # The audit trail names the operator on the re-drive.
    for intent_id in (auth_a, auth_b, charge_c):
        assert ("operator:alice", "pending") in history(db_url, intent_id)
    shown = cli(db_url, "intents", "show", str(auth_a))
    assert shown.returncode == 0
    assert "operator:alice" in shown.stdout and "status: dead → pending" in shown.stdout


def fake_requests(fake: FakeProviderProcess) -> list[dict[str, Any]]:
    import httpx

    response = httpx.get(f"{fake.url}/_fake/requests", timeout=30)
    response.raise_for_status()
    found: list[dict[str, Any]] = response.json()["requests"]
    return found


# -- cancel ends, and the payment moves on ---------------------------------------------------------


def test_cancel_ends_the_dead_intent_and_promotes_the_next(audited_db: str) -> None:
    db_url = audited_db
    auth, capture, refund = insert(
        db_url,
        ("cx-1", "authorize", 1000, "pm_card_visa"),
        ("cx-1", "capture", None, None),
        ("cx-1", "refund", None, None),
    )
    make_dead(db_url, [auth], "provider_timeout")
    result = cli(
        db_url,
        "dead-letters",
        "cancel",
        str(auth),
        "--reason",
        "voided by hand at the provider",
        "--operator",
        "bob",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["operator"] == "bob"
    assert report["done"] == [
        {"intent_id": auth, "payment_id": "cx-1", "status": "failed", "promoted_intent_id": capture}
    ]
    status, _, error_code, message, _, completed_at = state(db_url, auth)
    assert (status, error_code) == ("failed", "cancelled_by_operator")
    assert message == "cancelled by operator:bob: voided by hand at the provider"
    assert completed_at is not None
    assert state(db_url, capture)[0] == "pending", "the next intent runs"
    assert state(db_url, refund)[0] == "blocked", "and only the next one"
    events = rows(
        db_url,
        "SELECT event_type, payload -> 'intent' ->> 'error_code', payload ->> 'event_id' = event_id::text"
        " FROM outbox.events WHERE payment_id = 'cx-1'",
    )
    assert events == [("payment.authorize.failed", "cancelled_by_operator", True)]
    assert ("operator:bob", "failed") in history(db_url, auth)
    assert ("operator:bob", "pending") in history(db_url, capture)
    reasons = rows(
        db_url,
        "SELECT reason FROM outbox.audit_log WHERE entity = 'intent' AND entity_id = %s"
        " AND actor = 'operator:bob'",
        str(auth),
    )
    assert reasons == [("voided by hand at the provider",)]
    promoted_because = rows(
        db_url,
        "SELECT reason FROM outbox.audit_log WHERE entity = 'intent' AND entity_id = %s"
        " AND actor = 'operator:bob'",
        str(capture),
    )
    assert promoted_because == [(f"promoted: intent {auth} before it was cancelled",)]

    again = cli(db_url, "dead-letters", "cancel", str(auth), "--operator", "bob")
    assert again.returncode == 1
    assert f"skipped intent {auth}: not dead (failed)" in again.stdout


# -- selections: filters, confirmation, batches, progress ------------------------------------------


def test_bulk_retry_selects_by_filters_asks_first_and_shows_progress(audited_db: str) -> None:
    db_url = audited_db
    ids = insert(
        db_url,
        *[(f"bulk-{n}", "charge", 100 + n, "pm_card_visa") for n in range(7)],
        ("bulk-other", "charge", 100, "pm_card_visa", "adyen"),
    )
    old_rate_limited = ids[:5]
    make_dead(db_url, old_rate_limited, "rate_limited", "3 hours")
    make_dead(db_url, [ids[5]], "rate_limited", "10 minutes")  # too recent
    make_dead(db_url, [ids[6]], "card_token_invalid", "3 hours")  # other error
    make_dead(db_url, [ids[7]], "rate_limited", "3 hours")  # other provider
    keys = dict(rows(db_url, "SELECT id, idempotency_key FROM outbox.payment_intents"))
    selection = ["--provider", "stripe", "--error-code", "rate_limited", "--older-than", "2h"]

    listed = json.loads(cli(db_url, "dead-letters", "list", *selection, "--json").stdout)
    assert sorted(d["id"] for d in listed) == old_rate_limited
    assert all(d["dead_seconds"] > 2 * 3600 for d in listed)

    refused = cli(db_url, "dead-letters", "retry", *selection, "--operator", "carol")
    assert refused.returncode == 1
    assert "refusing to retry them without --yes" in refused.stderr
    declined = cli(db_url, "dead-letters", "retry", "--all", "--operator", "carol", stdin="n\n")
    assert declined.returncode == 1
    assert [state(db_url, i)[0] for i in ids] == ["dead"] * 8, "nothing changed"

    done = cli(
        db_url,
        "dead-letters",
        "retry",
        *selection,
        "--yes",
        "--batch-size",
        "2",
        "--operator",
        "carol",
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == ["retry: 2/5 (40%)", "retry: 4/5 (80%)", "retry: 5/5 (100%)"]
    assert "retried 5 intent(s) as operator:carol" in done.stdout
    for intent_id in old_rate_limited:
        status, attempts, error_code, message, key, completed_at = state(db_url, intent_id)
        assert (status, attempts, error_code, message, completed_at) == (
            "pending",
            0,
            None,
            None,
            None,
        )
        assert key == keys[intent_id], "never a new key"
        assert ("operator:carol", "pending") in history(db_url, intent_id)
    assert [state(db_url, i)[0] for i in ids[5:]] == ["dead"] * 3, "the rest is untouched"
    due = rows(
        db_url,
        "SELECT count(*) FROM outbox.payment_intents WHERE id = ANY(%s) AND available_at <= now()",
        old_rate_limited,
    )
    assert due == [(5,)]

    nothing = cli(db_url, "dead-letters", "retry", *selection, "--yes")
    assert nothing.returncode == 0 and "nothing to do" in nothing.stdout


def test_a_selection_or_ids_is_required_and_the_operator_named(db_url: str) -> None:
    bare = cli(db_url, "dead-letters", "retry")
    assert bare.returncode == 2 and "--all" in bare.stderr
    both = cli(db_url, "dead-letters", "cancel", "1", "--all")
    assert both.returncode == 2
    blank = cli(db_url, "dead-letters", "retry", "1", "--operator", " ")
    assert blank.returncode == 2 and "--operator" in blank.stderr
    missing = cli(db_url, "dead-letters", "retry", "424242", "--operator", "dan")
    assert missing.returncode == 1 and "skipped intent 424242: no such intent" in missing.stdout
    age = cli(db_url, "dead-letters", "list", "--older-than", "soon")
    assert age.returncode == 2 and "45s, 30m, 2h" in age.stderr


def test_default_operator_comes_from_the_environment(audited_db: str) -> None:
    (intent,) = insert(audited_db, ("env-op", "charge", 100, "pm_card_visa"))
    make_dead(audited_db, [intent])
    result = cli(audited_db, "dead-letters", "retry", str(intent), RELAY_OPERATOR="erin")
    assert result.returncode == 0 and "operator:erin" in result.stdout
    assert ("operator:erin", "pending") in history(audited_db, intent)


def test_retry_keeps_an_intent_past_its_key_lifetime_dead_until_it_is_safe(
    audited_db: str,
) -> None:
    db_url = audited_db
    old, young = insert(
        db_url, ("life-1", "charge", 100, "pm_card_visa"), ("life-2", "charge", 100, "pm_card_visa")
    )
    make_dead(db_url, [old, young], "provider_timeout")
    with psycopg.connect(db_url) as conn:
        conn.execute(
            "UPDATE outbox.payment_intents SET created_at = now() - interval '30 hours'"
            " WHERE id = %s",
            (old,),
        )
    result = cli(db_url, "dead-letters", "retry", "--all", "--yes", "--operator", "gina")
    assert result.returncode == 1
    assert "kept dead 1 intent(s) sent longer ago than their provider's" in result.stdout
    assert f": {old}" in result.stdout and "--allow-expired-keys" in result.stdout
    assert state(db_url, old)[0] == "dead" and state(db_url, young)[0] == "pending"

    # The janitor looked it up and found no effect since it died: safe to send again.
    with psycopg.connect(db_url) as conn:
        conn.execute(
            "INSERT INTO outbox.janitor_checks (intent_id, payment_id, provider, dead_at, result)"
            " SELECT id, payment_id, provider, completed_at, 'no_effect'"
            " FROM outbox.payment_intents WHERE id = %s",
            (old,),
        )
    settled = cli(db_url, "dead-letters", "retry", str(old), "--operator", "gina", "--json")
    assert settled.returncode == 0, settled.stdout
    assert json.loads(settled.stdout)["done"] == [
        {"intent_id": old, "payment_id": "life-1", "status": "pending", "note": None}
    ]

    # Without the janitor's word, only an explicit flag re-drives it.
    make_dead(db_url, [old], "provider_timeout")
    with psycopg.connect(db_url) as conn:
        conn.execute("UPDATE outbox.payment_intents SET completed_at = now() WHERE id = %s", (old,))
    assert cli(db_url, "dead-letters", "retry", str(old)).returncode == 1
    forced = cli(db_url, "dead-letters", "retry", str(old), "--allow-expired-keys")
    assert forced.returncode == 0 and state(db_url, old)[0] == "pending"


# -- the SQL API itself ------------------------------------------------------------------------------


def test_sql_retry_keeps_payment_order_and_refuses_a_nameless_operator(
    conn: psycopg.Connection,
) -> None:
    first, second, third = (
        conn.execute(
            "INSERT INTO outbox.payment_intents (payment_id, action, provider, amount_minor,"
            " currency, payment_method) VALUES ('sq-1', 'charge', 'stripe', 100, 'EUR',"
            " 'pm_card_visa') RETURNING id"
        ).fetchone()[0]  # type: ignore[index]
        for _ in range(3)
    )
    conn.execute(
        "UPDATE outbox.payment_intents SET status = 'dead' WHERE id = ANY(%s)", ([first, second],)
    )
    # The later one alone: it waits behind the earlier dead intent.
    assert conn.execute(
        "SELECT * FROM outbox.retry_dead_intents(ARRAY[%s]::bigint[], 'sql-op')", (second,)
    ).fetchall() == [(second, "sq-1", "blocked", None)]
    conn.execute("UPDATE outbox.payment_intents SET status = 'dead' WHERE id = %s", (second,))
    # Both at once: the first runs, the second waits for it.
    assert conn.execute(
        "SELECT * FROM outbox.retry_dead_intents(ARRAY[%s, %s]::bigint[], 'sql-op')",
        (second, first),
    ).fetchall() == [(first, "sq-1", "pending", None), (second, "sq-1", "blocked", None)]
    assert conn.execute(
        "SELECT status FROM outbox.payment_intents WHERE id = %s", (third,)
    ).fetchone() == ("blocked",)
    with pytest.raises(psycopg.errors.InvalidParameterValue):
        conn.execute("SELECT * FROM outbox.cancel_dead_intents(ARRAY[%s]::bigint[], '')", (first,))
    with pytest.raises(psycopg.errors.InvalidParameterValue):
        conn.execute("SELECT * FROM outbox.retry_dead_intents(ARRAY[%s]::bigint[], NULL)", (first,))


# -- intents show and status -----------------------------------------------------------------------


def test_intents_show_prints_the_intent_its_payment_and_history(audited_db: str) -> None:
    db_url = audited_db
    with psycopg.connect(db_url) as conn:
        # A row written before sql/0009 refused card numbers in metadata: the CLI still
        # redacts what such a row holds.
        conn.execute(
            "INSERT INTO outbox.payment_intents (payment_id, action, provider, amount_minor,"
            " currency, payment_method) VALUES ('show-1', 'authorize', 'stripe', 1999,"
            " 'EUR', 'pm_card_visa')"
        )
        conn.execute(
            "ALTER TABLE outbox.payment_intents DISABLE TRIGGER payment_intents_0_input_guard"
        )
        conn.execute(
            "UPDATE outbox.payment_intents SET metadata = %s WHERE payment_id = 'show-1'",
            (json.dumps({"note": "card 4111 1111 1111 1111", "order": 42}),),
        )
        conn.execute(
            "ALTER TABLE outbox.payment_intents ENABLE TRIGGER payment_intents_0_input_guard"
        )
    insert(db_url, ("show-1", "capture", None, None), ("show-1", "void", None, None))
    auth = rows(db_url, "SELECT id FROM outbox.payment_intents WHERE action = 'authorize'")[0][0]
    make_dead(db_url, [auth], "provider_timeout")
    assert cli(db_url, "dead-letters", "retry", str(auth), "--operator", "frank").returncode == 0

    shown = cli(db_url, "intents", "show", str(auth))
    assert shown.returncode == 0, shown.stderr
    out = shown.stdout
    assert out.startswith(f"intent {auth}: authorize on payment show-1")
    assert "19.99 EUR" in out and "pending" in out
    assert "intents of the payment, in order (3):" in out
    assert "4111" not in out and "[redacted card]" in out
    history_part = out.split("history (")[1]
    assert "operator:frank" in history_part and "status: dead → pending" in history_part

    as_json = json.loads(cli(db_url, "intents", "show", str(auth), "--json").stdout)
    assert as_json["intent"]["id"] == auth and as_json["payment"]["state"] == "new"
    assert [i["action"] for i in as_json["payment_intents"]] == ["authorize", "capture", "void"]
    assert any(h["actor"] == "operator:frank" for h in as_json["history"])
    assert as_json["history_note"] is None

    missing = cli(db_url, "intents", "show", "999999")
    assert missing.returncode == 1 and "no intent 999999" in missing.stderr


@pytest.mark.parametrize("unbuffered", ["1", ""])
def test_output_to_a_reader_that_went_away_ends_quietly(db_url: str, unbuffered: str) -> None:
    """`outbox-relay intents show ID --json | head -1`: head exits after one line."""
    (intent,) = insert(db_url, ("pipe-1", "charge", 100, "pm_card_visa"))
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first write: EPIPE on every write
    try:
        env = {**BASE_ENV, "RELAY_DATABASE_URL": db_url, "PYTHONUNBUFFERED": unbuffered}
        result = subprocess.run(
            [sys.executable, "-m", "relay", "intents", "show", str(intent), "--json"],
            env=env,
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    finally:
        os.close(write_end)
    assert result.stderr == "", "no traceback, no 'Exception ignored'"
    assert result.returncode == 141, "as a process stopped by SIGPIPE"


def test_the_confirmation_question_goes_to_stderr(audited_db: str) -> None:
    """stdout is the command's result (JSON with --json); the question is not part of it."""
    (intent,) = insert(audited_db, ("ask-1", "charge", 100, "pm_card_visa"))
    make_dead(audited_db, [intent])
    terminal, stdin = pty.openpty()  # the question is asked on a terminal only
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "relay", "dead-letters", "retry", "--all", "--json"],
            env={**BASE_ENV, "RELAY_DATABASE_URL": audited_db, "RELAY_OPERATOR": "dora"},
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        os.write(terminal, b"y\n")
        out, err = proc.communicate(timeout=120)
    finally:
        os.close(stdin)
        os.close(terminal)
    assert proc.returncode == 0, err
    assert "retry 1 dead intent(s)" in err and "[y/N]" in err
    done = json.loads(out)["done"]  # stdout is JSON and nothing else
    assert [d["intent_id"] for d in done] == [intent]
    assert state(audited_db, intent)[0] == "pending"


def test_intents_show_without_an_audit_trail_says_so(db_url: str) -> None:
    (intent,) = insert(db_url, ("noaudit", "charge", 100, "pm_card_visa"))
    with psycopg.connect(db_url) as conn:
        conn.execute("DROP TABLE IF EXISTS outbox.audit_log CASCADE")
    shown = cli(db_url, "intents", "show", str(intent))
    assert shown.returncode == 0, shown.stderr
    assert "history: no audit trail (migration 0005 not applied)" in shown.stdout
    as_json = json.loads(cli(db_url, "intents", "show", str(intent), "--json").stdout)
    assert as_json["history"] is None
    assert as_json["history_note"] == "no audit trail (migration 0005 not applied)"


def test_status_shows_depth_dead_intents_and_unpublished_events(db_url: str) -> None:
    ids = insert(
        db_url,
        ("st-1", "charge", 100, "pm_card_visa"),
        ("st-1", "refund", None, None),
        ("st-2", "charge", 100, "pm_card_visa", "adyen"),
    )
    make_dead(db_url, [ids[0]])
    with psycopg.connect(db_url) as conn:
        conn.execute(
            "INSERT INTO outbox.events (routing_key, payload) VALUES ('app.thing', '{}'), ('app.thing', '{}')"
        )
    table = cli(db_url, "status")
    assert table.returncode == 0
    lines = table.stdout.splitlines()
    header = next(line for line in lines if line.startswith("provider"))
    assert header.split() == [
        "provider",
        "blocked",
        "pending",
        "in_flight",
        "succeeded",
        "failed",
        "dead",
        "relays",
        "oldest",
        "pending",
    ]
    stripe = next(line for line in lines if line.startswith("stripe")).split()
    assert stripe[1:8] == ["1", "0", "0", "0", "0", "1", "0"]
    assert "dead intents: 1" in table.stdout and "unpublished events: 2" in table.stdout
    as_json = json.loads(cli(db_url, "status", "--json").stdout)
    assert as_json["dead_letters"] == 1 and as_json["unpublished_events"] == 2
    assert as_json["providers"]["adyen"]["counts"] == {"pending": 1}
    assert as_json["providers"]["adyen"]["oldest_pending_seconds"] >= 0


def test_status_marks_providers_no_running_relay_serves(db_url: str) -> None:
    """A relay's heartbeat row (sql/0018) serves its providers while it is fresh; waiting
    intents of any other provider are UNSERVED: nobody will ever claim them."""
    insert(
        db_url,
        ("us-1", "charge", 100, "pm_card_visa", "stripe"),
        ("us-2", "charge", 100, "pm_card_visa", "paypal"),
    )
    rows(
        db_url,
        "INSERT INTO outbox.relay_instances (instance, providers, heartbeat_interval_seconds,"
        " heartbeat_at) VALUES ('live:1', '{stripe}', 5, now()),"
        " ('gone:2', '{paypal}', 5, now() - interval '31 seconds') RETURNING instance",
    )
    table = cli(db_url, "status")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert next(line for line in lines if line.startswith("stripe")).split()[7] == "1"
    assert next(line for line in lines if line.startswith("paypal")).split()[7] == "0"
    assert [line for line in lines if line.startswith("UNSERVED")] == [
        "UNSERVED paypal: no running relay serves it; its 1 waiting intent(s) stay pending"
        ' until one does (configure RELAY_PROVIDERS__PAYPAL__KIND on a relay; README "Providers'
        ' no relay serves")'
    ]
    assert "running relays: 1 (serving stripe)" in lines
    as_json = json.loads(cli(db_url, "status", "--json").stdout)
    assert as_json["unserved_providers"] == ["paypal"]
    assert [(r["instance"], r["live"]) for r in as_json["relays"]] == [
        ("live:1", True),
        ("gone:2", False),
    ]


def test_intents_show_says_when_a_new_intent_is_recorded_in_the_trail(audited_db: str) -> None:
    """sql/0019: an intent no relay has touched has no audit row yet; `intents show` says so
    and when it will have one, instead of an empty history."""
    (intent,) = insert(audited_db, ("new-1", "authorize", 1000, "pm_card_visa"))
    shown = cli(audited_db, "intents", "show", str(intent))
    assert shown.returncode == 0, shown.stderr
    assert "history: none yet; inserted at" in shown.stdout
    assert "recorded when a relay first claims it" in shown.stdout
