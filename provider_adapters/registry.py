"""Build the adapter a provider's settings ask for."""

from __future__ import annotations

from typing import Protocol

from provider_adapters.base import ProviderAdapter

__all__ = ["AdapterSpec", "build_adapter"]


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
        from provider_adapters.stripe import StripeAdapter

        return StripeAdapter(
            name=name,
            api_key=spec.resolved_api_key(),
            base_url=spec.base_url,
            connect_timeout_seconds=spec.connect_timeout_ms / 1000,
            read_timeout_seconds=spec.timeout_ms / 1000,
            max_connections=spec.concurrency,
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
