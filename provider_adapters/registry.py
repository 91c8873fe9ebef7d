"""Build the adapter a provider's settings ask for."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from provider_adapters.base import NotificationReader, ProviderAdapter

__all__ = [
    "NOTIFICATION_KINDS",
    "AdapterSpec",
    "ApiVersions",
    "api_versions",
    "build_adapter",
    "build_notification_reader",
]


@dataclass(frozen=True, slots=True)
class ApiVersions:
    """A provider kind's API versions: the default and every version it was tested with,
    and how its versions are spelt (``pattern``, ``example``)."""

    default: str
    tested: tuple[str, ...]
    pattern: str
    example: str


def api_versions(kind: str) -> ApiVersions:
    """The API versions of an adapter kind (``stripe``, ``adyen``)."""
    if kind == "stripe":
        from provider_adapters import stripe

        return ApiVersions(
            stripe.DEFAULT_API_VERSION,
            stripe.TESTED_API_VERSIONS,
            r"[0-9]{4}-[0-9]{2}-[0-9]{2}(\.[a-z]+)?",
            "2026-10-28.endive",
        )
    if kind == "adyen":
        from provider_adapters import adyen

        return ApiVersions(
            adyen.DEFAULT_API_VERSION, adyen.TESTED_API_VERSIONS, r"v[0-9]{1,3}", "v71"
        )
    raise ValueError(f"unknown provider kind {kind!r}; expected 'stripe' or 'adyen'")


class AdapterSpec(Protocol):
    @property
    def kind(self) -> str: ...
    @property
    def base_url(self) -> str: ...
    @property
    def connect_timeout_ms(self) -> int: ...
    @property
    def timeout_ms(self) -> int: ...
    @property
    def concurrency(self) -> int: ...

    @property
    def merchant_account(self) -> str | None: ...
    @property
    def api_version(self) -> str | None: ...
    @property
    def allow_untested_api_version(self) -> bool: ...
    @property
    def return_url(self) -> str: ...

    def resolved_api_key(self) -> str: ...


def build_adapter(name: str, spec: AdapterSpec) -> ProviderAdapter:
    if spec.kind == "stripe":
        from provider_adapters.stripe import DEFAULT_API_VERSION, StripeAdapter

        return StripeAdapter(
            name=name,
            api_key=spec.resolved_api_key(),
            base_url=spec.base_url,
            connect_timeout_seconds=spec.connect_timeout_ms / 1000,
            read_timeout_seconds=spec.timeout_ms / 1000,
            max_connections=spec.concurrency,
            api_version=spec.api_version or DEFAULT_API_VERSION,
            allow_untested_version=spec.allow_untested_api_version,
        )
    if spec.kind == "adyen":
        from provider_adapters.adyen import DEFAULT_API_VERSION, AdyenAdapter

        return AdyenAdapter(
            name=name,
            api_key=spec.resolved_api_key(),
            merchant_account=spec.merchant_account or "",
            base_url=spec.base_url,
            api_version=spec.api_version or DEFAULT_API_VERSION,
            allow_untested_version=spec.allow_untested_api_version,
            return_url=spec.return_url,
            connect_timeout_seconds=spec.connect_timeout_ms / 1000,
            read_timeout_seconds=spec.timeout_ms / 1000,
            max_connections=spec.concurrency,
        )
    raise ValueError(f"unknown provider kind {spec.kind!r}; expected 'stripe' or 'adyen'")


# Kinds whose stored notifications a relay can apply (both: Adyen's confirm its
# asynchronous outcomes, issue 19).
NOTIFICATION_KINDS = frozenset({"stripe", "adyen"})


def build_notification_reader(
    name: str, kind: str, secrets: Sequence[str] = (), *, tolerance_seconds: int = 300
) -> NotificationReader:
    """The notification reader of a provider kind: it verifies deliveries with ``secrets``
    (Stripe: endpoint secrets; Adyen: HMAC keys, hex) in the receiver, and reads stored ones
    in the relays, which need no secret."""
    if kind == "stripe":
        from provider_adapters.stripe_webhooks import StripeNotifications

        return StripeNotifications(name, secrets, tolerance_seconds=tolerance_seconds)
    if kind == "adyen":
        from provider_adapters.adyen_notifications import AdyenNotifications

        return AdyenNotifications(name, secrets)
    raise ValueError(f"unknown provider kind {kind!r}; expected 'stripe' or 'adyen'")
