"""The invariants of DESIGN.md, checked against the database and the fake provider's
effect counts. Shared by every test that runs a real workload."""

from __future__ import annotations

from typing import Any

import psycopg

TERMINAL = ("succeeded", "failed", "dead")

_AMOUNT_MISMATCHES = """
SELECT p.payment_id, p.authorized_minor, p.captured_minor, p.refunded_minor, s.a, s.c, s.r
FROM outbox.payments p
JOIN LATERAL (
    SELECT coalesce(sum(amount_applied_minor)
                    FILTER (WHERE action IN ('authorize', 'charge')), 0) AS a,
           coalesce(sum(amount_applied_minor)
                    FILTER (WHERE action IN ('capture', 'charge')), 0) AS c,
           coalesce(sum(amount_applied_minor) FILTER (WHERE action = 'refund'), 0) AS r
    FROM outbox.payment_intents i
    WHERE i.payment_id = p.payment_id AND i.status = 'succeeded'
) s ON true
WHERE (p.authorized_minor, p.captured_minor, p.refunded_minor) <> (s.a, s.c, s.r)
"""


def unfinished(db_url: str) -> int:
    with psycopg.connect(db_url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM outbox.payment_intents WHERE status <> ALL(%s)", (list(TERMINAL),)
        ).fetchone()
    assert row is not None
    return int(row[0])


def intents(db_url: str) -> list[tuple[Any, ...]]:
    """(id, payment_id, action, status, idempotency_key, attempts, error_code) per intent."""
    with psycopg.connect(db_url) as conn:
        return conn.execute(
            "SELECT id, payment_id, action, status, idempotency_key, attempts, error_code"
            " FROM outbox.payment_intents ORDER BY id"
        ).fetchall()


def assert_exactly_once(db_url: str, effects: dict[str, Any], *, expected_intents: int) -> None:
    """Nothing lost, all terminal, one effect per succeeded intent and none for the others,
    no key with two effects, and each payment's amounts equal its succeeded intents' sums."""
    rows = intents(db_url)
    assert len(rows) == expected_intents, "nothing lost"
    assert [r for r in rows if r[3] not in TERMINAL] == [], "every intent is terminal"
    by_key: dict[str, dict[str, Any]] = effects["effects_by_key"]
    duplicated = {k: v["count"] for k, v in by_key.items() if v["count"] > 1}
    assert duplicated == {}, "no idempotency key has two effects"
    wrong = []
    for intent_id, _, action, status, key, _, error_code in rows:
        count = by_key.get(key, {}).get("count", 0)
        if count != (1 if status == "succeeded" else 0):
            wrong.append((intent_id, action, status, error_code, count))
    assert wrong == [], "every succeeded intent has exactly one effect, others none"
    with psycopg.connect(db_url) as conn:
        assert conn.execute(_AMOUNT_MISMATCHES).fetchall() == [], "payments match their intents"


def assert_ledger_balanced(db_url: str) -> None:
    """Every ledger transaction balances per currency, every succeeded intent has exactly
    one posting, and every payment's amounts equal its ledger (relay/finance/ledger.py)."""
    from relay.finance.ledger import check_ledger

    report = check_ledger(db_url)
    assert report.problems == [], "ledger balances and equals the payments"
    with psycopg.connect(db_url) as conn:
        row = conn.execute(
            "SELECT (SELECT count(*) FROM outbox.payment_intents WHERE status = 'succeeded')"
            " + (SELECT count(*) FROM outbox.payment_intents_archive WHERE status = 'succeeded')"
        ).fetchone()
    assert row is not None and report.transactions == row[0], "one posting per succeeded intent"


def assert_audit_intact(db_url: str) -> None:
    """Every audit chain links and hashes, and ends in its row's live state (relay/finance/audit.py)."""
    from relay.finance.audit import verify_database

    report = verify_database(db_url)
    assert report.breaks == [], "the audit trail is intact"
    assert report.rows > 0
