"""Verification of Adyen's standard webhooks (HMAC-SHA256 per notification item).

Pure logic, no I/O. The signed string of one ``NotificationRequestItem`` is eight values
joined with ``:`` in this order, an absent value as the empty string and **nothing
escaped** (a ``:`` or ``\\`` in a merchant reference is signed as it stands):
``pspReference``, ``originalReference``, ``merchantAccountCode``, ``merchantReference``,
``amount.value``, ``amount.currency``, ``eventCode``, ``success``. The key is the hex
string from the Customer Area, hex-decoded; the signature is standard base64 in
``additionalData.hmacSignature``, compared in constant time.

Why not ``Adyen.util.is_valid_hmac_notification``: given a whole body it checks only the
first item, and answers a falsy ``None`` (not ``False``) when ``additionalData`` is
missing. Here every item is checked, against every active key (Adyen keeps the old key in
use for a while after a new one is generated), and a body passes only when all its items
do: a batch with one bad item is refused whole, so nothing unverified is stored beside
verified items of the same delivery.

Guarantees, each tested in tests/test_adyen_webhooks.py: the facts file's test vector
verifies; a reference holding ``:`` and ``\\`` verifies unescaped; a wrong key fails; the
second active key passes; one bad item among good ones fails the body and is named.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "HmacKeys",
    "InvalidWebhook",
    "VerifiedItem",
    "sign_item",
    "signing_string",
    "verify_body",
    "verify_item",
]


class InvalidWebhook(ValueError):
    """The body is not a verified Adyen notification; ``code`` says which rule failed."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class HmacKeys:
    """The active HMAC keys of one webhook endpoint (at least one; two while rotating)."""

    keys: tuple[bytes, ...]

    @classmethod
    def from_hex(cls, hex_keys: Iterable[str]) -> HmacKeys:
        decoded: list[bytes] = []
        for position, raw in enumerate(hex_keys, start=1):
            text = raw.strip()
            if not text:
                continue
            try:
                key = bytes.fromhex(text)
            except ValueError:
                raise ValueError(
                    f"HMAC key {position} is not a hex string (copy it from the Customer "
                    "Area's webhook settings as shown)"
                ) from None
            if len(key) < 16:
                raise ValueError(f"HMAC key {position} has {len(key)} bytes; expected 32")
            decoded.append(key)
        if not decoded:
            raise ValueError("at least one HMAC key is needed")
        return cls(tuple(decoded))


@dataclass(frozen=True, slots=True)
class VerifiedItem:
    """One notification item whose signature matched ``key_index`` (0: the first key)."""

    item: Mapping[str, Any]
    key_index: int


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):  # never in a real item (they are strings), but be exact
        return "true" if value else "false"
    return str(value)


def signing_string(item: Mapping[str, Any]) -> str:
    """The eight values of ``item`` joined with ``:``, unescaped."""
    amount = item.get("amount")
    amount = amount if isinstance(amount, Mapping) else {}
    return ":".join(
        _text(v)
        for v in (
            item.get("pspReference"),
            item.get("originalReference"),
            item.get("merchantAccountCode"),
            item.get("merchantReference"),
            amount.get("value"),
            amount.get("currency"),
            item.get("eventCode"),
            item.get("success"),
        )
    )


def sign_item(item: Mapping[str, Any], key: bytes) -> str:
    """The base64 HMAC-SHA256 of ``item`` under ``key`` (for fakes and tests)."""
    digest = hmac.new(key, signing_string(item).encode("utf-8"), hashlib.sha256).digest()
    return base64.b64encode(digest).decode("ascii")


def verify_item(item: Mapping[str, Any], keys: HmacKeys) -> VerifiedItem:
    """``item`` if its signature matches one of ``keys``; InvalidWebhook otherwise."""
    additional = item.get("additionalData")
    signature = additional.get("hmacSignature") if isinstance(additional, Mapping) else None
    if not isinstance(signature, str) or not signature:
        raise InvalidWebhook("hmac_missing", "the item carries no additionalData.hmacSignature")
    try:
        given = base64.b64decode(signature, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidWebhook("hmac_malformed", "hmacSignature is not base64") from None
    message = signing_string(item).encode("utf-8")
    for index, key in enumerate(keys.keys):
        if hmac.compare_digest(hmac.new(key, message, hashlib.sha256).digest(), given):
            return VerifiedItem(item, index)
    raise InvalidWebhook("hmac_mismatch", "hmacSignature matches none of the active keys")


def verify_body(raw: bytes, keys: HmacKeys) -> Sequence[VerifiedItem]:
    """Every item of a standard webhook body, each verified; InvalidWebhook names the
    first item (1-based) that fails, and then none is returned."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise InvalidWebhook("body_not_json", "the body is not JSON") from None
    items = body.get("notificationItems") if isinstance(body, dict) else None
    if not isinstance(items, list) or not items:
        raise InvalidWebhook("no_items", "notificationItems is missing or empty")
    verified: list[VerifiedItem] = []
    for position, wrapper in enumerate(items, start=1):
        item = wrapper.get("NotificationRequestItem") if isinstance(wrapper, dict) else None
        if not isinstance(item, dict):
            raise InvalidWebhook(
                "item_malformed", f"item {position} has no NotificationRequestItem object"
            )
        try:
            verified.append(verify_item(item, keys))
        except InvalidWebhook as exc:
            raise InvalidWebhook(exc.code, f"item {position} of {len(items)}: {exc}") from None
    return verified
