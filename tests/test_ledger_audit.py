"""The ledger and the audit trail on a real PostgreSQL, written by real relay runs.

Tampering is simulated as a superuser would do it: with ``session_replication_role =
replica`` the append-only guards (triggers) are off, which is exactly the case the
checks exist for.
"""

from __future__ import annotations

import json
import re
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from provider_adapters.base import Command, Invalid, Outcome
from provider_adapters.memory import MemoryProvider
from relay.finance.audit import verify_database
from relay.finance.ledger import check_ledger
from relay.infra.queries import QUERIES
from tests.invariants import assert_audit_intact, assert_ledger_balanced
from tests.support import cli as support_cli
from tests.support.intents import insert_intents
from tests.support.relays import make_relay, run_until_settled

pytestmark = [pytest.mark.integration, pytest.mark.anyio]


def workload(n: int) -> list[dict[str, Any]]:
    """Every money path: authorize/capture(partial)/refunds, charge/refund, void, decline,
    and commands the state machine refuses."""
    rows: list[dict[str, Any]] = []
    for i in range(n):
        rows += [
            {
                "payment_id": f"a{i}",
                "action": "authorize",
                "amount_minor": 1000,
                "payment_method": "pm_card_visa",
            },
            {"payment_id": f"a{i}", "action": "capture", "amount_minor": 900},
            {"payment_id": f"a{i}", "action": "refund", "amount_minor": 300},
            {"payment_id": f"a{i}", "action": "refund"},
            {
                "payment_id": f"c{i}",
                "action": "charge",
                "amount_minor": 500,
                "currency": "JPY",
                "payment_method": "pm_card_visa",
            },
            {"payment_id": f"c{i}", "action": "refund", "amount_minor": 200, "currency": "JPY"},
            {
                "payment_id": f"v{i}",
                "action": "authorize",
                "amount_minor": 7000,
                "currency": "KWD",
                "payment_method": "pm_card_visa",
            },
            {"payment_id": f"v{i}", "action": "void", "currency": "KWD"},
            {
                "payment_id": f"h{i}",
                "action": "authorize",
                "amount_minor": 400,
                "payment_method": "pm_card_visa",
            },
            {
                "payment_id": f"d{i}",
                "action": "charge",
                "amount_minor": 100,
                "payment_method": "pm_card_chargeDeclined",
            },
            {"payment_id": f"x{i}", "action": "capture", "amount_minor": 100},
        ]
    return rows


async def settled_run(
    db_url: str, n: int = 5, provider: MemoryProvider | None = None
) -> MemoryProvider:
    insert_intents(db_url, workload(n))
    provider = provider or MemoryProvider()
    await run_until_settled(db_url, [make_relay(db_url, provider, instance="ledger-relay")])
    return provider


@pytest.fixture
def superuser(db_url: str) -> Iterator[psycopg.Connection]:
    """A connection that can turn the guards off (session_replication_role = replica)."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        is_super = conn.execute("SELECT current_setting('is_superuser')").fetchone()
        assert is_super == ("on",), "tamper tests need a superuser (RELAY_TEST_DATABASE_URL)"
        yield conn


def tamper(conn: psycopg.Connection, *statements: str, params: Any = None) -> None:
    with conn.transaction():
        conn.execute("SET LOCAL session_replication_role = replica")
        for statement in statements:
            conn.execute(statement, params)  # type: ignore[arg-type]


def run_cli(*args: str, db_url: str) -> subprocess.CompletedProcess[str]:
    return support_cli.run_cli(*args, env={"RELAY_DATABASE_URL": db_url})


# -- ledger --------------------------------------------------------------------------------


async def test_relay_run_posts_a_balanced_ledger_equal_to_the_payments(db_url: str) -> None:
    await settled_run(db_url)
    report = check_ledger(db_url)
    assert report.problems == []
    assert_ledger_balanced(db_url)
    # 4 + 2 + 2 + 1 succeeded intents per round, one ledger transaction each.
    assert report.transactions == 5 * 9
    balances = {(a.account, a.currency): a.balance for a in report.accounts}
    # a*: authorised 1000, captured 900 (hold of 1000 released), refunded 300 + 600.
    # h*: 400 still held. c*: 500 JPY charged, 200 refunded. v*: 7000 KWD held, then voided.
    assert balances[("stripe:holds", "EUR")] == 5 * 400
    assert balances[("stripe:authorizations", "EUR")] == -5 * 400
    assert balances[("stripe:captured", "EUR")] == -5 * 900
    assert balances[("stripe:refunded", "EUR")] == 5 * 900
    assert balances[("stripe:receivable", "EUR")] == 0  # captured 900, refunded 900
    assert balances[("stripe:receivable", "JPY")] == 5 * 300
    assert balances[("stripe:holds", "KWD")] == 0
    for figures in report.totals.values():
        assert all(ours == books for ours, books in figures.values()), figures
    with psycopg.connect(db_url) as conn:
        kinds = conn.execute(
            "SELECT kind, count(*) FROM outbox.ledger_transactions GROUP BY kind ORDER BY kind"
        ).fetchall()
        actors = conn.execute(
            "SELECT DISTINCT posted_by FROM outbox.ledger_transactions"
        ).fetchall()
    assert kinds == [("authorize", 15), ("capture", 5), ("charge", 5), ("refund", 15), ("void", 5)]
    assert actors == [("relay:ledger-relay",)]

    result = run_cli("ledger", "check", db_url=db_url)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK: every transaction balances" in result.stdout
    # Amounts in currency units, the exponent from outbox.currencies: never bare minor units.
    captured = next(
        line for line in result.stdout.splitlines() if line.split()[:2] == ["stripe", "captured"]
    )
    assert captured.split()[2].count(".") == 1 and captured.split()[3] == "EUR", captured
    as_json = json.loads(run_cli("ledger", "check", "--json", db_url=db_url).stdout)
    assert as_json["ok"] is True and as_json["transactions"] == 45


async def test_ledger_check_detects_a_planted_imbalance(
    db_url: str, superuser: psycopg.Connection
) -> None:
    await settled_run(db_url, n=2)
    row = superuser.execute(
        "SELECT t.id FROM outbox.ledger_transactions t WHERE t.kind = 'capture' ORDER BY t.id LIMIT 1"
    ).fetchone()
    assert row is not None
    txn_id = row[0]
    tamper(
        superuser,
        "UPDATE outbox.ledger_entries SET amount_minor = amount_minor + 1"
        " WHERE id = (SELECT min(id) FROM outbox.ledger_entries WHERE transaction_id = %(t)s"
        "             AND account = 'stripe:receivable')",
        params={"t": txn_id},
    )
    report = check_ledger(db_url)
    kinds = sorted({p.kind for p in report.problems})
    assert kinds == ["payment_mismatch", "unbalanced"]
    unbalanced = [p for p in report.problems if p.kind == "unbalanced"]
    assert [p.subject for p in unbalanced] == [f"ledger transaction {txn_id}"]
    assert "entries sum to +0.01 EUR" in unbalanced[0].message

    result = run_cli("ledger", "check", db_url=db_url)
    assert result.returncode == 1
    assert f"ledger transaction {txn_id}" in result.stdout
    assert "does not balance in EUR" in result.stdout


async def test_ledger_check_detects_a_payment_changed_behind_its_back(
    db_url: str, superuser: psycopg.Connection
) -> None:
    await settled_run(db_url, n=1)
    tamper(superuser, "UPDATE outbox.payments SET captured_minor = 950 WHERE payment_id = 'a0'")
    report = check_ledger(db_url)
    assert [(p.kind, p.subject) for p in report.problems] == [("payment_mismatch", "payment a0")]
    assert (
        "captured 9.50 EUR in the payment vs 9.00 EUR in the ledger" in report.problems[0].message
    )
    # The audit trail sees it too: the payment's chain no longer ends in its live state.
    audit = verify_database(db_url)
    assert [(b.kind, b.entity, b.entity_id) for b in audit.breaks] == [
        ("tail_mismatch", "payment", "a0")
    ]


async def test_succeeded_intent_without_its_posting_is_reported(
    db_url: str, superuser: psycopg.Connection
) -> None:
    await settled_run(db_url, n=1)
    row = superuser.execute(
        "SELECT id FROM outbox.payment_intents WHERE payment_id = 'h0' AND status = 'succeeded'"
    ).fetchone()
    assert row is not None
    tamper(
        superuser,
        "DELETE FROM outbox.ledger_entries WHERE transaction_id IN"
        " (SELECT id FROM outbox.ledger_transactions WHERE intent_id = %(i)s)",
        "DELETE FROM outbox.ledger_transactions WHERE intent_id = %(i)s",
        params={"i": row[0]},
    )
    report = check_ledger(db_url)
    assert (
        "posting",
        f"intent {row[0]}",
    ) in [(p.kind, p.subject) for p in report.problems]


async def test_ledger_rows_are_append_only(db_url: str) -> None:
    await settled_run(db_url, n=1)
    with psycopg.connect(db_url, autocommit=True) as conn:
        for statement in (
            "UPDATE outbox.ledger_entries SET amount_minor = 1",
            "DELETE FROM outbox.ledger_transactions",
            "TRUNCATE outbox.ledger_entries",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):
                conn.execute(statement)  # type: ignore[arg-type]


# -- audit trail ---------------------------------------------------------------------------


async def test_every_transition_is_audited_with_its_actor(db_url: str) -> None:
    await settled_run(db_url, n=1)
    with psycopg.connect(db_url) as conn:
        intent_id = conn.execute(
            "SELECT id FROM outbox.payment_intents WHERE payment_id = 'a0' AND action = 'capture'"
        ).fetchone()
        assert intent_id is not None
        trail = conn.execute(
            "SELECT actor, operation, before ->> 'status', after ->> 'status', chain_seq"
            " FROM outbox.audit_log WHERE entity = 'intent' AND entity_id = %s ORDER BY chain_seq",
            (str(intent_id[0]),),
        ).fetchall()
        payment = conn.execute(
            "SELECT actor, after ->> 'state' FROM outbox.audit_log"
            " WHERE entity = 'payment' AND entity_id = 'a0' ORDER BY chain_seq"
        ).fetchall()
    assert trail == [
        ("db:postgres", "insert", None, "blocked", 1),
        ("relay:ledger-relay", "update", "blocked", "pending", 2),  # promoted by the write-back
        # The claim writes no row (sql/0021): the outcome's row records it, its before
        # names the state it left (in flight, held by this relay, the attempt).
        ("relay:ledger-relay", "update", "in_flight", "succeeded", 3),
    ]
    with psycopg.connect(db_url) as conn:
        outcome = conn.execute(
            "SELECT before, after FROM outbox.audit_log"
            " WHERE entity = 'intent' AND entity_id = %s AND chain_seq = 3",
            (str(intent_id[0]),),
        ).fetchone()
    assert outcome is not None
    assert outcome[0]["claimed_by"] == "ledger-relay"
    assert outcome[0]["attempts"] == outcome[1]["attempts"] == 1
    assert payment == [
        ("db:postgres", "new"),
        ("relay:ledger-relay", "authorized"),
        ("relay:ledger-relay", "captured"),
        ("relay:ledger-relay", "partially_refunded"),
        ("relay:ledger-relay", "refunded"),
    ]
    assert_audit_intact(db_url)
    result = run_cli("audit", "verify", db_url=db_url)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "intact" in result.stdout


async def test_audit_rows_cannot_be_updated_or_deleted(
    db_url: str, superuser: psycopg.Connection
) -> None:
    await settled_run(db_url, n=1)
    # Even the owner (here a superuser): the triggers refuse.
    for statement in (
        "UPDATE outbox.audit_log SET actor = 'someone else'",
        "DELETE FROM outbox.audit_log WHERE id = 1",
        "TRUNCATE outbox.audit_log",
    ):
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):
            superuser.execute(statement)  # type: ignore[arg-type]

    # A role of the application's kind: it writes intents (and so audit rows, through the
    # triggers) and may read the trail; the privileges refuse it any change to the trail,
    # and the functions that write it, before a trigger is even asked.
    role = f"outbox_app_{uuid.uuid4().hex[:8]}"
    superuser.execute(f"CREATE ROLE {role} LOGIN")  # type: ignore[arg-type]
    try:
        superuser.execute(
            f"GRANT CONNECT ON DATABASE {superuser.info.dbname} TO {role};"  # type: ignore[arg-type]
            f"GRANT USAGE ON SCHEMA outbox TO {role};"
            f"GRANT SELECT ON ALL TABLES IN SCHEMA outbox TO {role};"
            f"GRANT INSERT ON outbox.payment_intents, outbox.payments TO {role};"
            f"GRANT UPDATE ON outbox.payments TO {role};"
        )
        as_app = psycopg.conninfo.make_conninfo(db_url, user=role)
        with psycopg.connect(as_app, autocommit=True) as app:
            app.execute(
                "INSERT INTO outbox.payment_intents (payment_id, action, provider, amount_minor,"
                " currency, payment_method) VALUES ('by-app', 'charge', 'stripe', 10, 'EUR',"
                " 'pm_card_visa')"
            )
            for statement in (
                "UPDATE outbox.audit_log SET actor = 'x'",
                "DELETE FROM outbox.audit_log",
                "TRUNCATE outbox.audit_log",
                "INSERT INTO outbox.audit_log (at, actor, entity, entity_id, operation, chain_seq,"
                " hash) VALUES (now(), 'x', 'intent', '1', 'insert', 99, 'x')",
                "SELECT outbox.audit_write('intent', '1', 'a0', 'update', NULL, '{}', 'forger')",
                "SELECT outbox.ledger_post('[{\"id\": 1}]', 'forger')",
                "DELETE FROM outbox.ledger_entries",
            ):
                with pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied"):
                    app.execute(statement)  # type: ignore[arg-type]
        # The INSERT records who inserted; the relay's claim writes the creation rows with
        # that actor and the INSERT's time (sql/0019), and no row of its own (sql/0021).
        assert superuser.execute(
            "SELECT count(*) FROM outbox.audit_log WHERE payment_id = 'by-app'"
        ).fetchone() == (0,)
        claim = {"instance": "r1", "provider": "stripe", "now": None, "limit": 10}
        superuser.execute(QUERIES["claim_intents"], {**claim, "lease_seconds": 30})
        rows = superuser.execute(
            "SELECT a.entity, a.operation, a.actor, a.at = coalesce(i.created_at, p.created_at)"
            " FROM outbox.audit_log AS a"
            " LEFT JOIN outbox.payment_intents AS i ON a.entity = 'intent' AND i.id::text = a.entity_id"
            " LEFT JOIN outbox.payments AS p ON a.entity = 'payment' AND p.payment_id = a.entity_id"
            " WHERE a.payment_id = 'by-app' ORDER BY a.id"
        ).fetchall()
        assert rows == [
            ("payment", "insert", f"db:{role}", True),
            ("intent", "insert", f"db:{role}", True),
        ]
    finally:
        superuser.execute(f"DROP OWNED BY {role}; DROP ROLE {role}")  # type: ignore[arg-type]
    assert verify_database(db_url).intact


def _chain(conn: psycopg.Connection, payment_id: str) -> list[tuple[int, int]]:
    """(id, chain_seq) of the payment's own chain, in order."""
    return [
        (int(r[0]), int(r[1]))
        for r in conn.execute(
            "SELECT id, chain_seq FROM outbox.audit_log"
            " WHERE entity = 'payment' AND entity_id = %s ORDER BY chain_seq",
            (payment_id,),
        )
    ]


_FORGE = """
INSERT INTO outbox.audit_log
    (id, at, actor, entity, entity_id, payment_id, operation, before, after, chain_seq, prev_hash, hash)
SELECT f.id, f.at, 'operator:mallory', 'payment', 'a0', 'a0', 'update', NULL, '{"state": "voided"}',
       %(seq)s, p.hash,
       sha256(outbox.audit_canonical(f.id, f.at, 'operator:mallory', 'payment', 'a0', 'a0', 'update',
                                     NULL, NULL, '{"state": "voided"}', %(seq)s, p.hash))
FROM (SELECT nextval('outbox.audit_log_id_seq') AS id, now() AS at) AS f,
     outbox.audit_log AS p
WHERE p.entity = 'payment' AND p.entity_id = 'a0' AND p.chain_seq = %(seq)s - 1
"""


@pytest.mark.parametrize("tampering", ["edited", "deleted", "inserted", "reordered"])
async def test_verify_names_the_first_broken_link(
    db_url: str, superuser: psycopg.Connection, tampering: str
) -> None:
    await settled_run(db_url, n=1)
    assert verify_database(db_url).intact
    chain = _chain(superuser, "a0")
    assert len(chain) == 5
    (_, _), (id2, _), (id3, _), (id4, _), (_, _) = chain
    if tampering == "edited":
        tamper(
            superuser,
            "UPDATE outbox.audit_log SET after = after || '{\"captured_minor\": 1}' WHERE id = %(id)s",
            params={"id": id3},
        )
        named = id3
    elif tampering == "deleted":
        tamper(superuser, "DELETE FROM outbox.audit_log WHERE id = %(id)s", params={"id": id3})
        named = id4  # the first row whose link points at nothing
    elif tampering == "inserted":
        # The strongest forger: renumbers the rows after the gap and hashes the forged row
        # correctly onto its predecessor.
        tamper(
            superuser,
            "UPDATE outbox.audit_log SET chain_seq = chain_seq + 100"
            " WHERE entity = 'payment' AND entity_id = 'a0' AND chain_seq >= 3",
            "UPDATE outbox.audit_log SET chain_seq = chain_seq - 99"
            " WHERE entity = 'payment' AND entity_id = 'a0' AND chain_seq >= 103",
            _FORGE,
            params={"seq": 3},
        )
        forged = superuser.execute(
            "SELECT id FROM outbox.audit_log WHERE actor = 'operator:mallory'"
        ).fetchone()
        assert forged is not None
        named = forged[0]
    else:
        tamper(
            superuser,
            "UPDATE outbox.audit_log SET chain_seq = 100 WHERE id = %(a)s",
            "UPDATE outbox.audit_log SET chain_seq = 2 WHERE id = %(b)s",
            "UPDATE outbox.audit_log SET chain_seq = 3 WHERE id = %(a)s",
            params={"a": id2, "b": id3},
        )
        named = id3  # now at position 2, it links to a row that comes after it
    report = verify_database(db_url)
    first = report.first_break
    assert first is not None
    assert (first.kind, first.row_id, first.entity, first.entity_id) == (
        tampering,
        named,
        "payment",
        "a0",
    )
    assert len(report.breaks) == 1, report.breaks

    result = run_cli("audit", "verify", db_url=db_url)
    assert result.returncode == 1
    assert f"first broken link: audit row {named} (payment a0" in result.stdout
    as_json = json.loads(run_cli("audit", "verify", "--json", db_url=db_url).stdout)
    assert as_json["intact"] is False
    assert as_json["first_break"]["row_id"] == named
    assert as_json["first_break"]["kind"] == tampering


async def test_verify_names_the_earliest_break_across_chains(
    db_url: str, superuser: psycopg.Connection
) -> None:
    await settled_run(db_url, n=2)
    early = _chain(superuser, "a1")[1][0]
    late = _chain(superuser, "a0")[-1][0]
    early, late = min(early, late), max(early, late)
    tamper(
        superuser,
        "UPDATE outbox.audit_log SET actor = 'operator:mallory' WHERE id IN (%(a)s, %(b)s)",
        params={"a": early, "b": late},
    )
    report = verify_database(db_url)
    assert [b.row_id for b in sorted(report.breaks, key=lambda b: b.row_id or 0)] == [early, late]
    assert report.first_break is not None and report.first_break.row_id == early


async def test_a_deleted_tail_or_chain_is_caught_against_the_live_rows(
    db_url: str, superuser: psycopg.Connection
) -> None:
    await settled_run(db_url, n=1)
    tail = _chain(superuser, "a0")[-1][0]
    intent = superuser.execute(
        "SELECT id FROM outbox.payment_intents WHERE payment_id = 'h0'"
    ).fetchone()
    assert intent is not None
    tamper(
        superuser,
        "DELETE FROM outbox.audit_log WHERE id = %(tail)s",
        "DELETE FROM outbox.audit_log WHERE entity = 'intent' AND entity_id = %(intent)s",
        params={"tail": tail, "intent": str(intent[0])},
    )
    breaks = {(b.kind, b.entity, b.entity_id) for b in verify_database(db_url).breaks}
    assert breaks == {
        ("tail_mismatch", "payment", "a0"),
        ("missing_chain", "intent", str(intent[0])),
    }


async def test_an_intent_without_its_creation_rows_past_the_grace_is_reported(
    db_url: str, superuser: psycopg.Connection
) -> None:
    """Issue 23: the relay writes an intent's creation rows at its first claim or promotion,
    so a new intent has none yet; `audit verify` counts it as awaiting them while it is
    younger than --creation-grace, and reports it (missing_creation) once older."""
    await settled_run(db_url, n=1)
    superuser.execute(
        "INSERT INTO outbox.payment_intents (payment_id, action, provider, amount_minor,"
        " currency, payment_method) VALUES ('waiting', 'charge', 'nobody', 10, 'EUR',"
        " 'pm_card_visa')"
    )
    row = superuser.execute(
        "SELECT id FROM outbox.payment_intents WHERE payment_id = 'waiting'"
    ).fetchone()
    assert row is not None
    waiting = str(row[0])
    fresh = verify_database(db_url)
    assert fresh.intact and fresh.awaiting_creation == 2  # the intent and its new payment
    result = run_cli("audit", "verify", db_url=db_url)
    assert result.returncode == 0 and "2 intent(s) and payment(s) inserted less than 300 s" in (
        result.stdout
    )

    # Ten minutes later, still unclaimed (no relay serves provider 'nobody').
    tamper(
        superuser,
        "UPDATE outbox.payment_intents SET created_at = created_at - interval '10 minutes'"
        " WHERE payment_id = 'waiting'",
        "UPDATE outbox.payments SET created_at = created_at - interval '10 minutes'"
        " WHERE payment_id = 'waiting'",
    )
    report = verify_database(db_url)
    assert {(b.kind, b.entity, b.entity_id) for b in report.breaks} == {
        ("missing_creation", "intent", waiting),
        ("missing_creation", "payment", "waiting"),
    }
    result = run_cli("audit", "verify", db_url=db_url)
    assert result.returncode == 1
    assert f"intent {waiting} was inserted at" in result.stdout
    assert "no relay has claimed it yet" in result.stdout
    # A longer grace waits for it.
    result = run_cli("audit", "verify", "--creation-grace", "900", db_url=db_url)
    assert result.returncode == 0, result.stdout
    assert verify_database(db_url, creation_grace_seconds=900).awaiting_creation == 2
    bad = run_cli("audit", "verify", "--creation-grace", "soon", db_url=db_url)
    assert bad.returncode == 2 and "--creation-grace" in bad.stderr

    # Its first UPDATE (here a claim) writes them, with the INSERT's actor and time.
    superuser.execute(
        QUERIES["claim_intents"],
        {"instance": "r9", "provider": "nobody", "now": None, "limit": 5, "lease_seconds": 30},
    )
    assert verify_database(db_url).intact
    first = superuser.execute(
        "SELECT a.operation, a.actor, a.at = i.created_at FROM outbox.audit_log AS a"
        " JOIN outbox.payment_intents AS i ON i.id::text = a.entity_id"
        " WHERE a.entity = 'intent' AND a.entity_id = %s AND a.chain_seq = 1",
        (waiting,),
    ).fetchone()
    assert first == ("insert", "db:" + superuser.info.user, True)

    # A chain whose creation row was deleted starts with an update: reported too. (The
    # claim wrote no row of its own, sql/0021; a change that is not a claim writes one.)
    superuser.execute(
        "UPDATE outbox.payment_intents SET error_message = 'looked at' WHERE id = %s",
        (int(waiting),),
    )
    tamper(
        superuser,
        "DELETE FROM outbox.audit_log WHERE entity = 'intent' AND entity_id = %(id)s"
        " AND chain_seq = 1",
        "UPDATE outbox.audit_log SET chain_seq = 1, prev_hash = NULL,"
        " hash = sha256(outbox.audit_canonical(id, at, actor, entity, entity_id, payment_id,"
        " operation, reason, before, after, 1, NULL))"
        " WHERE entity = 'intent' AND entity_id = %(id)s",
        params={"id": waiting},
    )
    kinds = {(b.kind, b.entity_id) for b in verify_database(db_url).breaks}
    assert ("missing_creation", waiting) in kinds


def _colder_rows(conn: psycopg.Connection) -> dict[str, str]:
    """One row of each colder audited table, each with a chain of two audit rows (its
    insert and one update): entity -> entity_id."""
    with conn.transaction():
        conn.execute("SELECT set_config('outbox.actor', 'operator:alice', true)")
        run = conn.execute(
            "INSERT INTO outbox.reconciliation_runs (provider, window_start, window_end)"
            " VALUES ('stripe', now() - interval '1 hour', now()) RETURNING id"
        ).fetchone()
        assert run is not None
        conn.execute(
            "UPDATE outbox.reconciliation_runs SET status = 'finished', exceptions_found = 5"
            " WHERE id = %s",
            (run[0],),
        )
        exception = conn.execute(
            "INSERT INTO outbox.reconciliation_exceptions (provider, kind, match_key, detail,"
            " occurred_at, first_run_id, last_run_id)"
            " VALUES ('stripe', 'amount_mismatch', 'pi_tail', 'x', now(), %s, %s) RETURNING id",
            (run[0], run[0]),
        ).fetchone()
        assert exception is not None
        conn.execute(
            "UPDATE outbox.reconciliation_exceptions SET times_seen = 2 WHERE id = %s",
            (exception[0],),
        )
        actions = []
        for reason in ("delete-last", "rewrite-last", "forged-append", "chain-deleted"):
            action = conn.execute(
                "INSERT INTO outbox.reconciliation_actions (exception_id, action, amount_minor,"
                " reason, requested_by) VALUES (%s, 'refund', 150, %s, 'alice') RETURNING id",
                (exception[0], reason),
            ).fetchone()
            assert action is not None
            conn.execute(
                "UPDATE outbox.reconciliation_actions SET reason = reason || ' (checked)'"
                " WHERE id = %s",
                (action[0],),
            )
            actions.append(str(action[0]))
        conn.execute(
            "INSERT INTO outbox.janitor_checks (intent_id, payment_id, provider)"
            " VALUES (424242, 'p-tail', 'stripe')"
        )
        conn.execute(
            "UPDATE outbox.janitor_checks SET checks = 1, result = 'not_found_yet'"
            " WHERE intent_id = 424242"
        )
    return {
        "reconciliation_run": str(run[0]),
        "reconciliation_exception": str(exception[0]),
        "janitor_check": "424242",
        **{f"reconciliation_action:{n}": a for n, a in enumerate(actions)},
    }


def _last_audit_row(conn: psycopg.Connection, entity: str, entity_id: str) -> int:
    row = conn.execute(
        "SELECT max(id) FROM outbox.audit_log WHERE entity = %s AND entity_id = %s",
        (entity, entity_id),
    ).fetchone()
    assert row is not None and row[0] is not None
    return int(row[0])


def test_the_end_of_every_colder_chain_is_checked_against_its_live_row(
    db_url: str, superuser: psycopg.Connection
) -> None:
    """Janitor checks and reconciliation runs, exceptions and actions: a deleted last row,
    a last row rewritten and re-hashed, a forged row appended with a valid link, and a
    whole chain deleted all leave every link intact; only the live row shows them."""
    rows = _colder_rows(superuser)
    assert verify_database(db_url).intact
    action = [rows[f"reconciliation_action:{n}"] for n in range(4)]
    deleted_tails = [
        _last_audit_row(superuser, entity, rows[entity])
        for entity in ("reconciliation_run", "reconciliation_exception", "janitor_check")
    ] + [_last_audit_row(superuser, "reconciliation_action", action[0])]
    rewritten = _last_audit_row(superuser, "reconciliation_action", action[1])
    tamper(
        superuser,
        "DELETE FROM outbox.audit_log WHERE id = ANY(%(deleted)s)",
        # The approval the second operator never gave, re-hashed so the chain still holds.
        'UPDATE outbox.audit_log SET after = after || \'{"approved_by": "bob"}\''
        " WHERE id = %(rewritten)s",
        "UPDATE outbox.audit_log SET hash = sha256(outbox.audit_canonical(id, at, actor,"
        " entity, entity_id, payment_id, operation, reason, before, after, chain_seq,"
        " prev_hash)) WHERE id = %(rewritten)s",
        # A forged row, properly linked to the chain's end by the trail's own function.
        "SELECT outbox.audit_write('reconciliation_action', %(forged)s, NULL, 'update',"
        ' \'{"status": "awaiting_approval"}\', \'{"status": "executed"}\','
        " 'operator:bob')",
        "DELETE FROM outbox.audit_log WHERE entity = 'reconciliation_action'"
        " AND entity_id = %(gone)s",
        params={
            "deleted": deleted_tails,
            "rewritten": rewritten,
            "forged": action[2],
            "gone": action[3],
        },
    )
    report = verify_database(db_url)
    assert {(b.kind, b.entity, b.entity_id) for b in report.breaks} == {
        ("tail_mismatch", "reconciliation_run", rows["reconciliation_run"]),
        ("tail_mismatch", "reconciliation_exception", rows["reconciliation_exception"]),
        ("tail_mismatch", "janitor_check", rows["janitor_check"]),
        ("tail_mismatch", "reconciliation_action", action[0]),
        ("tail_mismatch", "reconciliation_action", action[1]),
        ("tail_mismatch", "reconciliation_action", action[2]),
        ("missing_chain", "reconciliation_action", action[3]),
    }, [b.describe() for b in report.breaks]
    result = run_cli("audit", "verify", db_url=db_url)
    assert result.returncode == 1
    assert f"reconciliation_action {action[3]} exists but has no audit rows" in result.stdout


_CARD = "4111 1111 1111 1111"
_API_KEY = "sk_live_51HzQexampleSecretKey0000"


def _luhn_runs(text: str) -> list[str]:
    found = []
    for run in re.findall(r"[0-9](?:[ -]?[0-9]){12,}", text):
        digits = re.sub(r"[ -]", "", run)
        if 13 <= len(digits) <= 19:
            total = 0
            for i, ch in enumerate(reversed(digits)):
                d = int(ch) * (2 if i % 2 else 1)
                total += d - 9 if d > 9 else d
            if total % 10 == 0:
                found.append(run)
    return found


class LeakyMemory(MemoryProvider):
    """Refuses refunds with a message that echoes a card number and an API key."""

    async def execute(self, command: Command) -> Outcome:
        if command.action == "refund":
            return Invalid("invalid_request", f"card {_CARD} refused for key {_API_KEY}")
        return await super().execute(command)


async def test_no_card_like_value_or_api_key_reaches_the_audit_trail(db_url: str) -> None:
    with psycopg.connect(db_url) as conn:
        # A card-like key or metadata value is refused at INSERT (sql/0009), so it never
        # reaches the trail that way; the operator's UPDATE below still tries.
        for key, metadata in (("4111-1111-1111-1111", {}), ("k-1", {"card": _CARD})):
            with pytest.raises(psycopg.errors.CheckViolation), conn.transaction():
                conn.execute(
                    "INSERT INTO outbox.payment_intents (payment_id, action, provider,"
                    " amount_minor, currency, payment_method, idempotency_key, metadata)"
                    " VALUES ('leak', 'charge', 'stripe', 500, 'EUR', 'pm_card_visa', %s, %s)",
                    (key, json.dumps(metadata)),
                )
        conn.execute(
            "INSERT INTO outbox.payment_intents (payment_id, action, provider, amount_minor, currency,"
            " payment_method, idempotency_key, metadata) VALUES"
            " ('leak', 'charge', 'stripe', 500, 'EUR', 'pm_card_visa', 'charge-key-1',"
            "  %s::jsonb),"
            " ('leak', 'refund', 'stripe', 100, 'EUR', NULL, 'refund-key-1', '{}')",
            (json.dumps({"api_key": _API_KEY}),),
        )
    await run_until_settled(db_url, [make_relay(db_url, LeakyMemory())])
    with psycopg.connect(db_url) as conn:
        refund = conn.execute(
            "SELECT status, error_code FROM outbox.payment_intents WHERE action = 'refund'"
        ).fetchone()
        rows = conn.execute(
            "SELECT actor, entity_id, payment_id, operation, reason, before::text, after::text"
            " FROM outbox.audit_log"
        ).fetchall()
    assert refund == ("dead", "invalid_request")
    # An operator's SQL writes a raw message: the trail redacts what the relay did not see.
    with psycopg.connect(db_url) as conn:
        for message in (f"customer read out {_CARD}", f"provider key {_API_KEY} leaked"):
            conn.execute(
                "UPDATE outbox.payment_intents SET error_message = %s WHERE action = 'refund'",
                (message,),
            )
        rows = conn.execute(
            "SELECT actor, entity_id, payment_id, operation, reason, before::text, after::text"
            " FROM outbox.audit_log"
        ).fetchall()
    text = "\n".join(str(v) for row in rows for v in row if v is not None)
    assert _luhn_runs(text) == []
    assert re.search(r"(sk|rk)_(live|test)_[0-9A-Za-z]{4,}", text) is None
    assert "pm_card_visa" not in text  # payment_method is not an audited column
    assert "metadata" not in text
    assert "[redacted: card-like number]" in text  # the operator's error message
    assert "[redacted: secret]" in text
    assert verify_database(db_url).intact


def test_rows_from_before_the_migration_get_a_baseline_and_their_postings(
    pg_admin_url: str, tmp_path: Any
) -> None:
    from relay.infra.migrate import discover, migrate
    from tests.support.databases import scratch_database

    early = tmp_path / "early"
    early.mkdir()
    for migration in discover():
        if migration.version < "0005":
            (early / migration.path.name).write_text(migration.path.read_text())
    with scratch_database(pg_admin_url, "outbox_relay_b") as url:
        migrate(url, directory=early)
        with psycopg.connect(url) as conn:
            conn.execute(
                "INSERT INTO outbox.payment_intents (payment_id, action, provider, amount_minor,"
                " currency, payment_method) VALUES ('old', 'authorize', 'stripe', 700, 'EUR',"
                " 'pm_card_visa'), ('old', 'capture', 'stripe', 500, 'EUR', NULL)"
            )
            # What a relay of that version wrote: both succeeded, the payment captured.
            conn.execute(
                "UPDATE outbox.payment_intents SET status = 'succeeded', attempts = 1,"
                " amount_applied_minor = amount_minor, provider_reference = 'pi_old',"
                " completed_at = now()"
            )
            conn.execute(
                "UPDATE outbox.payments SET state = 'captured', authorized_minor = 700,"
                " captured_minor = 500, provider_reference = 'pi_old'"
            )
        migrate(url)
        assert check_ledger(url).problems == []
        report = verify_database(url)
        # One payment, two intents, and (sql/0050) the provider they name, registered
        # because it was in use when the registry was created.
        assert report.breaks == [] and report.chains == 4
        with psycopg.connect(url) as conn:
            baseline = conn.execute(
                "SELECT DISTINCT entity, operation FROM outbox.audit_log ORDER BY 1"
            ).fetchall()
        # The provider's insert (sql/0050), then its baseline when sql/0070 added the
        # pinned API version to the provider's audited document.
        assert baseline == [
            ("intent", "baseline"),
            ("payment", "baseline"),
            ("provider", "baseline"),
            ("provider", "insert"),
        ]


# -- sql/0021: claims write no row, the outcome's row records them ---------------------------


def _claim(db_url: str, instance: str, limit: int) -> list[int]:
    from relay.infra.queries import QUERIES

    with psycopg.connect(db_url, autocommit=True) as conn:
        rows = conn.execute(
            QUERIES["claim_intents"],
            {"provider": "stripe", "limit": limit, "lease_seconds": 60, "instance": instance,
             "now": None},
        ).fetchall()  # fmt: skip
    return [int(r[0]) for r in rows]


def test_an_open_claim_verifies_and_nothing_else_beside_it_does(
    db_url: str, superuser: psycopg.Connection
) -> None:
    insert_intents(db_url, workload(2))
    claimed = _claim(db_url, "claimer", 5)
    assert len(claimed) == 5
    # The first claim writes the intents' creation rows (sql/0019), and no row of its own.
    written = superuser.execute(
        "SELECT operation, count(*) FROM outbox.audit_log WHERE entity = 'intent'"
        " GROUP BY operation"
    ).fetchall()
    assert written == [("insert", 5)], "a claim writes no update row"
    report = verify_database(db_url)
    assert report.intact, [b.describe() for b in report.breaks]

    # One claim ahead is all the chain allows: a second attempt slipped in with the audit
    # trigger off, or a claimed intent's amount changed, is a tail mismatch.
    tamper(
        superuser,
        "UPDATE outbox.payment_intents SET attempts = attempts + 1 WHERE id = %(a)s",
        "UPDATE outbox.payment_intents SET amount_minor = amount_minor + 1 WHERE id = %(b)s",
        params={"a": claimed[0], "b": claimed[1]},
    )
    report = verify_database(db_url)
    assert {(b.kind, b.entity_id) for b in report.breaks} == {
        ("tail_mismatch", str(claimed[0])),
        ("tail_mismatch", str(claimed[1])),
    }


def test_the_creation_rows_stay_index_probes_as_the_audit_log_grows(db_url: str) -> None:
    """sql/0060: the creation trigger's lookups (is the payment's, the intent's first row
    there?) are planned once per session. Planned while audit_log was empty and analysed,
    sql/0037's were sequential scans, kept while the table grew (one scan per claimed row,
    3.7 ms per intent after 6,000 intents, docs/performance.md run F)."""
    insert_intents(
        db_url,
        [
            {"payment_id": f"grow{i}", "action": "charge", "amount_minor": 100 + i,
             "payment_method": "pm_card_visa"}
            for i in range(120)
        ],
    )  # fmt: skip
    with psycopg.connect(db_url) as conn:
        conn.execute("ANALYZE outbox.audit_log")  # empty: the plan of a fresh database
        claimed = 0
        for _ in range(12):  # one transaction, so one plan (generic after 5 runs)
            claimed += len(
                conn.execute(
                    QUERIES["claim_intents"],
                    {"provider": "stripe", "limit": 10, "lease_seconds": 60,
                     "instance": "grow", "now": None},
                ).fetchall()
            )  # fmt: skip
        row = conn.execute(
            "SELECT seq_scan, idx_scan, n_tup_ins FROM pg_stat_xact_user_tables"
            " WHERE relid = 'outbox.audit_log'::regclass"
        ).fetchone()
        conn.rollback()
    assert claimed == 120
    assert row is not None
    seq_scans, index_scans, inserted = row
    assert inserted == 240, "a creation row for each payment and each intent"
    assert seq_scans == 0, f"the creation lookups scanned audit_log {seq_scans} times"
    assert index_scans > 0


async def test_concurrent_write_backs_leave_verifiable_chains_without_claim_rows(
    db_url: str,
) -> None:
    """Two relays, two write-back streams each: the statement-level audit writes every
    outcome's row, in order, with each chain linked to its tail under concurrency."""
    insert_intents(db_url, workload(12))
    provider = MemoryProvider()
    relays = [
        make_relay(db_url, provider, instance=f"chain-{n}", seed=n, batch_size=7) for n in range(2)
    ]
    await run_until_settled(db_url, relays)
    assert_audit_intact(db_url)
    report = verify_database(db_url)
    assert report.intact and report.live_rows_checked > 0
    with psycopg.connect(db_url) as conn:
        claims = conn.execute(
            "SELECT count(*) FROM outbox.audit_log WHERE entity = 'intent'"
            " AND after ->> 'status' = 'in_flight'"
        ).fetchone()
        unrecorded = conn.execute(
            "SELECT count(*) FROM outbox.payment_intents AS i"
            " WHERE i.attempts > 0 AND NOT EXISTS (SELECT 1 FROM outbox.audit_log AS a"
            "   WHERE a.entity = 'intent' AND a.entity_id = i.id::text"
            "     AND a.before ->> 'status' = 'in_flight' AND a.before ? 'claimed_by'"
            "     AND (a.after ->> 'attempts')::int = i.attempts)"
        ).fetchone()
        ids_in_order = conn.execute(
            "SELECT bool_and(ok) FROM (SELECT id > lag(id) OVER w AND chain_seq = lag(chain_seq)"
            " OVER w + 1 AS ok FROM outbox.audit_log WINDOW w AS (PARTITION BY entity, entity_id"
            " ORDER BY chain_seq)) AS x WHERE ok IS NOT NULL"
        ).fetchone()
    assert claims == (0,), "no row for a claim"
    assert unrecorded == (0,), "every claim's end records the relay and the attempt"
    assert ids_in_order == (True,)


async def test_an_orphan_ledger_entry_is_reported(
    db_url: str, superuser: psycopg.Connection
) -> None:
    await settled_run(db_url, n=1)
    assert check_ledger(db_url).problems == []
    tamper(
        superuser,
        "INSERT INTO outbox.ledger_entries (transaction_id, account, currency, amount_minor)"
        " VALUES (987654, 'stripe:holds', 'EUR', 5), (987654, 'stripe:authorizations', 'EUR', -5)",
    )
    problems = check_ledger(db_url).problems
    assert [(p.subject, p.message) for p in problems] == [
        (
            "ledger transaction 987654",
            "2 ledger entries belong to ledger transaction 987654, which does not exist",
        )
    ]
