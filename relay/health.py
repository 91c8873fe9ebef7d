"""The relay's HTTP face: /metrics (Prometheus), /healthz (liveness), /readyz (readiness).

* /healthz answers 200 while the claim loop keeps turning. It does not look at the
  database: a database outage is handled by backing off, and restarting the pod would not
  help, so liveness must not fail for it.
* /readyz answers 200 when the last claim reached the database, the schema is at the
  version this relay ships, and the relay is not draining; 503 with the reasons otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import anyio
import prometheus_client
import structlog
from aiohttp import web
from anyio.abc import TaskStatus

__all__ = ["HealthState", "HttpPortUnavailable", "serve_http"]

log = structlog.get_logger("relay.health")


class HttpPortUnavailable(RuntimeError):
    code = "http_port_unavailable"


@dataclass
class HealthState:
    """What the probes report; the runtime and the schema watcher keep it current."""

    heartbeat: Callable[[], float]  # anyio clock of the claim loop's last turn
    database_ok: Callable[[], bool]
    draining: Callable[[], bool]
    stale_after_seconds: float
    expected_schema: str
    schema_version: str | None = None
    started: bool = False
    extra_problems: list[str] = field(default_factory=list)

    def liveness_problems(self) -> list[str]:
        if not self.started:
            return []  # starting up: readiness, not liveness, holds traffic back
        age = anyio.current_time() - self.heartbeat()
        if age > self.stale_after_seconds:
            return [f"claim loop has not turned for {age:.0f} s"]
        return []

    def readiness_problems(self) -> list[str]:
        problems = list(self.liveness_problems())
        if not self.started:
            problems.append("starting")
        if self.draining():
            problems.append("draining")
        if not self.database_ok():
            problems.append("database unreachable")
        if self.schema_version != self.expected_schema:
            problems.append(
                f"schema at {self.schema_version or 'nothing'}, relay needs "
                f"{self.expected_schema}: run `outbox-relay migrate`"
            )
        return problems


def _answer(problems: list[str]) -> web.Response:
    if problems:
        return web.json_response({"status": "unavailable", "problems": problems}, status=503)
    return web.json_response({"status": "ok"})


def build_app(state: HealthState) -> web.Application:
    async def healthz(_request: web.Request) -> web.Response:
        return _answer(state.liveness_problems())

    async def readyz(_request: web.Request) -> web.Response:
        return _answer(state.readiness_problems())

    async def metrics(_request: web.Request) -> web.Response:
        body = prometheus_client.generate_latest()
        return web.Response(
            body=body, headers={"Content-Type": prometheus_client.CONTENT_TYPE_LATEST}
        )

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app


async def serve_http(
    host: str,
    port: int,
    state: HealthState,
    *,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled; started once the port is bound."""
    runner = web.AppRunner(build_app(state), access_log=None)
    await runner.setup()
    try:
        try:
            await web.TCPSite(runner, host, port).start()
        except OSError as exc:
            raise HttpPortUnavailable(
                f"RELAY_HTTP_PORT {port} on {host} is not available ({exc.strerror}); "
                "choose a free port, or set RELAY_HTTP_PORT=0 to turn /metrics, /healthz "
                "and /readyz off"
            ) from None
        task_status.started()
        log.info("http_listening", host=host, port=port, paths=["/metrics", "/healthz", "/readyz"])
        await anyio.sleep_forever()
    finally:
        with anyio.CancelScope(shield=True):
            await runner.cleanup()
