"""An ``adyen`` provider instance from RELAY_* settings: key and HMAC keys from files,
merchant account, pinned Checkout version, and the adapter the registry builds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from provider_adapters.adyen import AdyenAdapter
from provider_adapters.registry import build_adapter
from relay.infra.config import ConfigError, load_settings

KEY_A = "44782DEF547AAA06C910C43932B1EB0C71FC68D9D0C057550C48EC2ACF6BA056"
KEY_B = "00112233445566778899AABBCCDDEEFF00112233445566778899AABBCCDDEEFF"


def _env(monkeypatch: pytest.MonkeyPatch, **values: str) -> None:
    for name in list(os.environ):
        if name.startswith("RELAY_"):
            monkeypatch.delenv(name)
    for name, value in values.items():
        monkeypatch.setenv(name, value)


def _adyen(tmp_path: Path, **extra: str) -> dict[str, str]:
    key_file = tmp_path / "adyen_key"
    key_file.write_text("AQE_test_key\n")
    hmac_file = tmp_path / "adyen_hmac"
    hmac_file.write_text(f"# new key first, old key until the rotation is done\n{KEY_B}\n{KEY_A}\n")
    return {
        "RELAY_PROVIDERS__ADYEN__KIND": "adyen",
        "RELAY_PROVIDERS__ADYEN__BASE_URL": "https://checkout-test.adyen.com",
        "RELAY_PROVIDERS__ADYEN__API_KEY_FILE": str(key_file),
        "RELAY_PROVIDERS__ADYEN__MERCHANT_ACCOUNT": "ShopECOM",
        "RELAY_PROVIDERS__ADYEN__HMAC_KEYS_FILE": str(hmac_file),
        **extra,
    }


@pytest.mark.anyio
async def test_an_adyen_instance_is_built_from_settings(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _env(monkeypatch, **_adyen(tmp_path))
    spec = load_settings().providers["adyen"]
    assert spec.resolved_api_key() == "AQE_test_key"
    assert spec.resolved_hmac_keys() == [KEY_B, KEY_A]
    adapter = build_adapter("adyen", spec)
    assert isinstance(adapter, AdyenAdapter)
    assert (adapter.name, adapter.api_version, adapter.untested_version) == ("adyen", "v71", False)
    await adapter.aclose()


@pytest.mark.parametrize(
    ("drop", "extra", "expected"),
    [
        ("RELAY_PROVIDERS__ADYEN__MERCHANT_ACCOUNT", {}, "__MERCHANT_ACCOUNT"),
        ("RELAY_PROVIDERS__ADYEN__BASE_URL", {}, "__BASE_URL"),
        (None, {"RELAY_PROVIDERS__ADYEN__API_VERSION": "v72"}, "tested: v71"),
        (None, {"RELAY_PROVIDERS__ADYEN__API_VERSION": "71"}, "not like v71"),
    ],
)
def test_bad_adyen_settings_name_the_variable_and_the_rule(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    drop: str | None,
    extra: dict[str, str],
    expected: str,
) -> None:
    values = _adyen(tmp_path, **extra)
    if drop:
        del values[drop]
    _env(monkeypatch, **values)
    with pytest.raises(ConfigError) as info:
        load_settings()
    (line,) = info.value.lines
    assert line.startswith("RELAY_PROVIDERS__ADYEN") and expected in line, line


def test_hmac_keys_must_be_hex(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    values = _adyen(tmp_path)
    Path(values["RELAY_PROVIDERS__ADYEN__HMAC_KEYS_FILE"]).write_text("not-hex\n")
    _env(monkeypatch, **values)
    with pytest.raises(ConfigError, match="hex keys, one per line"):
        load_settings()


@pytest.mark.anyio
async def test_an_untested_version_starts_with_the_override_and_says_so(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _env(
        monkeypatch,
        **_adyen(
            tmp_path,
            RELAY_PROVIDERS__ADYEN__API_VERSION="v72",
            RELAY_PROVIDERS__ADYEN__ALLOW_UNTESTED_API_VERSION="true",
        ),
    )
    adapter = build_adapter("adyen", load_settings().providers["adyen"])
    assert isinstance(adapter, AdyenAdapter) and adapter.untested_version
    await adapter.aclose()


def test_an_adyen_webhook_endpoint_and_the_confirmation_deadline_come_from_settings(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from provider_adapters.adyen_notifications import AdyenNotifications
    from provider_adapters.registry import NOTIFICATION_KINDS, build_notification_reader

    keys = tmp_path / "webhook_keys"
    keys.write_text(f"{KEY_B}\n{KEY_A}\n")
    _env(
        monkeypatch,
        **_adyen(tmp_path),
        RELAY_WEBHOOKS__ADYEN__KIND="adyen",
        RELAY_WEBHOOKS__ADYEN__SECRETS_FILE=str(keys),
        RELAY_CONFIRMATION_DEADLINE_SECONDS="600",
    )
    settings = load_settings()
    assert settings.confirmation_deadline_seconds == 600
    endpoint = settings.webhooks["adyen"]
    reader = build_notification_reader("adyen", endpoint.kind, endpoint.resolved_secrets())
    assert isinstance(reader, AdyenNotifications) and reader.acknowledgement == "[accepted]"
    assert "adyen" in NOTIFICATION_KINDS, "relays build inbox readers for Adyen"


def test_an_adyen_webhook_key_that_is_not_hex_is_refused_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    keys = tmp_path / "webhook_keys"
    keys.write_text("whsec_not_an_adyen_key\n")
    _env(
        monkeypatch,
        **_adyen(tmp_path),
        RELAY_WEBHOOKS__ADYEN__KIND="adyen",
        RELAY_WEBHOOKS__ADYEN__SECRETS_FILE=str(keys),
    )
    with pytest.raises(ConfigError) as refused:
        load_settings()
    assert "RELAY_WEBHOOKS__ADYEN" in str(refused.value) and "hex" in str(refused.value)


def test_a_confirmation_deadline_of_zero_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _env(monkeypatch, **_adyen(tmp_path), RELAY_CONFIRMATION_DEADLINE_SECONDS="0")
    with pytest.raises(ConfigError) as refused:
        load_settings()
    assert "RELAY_CONFIRMATION_DEADLINE_SECONDS" in str(refused.value)
