"""Regressions found by the fault campaign (tests/fault_campaign.py), made deterministic.

A relay whose write-back waits on a lock past its lease (a zombie relay paused inside its
own write-back transaction holds the payment's row) re-claims the same intent, calls the
provider again (a replay, no second effect) and buffers another outcome for it. Once the
lock goes, one batch can hold several outcomes of one intent with different lease tokens.
The fence lets only the current one through; `complete_intents` (relay/infra/queries.sql) used
to join the batch's outcomes to the written rows by intent id alone, so the batch either
inserted one result event per buffered outcome (seen in the campaign: seven events, seven
message_ids, for one succeeded intent) or failed on `events_event_id_unique` and was
written row by row, depending on the plan. It now joins on the lease token too.
"""

from __future__ import annotations

import anyio
import psycopg
import pytest

from relay.core.completer import Completer
from relay.core.store import Store
from relay.domain.intents import WriteBack
from relay.infra.db import RETRYABLE_DB_ERRORS, Database
from tests.support.intents import insert_intent

pytestmark = [pytest.mark.integration, pytest.mark.anyio]


async def test_a_batch_with_a_stale_and_the_current_outcome_records_one_event(
    db_url: str,
) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        intent_id = insert_intent(
            conn,
            payment_id="regress-1",
            action="charge",
            amount_minor=500,
            payment_method="pm_card_visa",
        )
        # Claimed twice: the first claim (token 1000) expired, the second (1001) is current.
        conn.execute(
            "UPDATE outbox.payment_intents SET status = 'in_flight', lease_token = 1001,"
            " lease_expires_at = now() + interval '1 minute', claimed_by = 'regress', attempts = 2"
        )
    db = Database(db_url, pool_size=1, name="regress")
    await db.open()
    try:
        store = Store(db, actor="relay:regress")
        outcome = {
            "intent_id": intent_id,
            "payment_id": "regress-1",
            "status": "succeeded",
            "provider_reference": "pi_regress",
            "amount_applied_minor": 500,
        }
        stale = WriteBack(lease_token=1000, **outcome)  # type: ignore[arg-type]
        current = WriteBack(lease_token=1001, **outcome)  # type: ignore[arg-type]
        # Through the completer, as the relay writes: the stale outcome is a lost lease,
        # not a second write (the fault campaign's zombie check found it counted as one).
        completer = Completer(store, writers=1)
        await completer._write([stale, current])
    finally:
        await db.close()
    assert (completer.written, completer.lease_lost) == (1, 1)
    with psycopg.connect(db_url) as conn:
        events = conn.execute("SELECT count(*) FROM outbox.events").fetchone()
        postings = conn.execute("SELECT count(*) FROM outbox.ledger_transactions").fetchone()
    assert postings == (1,)
    assert events == (1,), "one result event per outcome, not one per buffered write-back"


async def test_a_session_frozen_inside_a_transaction_is_ended_by_the_server(db_url: str) -> None:
    """The campaign's other finding: a relay paused inside its write-back transaction held
    the payments' row locks until it resumed. The relay's sessions now carry
    idle_in_transaction_session_timeout, so the server ends such a session instead."""
    db = Database(db_url, pool_size=1, name="regress-idle", idle_in_transaction_seconds=0.5)
    await db.open()
    try:
        async with db.pool.connection() as conn:
            cur = await conn.execute("SHOW idle_in_transaction_session_timeout")
            assert await cur.fetchone() == ("500ms",)
            with pytest.raises(psycopg.errors.IdleInTransactionSessionTimeout) as ended:
                async with conn.transaction():
                    await conn.execute("SELECT 1 FROM outbox.payments FOR UPDATE")
                    await anyio.sleep(2.0)  # frozen: the server gives up on us
                    await conn.execute("SELECT 1")
    finally:
        await db.close()
    # Retryable: the completer tries the batch again on a fresh connection (where the
    # fence decides), instead of parking the intents dead as a refused write.
    assert isinstance(ended.value, RETRYABLE_DB_ERRORS)
