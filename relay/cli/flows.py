"""`outbox-relay flows list|show|cancel|retry-step|mark-compensated|approve|policies|policy`:
payment flows (docs/flows.md).

``list`` prints the newest flows, optionally of one state (``--state needs_operator``
finds the flows waiting for an operator). ``show`` prints one flow: its state and why,
each step with its intent and its compensation (their states and idempotency keys), and
the flow's audit trail, the flow's rows and its steps', oldest first.

``cancel ID --reason`` makes a running flow compensate. ``retry-step ID SEQ --reason``
re-drives a dead step, or its dead compensation, under its own idempotency key.
``mark-compensated ID SEQ --reason`` records a failed compensation as done by hand at the
provider. Each is audited in the flow's hash chain. A cancel that refunds and every
mark-compensated need a second operator: they are recorded as a request (exit status 3)
that another operator, logged in as another database login, applies with ``approve REQ``.

``policies`` lists each provider's policy for authorisations no flow covers, and
``policy PROVIDER off|alert|void --after 7d --reason`` sets one (opt-in, audited): once a
payment's authorisation has waited that long with no flow and nothing on its way, ``alert``
counts it (gauge ``outbox_relay_uncovered_authorizations``, alert
OutboxRelayUncoveredAuthorizations) and ``void`` has the relays void it.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

import psycopg

from relay.cli.operator_args import (
    add_operator_argument,
    age,
    approval_requested,
    operator_of,
    positive,
)
from relay.cli.tables import clip, format_when, plain_help, print_refusal, render_table
from relay.operations.flows import (
    AUTHORIZATION_POLICY_ACTIONS,
    FLOW_STATES,
    ApprovalNeeded,
    approve,
    cancel_flow,
    find_flow,
    list_authorization_policies,
    list_flows,
    mark_compensated,
    retry_step,
    set_authorization_policy,
)

__all__ = ["add_commands", "duration_seconds", "render_flow", "render_flows", "render_policies"]


def render_flows(flows: list[dict[str, Any]]) -> str:
    """The rows of :func:`relay.operations.flows.list_flows` as a table."""
    if not flows:
        return "no flows"
    return render_table(
        ["id", "flow key", "state", "steps", "took effect", "undone", "updated", "reason"],
        [
            (
                f["id"],
                clip(f["flow_key"], 30),
                f["state"],
                f["steps"],
                f["succeeded"],
                f["compensated"],
                format_when(f["updated_at"]),
                clip(f["reason"] or "", 60) or None,
            )
            for f in flows
        ],
    )


def _compensation(step: dict[str, Any]) -> str:
    if step["compensation"] == "none":
        return "none"
    status = step["compensation_status"]
    if status is None:
        return str(step["compensation"])
    if step["compensation_intent_id"] is not None:
        return f"{step['compensation']} #{step['compensation_intent_id']} {status}"
    note = f" ({step['compensation_note']})" if step["compensation_note"] else ""
    return f"{step['compensation']} {status}{note}"


def render_flow(found: dict[str, Any]) -> str:
    """What :func:`relay.operations.flows.find_flow` found, as text."""
    flow = found["flow"]
    lines = [f"flow {flow['id']} ({flow['flow_key']}): {flow['state']}"]
    if flow["reason"]:
        lines.append(f"  reason          {flow['reason']}")
    lines.append(f"  created         {format_when(flow['created_at'])} by {flow['created_by']}")
    if flow["finished_at"]:
        lines.append(f"  finished        {format_when(flow['finished_at'])}")
    if flow["metadata"]:
        lines.append(f"  metadata        {json.dumps(flow['metadata'])}")
    lines.append(f"\nsteps ({len(found['steps'])}):")
    lines.append(
        render_table(
            [
                "step",
                "after",
                "payment",
                "action",
                "provider",
                "amount",
                "status",
                "intent",
                "error",
                "compensation",
            ],
            [
                (
                    s["seq"],
                    ",".join(str(d) for d in s["depends_on"]) or None,
                    clip(s["payment_id"], 24),
                    s["action"],
                    s["provider"],
                    None if s["amount_minor"] is None else f"{s['amount_minor']} {s['currency']}",
                    s["status"],
                    s["intent_id"],
                    s["error_code"],
                    _compensation(s),
                )
                for s in found["steps"]
            ],
        )
    )
    history = found["history"]
    lines.append(f"\nhistory ({len(history)} change(s)):")
    lines.append(
        render_table(
            ["at", "actor", "what", "changes"],
            [
                (
                    format_when(h["at"]),
                    h["actor"],
                    f"{h['entity']} {h['entity_id']} {h['operation']}",
                    clip(
                        "; ".join(f"{k}: {old} → {new}" for k, (old, new) in h["changes"].items()),
                        100,
                    )
                    or None,
                )
                for h in history
            ],
        )
    )
    return "\n".join(lines)


def _cmd_list(args: argparse.Namespace, conninfo: str) -> int:
    flows = list_flows(conninfo, state=args.state, limit=args.limit)
    if args.json:
        print(json.dumps(flows, indent=2, default=str))
    else:
        print(render_flows(flows))
    return 0


def _cmd_show(args: argparse.Namespace, conninfo: str) -> int:
    found = find_flow(conninfo, args.id)
    if found is None:
        print(f"error: no flow {args.id} in outbox.flows", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(found, indent=2, default=str))
    else:
        print(render_flow(found))
    return 0


def _cmd_operate(args: argparse.Namespace, conninfo: str) -> int:
    operator = operator_of(args)
    try:
        if args.flows_command == "approve":
            row = approve(conninfo, args.request, operator=operator)
            print(
                f"request {row['id']} applied: {row['change'].get('operation')} on flow "
                f"{row['name']} (asked by {row['requested_by']}, approved by {row['approved_by']})"
            )
            return 0
        if args.flows_command == "cancel":
            flow = cancel_flow(conninfo, args.id, operator=operator, reason=args.reason)
        elif args.flows_command == "retry-step":
            flow = retry_step(conninfo, args.id, args.seq, operator=operator, reason=args.reason)
        else:
            flow = mark_compensated(
                conninfo, args.id, args.seq, operator=operator, reason=args.reason
            )
    except ApprovalNeeded as exc:
        return approval_requested(exc)
    except psycopg.Error as exc:
        return print_refusal(exc)
    reason = f": {flow['reason']}" if flow["reason"] else ""
    print(f"flow {flow['id']} ({flow['flow_key']}): {flow['state']}{reason}")
    return 0


def duration_seconds(text: str) -> int:
    """An argparse type: ``7d``, ``36h``, ``1h30m``, ``1w`` (the operator commands' ages), in
    whole seconds."""
    return int(age(text))


def _describe_seconds(seconds: int) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def render_policies(policies: list[dict[str, Any]]) -> str:
    """The rows of :func:`relay.operations.flows.list_authorization_policies` as a table."""
    if not policies:
        return (
            "no policies: authorisations no flow covers are left alone "
            "(set one with `outbox-relay flows policy PROVIDER alert|void --after 7d --reason R`)"
        )
    return render_table(
        ["provider", "policy", "after", "uncovered now", "set by", "at", "why"],
        [
            (
                p["provider"],
                p["action"],
                _describe_seconds(int(p["after_seconds"])),
                p["uncovered_now"],
                p["updated_by"],
                format_when(p["updated_at"]),
                clip(p["reason"], 50),
            )
            for p in policies
        ],
    )


def _cmd_policies(args: argparse.Namespace, conninfo: str) -> int:
    policies = list_authorization_policies(conninfo)
    if args.json:
        print(json.dumps(policies, indent=2, default=str))
    else:
        print(render_policies(policies))
    return 0


def _cmd_policy(args: argparse.Namespace, conninfo: str) -> int:
    try:
        set_authorization_policy(
            conninfo,
            args.provider,
            args.action,
            args.after,
            operator=operator_of(args),
            reason=args.reason,
        )
    except psycopg.Error as exc:
        too_long_or_short = (
            exc.diag.constraint_name == "authorization_policies_after_seconds_1_minute_to_366_days"
        )
        return print_refusal(
            exc, hint="--after must be between 1m and 366d" if too_long_or_short else None
        )
    print(render_policies(list_authorization_policies(conninfo)))
    return 0


def add_commands(commands: Any, database_url: Callable[[], str]) -> None:
    """Register the ``flows`` commands on the CLI's subparsers."""
    group = commands.add_parser(
        "flows",
        help="payment flows: their steps, compensations and history",
        description=plain_help(__doc__ or ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = group.add_subparsers(dest="flows_command", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="the newest flows, optionally of one state")
    listing.add_argument("--state", choices=FLOW_STATES, help="only flows in this state")
    listing.add_argument(
        "--limit", type=positive, default=50, help="at most this many (default 50)"
    )
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(handler=lambda args: _cmd_list(args, database_url()))
    show = actions.add_parser("show", help="one flow: its steps, compensations and history")
    show.add_argument("id", type=int, metavar="ID", help="the flow's id")
    show.add_argument("--json", action="store_true", help="print JSON")
    show.set_defaults(handler=lambda args: _cmd_show(args, database_url()))
    operate = lambda args: _cmd_operate(args, database_url())  # noqa: E731
    cancel = actions.add_parser("cancel", help="a running flow compensates")
    cancel.add_argument("id", type=int, metavar="ID", help="the flow's id")
    retry = actions.add_parser(
        "retry-step", help="re-drive a dead step (or its dead compensation) under its own key"
    )
    retry.add_argument("id", type=int, metavar="ID", help="the flow's id")
    retry.add_argument("seq", type=positive, metavar="SEQ", help="the step's number")
    mark = actions.add_parser(
        "mark-compensated",
        help="record a failed compensation as done by hand (needs a second operator)",
    )
    mark.add_argument("id", type=int, metavar="ID", help="the flow's id")
    mark.add_argument("seq", type=positive, metavar="SEQ", help="the step's number")
    for parser in (cancel, retry, mark):
        parser.add_argument(
            "--reason", required=True, help="why, recorded in the flow's audit trail"
        )
        add_operator_argument(parser)
        parser.set_defaults(handler=operate)
    approving = actions.add_parser(
        "approve", help="apply an override another operator requested (from your own login)"
    )
    approving.add_argument("request", type=int, metavar="REQ", help="the request's id")
    add_operator_argument(approving)
    approving.set_defaults(handler=operate)
    policies = actions.add_parser(
        "policies", help="each provider's policy for authorisations no flow covers"
    )
    policies.add_argument("--json", action="store_true", help="print JSON")
    policies.set_defaults(handler=lambda args: _cmd_policies(args, database_url()))
    policy = actions.add_parser(
        "policy",
        help="set a provider's policy for authorisations no flow covers (opt-in, audited)",
        description="Once a payment's authorisation has waited --after with no flow covering it "
        "and no capture or void on its way: off leaves it, alert counts it (gauge "
        "outbox_relay_uncovered_authorizations, alert OutboxRelayUncoveredAuthorizations), "
        "void has the relays void it once (docs/flows.md).",
    )
    policy.add_argument("provider", metavar="PROVIDER", help="the provider instance's name")
    policy.add_argument("action", choices=AUTHORIZATION_POLICY_ACTIONS, help="what happens")
    policy.add_argument(
        "--after",
        type=duration_seconds,
        required=True,
        help="how long an authorisation may wait first: 7d, 36h, 1h30m (1m to 366d)",
    )
    policy.add_argument("--reason", required=True, help="why, recorded in the audit trail")
    add_operator_argument(policy)
    policy.set_defaults(handler=lambda args: _cmd_policy(args, database_url()))
