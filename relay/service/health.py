"""The relay's HTTP face: /metrics (Prometheus), /healthz (liveness), /readyz (readiness).

* /healthz answers 200 while every loop it watches keeps turning: the claim loop (its
  heartbeat), the write-back (no write to the database running longer than
  ``stale_after_seconds``) and the event publisher (its heartbeat, when there is one). It
  does not look at the database: a database outage is handled by backing off, and
  restarting the pod would not help, so liveness must not fail for it. While draining it
  stays 200 whatever the heartbeats say: the claim loop stops turning on purpose, and the
  drain ends by its own deadline (RELAY_SHUTDOWN_GRACE_SECONDS), not by a liveness kill.
* /readyz answers 200 when the last claim reached the database, the schema is at or
  above the relay's own latest migration, and the relay is not draining; 503 with the
  reasons otherwise. A newer schema is ready: migrations are append-only and backward
  compatible (relay/infra/migrate.py; the README's "Upgrades"), so during a rolling upgrade
  the relays still on the old version keep serving after the new version's migration ran.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import anyio
import prometheus_client
import structlog
from aiohttp import web
from anyio.abc import TaskStatus

__all__ = ["HealthState", "Heartbeat", "HttpPortUnavailable", "serve_http"]

log = structlog.get_logger("relay.service.health")


class HttpPortUnavailable(RuntimeError):
    code = "http_port_unavailable"


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """A loop liveness watches: ``last_turn`` is the anyio clock of its last turn.

    Fails liveness when the loop has not turned for ``stale_after_seconds``. A loop that
    only works on demand gives ``busy_since`` instead (the start of the work in progress,
    None while idle): it fails when one piece of work runs that long.
    """

    name: str
    stale_after_seconds: float
    last_turn: Callable[[], float] | None = None
    busy_since: Callable[[], float | None] | None = None

    def problem(self, now: float) -> str | None:
        if self.last_turn is not None:
            age = now - self.last_turn()
            if age > self.stale_after_seconds:
                return f"{self.name} has not turned for {age:.0f} s"
        if self.busy_since is not None:
            since = self.busy_since()
            if since is not None and now - since > self.stale_after_seconds:
                return f"{self.name} has been stuck for {now - since:.0f} s"
        return None


@dataclass
class HealthState:
    """What the probes report; the runtime and the schema watcher keep it current."""

    heartbeat: Callable[[], float]  # anyio clock of the claim loop's last turn
    database_ok: Callable[[], bool]
    draining: Callable[[], bool]
    stale_after_seconds: float
    expected_schema: str  # the relay's own latest migration: the oldest schema it runs on
    schema_version: str | None = None
    started: bool = False
    # Readiness reasons of the moment beyond the above (start-up's wait for the database).
    extra_problems: list[str] = field(default_factory=list)
    # Other loops liveness watches (the write-back, the publisher), besides the claim loop.
    loops: list[Heartbeat] = field(default_factory=list)
    clock: Callable[[], float] = anyio.current_time

    def liveness_problems(self) -> list[str]:
        if not self.started:
            return []  # starting up: readiness, not liveness, holds traffic back
        if self.draining():
            # The claim loop has stopped on purpose and the drain has its own deadline;
            # a liveness kill would only cut the drain short.
            return []
        now = self.clock()
        claim = Heartbeat("claim loop", self.stale_after_seconds, last_turn=self.heartbeat)
        return [p for loop in (claim, *self.loops) if (p := loop.problem(now)) is not None]

    def readiness_problems(self) -> list[str]:
        problems = list(self.liveness_problems())
        if not self.started:
            problems.append("starting")
        if self.draining():
            problems.append("draining")
        if not self.database_ok():
            problems.append("database unreachable")
        problems.extend(self.extra_problems)
        if self.schema_version is None:
            problems.append(
                f"schema not found (no migration applied), relay needs "
                f"{self.expected_schema}: run `outbox-relay migrate`"
            )
        elif _version_key(self.schema_version) < _version_key(self.expected_schema):
            problems.append(
                f"schema behind: at {self.schema_version}, relay needs "
                f"{self.expected_schema}: run `outbox-relay migrate`"
            )
        # Ahead is fine: a newer relay migrated first (rolling upgrade), and migrations
        # keep every older relay working (append-only, backward compatible).
        return problems


def _version_key(version: str) -> tuple[int, str]:
    """Migration versions are zero-padded numbers ("0012"); compare them as numbers."""
    return (int(version), version) if version.isdigit() else (-1, version)


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
