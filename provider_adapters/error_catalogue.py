"""The one error catalogue: every provider error and refusal code the adapters report.

The data is ``provider_adapters/error_catalogue.csv``, one row per (provider, code):
``unified_code`` (the same meaning across providers: Stripe's ``insufficient_funds`` and
Adyen's ``not_enough_balance`` are both ``insufficient_funds``), ``class`` (retryable,
declined, ambiguous, invalid: the outcome class the adapter gives it), whether another card
may succeed, the operator's remediation and a message safe to show a customer. Provider
``*`` rows are codes every adapter may give (transport, credentials, validation).

Adding a code is a data change: a row here, and ``tests/test_error_catalogue.py`` checks
that every code either fake can make an adapter report has one. A code without a row is
still handled safely, by the class the adapter gave it (a decline fails the payment
without effect, an invalid answer goes dead for an operator, a retryable or ambiguous one
is retried under the same key); the relay counts it by code
(``outbox_relay_uncatalogued_codes_total``) so that it gets a row.

Pure: reads the packaged CSV once, no other I/O.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from functools import cache
from importlib import resources

__all__ = ["CLASSES", "CatalogueEntry", "catalogue", "describe", "lookup"]

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


def describe(code: str) -> list[CatalogueEntry]:
    """Every row whose code or unified code is ``code`` (any provider)."""
    return [e for e in catalogue() if code in (e.code, e.unified_code)]
