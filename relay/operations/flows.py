"""Payment flows as an operator inspects them (sql/0072, docs/flows.md).

:func:`list_flows` gives the newest flows (optionally of one state) with their step counts;
:func:`find_flow` one flow with its steps (each with its intent's and its compensation's
current state and idempotency key) and its audit trail, the flow's rows and its steps',
oldest first. Card numbers and secrets in the result are masked. The command line is
relay/cli/flows.py.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.rows import dict_row

from relay.infra.queries import QUERIES
from relay.infra.redaction import redact_value
from relay.operations.intents import history_changes

__all__ = ["FLOW_STATES", "find_flow", "list_flows"]

FLOW_STATES = ("running", "completed", "compensating", "compensated", "needs_operator")


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
