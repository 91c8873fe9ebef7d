"""The relay's state at a glance: queue depth by provider and status, oldest pending age,
the running relays and which providers none of them serves, the provider API versions they
pin (an untested one, run under ALLOW_UNTESTED_API_VERSION, named) and the ones the registry
pins (sql/0070; a running relay that differs named), dead intents and unpublished result
events.

"oldest pending" is how long the oldest due pending intent has waited for a claim
(``now - available_at``, by the database's clock): the same figure as the
``outbox_relay_oldest_pending_age_seconds`` gauge. A provider is *unserved* when it has
waiting intents (blocked, pending, in flight) and no live relay reports serving it
(``outbox.relay_instances``, sql/0018, statement ``relay_instances``): nobody will claim
them. The rule is :func:`relay.domain.serving.unserved_intents`, which the
``outbox_relay_unserved_intents`` gauge applies too. The command
line is relay/cli/status.py.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import psycopg

from relay.domain.guard_rails import rolled_back
from relay.domain.intents import WAITING_STATUSES
from relay.domain.serving import unserved_intents
from relay.domain.version_pins import pin_mismatches
from relay.infra.queries import QUERIES
from relay.operations.providers import list_guards

__all__ = ["GuardRailState", "ProviderDepth", "RelayInstance", "Status", "collect_status"]


@dataclass
class ProviderDepth:
    """One provider's intents: a count per status, and the oldest due pending one's wait."""

    counts: dict[str, int] = field(default_factory=dict)
    oldest_pending_seconds: float | None = None
    relays: int = 0  # live relays that serve this provider

    @property
    def waiting(self) -> int:
        """Intents that wait for a relay of this provider (blocked, pending, in flight)."""
        return sum(self.counts.get(status, 0) for status in WAITING_STATUSES)


@dataclass
class RelayInstance:
    """One relay as it last reported itself (relay/service/instances.py)."""

    instance: str
    providers: list[str]
    heartbeat_age_seconds: float
    live: bool  # heartbeat within max(3 of its intervals, 30 s)
    # The API version it pins per provider (sql/0045): {"<provider>": {"kind": ...,
    # "version": ..., "tested": bool}}; empty for a relay that does not report them.
    api_versions: dict[str, dict[str, Any]] = field(default_factory=dict)

    def pinned_versions(self) -> dict[str, str]:
        """The version it sends, per provider name it reported one for."""
        return {
            provider: str(v["version"])
            for provider, v in self.api_versions.items()
            if isinstance(v, dict) and v.get("version") is not None
        }

    def untested_versions(self) -> list[tuple[str, str]]:
        """(provider, version) this relay runs without its adapter having been tested."""
        return sorted(
            (provider, str(v.get("version")))
            for provider, v in self.api_versions.items()
            if isinstance(v, dict) and v.get("tested") is False
        )


@dataclass
class GuardRailState:
    """One guard rail (sql/0067) as `status` shows it: the canary's weight now and the last
    automatic rollback (when, by which relay, why)."""

    rule: str
    canary: str
    baseline: str
    enabled: bool
    canary_weight: int | None  # None: the canary is no longer a target of the rule
    rolled_back_at: str | None  # ISO 8601, UTC
    rolled_back_by: str | None
    rollback_reason: str | None

    @property
    def rolled_back(self) -> bool:
        """The canary is at 0 because a relay rolled it back (no one raised it since)."""
        return rolled_back(self.rolled_back_at, self.canary_weight)


@dataclass
class Status:
    schema_version: str | None  # the latest applied migration, e.g. "0015"
    providers: dict[str, ProviderDepth]
    dead_letters: int
    unpublished_events: int
    oldest_unpublished_event_seconds: float
    relays: list[RelayInstance] = field(default_factory=list)
    # Providers with waiting intents that no live relay serves, by name.
    unserved_providers: list[str] = field(default_factory=list)
    # Registered, enabled providers (sql/0050) that no live relay serves: new payments may
    # be sent to them (named or routed) and would wait.
    registered_unserved: list[str] = field(default_factory=list)
    # The API version the registry pins per provider name, where it records one (sql/0070).
    registered_api_versions: dict[str, str] = field(default_factory=dict)
    # Live relays whose pinned version differs from the registry's (the registry changed
    # after they started): {"relay", "provider", "relay_version", "registry_version"}.
    api_version_mismatches: list[dict[str, str]] = field(default_factory=list)
    # Guard rails of canary splits (sql/0067), by rule.
    guard_rails: list[GuardRailState] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The fields as JSON types, in declaration order (``status --json``)."""
        return asdict(self)


def collect_status(conninfo: str) -> Status:
    """One read of the counts; raises psycopg.errors.UndefinedTable without the schema."""
    with psycopg.connect(conninfo) as conn:
        version = conn.execute(QUERIES["schema_version"]).fetchone()
        rows = conn.execute(QUERIES["status_counts"]).fetchall()
        depth = conn.execute(QUERIES["queue_depth"], {"now": None}).fetchall()
        events = conn.execute(QUERIES["unpublished_events"], {"now": None}).fetchone()
        reported = conn.execute(QUERIES["relay_instances"], {"now": None}).fetchall()
        # Each in a savepoint: an older schema's error must not abort the other reads.
        try:
            with conn.transaction():
                registered = [r[0] for r in conn.execute(QUERIES["registered_enabled_providers"])]
        except psycopg.errors.UndefinedTable:
            registered = []  # a schema before sql/0050: no registry
        try:
            with conn.transaction():
                pins = {
                    name: version
                    for name, _kind, version in conn.execute(
                        QUERIES["registered_api_versions"], {"providers": None}
                    )
                }
        except (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedColumn):
            pins = {}  # a schema before sql/0070: no versions recorded
        try:
            with conn.transaction():
                guards = list_guards(conn)
        except psycopg.errors.UndefinedTable:
            guards = []  # a schema before sql/0067 (or sql/0050): no guard rails
    providers: dict[str, ProviderDepth] = {}
    for provider, status, count, _created in rows:
        providers.setdefault(provider, ProviderDepth()).counts[status] = count
    dead = 0
    for provider, status, count, oldest in depth:
        entry = providers.setdefault(provider, ProviderDepth())
        if status == "pending":
            entry.oldest_pending_seconds = round(float(oldest), 1)
        if status == "dead":
            dead += int(count)
    relays = [
        RelayInstance(
            instance,
            list(served),
            round(float(age), 1),
            bool(live),
            dict(versions) if isinstance(versions, dict) else {},
        )
        for instance, served, _at, age, live, versions in reported
    ]
    for relay in relays:
        for provider in relay.providers if relay.live else ():
            if provider in providers:
                providers[provider].relays += 1
    unserved = sorted(
        unserved_intents(
            ((provider, status, count) for provider, status, count, _created in rows),
            ((relay.providers, relay.live) for relay in relays),
        )
    )
    served = {p for relay in relays if relay.live for p in relay.providers}
    mismatches = [
        {
            "relay": relay.instance,
            "provider": m.provider,
            "relay_version": m.relay_version,
            "registry_version": m.registry_version,
        }
        for relay in relays
        if relay.live
        for m in pin_mismatches(relay.pinned_versions(), pins)
    ]
    unpublished, oldest_event = events if events else (0, 0.0)
    return Status(
        schema_version=version[0] if version else None,
        providers=providers,
        dead_letters=dead,
        unpublished_events=int(unpublished),
        oldest_unpublished_event_seconds=round(float(oldest_event), 1),
        relays=relays,
        unserved_providers=unserved,
        registered_unserved=[p for p in registered if p not in served],
        registered_api_versions=pins,
        api_version_mismatches=mismatches,
        guard_rails=[_guard_state(guard) for guard in guards],
    )


def _guard_state(g: dict[str, Any]) -> GuardRailState:
    at = g["rolled_back_at"]
    return GuardRailState(
        rule=g["rule_name"],
        canary=g["canary"],
        baseline=g["baseline"],
        enabled=bool(g["enabled"]),
        canary_weight=g["canary_weight"],
        rolled_back_at=None if at is None else at.isoformat(timespec="seconds"),
        rolled_back_by=g["rolled_back_by"],
        rollback_reason=g["rollback_reason"],
    )
