"""Reconciliation: what the provider says happened to money, against the ledger.

:func:`match` is pure. It pairs the provider's balance transactions with the ledger's
money-moving postings by the object both know (the payment ``pi_...`` for a capture or a
charge, the refund ``re_...`` for a refund) and reports one :class:`Finding` per
discrepancy, of six classes:

==================== =====================================================================
missing_internal     the provider moved money the ledger does not know about
missing_at_provider  the ledger records money the provider does not show
amount_mismatch      both know it, the amounts differ (delta = provider - ledger)
currency_mismatch    both know it, the currencies differ
status_mismatch      the provider reports the source failed or cancelled, or the movement
                     is of another type than the ledger's (a charge for a refund...)
unexpected_fee       the fee differs from the schedule (a refund carries none)
fx_rate_drift        the provider settled a charge or refund in another currency (its
                     balance transaction carries an ``exchange_rate``) and the amount is
                     further from ours, at our rate (outbox.convert_v1 at the settlement's
                     time), than the tolerance in basis points allows
==================== =====================================================================

A settlement in another currency is not a currency_mismatch: it is compared in the
account's currency, and every settled charge's difference (within the tolerance or not)
is posted to the FX difference journal (outbox.fx_postings, sql/0029) by :func:`run`.

Only items dated inside the window are judged; both sides are read ``slack`` further on
either side so that an item booked just across the boundary is matched, not reported
missing. :func:`run` is the I/O around it: it reads both sides, records a run and its
exceptions (re-running a window finds the same exceptions again, never a second copy),
clears the open exceptions of the window that are no longer found, and reports.
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import psycopg

from provider_adapters.base import BalanceTransaction
from relay.domain.money import format_minor
from relay.infra.queries import QUERIES

__all__ = [
    "EXCEPTION_KINDS",
    "FeeSchedule",
    "Finding",
    "InternalItem",
    "MatchResult",
    "RunReport",
    "currency_exponents",
    "exponents_in",
    "match",
    "run",
    "write_reports",
]

ExceptionKind = Literal[
    "missing_internal",
    "missing_at_provider",
    "amount_mismatch",
    "currency_mismatch",
    "status_mismatch",
    "unexpected_fee",
    "fx_rate_drift",
]
EXCEPTION_KINDS: tuple[ExceptionKind, ...] = (
    "missing_internal",
    "missing_at_provider",
    "amount_mismatch",
    "currency_mismatch",
    "status_mismatch",
    "unexpected_fee",
    "fx_rate_drift",
)
# Stripe adds about 1-2 % to its conversions (its currency conversion fee): a drift within
# that is what the account agreed to, not an exception.
DEFAULT_FX_TOLERANCE_BPS = 200

# Provider transaction types that move a payment's money, by the ledger kind they match.
_CHARGE_TYPES = frozenset({"charge", "payment"})
_REFUND_TYPES = frozenset({"refund", "payment_refund"})
_FAILED_SOURCE = frozenset({"failed", "canceled", "cancelled"})


@dataclass(frozen=True, slots=True)
class InternalItem:
    """One money-moving ledger transaction: a capture, a charge or a refund."""

    ledger_transaction_id: int
    payment_id: str
    kind: str
    reference: str | None
    amount_minor: int
    currency: str
    at: datetime

    @property
    def is_refund(self) -> bool:
        return self.kind == "refund"

    @property
    def expected_provider_amount(self) -> int:
        """What the provider's transaction should say: a refund takes money back."""
        return -self.amount_minor if self.is_refund else self.amount_minor


@dataclass(frozen=True, slots=True)
class FeeSchedule:
    """The fee the provider should keep: ``bps`` of what it captured (half up) plus
    ``fixed_minor``; none on a refund. ``bps=None``: capture fees are not checked.

    The fee is judged on the provider's own amount, so an amount that differs is reported
    once, as an amount_mismatch, not a second time as a fee."""

    bps: int | None = None
    fixed_minor: int = 0
    tolerance_minor: int = 0
    # A settlement in another currency may differ from our conversion by this many basis
    # points of ours before it is an fx_rate_drift.
    fx_tolerance_bps: int = DEFAULT_FX_TOLERANCE_BPS

    def expected(self, *, refund: bool, amount_minor: int) -> int | None:
        if refund:
            return 0
        if self.bps is None:
            return None
        return (abs(amount_minor) * self.bps + 5_000) // 10_000 + self.fixed_minor


@dataclass(frozen=True, slots=True)
class Finding:
    kind: ExceptionKind
    match_key: str
    occurred_at: datetime
    detail: str
    payment_id: str | None = None
    ledger_transaction_id: int | None = None
    provider_transaction_id: str | None = None
    currency: str | None = None
    internal_amount_minor: int | None = None
    provider_amount_minor: int | None = None
    fee_minor: int | None = None
    expected_fee_minor: int | None = None
    delta_minor: int = 0


@dataclass(frozen=True, slots=True)
class Conversion:
    """What our rate makes of an amount in another currency (outbox.convert_v1)."""

    amount_minor: int
    currency: str
    rate: str  # informative, as the database renders it
    rate_id: int | None
    via_rate_id: int | None


@dataclass(frozen=True, slots=True)
class Settlement:
    """A charge the provider settled in another currency, paired with our conversion."""

    item: InternalItem
    transaction: BalanceTransaction
    ours: Conversion


@dataclass
class MatchResult:
    findings: list[Finding] = field(default_factory=list)
    provider_items: int = 0
    internal_items: int = 0
    matched: int = 0
    ignored: int = 0  # provider transactions that move no payment's money (payouts, fees...)
    settlements: list[Settlement] = field(default_factory=list)  # converted, judged charges


def _in(at: datetime, start: datetime, end: datetime) -> bool:
    return start <= at < end


def match(
    provider: Sequence[BalanceTransaction],
    internal: Sequence[InternalItem],
    *,
    window_start: datetime,
    window_end: datetime,
    fees: FeeSchedule = FeeSchedule(),
    exponents: Mapping[str, int] | None = None,
    conversions: Mapping[tuple[int, str], Conversion] | None = None,
) -> MatchResult:
    """Pair both sides and judge the pairs and leftovers dated inside the window.

    ``conversions`` holds our conversion of each ledger item (by ledger transaction id and
    provider transaction id) that the provider settled in another currency; without one,
    such an item is a currency_mismatch (we hold no rate to check the provider's).

    ``exponents`` (code -> ISO 4217 exponent, from outbox.currencies) writes the findings'
    details in currency units (``42.00 EUR``); a currency without one is shown in minor
    units, named as such."""
    known: Mapping[str, int] = exponents or {}

    def money(amount_minor: int, currency: str) -> str:
        return format_minor(amount_minor, currency, known.get(currency))

    result = MatchResult()
    relevant: list[BalanceTransaction] = []
    for txn in provider:
        if txn.type in _CHARGE_TYPES or txn.type in _REFUND_TYPES:
            relevant.append(txn)
        elif _in(txn.created, window_start, window_end):
            result.ignored += 1
    by_source: dict[str, list[BalanceTransaction]] = defaultdict(list)
    for txn in sorted(relevant, key=lambda t: (t.created, t.id)):
        if txn.source_id is not None:
            by_source[txn.source_id].append(txn)
    used: set[str] = set()
    for item in sorted(internal, key=lambda i: i.ledger_transaction_id):
        candidates = by_source.get(item.reference or "", [])
        paired = next((t for t in candidates if t.id not in used), None)
        in_window = _in(item.at, window_start, window_end)
        if paired is None:
            if in_window:
                result.internal_items += 1
                result.findings.append(
                    Finding(
                        kind="missing_at_provider",
                        match_key=item.reference or f"ledger:{item.ledger_transaction_id}",
                        occurred_at=item.at,
                        detail=f"the ledger records a {item.kind} of "
                        f"{money(item.amount_minor, item.currency)} ({item.reference}) "
                        "that the provider does not show",
                        payment_id=item.payment_id,
                        ledger_transaction_id=item.ledger_transaction_id,
                        currency=item.currency,
                        internal_amount_minor=item.expected_provider_amount,
                        delta_minor=-item.expected_provider_amount,
                    )
                )
            continue
        used.add(paired.id)
        if not (in_window or _in(paired.created, window_start, window_end)):
            continue
        result.internal_items += 1
        result.provider_items += 1
        ours = (conversions or {}).get((item.ledger_transaction_id, paired.id))
        findings = _judge(item, paired, fees, money, ours)
        if not findings:
            result.matched += 1
        if ours is not None and not item.is_refund and paired.currency != item.currency:
            result.settlements.append(Settlement(item, paired, ours))
        result.findings.extend(findings)
    for txn in relevant:
        if txn.id in used or not _in(txn.created, window_start, window_end):
            continue
        result.provider_items += 1
        result.findings.append(
            Finding(
                kind="missing_internal",
                match_key=txn.id,
                occurred_at=txn.created,
                detail=f"the provider shows a {txn.type} of "
                f"{money(txn.amount_minor, txn.currency)} "
                f"({txn.source_id or 'no source'}) that the ledger does not know",
                provider_transaction_id=txn.id,
                currency=txn.currency,
                provider_amount_minor=txn.amount_minor,
                fee_minor=txn.fee_minor,
                delta_minor=txn.amount_minor,
            )
        )
    result.findings.sort(key=lambda f: (f.occurred_at, f.kind, f.match_key))
    return result


def _judge(
    item: InternalItem,
    txn: BalanceTransaction,
    fees: FeeSchedule,
    money: Callable[[int, str], str],
    ours: Conversion | None = None,
) -> list[Finding]:
    key = item.reference or f"ledger:{item.ledger_transaction_id}"
    common: dict[str, Any] = {
        "match_key": key,
        "occurred_at": item.at,
        "payment_id": item.payment_id,
        "ledger_transaction_id": item.ledger_transaction_id,
        "provider_transaction_id": txn.id,
        "internal_amount_minor": item.expected_provider_amount,
        "provider_amount_minor": txn.amount_minor,
        "fee_minor": txn.fee_minor,
    }
    findings: list[Finding] = []
    expected_types = _REFUND_TYPES if item.is_refund else _CHARGE_TYPES
    if txn.type not in expected_types or (txn.source_status or "") in _FAILED_SOURCE:
        why = (
            f"the provider reports it as {txn.type}"
            if txn.type not in expected_types
            else f"the provider reports its {item.kind} as {txn.source_status}"
        )
        findings.append(
            Finding(
                kind="status_mismatch",
                detail=f"the ledger records a succeeded {item.kind} ({key}); {why}",
                currency=item.currency,
                delta_minor=-item.expected_provider_amount,
                **common,
            )
        )
    if txn.currency != item.currency and txn.exchange_rate is not None and ours is not None:
        findings.extend(_judge_settlement(item, txn, fees, money, ours, common, key))
    elif txn.currency != item.currency:
        findings.append(
            Finding(
                kind="currency_mismatch",
                detail=f"the ledger records {item.kind} {key} in {item.currency}, "
                f"the provider in {txn.currency}"
                + (
                    f" at its rate {txn.exchange_rate}; we hold no {item.currency}/"
                    f"{txn.currency} rate to check it"
                    if txn.exchange_rate is not None
                    else ""
                ),
                currency=item.currency,
                delta_minor=0,
                **common,
            )
        )
        return findings  # amounts in different currencies cannot be compared
    elif txn.amount_minor != item.expected_provider_amount:
        findings.append(
            Finding(
                kind="amount_mismatch",
                detail=f"{item.kind} {key}: the ledger says "
                f"{money(item.expected_provider_amount, item.currency)}, "
                f"the provider {money(txn.amount_minor, txn.currency)}",
                currency=item.currency,
                delta_minor=txn.amount_minor - item.expected_provider_amount,
                **common,
            )
        )
    expected_fee = fees.expected(refund=item.is_refund, amount_minor=txn.amount_minor)
    if expected_fee is not None and abs(txn.fee_minor - expected_fee) > fees.tolerance_minor:
        findings.append(
            Finding(
                kind="unexpected_fee",
                detail=f"{item.kind} {key}: fee {money(txn.fee_minor, txn.currency)}, "
                f"expected {money(expected_fee, txn.currency)}",
                currency=txn.currency,
                expected_fee_minor=expected_fee,
                delta_minor=txn.fee_minor - expected_fee,
                **common,
            )
        )
    return findings


def _judge_settlement(
    item: InternalItem,
    txn: BalanceTransaction,
    fees: FeeSchedule,
    money: Callable[[int, str], str],
    ours: Conversion,
    common: dict[str, Any],
    key: str,
) -> list[Finding]:
    """A movement settled in another currency: its amount against ours at our rate."""
    expected = -ours.amount_minor if item.is_refund else ours.amount_minor
    gap = txn.amount_minor - expected
    # |gap| / |expected| > bps / 10 000, in integers.
    if abs(gap) * 10_000 <= fees.fx_tolerance_bps * abs(expected):
        return []
    bps = abs(gap) * 10_000 // max(abs(expected), 1)
    legs = f"rate {ours.rate_id}" + (f" via {ours.via_rate_id}" if ours.via_rate_id else "")
    return [
        Finding(
            kind="fx_rate_drift",
            detail=f"{item.kind} {key} of {money(item.expected_provider_amount, item.currency)} "
            f"settled as {money(txn.amount_minor, txn.currency)} at the provider's rate "
            f"{txn.exchange_rate}; our rate {ours.rate} ({legs}) gives "
            f"{money(expected, txn.currency)}: {money(gap, txn.currency)} apart "
            f"({bps} bps), over the tolerance of {fees.fx_tolerance_bps} bps",
            currency=txn.currency,
            delta_minor=gap,
            **{**common, "internal_amount_minor": expected},
        )
    ]


# -- I/O ---------------------------------------------------------------------------------


def currency_exponents(conninfo: str) -> dict[str, int]:
    """Code -> ISO 4217 exponent from outbox.currencies, for the adapter to convert the
    provider's settlement amounts into minor units (``balance_transactions(exponents=)``)."""
    with psycopg.connect(conninfo) as conn:
        return exponents_in(conn)


def exponents_in(conn: psycopg.Connection) -> dict[str, int]:
    return {
        str(code): int(exponent) for code, exponent in conn.execute(QUERIES["currency_exponents"])
    }


@dataclass
class RunReport:
    run_id: int
    provider: str
    window_start: datetime
    window_end: datetime
    result: MatchResult
    # code -> ISO 4217 exponent (outbox.currencies), to print the amounts in currency units
    exponents: dict[str, int] = field(default_factory=dict)
    # (exception id, new?, status) per finding, in the findings' order
    recorded: list[tuple[int, bool, str]] = field(default_factory=list)
    cleared: list[int] = field(default_factory=list)
    fx_postings: list[int] = field(default_factory=list)  # outbox.fx_postings ids, new ones

    @property
    def new(self) -> int:
        return sum(1 for _, is_new, _ in self.recorded if is_new)

    def rows(self) -> list[dict[str, Any]]:
        out = []
        for finding, (exception_id, is_new, status) in zip(
            self.result.findings, self.recorded, strict=True
        ):
            row = asdict(finding)
            row["occurred_at"] = finding.occurred_at.isoformat()
            out.append({"exception_id": exception_id, "new": is_new, "status": status, **row})
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "provider": self.provider,
            "window_start": self.window_start.isoformat(),
            "window_end": self.window_end.isoformat(),
            "provider_items": self.result.provider_items,
            "internal_items": self.result.internal_items,
            "matched": self.result.matched,
            "ignored": self.result.ignored,
            "exceptions_found": len(self.result.findings),
            "exceptions_new": self.new,
            "exceptions_cleared": self.cleared,
            "fx_postings": self.fx_postings,
            "exceptions": self.rows(),
        }


def _our_conversions(
    conn: psycopg.Connection,
    provider: Sequence[BalanceTransaction],
    internal: Sequence[InternalItem],
) -> dict[tuple[int, str], Conversion]:
    """Our conversion of each ledger item the provider settled in another currency, at the
    rate in force when it settled; an item we hold no rate for is left out."""
    by_reference: dict[str, list[BalanceTransaction]] = defaultdict(list)
    for txn in provider:
        if txn.exchange_rate is not None and txn.source_id is not None:
            by_reference[txn.source_id].append(txn)
    found: dict[tuple[int, str], Conversion] = {}
    for item in internal:
        for txn in by_reference.get(item.reference or "", []):
            if txn.currency == item.currency:
                continue
            try:
                with conn.transaction():  # a savepoint: a missing rate spoils nothing
                    row = conn.execute(
                        QUERIES["reconcile_convert"],
                        {
                            "amount_minor": item.amount_minor,
                            "from_ccy": item.currency,
                            "to_ccy": txn.currency,
                            "at": txn.created,
                        },
                    ).fetchone()
            except (psycopg.errors.NoDataFound, psycopg.errors.ForeignKeyViolation):
                continue
            if row is not None:
                found[(item.ledger_transaction_id, txn.id)] = Conversion(
                    int(row[0]), str(row[1]), str(row[2]), row[3], row[4]
                )
    return found


async def run(
    conninfo: str,
    provider: str,
    transactions: Callable[[datetime, datetime], AsyncIterator[BalanceTransaction]],
    *,
    since: datetime,
    until: datetime,
    fees: FeeSchedule,
    slack: timedelta,
    actor: str,
    exponents: Mapping[str, int] | None = None,
    progress: Callable[[str], None] = lambda _line: None,
) -> RunReport:
    """Read both sides, match, record the run and its exceptions; one transaction records.
    ``exponents`` is the currency table when the caller has already read it."""
    with psycopg.connect(conninfo) as conn:
        with conn.transaction():
            conn.execute(QUERIES["set_actor"], {"actor": actor, "reason": None})
            row = conn.execute(
                QUERIES["reconcile_start_run"],
                {"provider": provider, "since": since, "until": until},
            ).fetchone()
        assert row is not None
        run_id = int(row[0])
        try:
            fetched: list[BalanceTransaction] = []
            async for txn in transactions(since - slack, until + slack):
                fetched.append(txn)
                if len(fetched) % 500 == 0:
                    progress(f"fetched {len(fetched)} balance transactions from {provider}")
            progress(f"fetched {len(fetched)} balance transactions from {provider}")
            internal = [
                InternalItem(*r)
                for r in conn.execute(
                    QUERIES["reconcile_internal_items"],
                    {"provider": provider, "since": since - slack, "until": until + slack},
                )
            ]
            progress(f"read {len(internal)} ledger postings that move money")
            if exponents is None:
                exponents = exponents_in(conn)
            conversions = _our_conversions(conn, fetched, internal)
            result = match(
                fetched,
                internal,
                window_start=since,
                window_end=until,
                fees=fees,
                exponents=exponents,
                conversions=conversions,
            )
            report = RunReport(run_id, provider, since, until, result, dict(exponents))
            with conn.transaction():
                conn.execute(QUERIES["set_actor"], {"actor": actor, "reason": None})
                for finding in result.findings:
                    exception_id, is_new, status = conn.execute(  # type: ignore[misc]
                        QUERIES["reconcile_record_exception"],
                        {"provider": provider, "run_id": run_id, **asdict(finding)},
                    ).fetchone()
                    report.recorded.append((int(exception_id), bool(is_new), str(status)))
                for settled in result.settlements:
                    posted = conn.execute(
                        QUERIES["reconcile_post_settlement"],
                        {
                            "payment_id": settled.item.payment_id,
                            "provider": provider,
                            "provider_reference": settled.transaction.id,
                            "source_currency": settled.item.currency,
                            "source_amount_minor": settled.item.amount_minor,
                            "currency": settled.transaction.currency,
                            "expected_minor": settled.ours.amount_minor,
                            "actual_minor": settled.transaction.amount_minor,
                            "rate_id": settled.ours.rate_id,
                            "via_rate_id": settled.ours.via_rate_id,
                            "provider_rate": str(settled.transaction.exchange_rate),
                        },
                    ).fetchone()
                    if posted is not None:
                        report.fx_postings.append(int(posted[0]))
                report.cleared = [
                    int(r[0])
                    for r in conn.execute(
                        QUERIES["reconcile_clear_exceptions"],
                        {
                            "provider": provider,
                            "run_id": run_id,
                            "since": since,
                            "until": until,
                            "seen": [e for e, _, _ in report.recorded],
                        },
                    )
                ]
                conn.execute(
                    QUERIES["reconcile_finish_run"],
                    {
                        "run_id": run_id,
                        "status": "finished",
                        "provider_items": result.provider_items,
                        "internal_items": result.internal_items,
                        "matched": result.matched,
                        "found": len(result.findings),
                        "new": report.new,
                        "cleared": len(report.cleared),
                    },
                )
        except BaseException:
            with conn.transaction():
                conn.execute(QUERIES["set_actor"], {"actor": actor, "reason": None})
                conn.execute(
                    QUERIES["reconcile_finish_run"],
                    {
                        "run_id": run_id,
                        "status": "failed",
                        "provider_items": None,
                        "internal_items": None,
                        "matched": None,
                        "found": None,
                        "new": None,
                        "cleared": None,
                    },
                )
            raise
    return report


_CSV_FIELDS = (
    "exception_id",
    "new",
    "status",
    "kind",
    "match_key",
    "payment_id",
    "ledger_transaction_id",
    "provider_transaction_id",
    "currency",
    "internal_amount_minor",
    "provider_amount_minor",
    "fee_minor",
    "expected_fee_minor",
    "delta_minor",
    "occurred_at",
    "detail",
)


def write_reports(report: RunReport, directory: Path) -> tuple[Path, Path]:
    """``reconciliation-<provider>-run<id>.csv`` and ``.json`` in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    stem = directory / f"reconciliation-{report.provider}-run{report.run_id}"
    csv_path, json_path = stem.with_suffix(".csv"), stem.with_suffix(".json")
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=_CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(report.rows())
    json_path.write_text(json.dumps(report.to_json(), indent=2) + "\n")
    return csv_path, json_path
