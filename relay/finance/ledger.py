"""`outbox-relay ledger check`: prove the ledger balances and agrees with the payments.

The ledger is written by a database trigger (sql/0005_pre_ledger_audit.sql) in the same
transaction as each succeeded intent. This module only reads it and checks, with every
amount an integer in minor units:

1. every ledger transaction balances: its entries sum to zero in its currency, it has
   entries, and none of them is in another currency;
2. every succeeded intent (hot or archived) has exactly one ledger transaction of its
   action, and no other intent has one;
3. every payment's amounts equal its ledger: authorised = the authorize/charge postings,
   the open hold = the ``holds`` balance, captured, refunded, disputed (withdrawn by a
   dispute and not returned, sql/0035) and the receivable (captured - refunded -
   disputed) = their account balances;
4. every posting of the FX difference journal (outbox.fx_postings, sql/0029) balances in
   its currency, and a refund's posting names a succeeded refund.

The report carries the totals per provider and currency beside the payments' sums;
relay/cli/finance_reports.py prints it.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

import psycopg
from psycopg.rows import dict_row

from relay.domain.money import format_minor
from relay.finance.reconcile import exponents_in
from relay.infra.queries import QUERIES

__all__ = ["AccountBalance", "LedgerReport", "Problem", "check_ledger"]

# The accounts each provider has in every currency, in the order a reader meets them.
ACCOUNTS = ("holds", "authorizations", "receivable", "captured", "refunded", "disputed")


@dataclass(frozen=True, slots=True)
class Problem:
    kind: str  # unbalanced | posting | payment_mismatch | fx_posting
    subject: str  # "ledger transaction 12", "intent 40", "payment p-1"
    message: str


@dataclass(frozen=True, slots=True)
class AccountBalance:
    account: str
    currency: str
    debits: int
    credits: int
    transactions: int

    @property
    def balance(self) -> int:
        return self.debits - self.credits


@dataclass
class LedgerReport:
    transactions: int = 0
    entries: int = 0
    payments: int = 0
    accounts: list[AccountBalance] = field(default_factory=list)
    # (provider, currency) -> figure -> (from payments, from the ledger)
    totals: dict[tuple[str, str], dict[str, tuple[int, int]]] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    # code -> ISO 4217 exponent (outbox.currencies), to print amounts in currency units
    exponents: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def money(self, amount_minor: int, currency: str) -> str:
        """``1999, 'EUR'`` -> ``'19.99 EUR'`` with the currency table's exponent."""
        return format_minor(amount_minor, currency, self.exponents.get(currency))

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "transactions": self.transactions,
            "entries": self.entries,
            "payments": self.payments,
            "accounts": [{**asdict(a), "balance": a.balance} for a in self.accounts],
            "totals": [
                {
                    "provider": provider,
                    "currency": currency,
                    **{
                        name: {"payments": pair[0], "ledger": pair[1]}
                        for name, pair in figures.items()
                    },
                }
                for (provider, currency), figures in sorted(self.totals.items())
            ],
            "problems": [asdict(p) for p in self.problems],
        }


def _totals(
    accounts: list[AccountBalance],
    payment_sums: list[dict[str, Any]],
    authorized_posted: dict[tuple[str, str], int],
) -> dict[tuple[str, str], dict[str, tuple[int, int]]]:
    """Pure: the payments' sums beside the ledger's balances, per provider and currency."""
    ledger: dict[tuple[str, str], dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for a in accounts:
        provider, _, name = a.account.rpartition(":")
        ledger[(provider, a.currency)][name] += a.balance
    totals: dict[tuple[str, str], dict[str, tuple[int, int]]] = {}
    by_key = {(str(r["provider"]), str(r["currency"])): r for r in payment_sums}
    for key in sorted(set(by_key) | set(ledger) | set(authorized_posted)):
        row = by_key.get(key)
        authorized, captured, refunded, disputed, open_holds = (
            (
                int(row["authorized"]),
                int(row["captured"]),
                int(row["refunded"]),
                int(row["disputed"]),
                int(row["open_holds"]),
            )
            if row
            else (0, 0, 0, 0, 0)
        )
        books = ledger.get(key, {})
        totals[key] = {
            "authorized": (authorized, authorized_posted.get(key, 0)),
            "open_holds": (open_holds, books.get("holds", 0)),
            "captured": (captured, -books.get("captured", 0)),
            "refunded": (refunded, books.get("refunded", 0)),
            "disputed": (disputed, books.get("disputed", 0)),
            "receivable": (captured - refunded - disputed, books.get("receivable", 0)),
        }
    return totals


def check_ledger(conninfo: str) -> LedgerReport:
    report = LedgerReport()
    with psycopg.connect(conninfo) as conn, conn.transaction():
        # One snapshot for every query: the checks see the same moment.
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        counts = conn.execute(QUERIES["ledger_counts"]).fetchone()
        assert counts is not None
        report.transactions, report.entries, report.payments = (int(c) for c in counts)
        report.exponents = exponents_in(conn)
        for txn_id, payment_id, kind, currency, txn_currency, imbalance, entries in conn.execute(
            QUERIES["ledger_unbalanced"]
        ):
            if entries == 0:
                message = (
                    f"ledger transaction {txn_id} ({kind} of payment {payment_id}) has no entries"
                )
            elif currency != txn_currency:
                message = (
                    f"ledger transaction {txn_id} ({kind} of payment {payment_id}) has entries in "
                    f"{currency}, but it is a {txn_currency} transaction"
                )
            else:
                message = (
                    f"ledger transaction {txn_id} ({kind} of payment {payment_id}) does not "
                    f"balance in {currency}: entries sum to "
                    f"{'+' if imbalance > 0 else ''}{report.money(int(imbalance), currency)}"
                )
            report.problems.append(Problem("unbalanced", f"ledger transaction {txn_id}", message))
        for txn_id, entries in conn.execute(QUERIES["ledger_orphan_entries"]):
            report.problems.append(
                Problem(
                    "unbalanced",
                    f"ledger transaction {txn_id}",
                    f"{entries} ledger entr{'y' if entries == 1 else 'ies'} belong to ledger "
                    f"transaction {txn_id}, which does not exist",
                )
            )
        for intent_id, payment_id, action, status, txn_id, txn_kind, postings in conn.execute(
            QUERIES["ledger_posting_mismatches"]
        ):
            if txn_id is None:
                message = f"intent {intent_id} ({action} of payment {payment_id}) succeeded but has no ledger transaction"
            elif intent_id is None:
                message = f"ledger transaction {txn_id} ({txn_kind} of payment {payment_id}) belongs to no known intent"
            elif status != "succeeded":
                message = f"intent {intent_id} is {status} but has ledger transaction {txn_id}"
            elif postings > 1:
                message = f"intent {intent_id} has {postings} ledger transactions"
            else:
                message = f"intent {intent_id} is a {action} but ledger transaction {txn_id} is a {txn_kind}"
            subject = (
                f"intent {intent_id}" if intent_id is not None else f"ledger transaction {txn_id}"
            )
            report.problems.append(Problem("posting", subject, message))
        mismatches = conn.cursor(row_factory=dict_row).execute(QUERIES["ledger_payment_mismatches"])
        for row in mismatches:
            payment_id, currency, state = row["payment_id"], row["currency"], row["state"]
            wrong_currency = row["wrong_currency"]
            pairs = {
                "authorized": (row["authorized_minor"], row["ledger_authorized"]),
                "open hold": (row["open_hold"], row["ledger_holds"]),
                "captured": (row["captured_minor"], row["ledger_captured"]),
                "refunded": (row["refunded_minor"], row["ledger_refunded"]),
                "disputed": (row["disputed_minor"], row["ledger_disputed"]),
                "receivable": (row["receivable"], row["ledger_receivable"]),
            }
            differences = [
                f"{name} {report.money(int(ours), currency)} in the payment vs "
                f"{report.money(int(books), currency)} in the ledger"
                for name, (ours, books) in pairs.items()
                if ours != books
            ]
            if wrong_currency:
                differences.append(f"{wrong_currency} ledger transaction(s) not in {currency}")
            report.problems.append(
                Problem(
                    "payment_mismatch",
                    f"payment {payment_id}",
                    f"payment {payment_id} ({state}, {currency}): " + "; ".join(differences),
                )
            )
        # sql/0029: the FX difference journal beside the ledger.
        for (
            posting_id,
            kind,
            payment_id,
            intent_id,
            currency,
            imbalance,
            action,
            status,
        ) in conn.execute(QUERIES["ledger_fx_problems"]):
            if imbalance:
                message = (
                    f"FX posting {posting_id} ({kind} of payment {payment_id}) does not balance "
                    f"in {currency}: entries sum to {report.money(int(imbalance), currency)}"
                )
            else:
                message = (
                    f"FX posting {posting_id} ({kind} of payment {payment_id}) names intent "
                    f"{intent_id}, which is "
                    + (
                        "missing"
                        if action is None
                        else f"a {status} {action}, not a succeeded refund"
                    )
                )
            report.problems.append(Problem("fx_posting", f"FX posting {posting_id}", message))
        report.accounts = [
            AccountBalance(account, currency, int(debits), int(credits), int(txns))
            for account, currency, debits, credits, txns in conn.execute(
                QUERIES["ledger_account_balances"]
            )
        ]
        by_name = conn.cursor(row_factory=dict_row)
        sums = by_name.execute(QUERIES["ledger_payment_totals"]).fetchall()
        authorized_posted = {
            (str(r["provider"]), str(r["currency"])): int(r["authorized"])
            for r in by_name.execute(QUERIES["ledger_authorized_totals"])
        }
    report.totals = _totals(report.accounts, sums, authorized_posted)
    return report
