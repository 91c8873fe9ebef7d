"""One intent as an operator inspects it: the intent, its payment, the payment's intents
in order, and the intent's history from the audit trail.

The history is read through ``outbox.intent_history`` (sql/0005's ``outbox.audit_log``):
every change of the row, when and by whom, with the fields that changed. Where the audit
trail is not installed the history is None and ``history_note`` says why. Card numbers and
secrets in the result are masked. The command line is relay/cli/intents.py.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.rows import dict_row

from relay.infra.queries import QUERIES
from relay.infra.redaction import redact_value

__all__ = ["NO_AUDIT_TRAIL", "collect_intent", "find_intent", "history_changes"]

NO_AUDIT_TRAIL = "no audit trail (migration 0005 not applied)"
# Columns whose change is noise in a history line.
_QUIET = {"updated_at"}


def history_changes(before: dict[str, Any] | None, after: dict[str, Any] | None) -> dict[str, Any]:
    """The fields an audit row changed: ``{field: [old, new]}`` (all of ``after`` on insert)."""
    if before is None:
        return {k: [None, v] for k, v in (after or {}).items() if v is not None}
    if after is None:
        return {k: [v, None] for k, v in before.items() if v is not None}
    return {
        k: [before.get(k), after.get(k)]
        for k in sorted(set(before) | set(after))
        if k not in _QUIET and before.get(k) != after.get(k)
    }


def collect_intent(conn: psycopg.Connection, intent_id: int) -> dict[str, Any] | None:
    """The intent, its payment, the payment's intents in order, and the audit history."""
    by_name = conn.cursor(row_factory=dict_row)
    intent = by_name.execute(QUERIES["intent_detail"], {"id": intent_id}).fetchone()
    if intent is None:
        return None
    payment = by_name.execute(
        QUERIES["intent_payment"], {"payment_id": intent["payment_id"]}
    ).fetchone()
    if payment is not None:
        # sql/0051: the routing rule and version that chose the provider (NULL: named).
        payment.update(
            by_name.execute(
                QUERIES["payment_routing"], {"payment_id": intent["payment_id"]}
            ).fetchone()
            or {}
        )
    siblings = by_name.execute(
        QUERIES["payment_intents_in_order"], {"payment_id": intent["payment_id"]}
    ).fetchall()
    try:
        notifications: list[dict[str, Any]] | None = by_name.execute(
            QUERIES["webhooks_for_payment"], {"payment_id": intent["payment_id"]}
        ).fetchall()
    except psycopg.errors.UndefinedTable:
        notifications = None  # a schema before sql/0023: no inbox
    present = conn.execute(QUERIES["audit_trail_present"]).fetchone()
    history: list[dict[str, Any]] | None = None
    if present and present[0]:
        history = by_name.execute(QUERIES["intent_history"], {"id": intent_id}).fetchall()
        for row in history:
            row["changes"] = history_changes(row.pop("before"), row.pop("after"))
    shown: dict[str, Any] = redact_value(
        {
            "intent": intent,
            "payment": payment,
            "payment_intents": siblings,
            "notifications": notifications,
            "history": history,
            "history_note": None if history is not None else NO_AUDIT_TRAIL,
        }
    )
    return shown


def find_intent(conninfo: str, intent_id: int) -> dict[str, Any] | None:
    """:func:`collect_intent` on a connection of its own; None when there is no such intent.

    Raises psycopg.errors.UndefinedTable when the outbox schema is missing.
    """
    with psycopg.connect(conninfo, autocommit=True) as conn:
        return collect_intent(conn, intent_id)
