"""The money commands' reports as text: `ledger check`, `audit verify`, `reconcile` and
`exceptions list`. Each function prints what the finance package returned; none queries."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from relay.cli.tables import clip, render_table
from relay.domain.money import format_minor
from relay.finance.audit import VerifyReport
from relay.finance.ledger import LedgerReport
from relay.finance.reconcile import RunReport

__all__ = ["print_audit_report", "print_exceptions", "print_ledger_report", "print_run"]

# Problems and breaks shown as text; --json lists them all.
_PROBLEMS_SHOWN = 100
_BREAKS_SHOWN = 50
# The detail column of `exceptions list`; --json has the whole text.
_DETAIL_WIDTH = 80


def _amount(amount_minor: int | None, currency: str | None, exponent: int | None) -> str | None:
    """Minor units as currency units (``1.00 EUR``); None stays None (printed ``-``)."""
    if amount_minor is None:
        return None
    return format_minor(amount_minor, currency or "?", exponent)


def print_ledger_report(
    report: LedgerReport, *, as_json: bool = False, out: TextIO = sys.stdout
) -> None:
    if as_json:
        print(json.dumps(report.to_json(), indent=2), file=out)
        return
    print(
        f"ledger: {report.transactions} transactions, {report.entries} entries, "
        f"{report.payments} payments",
        file=out,
    )
    money = report.money
    if report.accounts:
        print(file=out)
        print(
            render_table(
                ["account", "debits", "credits", "balance", "transactions"],
                [
                    [
                        a.account,
                        money(a.debits, a.currency),
                        money(a.credits, a.currency),
                        money(a.balance, a.currency),
                        a.transactions,
                    ]
                    for a in report.accounts
                ],
            ),
            file=out,
        )
    if report.totals:
        print(file=out)
        rows: list[list[object]] = [
            [
                provider,
                name,
                money(ours, currency),
                money(books, currency),
                "ok" if ours == books else "DIFFERS",
            ]
            for (provider, currency), figures in sorted(report.totals.items())
            for name, (ours, books) in figures.items()
        ]
        print(
            render_table(["provider", "figure", "payments", "ledger", "check"], rows),
            file=out,
        )
    print(file=out)
    if report.ok:
        print(
            "OK: every transaction balances per currency and the ledger equals the payments' amounts",
            file=out,
        )
        return
    print(f"PROBLEMS: {len(report.problems)}", file=out)
    for problem in report.problems[:_PROBLEMS_SHOWN]:
        print(f"  {problem.kind:<17} {problem.message}", file=out)
    if len(report.problems) > _PROBLEMS_SHOWN:
        print(
            f"  ... and {len(report.problems) - _PROBLEMS_SHOWN} more (use --json for all)",
            file=out,
        )


def print_audit_report(
    report: VerifyReport, *, as_json: bool = False, out: TextIO = sys.stdout
) -> None:
    if as_json:
        print(json.dumps(report.to_json(), indent=2), file=out)
        return
    print(
        f"audit trail: {report.rows} rows in {report.chains} chains; "
        f"{report.live_rows_checked} live rows compared with their chains' ends",
        file=out,
    )
    if report.awaiting_creation:
        print(
            f"{report.awaiting_creation} intent(s) and payment(s) inserted less than "
            f"{report.creation_grace_seconds:g} s ago await their creation rows (written by "
            "the relay's first transaction that touches each intent)",
            file=out,
        )
    first = report.first_break
    if first is None:
        print("intact: every link holds and every chain ends in its row's live state", file=out)
        return
    print(f"BROKEN: {len(report.breaks)} chain(s) broken", file=out)
    print(f"first broken link: {first.describe()}", file=out)
    print(file=out)
    shown = report.ordered_breaks()[:_BREAKS_SHOWN]
    print(
        render_table(
            ["audit row", "kind", "entity", "id", "detail"],
            [[b.row_id, b.kind, b.entity, b.entity_id, b.message] for b in shown],
        ),
        file=out,
    )
    if len(report.breaks) > len(shown):
        print(f"... and {len(report.breaks) - len(shown)} more (use --json for all)", file=out)


def print_run(report: RunReport, out: TextIO = sys.stdout) -> None:
    r = report.result
    print(
        f"reconciliation run {report.run_id}: {report.provider} "
        f"{report.window_start.isoformat()} .. {report.window_end.isoformat()}",
        file=out,
    )
    print(
        f"provider items {r.provider_items}, ledger items {r.internal_items}, matched "
        f"{r.matched}, ignored {r.ignored} (no payment's money); exceptions "
        f"{len(r.findings)} ({report.new} new), cleared {len(report.cleared)}",
        file=out,
    )
    if not r.findings:
        print("no exceptions: the provider and the ledger agree", file=out)
        return
    print(file=out)

    def money(row: dict[str, Any], column: str) -> str | None:
        if column == "provider_amount_minor" and row["kind"] == "currency_mismatch":
            # In the provider's currency, which the row does not record: the detail names it.
            amount = row[column]
            return None if amount is None else f"{amount} minor units of another currency"
        currency = row["currency"]
        return _amount(row[column], currency, report.exponents.get(currency or ""))

    print(
        render_table(
            ["id", "kind", "payment", "reference", "ledger", "provider", "delta", "seen"],
            [
                [
                    row["exception_id"],
                    row["kind"],
                    row["payment_id"],
                    row["match_key"],
                    money(row, "internal_amount_minor"),
                    money(row, "provider_amount_minor"),
                    money(row, "delta_minor"),
                    "new" if row["new"] else "again",
                ]
                for row in report.rows()
            ],
        ),
        file=out,
    )


def print_exceptions(rows: Sequence[dict[str, Any]], out: TextIO = sys.stdout) -> None:
    """Reconciliation exceptions as a table: the delta in currency units, the detail cut
    to 80 characters with an ellipsis where it was cut (--json has all of it)."""
    print(
        render_table(
            [
                "id",
                "provider",
                "kind",
                "status",
                "payment",
                "reference",
                "delta",
                "seen",
                "action",
                "detail",
            ],
            [
                [
                    r["id"],
                    r["provider"],
                    r["kind"],
                    r["status"],
                    r["payment_id"],
                    r["match_key"],
                    _amount(r["delta_minor"], r["currency"], r.get("exponent")),
                    r["times_seen"],
                    r["pending_action"],
                    clip(r["detail"] or "", _DETAIL_WIDTH),
                ]
                for r in rows
            ],
        ),
        file=out,
    )
