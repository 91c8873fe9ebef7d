"""Intents as an operator finds them: inserted from short tuples (``insert``), made dead
as a relay leaves them after its attempts (``make_dead``), and read back: their state
(``state``) and the audit trail of their statuses (``history``)."""

from __future__ import annotations

from typing import Any

import psycopg

from tests.support.intents import insert_intents
from tests.support.sql import rows

__all__ = ["history", "insert", "make_dead", "state"]


def insert(db_url: str, *intents: tuple[Any, ...]) -> list[int]:
    """(payment_id, action, amount_minor, payment_method[, provider]) -> ids."""
    return insert_intents(
        db_url,
        [
            {
                "payment_id": payment_id,
                "action": action,
                "amount_minor": amount,
                "payment_method": method,
                "provider": provider[0] if provider else "stripe",
            }
            for payment_id, action, amount, method, *provider in intents
        ],
    )


def make_dead(
    db_url: str, ids: list[int], error_code: str = "rate_limited", age: str = "0"
) -> None:
    """Put intents where a relay would: dead after attempts, error recorded."""
    with psycopg.connect(db_url) as conn:
        conn.execute(
            "UPDATE outbox.payment_intents SET status = 'dead', attempts = 8, error_code = %s,"
            " error_message = 'gave up after 8 attempts', completed_at = now() - %s::interval,"
            " updated_at = now() - %s::interval WHERE id = ANY(%s)",
            (error_code, age, age, ids),
        )


def state(db_url: str, intent_id: int) -> tuple[Any, ...]:
    """(status, attempts, error_code, error_message, idempotency_key, completed_at)."""
    found = rows(
        db_url,
        "SELECT status, attempts, error_code, error_message, idempotency_key, completed_at"
        " FROM outbox.payment_intents WHERE id = %s",
        intent_id,
    )
    return found[0]


def history(db_url: str, intent_id: int) -> list[tuple[str, str | None]]:
    """(actor, new status) of each audit row of an intent, in order."""
    return [
        (actor, after.get("status") if after else None)
        for actor, after in rows(
            db_url,
            "SELECT actor, after FROM outbox.audit_log"
            " WHERE entity = 'intent' AND entity_id = %s ORDER BY id",
            str(intent_id),
        )
    ]
