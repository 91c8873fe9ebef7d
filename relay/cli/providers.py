"""`outbox-relay providers ...` and `outbox-relay routes ...`: the provider registry and the
routing rules (docs/routing.md). Parses and prints; relay/operations/providers.py acts.

Every change names its operator (--operator) and a reason (--reason), both recorded in the
audit trail with the row before and after, and applies to the next payment without a restart.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from datetime import datetime
from typing import Any

import psycopg

from relay.cli.operator_args import add_operator_argument, approval_requested, operator_of
from relay.cli.tables import print_refusal, render_table
from relay.domain.guard_rails import BASIS_POINTS, format_bp, rolled_back
from relay.operations.providers import (
    ApprovalRequested,
    api_version_untested,
    apply_declared,
    approve_request,
    list_guards,
    list_providers,
    list_requests,
    list_rules,
    parse_declared,
    registry_changes,
    rule_shares,
    set_four_eyes,
    set_guard,
    set_provider,
    set_rule,
    set_weights,
)

__all__ = ["add_commands", "parse_limit", "parse_percent_bp", "parse_weight"]


def parse_limit(text: str) -> tuple[str, dict[str, int]]:
    """``EUR:50:99999999`` -> ``('EUR', {'min': 50, 'max': 99999999})``; a bound may be empty."""
    parts = text.split(":")
    if len(parts) != 3 or len(parts[0]) != 3 or not parts[0].isalpha():
        raise argparse.ArgumentTypeError(f"{text!r} is not CUR:MIN:MAX, e.g. EUR:50:99999999")
    bounds: dict[str, int] = {}
    for key, value in (("min", parts[1]), ("max", parts[2])):
        if value:
            if not value.isdigit() or int(value) < 1:
                raise argparse.ArgumentTypeError(
                    f"{key} {value!r} is not a positive whole number of minor units"
                )
            bounds[key] = int(value)
    return parts[0].upper(), bounds


def parse_weight(text: str) -> tuple[str, int]:
    """``adyen=10`` -> ``('adyen', 10)``; weights are whole numbers 0 to 10000."""
    name, sep, value = text.partition("=")
    if not sep or not name or not value.isdigit() or int(value) > 10_000:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not PROVIDER=WEIGHT, e.g. adyen=10 (0 to 10000)"
        )
    return name, int(value)


def parse_percent_bp(text: str) -> int:
    """``5`` or ``5%`` -> 500, ``0.25`` -> 25: a percentage with at most two decimals, in
    basis points (parsed as text: no float touches the margin)."""
    body = text.strip().removesuffix("%")
    whole, dot, frac = body.partition(".")
    if not whole.isdigit() or (dot and (not frac.isdigit() or len(frac) > 2)):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a percentage with at most two decimals, e.g. 5 or 2.5%"
        )
    bp = int(whole) * 100 + int((frac or "0").ljust(2, "0"))
    if bp > BASIS_POINTS:
        raise argparse.ArgumentTypeError(f"{text!r} is more than 100%")
    return bp


def _currencies(text: str) -> list[str]:
    """``EUR,USD`` -> ``['EUR', 'USD']``; ``all`` -> ``[]`` (every currency)."""
    if text.strip().lower() == "all":
        return []
    codes = [c.strip().upper() for c in text.split(",") if c.strip()]
    if not codes or any(len(c) != 3 or not c.isalpha() for c in codes):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a list of ISO 4217 codes like EUR,USD (or all)"
        )
    return codes


def _api_version(text: str) -> str:
    """``2026-10-28.endive`` as given; ``none`` -> ``''`` (the registry records none)."""
    return "" if text.strip().lower() == "none" else text.strip()


def _cmd_registry(args: argparse.Namespace, conninfo: str) -> int:
    with psycopg.connect(conninfo, autocommit=True) as conn:
        try:
            if args.registry_command == "four-eyes":
                on = set_four_eyes(
                    conn, operator=operator_of(args), on=args.state == "on", reason=args.reason
                )
                print(f"four eyes on registry and routing changes: {'on' if on else 'off'}")
                return 0
            if args.registry_command == "approve":
                row = approve_request(conn, operator=operator_of(args), request_id=args.id)
                print(
                    f"request {row['id']} applied: {row['entity']} {row['name']} "
                    f"(asked by {row['requested_by']}, approved by {row['approved_by']})"
                )
                return 0
        except ApprovalRequested as exc:
            return approval_requested(exc)
        except psycopg.Error as exc:
            return print_refusal(exc)
        rows = list_requests(conn)
    if not rows:
        print("no registry requests")
        return 0
    headers = ["id", "status", "entity", "name", "change", "asked by", "why", "approved by"]
    print(
        render_table(
            headers,
            [
                [
                    r["id"],
                    r["status"],
                    r["entity"],
                    r["name"],
                    json.dumps(r["change"]),
                    r["requested_by"],
                    r["reason"],
                    r["approved_by"],
                ]
                for r in rows
            ],
        )
    )
    return 0


def _provider_line(p: dict[str, Any]) -> list[object]:
    limits = ", ".join(
        f"{cur} {b.get('min', '-')}..{b.get('max', '-')}"
        for cur, b in sorted(p["amount_limits"].items())
    )
    version = p.get("api_version")
    if version is not None and api_version_untested(p["kind"], version):
        version += " (untested)"
    return [
        p["name"],
        p["kind"],
        "enabled" if p["enabled"] else "DISABLED",
        ",".join(p["currencies"]) if p["currencies"] else "all",
        limits or None,
        version,
        p["updated_by"],
    ]


# "api version": the version relays serving it must pin (sql/0070); empty: not recorded.
_PROVIDER_HEADERS = ["name", "kind", "state", "currencies", "limits", "api version", "changed by"]


def _show_provider(p: dict[str, Any]) -> None:
    print(render_table(_PROVIDER_HEADERS, [_provider_line(p)]))


def _history(conn: psycopg.Connection, entity: str, name: str) -> None:
    rows = registry_changes(conn, entity, name)
    print(f"\nchanges (newest first, {len(rows)}):")
    table = []
    for row in rows:
        before, after = row["before"] or {}, row["after"] or {}
        changed = {k: after.get(k) for k in after if before.get(k) != after.get(k)}
        table.append(
            [
                row["at"].isoformat(timespec="seconds"),
                row["actor"],
                row["operation"],
                json.dumps(changed, default=str),
                row["reason"],
            ]
        )
    print(render_table(["at", "actor", "operation", "now", "why"], table))


def _cmd_providers(args: argparse.Namespace, conninfo: str) -> int:
    with psycopg.connect(conninfo, autocommit=True) as conn:
        if args.providers_command == "list":
            rows = list_providers(conn)
            if args.json:
                print(json.dumps(rows, indent=2, default=str))
            elif not rows:
                print(
                    "no provider registered: the registry is open, every provider name is "
                    "accepted (docs/routing.md)"
                )
            else:
                print(render_table(_PROVIDER_HEADERS, [_provider_line(p) for p in rows]))
            return 0
        if args.providers_command == "show":
            found = [p for p in list_providers(conn) if p["name"] == args.name]
            if not found:
                print(f"error: provider {args.name!r} is not registered", file=sys.stderr)
                return 1
            _show_provider(found[0])
            _history(conn, "provider", args.name)
            return 0
        if args.providers_command == "apply":
            return _apply(conn, args)
        enabled = {"enable": True, "disable": False}.get(args.providers_command)
        limits = None
        if getattr(args, "limit", None):
            limits = dict(args.limit)
        try:
            row = set_provider(
                conn,
                operator=operator_of(args),
                name=args.name,
                reason=args.reason,
                kind=getattr(args, "kind", None),
                enabled=enabled if enabled is not None else getattr(args, "enabled", None),
                currencies=getattr(args, "currencies", None),
                amount_limits=limits,
                note=getattr(args, "note", None),
                create=args.providers_command == "add",
                api_version=getattr(args, "api_version", None),
            )
        except ApprovalRequested as exc:
            return approval_requested(exc)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        except psycopg.Error as exc:
            return print_refusal(exc)
    _show_provider(row)
    return 0


def _apply(conn: psycopg.Connection, args: argparse.Namespace) -> int:
    try:
        text = args.source
        if not text.lstrip().startswith("["):
            with open(text, encoding="utf-8") as handle:
                text = handle.read()
        entries = parse_declared(json.loads(text))
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        rows = apply_declared(conn, operator=operator_of(args), entries=entries, reason=args.reason)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except psycopg.Error as exc:
        return print_refusal(exc)
    print(f"applied {len(rows)} declared provider(s); providers not declared are left as they are")
    if rows:
        print(render_table(_PROVIDER_HEADERS, [_provider_line(p) for p in rows]))
    return 0


def _rule_line(rule: dict[str, Any], shares: dict[str, float]) -> list[object]:
    match = []
    if rule["currencies"]:
        match.append(",".join(rule["currencies"]))
    if rule["min_amount_minor"] or rule["max_amount_minor"]:
        match.append(f"amount {rule['min_amount_minor'] or ''}..{rule['max_amount_minor'] or ''}")
    if rule["payment_method_prefixes"]:
        match.append("method " + "|".join(p + "*" for p in rule["payment_method_prefixes"]))
    if rule["metadata_key"]:
        match.append(f"{rule['metadata_key']} in {','.join(rule['metadata_values'])}")
    targets = " ".join(f"{p}={round(100 * shares.get(p, 0.0), 2)}%" for p in rule["providers"])
    return [
        rule["priority"],
        rule["name"],
        rule["version"],
        "enabled" if rule["enabled"] else "DISABLED",
        rule["mode"],
        "; ".join(match) or "any",
        targets,
    ]


def _given(args: argparse.Namespace, *names: str) -> dict[str, Any]:
    """The options among ``names`` the operator gave (argparse leaves the others None), so
    a change sets only those."""
    given = {name: getattr(args, name, None) for name in names}
    return {name: value for name, value in given.items() if value is not None}


def _rule_fields(args: argparse.Namespace) -> dict[str, Any]:
    fields = _given(
        args,
        "priority",
        "currencies",
        "min_amount_minor",
        "max_amount_minor",
        "payment_method_prefixes",
        "metadata_key",
        "note",
    )
    if getattr(args, "metadata", None):
        key, _, values = args.metadata.partition("=")
        fields["metadata_key"] = key
        fields["metadata_values"] = values.split(",")
    if getattr(args, "targets", None):
        fields["providers"] = [name for name, _ in args.targets]
        if args.mode == "split" or (
            args.mode is None and any(w is not None for _, w in args.targets)
        ):
            fields["mode"] = "split"
            fields["weights"] = [w or 0 for _, w in args.targets]
        else:
            fields["mode"] = "priority"
            fields["weights"] = None
    return fields


def _target(text: str) -> tuple[str, int | None]:
    """``stripe`` (priority) or ``stripe=90`` (split weight)."""
    if "=" in text:
        return parse_weight(text)
    return text, None


def _cmd_routes(args: argparse.Namespace, conninfo: str) -> int:
    with psycopg.connect(conninfo, autocommit=True) as conn:
        if args.routes_command in ("guard", "guards"):
            return _cmd_guards(args, conn)
        providers = list_providers(conn)
        if args.routes_command in ("list", "show"):
            rules = list_rules(conn)
            if args.routes_command == "show":
                rules = [r for r in rules if r["name"] == args.name]
                if not rules:
                    print(f"error: no routing rule {args.name!r}", file=sys.stderr)
                    return 1
            if getattr(args, "json", False):
                print(json.dumps(rules, indent=2, default=str))
                return 0
            if not rules:
                print("no routing rules: every first intent must name its provider")
                return 0
            print(
                render_table(
                    [
                        "priority",
                        "rule",
                        "version",
                        "state",
                        "mode",
                        "matches",
                        "targets (share now)",
                    ],
                    [_rule_line(r, rule_shares(r, providers)) for r in rules],
                )
            )
            if args.routes_command == "show":
                guards = [g for g in list_guards(conn) if g["rule_name"] == args.name]
                if guards:
                    print("\nguard rail:")
                    print(render_table(_GUARD_HEADERS, [_guard_line(g) for g in guards]))
                _history(conn, "routing_rule", args.name)
            return 0
        try:
            if args.routes_command == "weights":
                row = set_weights(
                    conn,
                    operator=operator_of(args),
                    name=args.name,
                    weights=dict(args.weights),
                    reason=args.reason,
                )
            else:
                fields = _rule_fields(args)
                if args.routes_command in ("enable", "disable"):
                    fields["enabled"] = args.routes_command == "enable"
                row = set_rule(
                    conn,
                    operator=operator_of(args),
                    name=args.name,
                    fields=fields,
                    reason=args.reason,
                    create=args.routes_command == "add",
                )
        except ApprovalRequested as exc:
            return approval_requested(exc)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        except psycopg.Error as exc:
            return print_refusal(exc)
        print(
            render_table(
                ["priority", "rule", "version", "state", "mode", "matches", "targets (share now)"],
                [_rule_line(row, rule_shares(row, providers))],
            )
        )
    return 0


def _seconds(at: datetime) -> str:
    """A guard's rollback time as the guards table and its notes print it."""
    return at.isoformat(timespec="seconds")


def _guard_line(g: dict[str, Any]) -> list[object]:
    margins = []
    if g["failure_margin_bp"] is not None:
        margins.append(f"failures +{format_bp(g['failure_margin_bp'])}")
    if g["ambiguous_margin_bp"] is not None:
        margins.append(f"ambiguous +{format_bp(g['ambiguous_margin_bp'])}")
    if g["latency_margin_ms"] is not None:
        margins.append(f"p{g['latency_percentile']} +{g['latency_margin_ms']} ms")
    if not g["enabled"]:
        state = "off"
    elif rolled_back(g["rolled_back_at"], g.get("canary_weight")):
        state = f"ROLLED BACK {_seconds(g['rolled_back_at'])}"
    elif g.get("canary_weight") == 0:
        state = "canary at 0"
    else:
        state = "watching"
    return [
        g["rule_name"],
        g["canary"],
        g["baseline"],
        f"{g['window_seconds']} s",
        g["min_samples"],
        ", ".join(margins),
        state,
    ]


_GUARD_HEADERS = ["rule", "canary", "baseline", "window", "min samples", "margins", "state"]


def _guard_fields(args: argparse.Namespace) -> dict[str, Any]:
    return _given(
        args,
        "canary",
        "baseline",
        "window_seconds",
        "min_samples",
        "failure_margin_bp",
        "ambiguous_margin_bp",
        "latency_percentile",
        "latency_margin_ms",
        "note",
        "enabled",
    )


def _cmd_guards(args: argparse.Namespace, conn: psycopg.Connection) -> int:
    if args.routes_command == "guards":
        guards = list_guards(conn)
        if getattr(args, "json", False):
            print(json.dumps(guards, indent=2, default=str))
        elif not guards:
            print("no guard rails: `outbox-relay routes guard RULE --canary ... --baseline ...`")
        else:
            print(render_table(_GUARD_HEADERS, [_guard_line(g) for g in guards]))
            for g in guards:
                if g["rollback_reason"]:
                    print(
                        f"{g['rule_name']}: last rollback {_seconds(g['rolled_back_at'])} by "
                        f"{g['rolled_back_by']}: {g['rollback_reason']}"
                    )
        return 0
    try:
        set_guard(
            conn,
            operator=operator_of(args),
            rule=args.name,
            fields=_guard_fields(args),
            reason=args.reason,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except psycopg.Error as exc:
        return print_refusal(exc)
    now = [g for g in list_guards(conn) if g["rule_name"] == args.name]
    print(render_table(_GUARD_HEADERS, [_guard_line(g) for g in now]))
    return 0


def _change_args(parser: argparse.ArgumentParser) -> None:
    add_operator_argument(parser)
    parser.add_argument("--reason", required=True, help="why, recorded in the audit trail")


def add_commands(commands: Any, database_url: Callable[[], str]) -> None:
    """Register ``providers ...`` and ``routes ...`` on the CLI's subparsers."""
    group = commands.add_parser(
        "providers",
        help="the provider registry: list, add, change, enable, disable",
        description="The providers relays may serve (docs/routing.md).",
    )
    actions = group.add_subparsers(dest="providers_command", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="every registered provider")
    listing.add_argument("--json", action="store_true", help="print JSON")
    show = actions.add_parser("show", help="one provider and its changes (audit trail)")
    show.add_argument("name")
    for verb, helptext in (
        ("add", "register a provider"),
        ("set", "change a registered provider"),
        ("enable", "let a provider take new payments"),
        ("disable", "stop new payments going to a provider (kill switch)"),
    ):
        sub = actions.add_parser(verb, help=helptext)
        sub.add_argument("name")
        if verb in ("add", "set"):
            sub.add_argument(
                "--kind", required=verb == "add", help="the adapter: stripe, adyen, ..."
            )
            sub.add_argument("--currencies", type=_currencies, help="EUR,USD,... or all")
            sub.add_argument(
                "--limit",
                type=parse_limit,
                action="append",
                metavar="CUR:MIN:MAX",
                help="amount bounds for a payment's first intent, minor units (repeatable)",
            )
            sub.add_argument("--note", help="free text shown with the provider")
            sub.add_argument(
                "--api-version",
                type=_api_version,
                metavar="VERSION",
                help="the provider API version relays serving this name must pin (a relay "
                "with another refuses to start); none: not recorded (docs/routing.md, "
                '"API version canary")',
            )
        if verb == "add":
            sub.add_argument(
                "--disabled",
                dest="enabled",
                action="store_false",
                default=None,
                help="register it disabled",
            )
        _change_args(sub)
    apply = actions.add_parser(
        "apply",
        help="register or update declared providers (the chart's providers values), all or none",
    )
    apply.add_argument(
        "source",
        metavar="JSON_OR_FILE",
        help='a JSON list ([{"name": "stripe", "kind": "stripe", "currencies": ["EUR"], '
        '"limits": {"EUR": {"min": 50}}, "apiVersion": "2026-10-28.endive"}]) or a file '
        "holding one",
    )
    _change_args(apply)
    group.set_defaults(handler=lambda args: _cmd_providers(args, database_url()))

    registry = commands.add_parser(
        "registry",
        help="four eyes on provider and routing changes: on/off, requests, approve",
        description="Four eyes (sql/0052): with it on, a change that may send traffic somewhere "
        "new is recorded as a request and applied when a second operator approves it; "
        "disabling and lowering weights always apply at once.",
    )
    gactions = registry.add_subparsers(dest="registry_command", metavar="ACTION", required=True)
    eyes = gactions.add_parser("four-eyes", help="turn four eyes on (one operator) or off (two)")
    eyes.add_argument("state", choices=("on", "off"))
    _change_args(eyes)
    gactions.add_parser("requests", help="registry requests, pending first")
    approve = gactions.add_parser("approve", help="apply a pending request as a second operator")
    approve.add_argument("id", type=int)
    add_operator_argument(approve)
    registry.set_defaults(handler=lambda args: _cmd_registry(args, database_url()))

    routes = commands.add_parser(
        "routes",
        help="routing rules for intents that name no provider",
        description="Routing rules: which provider a new payment goes to "
        "when its first intent names none (docs/routing.md).",
    )
    ractions = routes.add_subparsers(dest="routes_command", metavar="ACTION", required=True)
    rlist = ractions.add_parser("list", help="every rule, in the order they are tried")
    rlist.add_argument("--json", action="store_true", help="print JSON")
    rshow = ractions.add_parser("show", help="one rule and its changes (audit trail)")
    rshow.add_argument("name")
    for verb, helptext in (("add", "add a rule"), ("set", "change a rule")):
        sub = ractions.add_parser(verb, help=helptext)
        sub.add_argument("name")
        sub.add_argument(
            "targets",
            nargs="*" if verb == "set" else "+",
            type=_target,
            metavar="PROVIDER[=WEIGHT]",
            help="providers in fallback order; with =WEIGHT a weighted split",
        )
        sub.add_argument(
            "--mode",
            choices=("priority", "split"),
            help="priority: the first usable target; split: weighted by the payment's bucket "
            "(default: split when a weight is given)",
        )
        sub.add_argument("--priority", type=int, help="lower is tried first (default 100)")
        sub.add_argument("--currencies", type=_currencies, help="match these currencies only")
        sub.add_argument(
            "--min-amount",
            dest="min_amount_minor",
            type=int,
            help="match amounts from (minor units)",
        )
        sub.add_argument(
            "--max-amount",
            dest="max_amount_minor",
            type=int,
            help="match amounts up to (minor units)",
        )
        sub.add_argument(
            "--payment-method",
            dest="payment_method_prefixes",
            action="append",
            metavar="PREFIX",
            help="match payment methods starting so (repeatable)",
        )
        sub.add_argument("--metadata", metavar="KEY=V1,V2", help="match a metadata field's values")
        sub.add_argument("--note", help="free text shown with the rule")
        _change_args(sub)
    weights = ractions.add_parser(
        "weights", help="change a split's weights (a canary to 0: rollback)"
    )
    weights.add_argument("name")
    weights.add_argument("weights", nargs="+", type=parse_weight, metavar="PROVIDER=WEIGHT")
    _change_args(weights)
    guard = ractions.add_parser(
        "guard",
        help="add or change a split's guard rail (automatic rollback of its canary)",
        description="A guard rail (docs/routing.md, 'Guard rails'): relays compare the "
        "canary's outcomes with the baseline's over a sliding window and set the canary's "
        "weight to 0 when it is worse by a margin with enough samples on each side.",
    )
    guard.add_argument("name", help="the split rule")
    guard.add_argument("--canary", help="the target to roll back (required for a new guard)")
    guard.add_argument("--baseline", help="the target to compare with (required for a new guard)")
    guard.add_argument(
        "--window",
        dest="window_seconds",
        type=int,
        metavar="SECONDS",
        help="sliding window, 10 to 86400 s (default 900)",
    )
    guard.add_argument(
        "--min-samples", type=int, help="outcomes each side needs first (default 100)"
    )
    guard.add_argument(
        "--failure-margin",
        dest="failure_margin_bp",
        type=parse_percent_bp,
        metavar="PERCENT",
        help="roll back when the canary's declines + errors rate exceeds the baseline's by more",
    )
    guard.add_argument(
        "--ambiguous-margin",
        dest="ambiguous_margin_bp",
        type=parse_percent_bp,
        metavar="PERCENT",
        help="the same for ambiguous outcomes (timeouts, 5xx)",
    )
    guard.add_argument(
        "--latency-margin",
        dest="latency_margin_ms",
        type=int,
        metavar="MS",
        help="roll back when the canary's latency percentile exceeds the baseline's by more",
    )
    guard.add_argument(
        "--latency-percentile", type=int, help="the latency percentile, 50 to 99 (default 95)"
    )
    guard.add_argument("--note", help="free text shown with the guard")
    onoff = guard.add_mutually_exclusive_group()
    onoff.add_argument(
        "--off",
        dest="enabled",
        action="store_false",
        default=None,
        help="stop evaluating this guard (it is kept, audited)",
    )
    onoff.add_argument("--on", dest="enabled", action="store_true", help="evaluate it again")
    _change_args(guard)
    glist = ractions.add_parser("guards", help="every guard rail and its last rollback")
    glist.add_argument("--json", action="store_true", help="print JSON")
    for verb in ("enable", "disable"):
        sub = ractions.add_parser(verb, help=f"{verb} a rule")
        sub.add_argument("name")
        _change_args(sub)
    routes.set_defaults(handler=lambda args: _cmd_routes(args, database_url()))
