"""`outbox-relay fx ...`: exchange rates, where each came from, and what they convert to.

Rates live in ``outbox.fx_rates`` (sql/0027): 1 BASE = RATE QUOTE, an exact decimal, with
its source (ecb, csv, provider, manual), the source's publication time, when it was
fetched, the SHA-256 of the source document and who recorded it. Rates are never changed
or deleted; a newer one supersedes. Applications convert in their own transaction with
``SELECT * FROM outbox.convert_v1(amount_minor, 'EUR', 'USD')`` (docs/fx.md).

  fx import ecb --url URL | --file PATH   the ECB's daily reference rates (eurofxref-daily.xml)
  fx import csv --file PATH               base,quote,rate,published_at[,valid_until] lines
  fx record BASE QUOTE RATE --operator N  one rate entered by hand, by a named operator
  fx show [--at TIME]                     every pair's rate in force, its source and its age
  fx convert AMOUNT FROM TO [--at TIME]   what outbox.convert_v1 answers, with the rate used
  fx history BASE QUOTE                   every rate recorded for a pair, newest first
  fx differences [--payment ID]           the FX difference journal: refunds at the charge's
                                          rate, settlements in another currency

Amounts are given and printed in major units with the currency's ISO 4217 exponent
(``100.00 EUR``: exponent 2, 10000 minor units; ``150 JPY``: exponent 0; ``1.500 KWD``:
exponent 3). Conversions round half to even. A rate older than
``outbox.fx_policy.max_rate_age`` (default 5 days) is refused for new conversions
(fx_rate_stale); ``fx show`` marks it STALE.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg

from relay.cli.operator_args import add_operator_argument, operator_of
from relay.cli.tables import format_when, plain_help, render_table
from relay.domain.fx import (
    FxDocumentError,
    RateDocument,
    manual_rate,
    parse_ecb_xml,
    parse_rates_csv,
)
from relay.domain.money import format_minor, parse_major

if TYPE_CHECKING:
    from relay.finance.fx import ImportReport

__all__ = ["add_commands"]

ECB_DAILY_URL = "https://www.ecb.europa.eu/stats/eurofxref/eurofxref-daily.xml"


def _age(value: object) -> str:
    if not isinstance(value, timedelta):
        return "-"
    seconds = int(value.total_seconds())
    days, rest = divmod(seconds, 86_400)
    hours, rest = divmod(rest, 3_600)
    return f"{days}d {hours}h {rest // 60}m" if days else f"{hours}h {rest // 60}m"


def _timestamp(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an ISO 8601 time such as 2026-12-04T15:00:00Z"
        ) from None
    if value.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r} has no time zone; add Z or +01:00")
    return value


def _with_exponent(amount_minor: int, currency: str, exponent: int | None) -> str:
    return f"{format_minor(amount_minor, currency, exponent)} ({amount_minor} minor units, exponent {exponent})"


def _document(args: argparse.Namespace) -> tuple[bytes, str | None]:
    from relay.finance import fx  # httpx and the database only when a command runs

    if args.file is not None:
        return Path(args.file).read_bytes(), None
    url = args.url or ECB_DAILY_URL
    return fx.fetch_document(url), url


def _print_import(report: ImportReport, document: RateDocument) -> None:
    days = sorted({r.published_at for r in document.rates})
    print(
        f"{report.source_kind} {report.source_name}: {report.rates_in_document} rate(s) "
        f"published {format_when(days[0])}"
        + (f" to {format_when(days[-1])}" if len(days) > 1 else "")
        + f"; {report.inserted} recorded, {report.already_recorded} already recorded"
    )
    print(f"  document sha256 {document.sha256.hex()}")


def _cmd_import(args: argparse.Namespace, conninfo: str) -> int:
    from relay.finance import fx  # httpx and the database only when a command runs

    try:
        if args.kind == "ecb":
            data, url = _document(args)
            document = parse_ecb_xml(data)
            name = args.source_name or "ECB euro foreign exchange reference rates"
        else:
            data, url = Path(args.file).read_bytes(), None
            document = parse_rates_csv(data)
            name = args.source_name or Path(args.file).name
    except (FxDocumentError, fx.FetchError, OSError) as exc:
        print(f"error: {exc}; nothing imported", file=sys.stderr)
        return 1
    try:
        with psycopg.connect(conninfo, autocommit=True) as conn:
            report = fx.import_document(
                conn,
                document,
                source_kind=args.kind,
                source_name=name,
                operator=operator_of(args),
                source_url=url,
            )
    except psycopg.errors.ForeignKeyViolation as exc:
        detail = exc.diag.message_detail or str(exc)
        print(
            f"error: a currency of the document is not in outbox.currencies ({detail}); "
            "nothing imported",
            file=sys.stderr,
        )
        return 1
    except psycopg.errors.CheckViolation as exc:
        print(
            f"error: a rate breaks {exc.diag.constraint_name}: {exc.diag.message_primary}; "
            "nothing imported",
            file=sys.stderr,
        )
        return 1
    _print_import(report, document)
    return 0


def _cmd_record(args: argparse.Namespace, conninfo: str) -> int:
    from datetime import UTC

    from relay.finance import fx  # httpx and the database only when a command runs

    operator = operator_of(args)
    try:
        document = manual_rate(
            args.base,
            args.quote,
            args.rate,
            operator,
            args.valid_from or datetime.now(UTC),
            args.valid_until,
        )
    except FxDocumentError as exc:
        print(f"error: {exc}; nothing recorded", file=sys.stderr)
        return 1
    with psycopg.connect(conninfo, autocommit=True) as conn:
        try:
            report = fx.import_document(
                conn,
                document,
                source_kind="manual",
                source_name=args.source_name,
                operator=operator,
            )
        except psycopg.errors.ForeignKeyViolation:
            print(
                f"error: {args.base.upper()} or {args.quote.upper()} is not in "
                "outbox.currencies; nothing recorded",
                file=sys.stderr,
            )
            return 1
    rate = document.rates[0]
    if report.inserted:
        print(
            f"recorded rate {report.rate_ids[0]}: 1 {rate.base} = {rate.rate} {rate.quote}, "
            f"valid from {format_when(rate.valid_from)}"
            + (f" until {format_when(rate.valid_until)}" if rate.valid_until else "")
            + f", by operator {operator} (audited)"
        )
    else:
        print("this rate was already recorded with the same validity; nothing new")
    return 0


def _cmd_show(args: argparse.Namespace, conninfo: str) -> int:
    from relay.finance import fx  # httpx and the database only when a command runs

    with psycopg.connect(conninfo, autocommit=True) as conn:
        rows = fx.current_rates(conn, args.at)
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    if not rows:
        print("no rates recorded; import some: outbox-relay fx import ecb --url URL")
        return 0
    print(f"rates in force at {format_when(args.at) if args.at else 'now'} (1 BASE = RATE QUOTE):")
    print(
        render_table(
            ["pair", "rate", "id", "source", "published", "age", ""],
            [
                (
                    f"{r['base']}/{r['quote']}",
                    r["rate"],
                    r["id"],
                    f"{r['source_kind']} {r['source_name']}",
                    format_when(r["published_at"]),
                    _age(r["age"]),
                    f"STALE (> {_age(r['max_rate_age'])})" if r["stale"] else "",
                )
                for r in rows
            ],
        )
    )
    return 0


def _cmd_convert(args: argparse.Namespace, conninfo: str) -> int:
    from relay.finance import fx  # httpx and the database only when a command runs

    with psycopg.connect(conninfo, autocommit=True) as conn:
        exponent = fx.currency_exponent(conn, args.from_ccy)
        if exponent is None:
            print(f"error: {args.from_ccy!r} is not in outbox.currencies", file=sys.stderr)
            return 1
        try:
            amount_minor = parse_major(args.amount, exponent)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        try:
            result = fx.convert(conn, amount_minor, args.from_ccy, args.to_ccy, args.at)
        except psycopg.Error as exc:
            if exc.diag.constraint_name in (
                "fx_rate_stale",
                "fx_rate_missing",
                "fx_currency_known",
            ):
                print(f"error: {exc.diag.message_primary}", file=sys.stderr)
                if exc.diag.message_hint:
                    print(f"hint: {exc.diag.message_hint}", file=sys.stderr)
                return 1
            raise
    if args.json:
        print(json.dumps({"amount_minor": amount_minor, **result}, indent=2, default=str))
        return 0
    source = _with_exponent(amount_minor, args.from_ccy.upper(), result["from_exponent"])
    target = _with_exponent(result["converted_minor"], result["currency"], result["to_exponent"])
    print(f"{source}\n  = {target}")
    if result["rate_id"] is None:
        print("  same currency: no rate applied")
        return 0
    legs = f"rate {result['rate_id']}" + (
        f" via rate {result['via_rate_id']} (cross rate)" if result["via_rate_id"] else ""
    )
    print(
        f"  at {result['rate']} ({legs}), published {format_when(result['rate_published_at'])}, "
        f"{_age(result['rate_age'])} old; rounded half to even"
    )
    return 0


def _cmd_history(args: argparse.Namespace, conninfo: str) -> int:
    from relay.finance import fx  # httpx and the database only when a command runs

    with psycopg.connect(conninfo, autocommit=True) as conn:
        rows = fx.rate_history(conn, args.base, args.quote, args.limit)
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    if not rows:
        print(f"no rates recorded for {args.base.upper()}/{args.quote.upper()} or its inverse")
        return 0
    print(
        render_table(
            [
                "id",
                "pair",
                "rate",
                "source",
                "operator",
                "published",
                "valid from",
                "valid until",
                "fetched",
                "recorded by",
                "sha256",
            ],
            [
                (
                    r["id"],
                    f"{r['base']}/{r['quote']}",
                    r["rate"],
                    f"{r['source_kind']} {r['source_name']}",
                    r["operator"],
                    format_when(r["published_at"]),
                    format_when(r["valid_from"]),
                    format_when(r["valid_until"]) if r["valid_until"] else None,
                    format_when(r["fetched_at"]),
                    r["recorded_by"],
                    (r["source_sha256"] or "")[:16] or None,
                )
                for r in rows
            ],
        )
    )
    return 0


def _cmd_differences(args: argparse.Namespace, conninfo: str) -> int:
    from relay.finance import fx  # httpx and the database only when a command runs

    with psycopg.connect(conninfo, autocommit=True) as conn:
        rows = fx.differences(conn, args.payment, args.limit)
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    if not rows:
        print("no FX differences posted")
        return 0
    print(
        render_table(
            [
                "id",
                "kind",
                "payment",
                "moved",
                "expected (ours)",
                "actual",
                "difference",
                "rates",
                "posted",
            ],
            [
                (
                    r["id"],
                    r["kind"],
                    r["payment_id"],
                    format_minor(
                        r["source_amount_minor"], r["source_currency"], r["source_exponent"]
                    ),
                    format_minor(r["expected_minor"], r["currency"], r["exponent"]),
                    format_minor(r["actual_minor"], r["currency"], r["exponent"]),
                    format_minor(r["difference_minor"], r["currency"], r["exponent"]),
                    f"ours {r['our_rate_id']}"
                    + (f"+{r['our_via_rate_id']}" if r["our_via_rate_id"] else "")
                    + (
                        f", provider {r['provider_rate']}"
                        if r["provider_rate"]
                        else f", now {r['compared_rate_id']}"
                    ),
                    format_when(r["posted_at"]),
                )
                for r in rows
            ],
        )
    )
    print(
        "difference = actual - expected; for a refund, a negative one is what the refund "
        "costs less today than at the charge's rate"
    )
    return 0


def add_commands(commands: Any, database_url: Callable[[], str]) -> None:
    """Register ``fx import|show|convert|history`` on the CLI's subparsers."""
    group = commands.add_parser(
        "fx",
        help="exchange rates: import, show, convert, history",
        description=plain_help(__doc__ or ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = group.add_subparsers(dest="fx_command", metavar="ACTION", required=True)

    imports = actions.add_parser(
        "import",
        help="record rates from the ECB's XML or a CSV file",
        description="Record a document's rates in outbox.fx_rates, all or none, with the "
        "document's SHA-256 and your operator name. Importing the same document again "
        "records nothing new.",
    )
    kinds = imports.add_subparsers(dest="kind", metavar="SOURCE", required=True)
    ecb = kinds.add_parser(
        "ecb",
        help="the ECB's euro reference rates (eurofxref-daily.xml format)",
        description="The ECB's euro foreign exchange reference rates: 1 EUR = rate units "
        "of each currency, published about 16:00 CET on TARGET business days (the file "
        "holds the date; 16:00 Frankfurt time is recorded as published_at). Also reads "
        "the 90-day and historic files (eurofxref-hist-90d.xml, eurofxref-hist.xml).",
    )
    where = ecb.add_mutually_exclusive_group()
    where.add_argument("--url", help=f"fetch the document from URL (default {ECB_DAILY_URL})")
    where.add_argument("--file", help="read the document from a file")
    ecb.add_argument("--source-name", help="source name to record (default: the ECB's)")
    add_operator_argument(ecb)
    csv_parser = kinds.add_parser(
        "csv",
        help="rates from a CSV file: base,quote,rate,published_at[,valid_until]",
        description="A header line base,quote,rate,published_at[,valid_until], then one "
        "rate a line: 1 BASE = RATE QUOTE, the rate as a decimal (at most 12 decimals), "
        "times in ISO 8601 with a zone (2026-12-04T15:00:00Z). Lines starting with # are "
        "comments. A rate is valid from published_at until the next one of its pair (or "
        "its valid_until).",
    )
    csv_parser.add_argument("--file", required=True, help="the CSV file")
    csv_parser.add_argument(
        "--source-name", help="source name to record (default: the file's name)"
    )
    add_operator_argument(csv_parser)
    for parser in (ecb, csv_parser):
        parser.set_defaults(handler=lambda args: _cmd_import(args, database_url()))

    record = actions.add_parser(
        "record",
        help="record one rate by hand (source manual, your operator name)",
        description="Record 1 BASE = RATE QUOTE as a manual rate: the operator is named "
        "(--operator, else RELAY_OPERATOR, else your user name) and the entry is in the "
        "audit trail. It is in force from --valid-from (default now) until the next rate "
        "of the pair (or --valid-until), and supersedes older ones for new conversions.",
    )
    record.add_argument("base", metavar="BASE", help="ISO 4217 code, e.g. EUR")
    record.add_argument("quote", metavar="QUOTE", help="ISO 4217 code, e.g. USD")
    record.add_argument("rate", metavar="RATE", help="units of QUOTE per BASE, e.g. 1.0876")
    record.add_argument("--valid-from", type=_timestamp, help="ISO 8601 time (default now)")
    record.add_argument("--valid-until", type=_timestamp, help="ISO 8601 time (default open)")
    record.add_argument(
        "--source-name", default="manual entry", help="source name (default %(default)s)"
    )
    add_operator_argument(record)
    record.set_defaults(handler=lambda args: _cmd_record(args, database_url()))

    show = actions.add_parser(
        "show",
        help="every pair's rate in force, its source and its age",
        description="The rate of every pair in force now (or --at TIME), its source, "
        "publication time and age; STALE marks a rate older than "
        "outbox.fx_policy.max_rate_age, which new conversions refuse.",
    )
    show.add_argument("--at", type=_timestamp, help="an ISO 8601 time (default now)")
    show.add_argument("--json", action="store_true", help="print JSON")
    show.set_defaults(handler=lambda args: _cmd_show(args, database_url()))

    conv = actions.add_parser(
        "convert",
        help="convert an amount as outbox.convert_v1 does, and show the rate used",
        description="Convert AMOUNT (major units, e.g. 100.00) of FROM into TO with "
        "outbox.convert_v1: the rate in force (direct, inverse, or a cross rate through "
        "EUR), exact decimal arithmetic over both ISO 4217 exponents, rounded half to "
        "even. A stale or missing rate is refused by name.",
    )
    conv.add_argument("amount", metavar="AMOUNT", help="in major units, e.g. 100.00")
    conv.add_argument("from_ccy", metavar="FROM", help="ISO 4217 code, e.g. EUR")
    conv.add_argument("to_ccy", metavar="TO", help="ISO 4217 code, e.g. USD")
    conv.add_argument("--at", type=_timestamp, help="an ISO 8601 time (default now)")
    conv.add_argument("--json", action="store_true", help="print JSON")
    conv.set_defaults(handler=lambda args: _cmd_convert(args, database_url()))

    history = actions.add_parser(
        "history",
        help="every rate recorded for a pair, newest first",
        description="Every rate recorded for BASE/QUOTE and QUOTE/BASE, newest first: "
        "source, operator, publication and validity, fetch time, who recorded it and "
        "the source document's SHA-256.",
    )
    history.add_argument("base", metavar="BASE")
    history.add_argument("quote", metavar="QUOTE")
    history.add_argument("--limit", type=int, default=50, help="rows (default %(default)s)")
    history.add_argument("--json", action="store_true", help="print JSON")
    history.set_defaults(handler=lambda args: _cmd_history(args, database_url()))

    diffs = actions.add_parser(
        "differences",
        help="the FX difference journal (refunds at the charge's rate, settlements)",
        description="outbox.fx_postings: for each refund of a converted charge, its worth at "
        "the charge's rate (expected) against the rate in force when it succeeded (actual), "
        "in the charge's original currency; for each charge the provider settled in another "
        "currency, our conversion (expected) against the provider's settled amount (actual), "
        "in the account's currency. Each is a balanced double entry "
        "(outbox.fx_ledger_entries).",
    )
    diffs.add_argument("--payment", metavar="ID", help="one payment's postings")
    diffs.add_argument("--limit", type=int, default=50, help="rows (default %(default)s)")
    diffs.add_argument("--json", action="store_true", help="print JSON")
    diffs.set_defaults(handler=lambda args: _cmd_differences(args, database_url()))
