"""The janitor: settle intents whose outcome is unknown by looking them up at the provider.

Which intents: every ``dead`` intent of a provider this relay serves. An intent dies with
its outcome unknown when its retry budget ran out on ambiguous replies, or when it was
first sent longer ago than the provider keeps idempotency keys (a database trigger parks
it then, error_code ``idempotency_key_expired``, rather than let the relay send the key
again). Dead intents whose outcome is known (an invalid request) are looked up too: a
lookup never changes anything at the provider, and it confirms there was no effect.

What happens, per intent (each step written to the audit trail as ``janitor:<instance>``):

* the provider shows the effect -> the intent is settled ``succeeded`` through the
  relay's own fenced write-back (payment state, ledger posting, result event, promotion
  of the payment's next intent), with the lookup's evidence as the audit row's reason;
* the provider shows a decline -> settled ``failed`` the same way;
* no trace -> looked up again on the backoff schedule (a search index may lag); after
  ``not_found_confirmations`` lookups in a row it is recorded as ``no_effect``: the intent
  stays dead for an operator, who can now re-drive it safely;
* the lookup fails -> tried again on the backoff schedule.

The schedule: the n-th check of an intent is due ``backoff_base_seconds * 2**(n-1)``
(capped at ``backoff_cap_seconds``, jittered +-25 %) after the previous one. Replicas
share the work: each reserves its batch with ``SKIP LOCKED`` and a short reservation.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

import anyio
import anyio.lowlevel
import structlog
from psycopg.rows import dict_row

from provider_adapters.base import (
    Declined,
    Invalid,
    Outcome,
    Retryable,
    Succeeded,
)
from relay.core.lanes import Lane
from relay.core.store import Store
from relay.domain.intents import IntentRow, payment_from_columns
from relay.domain.outcome_mapping import from_outcome
from relay.domain.retry_policy import RetryPolicy
from relay.domain.state_machine import Rejection, decide
from relay.infra import metrics
from relay.infra.db import RETRYABLE_DB_ERRORS, Database, fetch
from relay.infra.queries import QUERIES
from relay.infra.rows import columns_row
from relay.infra.shutdown import CutOffShields

__all__ = ["Janitor", "JanitorOptions", "JanitorPass", "next_check_delay"]

log = structlog.get_logger("relay.core.janitor")


@dataclass(frozen=True, slots=True)
class JanitorOptions:
    instance: str
    interval_seconds: float = 60.0
    batch_size: int = 50
    concurrency: int = 4
    backoff_base_seconds: float = 60.0
    backoff_cap_seconds: float = 6 * 3600.0
    not_found_confirmations: int = 3
    reservation_seconds: float = 120.0
    lease_seconds: float = 60.0


@dataclass
class JanitorPass:
    """What one pass did, by result (settled_succeeded, no_effect, lookup_failed...)."""

    examined: int = 0
    results: dict[str, int] = field(default_factory=dict)

    def count(self, result: str) -> None:
        self.results[result] = self.results.get(result, 0) + 1


def next_check_delay(
    checks: int, base_seconds: float, cap_seconds: float, rng: Callable[[], float]
) -> float:
    """Seconds until the next lookup after ``checks`` lookups (>= 1): doubling, capped, +-25 %."""
    delay: float = min(base_seconds * 2.0 ** max(checks - 1, 0), cap_seconds)
    return delay * (0.75 + rng() / 2)


@dataclass(frozen=True, slots=True)
class _Candidate:
    """A dead intent reserved for a lookup (a janitor_reserve row), read without a lease."""

    intent: IntentRow
    dead_at: datetime | None  # the intent's completed_at: which death this check is about
    error_code: str | None
    checks: int
    not_found: int


def _candidate(
    dead_at: datetime | None,
    error_code: str | None,
    checks: int,
    not_found: int,
    **intent_columns: Any,
) -> _Candidate:
    """janitor_reserve's row: the janitor_checks columns by name, the rest are the intent's."""
    return _Candidate(
        intent=IntentRow.from_columns(**intent_columns),
        dead_at=dead_at,
        error_code=error_code,
        checks=checks,
        not_found=not_found,
    )


_CANDIDATES = columns_row(_candidate)


def _taken_back(intent: IntentRow, lease_token: int, **payment_columns: Any) -> IntentRow:
    """The intent under the lease janitor_take gave it, with its payment as locked now."""
    payment = payment_from_columns(intent.currency, **payment_columns)
    return replace(intent, lease_token=lease_token, payment=payment)


# Settlement goes through the relay's write-back; this policy is never asked to retry.
_NO_RETRY = RetryPolicy(base_seconds=1.0, cap_seconds=1.0, max_attempts=1)
# A settlement is one short transaction; this only bounds a database that stopped answering.
_SETTLE_SECONDS = 30.0


class Janitor:
    def __init__(
        self,
        db: Database,
        lanes: Mapping[str, Lane],
        options: JanitorOptions,
        *,
        rng: Callable[[], float] = random.random,
        stopping: Callable[[], bool] = lambda: False,
    ) -> None:
        self.db = db
        self.lanes = dict(lanes)
        self.options = options
        self.rng = rng
        self.stopping = stopping
        self.actor = f"janitor:{options.instance}"
        self.store = Store(db, actor=self.actor)
        # A settlement is one shielded transaction; a shutdown bounds it at the relay's
        # in-flight cut-off (cut_off(), called by Relay.stop()), also when already started.
        self._settling = CutOffShields()

    def cut_off(self, at: float) -> None:
        """End settlements (in progress or later) by ``at`` (anyio clock); one cut short
        rolls back whole and the intent is looked up again by the next pass."""
        self._settling.cut_off(at)

    async def run_forever(self) -> None:
        """Pass after pass; a full batch means more is due, so the next pass starts at once.
        Returns once the relay drains (``stopping``), between passes."""
        while not self.stopping():
            try:
                done = await self.run_once()
            except RETRYABLE_DB_ERRORS as exc:
                log.warning("janitor_db_error", error=type(exc).__name__)
                done = JanitorPass()
            if done.examined:
                log.info("janitor_pass", examined=done.examined, results=done.results)
            if done.examined < self.options.batch_size:
                await anyio.sleep(self.options.interval_seconds * (0.5 + self.rng()))
            else:
                await anyio.lowlevel.checkpoint()

    async def run_once(self, *, now: datetime | None = None) -> JanitorPass:
        """Reserve the dead intents that are due, look each up, settle or reschedule it."""
        done = JanitorPass()
        if not self.lanes:
            return done
        candidates = await self._reserve(now)
        done.examined = len(candidates)
        limiter = anyio.CapacityLimiter(self.options.concurrency)

        async def one(candidate: _Candidate) -> None:
            async with limiter:
                result = await self._examine(candidate)
            done.count(result)
            metrics.JANITOR_RESULTS.labels(provider=candidate.intent.provider, result=result).inc()

        async with anyio.create_task_group() as tg:
            for candidate in candidates:
                tg.start_soon(one, candidate)
        return done

    # -- steps ---------------------------------------------------------------------------

    async def _reserve(self, now: datetime | None) -> list[_Candidate]:
        params = {
            "providers": sorted(self.lanes),
            "limit": self.options.batch_size,
            "reservation_seconds": self.options.reservation_seconds,
            "now": now,
        }
        async with self.db.pool.connection() as conn, conn.transaction():
            await conn.execute(QUERIES["set_actor"], {"actor": self.actor, "reason": None})
            return await fetch(conn, "janitor_reserve", params, row=_CANDIDATES)

    async def _examine(self, candidate: _Candidate) -> str:
        intent = candidate.intent
        with structlog.contextvars.bound_contextvars(
            intent_id=intent.id, payment_id=intent.payment_id
        ):
            decision = decide(intent.action, intent.amount_minor, intent.payment)
            if isinstance(decision, Rejection):
                await self._record(
                    candidate,
                    "not_settleable",
                    f"the payment ({intent.payment.state}) no longer allows this "
                    f"{intent.action}: {decision.error_code}; an operator decides",
                    settled=True,
                )
                return "not_settleable"
            command = intent.command(decision.amount_minor)
            outcome = await self.lanes[intent.provider].lookup(command)
            log.info("janitor_lookup", outcome=type(outcome).__name__)
            if isinstance(outcome, Succeeded | Declined):
                return await self._settle(candidate, decision.amount_minor, outcome)
            if isinstance(outcome, Retryable | Invalid):
                return await self._not_found(candidate, outcome)
            return await self._lookup_failed(candidate, outcome)

    async def _settle(
        self, candidate: _Candidate, amount_minor: int, outcome: Succeeded | Declined
    ) -> str:
        """Take the dead intent back under a lease and write the outcome through the
        relay's own fenced write-back (payment state, ledger posting, result event,
        promotion of the payment's next intent), all in ONE transaction: nobody ever sees
        the intent in flight. Shielded, so a stop cannot cut it in half."""
        if isinstance(outcome, Succeeded):
            evidence = (
                f"janitor lookup: the provider shows the {candidate.intent.action} applied "
                f"({outcome.provider_reference}, {outcome.amount_minor} {outcome.currency})"
            )
        else:
            evidence = f"janitor lookup: the provider shows a decline ({outcome.code})"
        with self._settling.shielded(_SETTLE_SECONDS):
            return await self._settle_once(candidate, amount_minor, outcome, evidence)
        log.warning("janitor_settle_cut_off", intent_id=candidate.intent.id, remedy="next pass")
        return "skipped"

    async def _settle_once(
        self,
        candidate: _Candidate,
        amount_minor: int,
        outcome: Succeeded | Declined,
        evidence: str,
    ) -> str:
        async with self.db.pool.connection() as conn, conn.transaction():
            await conn.execute(QUERIES["set_actor"], {"actor": self.actor, "reason": evidence})
            await conn.execute(
                QUERIES["lock_payments"], {"payment_ids": [candidate.intent.payment_id]}
            )
            taken = await fetch(
                conn,
                "janitor_take",
                {
                    "id": candidate.intent.id,
                    "dead_at": candidate.dead_at,
                    "lease_seconds": self.options.lease_seconds,
                    "instance": self.actor,
                },
                row=dict_row,
            )
            if not taken:
                return "skipped"  # re-driven or cancelled meanwhile: not ours to settle
            (lease,) = taken
            intent = _taken_back(candidate.intent, **lease)
            write_back = from_outcome(intent, amount_minor, outcome, _NO_RETRY, self.rng)
            written = await self.store.complete_in(conn, [write_back], reason=evidence)
        if candidate.intent.id not in written:
            return "skipped"
        result = {"succeeded": "settled_succeeded", "failed": "settled_failed"}.get(
            write_back.status, "not_settleable"
        )
        detail = evidence if result != "not_settleable" else (write_back.error_message or "")
        await self._record(candidate, result, detail, settled=True)
        log.info("janitor_settled", result=result, status=write_back.status)
        return result

    async def _not_found(self, candidate: _Candidate, outcome: Retryable | Invalid) -> str:
        seen = candidate.not_found + 1
        if seen >= self.options.not_found_confirmations:
            await self._record(
                candidate,
                "no_effect",
                f"{seen} lookups found no trace of this {candidate.intent.action} at the provider "
                f"(last: {outcome.code}); it is safe to re-drive",
                settled=True,
                not_found=seen,
            )
            return "no_effect"
        await self._record(
            candidate,
            "not_found_yet",
            f"lookup {seen} of {self.options.not_found_confirmations} found no trace "
            f"({outcome.code}); looked up again later",
            not_found=seen,
        )
        return "not_found_yet"

    async def _lookup_failed(self, candidate: _Candidate, outcome: Outcome) -> str:
        code = getattr(outcome, "code", type(outcome).__name__)
        await self._record(
            candidate, "lookup_failed", f"the lookup failed ({code}); tried again later"
        )
        return "lookup_failed"

    async def _record(
        self,
        candidate: _Candidate,
        result: str,
        detail: str,
        *,
        settled: bool = False,
        not_found: int | None = None,
    ) -> None:
        checks = candidate.checks + 1
        delay = next_check_delay(
            checks, self.options.backoff_base_seconds, self.options.backoff_cap_seconds, self.rng
        )
        async with self.db.pool.connection() as conn, conn.transaction():
            await conn.execute(QUERIES["set_actor"], {"actor": self.actor, "reason": None})
            await conn.execute(
                QUERIES["janitor_record"],
                {
                    "intent_id": candidate.intent.id,
                    "checks": checks,
                    "not_found": candidate.not_found if not_found is None else not_found,
                    "result": result,
                    "detail": detail[:500],
                    "next_check_seconds": delay,
                    "settled": settled,
                },
            )
