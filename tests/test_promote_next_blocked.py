"""sql/0016's one promotion rule, called directly: a payment's first unresolved intent, if
blocked, becomes pending; nothing else moves. (Its three callers, the write-back, the orphan
sweep and cancel_dead_intents, are covered in test_relay_integration,
test_snapshot_isolation_inserts and test_operator_cli.)"""

from __future__ import annotations

from datetime import UTC, datetime

import psycopg
import pytest

from tests.support.intents import insert_intents

pytestmark = pytest.mark.integration

PROMOTE = (
    "SELECT intent_id, payment_id, provider"
    " FROM outbox.promote_next_blocked_v1(%s::text[], %s::timestamptz) ORDER BY intent_id"
)


def add_payment(conn: psycopg.Connection, payment_id: str, first_status: str) -> list[int]:
    """Authorize, capture, refund of one payment; the authorize is then set to first_status."""
    ids = insert_intents(
        conn,
        [
            {
                "payment_id": payment_id,
                "action": action,
                "amount_minor": amount,
                "payment_method": method,
            }
            for action, amount, method in (
                ("authorize", 1000, "pm_card_visa"),
                ("capture", None, None),
                ("refund", 300, None),
            )
        ],
    )
    conn.execute(
        "UPDATE outbox.payment_intents SET status = %(status)s,"
        " amount_applied_minor = CASE WHEN %(status)s = 'succeeded' THEN amount_minor END,"
        " completed_at = CASE WHEN %(status)s IN ('succeeded', 'failed', 'dead') THEN now() END"
        " WHERE id = %(id)s",
        {"status": first_status, "id": ids[0]},
    )
    return ids


def statuses(conn: psycopg.Connection, payment_id: str) -> list[str]:
    rows = conn.execute(
        "SELECT status FROM outbox.payment_intents WHERE payment_id = %s ORDER BY payment_seq",
        (payment_id,),
    ).fetchall()
    return [str(r[0]) for r in rows]


def test_only_a_blocked_head_is_promoted_and_only_once(conn: psycopg.Connection) -> None:
    ended = add_payment(conn, "ended", "succeeded")
    failed = add_payment(conn, "failed-head", "failed")
    for payment_id, status in (("pending-head", "pending"), ("dead-head", "dead")):
        add_payment(conn, payment_id, status)
    due = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    names = ["ended", "ended", "failed-head", "pending-head", "dead-head", "unknown"]

    promoted = conn.execute(PROMOTE, (names, due)).fetchall()

    assert promoted == [(ended[1], "ended", "stripe"), (failed[1], "failed-head", "stripe")]
    assert statuses(conn, "ended") == ["succeeded", "pending", "blocked"]
    assert statuses(conn, "failed-head") == ["failed", "pending", "blocked"]
    assert statuses(conn, "pending-head") == ["pending", "blocked", "blocked"]
    assert statuses(conn, "dead-head") == ["dead", "blocked", "blocked"]
    row = conn.execute(
        "SELECT available_at, updated_at FROM outbox.payment_intents WHERE id = %s", (ended[1],)
    ).fetchone()
    assert row == (due, due)
    assert conn.execute(PROMOTE, (names, due)).fetchall() == [], "the head is pending now"


def test_no_payments_promote_nothing(conn: psycopg.Connection) -> None:
    add_payment(conn, "ended", "succeeded")
    assert conn.execute(PROMOTE, ([], None)).fetchall() == []
    assert conn.execute(PROMOTE, (None, None)).fetchall() == []
    assert statuses(conn, "ended") == ["succeeded", "blocked", "blocked"]
