"""`outbox-relay dead-letters list|retry|cancel`: work the intents that wait for an operator.

An intent is ``dead`` when the provider called the request invalid or its attempts ran out;
it blocks the later intents of its payment. An operator either

* **retries** it: back to ``pending`` at once with its attempts reset and its error cleared,
  under the SAME idempotency key (a provider that already applied it replays the first
  result); an intent behind an earlier unresolved one of its payment goes ``blocked``;
* or **cancels** it: ``failed`` with error_code ``cancelled_by_operator``, and the next
  blocked intent of its payment is promoted.

Both run the SQL functions of sql/0006 (``outbox.retry_dead_intents``,
``outbox.cancel_dead_intents``), in transactions that name the operator for the audit
trail. Intents are named by id, or selected by filters (``--provider``, ``--error-code``,
``--older-than``) or ``--all``; a selection asks for confirmation unless ``--yes`` and
works in batches, showing progress.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

import psycopg

from relay.cli.operator_args import add_operator_argument, age, operator_of, positive
from relay.cli.tables import Progress, clip, format_seconds, plain_help, render_table
from relay.domain.money import Money, format_money
from relay.operations.dead_letters import (
    Action,
    ActionReport,
    Filters,
    act_on_database,
    list_dead_in_database,
)

__all__ = ["add_commands", "describe_filters"]


def describe_filters(filters: Filters) -> str:
    """``'provider stripe, dead for over 2h'``; ``'all'`` when no filter is given."""
    parts = []
    if filters.provider is not None:
        parts.append(f"provider {filters.provider}")
    if filters.error_code is not None:
        parts.append(f"error_code {filters.error_code}")
    if filters.older_than_seconds is not None:
        parts.append(f"dead for over {format_seconds(filters.older_than_seconds)}")
    return ", ".join(parts) or "all"


def _filters(args: argparse.Namespace) -> Filters:
    return Filters(args.provider, args.error_code, args.older_than)


def _amount(row: dict[str, Any]) -> str:
    if row["amount_minor"] is None:
        return f"all {row['currency']}"
    return format_money(Money(row["amount_minor"], row["currency"]), row["exponent"])


def _cmd_list(args: argparse.Namespace, conninfo: str) -> int:
    rows = list_dead_in_database(conninfo, _filters(args), limit=args.limit)
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    if not rows:
        print(f"no dead intents ({describe_filters(_filters(args))})")
        return 0
    table = [
        (
            r["id"],
            r["payment_id"],
            r["provider"],
            r["action"],
            _amount(r),
            r["attempts"],
            r["error_code"],
            format_seconds(r["dead_seconds"]),
            clip(r["error_message"] or "", 60),
        )
        for r in rows
    ]
    print(
        render_table(
            [
                "id",
                "payment",
                "provider",
                "action",
                "amount",
                "attempts",
                "error_code",
                "dead for",
                "error_message",
            ],
            table,
        )
    )
    if len(rows) == args.limit:
        print(f"(first {args.limit}; --limit shows more)")
    return 0


def _confirmer(args: argparse.Namespace, verb: str, operator: str) -> Callable[[int], bool]:
    def confirm(matched: int) -> bool:
        if args.yes:
            return True
        if not sys.stdin.isatty():
            print(
                f"error: {matched} dead intent(s) match; refusing to {verb} them without "
                "--yes (stdin is not a terminal)",
                file=sys.stderr,
            )
            return False
        # The question goes to stderr, like the progress lines: stdout carries only the
        # result (`--json` piped into jq gets JSON, not a prompt).
        print(
            f"{verb} {matched} dead intent(s) ({describe_filters(_filters(args))}) as "
            f"operator:{operator}? [y/N] ",
            end="",
            file=sys.stderr,
            flush=True,
        )
        answer = sys.stdin.readline()
        return answer.strip().lower() in ("y", "yes")

    return confirm


def _cmd_act(args: argparse.Namespace, conninfo: str, action: Action) -> int:
    filters = _filters(args)
    if args.ids and (args.all or not filters.empty):
        print("error: name intent ids or select with filters/--all, not both", file=sys.stderr)
        return 2
    if not args.ids and not args.all and filters.empty:
        print(
            f"error: name the dead intents to {action} (ids), or select them with "
            "--provider, --error-code, --older-than, or --all",
            file=sys.stderr,
        )
        return 2
    operator = operator_of(args)
    bar: Progress | None = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = Progress(action, total)
        bar.advance(done - bar.done)

    refused = False
    confirm_bulk = _confirmer(args, action, operator)

    def confirm(matched: int) -> bool:
        nonlocal refused
        ok = True if args.ids else confirm_bulk(matched)
        refused = not ok
        return ok

    try:
        report = act_on_database(
            conninfo,
            action,
            operator=operator,
            ids=args.ids,
            filters=filters,
            reason=getattr(args, "reason", None),
            past_key_lifetime=getattr(args, "allow_expired_keys", False),
            batch_size=args.batch_size,
            progress=progress,
            confirm=confirm,
        )
    except psycopg.errors.UndefinedFunction:
        print(
            "error: the dead-letter functions are missing; run `outbox-relay migrate` (sql/0006)",
            file=sys.stderr,
        )
        return 1
    finally:
        if bar is not None:
            bar.finish()
    if args.json:
        print(json.dumps(report.as_json(), indent=2, default=str))
    else:
        _print_report(report, filters if not args.ids else None)
    if refused:
        return 1
    return 1 if report.skipped or report.kept else 0


def _print_report(report: ActionReport, filters: Filters | None) -> None:
    if filters is not None and not report.matched:
        print(f"no dead intents match ({describe_filters(filters)}); nothing to do")
        return
    for skipped in report.skipped:
        print(f"skipped intent {skipped['id']}: {skipped['reason']}")
    if report.kept:
        shown = ", ".join(str(r["intent_id"]) for r in report.kept[:20])
        print(
            f"kept dead {len(report.kept)} intent(s) sent longer ago than their provider's "
            f"idempotency-key lifetime: {shown}{' ...' if len(report.kept) > 20 else ''}\n"
            "  the provider may have forgotten their keys, so a retry could take effect twice;"
            " wait for the janitor's lookup\n  (no_effect), or check at the provider and pass "
            "--allow-expired-keys"
        )
    if not report.done:
        if report.matched:
            print("nothing done")
        return
    if report.action == "retry":
        blocked = sum(1 for r in report.done if r["status"] == "blocked")
        line = f"retried {len(report.done)} intent(s) as operator:{report.operator}"
        if blocked:
            line += f" ({blocked} wait behind an earlier intent of their payment)"
        print(line)
    else:
        promoted = [r["promoted_intent_id"] for r in report.done if r["promoted_intent_id"]]
        print(f"cancelled {len(report.done)} intent(s) as operator:{report.operator}")
        if promoted:
            print(
                f"promoted {len(promoted)} next intent(s) of their payments: "
                + ", ".join(str(i) for i in promoted[:20])
                + (" ..." if len(promoted) > 20 else "")
            )
    rows = [(r["intent_id"], r["payment_id"], r["status"]) for r in report.done[:20]]
    print(render_table(["intent", "payment", "now"], rows))
    if len(report.done) > 20:
        print(f"... and {len(report.done) - 20} more (--json lists all)")


def _add_filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--provider", help="only intents of this provider")
    parser.add_argument("--error-code", help="only intents with this error_code")
    parser.add_argument(
        "--older-than",
        type=age,
        metavar="AGE",
        help="only intents dead for longer than AGE (45s, 30m, 2h, 1h30m, 3d)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON")


def _add_action(
    actions: Any, name: Action, help_text: str, description: str
) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = actions.add_parser(
        name,
        help=help_text,
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("ids", nargs="*", type=int, metavar="ID", help="dead intent ids")
    _add_filters(parser)
    parser.add_argument("--all", action="store_true", help="every dead intent")
    parser.add_argument(
        "--yes", "-y", action="store_true", help="do not ask for confirmation of a selection"
    )
    parser.add_argument(
        "--batch-size",
        type=positive,
        default=500,
        metavar="N",
        help="intents per transaction for a selection (default 500)",
    )
    add_operator_argument(parser)
    return parser


def add_commands(commands: Any, database_url: Callable[[], str]) -> None:
    """Register ``dead-letters`` on the CLI's subparsers."""
    group = commands.add_parser(
        "dead-letters",
        help="list, retry or cancel dead intents (they wait for an operator)",
        description=plain_help(__doc__ or ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = group.add_subparsers(dest="dead_letters_command", metavar="ACTION", required=True)

    listing = actions.add_parser(
        "list",
        help="dead intents, longest dead first",
        description="Dead intents with their error, longest dead first. Filters combine.",
    )
    _add_filters(listing)
    listing.add_argument(
        "--limit", type=positive, default=100, metavar="N", help="show at most N (default 100)"
    )
    listing.set_defaults(handler=lambda args: _cmd_list(args, database_url()))

    retry = _add_action(
        actions,
        "retry",
        "re-drive dead intents under their own idempotency keys",
        "Move dead intents back to pending, due now, attempts reset, error cleared, under the\n"
        "SAME idempotency key. An intent behind an earlier unresolved intent of its payment\n"
        "waits (blocked). Name ids, or select with filters or --all (asks to confirm unless\n"
        "--yes). Fix the cause first (API key, data).\n\n"
        "An intent already sent longer ago than its provider's idempotency-key lifetime\n"
        "(outbox.provider_policies; Stripe 24 h) stays dead: the provider may have forgotten\n"
        "its key, so it could take effect twice. It is retried once the janitor's lookups\n"
        "found no effect of it, or with --allow-expired-keys after you checked at the provider.\n\n"
        "examples:\n"
        "  outbox-relay dead-letters retry 42 43\n"
        "  outbox-relay dead-letters retry --provider stripe --error-code rate_limited --yes",
    )
    retry.add_argument(
        "--allow-expired-keys",
        action="store_true",
        help="also re-drive intents past their key lifetime (only after checking at the "
        "provider that they took no effect)",
    )
    retry.set_defaults(handler=lambda args: _cmd_act(args, database_url(), "retry"))

    cancel = _add_action(
        actions,
        "cancel",
        "end dead intents as failed (cancelled_by_operator)",
        "End dead intents for good: status failed, error_code cancelled_by_operator; the\n"
        "next blocked intent of each payment is promoted and a result event is written.\n"
        "The payment's state is not changed: settle anything the provider applied first.\n\n"
        "examples:\n"
        "  outbox-relay dead-letters cancel 44 --reason 'refunded by hand'\n"
        "  outbox-relay dead-letters cancel --older-than 7d --all --yes",
    )
    cancel.add_argument("--reason", help="why (kept in error_message, at most 300 characters)")
    cancel.set_defaults(handler=lambda args: _cmd_act(args, database_url(), "cancel"))
