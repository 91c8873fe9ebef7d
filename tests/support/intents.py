"""Insert payment intents the way an application does: a plain INSERT, one per row.

Each row is a dict of ``outbox.payment_intents`` columns; what it leaves out takes the
defaults below (a EUR intent for the ``stripe`` provider, the amount and payment method
left NULL). All rows of one call go in one transaction, in order, and their ids come back
in that order.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict
from typing import Any

import psycopg
from psycopg import sql

from relay.cli.demo import Row

__all__ = [
    "DEFAULTS",
    "insert_charges",
    "insert_intent",
    "insert_intents",
    "insert_workload",
    "payments_by_provider",
    "register_provider",
]

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


def insert_workload(db_url: str, rows: Iterable[Row]) -> list[int]:
    """The rows of ``relay.cli.demo.build_workload``, for the ``stripe`` provider."""
    return insert_intents(db_url, (asdict(row) for row in rows))


def _insert(conn: psycopg.Connection[Any], rows: Iterable[Mapping[str, Any]]) -> list[int]:
    complete = [{**DEFAULTS, **row} for row in rows]
    if not complete:
        return []
    columns = list(complete[0])
    if any(list(row) != columns for row in complete):  # different columns: row by row
        return [_insert(conn, [row])[0] for row in complete]
    statement = sql.SQL("INSERT INTO outbox.payment_intents ({}) VALUES ({}) RETURNING id").format(
        sql.SQL(", ").join(map(sql.Identifier, columns)),
        sql.SQL(", ").join(sql.Placeholder(column) for column in columns),
    )
    ids = []
    with conn.cursor() as cur:
        cur.executemany(statement, complete, returning=True)
        while True:
            inserted = cur.fetchone()
            assert inserted is not None
            ids.append(int(inserted[0]))
            if not cur.nextset():
                break
    return ids


def payments_by_provider(conn: psycopg.Connection[Any], prefix: str) -> dict[str, int]:
    """How many payments whose id starts with ``prefix`` each provider has (where routing
    sent them)."""
    rows = conn.execute(
        "SELECT provider, count(*) FROM outbox.payments WHERE payment_id LIKE %s || '%%'"
        " GROUP BY provider",
        (prefix,),
    ).fetchall()
    return {str(provider): int(n) for provider, n in rows}


def register_provider(
    conn: psycopg.Connection,
    name: str,
    kind: str = "stripe",
    *,
    enabled: bool = True,
    currencies: Iterable[str] | None = None,
    amount_limits: Mapping[str, Mapping[str, int]] | None = None,
) -> None:
    """Register ``name`` in the provider registry (sql/0050) as operator ``tests``.

    A test that relies on the registry being closed registers every provider it inserts
    intents for: the first registered provider closes it (an empty registry is open).
    """
    import json

    conn.execute(
        "SELECT outbox.provider_set_v1('tests', %s, %s, %s, %s::text[], %s::jsonb, NULL,"
        " 'registered by the test', true)",
        (
            name,
            kind,
            enabled,
            None if currencies is None else list(currencies),
            None if amount_limits is None else json.dumps(amount_limits),
        ),
    )
