"""Exchange rates in the database: importing them, reading them, converting with them.

The rates table and the conversion are SQL (sql/0027: ``outbox.fx_rates``,
``outbox.convert_v1``), because applications convert inside their own transaction. This
module is what the command line (``outbox-relay fx ...``) and the relay's opt-in periodic
ECB fetch run:

* :func:`fetch_document` / :func:`fetch_document_async` fetch a rate document over HTTP
  (bounded in size and time; the bytes as received are what is hashed);
* :func:`import_document` records a parsed document's rates in one transaction: all of
  them or none; a rate already recorded (same pair, source, validity and rate) is skipped,
  so importing the same file twice records nothing the second time;
* :func:`current_rates`, :func:`rate_history`, :func:`convert` read for the operator.

Rates travel as :class:`decimal.Decimal` and PostgreSQL ``numeric``; psycopg maps one to
the other exactly. Rates read back for display are the database's own text.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import aiohttp
import psycopg
from psycopg.rows import dict_row

from relay.domain.fx import MAX_DOCUMENT_BYTES, FxDocumentError, RateDocument
from relay.infra.queries import QUERIES

__all__ = [
    "FetchError",
    "ImportReport",
    "SourceKind",
    "convert",
    "currency_exponent",
    "current_rates",
    "differences",
    "fetch_document",
    "fetch_document_async",
    "import_document",
    "import_document_as_relay",
    "rate_history",
]

SourceKind = Literal["ecb", "csv", "provider", "manual"]
FETCH_TIMEOUT_SECONDS = 30  # whole seconds: no float in this module (tests/test_fx.py)


class FetchError(Exception):
    """The document could not be fetched; the message names the URL and what happened."""

    code = "fx_fetch_failed"


@dataclass(frozen=True, slots=True)
class ImportReport:
    source_kind: str
    source_name: str
    rates_in_document: int
    inserted: int
    rate_ids: tuple[int, ...]

    @property
    def already_recorded(self) -> int:
        return self.rates_in_document - self.inserted


def _checked(url: str, status: int, body: bytes) -> bytes:
    if status != 200:
        raise FetchError(f"GET {url} answered HTTP {status}; no rates imported")
    if len(body) > MAX_DOCUMENT_BYTES:
        raise FetchError(f"GET {url} sent {len(body)} bytes, more than {MAX_DOCUMENT_BYTES}")
    return body


def fetch_document(url: str, *, timeout: int = FETCH_TIMEOUT_SECONDS) -> bytes:
    """The document at ``url``, as bytes (for the command line, which has no event loop)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return _checked(url, response.status, response.read(MAX_DOCUMENT_BYTES + 1))
    except urllib.error.HTTPError as exc:
        return _checked(url, exc.code, b"")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise FetchError(f"GET {url} failed: {type(exc).__name__}: {exc}") from None


async def fetch_document_async(session: aiohttp.ClientSession, url: str) -> bytes:
    """The document at ``url``, as bytes (for the relay's periodic fetch)."""
    try:
        async with session.get(
            url, timeout=aiohttp.ClientTimeout(total=FETCH_TIMEOUT_SECONDS)
        ) as response:
            body = await response.content.read(MAX_DOCUMENT_BYTES + 1)
            return _checked(url, response.status, body)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        raise FetchError(f"GET {url} failed: {type(exc).__name__}: {exc}") from None


def _parameters(
    document: RateDocument,
    *,
    source_kind: SourceKind,
    source_name: str,
    source_url: str | None,
    fetched_at: datetime | None,
) -> dict[str, Any]:
    rates = document.rates
    return {
        "source_kind": source_kind,
        "source_name": source_name,
        "source_url": source_url,
        "source_sha256": document.sha256,
        "fetched_at": fetched_at,
        "bases": [r.base for r in rates],
        "quotes": [r.quote for r in rates],
        "rates": [r.rate for r in rates],
        "published": [r.published_at for r in rates],
        "valid_from": [r.valid_from for r in rates],
        "valid_until": [r.valid_until for r in rates],
    }


def import_document(
    conn: psycopg.Connection,
    document: RateDocument,
    *,
    source_kind: SourceKind,
    source_name: str,
    operator: str,
    source_url: str | None = None,
    fetched_at: datetime | None = None,
) -> ImportReport:
    """Record every rate of ``document`` in one transaction, as ``operator``.

    An unknown currency (not in outbox.currencies) refuses the whole document with the
    database's foreign-key error; nothing is half-imported.
    """
    params = _parameters(
        document,
        source_kind=source_kind,
        source_name=source_name,
        source_url=source_url,
        fetched_at=fetched_at,
    )
    params["operator"] = operator
    with conn.transaction():
        conn.execute(QUERIES["set_operator_actor"], {"operator": operator})
        ids = [row[0] for row in conn.execute(QUERIES["fx_insert_rates"], params).fetchall()]
    return ImportReport(source_kind, source_name, len(document.rates), len(ids), tuple(ids))


async def import_document_as_relay(
    conn: psycopg.AsyncConnection[Any],
    document: RateDocument,
    *,
    actor: str,
    source_name: str,
    source_url: str,
) -> ImportReport:
    """:func:`import_document` for the relay's periodic ECB fetch (audit actor ``actor``)."""
    params = _parameters(
        document,
        source_kind="ecb",
        source_name=source_name,
        source_url=source_url,
        fetched_at=None,
    )
    async with conn.transaction():
        await conn.execute(QUERIES["set_actor"], {"actor": actor, "reason": None})
        cur = await conn.execute(QUERIES["fx_insert_rates_as_relay"], params)
        ids = [row[0] for row in await cur.fetchall()]
    return ImportReport("ecb", source_name, len(document.rates), len(ids), tuple(ids))


def current_rates(conn: psycopg.Connection, at: datetime | None = None) -> list[dict[str, Any]]:
    """The rate of every pair valid at ``at`` (default now), with source, age and staleness."""
    return (
        conn.cursor(row_factory=dict_row)
        .execute(QUERIES["fx_current_rates"], {"at": at})
        .fetchall()
    )


def rate_history(
    conn: psycopg.Connection, base: str, quote: str, limit: int = 50
) -> list[dict[str, Any]]:
    """Every recorded rate of the pair, either direction, newest first."""
    return (
        conn.cursor(row_factory=dict_row)
        .execute(
            QUERIES["fx_rate_history"],
            {"base": base.upper(), "quote": quote.upper(), "limit": limit},
        )
        .fetchall()
    )


def currency_exponent(conn: psycopg.Connection, code: str) -> int | None:
    row = conn.execute(QUERIES["fx_currency_exponent"], {"code": code}).fetchone()
    return None if row is None else int(row[0])


def convert(
    conn: psycopg.Connection,
    amount_minor: int,
    from_ccy: str,
    to_ccy: str,
    at: datetime | None = None,
) -> dict[str, Any]:
    """outbox.convert_v1's answer with both exponents; its errors (fx_rate_stale,
    fx_rate_missing, fx_currency_unknown) are raised as the database raised them."""
    row = (
        conn.cursor(row_factory=dict_row)
        .execute(
            QUERIES["fx_convert"],
            {"amount_minor": amount_minor, "from_ccy": from_ccy, "to_ccy": to_ccy, "at": at},
        )
        .fetchone()
    )
    if row is None:  # pragma: no cover - convert_v1 returns a row or raises
        raise FxDocumentError("convert_v1 returned nothing")
    return row


def differences(
    conn: psycopg.Connection, payment_id: str | None = None, limit: int = 50
) -> list[dict[str, Any]]:
    """The FX difference journal (outbox.fx_postings), newest first, with exponents."""
    return (
        conn.cursor(row_factory=dict_row)
        .execute(QUERIES["fx_postings_list"], {"payment_id": payment_id, "limit": limit})
        .fetchall()
    )
