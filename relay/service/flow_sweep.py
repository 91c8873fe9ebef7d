"""The flow sweeper: enforce flow deadlines and the per-provider authorisation policy.

PostgreSQL fires nothing at a deadline, so every ``interval_seconds`` (jittered) each relay
runs one short transaction (``flow_sweep``): ``outbox.flow_sweep_v1`` advances every running
flow whose next deadline passed (it then compensates, audited and with its event, as any
advance; SKIP LOCKED, so replicas sweep side by side and a flow a write-back holds is left to
it), and ``outbox.authorization_sweep_v2`` inserts the void of each aged authorisation that
no flow covers on a provider whose policy is ``void`` (one sweeper at a time) and counts, per
provider and policy, those that stay uncovered (the gauge
``outbox_relay_uncovered_authorizations``), from one computation of them. A database error
is logged and the next interval tries again: the sweep is idempotent.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import structlog
from psycopg.rows import dict_row

from relay.infra import metrics
from relay.infra.db import Database, every_interval
from relay.infra.redaction import safe_label

__all__ = ["FlowSweeper", "SweepResult"]

log = structlog.get_logger("relay.service.flow_sweep")


@dataclass(frozen=True, slots=True)
class SweepResult:
    flows: int
    voids: int
    uncovered: dict[tuple[str, str], int]


class FlowSweeper:
    def __init__(
        self,
        db: Database,
        *,
        instance: str,
        interval_seconds: float = 5.0,
        batch_size: int = 100,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.db = db
        self.instance = instance
        self.interval_seconds = interval_seconds
        self.batch_size = batch_size
        self.rng = rng
        # Every (provider, policy) ever reported: its series drops to 0 rather than go stale.
        self.known: set[tuple[str, str]] = set()

    async def sweep_once(self, *, now: datetime | None = None) -> SweepResult:
        """One sweep as of ``now`` (None: the database's clock); raises on a database error."""
        (row,) = await self.db.fetch_all(
            "flow_sweep",
            {"instance": self.instance, "now": now, "limit": self.batch_size},
            row=dict_row,
        )
        flows, voids = int(row["flows"]), int(row["voids"])
        if flows:
            metrics.FLOWS_EXPIRED.inc(flows)
            log.info("flows_past_deadline_advanced", flows=flows)
        if voids:
            metrics.UNCOVERED_AUTHORIZATIONS_VOIDED.inc(voids)
            log.warning("uncovered_authorizations_voided", voids=voids)
        uncovered = {
            (safe_label(provider), str(policy)): int(count)
            for provider, policy, count in zip(
                row["providers"], row["policies"], row["authorizations"], strict=True
            )
        }
        for key in self.known | set(uncovered):
            metrics.UNCOVERED_AUTHORIZATIONS.labels(provider=key[0], policy=key[1]).set(
                uncovered.get(key, 0)
            )
        self.known |= set(uncovered)
        return SweepResult(flows, voids, uncovered)

    async def run(self) -> None:
        """Sweep every ``interval_seconds`` (x0.75-1.25 jitter) until cancelled."""
        await every_interval("flow_sweep", self.sweep_once, self.interval_seconds, self.rng)
