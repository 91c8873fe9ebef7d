"""The money commands: `ledger check`, `audit verify`, `reconcile`, `exceptions ...`.

Registered on the CLI by :func:`add_commands`; each handler imports its module lazily so
`outbox-relay --help` stays quick. Exit status: 0 when the check holds or the command did
what it said, 1 when a check found problems or a command was refused, 2 for bad usage or
configuration.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from relay.cli.operator_args import operator_of, positive

__all__ = ["add_commands"]

_RAW = argparse.RawDescriptionHelpFormatter


def _wrap(text: str) -> str:
    """Fill prose paragraphs to 88 columns; keep example blocks as written."""
    return "\n\n".join(
        part if "\n  " in part or part.startswith("  ") else textwrap.fill(part, 88)
        for part in text.split("\n\n")
    )


_STATUSES = ("open", "awaiting_approval", "accepted", "resolved", "cleared")


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _timestamp(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an ISO 8601 time such as 2026-11-24 or 2026-11-24T18:00:00Z"
        ) from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text} must be a finite number of seconds, 0 or more")
    return value


# -- ledger / audit -------------------------------------------------------------------------


def _cmd_ledger_check(args: argparse.Namespace, url: str) -> int:
    from relay.cli.finance_reports import print_ledger_report
    from relay.finance.ledger import check_ledger

    report = check_ledger(url)
    print_ledger_report(report, as_json=args.json)
    return 0 if report.ok else 1


def _cmd_audit_verify(args: argparse.Namespace, url: str) -> int:
    from relay.cli.finance_reports import print_audit_report
    from relay.finance.audit import verify_database

    grace = {} if args.creation_grace is None else {"creation_grace_seconds": args.creation_grace}
    report = verify_database(url, progress=_progress, **grace)
    print_audit_report(report, as_json=args.json)
    return 0 if report.intact else 1


# -- reconcile ------------------------------------------------------------------------------


def _cmd_reconcile(args: argparse.Namespace, url: str) -> int:
    import anyio

    from provider_adapters.base import (
        BalanceTransaction,
        SettlementReports,
        SettlementUnavailable,
    )
    from provider_adapters.registry import build_adapter
    from relay.cli.finance_reports import print_run
    from relay.finance.exceptions import ExceptionCommandError, validate_operator
    from relay.finance.reconcile import FeeSchedule, currency_exponents, run, write_reports
    from relay.infra.config import ConfigError, load_settings

    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"error: invalid configuration ({len(exc.lines)} problem(s)):", file=sys.stderr)
        for line in exc.lines:
            print(f"  {line}", file=sys.stderr)
        return 2
    name = args.provider.lower()
    if name not in settings.providers:
        configured = ", ".join(sorted(settings.providers)) or "none"
        print(
            f"error: provider {name!r} is not configured (configured: {configured}); set "
            f"RELAY_PROVIDERS__{name.upper()}__API_KEY and __BASE_URL",
            file=sys.stderr,
        )
        return 2
    until = args.until or datetime.now(UTC)
    since = args.since or until - timedelta(days=1)
    if since >= until:
        print(f"error: --since ({since.isoformat()}) must be before --until", file=sys.stderr)
        return 2
    try:
        actor = (
            f"operator:{validate_operator(args.operator)}" if args.operator else f"reconcile:{name}"
        )
    except ExceptionCommandError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    adapter = build_adapter(name, settings.providers[name])
    if not isinstance(adapter, SettlementReports):
        print(f"error: the {name} adapter cannot list settlement data", file=sys.stderr)
        return 2
    fees = FeeSchedule(
        bps=settings.reconcile_fee_bps,
        fixed_minor=settings.reconcile_fee_fixed_minor,
        tolerance_minor=settings.reconcile_fee_tolerance_minor,
        fx_tolerance_bps=settings.reconcile_fx_tolerance_bps,
    )

    # The provider's amounts are converted to ISO minor units with the currency table.
    exponents = currency_exponents(url)

    def transactions(since: datetime, until: datetime) -> AsyncIterator[BalanceTransaction]:
        return adapter.balance_transactions(since, until, exponents=exponents)

    async def go() -> Any:
        try:
            return await run(
                url,
                name,
                transactions,
                since=since,
                until=until,
                fees=fees,
                slack=timedelta(seconds=settings.reconcile_slack_seconds),
                actor=actor,
                exponents=exponents,
                progress=_progress,
            )
        finally:
            await adapter.aclose()

    try:
        report = anyio.run(go)
    except SettlementUnavailable as exc:
        print(f"error: {exc}; the run is recorded as failed, try again", file=sys.stderr)
        return 1
    csv_path, json_path = write_reports(report, Path(args.output_dir))
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print_run(report)
        print(f"\nreport written to {csv_path} and {json_path}")
    return 1 if report.result.findings and args.fail_on_exceptions else 0


# -- exceptions -----------------------------------------------------------------------------


def _cmd_exceptions_list(args: argparse.Namespace, url: str) -> int:
    from relay.cli.finance_reports import print_exceptions
    from relay.finance.exceptions import AWAITING_A_PERSON, list_exceptions

    if args.status is None:
        statuses: list[str] | None = list(AWAITING_A_PERSON)
    else:
        statuses = None if args.status == "all" else [args.status]
    rows = list_exceptions(
        url, statuses=statuses, provider=args.provider, kind=args.kind, limit=args.limit
    )
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    if not rows:
        which = " or ".join(statuses or ()) or "any"
        print(f"no reconciliation exceptions ({which}); --status all lists every one")
        return 0
    print_exceptions(rows)
    return 0


def _refused(exc: Exception) -> int:
    print(f"refused: {exc}", file=sys.stderr)
    return 1


def _cmd_exceptions_accept(args: argparse.Namespace, url: str) -> int:
    from relay.finance.exceptions import ExceptionCommandError, accept

    operator = operator_of(args)
    try:
        accept(url, args.id, operator=operator, reason=args.reason)
    except ExceptionCommandError as exc:
        return _refused(exc)
    print(f"exception {args.id} accepted by {operator}: {args.reason}")
    return 0


def _request(action: str) -> Callable[[argparse.Namespace, str], int]:
    def handler(args: argparse.Namespace, url: str) -> int:
        from relay.finance.exceptions import ExceptionCommandError, request_action

        operator = operator_of(args)
        try:
            asked = request_action(
                url,
                args.id,
                action,
                operator=operator,
                reason=args.reason,
                amount_minor=getattr(args, "amount", None),
            )
        except ExceptionCommandError as exc:
            return _refused(exc)
        print(
            f"action {asked.action_id} requested by {operator}: {asked.describe()}.\n"
            "It moves money, so it runs only when a second, different operator approves it,\n"
            "from their own database login:\n"
            f"  outbox-relay exceptions approve {asked.action_id} --operator OTHER_NAME"
        )
        return 0

    return handler


def _cmd_exceptions_approve(args: argparse.Namespace, url: str) -> int:
    from relay.finance.exceptions import ExceptionCommandError, approve

    operator = operator_of(args)
    try:
        done = approve(url, args.action_id, operator=operator)
    except ExceptionCommandError as exc:
        return _refused(exc)
    intents = ", ".join(str(i) for i in done.intent_ids)
    print(
        f"action {done.action_id} ({done.action}) approved by {operator} and executed: "
        f"intent(s) {intents}; exception {done.exception_id} resolved"
    )
    return 0


def add_commands(commands: Any, database_url: Callable[[], str]) -> None:
    """Register the money commands on the CLI's subparsers."""

    def bind(
        handler: Callable[[argparse.Namespace, str], int],
    ) -> Callable[[argparse.Namespace], int]:
        return lambda args: handler(args, database_url())

    ledger = commands.add_parser(
        "ledger",
        help="check the double-entry ledger",
        description="The ledger: one balanced transaction per succeeded intent, posted in the "
        "outcome's own database transaction (docs/audit-and-reconciliation.md).",
    )
    ledger_actions = ledger.add_subparsers(dest="ledger_command", metavar="ACTION", required=True)
    check = ledger_actions.add_parser(
        "check",
        help="prove every transaction balances and the ledger equals the payments",
        description=_wrap(
            "Checks, in one snapshot: every ledger transaction sums to zero per "
            "currency; every succeeded intent has exactly one posting of its action; every "
            "payment's authorised, held, captured, refunded and receivable amounts equal its "
            "ledger. Prints the account balances and the totals per provider and currency.\n\n"
            "exit status: 0 all checks hold, 1 problems found (each named)."
        ),
        formatter_class=_RAW,
    )
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    check.set_defaults(handler=bind(_cmd_ledger_check))

    audit = commands.add_parser(
        "audit",
        help="verify the hash-chained audit trail",
        description="The audit trail: every intent, payment, janitor and reconciliation change "
        "with who, when, before and after, hash-chained per entity.",
    )
    audit_actions = audit.add_subparsers(dest="audit_command", metavar="ACTION", required=True)
    verify = audit_actions.add_parser(
        "verify",
        help="walk every chain and name the first broken link",
        description=_wrap(
            "Recomputes every row's hash and link, names the first broken link and "
            "whether a row was edited, deleted, inserted or reordered, then checks that every "
            "intent and payment ends its chain in its live state (a deleted tail, or a change "
            "made with the trigger off). Progress goes to stderr.\n\n"
            "An intent's creation rows (and its new payment's) are written by the first relay "
            "transaction that touches it, its claim or its promotion, with the inserting role "
            "and the INSERT's time: an intent or payment older than --creation-grace without "
            "them is reported (missing_creation); younger ones are counted as awaiting them.\n\n"
            "exit status: 0 intact, 1 broken."
        ),
        formatter_class=_RAW,
    )
    verify.add_argument("--json", action="store_true", help="print the report as JSON")
    verify.add_argument(
        "--creation-grace",
        type=_seconds,
        metavar="SECONDS",
        help="how long a new intent may wait for a relay to write its creation rows before "
        "it is reported (default: 300, relay.finance.audit.DEFAULT_CREATION_GRACE_SECONDS)",
    )
    verify.set_defaults(handler=bind(_cmd_audit_verify))

    reconcile = commands.add_parser(
        "reconcile",
        help="match the provider's settlement data against the ledger",
        description=_wrap(
            "Fetches the provider's balance transactions for a window (page by page), "
            "matches them with the ledger's captures, charges and refunds, and records a run with "
            "its exceptions: missing_internal, missing_at_provider, amount_mismatch, "
            "currency_mismatch, status_mismatch, unexpected_fee. Re-running a window finds the "
            "same exceptions again instead of duplicating them, and clears those no longer found. "
            "The report prints as a table and is written as CSV and JSON.\n\n"
            "Fees: RELAY_RECONCILE_FEE_BPS, _FEE_FIXED_MINOR, _FEE_TOLERANCE_MINOR.\n\n"
            "examples:\n"
            "  outbox-relay reconcile --provider stripe\n"
            "  outbox-relay reconcile --provider stripe --since 2026-11-24 --until 2026-11-25 "
            "--output-dir /reports"
        ),
        formatter_class=_RAW,
    )
    reconcile.add_argument("--provider", required=True, help="provider name as configured")
    reconcile.add_argument(
        "--since", type=_timestamp, help="window start, ISO 8601 (default: 24 h before --until)"
    )
    reconcile.add_argument(
        "--until", type=_timestamp, help="window end, exclusive, ISO 8601 (default: now)"
    )
    reconcile.add_argument(
        "--output-dir", default=".", help="where the CSV and JSON reports go (default: .)"
    )
    reconcile.add_argument(
        "--operator", help="who runs it, for the audit trail (default: reconcile:<provider>)"
    )
    reconcile.add_argument(
        "--fail-on-exceptions", action="store_true", help="exit 1 when any exception is found"
    )
    reconcile.add_argument("--json", action="store_true", help="print the report as JSON")
    reconcile.set_defaults(handler=bind(_cmd_reconcile))

    exceptions = commands.add_parser(
        "exceptions",
        help="list and work reconciliation exceptions (money moves need two operators)",
        description=_wrap(
            "Work the exceptions reconciliation found. accept closes one with a reason; "
            "refund, void and redrive move money, so they only ask, and run when a second, "
            "different operator approves from their own database login. Every command names its "
            "operator (--operator, else RELAY_OPERATOR, else your user name) and is audited.\n\n"
            "examples:\n"
            "  outbox-relay exceptions list\n"
            "  outbox-relay exceptions accept 7 --operator alice --reason 'fee dispute filed'\n"
            "  outbox-relay exceptions refund 8 --operator alice --reason 'over-captured'\n"
            "  outbox-relay exceptions approve 3 --operator bob"
        ),
        formatter_class=_RAW,
    )
    actions = exceptions.add_subparsers(dest="exceptions_command", metavar="ACTION", required=True)
    listing = actions.add_parser(
        "list",
        help="exceptions waiting for someone (open, awaiting approval), oldest first",
        description="Reconciliation exceptions with their delta (provider minus ledger, in "
        "currency units) and any action awaiting approval. By default the ones that wait for "
        "someone: open, and awaiting_approval (a money move waiting for a second operator).",
    )
    listing.add_argument(
        "--status",
        choices=(*_STATUSES, "all"),
        default=None,
        help="only this status (default: open and awaiting_approval)",
    )
    listing.add_argument("--provider", help="only this provider")
    listing.add_argument(
        "--kind",
        choices=(
            "missing_internal",
            "missing_at_provider",
            "amount_mismatch",
            "currency_mismatch",
            "status_mismatch",
            "unexpected_fee",
            "fx_rate_drift",  # sql/0029
            "dispute",  # sql/0023: found by notifications
            "external_change",
            "confirmation_overdue",  # sql/0038: a provider's confirmation never came
        ),
        help="only this class",
    )
    listing.add_argument("--limit", type=positive, default=1000, help="at most N (default 1000)")
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(handler=bind(_cmd_exceptions_list))

    def operator_args(parser: argparse.ArgumentParser, *, reason: bool = True) -> None:
        parser.add_argument(
            "--operator",
            default=None,
            metavar="NAME",
            help="your name, recorded in the audit trail (default: $RELAY_OPERATOR, else "
            "your user name)",
        )
        if reason:
            parser.add_argument("--reason", required=True, help="why, recorded with the exception")

    accept = actions.add_parser(
        "accept",
        help="close an open exception without moving money",
        description="Accept an open exception with a reason (no money moves, no approval needed).",
    )
    accept.add_argument("id", type=positive, help="exception id")
    operator_args(accept)
    accept.set_defaults(handler=bind(_cmd_exceptions_accept))

    for action, text in (
        ("refund", "ask to refund (a new refund intent); needs a second operator's approval"),
        ("void", "ask to void the payment's open authorisation; needs a second operator"),
        ("redrive", "ask to re-drive the payment's dead intents; needs a second operator"),
    ):
        sub = actions.add_parser(action, help=text, description=text[0].upper() + text[1:] + ".")
        sub.add_argument("id", type=positive, help="exception id")
        operator_args(sub)
        if action == "refund":
            sub.add_argument(
                "--amount",
                type=positive,
                help="minor units to refund (default for an over-capture: the excess)",
            )
        sub.set_defaults(handler=bind(_request(action)))

    approve = actions.add_parser(
        "approve",
        help="execute a requested refund, void or re-drive as a second operator",
        description="Execute an action another operator requested. The requester cannot "
        "approve their own action: the approver needs another operator name and another "
        "database login (the database refuses both too).",
    )
    approve.add_argument("action_id", type=positive, help="action id (printed by the request)")
    operator_args(approve, reason=False)
    approve.set_defaults(handler=bind(_cmd_exceptions_approve))
