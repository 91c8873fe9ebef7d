"""Domain operations on the outbox tables: claim, complete, requeue, release.

Every statement comes from queries.sql. Guarantees:

* :meth:`Store.claim` commits before returning: no transaction or lock outlives it.
* :meth:`Store.complete` writes a whole batch in one transaction; each row is fenced by
  its lease token, so an outcome from a relay whose lease expired is not written (its id is
  missing from the returned set). The payments of the batch are locked first, in
  payment_id order, so promotion of the next blocked intent sees every committed insert.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, NamedTuple

from psycopg import AsyncConnection
from psycopg.rows import TupleRow, dict_row, tuple_row

from relay.domain.intents import IntentRow, WriteBack
from relay.infra.db import Database, fetch
from relay.infra.queries import QUERIES
from relay.infra.rows import columns_row

__all__ = ["Failover", "Store"]

# Built once: psycopg calls a row factory per result, its row maker per row.
_CLAIMED = columns_row(IntentRow.from_columns)


def _fence(id: int, lease_token: int) -> tuple[int, int]:
    """complete_intents' row: the intent whose outcome was written, with its lease token."""
    return id, lease_token


_FENCES = columns_row(_fence)


class Failover(NamedTuple):
    """One intent moved to its rule's next target (sql/0064)."""

    intent_id: int
    payment_id: str
    from_provider: str
    to_provider: str
    idempotency_key: str


class Store:
    def __init__(self, db: Database, *, actor: str | None = None) -> None:
        self.db = db
        # Who the audit trail names for this store's writes ('relay:<instance>',
        # 'janitor:<instance>'); claims always name 'relay:<instance>' themselves.
        self.actor = actor

    async def _fetch_as_actor(self, name: str, params: Mapping[str, Any]) -> list[TupleRow]:
        """Run one statement in a transaction that names :attr:`actor` to the audit trail."""
        if self.actor is None:
            return await self.db.fetch_all(name, params)
        async with self.db.pool.connection() as conn, conn.transaction():
            await conn.execute(QUERIES["set_actor"], {"actor": self.actor, "reason": None})
            cur = await conn.execute(QUERIES[name], params)
            return await cur.fetchall()

    async def claim(
        self,
        provider: str,
        limit: int,
        *,
        lease_seconds: float,
        instance: str,
        now: datetime | None = None,
    ) -> list[IntentRow]:
        """Lease up to ``limit`` due intents of ``provider``, in id order, each with its
        ``lease_token`` set."""
        claimed = await self.db.fetch_all(
            "claim_intents",
            {
                "provider": provider,
                "limit": limit,
                "lease_seconds": lease_seconds,
                "instance": instance,
                "now": now,
            },
            row=_CLAIMED,
        )
        claimed.sort(key=lambda intent: intent.id)
        return claimed

    async def complete(
        self, batch: Sequence[WriteBack], *, now: datetime | None = None, reason: str | None = None
    ) -> set[int]:
        """Record ``batch`` in one transaction; return the ids whose fence held.

        The audit trail's rows name :attr:`actor` and ``reason``; a succeeded intent posts
        its ledger transaction in this same transaction (sql/0005's triggers).
        """
        return {
            intent_id for intent_id, _ in await self.complete_fenced(batch, now=now, reason=reason)
        }

    async def complete_fenced(
        self, batch: Sequence[WriteBack], *, now: datetime | None = None, reason: str | None = None
    ) -> set[tuple[int, int]]:
        """:meth:`complete`, returning (intent id, lease token) for each outcome written.

        A batch may hold a stale and the current outcome of one intent (the first waited
        for the database while the intent was claimed again); only the token tells which
        of the two was written.
        """
        if not batch:
            return set()
        # Pipeline mode sends BEGIN, set_actor, lock_payments and complete_intents without
        # waiting for each reply: two round trips per write-back instead of five, which is
        # what a busy event loop or a distant database makes expensive.
        async with self.db.pool.connection() as conn, conn.pipeline(), conn.transaction():
            return await self._complete_rows(conn, batch, now=now, reason=reason)

    async def complete_in(
        self,
        conn: AsyncConnection[TupleRow],
        batch: Sequence[WriteBack],
        *,
        now: datetime | None = None,
        reason: str | None = None,
    ) -> set[int]:
        """:meth:`complete` inside the caller's open transaction on ``conn`` (the janitor
        takes a dead intent back and settles it in one transaction)."""
        rows = await self._complete_rows(conn, batch, now=now, reason=reason)
        return {intent_id for intent_id, _ in rows}

    async def _complete_rows(
        self,
        conn: AsyncConnection[TupleRow],
        batch: Sequence[WriteBack],
        *,
        now: datetime | None,
        reason: str | None,
    ) -> set[tuple[int, int]]:
        params = {
            "ids": [w.intent_id for w in batch],
            "lease_tokens": [w.lease_token for w in batch],
            "statuses": [w.status for w in batch],
            "retry_delays": [w.retry_delay_seconds for w in batch],
            "provider_references": [w.provider_reference for w in batch],
            "amounts_applied": [w.amount_applied_minor for w in batch],
            "error_codes": [w.error_code for w in batch],
            "error_messages": [w.error_message for w in batch],
            "payment_states": [str(w.payment.state) if w.payment else None for w in batch],
            "authorized": [w.payment.authorized_minor if w.payment else None for w in batch],
            "captured": [w.payment.captured_minor if w.payment else None for w in batch],
            "refunded": [w.payment.refunded_minor if w.payment else None for w in batch],
            "payment_references": [
                w.payment.provider_reference if w.payment else None for w in batch
            ],
            "unsent": [w.unsent for w in batch],
            "now": now,
        }
        payment_ids = sorted({w.payment_id for w in batch})
        if self.actor is not None:
            await conn.execute(QUERIES["set_actor"], {"actor": self.actor, "reason": reason})
        await conn.execute(QUERIES["lock_payments"], {"payment_ids": payment_ids})
        return set(await fetch(conn, "complete_intents", params, row=_FENCES))

    async def requeue_expired(self, *, limit: int = 1000, now: datetime | None = None) -> int:
        rows = await self._fetch_as_actor("requeue_expired_leases", {"limit": limit, "now": now})
        return len(rows)

    async def promote_orphaned_blocked(
        self, providers: Sequence[str], *, limit: int = 1000, now: datetime | None = None
    ) -> list[tuple[int, str, str]]:
        """Promote blocked intents of ``providers`` whose earlier intents are all resolved;
        return (intent id, payment_id, provider) for each one promoted.

        Nothing else would move them: an application that inserts under REPEATABLE READ or
        SERIALIZABLE decides ``blocked`` from its snapshot, which may predate the write-back
        that resolved the earlier intent (and promoted nothing, the new one being invisible
        to it). The payments are locked first, as a write-back locks them, and payments
        locked by someone else are skipped for the next sweep: the promotion is decided
        under the same lock, by the same rule, as complete_intents' own.
        """
        if not providers:
            return []
        async with self.db.pool.connection() as conn, conn.transaction():
            if self.actor is not None:
                await conn.execute(
                    QUERIES["set_actor"],
                    {
                        "actor": self.actor,
                        "reason": "promoted: every earlier intent of its payment is resolved "
                        "(it was inserted blocked under an older snapshot)",
                    },
                )
            locked = await fetch(
                conn,
                "lock_orphaned_blocked_payments",
                {"providers": list(providers), "limit": limit},
                row=dict_row,
            )
            if not locked:
                return []
            promoted = await fetch(
                conn,
                "promote_orphaned_blocked",
                {"payment_ids": [row["payment_id"] for row in locked], "now": now},
                row=dict_row,
            )
            return [
                (int(row["id"]), str(row["payment_id"]), str(row["provider"])) for row in promoted
            ]

    async def release(
        self, leases: Sequence[tuple[int, int]], *, now: datetime | None = None
    ) -> int:
        """Hand back claimed intents that never reached the provider."""
        if not leases:
            return 0
        rows = await self._fetch_as_actor(
            "release_leases",
            {"ids": [i for i, _ in leases], "lease_tokens": [t for _, t in leases], "now": now},
        )
        return len(rows)

    async def fail_over_claimed(
        self, intent_id: int, lease_token: int, why: str
    ) -> Failover | None:
        """Move a claimed first intent whose attempt could not connect to its rule's next
        target, fenced by ``lease_token``, in one transaction that names :attr:`actor` to
        the audit trail; None when it does not qualify (then write its outcome as usual)."""
        rows = await self._fetch_as_actor(
            "fail_over_claimed", {"id": intent_id, "lease_token": lease_token, "why": why}
        )
        return Failover(*rows[0]) if rows else None

    async def fail_over_pending(self, provider: str, *, limit: int, why: str) -> list[Failover]:
        """Move up to ``limit`` pending first intents of routed payments that never reached
        ``provider`` to their rules' next targets (its breaker is open here)."""
        rows = await self._fetch_as_actor(
            "fail_over_pending", {"provider": provider, "limit": limit, "why": why}
        )
        return [Failover(*row) for row in rows]

    async def archive_terminal(
        self, *, older_than_seconds: float, limit: int, now: datetime | None = None
    ) -> int:
        """Move up to ``limit`` long-finished intents to the archive; return how many."""
        rows = await self.db.fetch_all(
            "archive_terminal_intents",
            {"older_than_seconds": older_than_seconds, "limit": limit, "now": now},
        )
        return len(rows)

    async def set_wakeups(self, *, wanted: bool, instance: str) -> None:
        """Ask inserts to NOTIFY (relay ``instance`` goes idle) or tell them it needs no
        NOTIFY (it is saturated); they stop notifying only when no live relay waits."""
        params = {"instance": instance}
        if wanted:
            await self.db.fetch_all("want_wakeups", params)
            return
        # Two statements: the check must run in a snapshot taken after the flag's lock was
        # granted, so that it sees every wish committed meanwhile. Rare: a relay skips
        # only when it turns from idle to saturated.
        async with self.db.pool.connection() as conn, conn.transaction():
            await fetch(conn, "lock_wakeup_flag", row=tuple_row)
            await fetch(conn, "skip_wakeups", params, row=tuple_row)
