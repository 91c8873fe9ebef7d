"""The one error catalogue: every provider error and refusal code the adapters report.

The data is ``provider_adapters/error_catalogue.csv``, one row per (provider, code):
``unified_code`` (the same meaning across providers: Stripe's ``insufficient_funds`` and
Adyen's ``not_enough_balance`` are both ``insufficient_funds``), ``class`` (retryable,
declined, ambiguous, invalid: the outcome class the adapter gives it), whether another card
may succeed, the operator's remediation and a message safe to show a customer. Provider
``*`` rows are codes every adapter may give (transport, credentials, validation).

The catalogue decides an outcome's class: every outcome an adapter returns passes through
:func:`catalogued_outcome` (the lane does it, relay/core/lanes.py, before the breaker, the
retry policy and the write-back see it), which gives it the class of its code's row. So
adding a code, or moving one to another class, is a data change: a row here, and
``tests/test_error_catalogue.py`` checks that every code either fake can make an adapter
report has a row of the class the adapter gives it. Two rules keep a row from doing harm:

* an :class:`~provider_adapters.base.Ambiguous` outcome stays ambiguous whatever its row
  says: the adapter could not tell whether the request took effect, and no table can
  know better (only the provider can: the same key again, a lookup, the janitor). A row
  may make any other outcome more cautious (ambiguous), or move it between the classes
  that mean "no effect" (declined, retryable, invalid);
* a code without a row keeps the class the adapter read from the reply's shape, which is
  the safe reading of it: a refusal the provider answered (declined: no effect, the
  payment fails), a request the provider refused as such (invalid: dead for an operator),
  nothing sent or "try again" (retryable, same key), anything else (ambiguous, same key
  and a lookup). The relay counts such a code (``outbox_relay_uncatalogued_codes_total``)
  so that it gets a row.

Pure: reads the packaged CSV once, no other I/O.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cache
from importlib import resources

from provider_adapters.base import (
    Ambiguous,
    Declined,
    Invalid,
    Outcome,
    Retryable,
    Succeeded,
)

__all__ = [
    "CLASSES",
    "CatalogueEntry",
    "catalogue",
    "catalogued_outcome",
    "class_of",
    "describe",
    "lookup",
    "lookup_in",
]

CLASSES = ("retryable", "declined", "ambiguous", "invalid")
_COLUMNS = [
    "provider",
    "code",
    "unified_code",
    "class",
    "other_card_may_succeed",
    "remediation",
    "customer_message",
]


@dataclass(frozen=True, slots=True)
class CatalogueEntry:
    provider: str
    code: str
    unified_code: str
    klass: str
    other_card_may_succeed: bool | None  # None: not a card refusal
    remediation: str
    customer_message: str


def _parse(text: str) -> tuple[CatalogueEntry, ...]:
    reader = csv.DictReader(io.StringIO(text))
    if reader.fieldnames != _COLUMNS:
        raise ValueError(
            f"error_catalogue.csv columns are {reader.fieldnames}, expected {_COLUMNS}"
        )
    entries: list[CatalogueEntry] = []
    seen: set[tuple[str, str]] = set()
    for line, row in enumerate(reader, start=2):
        where = f"error_catalogue.csv line {line}"
        if row["class"] not in CLASSES:
            raise ValueError(f"{where}: class {row['class']!r} is not one of {CLASSES}")
        if row["other_card_may_succeed"] not in ("yes", "no", ""):
            raise ValueError(f"{where}: other_card_may_succeed must be yes, no or empty")
        if not (row["code"] and row["unified_code"] and row["remediation"]):
            raise ValueError(f"{where}: code, unified_code and remediation are required")
        key = (row["provider"], row["code"])
        if key in seen:
            raise ValueError(f"{where}: {key} appears twice")
        seen.add(key)
        flag = row["other_card_may_succeed"]
        entries.append(
            CatalogueEntry(
                provider=row["provider"],
                code=row["code"],
                unified_code=row["unified_code"],
                klass=row["class"],
                other_card_may_succeed=None if flag == "" else flag == "yes",
                remediation=row["remediation"],
                customer_message=row["customer_message"],
            )
        )
    return tuple(entries)


@cache
def catalogue() -> tuple[CatalogueEntry, ...]:
    """Every row, in the file's order."""
    text = resources.files("provider_adapters").joinpath("error_catalogue.csv").read_text("utf-8")
    return _parse(text)


@cache
def _index() -> dict[tuple[str, str], CatalogueEntry]:
    return {(e.provider, e.code): e for e in catalogue()}


def lookup(provider: str, code: str) -> CatalogueEntry | None:
    """The row for ``code`` as ``provider`` (a provider kind: stripe, adyen) reports it,
    else the shared ``*`` row, else None (an uncatalogued code)."""
    index = _index()
    return index.get((provider, code)) or index.get(("*", code))


def lookup_in(entries: Iterable[CatalogueEntry]) -> Callable[[str, str], CatalogueEntry | None]:
    """:func:`lookup` over other rows (a catalogue under test, parsed with ``_parse``)."""
    index = {(e.provider, e.code): e for e in entries}
    return lambda provider, code: index.get((provider, code)) or index.get(("*", code))


def class_of(outcome: Outcome) -> str:
    """The catalogue's name of an outcome's class (``succeeded`` for a success)."""
    return type(outcome).__name__.lower()


def catalogued_outcome(
    kind: str,
    outcome: Outcome,
    rows: Callable[[str, str], CatalogueEntry | None] = lookup,
) -> Outcome:
    """``outcome`` in the class its code's row gives it (module docstring: an ambiguous
    outcome stays ambiguous; a code without a row keeps the adapter's class). ``kind`` is
    the adapter's provider kind (the catalogue's provider column); code and message are
    kept, a retryable outcome's Retry-After and an ambiguous one's reference too."""
    if isinstance(outcome, Succeeded | Ambiguous):
        return outcome
    entry = rows(kind, outcome.code)
    if entry is None or entry.klass == class_of(outcome):
        return outcome
    code, message = outcome.code, outcome.message
    if entry.klass == "declined":
        return Declined(code, message)
    if entry.klass == "invalid":
        return Invalid(code, message)
    if entry.klass == "retryable":
        return Retryable(code, message)
    return Ambiguous(code, message)


def describe(code: str) -> list[CatalogueEntry]:
    """Every row whose code or unified code is ``code`` (any provider)."""
    return [e for e in catalogue() if code in (e.code, e.unified_code)]
