"""`outbox-relay webhooks serve`: receive provider notifications into the inbox.

One process per pod, several replicas behind a Service: it holds no state but its
database pool. Per delivery, in this order:

1. the route names a configured endpoint (``/webhooks/<name>``), else 404 ``unknown_route``;
2. the body is at most RELAY_WEBHOOKS_MAX_BODY_BYTES, else 413 ``too_large`` (read no
   further than the limit);
3. the signature verifies against the raw body with one of the endpoint's active secrets
   (``NotificationReader.verify``: Stripe's SDK), else 400 by reason (bad_signature,
   stale_timestamp, missing_signature, invalid_utf8, malformed_json, too_deep,
   not_an_event);
4. the notification is inserted and committed (``inbox_insert``); a duplicate event id
   inserts nothing and is acknowledged the same way; only then 200. An Adyen delivery
   (``BatchNotificationReader``) has every item verified and stored as its own row, and is
   acknowledged with ``[accepted]``.

A refusal is counted by reason (outbox_relay_webhooks_rejected_total) and logged with
the reason and the body's length, never its content or the signature. Nothing refused is
stored. A database that does not answer gets 503, which the provider retries.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Mapping

import anyio
import prometheus_client
import psycopg
import structlog
from aiohttp import web
from anyio.abc import TaskStatus
from psycopg.rows import dict_row
from psycopg_pool import PoolTimeout

from provider_adapters.base import (
    BatchNotificationReader,
    Notification,
    NotificationReader,
    NotificationRejected,
)
from relay.core.inbox import store_notification
from relay.infra import metrics
from relay.infra.db import RETRYABLE_DB_ERRORS, Database
from relay.infra.redaction import describe_conninfo

__all__ = ["WebhookReceiver", "build_receiver_app", "serve_webhooks"]

log = structlog.get_logger("relay.service.webhooks")

# A test hook for the crash tests (tests/test_webhooks_crash.py): with this variable set,
# the process SIGKILLs itself right after the first new notification committed and before
# it answers, so the provider's retry meets a stored row. Never set in production.
KILL_AFTER_COMMIT = "RELAY_TEST_WEBHOOKS_SIGKILL_AFTER_COMMIT"


class WebhookReceiver:
    def __init__(
        self,
        db: Database,
        readers: Mapping[str, NotificationReader],
        *,
        max_body_bytes: int,
    ) -> None:
        self.db = db
        self.readers = dict(readers)
        self.max_body_bytes = max_body_bytes
        self.database_ok = False
        self._kill_after_commit = bool(os.environ.get(KILL_AFTER_COMMIT))

    def _refuse(
        self, provider: str, reason: str, status: int, message: str, size: int, **detail: object
    ) -> web.Response:
        metrics.WEBHOOKS_REJECTED.labels(provider=provider, reason=reason).inc()
        log.warning("webhook_rejected", provider=provider, reason=reason, body_bytes=size, **detail)
        return web.json_response({"error": {"code": reason, "message": message}}, status=status)

    async def _body(self, request: web.Request) -> bytes | None:
        """The raw body, or None when it is larger than the limit (read no further)."""
        if request.content_length is not None and request.content_length > self.max_body_bytes:
            return None
        body = await request.content.read(self.max_body_bytes + 1)
        chunks = [body]
        size = len(body)
        while size <= self.max_body_bytes:
            more = await request.content.read(self.max_body_bytes + 1 - size)
            if not more:
                break
            chunks.append(more)
            size += len(more)
        if size > self.max_body_bytes:
            return None
        return b"".join(chunks)

    async def receive(self, request: web.Request) -> web.Response:
        name = request.match_info["provider"]
        reader = self.readers.get(name)
        if reader is None:
            return self._refuse(
                "-",
                "unknown_route",
                404,
                "no webhook endpoint is configured at this path",
                request.content_length or 0,
            )
        body = await self._body(request)
        if body is None:
            return self._refuse(
                name,
                "too_large",
                413,
                f"the body exceeds {self.max_body_bytes} bytes",
                request.content_length or 0,
            )
        batch = isinstance(reader, BatchNotificationReader)
        try:
            if isinstance(reader, BatchNotificationReader):
                # Adyen: every item verified (one bad item refuses the delivery), each stored
                # as its own row, its payload the item as signed.
                notifications: list[tuple[Notification, str]] = [
                    (n, json.dumps(n.body)) for n in reader.verify_items(body, request.headers)
                ]
            else:
                one = reader.verify(body, request.headers)
                notifications = [(one, body.decode("utf-8"))]
        except NotificationRejected as exc:
            return self._refuse(name, exc.reason, 400, str(exc), len(body))
        stored_any, duplicates = False, 0
        try:
            for notification, text in notifications:
                stored = await store_notification(
                    self.db,
                    name,
                    notification.event_id,
                    notification.event_type,
                    notification.created,
                    text,
                )
                stored_any = stored_any or stored
                duplicates += 0 if stored else 1
        except RETRYABLE_DB_ERRORS as exc:
            self.database_ok = False
            log.warning("webhook_store_unavailable", provider=name, error=type(exc).__name__)
            return web.json_response(
                {"error": {"code": "unavailable", "message": "try again later"}}, status=503
            )
        except psycopg.Error as exc:
            # Verified but refused by the table's rules (a NUL escape jsonb cannot hold, an
            # identifier too long): a retry would be refused the same way.
            return self._refuse(
                name,
                "unstorable",
                400,
                f"the notification cannot be stored (SQLSTATE {exc.sqlstate})",
                len(body),
                # The rule that refused it, never the message: PostgreSQL's text may quote
                # the refused value.
                sqlstate=exc.sqlstate,
                rule=exc.diag.constraint_name,
            )
        self.database_ok = True
        if stored_any:
            metrics.WEBHOOKS_RECEIVED.labels(provider=name).inc(len(notifications) - duplicates)
            if self._kill_after_commit:
                os.kill(os.getpid(), signal.SIGKILL)
        if duplicates:
            metrics.WEBHOOKS_DUPLICATES.labels(provider=name).inc(duplicates)
        if batch:
            # Adyen expects a 2xx, the legacy body `[accepted]` is what its docs show.
            return web.Response(text=getattr(reader, "acknowledgement", "[accepted]"))
        first = notifications[0][0].event_id
        if stored_any:
            return web.json_response({"received": first})
        return web.json_response({"received": first, "duplicate": True})

    async def readyz(self, _request: web.Request) -> web.Response:
        try:
            with anyio.fail_after(2.0):
                await self.db.fetch_all("schema_version", row=dict_row)
        except (TimeoutError, psycopg.Error, PoolTimeout):
            self.database_ok = False
            return web.json_response(
                {"status": "unavailable", "problems": ["database unreachable"]}, status=503
            )
        self.database_ok = True
        return web.json_response({"status": "ok"})


def build_receiver_app(receiver: WebhookReceiver) -> web.Application:
    async def healthz(_request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def metrics_view(_request: web.Request) -> web.Response:
        return web.Response(
            body=prometheus_client.generate_latest(),
            headers={"Content-Type": prometheus_client.CONTENT_TYPE_LATEST},
        )

    async def not_found(request: web.Request) -> web.Response:
        return receiver._refuse(
            "-",
            "unknown_route",
            404,
            "no webhook endpoint is configured at this path",
            request.content_length or 0,
        )

    # The body limit is enforced by WebhookReceiver._body (counted, 413); aiohttp's own
    # limit is set above it so it never answers first.
    app = web.Application(client_max_size=receiver.max_body_bytes + 1024)
    app.router.add_post("/webhooks/{provider}", receiver.receive)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", receiver.readyz)
    app.router.add_get("/metrics", metrics_view)
    app.router.add_route("*", "/{tail:.*}", not_found)
    return app


async def serve_webhooks(
    receiver: WebhookReceiver,
    host: str,
    port: int,
    *,
    task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until SIGTERM/SIGINT (or cancelled); ``task_status`` gets the bound port.
    A stop finishes requests in progress (their rows commit and are answered) first."""
    await receiver.db.open()
    runner = web.AppRunner(build_receiver_app(receiver), access_log=None, shutdown_timeout=10.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = int(runner.addresses[0][1])
        log.info(
            "webhooks_listening",
            host=host,
            port=bound,
            routes=[f"/webhooks/{name}" for name in sorted(receiver.readers)],
            database=describe_conninfo(receiver.db.conninfo),
        )
        task_status.started(bound)
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("webhooks_stopping", signal=signal.Signals(signum).name)
                break
    finally:
        with anyio.CancelScope(shield=True):
            await runner.cleanup()
            await receiver.db.close()
