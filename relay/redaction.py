"""Redaction: secrets and card numbers never leave the relay in logs, metrics or CLI output.

Pure logic, no I/O. Guarantees, each tested:

* the value of any key that names a secret (``api_key``, ``password``, ``secret``,
  ``authorization``, ``token`` variants, ``database_url``, ``amqp_url``, ``dsn``...) is
  replaced by ``[redacted]``, however deeply it is nested;
* in every string, whatever its key: a run of 13 to 19 digits (single spaces or dashes
  allowed between them) that passes the Luhn check becomes ``[redacted card]``; a
  provider API key (``sk_live_...``, ``rk_test_...``, ``whsec_...``) keeps its prefix
  and loses the rest; the password in a URL (``scheme://user:PASSWORD@host``) or a libpq
  string (``password=...``) and the token after ``Bearer`` become ``[redacted]``;
* an integer of 13 to 19 digits passing Luhn is replaced too (a card number logged as a
  number is still a card number).

:func:`redact_processor` is the structlog processor (relay/logs.py puts it in the chain
before the renderer); :func:`safe_label` guards metric label values taken from data.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping, MutableMapping
from datetime import date, time, timedelta
from typing import Any

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
    "safe_label",
]

REDACTED = "[redacted]"
REDACTED_CARD = "[redacted card]"

_SECRET_KEY = re.compile(
    r"api[_-]?key|apikey|passw(or)?d|pwd|secret|authori[sz]ation|bearer|"
    r"access[_-]?token|refresh[_-]?token|auth[_-]?token|session[_-]?token|"
    r"private[_-]?key|database[_-]?url|db[_-]?url|amqp[_-]?url|dsn|conninfo|"
    r"cookie|credential",
    re.IGNORECASE,
)
# 13-19 digits, one optional space or dash between digits, not part of a longer run: the
# same rule as outbox.looks_like_card_number() in sql/0001_pre_core.sql.
_CARD_RUN = re.compile(r"(?<![0-9])[0-9](?:[ -]?[0-9]){12,18}(?![0-9])")
_PROVIDER_KEY = re.compile(r"\b((?:sk|rk|pk)_(?:live|test)_|whsec_)[A-Za-z0-9]{6,}", re.IGNORECASE)
# Greedy to the last '@' of the word: a password may hold '@' or '/' unencoded.
_URL_PASSWORD = re.compile(r"(?P<head>[a-z][a-z0-9+.\-]*://[^\s:/@]*:)(?P<pw>\S+)(?=@)", re.I)
_LIBPQ_PASSWORD = re.compile(r"(?P<head>\bpassword\s*=\s*)(?P<pw>'(?:[^'\\]|\\.)*'|\S+)", re.I)
_BEARER = re.compile(r"(?P<head>\bBearer\s+)(?P<pw>[A-Za-z0-9._~+/=\-]+)", re.I)


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
    digits = re.sub(r"[ -]", "", run)
    return 13 <= len(digits) <= 19 and luhn_valid(digits)


def is_secret_key(key: object) -> bool:
    """True when a mapping key names a secret (its value is withheld whatever it is)."""
    return isinstance(key, str) and _SECRET_KEY.search(key) is not None


def redact_text(text: str) -> str:
    """``text`` with card numbers, provider keys and credentials masked."""
    if not text:
        return text
    if any(c.isdigit() for c in text):
        text = _CARD_RUN.sub(
            lambda m: REDACTED_CARD if _card_like(m.group(0)) else m.group(0), text
        )
    text = _BEARER.sub(lambda m: m.group("head") + REDACTED, text)
    text = _URL_PASSWORD.sub(lambda m: m.group("head") + REDACTED, text)
    text = _LIBPQ_PASSWORD.sub(lambda m: m.group("head") + REDACTED, text)
    return _PROVIDER_KEY.sub(lambda m: m.group(1) + REDACTED, text)


def redact_value(value: Any, *, _depth: int = 0) -> Any:
    """Redact strings inside ``value`` (mappings, sequences), masking secret keys' values."""
    if isinstance(value, str):
        return redact_text(value)
    if value is None or isinstance(value, bool | float | date | time | timedelta | uuid.UUID):
        return value
    if isinstance(value, int):
        return REDACTED_CARD if _card_like(str(abs(value))) else value
    if _depth > 20:
        return REDACTED  # pathological nesting: withhold rather than recurse forever
    if isinstance(value, Mapping):
        return {
            k: (
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
