"""Guard rails, run: every relay compares each guarded canary with its baseline and rolls a
worse canary back to weight 0 (sql/0067; docs/routing.md, "Guard rails").

One :class:`GuardRails` per relay process, owned by the service's task group. Every
``interval_seconds`` (x0.75-1.25 jitter, so replicas do not query in step) it reads the
guards and the outcomes of the payments each rule routed in its window from the database
(statements ``guard_rails_list`` and ``guard_rail_window``, which reads the window once): the
intents themselves are the source, so a fleet counts each payment once, whichever relay ran
it, and a relay that starts late sees the same window as the others. Codes are classed by
the error catalogue; the comparison is :func:`relay.domain.guard_rails.evaluate`.

Guarantees, each tested:

* a canary that is worse by a margin, with ``min_samples`` outcomes on each side, is set to
  weight 0 by ``outbox.routing_guard_rollback_v1``: the rule's own UPDATE (version, audit row
  with actor ``relay:<instance>`` and the comparison as the reason), an event
  ``routing.guard_rail.rolled_back``, and the guard's ``rolled_back_at``; new payments go to
  the other targets from the next INSERT, payments already started keep their provider;
* the rollback is conditional (the canary still above 0, the guard still on and naming
  it): when several relays reach the verdict, one writes it and the others find nothing to
  do; only the one that wrote counts ``outbox_relay_guard_rail_rollbacks_total``;
* a guard whose canary is at 0 already (rolled back, or not started) is not compared;
* the gauges (``outbox_relay_guard_rail_rate_bp``, ``_samples``, ``_latency_ms``,
  ``_canary_worse``) are set for every enabled guard each turn;
* a database error ends the turn, never the relay (again next interval).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import structlog
from psycopg.rows import dict_row

from provider_adapters import error_catalogue
from relay.domain.guard_rails import (
    GuardRail,
    SideCounts,
    Verdict,
    classify,
    evaluate,
    rate_bp,
)
from relay.infra import metrics
from relay.infra.db import Database, every_interval
from relay.infra.redaction import safe_label

__all__ = ["GuardRailTurn", "GuardRails", "code_class"]

log = structlog.get_logger("relay.service.guard_rails")


def code_class(kind: str, code: str | None) -> str | None:
    """The error catalogue's class of ``code`` as a provider of ``kind`` reports it."""
    if code is None:
        return None
    entry = error_catalogue.lookup(kind, code)
    return None if entry is None else entry.klass


@dataclass(frozen=True, slots=True)
class GuardRailTurn:
    """What one guard's evaluation found, and whether this relay rolled its canary back."""

    guard: GuardRail
    canary: SideCounts
    baseline: SideCounts
    verdict: Verdict
    rolled_back: bool


class GuardRails:
    def __init__(
        self,
        db: Database,
        *,
        instance: str,
        interval_seconds: float = 15.0,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.db = db
        self.instance = instance
        self.interval_seconds = interval_seconds
        self.rng = rng
        self.turns = 0

    async def evaluate_once(self, *, now: datetime | None = None) -> list[GuardRailTurn]:
        """Compare every enabled guard whose canary takes traffic; roll back the worse ones.
        Raises on a database error."""
        guards = [
            row
            for row in await self.db.fetch_all("guard_rails_list", row=dict_row)
            if row["enabled"]
        ]
        if not guards:
            self.turns += 1
            return []
        outcomes = await self.db.fetch_all("guard_rail_window", {"now": now}, row=dict_row)
        latency = {
            (row["rule_name"], row["provider"]): int(row["latency_ms"])
            for row in outcomes
            if row["latency_ms"] is not None
        }
        classes: dict[tuple[str, str], list[tuple[str | None, int]]] = {}
        for row in outcomes:
            klass = classify(
                row["status"], row["error_code"], code_class(row["kind"], row["error_code"])
            )
            classes.setdefault((row["rule_name"], row["provider"]), []).append(
                (klass, int(row["intents"]))
            )
        turns = []
        for row in guards:
            try:
                guard = _guard(row)
            except ValueError as exc:  # the table's checks mirror these: a later schema's row
                log.warning("guard_rail_skipped", rule=row["rule_name"], error=str(exc))
                continue
            canary, baseline = (
                SideCounts.tally(
                    provider,
                    classes.get((guard.rule, provider), ()),
                    latency.get((guard.rule, provider)),
                )
                for provider in (guard.canary, guard.baseline)
            )
            taking_traffic = bool(row["rule_enabled"]) and (row["canary_weight"] or 0) > 0
            verdict = evaluate(guard, canary, baseline)
            rolled_back = False
            if taking_traffic and verdict.rollback:
                rolled_back = await self._roll_back(guard, verdict)
            self._publish(guard, canary, baseline, verdict if taking_traffic else None)
            turns.append(GuardRailTurn(guard, canary, baseline, verdict, rolled_back))
        self.turns += 1
        return turns

    async def _roll_back(self, guard: GuardRail, verdict: Verdict) -> bool:
        comparison = {
            c.measure: {
                "canary": c.canary,
                "baseline": c.baseline,
                "margin": c.margin,
                "worse": c.worse,
            }
            for c in verdict.comparisons
        }
        rows = await self.db.fetch_all(
            "guard_rail_rollback",
            {
                "instance": self.instance,
                "rule": guard.rule,
                "canary": guard.canary,
                "reason": verdict.reason,
                "comparison": json.dumps(comparison, sort_keys=True),
            },
            row=dict_row,
        )
        if not rows or rows[0]["id"] is None:
            return False  # another relay was first, or an operator changed the rule
        metrics.GUARD_RAIL_ROLLBACKS.labels(
            rule=safe_label(guard.rule), canary=safe_label(guard.canary)
        ).inc()
        log.warning(
            "guard_rail_rollback",
            rule=guard.rule,
            canary=guard.canary,
            baseline=guard.baseline,
            rule_version=rows[0]["version"],
            reason=verdict.reason,
            remedy="fix the canary, then raise its weight: outbox-relay routes weights",
        )
        return True

    @staticmethod
    def _publish(
        guard: GuardRail, canary: SideCounts, baseline: SideCounts, verdict: Verdict | None
    ) -> None:
        rule = safe_label(guard.rule)
        # The rollback counter's series exists at 0 before its first rollback, so that the
        # alert's increase() sees the step to 1 (a series born at 1 has no increase).
        metrics.GUARD_RAIL_ROLLBACKS.labels(rule=rule, canary=safe_label(guard.canary))
        for side, counts in (("canary", canary), ("baseline", baseline)):
            provider = safe_label(counts.provider)
            samples = counts.samples
            metrics.GUARD_RAIL_SAMPLES.labels(rule=rule, side=side, provider=provider).set(samples)
            for measure, part in (("failures", counts.failures), ("ambiguous", counts.ambiguous)):
                metrics.GUARD_RAIL_RATE_BP.labels(
                    rule=rule, side=side, provider=provider, measure=measure
                ).set(rate_bp(part, samples))
            metrics.GUARD_RAIL_LATENCY_MS.labels(rule=rule, side=side, provider=provider).set(
                counts.latency_ms or 0
            )
        metrics.GUARD_RAIL_WORSE.labels(rule=rule).set(
            1 if verdict is not None and verdict.rollback else 0
        )

    async def run(self) -> None:
        """Evaluate every ``interval_seconds`` (x0.75-1.25 jitter) until cancelled."""
        await every_interval("guard_rails", self.evaluate_once, self.interval_seconds, self.rng)


def _guard(row: dict[str, Any]) -> GuardRail:
    return GuardRail(
        rule=row["rule_name"],
        canary=row["canary"],
        baseline=row["baseline"],
        window_seconds=int(row["window_seconds"]),
        min_samples=int(row["min_samples"]),
        failure_margin_bp=row["failure_margin_bp"],
        ambiguous_margin_bp=row["ambiguous_margin_bp"],
        latency_percentile=int(row["latency_percentile"]),
        latency_margin_ms=row["latency_margin_ms"],
    )
