"""Exchange rates as the sources publish them, and the conversion rule, exactly.

Pure logic, no I/O: the documents are bytes or text handed in. Rates are
:class:`decimal.Decimal` parsed from the source's own digits and conversions are done on
:class:`fractions.Fraction`, so no float ever touches a rate or an amount (a test scans
this module and its neighbours for one).

* :func:`parse_ecb_xml`: the ECB's euro foreign exchange reference rates
  (``eurofxref-daily.xml``, also the 90-day and historic files): a ``gesmes:Envelope``
  whose ``Cube`` holds one ``Cube time="YYYY-MM-DD"`` per day and in it one
  ``Cube currency="USD" rate="1.0876"`` per currency, each meaning 1 EUR = rate units.
  The ECB publishes at about 16:00 CET on TARGET business days; the document carries
  only the date, so that time (in Frankfurt) is the rates' publication time.
* :func:`parse_rates_csv`: the documented CSV (``base,quote,rate,published_at`` and an
  optional ``valid_until``), one rate a line.
* :func:`convert_minor`: the rule outbox.convert_v1 (sql/0027) applies, for tests and
  for explaining a figure: minor units times 10^(e_to - e_from) times the rate, rounded
  half to even.
"""

from __future__ import annotations

import csv
import hashlib
import io
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal, InvalidOperation
from fractions import Fraction

__all__ = [
    "ECB_NAMESPACE",
    "MAX_DOCUMENT_BYTES",
    "FxDocumentError",
    "Rate",
    "RateDocument",
    "convert_minor",
    "ecb_publication_time",
    "half_even",
    "manual_rate",
    "parse_ecb_xml",
    "parse_rate",
    "parse_rates_csv",
]

ECB_NAMESPACE = "http://www.ecb.int/vocabulary/2002-08-01/eurofxref"
GESMES_NAMESPACE = "http://www.gesmes.org/xml/2002-08-01"
# The historic file (every day since 1999) is about 6 MB; nothing larger is a rate file.
MAX_DOCUMENT_BYTES = 16 * 1024 * 1024
MAX_RATE_DECIMALS = 12  # outbox.fx_rates's fx_rates_rate_precision
_CODE = re.compile(r"^[A-Z]{3}$")
_RATE = re.compile(r"^\d{1,12}(?:\.\d{1,12})?$")


class FxDocumentError(ValueError):
    """A rate document that is not what it claims to be; the message names where and why."""


@dataclass(frozen=True, slots=True)
class Rate:
    """1 ``base`` = ``rate`` ``quote``, published at ``published_at``."""

    base: str
    quote: str
    rate: Decimal
    published_at: datetime
    valid_from: datetime
    valid_until: datetime | None = None


@dataclass(frozen=True, slots=True)
class RateDocument:
    rates: tuple[Rate, ...]
    sha256: bytes  # of the document's bytes as received


def parse_rate(text: str, where: str) -> Decimal:
    """A rate as written by the source, exactly: digits, an optional point, positive."""
    cleaned = text.strip()
    if not _RATE.match(cleaned):
        raise FxDocumentError(
            f"{where}: rate {cleaned[:40]!r} is not a positive decimal such as 1.0876 "
            f"(at most 12 digits before and {MAX_RATE_DECIMALS} after the point)"
        )
    try:
        value = Decimal(cleaned)
    except InvalidOperation:  # pragma: no cover - the pattern admits only decimals
        raise FxDocumentError(f"{where}: rate {cleaned!r} is not a decimal") from None
    if value <= 0:
        raise FxDocumentError(f"{where}: rate {cleaned!r} is not positive")
    return value


def _code(text: str | None, where: str, field: str) -> str:
    code = (text or "").strip().upper()
    if not _CODE.match(code):
        raise FxDocumentError(f"{where}: {field} {code[:20]!r} is not a three-letter ISO 4217 code")
    return code


def _last_sunday(year: int, month: int) -> date:
    day = date(year, month, 31)
    return day - timedelta(days=(day.weekday() + 1) % 7)


def ecb_publication_time(day: date) -> datetime:
    """16:00 in Frankfurt on ``day``, in UTC: CEST (UTC+2) from the last Sunday of March
    to the last Sunday of October (the EU rule, switching at 01:00 UTC), CET (UTC+1)
    otherwise. 16:00 local is never near a switch, so the date decides."""
    summer = _last_sunday(day.year, 3) <= day < _last_sunday(day.year, 10)
    return datetime(day.year, day.month, day.day, 16 - (2 if summer else 1), tzinfo=UTC)


def _refuse_declarations(data: bytes) -> None:
    # The ECB's files declare no DTD and no entity. Refusing any declaration keeps entity
    # expansion ("billion laughs") and external entities out without a hardened parser.
    head = data.lower()
    if b"<!doctype" in head or b"<!entity" in head:
        raise FxDocumentError(
            "ECB document: it declares a DOCTYPE or an ENTITY, which the ECB's rate files "
            "never do; refused unparsed"
        )


def parse_ecb_xml(data: bytes) -> RateDocument:
    """Every (day, currency) rate of an ECB reference-rate document, base EUR."""
    if len(data) > MAX_DOCUMENT_BYTES:
        raise FxDocumentError(
            f"ECB document: {len(data)} bytes, more than {MAX_DOCUMENT_BYTES}; not a rate file"
        )
    _refuse_declarations(data)
    try:
        root = ET.fromstring(data)
    except ET.ParseError as exc:
        raise FxDocumentError(f"ECB document: not well-formed XML ({exc})") from None
    if root.tag != f"{{{GESMES_NAMESPACE}}}Envelope":
        raise FxDocumentError(
            f"ECB document: the root element is {root.tag!r}, not gesmes:Envelope "
            "(is this eurofxref-daily.xml?)"
        )
    cube = f"{{{ECB_NAMESPACE}}}Cube"
    outer = root.find(cube)
    if outer is None:
        raise FxDocumentError("ECB document: no Cube element under the Envelope")
    rates: list[Rate] = []
    for day_cube in outer.findall(cube):
        raw_day = day_cube.get("time", "")
        try:
            day = date.fromisoformat(raw_day)
        except ValueError:
            raise FxDocumentError(
                f"ECB document: Cube time {raw_day[:20]!r} is not a date YYYY-MM-DD"
            ) from None
        published = ecb_publication_time(day)
        for entry in day_cube.findall(cube):
            where = f"ECB document, {day.isoformat()}"
            quote = _code(entry.get("currency"), where, "currency")
            value = parse_rate(entry.get("rate", ""), f"{where}, {quote}")
            rates.append(Rate("EUR", quote, value, published, published))
    if not rates:
        raise FxDocumentError("ECB document: no rates in it (no Cube currency= rate=)")
    return RateDocument(tuple(rates), hashlib.sha256(data).digest())


def _timestamp(text: str, where: str, field: str) -> datetime:
    raw = text.strip()
    try:
        value = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise FxDocumentError(
            f"{where}: {field} {raw[:40]!r} is not an ISO 8601 time such as 2026-12-04T15:00:00Z"
        ) from None
    if value.tzinfo is None:
        raise FxDocumentError(f"{where}: {field} {raw!r} has no time zone; add Z or +01:00")
    return value.astimezone(UTC)


CSV_COLUMNS = ("base", "quote", "rate", "published_at")


def parse_rates_csv(data: bytes) -> RateDocument:
    """``base,quote,rate,published_at[,valid_until]`` with a header line; ``#`` lines are
    comments. A rate is valid from its publication time."""
    if len(data) > MAX_DOCUMENT_BYTES:
        raise FxDocumentError(f"CSV: {len(data)} bytes, more than {MAX_DOCUMENT_BYTES}")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise FxDocumentError(f"CSV: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    reader = csv.DictReader(io.StringIO("\n".join(lines)))
    header = [name.strip() for name in reader.fieldnames or []]
    missing = [name for name in CSV_COLUMNS if name not in header]
    if missing:
        raise FxDocumentError(
            f"CSV: the header lacks {', '.join(missing)}; expected "
            "base,quote,rate,published_at[,valid_until]"
        )
    rates: list[Rate] = []
    for number, row in enumerate(reader, start=2):
        row = {k.strip(): (v or "") for k, v in row.items() if k is not None}
        where = f"CSV line {number}"
        base = _code(row["base"], where, "base")
        quote = _code(row["quote"], where, "quote")
        if base == quote:
            raise FxDocumentError(f"{where}: base and quote are both {base}")
        value = parse_rate(row["rate"], where)
        published = _timestamp(row["published_at"], where, "published_at")
        until_text = row.get("valid_until", "").strip()
        until = _timestamp(until_text, where, "valid_until") if until_text else None
        if until is not None and until <= published:
            raise FxDocumentError(f"{where}: valid_until is not after published_at")
        rates.append(Rate(base, quote, value, published, published, until))
    if not rates:
        raise FxDocumentError("CSV: no rates in it")
    return RateDocument(tuple(rates), hashlib.sha256(data).digest())


def half_even(value: Fraction) -> int:
    """``value`` rounded to an integer, ties to the even neighbour (2.5 -> 2, 3.5 -> 4)."""
    floor = value.numerator // value.denominator
    rest = value - floor
    if rest > Fraction(1, 2) or (rest == Fraction(1, 2) and floor % 2 == 1):
        return floor + 1
    return floor


def convert_minor(
    amount_minor: int,
    from_exponent: int,
    to_exponent: int,
    rate: Decimal | Fraction,
) -> int:
    """``amount_minor`` (of a currency with ``from_exponent``) at ``rate`` (target units
    per source unit), in the target's minor units, half to even. An inverse or cross rate
    is a Fraction (``1 / r`` or ``r_to / r_from``), so nothing is rounded before the end."""
    if isinstance(amount_minor, bool) or not isinstance(amount_minor, int):
        raise TypeError(f"amount_minor must be an int, got {type(amount_minor).__name__}")
    if not isinstance(rate, Decimal | Fraction):
        raise TypeError(f"rate must be a Decimal or a Fraction, got {type(rate).__name__}")
    exact = Fraction(amount_minor) * Fraction(rate) * Fraction(10) ** (to_exponent - from_exponent)
    return half_even(exact)


def manual_rate(
    base: str,
    quote: str,
    rate: str,
    operator: str,
    valid_from: datetime,
    valid_until: datetime | None = None,
) -> RateDocument:
    """One rate an operator enters by hand, as a document: its hash is over the entry's
    canonical text (pair, rate, validity, operator), so the record says what was entered."""
    where = "manual rate"
    base_code = _code(base, where, "base")
    quote_code = _code(quote, where, "quote")
    if base_code == quote_code:
        raise FxDocumentError(f"{where}: base and quote are both {base_code}")
    value = parse_rate(rate, where)
    if valid_from.tzinfo is None:
        raise FxDocumentError(f"{where}: valid_from has no time zone")
    start = valid_from.astimezone(UTC)
    end = valid_until.astimezone(UTC) if valid_until is not None else None
    if end is not None and end <= start:
        raise FxDocumentError(f"{where}: valid_until is not after valid_from")
    canonical = "|".join(
        (
            base_code,
            quote_code,
            str(value),
            start.isoformat(),
            end.isoformat() if end else "",
            operator,
        )
    )
    return RateDocument(
        (Rate(base_code, quote_code, value, start, start, end),),
        hashlib.sha256(canonical.encode("utf-8")).digest(),
    )
