"""Adyen webhook HMAC (provider_adapters/adyen_webhooks.py): every item, two active keys."""

from __future__ import annotations

import json
from typing import Any

import pytest

from provider_adapters.adyen_webhooks import (
    HmacKeys,
    InvalidWebhook,
    sign_item,
    signing_string,
    verify_body,
    verify_item,
)

# ../shared/PROVIDERS.md, "HMAC of a standard webhook item".
VECTOR_KEY = "44782DEF547AAA06C910C43932B1EB0C71FC68D9D0C057550C48EC2ACF6BA056"
VECTOR_SIGNATURE = "coqCmt/IZ4E3CzPvMY8zTjQVL5hYJUiBRg8UU+iCWo0="
OTHER_KEY = "00112233445566778899AABBCCDDEEFF00112233445566778899AABBCCDDEEFF"


def vector_item(**changes: Any) -> dict[str, Any]:
    item: dict[str, Any] = {
        "pspReference": "7914073381342284",
        "merchantAccountCode": "TestMerchant",
        "merchantReference": "TestPayment-1407325143704",
        "amount": {"value": 1130, "currency": "EUR"},
        "eventCode": "AUTHORISATION",
        "success": "true",
        "additionalData": {"hmacSignature": VECTOR_SIGNATURE},
    }
    item.update(changes)
    return item


def body(*items: dict[str, Any]) -> bytes:
    return json.dumps(
        {"live": "false", "notificationItems": [{"NotificationRequestItem": i} for i in items]}
    ).encode()


def signed(item: dict[str, Any], key_hex: str) -> dict[str, Any]:
    return {**item, "additionalData": {"hmacSignature": sign_item(item, bytes.fromhex(key_hex))}}


def test_the_facts_file_vector_verifies() -> None:
    item = vector_item()
    assert signing_string(item) == (
        "7914073381342284::TestMerchant:TestPayment-1407325143704:1130:EUR:AUTHORISATION:true"
    )
    assert sign_item(item, bytes.fromhex(VECTOR_KEY)) == VECTOR_SIGNATURE
    assert verify_item(item, HmacKeys.from_hex([VECTOR_KEY])).key_index == 0


def test_a_reference_with_colon_and_backslash_is_signed_unescaped() -> None:
    item = signed(vector_item(merchantReference="order:42\\b"), VECTOR_KEY)
    assert ":order:42\\b:" in signing_string(item)
    assert verify_item(item, HmacKeys.from_hex([VECTOR_KEY])).item is item
    # The retired escaping scheme (\\ and \:) gives another signature, which must fail.
    escaped = {**item, "merchantReference": "order\\:42\\\\b"}
    with pytest.raises(InvalidWebhook) as info:
        verify_item(escaped, HmacKeys.from_hex([VECTOR_KEY]))
    assert info.value.code == "hmac_mismatch"


def test_a_wrong_key_fails() -> None:
    with pytest.raises(InvalidWebhook) as info:
        verify_item(vector_item(), HmacKeys.from_hex([OTHER_KEY]))
    assert info.value.code == "hmac_mismatch"


def test_a_changed_field_fails() -> None:
    with pytest.raises(InvalidWebhook):
        verify_item(vector_item(success="false"), HmacKeys.from_hex([VECTOR_KEY]))


def test_the_second_active_key_passes_and_is_named() -> None:
    verified = verify_item(vector_item(), HmacKeys.from_hex([OTHER_KEY, VECTOR_KEY]))
    assert verified.key_index == 1


def test_every_item_is_checked_and_one_bad_item_refuses_the_body() -> None:
    keys = HmacKeys.from_hex([VECTOR_KEY])
    good = vector_item()
    second = signed(vector_item(pspReference="8814073381342285", eventCode="CAPTURE"), VECTOR_KEY)
    assert [v.item["pspReference"] for v in verify_body(body(good, second), keys)] == [
        "7914073381342284",
        "8814073381342285",
    ]
    bad = {**second, "amount": {"value": 99999, "currency": "EUR"}}
    with pytest.raises(InvalidWebhook) as info:
        verify_body(body(good, bad), keys)
    assert info.value.code == "hmac_mismatch" and "item 2 of 2" in str(info.value)


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"not json", "body_not_json"),
        (b'{"notificationItems": []}', "no_items"),
        (b'{"notificationItems": [{"x": 1}]}', "item_malformed"),
        (body({k: v for k, v in vector_item().items() if k != "additionalData"}), "hmac_missing"),
        (body(vector_item(additionalData={"hmacSignature": "***"})), "hmac_malformed"),
    ],
)
def test_malformed_bodies_are_refused_by_rule(raw: bytes, code: str) -> None:
    with pytest.raises(InvalidWebhook) as info:
        verify_body(raw, HmacKeys.from_hex([VECTOR_KEY]))
    assert info.value.code == code


def test_keys_must_be_hex_and_present() -> None:
    with pytest.raises(ValueError, match="not a hex string"):
        HmacKeys.from_hex(["zz"])
    with pytest.raises(ValueError, match="at least one"):
        HmacKeys.from_hex(["", " "])
