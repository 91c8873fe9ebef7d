"""`outbox-relay status`: the figures of relay/operations/status.py, as a table or JSON."""

from __future__ import annotations

import json

from relay.cli.tables import format_seconds, render_table
from relay.domain.version_pins import PinMismatch
from relay.operations.status import Status, collect_status

__all__ = ["print_status", "render_status"]

_COLUMNS = ["blocked", "pending", "in_flight", "succeeded", "failed", "dead"]


def render_status(status: Status) -> str:
    """The status as the text ``outbox-relay status`` prints (no trailing newline)."""
    table = []
    for provider, entry in sorted(status.providers.items()):
        oldest = entry.oldest_pending_seconds
        age = None if oldest is None else format_seconds(oldest)
        table.append([provider, *(entry.counts.get(c, 0) for c in _COLUMNS), entry.relays, age])
    dead = status.dead_letters
    unpublished = status.unpublished_events
    oldest_event = status.oldest_unpublished_event_seconds
    return "\n".join(
        [
            f"schema version {status.schema_version}",
            render_table(["provider", *_COLUMNS, "relays", "oldest pending"], table)
            if table
            else "no intents yet",
            *(_unserved_line(p, status.providers[p].waiting) for p in status.unserved_providers),
            _relays_line(status),
            *(
                f"NOT SERVED {p}: registered and enabled, but no running relay serves it; new "
                f"payments sent to it will wait (serve it, or `outbox-relay providers disable {p}`)"
                for p in status.registered_unserved
                if p not in status.unserved_providers
            ),
            *_version_lines(status),
            *_guard_lines(status),
            f"\ndead intents: {dead}"
            + (" (they block their payments: `outbox-relay dead-letters list`)" if dead else ""),
            f"unpublished events: {unpublished}"
            + (f" (oldest {format_seconds(oldest_event)})" if unpublished else ""),
        ]
    )


def _unserved_line(provider: str, waiting: int) -> str:
    return (
        f"UNSERVED {provider}: no running relay serves it; its {waiting} waiting intent(s) "
        f"stay pending until one does (configure RELAY_PROVIDERS__{provider.upper()}__KIND on "
        'a relay; README "Providers no relay serves")'
    )


def _version_lines(status: Status) -> list[str]:
    """The API versions the live relays pin, per provider, and the registry's (sql/0070);
    one loud line per relay whose version differs from the registry's, and per relay that
    runs a version its adapter was not tested with (README "Moving to a new provider API
    version")."""
    live = [relay for relay in status.relays if relay.live]
    seen: dict[str, dict[str, int]] = {}
    for relay in live:
        for provider, pinned in relay.api_versions.items():
            version = str(pinned.get("version"))
            counts = seen.setdefault(provider, {})
            counts[version] = counts.get(version, 0) + 1
    lines = []
    if status.registered_api_versions:
        lines.append(
            "registry API versions: "
            + ", ".join(f"{p} {v}" for p, v in sorted(status.registered_api_versions.items()))
        )
    for m in status.api_version_mismatches:
        pin = PinMismatch(m["provider"], m["relay_version"], m["registry_version"])
        lines.append(
            f"API VERSION MISMATCH {pin.provider} on relay {m['relay']}: it sends "
            f"{pin.relay_version}, the registry pins {pin.registry_version} (changed after the "
            f"relay started); restart it with {pin.variable}={pin.registry_version}, or correct "
            f"the registry: outbox-relay providers set {pin.provider} "
            f"--api-version {pin.relay_version}"
        )
    if not seen:
        return lines
    parts = []
    for provider, counts in sorted(seen.items()):
        versions = sorted(counts)
        if len(versions) == 1:
            parts.append(f"{provider} {versions[0]}")
        else:
            parts.append(
                provider + " " + " and ".join(f"{v} ({counts[v]} relays)" for v in versions)
            )
    lines.insert(0, "provider API versions: " + ", ".join(parts))
    for relay in live:
        for provider, version in relay.untested_versions():
            tested = relay.api_versions[provider].get("tested_versions") or []
            lines.append(
                f"UNTESTED API VERSION {provider} {version} on relay {relay.instance}: started "
                f"with RELAY_PROVIDERS__{provider.upper()}__ALLOW_UNTESTED_API_VERSION "
                f"(tested: {', '.join(map(str, tested)) or 'unknown'})"
            )
    return lines


def _guard_lines(status: Status) -> list[str]:
    """One line per guard rail; a loud one for a canary a relay rolled back (docs/routing.md,
    "Guard rails"), with when, by which relay and why."""
    lines = []
    for g in status.guard_rails:
        if g.rolled_back:
            lines.append(
                f"GUARD RAIL ROLLED BACK {g.rule}: canary {g.canary} set to 0 at "
                f"{g.rolled_back_at} by {g.rolled_back_by}: {g.rollback_reason} (fix it, then "
                f"`outbox-relay routes weights {g.rule} {g.canary}=N`)"
            )
        elif not g.enabled:
            lines.append(f"guard rail {g.rule}: off (canary {g.canary}, baseline {g.baseline})")
        else:
            weight = "not a target" if g.canary_weight is None else f"weight {g.canary_weight}"
            last = f"; last rollback {g.rolled_back_at}" if g.rolled_back_at else ""
            lines.append(
                f"guard rail {g.rule}: watching canary {g.canary} ({weight}) against "
                f"{g.baseline}{last}"
            )
    return lines


def _relays_line(status: Status) -> str:
    live = [relay for relay in status.relays if relay.live]
    if not live:
        return (
            "running relays: none reported (a relay reports every RELAY_HEARTBEAT_INTERVAL_SECONDS)"
        )
    served = sorted({provider for relay in live for provider in relay.providers})
    return f"running relays: {len(live)} (serving {', '.join(served) or 'no provider'})"


def print_status(conninfo: str, *, as_json: bool = False) -> int:
    """Print the status; exit status 0 (a missing schema: relay/cli/main.py says so)."""
    status = collect_status(conninfo)
    if as_json:
        print(json.dumps(status.to_json(), indent=2))
        return 0
    print(render_status(status))
    return 0
