"""Payment flows as an operator inspects them (sql/0072, docs/flows.md).

:func:`list_flows` gives the newest flows (optionally of one state) with their step counts;
:func:`find_flow` one flow with its steps (each with its intent's and its compensation's
current state and idempotency key) and its audit trail, the flow's rows and its steps',
oldest first. Card numbers and secrets in the result are masked.

The operator's controls (sql/0085): :func:`cancel_flow` (a running flow compensates),
:func:`retry_step` (a dead step or dead compensation re-driven under its own key) and
:func:`mark_compensated` (a failed compensation done by hand at the provider). Each runs in
one transaction naming the operator, audited in the flow's own hash chain. The overrides
that move money or stand in for the provider's evidence (a cancel that refunds, every
mark-compensated) are refused by the database without a second operator: they are then
recorded as a request (outbox.registry_requests, sql/0052) and :class:`ApprovalNeeded` is
raised; :func:`approve` applies it as another operator from another database login. The
command line is relay/cli/flows.py.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.rows import dict_row

from relay.infra.queries import QUERIES
from relay.infra.redaction import redact_value
from relay.operations.intents import history_changes
from relay.operations.providers import approve_request, change_or_request

__all__ = [
    "AUTHORIZATION_POLICY_ACTIONS",
    "FLOW_STATES",
    "ApprovalNeeded",
    "approve",
    "cancel_flow",
    "find_flow",
    "list_authorization_policies",
    "list_flows",
    "mark_compensated",
    "retry_step",
    "set_authorization_policy",
]

FLOW_STATES = ("running", "completed", "compensating", "compensated", "needs_operator")
# What happens to an authorisation no flow covers once aged (sql/0084).
AUTHORIZATION_POLICY_ACTIONS = ("off", "alert", "void")


def list_flows(conninfo: str, *, state: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
    """The newest ``limit`` flows, of ``state`` when given (one of :data:`FLOW_STATES`)."""
    if state is not None and state not in FLOW_STATES:
        raise ValueError(f"state must be one of {', '.join(FLOW_STATES)}, not {state!r}")
    if limit < 1:
        raise ValueError(f"limit must be at least 1, not {limit}")
    with psycopg.connect(conninfo, autocommit=True) as conn:
        cur = conn.cursor(row_factory=dict_row)
        rows = cur.execute(QUERIES["flows_list"], {"state": state, "limit": limit}).fetchall()
    listed: list[dict[str, Any]] = redact_value(rows)
    return listed


def find_flow(conninfo: str, flow_id: int) -> dict[str, Any] | None:
    """The flow, its steps and its history; None when there is no such flow."""
    with psycopg.connect(conninfo, autocommit=True) as conn:
        cur = conn.cursor(row_factory=dict_row)
        flow = cur.execute(QUERIES["flow_detail"], {"id": flow_id}).fetchone()
        if flow is None:
            return None
        steps = cur.execute(QUERIES["flow_steps_detail"], {"id": flow_id}).fetchall()
        history = cur.execute(QUERIES["flow_history"], {"id": flow_id}).fetchall()
    for row in history:
        row["changes"] = history_changes(row.pop("before"), row.pop("after"))
    found: dict[str, Any] = redact_value({"flow": flow, "steps": steps, "history": history})
    return found


_NEEDS_APPROVAL = "flow_operation_needs_approval"


class ApprovalNeeded(Exception):
    """The override was recorded as request ``request_id`` for a second operator instead of
    being applied (four eyes, sql/0085)."""

    def __init__(self, request_id: int, flow_id: int, what: str) -> None:
        super().__init__(
            f"flow {flow_id}: {what} needs a second operator; recorded as request {request_id}: "
            f"another operator, logged in as another database login, runs "
            f"`outbox-relay flows approve {request_id}`"
        )
        self.request_id = request_id


def _operate(
    conninfo: str,
    statement: str,
    params: dict[str, Any],
    *,
    operator: str,
    reason: str,
    what: str,
) -> dict[str, Any]:
    """Run one operation in its own transaction; the flow's row after it. Refused for want
    of a second operator, it is recorded as a request and :class:`ApprovalNeeded` raised."""
    flow_id = int(params["id"])
    with psycopg.connect(conninfo, autocommit=True) as conn:
        row = change_or_request(
            conn,
            statement,
            params,
            operator=operator,
            entity="flow",
            name=str(flow_id),
            change={"operation": statement.removeprefix("flow_"), "seq": params.get("seq")},
            reason=reason,
            needs_approval=_NEEDS_APPROVAL,
            requested=lambda request_id: ApprovalNeeded(request_id, flow_id, what),
        )
    assert row is not None
    done: dict[str, Any] = redact_value(row)
    return done


def cancel_flow(conninfo: str, flow_id: int, *, operator: str, reason: str) -> dict[str, Any]:
    """A running flow compensates; the flow's row after it (:class:`ApprovalNeeded` when
    the cancel would refund a capture or charge)."""
    return _operate(
        conninfo,
        "flow_cancel",
        {"id": flow_id},
        operator=operator,
        reason=reason,
        what="a cancel that refunds",
    )


def retry_step(
    conninfo: str, flow_id: int, seq: int, *, operator: str, reason: str
) -> dict[str, Any]:
    """Re-drive the dead step ``seq`` (or its dead compensation) under its own key."""
    return _operate(
        conninfo,
        "flow_retry_step",
        {"id": flow_id, "seq": seq},
        operator=operator,
        reason=reason,
        what="this retry",
    )


def mark_compensated(
    conninfo: str, flow_id: int, seq: int, *, operator: str, reason: str
) -> dict[str, Any]:
    """Record step ``seq``'s failed compensation as done by hand (always
    :class:`ApprovalNeeded` first: a second operator approves it)."""
    return _operate(
        conninfo,
        "flow_mark_compensated",
        {"id": flow_id, "seq": seq},
        operator=operator,
        reason=reason,
        what="marking a compensation done by hand",
    )


def approve(conninfo: str, request_id: int, *, operator: str) -> dict[str, Any]:
    """Apply a pending request as a second operator (another login); the request row,
    redacted like every flow read."""
    with psycopg.connect(conninfo, autocommit=True) as conn:
        row = approve_request(conn, operator=operator, request_id=request_id)
    approved: dict[str, Any] = redact_value(row)
    return approved


def list_authorization_policies(conninfo: str) -> list[dict[str, Any]]:
    """Every provider's policy for authorisations no flow covers, with how many are aged and
    uncovered now (sql/0084)."""
    with psycopg.connect(conninfo) as conn:
        rows = (
            conn.cursor(row_factory=dict_row)
            .execute(QUERIES["authorization_policies_list"])
            .fetchall()
        )
    return [dict(row) for row in rows]


def set_authorization_policy(
    conninfo: str,
    provider: str,
    action: str,
    after_seconds: int,
    *,
    operator: str,
    reason: str,
) -> dict[str, Any]:
    """Set ``provider``'s policy (``off``, ``alert`` or ``void`` after ``after_seconds``);
    audited. The table's checks refuse a bad value by name (psycopg.errors.CheckViolation)."""
    with psycopg.connect(conninfo, autocommit=True) as conn:
        row = (
            conn.cursor(row_factory=dict_row)
            .execute(
                QUERIES["authorization_policy_set"],
                {
                    "operator": operator,
                    "provider": provider,
                    "action": action,
                    "after_seconds": after_seconds,
                    "reason": reason,
                },
            )
            .fetchone()
        )
    assert row is not None
    return dict(row)
