"""Dead intents, the ones that wait for an operator: list them, retry them or cancel them.

An intent is ``dead`` when the provider called the request invalid or its attempts ran out;
it blocks the later intents of its payment. :func:`act` either

* **retries** it: back to ``pending`` at once with its attempts reset and its error cleared,
  under the SAME idempotency key (a provider that already applied it replays the first
  result); an intent behind an earlier unresolved one of its payment goes ``blocked``;
* or **cancels** it: ``failed`` with error_code ``cancelled_by_operator``, and the next
  blocked intent of its payment is promoted.

Both run the SQL functions of sql/0006 (``outbox.retry_dead_intents``,
``outbox.cancel_dead_intents``), in transactions that name the operator for the audit
trail. Intents are named by id, or selected by :class:`Filters`; a selection is counted,
confirmed through a callback and worked in batches, reporting progress through another.
The command line is relay/cli/dead_letters.py.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import psycopg

from relay.infra.queries import QUERIES
from relay.infra.redaction import redact_text
from relay.operations.operators import acting_as

__all__ = [
    "Action",
    "ActionReport",
    "Filters",
    "act",
    "act_on_database",
    "list_dead",
    "list_dead_in_database",
]

Action = Literal["retry", "cancel"]

_DIGITS = re.compile(r"(\d+)")


def natural_key(row: dict[str, Any]) -> tuple[tuple[tuple[int, int | str], ...], int]:
    """Order result rows as a person counts: ``bulk-2`` before ``bulk-10``, then by intent.

    The SQL functions return rows in payment-id order as text (their lock order, which
    must stay fixed to avoid deadlocks), so the report sorts them again for reading."""
    parts = _DIGITS.split(str(row.get("payment_id") or ""))
    key = tuple((1, int(part)) if part.isdigit() else (0, part) for part in parts)
    return key, int(row.get("intent_id") or 0)


@dataclass(frozen=True, slots=True)
class Filters:
    """A selection of dead intents; every filter given must hold, none given selects all."""

    provider: str | None = None
    error_code: str | None = None
    older_than_seconds: float | None = None

    @property
    def empty(self) -> bool:
        return self.provider is None and self.error_code is None and self.older_than_seconds is None

    def params(self) -> dict[str, Any]:
        return {
            "provider": self.provider,
            "error_code": self.error_code,
            "older_than_seconds": self.older_than_seconds,
            "now": None,
        }


@dataclass
class ActionReport:
    """What :func:`act` did; an intent appears in at most one of done, skipped and kept."""

    action: Action
    operator: str
    matched: int = 0
    done: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    # Retry only: sent intents older than their provider's idempotency-key lifetime, kept dead.
    kept: list[dict[str, Any]] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "operator": self.operator,
            "matched": self.matched,
            "done": self.done,
            "skipped": self.skipped,
            "kept": self.kept,
        }


def list_dead(conn: psycopg.Connection, filters: Filters, *, limit: int) -> list[dict[str, Any]]:
    """At most ``limit`` dead intents matching ``filters``, longest dead first, as rows."""
    rows = conn.execute(QUERIES["dead_letters_list"], {**filters.params(), "limit": limit})
    names = [d.name for d in rows.description or []]
    return [dict(zip(names, row, strict=True)) for row in rows.fetchall()]


def list_dead_in_database(conninfo: str, filters: Filters, *, limit: int) -> list[dict[str, Any]]:
    """:func:`list_dead` on a connection of its own, with card numbers and secrets masked
    in each ``error_message`` (an empty message becomes None)."""
    with psycopg.connect(conninfo) as conn:
        rows = list_dead(conn, filters, limit=limit)
    for row in rows:
        row["error_message"] = redact_text(row["error_message"] or "") or None
    return rows


def _apply(
    conn: psycopg.Connection,
    action: Action,
    ids: Sequence[int],
    operator: str,
    reason: str | None,
    past_key_lifetime: bool,
) -> list[dict[str, Any]]:
    """One transaction, naming the operator; returns a row per dead intent handled."""
    with acting_as(conn, operator):
        if action == "retry":
            cur = conn.execute(
                QUERIES["retry_dead_intents"],
                {"ids": list(ids), "operator": operator, "past_key_lifetime": past_key_lifetime},
            )
        else:
            cur = conn.execute(
                QUERIES["cancel_dead_intents"],
                {"ids": list(ids), "operator": operator, "reason": reason},
            )
        names = [d.name for d in cur.description or []]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def act(
    conn: psycopg.Connection,
    action: Action,
    *,
    operator: str,
    ids: Sequence[int] = (),
    filters: Filters | None = None,
    reason: str | None = None,
    past_key_lifetime: bool = False,
    batch_size: int = 500,
    progress: Callable[[int, int], None] = lambda _done, _total: None,
    confirm: Callable[[int], bool] = lambda _matched: True,
) -> ActionReport:
    """Retry or cancel the named dead intents, or every one matching ``filters``.

    ``conn`` is in autocommit mode: no transaction stays open while a person reads the
    confirmation prompt, and each batch commits on its own. Named ids are handled in one
    transaction; ids that are missing or not dead are reported in ``skipped``. A selection
    is counted, confirmed, then worked in batches of ``batch_size``, one transaction each
    (a failure stops there: earlier batches stay done). A retry keeps dead, in ``kept``,
    the sent intents older than their provider's idempotency-key lifetime, unless
    ``past_key_lifetime`` (see outbox.retry_dead_intents in sql/0006).
    """
    report = ActionReport(action, operator)

    def apply(batch: list[int]) -> None:
        for row in _apply(conn, action, batch, operator, reason, past_key_lifetime):
            (report.kept if row["status"] == "dead" else report.done).append(row)

    if ids:
        by_id = conn.execute(QUERIES["dead_letters_by_id"], {"ids": list(ids)}).fetchall()
        found: dict[int, str] = {intent_id: status for intent_id, status in by_id}
        wanted = []
        for intent_id in dict.fromkeys(ids):
            status = found.get(intent_id)
            if status is None:
                report.skipped.append({"id": intent_id, "reason": "no such intent"})
            elif status != "dead":
                report.skipped.append({"id": intent_id, "reason": f"not dead ({status})"})
            else:
                wanted.append(intent_id)
        report.matched = len(wanted)
        if wanted and confirm(len(wanted)):
            apply(wanted)
        return _sorted(report)

    selection = filters or Filters()
    row = conn.execute(QUERIES["dead_letters_count"], selection.params()).fetchone()
    report.matched = int(row[0]) if row else 0
    if not report.matched or not confirm(report.matched):
        return report
    after_id = 0
    while True:
        page = conn.execute(
            QUERIES["dead_letters_page"],
            {**selection.params(), "after_id": after_id, "limit": batch_size},
        ).fetchall()
        if not page:
            break
        after_id = page[-1][0]
        apply([intent_id for (intent_id,) in page])
        handled = len(report.done) + len(report.kept)
        progress(handled, max(report.matched, handled))
    return _sorted(report)


def _sorted(report: ActionReport) -> ActionReport:
    report.done.sort(key=natural_key)
    report.kept.sort(key=natural_key)
    return report


def act_on_database(
    conninfo: str,
    action: Action,
    *,
    operator: str,
    ids: Sequence[int] = (),
    filters: Filters | None = None,
    reason: str | None = None,
    past_key_lifetime: bool = False,
    batch_size: int = 500,
    progress: Callable[[int, int], None] = lambda _done, _total: None,
    confirm: Callable[[int], bool] = lambda _matched: True,
) -> ActionReport:
    """:func:`act` on an autocommit connection of its own (see there for the guarantees).

    Raises psycopg.errors.UndefinedFunction when sql/0006 is not applied.
    """
    with psycopg.connect(conninfo, autocommit=True) as conn:
        return act(
            conn,
            action,
            operator=operator,
            ids=ids,
            filters=filters,
            reason=reason,
            past_key_lifetime=past_key_lifetime,
            batch_size=batch_size,
            progress=progress,
            confirm=confirm,
        )
