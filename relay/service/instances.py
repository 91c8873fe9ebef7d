"""This relay's row of ``outbox.relay_instances`` (sql/0018): the providers it serves, and
the API version it pins for each (sql/0045; ``tested`` false only under the override).

`outbox-relay status`, the ``outbox_relay_unserved_intents`` gauge and the alert
OutboxRelayUnservedIntents read these rows to name the providers no running relay serves
(:mod:`relay.domain.serving`). The report is its own task with its own interval
(RELAY_HEARTBEAT_INTERVAL_SECONDS), always on: it does not depend on the queue-depth
sampler, which an operator may turn off. Guarantees, each tested:

* :meth:`InstanceHeartbeat.run` upserts the row once before it reports started, then every
  ``interval_seconds`` (x0.75-1.25 jitter, so replicas do not write in step); one small
  write per interval, nothing on the claim path;
* a row is live while its heartbeat is within max(3 of its intervals, 30 s) (statement
  ``relay_instances``): a killed relay's row ages out; rows unseen for a day are pruned;
* :meth:`InstanceHeartbeat.withdraw` (clean shutdown) stops the beats, waits for one in
  progress to end, then deletes the row: a stopped relay serves nothing at once;
* a failed beat (database away, schema behind) is logged and retried next interval; it
  never stops the relay.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime

import anyio
from anyio.abc import TaskStatus

from relay.infra.db import Database, again_next_interval

__all__ = ["InstanceHeartbeat"]


class InstanceHeartbeat:
    def __init__(
        self,
        db: Database,
        *,
        instance: str,
        providers: Iterable[str],
        interval_seconds: float = 10.0,
        rng: Callable[[], float] = random.random,
        api_versions: Mapping[str, Mapping[str, object]] | None = None,
    ) -> None:
        self.db = db
        self.instance = instance
        self.providers = sorted(set(providers))
        # {"<provider>": {"kind": ..., "version": ..., "tested": bool}}
        self.api_versions = {name: dict(v) for name, v in (api_versions or {}).items()}
        self.interval_seconds = interval_seconds
        self.rng = rng
        self.beats = 0
        self._stop = anyio.Event()
        self._stopped: anyio.Event | None = None  # set by run() when it ends

    async def beat(self, *, now: datetime | None = None) -> None:
        """Upsert this relay's row once; raises on a database error."""
        await self.db.fetch_all(
            "relay_heartbeat",
            {
                "instance": self.instance,
                "providers": self.providers,
                "interval_seconds": self.interval_seconds,
                "api_versions": json.dumps(self.api_versions, sort_keys=True),
                "now": now,
            },
        )
        self.beats += 1

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Beat until :meth:`withdraw`; started after the first attempt."""
        self._stopped = stopped = anyio.Event()
        try:
            while not self._stop.is_set():
                with again_next_interval("relay_heartbeat"):
                    await self.beat()
                task_status.started()
                task_status = anyio.TASK_STATUS_IGNORED
                with anyio.move_on_after(self.interval_seconds * (0.75 + self.rng() / 2)):
                    await self._stop.wait()
        finally:
            stopped.set()

    async def withdraw(self) -> None:
        """Clean shutdown: no more beats, then this relay's row deleted. A beat in progress
        ends first, so it cannot write the row back after the delete."""
        self._stop.set()
        if self._stopped is not None:
            await self._stopped.wait()
        await self.db.fetch_all("relay_withdraw", {"instance": self.instance})
