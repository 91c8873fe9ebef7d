"""`outbox-relay webhooks serve|list|show`: the receiver and the inbox's operator view.

serve   receive provider notifications at /webhooks/<name> (one route per configured
        RELAY_WEBHOOKS__<NAME>__SECRETS_FILE), verify, store, acknowledge; relays apply them
list    counts by provider, type and status, then the latest notifications
show    one notification (by inbox id or provider event id): status, result, payload
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from relay.cli.tables import format_when, plain_help, render_table

__all__ = ["add_commands"]


def _clip(value: object, width: int) -> str:
    text = "-" if value is None else str(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def _cmd_serve(args: argparse.Namespace) -> int:
    import anyio

    from provider_adapters.registry import build_notification_reader
    from relay.infra.config import ConfigError, load_settings
    from relay.infra.db import Database
    from relay.infra.logs import configure_logging
    from relay.service.webhooks import WebhookReceiver, serve_webhooks

    try:
        settings = load_settings()
    except ConfigError as exc:
        lines = exc.lines
        print(f"error: invalid configuration ({len(lines)} problem(s)):", file=sys.stderr)
        for line in lines:
            print(f"  {line}", file=sys.stderr)
        return 2
    url = settings.resolved_database_url()
    if not url:
        print("error: RELAY_DATABASE_URL is not set", file=sys.stderr)
        return 2
    if not settings.webhooks:
        print(
            "error: no webhook endpoint configured; set RELAY_WEBHOOKS__STRIPE__SECRETS_FILE to "
            "a file holding the endpoint's signing secret (whsec_...), one per line",
            file=sys.stderr,
        )
        return 2
    readers = {}
    for name, endpoint in settings.webhooks.items():
        secrets = endpoint.resolved_secrets()
        if not secrets:
            print(
                f"error: RELAY_WEBHOOKS__{name.upper()}__SECRETS_FILE holds no secret",
                file=sys.stderr,
            )
            return 2
        readers[name] = build_notification_reader(
            name, endpoint.kind, secrets, tolerance_seconds=settings.webhooks_tolerance_seconds
        )
    configure_logging(settings.log_format)
    port = args.port if args.port is not None else settings.webhooks_port
    receiver = WebhookReceiver(
        Database(url, pool_size=settings.db_pool_size, name=f"webhooks:{settings.instance_name}"),
        readers,
        max_body_bytes=settings.webhooks_max_body_bytes,
    )
    host = args.host or settings.webhooks_host

    async def serve() -> None:
        async with anyio.create_task_group() as tg:
            bound = await tg.start(serve_webhooks, receiver, host, port)
            # Tests and scripts that pass --port 0 read the bound port from this line.
            print(f"webhooks listening on http://{host}:{bound}", flush=True)

    try:
        anyio.run(serve)
    except BaseExceptionGroup as group:
        # Binding the port fails inside the task group: one line, exit 2.
        refused, _ = group.split(OSError)
        if refused is None:
            raise
        first: BaseException = refused
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        reason = getattr(first, "strerror", None) or str(first)
        print(
            f"error: cannot listen on {host}:{port} ({reason}); choose a free port with "
            "RELAY_WEBHOOKS_PORT or --port",
            file=sys.stderr,
        )
        return 2
    return 0


def _cmd_list(args: argparse.Namespace, conninfo: str) -> int:
    from relay.operations.webhooks import list_notifications, summarise_inbox

    summary = summarise_inbox(conninfo)
    rows = list_notifications(
        conninfo,
        provider=args.provider,
        status=args.status,
        event_type=args.type,
        limit=args.limit,
    )
    if args.json:
        print(json.dumps({"summary": summary, "notifications": rows}, indent=2, default=str))
        return 0
    if not summary:
        print("the inbox is empty: no notification received (or all past retention)")
        return 0
    print("notifications by provider, type and status:")
    print(
        render_table(
            ["provider", "type", "status", "count", "last received"],
            [
                (
                    s["provider"],
                    s["event_type"],
                    s["status"],
                    s["notifications"],
                    format_when(s["last_received"]),
                )
                for s in summary
            ],
        )
    )
    print(f"\nlatest {len(rows)}:")
    print(
        render_table(
            ["id", "provider", "event", "type", "status", "received", "payment", "result"],
            [
                (
                    r["id"],
                    r["provider"],
                    r["event_id"],
                    r["event_type"],
                    r["status"],
                    format_when(r["received_at"]),
                    r["payment_id"] or "-",
                    _clip(r["result"] or r["last_error"], 60),
                )
                for r in rows
            ],
        )
    )
    print(
        "\nRefused deliveries are never stored: see outbox_relay_webhooks_rejected_total "
        "by reason on the receiver's /metrics."
    )
    return 0


def _cmd_show(args: argparse.Namespace, conninfo: str) -> int:
    from relay.operations.webhooks import find_notification

    found = find_notification(conninfo, args.ref)
    if found is None:
        print(f"error: no notification {args.ref!r} (inbox id or event id)", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(found, indent=2, default=str))
        return 0
    payload = found.pop("payload")
    print(f"notification {found['id']}: {found['provider']} {found['event_id']}")
    for label in (
        "event_type",
        "status",
        "result",
        "last_error",
        "payment_id",
        "event_created_at",
        "received_at",
        "applied_at",
        "attempts",
        "claimed_by",
    ):
        value: Any = found.get(label)
        if value is not None:
            print(f"  {label.replace('_', ' '):<18}{format_when(value)}")
    print("\npayload (as stored; card numbers redacted):")
    print(json.dumps(payload, indent=2, sort_keys=True))
    return 0


def add_commands(commands: Any, database_url: Callable[[], str]) -> None:
    group = commands.add_parser(
        "webhooks",
        help="receive provider notifications; list and show the inbox",
        description=plain_help(__doc__ or ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = group.add_subparsers(dest="webhooks_command", metavar="ACTION", required=True)
    serve = actions.add_parser(
        "serve",
        help="run the receiver (/webhooks/<name>, /metrics, /healthz, /readyz)",
        description="Verify each delivery's signature against its raw body, store it in "
        "outbox.webhook_inbox, answer 2xx once committed. Relays (`outbox-relay run`) apply "
        "the stored notifications. Configured by RELAY_WEBHOOKS__<NAME>__SECRETS_FILE (Stripe: "
        "whsec_... secrets; Adyen: hex HMAC keys, one per line), RELAY_WEBHOOKS__<NAME>__KIND "
        "(stripe, the default, or adyen), RELAY_WEBHOOKS_PORT, RELAY_WEBHOOKS_MAX_BODY_BYTES, "
        "RELAY_WEBHOOKS_TOLERANCE_SECONDS.",
    )
    serve.add_argument("--host", default=None, help="listen address (RELAY_WEBHOOKS_HOST)")
    serve.add_argument(
        "--port", type=int, default=None, help="port; 0 picks a free one (RELAY_WEBHOOKS_PORT)"
    )
    serve.set_defaults(handler=_cmd_serve)
    listing = actions.add_parser(
        "list", help="counts by provider, type and status; the latest notifications"
    )
    listing.add_argument("--provider", help="only this provider instance")
    listing.add_argument(
        "--status", choices=["received", "applied", "ignored"], help="only this status"
    )
    listing.add_argument("--type", help="only this event type, e.g. charge.refunded")
    listing.add_argument("--limit", type=int, default=50, help="rows (default %(default)s)")
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(handler=lambda args: _cmd_list(args, database_url()))
    show = actions.add_parser("show", help="one notification with its stored payload")
    show.add_argument("ref", metavar="ID|EVENT_ID", help="inbox id or provider event id")
    show.add_argument("--json", action="store_true", help="print JSON")
    show.set_defaults(handler=lambda args: _cmd_show(args, database_url()))
