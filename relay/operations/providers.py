"""The provider registry and the routing rules, as operators change them (sql/0050, sql/0051).

Every change is one transaction that names its operator and a reason, through the database's
own functions (``outbox.provider_set_v1``, ``outbox.routing_rule_set_v1``), which the chart
uses too; the database writes the hash-chained audit row (who, when, before, after, why) and,
for a rule, bumps its version. A change applies to the next payment's first INSERT: nothing
is cached, so no relay or application restarts. Payments already started keep their
provider. The command line is relay/cli/providers.py.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import psycopg
from psycopg.rows import dict_row

from relay.domain.routing import Target, split_share
from relay.infra.queries import QUERIES

__all__ = [
    "list_providers",
    "list_rules",
    "registry_changes",
    "rule_shares",
    "set_provider",
    "set_rule",
    "set_weights",
]


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
) -> dict[str, Any]:
    """Register (``create``) or change one provider; the row as it is now.

    Raises psycopg errors the database names (unknown currency, not registered, bad name).
    """
    with conn.transaction():
        row = (
            conn.cursor(row_factory=dict_row)
            .execute(
                QUERIES["provider_set"],
                {
                    "operator": operator,
                    "name": name,
                    "kind": kind,
                    "enabled": enabled,
                    "currencies": None if currencies is None else list(currencies),
                    "amount_limits": None if amount_limits is None else json.dumps(amount_limits),
                    "note": note,
                    "reason": reason,
                    "create": create,
                },
            )
            .fetchone()
        )
    assert row is not None
    return row


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
    """Add (``create``) or change one routing rule; the row as it is now (its new version)."""
    with conn.transaction():
        row = (
            conn.cursor(row_factory=dict_row)
            .execute(
                QUERIES["routing_rule_set"],
                {
                    "operator": operator,
                    "name": name,
                    "rule": json.dumps(dict(fields)),
                    "reason": reason,
                    "create": create,
                },
            )
            .fetchone()
        )
    assert row is not None
    return row


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
    (ValueError), as is a rule that is not a split.
    """
    with conn.transaction():
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
