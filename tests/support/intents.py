"""Insert payment intents the way an application does: a plain INSERT, one per row.

Each row is a dict of ``outbox.payment_intents`` columns; what it leaves out takes the
defaults below (a EUR intent for the ``stripe`` provider, the amount and payment method
left NULL). All rows of one call go in one transaction, in order, and their ids come back
in that order.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import psycopg
from psycopg import sql

__all__ = ["DEFAULTS", "insert_charges", "insert_intent", "insert_intents"]

DEFAULTS: Mapping[str, Any] = {
    "provider": "stripe",
    "currency": "EUR",
    "amount_minor": None,
    "payment_method": None,
}


def insert_intents(
    target: str | psycopg.Connection[Any], rows: Iterable[Mapping[str, Any]]
) -> list[int]:
    """Insert ``rows`` (on ``target``: a database URL or an open connection) and return
    their ids. On a URL the rows commit together; on a connection the caller's transaction
    mode decides."""
    if isinstance(target, str):
        with psycopg.connect(target) as conn:
            return _insert(conn, rows)
    return _insert(target, rows)


def insert_intent(target: str | psycopg.Connection[Any], **values: Any) -> int:
    """One intent; returns its id."""
    return insert_intents(target, [values])[0]


def insert_charges(
    db_url: str, provider: str, count: int, prefix: str, *, first_amount: int = 1000
) -> list[int]:
    """``count`` card charges for ``provider``: payment ids ``{prefix}-0``... and amounts
    ``first_amount``, ``first_amount + 1``..."""
    return insert_intents(
        db_url,
        (
            {
                "payment_id": f"{prefix}-{n}",
                "action": "charge",
                "provider": provider,
                "amount_minor": first_amount + n,
                "payment_method": "pm_card_visa",
            }
            for n in range(count)
        ),
    )


def _insert(conn: psycopg.Connection[Any], rows: Iterable[Mapping[str, Any]]) -> list[int]:
    ids = []
    for row in rows:
        values = {**DEFAULTS, **row}
        statement = sql.SQL("INSERT INTO outbox.payment_intents ({}) VALUES ({}) RETURNING id")
        inserted = conn.execute(
            statement.format(
                sql.SQL(", ").join(map(sql.Identifier, values)),
                sql.SQL(", ").join(sql.Placeholder() * len(values)),
            ),
            list(values.values()),
        ).fetchone()
        assert inserted is not None
        ids.append(int(inserted[0]))
    return ids
