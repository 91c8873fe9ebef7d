"""The provider registry and the routing rules, as operators change them (sql/0050, sql/0051).

Every change is one transaction that names its operator and a reason, through the database's
own functions (``outbox.provider_set_v2``, ``outbox.routing_rule_set_v1``), which the chart
uses too; the database writes the hash-chained audit row (who, when, before, after, why) and,
for a rule, bumps its version. A change applies to the next payment's first INSERT: nothing
is cached, so no relay or application restarts. Payments already started keep their
provider. The command line is relay/cli/providers.py.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import psycopg
from psycopg.rows import dict_row

from provider_adapters.registry import api_versions
from relay.domain.routing import Target, split_share
from relay.infra.queries import QUERIES

__all__ = [
    "ApprovalRequested",
    "api_version_untested",
    "apply_declared",
    "approve_request",
    "change_or_request",
    "check_api_version",
    "list_guards",
    "list_providers",
    "list_requests",
    "list_rules",
    "parse_declared",
    "registry_changes",
    "rule_shares",
    "set_four_eyes",
    "set_guard",
    "set_provider",
    "set_rule",
    "set_weights",
]


_NEEDS_APPROVAL = "registry_change_needs_approval"


class ApprovalRequested(Exception):
    """Four eyes are on (sql/0052): the change was recorded as request ``request_id`` for a
    second operator (``outbox-relay registry approve ID``) instead of being applied."""

    def __init__(self, request_id: int, entity: str, name: str) -> None:
        super().__init__(
            f"{entity} {name}: this change needs a second operator (four eyes are on); recorded "
            f"as request {request_id}: another operator, logged in as another database login, "
            f"runs `outbox-relay registry approve {request_id}`"
        )
        self.request_id = request_id


def _record_request(
    conn: psycopg.Connection,
    *,
    operator: str,
    entity: str,
    name: str,
    change: Mapping[str, Any],
    reason: str | None,
) -> int:
    """Record ``change`` for a second operator (sql/0052); the request's id."""
    with conn.transaction():
        row = conn.execute(
            QUERIES["registry_request"],
            {
                "operator": operator,
                "entity": entity,
                "name": name,
                "change": json.dumps(dict(change)),
                "reason": reason,
            },
        ).fetchone()
    assert row is not None
    return int(row[0])


def change_or_request(
    conn: psycopg.Connection,
    statement: str,
    params: Mapping[str, Any],
    *,
    operator: str,
    entity: str,
    name: str,
    change: Mapping[str, Any],
    reason: str | None,
    needs_approval: str = _NEEDS_APPROVAL,
    requested: Callable[[int], Exception] | None = None,
) -> dict[str, Any]:
    """Run one change (``statement``) in its own transaction; the row it returns.

    With four eyes on and a change a second operator must approve, the database refuses
    it by the constraint name ``needs_approval``; ``change`` is then recorded as a request
    (``conn`` in autocommit mode: it is committed) and ``requested(request_id)`` raised
    (default :class:`ApprovalRequested`, the registry's).
    """
    try:
        with conn.transaction():
            row = (
                conn.cursor(row_factory=dict_row)
                .execute(QUERIES[statement], {**params, "operator": operator, "reason": reason})
                .fetchone()
            )
    except psycopg.errors.InsufficientPrivilege as exc:
        if exc.diag.constraint_name != needs_approval:
            raise
        request_id = _record_request(
            conn, operator=operator, entity=entity, name=name, change=change, reason=reason
        )
        if requested is None:
            raise ApprovalRequested(request_id, entity, name) from None
        raise requested(request_id) from None
    assert row is not None
    return row


def list_providers(conn: psycopg.Connection) -> list[dict[str, Any]]:
    return conn.cursor(row_factory=dict_row).execute(QUERIES["providers_list"]).fetchall()


def set_provider(
    conn: psycopg.Connection,
    *,
    operator: str,
    name: str,
    reason: str | None,
    kind: str | None = None,
    enabled: bool | None = None,
    currencies: Sequence[str] | None = None,
    amount_limits: Mapping[str, Mapping[str, int]] | None = None,
    note: str | None = None,
    create: bool = False,
    api_version: str | None = None,
) -> dict[str, Any]:
    """Register (``create``) or change one provider; the row as it is now.

    ``api_version`` (sql/0070): the provider API version relays serving this name must pin;
    None keeps it, ``""`` clears it (not recorded, not checked). It must be spelt as the
    kind's adapter spells versions (ValueError naming the field otherwise); a version the
    adapter was not tested with is accepted (:func:`api_version_untested` says so), since
    the relay's own override (ALLOW_UNTESTED_API_VERSION) is where that is decided.

    Raises psycopg errors the database names (unknown currency, not registered, bad name),
    and :class:`ApprovalRequested` when four eyes are on and the change may send traffic
    somewhere new (``conn`` in autocommit mode: the request is committed).
    """
    if api_version:
        kind_of = kind
        if kind_of is None:  # a change of a registered provider: its kind is the table's
            kind_of = next((p["kind"] for p in list_providers(conn) if p["name"] == name), None)
        check_api_version(kind_of, api_version)
    change = {
        "kind": kind,
        "enabled": enabled,
        "currencies": None if currencies is None else list(currencies),
        "amount_limits": None if amount_limits is None else dict(amount_limits),
        "note": note,
        "create": create,
        "api_version": api_version,
    }
    return change_or_request(
        conn,
        "provider_set",
        {
            **change,
            "name": name,
            "amount_limits": None if amount_limits is None else json.dumps(amount_limits),
        },
        operator=operator,
        entity="provider",
        name=name,
        change=change,
        reason=reason,
    )


def check_api_version(kind: str | None, version: str) -> None:
    """ValueError naming the field when ``version`` is not spelt as ``kind``'s adapter
    spells API versions (Stripe ``2026-10-28.endive``, Adyen ``v71``). A kind without an
    adapter here (or not known yet) is left to the table's rule (a plain token)."""
    if kind is None:
        return
    try:
        versions = api_versions(kind)
    except ValueError:
        return
    if not re.fullmatch(versions.pattern, version):
        raise ValueError(
            f"api_version {version!r} is not a {kind} API version (like {versions.example})"
        )


def api_version_untested(kind: str, version: str | None) -> bool:
    """True when ``kind``'s adapter was not tested with ``version`` (a relay then serves it
    only under RELAY_PROVIDERS__<NAME>__ALLOW_UNTESTED_API_VERSION)."""
    if version is None:
        return False
    try:
        return version not in api_versions(kind).tested
    except ValueError:
        return False


def list_rules(conn: psycopg.Connection) -> list[dict[str, Any]]:
    return conn.cursor(row_factory=dict_row).execute(QUERIES["routing_rules_list"]).fetchall()


def set_rule(
    conn: psycopg.Connection,
    *,
    operator: str,
    name: str,
    fields: Mapping[str, Any],
    reason: str | None,
    create: bool = False,
) -> dict[str, Any]:
    """Add (``create``) or change one routing rule; the row as it is now (its new version).

    :class:`ApprovalRequested` as :func:`set_provider`.
    """
    return change_or_request(
        conn,
        "routing_rule_set",
        {"name": name, "rule": json.dumps(dict(fields)), "create": create},
        operator=operator,
        entity="routing_rule",
        name=name,
        change={"rule": dict(fields), "create": create},
        reason=reason,
    )


def set_weights(
    conn: psycopg.Connection,
    *,
    operator: str,
    name: str,
    weights: Mapping[str, int],
    reason: str | None,
) -> dict[str, Any]:
    """Change the weights of some targets of a split rule (a canary to 0: the rollback).

    Providers not named keep their weight; a provider not in the rule is refused
    (ValueError), as is a rule that is not a split. Lowering weights never needs a second
    operator (sql/0052): a rollback is never held up.
    """
    # Read, then one change: routing_rule_set_v1 locks the rule and applies the weights.
    rules = {r["name"]: r for r in list_rules(conn)}
    rule = rules.get(name)
    if rule is None:
        raise ValueError(f"no routing rule {name!r} (outbox-relay routes list)")
    if rule["mode"] != "split":
        raise ValueError(f"routing rule {name!r} is a priority list, not a split")
    unknown = sorted(set(weights) - set(rule["providers"]))
    if unknown:
        raise ValueError(
            f"routing rule {name!r} has no target {', '.join(unknown)} "
            f"(its targets: {', '.join(rule['providers'])})"
        )
    new = [weights.get(p, w) for p, w in zip(rule["providers"], rule["weights"], strict=True)]
    return set_rule(conn, operator=operator, name=name, fields={"weights": new}, reason=reason)


def rule_shares(
    rule: Mapping[str, Any], providers: Sequence[Mapping[str, Any]]
) -> dict[str, float]:
    """The share of new matching payments each target gets now (enabled providers only)."""
    enabled = {p["name"] for p in providers if p["enabled"]}
    weights = rule["weights"] or [0] * len(rule["providers"])
    targets = [Target(p, w, p in enabled) for p, w in zip(rule["providers"], weights, strict=True)]
    if rule["mode"] == "priority":
        first = next((t.provider for t in targets if t.usable), None)
        return {t.provider: 1.0 if t.provider == first else 0.0 for t in targets}
    return {t.provider: split_share(targets, t.provider) for t in targets}


def registry_changes(
    conn: psycopg.Connection, entity: str, entity_id: str, limit: int = 20
) -> list[dict[str, Any]]:
    """The audit rows of a provider (``entity='provider'``) or a rule, newest first."""
    return (
        conn.cursor(row_factory=dict_row)
        .execute(
            QUERIES["registry_changes"], {"entity": entity, "entity_id": entity_id, "limit": limit}
        )
        .fetchall()
    )


_ENTRY_KEYS = {"name", "kind", "enabled", "currencies", "limits", "note", "apiVersion"}


def parse_declared(entries: object) -> list[dict[str, Any]]:
    """Check a declared provider list (the chart's ``providers`` values, as JSON).

    Each entry: ``name`` and ``kind`` required; ``enabled`` (default true), ``currencies``
    (a list, empty or absent: all), ``limits`` (``{"EUR": {"min": 50, "max": 999}}``),
    ``note``, ``apiVersion`` (the version relays serving it must pin, spelt as its kind's
    adapter spells them; left out: the registry's is kept). ValueError naming the entry and
    the field otherwise.
    """
    if not isinstance(entries, list):
        raise ValueError("providers must be a JSON list of objects")
    checked: list[dict[str, Any]] = []
    for n, entry in enumerate(entries):
        where = f"providers[{n}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{where} must be an object")
        unknown = sorted(set(entry) - _ENTRY_KEYS)
        if unknown:
            raise ValueError(f"{where} has unknown field(s) {', '.join(unknown)}")
        for key in ("name", "kind"):
            if not isinstance(entry.get(key), str) or not entry[key]:
                raise ValueError(f"{where}.{key} is required: a lower-case name")
        if not isinstance(entry.get("enabled", True), bool):
            raise ValueError(f"{where}.enabled must be true or false")
        currencies = entry.get("currencies") or []
        if not isinstance(currencies, list) or not all(isinstance(c, str) for c in currencies):
            raise ValueError(f"{where}.currencies must be a list of ISO 4217 codes")
        if "apiVersion" in entry:
            version = entry["apiVersion"]
            if not isinstance(version, str) or not version:
                raise ValueError(f"{where}.apiVersion must be a version, e.g. 2026-10-28.endive")
            try:
                check_api_version(entry["kind"], version)
            except ValueError as exc:
                raise ValueError(f"{where}.apiVersion: {exc}") from None
        checked.append({**entry, "currencies": currencies})
    return checked


def apply_declared(
    conn: psycopg.Connection, *, operator: str, entries: Sequence[Mapping[str, Any]], reason: str
) -> list[dict[str, Any]]:
    """Register or update every declared provider, all or none (one transaction).

    A provider not declared keeps its row and state: the chart never removes or disables
    one (disable it with ``outbox-relay providers disable``). ``enabled`` applies only when
    a provider is registered: an operator's kill switch (``providers disable``) is a flag
    that a later release must not undo. Unchanged rows write no audit row.
    """
    try:
        with conn.transaction():
            known = {p["name"] for p in list_providers(conn)}
            return [
                set_provider(
                    conn,
                    operator=operator,
                    name=entry["name"],
                    kind=entry["kind"],
                    enabled=None if entry["name"] in known else entry.get("enabled", True),
                    currencies=entry["currencies"],
                    amount_limits=entry.get("limits") or {},
                    note=entry.get("note"),
                    reason=reason,
                    create=True,
                    api_version=entry.get("apiVersion"),
                )
                for entry in entries
            ]
    except ApprovalRequested as exc:
        raise RuntimeError(
            "four eyes are on (sql/0052): a declared provider that is new or changed needs a "
            "second operator; nothing was applied (register it by `outbox-relay providers add` "
            "and `registry approve`, or turn four eyes off)"
        ) from exc


def set_four_eyes(conn: psycopg.Connection, *, operator: str, on: bool, reason: str) -> bool:
    """Turn four eyes on (one operator) or off (two: :class:`ApprovalRequested`)."""
    row = change_or_request(
        conn,
        "registry_policy_set",
        {"four_eyes": on},
        operator=operator,
        entity="registry_policy",
        name="four_eyes",
        change={"four_eyes": on},
        reason=reason,
    )
    return bool(row["four_eyes"])


def list_requests(conn: psycopg.Connection) -> list[dict[str, Any]]:
    """Registry requests, pending first, newest first."""
    return conn.cursor(row_factory=dict_row).execute(QUERIES["registry_requests"]).fetchall()


def approve_request(conn: psycopg.Connection, *, operator: str, request_id: int) -> dict[str, Any]:
    """Apply a pending request as a second operator (another login); the request row."""
    with conn.transaction():
        row = (
            conn.cursor(row_factory=dict_row)
            .execute(QUERIES["registry_approve"], {"operator": operator, "id": request_id})
            .fetchone()
        )
    assert row is not None
    return row


_GUARD_FIELDS = {
    "canary",
    "baseline",
    "enabled",
    "window_seconds",
    "min_samples",
    "failure_margin_bp",
    "ambiguous_margin_bp",
    "latency_percentile",
    "latency_margin_ms",
    "note",
}


def list_guards(conn: psycopg.Connection) -> list[dict[str, Any]]:
    """Every guard rail (sql/0067) with its rule's state (the canary's weight now)."""
    return conn.cursor(row_factory=dict_row).execute(QUERIES["guard_rails_list"]).fetchall()


def set_guard(
    conn: psycopg.Connection,
    *,
    operator: str,
    rule: str,
    fields: Mapping[str, Any],
    reason: str | None,
) -> dict[str, Any]:
    """Add or change the guard rail of split rule ``rule``; the guard as it is now.

    ``fields``: canary, baseline (both required for a new guard, both targets of the rule),
    enabled, window_seconds, min_samples, failure_margin_bp, ambiguous_margin_bp,
    latency_percentile, latency_margin_ms, note. Audited as entity ``routing_guard``. Never
    needs a second operator: a guard only takes traffic away (docs/routing.md).
    """
    unknown = sorted(set(fields) - _GUARD_FIELDS)
    if unknown:
        raise ValueError(f"guard rail fields {', '.join(unknown)} are not settable")
    with conn.transaction():
        row = (
            conn.cursor(row_factory=dict_row)
            .execute(
                QUERIES["routing_guard_set"],
                {
                    "operator": operator,
                    "rule": rule,
                    "guard": json.dumps(dict(fields)),
                    "reason": reason,
                },
            )
            .fetchone()
        )
    assert row is not None
    return row
