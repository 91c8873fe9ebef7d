"""``outbox-relay errors [CODE]``: the error catalogue, listed or explained (printing only;
the catalogue is provider_adapters/error_catalogue.py)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from typing import Any

from provider_adapters.error_catalogue import CatalogueEntry, catalogue, describe

__all__ = ["add_commands", "markdown"]


def _flag(entry: CatalogueEntry) -> str:
    if entry.other_card_may_succeed is None:
        return ""
    return "yes" if entry.other_card_may_succeed else "no"


def markdown() -> str:
    """The catalogue as the Markdown table of docs/errors.md (generated, never edited)."""
    lines = [
        "| provider | code | unified | class | other card may succeed | operator remediation "
        "| customer message |",
        "|---|---|---|---|---|---|---|",
    ]
    for e in catalogue():
        lines.append(
            f"| {e.provider} | `{e.code}` | `{e.unified_code}` | {e.klass} | {_flag(e)} "
            f"| {e.remediation} | {e.customer_message} |"
        )
    return "\n".join(lines) + "\n"


def _cmd_errors(args: argparse.Namespace) -> int:
    entries = list(catalogue()) if args.code is None else describe(args.code)
    if args.provider:
        entries = [e for e in entries if e.provider in (args.provider, "*")]
    if args.markdown:
        sys.stdout.write(markdown())
        return 0
    if args.code is not None and not entries:
        print(
            f"{args.code}: not in the error catalogue; the relay handled it by the class the "
            "adapter gave it (see the intent's error_message). Add a row to "
            "provider_adapters/error_catalogue.csv.",
            file=sys.stderr,
        )
        return 1
    if args.json:
        rows: list[dict[str, Any]] = [asdict(e) for e in entries]
        print(json.dumps(rows, indent=1))
        return 0
    if args.code is None:
        width = max(len(e.code) for e in entries)
        for e in entries:
            print(f"{e.provider:<7} {e.code:<{width}}  {e.klass:<9}  {e.unified_code}")
        return 0
    for e in entries:
        print(f"{e.provider} {e.code}: {e.klass} (unified: {e.unified_code})")
        if e.other_card_may_succeed is not None:
            print(f"  another card may succeed: {_flag(e)}")
        print(f"  operator: {e.remediation}")
        print(f"  customer: {e.customer_message}")
    return 0


def add_commands(commands: Any) -> None:
    errors = commands.add_parser(
        "errors",
        help="the error catalogue: every provider code, its class and what to do",
        description="List the error catalogue, or explain one code (a provider's code or a "
        "unified one): its class, whether another card may succeed, what an operator does "
        "and a message safe to show a customer. Needs no database.",
    )
    errors.add_argument("code", nargs="?", help="a code, e.g. insufficient_funds")
    errors.add_argument("--provider", help="only this provider's rows (and the shared ones)")
    errors.add_argument("--json", action="store_true", help="print JSON")
    errors.add_argument(
        "--markdown", action="store_true", help="print the whole catalogue as docs/errors.md"
    )
    errors.set_defaults(handler=_cmd_errors)
