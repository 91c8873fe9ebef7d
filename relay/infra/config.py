"""Settings from the environment (prefix ``RELAY_``, nested keys with ``__``) and files.

A bad value stops start-up with one line per bad variable, naming it
(:func:`load_settings` raises :class:`ConfigError`): every rule between settings is
checked and each one broken is a line, so one run shows every problem. An empty variable
counts as unset (``RELAY_AMQP_URL=`` is no broker), the environment's usual convention. A
``RELAY_*`` variable the relay does not know (a typo like ``RELAY_BATCHSIZE``) is logged
as a warning naming the nearest known one (:func:`unknown_variables`). Secrets can come
from files: any ``*_FILE`` setting, or a ``secrets_dir`` (Kubernetes secret mounts) via
``RELAY_SECRETS_DIR``.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from relay.infra.redaction import register_secret, url_passwords

__all__ = [
    "ConfigError",
    "ProviderSettings",
    "Settings",
    "UnknownVariable",
    "WebhookEndpointSettings",
    "find_unknown_variables",
    "load_settings",
    "unknown_variables",
]

PositiveInt = Annotated[int, Field(ge=1)]
# AMQP exchange and queue names the relay declares or publishes to.
_AMQP_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,255}")


class ConfigError(ValueError):
    """Configuration is invalid; ``lines`` has one entry per bad variable."""

    code = "invalid_configuration"

    def __init__(self, lines: list[str]) -> None:
        self.lines = lines
        super().__init__("invalid configuration:\n" + "\n".join(lines))


class _BrokenRules(ValueError):
    """Every cross-field rule the settings break, one line each (pydantic reports one
    error per validator; :func:`load_settings` unpacks this one into its lines)."""

    def __init__(self, lines: list[str]) -> None:
        self.lines = lines
        super().__init__("; ".join(lines))


class ProviderSettings(BaseModel):
    """One provider lane: ``RELAY_PROVIDERS__<NAME>__<FIELD>``."""

    kind: Literal["stripe", "adyen"] = Field(
        "stripe", description="Adapter: stripe or adyen (each also drives its fake)."
    )
    base_url: str = Field(
        "https://api.stripe.com",
        description="Provider API address (Adyen: required, e.g. https://checkout-test.adyen.com "
        "or your live prefix URL; the API version is appended).",
    )
    api_key: SecretStr | None = Field(None, description="API key (prefer api_key_file).")
    api_key_file: Path | None = Field(None, description="File holding the API key.")
    merchant_account: str | None = Field(
        None, description="Adyen: the merchant account every request names (required)."
    )
    api_version: str | None = Field(
        None,
        description="The provider API version the adapter pins: Stripe's Stripe-Version "
        "header (unset: 2026-10-28.endive), Adyen's Checkout version in the path (unset: "
        "v71); a version the adapter was not tested with is refused at start.",
    )
    allow_untested_api_version: bool = Field(
        False,
        description="Start with an api_version the adapter was not tested against (logged, "
        "shown by `status` and the outbox_relay_provider_api_version metric).",
    )
    return_url: str = Field(
        "https://outbox-relay.invalid/return",
        description="Adyen: the returnUrl /payments requires (no shopper is redirected).",
    )
    hmac_keys_file: Path | None = Field(
        None,
        description="Adyen webhooks: file with the active HMAC keys, hex, one per line (two "
        "while a key is rotated).",
    )
    concurrency: PositiveInt = Field(32, description="Calls in flight at once on this lane.")
    claim_ahead: int = Field(
        0,
        ge=0,
        description="Intents claimed beyond the lane's call slots, waiting in claim order "
        "for one: calls never wait for a claim, and claims come in larger batches. One "
        "that waited until less than the call deadline is left of its lease is handed "
        "back unattempted.",
    )
    connect_timeout_ms: PositiveInt = Field(3_000, description="TCP/TLS connect timeout.")
    timeout_ms: PositiveInt = Field(10_000, description="Read timeout of one provider call.")
    rate_limit_per_second: float | None = Field(
        None, gt=0, description="Calls per second on this lane (token bucket); unset: no limit."
    )
    rate_limit_burst: PositiveInt = Field(
        10, description="Calls that may start at once after a quiet spell (bucket size)."
    )
    breaker_failure_threshold: PositiveInt = Field(
        5, description="Consecutive retryable/ambiguous outcomes that open the breaker."
    )
    breaker_cooldown_seconds: float = Field(
        30.0, gt=0, description="How long an open breaker stops calls before probing."
    )
    breaker_half_open_probes: PositiveInt = Field(
        1, description="Calls let through at once while half-open."
    )

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _one_key_source(self) -> ProviderSettings:
        if self.api_key is None and self.api_key_file is None:
            raise ValueError("set __API_KEY or __API_KEY_FILE (a mounted secret)")
        if self.api_key_file is not None and not self.api_key_file.is_file():
            raise ValueError(f"API_KEY_FILE {self.api_key_file} is not a readable file")
        return self

    @model_validator(mode="after")
    def _api_version_tested(self) -> ProviderSettings:
        """The pinned API version: spelt as the provider spells it, and one the adapter was
        tested with unless ``allow_untested_api_version`` says otherwise."""
        if self.api_version is None:
            return self
        from provider_adapters.registry import api_versions

        versions = api_versions(self.kind)
        if not re.fullmatch(versions.pattern, self.api_version):
            raise ValueError(f"API_VERSION {self.api_version!r} is not like {versions.example}")
        if self.api_version not in versions.tested and not self.allow_untested_api_version:
            raise ValueError(
                f"API_VERSION {self.api_version} was not tested with the {self.kind} adapter "
                f"(tested: {', '.join(versions.tested)}); set "
                "__ALLOW_UNTESTED_API_VERSION=true to start anyway"
            )
        return self

    @model_validator(mode="after")
    def _adyen_needs(self) -> ProviderSettings:
        if self.kind != "adyen":
            return self
        if "base_url" not in self.model_fields_set:
            raise ValueError(
                "set __BASE_URL for an adyen provider (https://checkout-test.adyen.com for "
                "test, the live URL with your prefix for live)"
            )
        if not self.merchant_account:
            raise ValueError("set __MERCHANT_ACCOUNT for an adyen provider")
        if self.hmac_keys_file is not None:
            if not self.hmac_keys_file.is_file():
                raise ValueError(f"HMAC_KEYS_FILE {self.hmac_keys_file} is not a readable file")
            keys = self.resolved_hmac_keys()
            if not keys or not all(re.fullmatch(r"(?:[0-9A-Fa-f]{2}){16,}", k) for k in keys):
                raise ValueError(
                    f"HMAC_KEYS_FILE {self.hmac_keys_file} must hold hex keys, one per line"
                )
        return self

    def resolved_hmac_keys(self) -> list[str]:
        """The active Adyen HMAC keys (hex), from ``hmac_keys_file``; empty when unset."""
        if self.hmac_keys_file is None:
            return []
        lines = self.hmac_keys_file.read_text().splitlines()
        return [line.strip() for line in lines if line.strip() and not line.startswith("#")]

    def resolved_api_key(self) -> str:
        if self.api_key_file is not None:
            return self.api_key_file.read_text().strip()
        assert self.api_key is not None
        return self.api_key.get_secret_value()


class WebhookEndpointSettings(BaseModel):
    """One receiving route, ``/webhooks/<name>``: ``RELAY_WEBHOOKS__<NAME>__<FIELD>``. The
    name is the provider instance whose payments its notifications touch."""

    kind: Literal["stripe", "adyen"] = Field(
        "stripe", description="Notification format: stripe or adyen."
    )
    secrets: list[SecretStr] = Field(
        default_factory=list,
        description="Active signing secrets (Stripe: whsec_...; Adyen: HMAC keys, hex), "
        "JSON list; prefer secrets_file.",
    )
    secrets_file: Path | None = Field(
        None,
        description="File with one active signing secret per line: two lines while a "
        "secret is rolled.",
    )

    @model_validator(mode="after")
    def _some_secret(self) -> WebhookEndpointSettings:
        if self.secrets_file is not None and not self.secrets_file.is_file():
            raise ValueError(f"SECRETS_FILE {self.secrets_file} is not a readable file")
        if not self.secrets and self.secrets_file is None:
            raise ValueError("set __SECRETS_FILE (a mounted secret) or __SECRETS")
        if self.kind == "adyen":
            keys = self.resolved_secrets()
            if not keys or not all(re.fullmatch(r"(?:[0-9A-Fa-f]{2}){16,}", k) for k in keys):
                raise ValueError(
                    "an adyen endpoint's secrets are its HMAC keys: hex, one per line, as the "
                    "Customer Area shows them (keep the old key beside the new one while rotating)"
                )
        return self

    def resolved_secrets(self) -> list[str]:
        """Every active secret, the file's lines first; blank lines and ``#`` comments skipped."""
        found: list[str] = []
        if self.secrets_file is not None:
            for line in self.secrets_file.read_text().splitlines():
                if line.strip() and not line.lstrip().startswith("#"):
                    found.append(line.strip())
        found.extend(s.get_secret_value() for s in self.secrets)
        return found


class Settings(BaseSettings):
    """Every knob of the relay; the README's configuration table mirrors this class."""

    model_config = SettingsConfigDict(
        env_prefix="RELAY_",
        env_nested_delimiter="__",
        case_sensitive=False,
        extra="ignore",
        # RELAY_X= means unset, as everywhere else in the environment's conventions.
        env_ignore_empty=True,
    )

    database_url: SecretStr | None = Field(
        None, description="PostgreSQL URL (libpq). Unset: only `demo` starts its own database."
    )
    database_url_file: Path | None = Field(None, description="File holding the database URL.")
    instance_name: str = Field(
        default_factory=lambda: f"{os.uname().nodename}:{os.getpid()}",
        description="Who this relay is in claimed_by and logs.",
    )
    batch_size: PositiveInt = Field(100, le=5_000, description="Most intents per claim.")
    max_in_flight: PositiveInt = Field(256, description="Claimed intents held at once, all lanes.")
    lease_seconds: float = Field(60.0, gt=0, description="Lease of a claim before re-drive.")
    max_attempts: PositiveInt = Field(8, description="Attempts before an intent is dead.")
    backoff_base_seconds: float = Field(1.0, gt=0, description="First retry delay bound.")
    backoff_cap_seconds: float = Field(300.0, gt=0, description="Largest retry delay.")
    poll_interval_seconds: float = Field(
        1.0, gt=0, description="Polling fallback when no NOTIFY arrives (jittered)."
    )
    poll_max_interval_seconds: float = Field(
        5.0, gt=0, description="Idle polling backs off up to this interval."
    )
    completer_batch_size: PositiveInt = Field(500, description="Most outcomes per write-back.")
    completer_flush_ms: PositiveInt = Field(10, description="Longest wait to fill a write-back.")
    completer_writers: PositiveInt = Field(
        2,
        le=8,
        description="Write-back transactions in flight at once (one pool connection each; "
        "at most RELAY_DB_POOL_SIZE - 1, so claims keep a connection).",
    )

    db_pool_size: PositiveInt = Field(4, description="Connections in the relay's pool.")
    http_host: str = Field("0.0.0.0", description="Address of /metrics, /healthz, /readyz.")
    http_port: int = Field(
        9108, ge=0, le=65535, description="Port of /metrics, /healthz, /readyz; 0: off."
    )
    retention_hours: float = Field(
        168.0,
        ge=24.0,
        description="Terminal intents older than this move to outbox.payment_intents_archive.",
    )
    retention_batch_size: PositiveInt = Field(
        1_000, le=100_000, description="Rows moved per archive statement."
    )
    retention_interval_seconds: float = Field(
        60.0, gt=0, description="Pause between archive sweeps when nothing is due."
    )
    depth_interval_seconds: float = Field(
        5.0,
        ge=0,
        description="Queue-depth gauges are sampled from the database this often (jittered); "
        "0: not sampled.",
    )
    flow_sweep_interval_seconds: float = Field(
        5.0,
        ge=0,
        le=3600,
        description="Flow deadlines (sql/0083) and the per-provider policy for authorisations "
        "no flow covers (sql/0084) are enforced this often (jittered); a deadline is acted on "
        "at most about this late. 0: this relay does not sweep (another relay of the fleet may).",
    )
    guard_rails_interval_seconds: float = Field(
        15.0,
        ge=0,
        le=3600,
        description="Guard rails of canary splits (sql/0067) are evaluated from the database "
        "this often (jittered); a canary worse than its baseline is rolled back to weight 0. "
        "0: this relay does not evaluate them (another relay of the fleet may).",
    )
    heartbeat_interval_seconds: float = Field(
        10.0,
        gt=0,
        le=3600,
        description="This relay reports the providers it serves (outbox.relay_instances) this "
        "often (jittered); always on: `status` and the unserved gauge read it, and a report "
        "older than max(3 intervals, 30 s) counts as a relay that is gone.",
    )
    shutdown_grace_seconds: float = Field(
        30.0,
        ge=0,
        description="The whole shutdown from the first SIGTERM: drain, lease releases and the "
        "final flush (which keeps the last min(5 s, grace/4)).",
    )
    log_format: Literal["auto", "json", "console"] = Field("auto", description="Log format.")
    janitor_enabled: bool = Field(
        True, description="Settle dead intents by looking them up at the provider."
    )
    janitor_interval_seconds: float = Field(
        60.0, gt=0, description="Pause between janitor passes when nothing is due (jittered)."
    )
    janitor_batch_size: PositiveInt = Field(
        50, le=1_000, description="Dead intents looked up per janitor pass."
    )
    janitor_backoff_base_seconds: float = Field(
        60.0, gt=0, description="Delay before the second lookup of an intent; doubles each time."
    )
    janitor_backoff_cap_seconds: float = Field(
        21_600.0, gt=0, description="Longest delay between two lookups of one intent."
    )
    janitor_not_found_confirmations: PositiveInt = Field(
        3, description="Lookups without a trace before an intent is recorded as no_effect."
    )
    reconcile_fee_bps: int | None = Field(
        None,
        ge=0,
        le=10_000,
        description="Expected provider fee on captured funds, in basis points; unset: only "
        "refunds (which carry no fee) are checked for fees.",
    )
    reconcile_fee_fixed_minor: int = Field(
        0, ge=0, description="Expected fixed fee per capture, in the capture's minor units."
    )
    reconcile_fee_tolerance_minor: int = Field(
        0, ge=0, description="Fee difference tolerated before it is an unexpected_fee."
    )
    fx_ecb_url: str | None = Field(
        None,
        description="Fetch the ECB's daily reference rates (eurofxref-daily.xml format) from "
        "this URL every fx_ecb_interval_seconds into outbox.fx_rates; unset: no fetch.",
    )
    fx_ecb_interval_seconds: float = Field(
        3_600.0, ge=60, description="Pause between two fetches of RELAY_FX_ECB_URL (jittered)."
    )
    reconcile_fx_tolerance_bps: int = Field(
        200,
        ge=0,
        le=10_000,
        description="A charge settled in another currency may differ from our conversion "
        "by this many basis points before it is an fx_rate_drift exception (Stripe adds "
        "1-2 % to its conversions).",
    )
    reconcile_slack_seconds: float = Field(
        3_600.0,
        ge=0,
        description="Reconciliation also reads this far either side of its window, so an "
        "item booked just across the boundary is matched, not reported missing.",
    )
    providers: dict[str, ProviderSettings] = Field(default_factory=dict)
    webhooks: dict[str, WebhookEndpointSettings] = Field(default_factory=dict)
    webhooks_host: str = Field("0.0.0.0", description="Address `webhooks serve` listens on.")
    webhooks_port: int = Field(
        9110, ge=1, le=65535, description="Port of /webhooks/<name>, /metrics, /healthz, /readyz."
    )
    webhooks_max_body_bytes: PositiveInt = Field(
        262_144,
        le=4_194_304,
        description="Largest notification body accepted; a larger one is refused with 413.",
    )
    webhooks_tolerance_seconds: PositiveInt = Field(
        300, le=86_400, description="Oldest signature timestamp accepted (Stripe's default)."
    )
    webhooks_apply: bool = Field(
        True, description="Relays apply the inbox's notifications of the providers they serve."
    )
    webhooks_apply_batch_size: PositiveInt = Field(
        50, le=1_000, description="Notifications claimed per apply round."
    )
    webhooks_apply_concurrency: PositiveInt = Field(
        2,
        le=16,
        description="Notifications applied at once, each in a transaction on a pool "
        "connection; at most RELAY_DB_POOL_SIZE - 1 - the write-back writers are used, so "
        "the claim loop keeps a connection.",
    )
    confirmation_deadline_seconds: float = Field(
        86_400.0,
        gt=0,
        description="How long an intent the provider accepted may await its confirmation "
        "(Adyen's modification webhooks, a Stripe refund pending) before a "
        "confirmation_overdue exception asks an operator; a late confirmation still settles "
        "it and resolves the exception.",
    )
    webhooks_retention_hours: float = Field(
        744.0,
        ge=72.0,
        description="Applied notifications are deleted this long after applying; longer than "
        "the providers' retry windows (Stripe 3 days, Adyen 30) so a late duplicate is "
        "still recognised.",
    )
    amqp_url: SecretStr | None = Field(
        None, description="RabbitMQ URL (amqp:// or amqps://). Unset: no publisher."
    )
    amqp_url_file: Path | None = Field(None, description="File holding the RabbitMQ URL.")
    events_exchange: str = Field(
        "outbox.events", description="Topic exchange for events without their own exchange."
    )
    events_declare_topology: bool = Field(
        False, description="Declare the events exchange (durable topic) at connect."
    )
    events_example_queue: str | None = Field(
        None, description="Also declare this quorum queue, bound to the exchange with '#'."
    )
    publish_batch_size: PositiveInt = Field(
        500, le=5_000, description="Most events claimed and marked per publish round."
    )
    publish_window: PositiveInt = Field(
        100, le=5_000, description="Most publishes awaiting a broker confirm at once."
    )
    publish_timeout_seconds: float = Field(
        15.0, gt=0, description="Connect and confirm timeout; past it the connection is renewed."
    )
    amqp_reconnect_base_seconds: float = Field(
        0.5, gt=0, description="First reconnect delay bound (full jitter)."
    )
    amqp_reconnect_cap_seconds: float = Field(30.0, gt=0, description="Largest reconnect delay.")

    def effective_completer_writers(self) -> int:
        """Writers the relay runs: claims keep one pool connection for themselves."""
        return max(1, min(self.completer_writers, self.db_pool_size - 1))

    def effective_webhooks_apply_concurrency(self) -> int:
        """Applies the relay runs at once. An apply holds its connection for its whole
        transaction, which may wait on a payment's lock; the claim loop keeps one
        connection and the write-back writers theirs, and the applies get what is left
        (at least one: the pool-size rule below makes room for it)."""
        spare = self.db_pool_size - 1 - self.effective_completer_writers()
        return max(1, min(self.webhooks_apply_concurrency, spare))

    @field_validator("events_exchange", "events_example_queue")
    @classmethod
    def _amqp_name(cls, value: str | None) -> str | None:
        if value is not None and not _AMQP_NAME.fullmatch(value):
            raise ValueError("must be 1-255 characters of letters, digits, '-', '_', '.', ':'")
        return value

    @model_validator(mode="after")
    def _rules_between_settings(self) -> Settings:
        """Check every rule; report all that are broken together, not the first only."""
        broken = [*self._event_rules(), *self._retry_and_lease_rules()]
        if broken:
            raise _BrokenRules(broken)
        return self

    def _event_rules(self) -> list[str]:
        broken: list[str] = []
        if self.events_example_queue and not self.events_declare_topology:
            broken.append(
                "RELAY_EVENTS_EXAMPLE_QUEUE needs RELAY_EVENTS_DECLARE_TOPOLOGY=true "
                "(the queue is bound to the exchange the relay declares)"
            )
        if self.amqp_reconnect_cap_seconds < self.amqp_reconnect_base_seconds:
            broken.append(
                "RELAY_AMQP_RECONNECT_CAP_SECONDS must be >= RELAY_AMQP_RECONNECT_BASE_SECONDS"
            )
        publishing = self.amqp_url is not None or self.amqp_url_file is not None
        if publishing and self.publish_timeout_seconds >= self.lease_seconds:
            broken.append(
                f"RELAY_PUBLISH_TIMEOUT_SECONDS ({self.publish_timeout_seconds:g}) must stay "
                f"below RELAY_LEASE_SECONDS ({self.lease_seconds:g} s), the lease on a held event"
            )
        try:
            url = self.resolved_amqp_url()
        except ValueError as exc:
            broken.append(str(exc))
        else:
            if url is not None and not url.startswith(("amqp://", "amqps://")):
                broken.append("RELAY_AMQP_URL must start with amqp:// or amqps://")
        return broken

    def resolved_amqp_url(self) -> str | None:
        if self.amqp_url_file is not None:
            if not self.amqp_url_file.is_file():
                raise ValueError(f"RELAY_AMQP_URL_FILE {self.amqp_url_file} is not a readable file")
            return self.amqp_url_file.read_text().strip() or None
        return self.amqp_url.get_secret_value() if self.amqp_url else None

    @field_validator("providers")
    @classmethod
    def _lowercase_names(cls, value: dict[str, ProviderSettings]) -> dict[str, ProviderSettings]:
        return {name.lower(): settings for name, settings in value.items()}

    @field_validator("webhooks")
    @classmethod
    def _route_names(
        cls, value: dict[str, WebhookEndpointSettings]
    ) -> dict[str, WebhookEndpointSettings]:
        lowered = {name.lower(): endpoint for name, endpoint in value.items()}
        for name in lowered:
            if not re.fullmatch(r"[a-z][a-z0-9_]{0,62}", name):
                raise ValueError(f"{name!r} is not a lower-case identifier (it names a route)")
        return lowered

    def _retry_and_lease_rules(self) -> list[str]:
        broken: list[str] = []
        if self.webhooks_apply and self.db_pool_size < 3:
            # One for claims, one for write-backs, one for an apply: fewer, and an apply
            # waiting on a payment's lock could take the connection the claim loop needs.
            broken.append(
                f"RELAY_DB_POOL_SIZE ({self.db_pool_size}) must be at least 3 while "
                "RELAY_WEBHOOKS_APPLY is on (claims, write-backs and applies each keep a "
                "connection); raise it, or set RELAY_WEBHOOKS_APPLY=false on this relay"
            )
        if self.backoff_cap_seconds < self.backoff_base_seconds:
            broken.append("RELAY_BACKOFF_CAP_SECONDS must be >= RELAY_BACKOFF_BASE_SECONDS")
        if self.janitor_backoff_cap_seconds < self.janitor_backoff_base_seconds:
            broken.append(
                "RELAY_JANITOR_BACKOFF_CAP_SECONDS must be >= RELAY_JANITOR_BACKOFF_BASE_SECONDS"
            )
        for name, provider in self.providers.items():
            if provider.timeout_ms / 1000 >= self.lease_seconds:
                broken.append(
                    f"RELAY_PROVIDERS__{name.upper()}__TIMEOUT_MS ({provider.timeout_ms}) "
                    f"must stay below RELAY_LEASE_SECONDS ({self.lease_seconds:g} s) "
                    "so a live call never outlasts its lease"
                )
        return broken

    def resolved_database_url(self) -> str | None:
        if self.database_url_file is not None:
            return self.database_url_file.read_text().strip()
        return self.database_url.get_secret_value() if self.database_url else None

    def secret_values(self) -> list[str]:
        """Every configured secret: provider API keys and the database's and broker's
        passwords. :func:`load_settings` registers them for redaction."""
        values: list[str] = []
        for endpoint in self.webhooks.values():
            with contextlib.suppress(OSError):
                values.extend(endpoint.resolved_secrets())
        for read, is_url in (
            *((provider.resolved_api_key, False) for provider in self.providers.values()),
            (self.resolved_database_url, True),
            (self.resolved_amqp_url, True),
        ):
            try:
                value = read()
            except (OSError, ValueError):
                continue  # an unreadable file: start-up reports it, naming the file
            if value:
                values.extend(url_passwords(value) if is_url else [value])
        return values


def _variable_name(loc: tuple[int | str, ...]) -> str:
    return "RELAY_" + "__".join(str(part).upper() for part in loc)


_PREFIX = "RELAY_"
_PROVIDERS = f"{_PREFIX}PROVIDERS"
_WEBHOOKS = f"{_PREFIX}WEBHOOKS"
# Read by the relay outside Settings: the secrets mount and the operator's name.
_READ_ELSEWHERE = frozenset({"RELAY_SECRETS_DIR", "RELAY_OPERATOR"})
_log = logging.getLogger(__name__)
_warned: set[str] = set()


def _known_names() -> frozenset[str]:
    nested = ("providers", "webhooks")
    names = {_PREFIX + name.upper() for name in Settings.model_fields if name not in nested}
    return frozenset(names | _READ_ELSEWHERE | {_PROVIDERS, _WEBHOOKS})


@dataclass(frozen=True)
class UnknownVariable:
    """A ``RELAY_*`` variable the relay does not read, and the known name nearest to it."""

    name: str
    nearest: str | None

    def line(self) -> str:
        """The warning as one plain line (the CLI commands print it on stderr)."""
        hint = (
            f"did you mean {self.nearest}?"
            if self.nearest
            else "see the README's configuration table"
        )
        return f"warning: {self.name} is not a setting of the relay and is ignored; {hint}"


def _unknown(name: str, known: frozenset[str]) -> UnknownVariable | None:
    """The unknown variable ``name``, or None when the relay reads it."""
    upper = name.upper()
    if upper.startswith(f"{_PREFIX}TEST_"):
        return None  # the test suite's own settings
    if upper in known or (upper.endswith("_FILE") and upper.removesuffix("_FILE") in known):
        return None
    parts = upper.split("__")
    if parts[0] in (_PROVIDERS, _WEBHOOKS) and len(parts) in (2, 3):
        if len(parts) == 2:
            return None  # RELAY_PROVIDERS__<NAME>: one provider as JSON
        model = ProviderSettings if parts[0] == _PROVIDERS else WebhookEndpointSettings
        keys = {key.upper() for key in model.model_fields}
        if parts[2] in keys:
            return None
        prefix = f"{parts[0]}__{parts[1]}__"
        candidates = [prefix + key for key in sorted(keys)]
    else:
        candidates = sorted(known)
    nearest = difflib.get_close_matches(upper, candidates, n=1)
    return UnknownVariable(name, nearest[0] if nearest else None)


def find_unknown_variables(environ: Mapping[str, str]) -> list[UnknownVariable]:
    """Every ``RELAY_*`` variable the relay does not read, by name, each with the nearest
    known one: a misspelt setting is otherwise silently ignored. Nested provider keys
    (``RELAY_PROVIDERS__<NAME>__<KEY>``) are checked by their key, ``*_FILE`` variants of
    known settings and ``RELAY_TEST_*`` are known."""
    known = _known_names()
    found = (_unknown(name, known) for name in sorted(environ) if name.upper().startswith(_PREFIX))
    return [unknown for unknown in found if unknown is not None]


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """:func:`find_unknown_variables` as plain warning lines."""
    return [unknown.line() for unknown in find_unknown_variables(environ)]


def _warn_unknown_variables() -> None:
    # Logged, once per process: before logging is set up, Python prints a warning's bare
    # text on stderr, so every command shows it above its output.
    for line in unknown_variables(os.environ):
        if line not in _warned:
            _warned.add(line)
            _log.warning(line)


def _settings(**overrides: Any) -> Settings:
    secrets_dir = os.environ.get("RELAY_SECRETS_DIR")
    if secrets_dir:
        return Settings(_secrets_dir=secrets_dir, **overrides)  # type: ignore[call-arg]
    return Settings(**overrides)


def _problems(exc: ValidationError) -> tuple[list[str], set[str]]:
    """One line per problem, and the top-level settings whose own value is bad."""
    lines: list[str] = []
    failed: set[str] = set()
    for error in exc.errors():
        broken = error.get("ctx", {}).get("error")
        if isinstance(broken, _BrokenRules):
            lines.extend(broken.lines)
            continue
        loc = tuple(error["loc"])
        if loc:
            failed.add(str(loc[0]))
        given = error.get("input")
        secret = any("key" in str(p).lower() or "url" in str(p).lower() for p in loc)
        shown = "" if secret or isinstance(given, dict) else f" (got {given!r})"
        message = str(error["msg"]).removeprefix("Value error, ")
        lines.append(f"{_variable_name(loc)}: {message}{shown}" if loc else message)
    return lines, failed


def load_settings(*, warn_unknown: bool = True, **overrides: Any) -> Settings:
    """Read settings; raise :class:`ConfigError` naming each bad variable, after warning
    (plain lines on stderr) about every RELAY_* variable the relay does not know, unless
    ``warn_unknown`` is false: `run` logs them itself once its log format is known."""
    if warn_unknown:
        _warn_unknown_variables()
    try:
        settings = _settings(**overrides)
    except ValidationError as exc:
        lines, failed = _problems(exc)
        if failed:
            # Pydantic checks rules between settings only once every value is valid, so a
            # bad value would hide them until it is fixed. Check them again with the bad
            # values at their defaults, keeping only the rules that name none of them.
            defaults = {
                name: Settings.model_fields[name].get_default(call_default_factory=True)
                for name in failed
                if name in Settings.model_fields
            }
            try:
                _settings(**{**overrides, **defaults})
            except ValidationError as again:
                bad_names = {_variable_name((name,)) for name in failed}
                lines.extend(
                    line
                    for line in _problems(again)[0]
                    if line not in lines and not any(name in line for name in bad_names)
                )
        raise ConfigError(lines) from None
    # From now on these exact values are masked in every log line, stored error message,
    # metric label and CLI error, whatever shape they have and wherever they appear.
    register_secret(*settings.secret_values())
    return settings
