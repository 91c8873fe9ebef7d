"""`outbox-relay intents show ID`: one intent, its payment, and its full history.

The history is the intent's audit trail (sql/0005's ``outbox.audit_log``, read through
``outbox.intent_history``): every change of the row, when and by whom (a relay instance,
an operator, a database role), with the fields that changed. Where the audit trail is not
installed the command says so and shows the rest. Card numbers and secrets in the
intent's metadata or messages are masked in the output.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from relay.cli.tables import clip, format_when, plain_help, render_table
from relay.domain.money import Money, format_money
from relay.operations.intents import find_intent

__all__ = ["add_commands", "print_intent"]


def _money(amount: int | None, currency: str, exponent: int | None) -> str:
    if amount is None:
        return "-"
    if exponent is None:
        return f"{amount} {currency} (minor units)"
    return format_money(Money(amount, currency), exponent)


def _short(value: object, width: int = 40) -> str:
    text = "∅" if value is None else (value if isinstance(value, str) else json.dumps(value))
    return clip(text, width)


def _rate_text(rate: dict[str, Any] | None, rate_id: int) -> str:
    if not rate:
        return f"rate {rate_id}"
    return (
        f"rate {rate_id}: 1 {rate['base']} = {rate['rate']} {rate['quote']}, "
        f"{rate['source_kind']} {rate['source_name']}, published {rate['published_at']}"
    )


def _conversion(intent: dict[str, Any], currency: str, exponent: int | None) -> str | None:
    """Why this amount: the original amount, the rate(s) it was converted at, the result."""
    if intent.get("fx_rate_id") is None:
        return None
    original = _money(
        intent["original_amount_minor"], intent["original_currency"], intent["original_exponent"]
    )
    first = intent.get("fx_rate") or {}
    via = intent.get("fx_via_rate")
    legs = f"({_rate_text(first, intent['fx_rate_id'])}"
    if intent.get("fx_via_rate_id") is not None:
        legs += f"; cross rate via {_rate_text(via, intent['fx_via_rate_id'])}"
    legs += ")"
    charged = _money(intent["amount_minor"], currency, exponent)
    if intent["action"] == "refund":
        # A refund gives back what was paid; its worth in the charge's currency follows.
        return (
            f"{charged} is worth {original} at the charge's rate {first.get('rate', '?')} "
            f"{legs}, rounded half to even"
        )
    return f"{original} at rate {first.get('rate', '?')} {legs} = {charged}, rounded half to even"


def print_intent(found: dict[str, Any]) -> None:
    """What :func:`relay.operations.intents.collect_intent` found, as text on stdout."""
    intent = found["intent"]
    payment = found["payment"] or {}
    exponent = payment.get("exponent")
    currency = intent["currency"]
    archived = " (archived)" if intent["archived"] else ""
    print(f"intent {intent['id']}{archived}: {intent['action']} on payment {intent['payment_id']}")
    fields = [
        ("status", intent["status"]),
        ("provider", intent["provider"]),
        (
            "amount",
            _money(intent["amount_minor"], currency, exponent)
            if intent["amount_minor"] is not None
            else f"all that remains ({currency})",
        ),
        (
            "at charge rate" if intent["action"] == "refund" else "converted from",
            _conversion(intent, currency, exponent),
        ),
        ("applied", _money(intent["amount_applied_minor"], currency, exponent)),
        ("attempts", intent["attempts"]),
        ("idempotency key", intent["idempotency_key"]),
        ("payment method", intent["payment_method"]),
        ("provider ref", intent["provider_reference"]),
        (
            "error",
            f"{intent['error_code']}: {intent['error_message'] or ''}".rstrip(": ")
            if intent["error_code"]
            else None,
        ),
        ("traceparent", (intent["metadata"] or {}).get("traceparent")),
        ("metadata", json.dumps(intent["metadata"]) if intent["metadata"] else None),
        ("available at", format_when(intent["available_at"])),
        (
            "lease",
            f"{intent['claimed_by']} until {format_when(intent['lease_expires_at'])}"
            if intent["claimed_by"]
            else None,
        ),
        ("created", format_when(intent["created_at"])),
        ("updated", format_when(intent["updated_at"])),
        ("completed", format_when(intent["completed_at"]) if intent["completed_at"] else None),
    ]
    for label, value in fields:
        if value is not None:
            print(f"  {label:<16}{value}")
    if payment:
        print(
            f"\npayment {payment['payment_id']}: {payment['state']}, authorized "
            f"{_money(payment['authorized_minor'], currency, exponent)}, captured "
            f"{_money(payment['captured_minor'], currency, exponent)}, refunded "
            f"{_money(payment['refunded_minor'], currency, exponent)}"
            + (f", ref {payment['provider_reference']}" if payment["provider_reference"] else "")
        )
        if payment.get("routing_rule_id") is not None:
            # sql/0051: the rule (and its version then) that chose the provider.
            print(
                f"  routed to {payment['provider']} by rule {payment['routing_rule_name']} "
                f"version {payment['routing_rule_version']} (bucket {payment['routing_bucket']}"
                f"; the rule is at version {payment['routing_rule_current_version']} now)"
            )
        elif "routing_rule_id" in payment:
            print(f"  provider {payment['provider']} named by the application (not routed)")
        if payment.get("failed_over_from"):
            # sql/0064: the providers its first intent never reached; the history below
            # holds each move (who, the keys before and after, why).
            print(
                f"  failed over from {' then '.join(payment['failed_over_from'])} to "
                f"{payment['provider']}: nothing was ever sent there; a new idempotency key"
            )
        if payment.get("dispute_status"):
            # sql/0035: what the provider withdrew for a dispute and has not returned.
            print(
                f"  dispute {payment['dispute_reference']}: {payment['dispute_status']}, "
                f"{_money(payment['disputed_minor'], currency, exponent)} withheld"
                + (" (final)" if payment["dispute_status"] == "lost" else "")
            )
    siblings = found["payment_intents"]
    print(f"\nintents of the payment, in order ({len(siblings)}):")
    print(
        render_table(
            ["", "seq", "id", "action", "status", "amount", "attempts", "error_code"],
            [
                (
                    "→" if s["id"] == intent["id"] else "",
                    s["payment_seq"],
                    s["id"],
                    s["action"],
                    s["status"],
                    _money(s["amount_minor"], currency, exponent),
                    s["attempts"],
                    s["error_code"],
                )
                for s in siblings
            ],
        )
    )
    notifications = found.get("notifications")
    if notifications:
        print(f"\nwebhook notifications of the payment ({len(notifications)}):")
        print(
            render_table(
                ["id", "event", "type", "status", "received", "result"],
                [
                    (
                        n["id"],
                        n["event_id"],
                        n["event_type"],
                        n["status"],
                        format_when(n["received_at"]),
                        _short(n["result"], 70),
                    )
                    for n in notifications
                ],
            )
        )
    history = found["history"]
    if history is None:
        print(f"\nhistory: {found['history_note']}")
        return
    if not history:
        # sql/0019: the relay's first transaction on the intent writes its creation rows.
        print(
            f"\nhistory: none yet; inserted at {format_when(found['intent']['created_at'])}, its "
            "creation is recorded when a relay first claims it (or promotes it from blocked)"
        )
        return
    print(f"\nhistory ({len(history)} change(s)):")
    table = []
    for row in history:
        changes = row["changes"]
        if changes and all(old is None for old, _ in changes.values()) and "status" in changes:
            summary = f"created, status {changes['status'][1]}"  # the fields are shown above
        else:
            summary = "; ".join(
                f"{k}: {_short(old, 24)} → {_short(new)}" for k, (old, new) in changes.items()
            )
        if row.get("reason"):
            summary += f" (reason: {_short(row['reason'], 80)})"
        table.append((format_when(row["at"]), row["actor"], row["operation"], summary or "-"))
    print(render_table(["at", "actor", "operation", "changes"], table))


def _cmd_show(args: argparse.Namespace, conninfo: str) -> int:
    found = find_intent(conninfo, args.id)  # a missing schema: relay/cli/main.py says so
    if found is None:
        print(
            f"error: no intent {args.id} in outbox.payment_intents or its archive",
            file=sys.stderr,
        )
        return 1
    if args.json:
        print(json.dumps(found, indent=2, default=str))
    else:
        print_intent(found)
    return 0


def add_commands(commands: Any, database_url: Callable[[], str]) -> None:
    """Register ``intents show`` on the CLI's subparsers."""
    group = commands.add_parser(
        "intents",
        help="look at one intent and its history",
        description="Inspect payment intents.",
    )
    actions = group.add_subparsers(dest="intents_command", metavar="ACTION", required=True)
    show = actions.add_parser(
        "show",
        help="an intent, its payment and its full history (audit trail)",
        description=plain_help(__doc__ or ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    show.add_argument("id", type=int, metavar="ID", help="the intent's id")
    show.add_argument("--json", action="store_true", help="print JSON")
    show.set_defaults(handler=lambda args: _cmd_show(args, database_url()))
