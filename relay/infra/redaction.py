"""Redaction: secrets and card numbers never leave the relay in logs, metrics or CLI output.

Pure logic, no I/O. Guarantees, each tested:

* the value of any key that names a secret (``api_key``, ``password``, ``secret``,
  ``authorization``, ``token`` variants, ``database_url``, ``amqp_url``, ``dsn``...) is
  replaced by ``[redacted]``, however deeply it is nested;
* in every string, whatever its key:

  - a run of 13 to 19 digits (single spaces or dashes allowed between them) that passes
    the Luhn check becomes ``[redacted card]``, and so does a number grouped as cards are
    printed (4-4-4-1..4, 4-4-4-4-3, 4-6-5, 4-6-4) with other separators (dots, slashes,
    underscores, tabs, several spaces, `` - ``) that passes Luhn;
  - a provider API key (``sk_live_...``, ``rk_test_...``, ``whsec_...``) keeps its prefix
    and loses the rest;
  - the password in a URL (``scheme://user:PASSWORD@host``), the token after ``Bearer``
    or ``Basic``, and the value assigned to a secret-naming word (``api_key=...``,
    ``"password": "..."``, ``Authorization: ...``, libpq's ``password=...``) become
    ``[redacted]``;
  - every value registered with :func:`register_secret` (the configured provider keys and
    database and broker passwords, registered at start-up) becomes ``[redacted]``, also
    in its percent-encoded and JSON-escaped forms;

* an integer of 13 to 19 digits passing Luhn is replaced too (a card number logged as a
  number is still a card number).

Masking too much costs a less readable line; masking too little leaks a secret: where
the two conflict, these rules mask. The card rule is broader than the database's
(``outbox.looks_like_card_number``): everything the database calls a card is masked here.

:func:`redact_processor` is the structlog processor (relay/infra/logs.py puts it in the chain
before the renderer, and :func:`scrub_registered` after it); :func:`safe_label` guards
metric label values taken from data.
"""

from __future__ import annotations

import functools
import json
import re
import uuid
from collections.abc import Mapping, MutableMapping
from datetime import date, time, timedelta
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from psycopg.conninfo import conninfo_to_dict, make_conninfo

__all__ = [
    "REDACTED",
    "REDACTED_CARD",
    "describe_conninfo",
    "is_secret_key",
    "luhn_valid",
    "redact_processor",
    "redact_text",
    "redact_value",
    "register_secret",
    "safe_label",
    "scrub_registered",
    "url_passwords",
]

REDACTED = "[redacted]"
REDACTED_CARD = "[redacted card]"

_SECRET_WORDS = (
    r"api[_-]?key|apikey|passw(?:or)?d|pwd|secret|authori[sz]ation|bearer|"
    r"access[_-]?token|refresh[_-]?token|auth[_-]?token|session[_-]?token|"
    r"private[_-]?key|database[_-]?url|db[_-]?url|amqp[_-]?url|dsn|conninfo|"
    r"cookie|credential"
)
_SECRET_KEY = re.compile(_SECRET_WORDS, re.IGNORECASE)
# 13-19 digits, one optional space or dash between digits, not part of a longer run: the
# same rule as outbox.looks_like_card_number() in sql/0001_pre_core.sql.
_CARD_RUN = re.compile(r"(?<![0-9])[0-9](?:[ -]?[0-9]){12,18}(?![0-9])")
# A card as printed, with any separator people and systems use between the groups (one to
# three of: space, tab, no-break space, dot, slash, backslash, underscore, dash). Only the
# printed groupings, so that IP addresses, versions and decimals are left alone.
_SEP = r"[ \t\u00a0./\\_-]{1,3}"
_GROUPED_CARD = re.compile(
    rf"(?<![0-9])(?:[0-9]{{4}}{_SEP}[0-9]{{4}}{_SEP}[0-9]{{4}}{_SEP}"
    rf"(?:[0-9]{{4}}{_SEP}[0-9]{{3}}|[0-9]{{1,4}})"
    rf"|[0-9]{{4}}{_SEP}[0-9]{{6}}{_SEP}[0-9]{{4,5}})(?![0-9])"
)
_PROVIDER_KEY = re.compile(r"\b((?:sk|rk|pk)_(?:live|test)_|whsec_)[A-Za-z0-9]{6,}", re.IGNORECASE)
# Greedy to the last '@' of the word: a password may hold '@' or '/' unencoded. The scheme
# starts a word and is bounded, so a long run of letters is not rescanned from each one.
_URL_PASSWORD = re.compile(
    r"(?P<head>(?<![a-z0-9+.\-])[a-z][a-z0-9+.\-]{0,31}://[^\s:/@]*:)(?P<pw>\S+)(?=@)", re.I
)
# The token of an HTTP Authorization scheme. Basic's must look encoded (not a plain word),
# so that prose such as "Basic authentication failed" stays readable.
_AUTH_SCHEME = re.compile(
    r"(?P<head>\b(?:Bearer\s+|Basic\s+(?!(?-i:[A-Za-z][a-z]*)\b)(?=[A-Za-z0-9+/]{6,})))"
    r"(?P<pw>[A-Za-z0-9._~+/=\-]+)",
    re.I,
)
# A secret-naming word assigned a value: `api_key=v`, `password: v`, `"api_key": "v"`,
# `\"password\": \"v\"` (JSON inside a string), `Authorization: Basic v`. The name may
# carry a prefix or suffix (RELAY_PROVIDERS__STRIPE__API_KEY, x-api-key); a quoted value
# is masked to its closing quote, an unquoted one to the next whitespace.
_ASSIGNED_SECRET = re.compile(
    rf"(?P<head>(?:{_SECRET_WORDS})[A-Za-z0-9_.\-]{{0,40}}\\?[\"']?\s{{0,8}}[:=]\s{{0,8}}"
    r"(?>(?:(?:Bearer|Basic|Token|Digest)\s+)?))"  # atomic: never re-read as the value
    r"(?P<pw>(?!\[redacted)(?:\"(?:[^\"\\]|\\.)*\"|'(?:[^'\\]|\\.)*'"
    r"|\\\"(?:[^\"\\]|\\[^\"])*\\\"|\S+))",
    re.IGNORECASE,
)
# Values scrubbed verbatim (register_secret): one alternation, longest first.
_MIN_REGISTERED_LENGTH = 6
_SMALLEST_CARD_NUMBER = 10**12  # 13 digits
_registered: set[str] = set()
_REGISTERED: re.Pattern[str] | None = None


def luhn_valid(digits: str) -> bool:
    """True when ``digits`` (only 0-9) passes the Luhn check."""
    total = 0
    for position, char in enumerate(reversed(digits)):
        d = ord(char) - 48
        if position % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def _card_like(run: str) -> bool:
    digits = re.sub(r"[^0-9]", "", run)
    return 13 <= len(digits) <= 19 and luhn_valid(digits)


def _mask_card(match: re.Match[str]) -> str:
    return REDACTED_CARD if _card_like(match.group(0)) else match.group(0)


def register_secret(*values: str | None) -> None:
    """Scrub these exact values from every text :func:`redact_text` sees from now on.

    For the configured secrets (provider API keys, database and broker passwords), so
    that they are masked whatever their shape and wherever they appear, even in a message
    no other rule recognises. Their percent-encoded form (as in a URL) and JSON-escaped
    form (as in a rendered log line) are scrubbed too. A value shorter than six characters
    is ignored: scrubbing it would mangle every line, and it is no secret worth the name.
    """
    global _REGISTERED
    added = False
    for value in values:
        if not value or len(value) < _MIN_REGISTERED_LENGTH:
            continue
        forms = {value, unquote(value), quote(value, safe=""), json.dumps(value)[1:-1]}
        for form in forms - _registered:
            if len(form) >= _MIN_REGISTERED_LENGTH:
                _registered.add(form)
                added = True
    if added:
        ordered = sorted(_registered, key=len, reverse=True)  # longest form wins
        _REGISTERED = re.compile("|".join(re.escape(v) for v in ordered))
        _redact_short_text.cache_clear()  # its answers predate this secret


def scrub_registered(text: str) -> str:
    """``text`` without the values given to :func:`register_secret` (only those)."""
    pattern = _REGISTERED
    return pattern.sub(REDACTED, text) if pattern is not None and text else text


def is_secret_key(key: object) -> bool:
    """True when a mapping key names a secret (its value is withheld whatever it is)."""
    return isinstance(key, str) and _secret_key_name(key)


@functools.lru_cache(maxsize=4096)
def _secret_key_name(key: str) -> bool:
    # Memoised: the keys of log events are a small, fixed set (a pure function of the key).
    return _SECRET_KEY.search(key) is not None


# Short texts recur in every log line (event names, levels, providers, statuses, error
# codes): their redaction is memoised, and the memo is emptied whenever a secret is
# registered, since that changes the answer.
_SHORT_TEXT = 64


def redact_text(text: str) -> str:
    """``text`` with card numbers, provider keys, credentials and configured secrets masked."""
    if not text:
        return text
    if len(text) <= _SHORT_TEXT:
        return _redact_short_text(text)
    return _redact_text(text)


@functools.lru_cache(maxsize=4096)
def _redact_short_text(text: str) -> str:
    return _redact_text(text)


def _redact_text(text: str) -> str:
    text = scrub_registered(text)  # first: before other rules cut a secret into pieces
    if any(c.isdigit() for c in text):
        text = _CARD_RUN.sub(_mask_card, text)
        text = _GROUPED_CARD.sub(_mask_card, text)
    text = _AUTH_SCHEME.sub(lambda m: m.group("head") + REDACTED, text)
    if "://" in text:
        text = _URL_PASSWORD.sub(lambda m: m.group("head") + REDACTED, text)
    if "=" in text or ":" in text:
        text = _ASSIGNED_SECRET.sub(lambda m: m.group("head") + REDACTED, text)
    return _PROVIDER_KEY.sub(lambda m: m.group(1) + REDACTED, text)


def redact_value(value: Any, *, _depth: int = 0) -> Any:
    """Redact strings inside ``value`` (mappings, sequences), masking secret keys' values."""
    if isinstance(value, str):
        return redact_text(value)
    if value is None or isinstance(value, bool | float | date | time | timedelta | uuid.UUID):
        return value
    if isinstance(value, int):
        if -_SMALLEST_CARD_NUMBER < value < _SMALLEST_CARD_NUMBER:
            return value  # fewer than 13 digits: no card number
        return REDACTED_CARD if _card_like(str(abs(value))) else value
    if _depth > 20:
        return REDACTED  # pathological nesting: withhold rather than recurse forever
    if isinstance(value, Mapping):
        # Keys of data are data too (a card number or a key can be a mapping key).
        return {
            (redact_text(k) if isinstance(k, str) else k): (
                REDACTED
                if is_secret_key(k) and v is not None
                else redact_value(v, _depth=_depth + 1)
            )
            for k, v in value.items()
        }
    if isinstance(value, list | tuple | set | frozenset):
        items = [redact_value(v, _depth=_depth + 1) for v in value]
        return tuple(items) if isinstance(value, tuple) else items
    if isinstance(value, bytes | bytearray):
        return redact_text(bytes(value).decode("utf-8", "replace"))
    # Anything else is rendered with repr/str by the renderer: redact that text now.
    return redact_text(str(value))


def redact_processor(
    _logger: object, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: redact every value of the event (see the module docstring)."""
    for key, value in list(event_dict.items()):
        if is_secret_key(key) and value is not None:
            event_dict[key] = REDACTED
        else:
            event_dict[key] = redact_value(value)
    return event_dict


def safe_label(value: str) -> str:
    """A metric label value taken from data: ``"redacted"`` if it would carry a secret."""
    return value if redact_text(value) == value else "redacted"


def describe_conninfo(conninfo: str) -> str:
    """A libpq URL or key=value string without its password, for logs and messages."""
    try:
        params = conninfo_to_dict(conninfo)
    except Exception:  # unparsable: say nothing about it rather than risk echoing it
        return REDACTED
    params.pop("password", None)
    return redact_text(make_conninfo("", **params))


def url_passwords(url: str | None) -> list[str]:
    """The password of a libpq connection string or a URL (``amqp://``...), for
    :func:`register_secret`; empty when there is none or the text does not parse."""
    if not url:
        return []
    found: list[str] = []
    try:
        password = conninfo_to_dict(url).get("password")
    except Exception:  # not a libpq string (an AMQP URL): the generic parse below
        password = None
    if password:
        found.append(str(password))
    try:
        raw = urlsplit(url).password  # as written: percent-encoded, if it was
    except ValueError:
        raw = None
    if raw:
        found.append(raw)
    return found
