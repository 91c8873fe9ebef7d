"""How an application's INSERT orders a payment's intents without writing more than the intent.

sql/0015: the payment's row in outbox.payments is created by the relay's first claim, so an
INSERT locks the payment's row when it exists, takes an advisory lock when another
transaction inserted intents of the payment that no relay has claimed yet, and takes no
lock for a payment's first intents. These tests hold an application's transaction open at
the moment that matters and check, from the database, that the relay's write-back waited for
it and promoted its intent; that a bulk INSERT takes no advisory lock; that two first
intents of one payment cannot share a position; and that an archived history still counts.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import anyio
import psycopg
import pytest
from psycopg import errors

from relay.audit import verify_database
from relay.store import Store, WriteBack
from tests.relay_harness import insert_intents

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

CAPTURE = (
    "INSERT INTO outbox.payment_intents (payment_id, action, provider, currency)"
    " VALUES (%s, 'capture', 'stripe', 'EUR') RETURNING id, status, payment_seq"
)
AUTHORIZE = (
    "INSERT INTO outbox.payment_intents (payment_id, action, provider, amount_minor, currency,"
    " payment_method) VALUES (%s, 'authorize', 'stripe', 1000, 'EUR', 'pm_card_visa')"
    " RETURNING id, status, payment_seq"
)


def statuses(db_url: str, payment_id: str) -> list[tuple[str, int]]:
    with psycopg.connect(db_url) as conn:
        rows = conn.execute(
            "SELECT status, payment_seq FROM outbox.payment_intents WHERE payment_id = %s"
            " ORDER BY payment_seq",
            (payment_id,),
        ).fetchall()
    return [(str(s), int(q)) for s, q in rows]


async def wait_for_a_lock_wait(db_url: str) -> None:
    """Until some session of this database waits for a lock (fails after 30 s: a hang, not
    slowness, since the waiter is already queued when it is first seen)."""
    with anyio.fail_after(30), psycopg.connect(db_url, autocommit=True) as conn:
        while True:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND wait_event_type = 'Lock'"
            ).fetchone()
            if row is not None and row[0] > 0:
                return
            await anyio.sleep(0.05)


@pytest.mark.parametrize("claimed", ["before", "after"], ids=["row lock", "advisory lock"])
async def test_a_write_back_waits_for_an_open_insert_and_promotes_its_intent(
    db_url: str, store: Store, claimed: str
) -> None:
    """The race the payment lock exists for: the authorize's outcome is written while the
    application's transaction that inserted the capture (blocked behind it) is still open.
    Without the lock the write-back would not see the capture and would promote nothing,
    leaving it blocked."""
    payment_id = f"race-{claimed}"
    insert_intents(
        db_url,
        [
            {
                "payment_id": payment_id,
                "action": "authorize",
                "amount_minor": 1000,
                "payment_method": "pm_card_chargeDeclined",
            }
        ],
    )
    if claimed == "before":  # the claim creates the payment's row: the INSERT locks it
        (first,) = await store.claim("stripe", 10, lease_seconds=60, instance="race")
    with psycopg.connect(db_url) as app:
        row = app.execute(CAPTURE, (payment_id,)).fetchone()
        assert row is not None and row[1:] == ("blocked", 2)
        if claimed == "after":  # no row yet: the INSERT took the advisory lock
            (first,) = await store.claim("stripe", 10, lease_seconds=60, instance="race")
        declined = WriteBack(
            first.id, first.lease_token, payment_id, "failed", error_code="card_declined"
        )
        written: set[int] = set()

        async def write_back() -> None:
            written.update(await store.complete([declined]))

        async with anyio.create_task_group() as tg:
            tg.start_soon(write_back)
            await wait_for_a_lock_wait(db_url)
            assert written == set(), "the write-back waits for the open INSERT"
            app.commit()
    assert written == {first.id}
    assert statuses(db_url, payment_id) == [("failed", 1), ("pending", 2)]


def test_a_bulk_insert_of_new_payments_takes_no_advisory_lock(db_url: str) -> None:
    """Advisory locks share the server's lock table; a batch of authorize and capture pairs
    for new payments, in one transaction, must not need one per payment."""
    pairs = 3_000
    with psycopg.connect(db_url) as conn:
        conn.execute(
            "INSERT INTO outbox.payment_intents (payment_id, action, provider, amount_minor,"
            " currency, payment_method) SELECT 'bulk-' || g, 'authorize', 'stripe', 1000,"
            " 'EUR', 'pm_card_visa' FROM generate_series(1, %s) AS g",
            (pairs,),
        )
        conn.execute(
            "INSERT INTO outbox.payment_intents (payment_id, action, provider, currency)"
            " SELECT 'bulk-' || g, 'capture', 'stripe', 'EUR' FROM generate_series(1, %s) AS g",
            (pairs,),
        )
        held = conn.execute(
            "SELECT count(*) FROM pg_locks WHERE pid = pg_backend_pid() AND locktype = 'advisory'"
        ).fetchone()
        assert held == (0,)
        conn.commit()
        counts = conn.execute(
            "SELECT action, status, payment_seq, count(*) FROM outbox.payment_intents"
            " WHERE payment_id LIKE 'bulk-%%' GROUP BY 1, 2, 3 ORDER BY 1"
        ).fetchall()
        payments = conn.execute("SELECT count(*) FROM outbox.payments").fetchone()
    assert counts == [("authorize", "pending", 1, pairs), ("capture", "blocked", 2, pairs)]
    assert payments == (0,), "the payments' rows come with the relay's first claims"


@pytest.mark.parametrize(
    ("key", "rule"),
    [
        # A derived key is made from the position, so the key's own index sees it first.
        (None, "payment_intents_idempotency_key_unique"),
        ("app-key", "payment_intents_payment_seq_unique"),
    ],
    ids=["derived key", "application's key"],
)
def test_two_first_intents_of_one_payment_cannot_share_a_position(
    db_url: str, key: str | None, rule: str
) -> None:
    """Neither sees the other, so both would take position 1: the second fails on a unique
    index, writes nothing, and its retry is ordered behind the first."""
    insert = AUTHORIZE.replace("payment_method)", "payment_method, idempotency_key)").replace(
        "'pm_card_visa')", "'pm_card_visa', %s)"
    )
    keys = iter([None, None, None] if key is None else [f"{key}-1", f"{key}-2", f"{key}-3"])
    outcome: list[BaseException | tuple[int, str, int]] = []
    with psycopg.connect(db_url) as first:
        assert first.execute(insert, ("twin", next(keys))).fetchone() is not None

        second_key = next(keys)

        def second_insert() -> None:
            try:
                with psycopg.connect(db_url) as second:
                    row = second.execute(insert, ("twin", second_key)).fetchone()
                    assert row is not None
                    outcome.append((int(row[0]), str(row[1]), int(row[2])))
            except BaseException as exc:
                outcome.append(exc)

        thread = threading.Thread(target=second_insert)
        thread.start()
        with psycopg.connect(db_url, autocommit=True) as watcher:
            # The second INSERT queues on the first's index entry before it can fail.
            for _ in range(600):
                waiting = watcher.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                    " AND wait_event_type = 'Lock'"
                ).fetchone()
                if (waiting is not None and waiting[0] > 0) or outcome:
                    break
                thread.join(0.05)
        first.commit()
        thread.join(30)
    assert len(outcome) == 1 and isinstance(outcome[0], errors.UniqueViolation), outcome
    assert outcome[0].diag.constraint_name == rule
    assert statuses(db_url, "twin") == [("pending", 1)]
    with psycopg.connect(db_url) as retry:
        row = retry.execute(insert, ("twin", next(keys))).fetchone()
    assert row is not None and row[1:] == ("blocked", 2)


async def test_positions_and_derived_keys_continue_after_the_history_is_archived(
    db_url: str, store: Store
) -> None:
    """A payment whose intents were all archived: its next intent takes the next position,
    so its derived idempotency key is new (a reused key would replay the archived result)."""
    insert_intents(
        db_url,
        [
            {
                "payment_id": "archived",
                "action": "authorize",
                "amount_minor": 1000,
                "payment_method": "pm_card_chargeDeclined",
            }
        ],
    )
    (first,) = await store.claim("stripe", 10, lease_seconds=60, instance="archive")
    declined = WriteBack(
        first.id, first.lease_token, "archived", "failed", error_code="card_declined"
    )
    assert await store.complete([declined]) == {first.id}
    later = datetime.now(UTC) + timedelta(days=1)
    assert await store.archive_terminal(older_than_seconds=60, limit=10, now=later) == 1
    with psycopg.connect(db_url) as app:
        row = app.execute(AUTHORIZE, ("archived",)).fetchone()
        assert row is not None and row[1:] == ("pending", 2)
        keys = app.execute(
            "SELECT idempotency_key FROM outbox.payment_intents_archive WHERE payment_id = 'archived'"
            " UNION ALL SELECT idempotency_key FROM outbox.payment_intents"
            " WHERE payment_id = 'archived'"
        ).fetchall()
        with pytest.raises(errors.CheckViolation) as refused:
            app.execute(
                "INSERT INTO outbox.payment_intents (payment_id, action, provider, currency)"
                " VALUES ('archived', 'capture', 'stripe', 'USD')"
            )
    assert len({k for (k,) in keys}) == 2
    assert refused.value.diag.constraint_name == "payment_intents_currency_matches_payment"


def test_an_untouched_intent_has_no_chain_yet_and_audit_verify_knows_why(db_url: str) -> None:
    """Its creation is written by its first change; until then `audit verify` accepts the
    missing chain only while the row is exactly as inserted, and the history shows the
    creation from the row itself."""
    with psycopg.connect(db_url) as app:
        row = app.execute(AUTHORIZE, ("untouched",)).fetchone()
        assert row is not None
        intent_id = int(row[0])
        app.commit()
        history = app.execute(
            "SELECT actor, operation, after ->> 'status' FROM outbox.intent_history(%s)",
            (intent_id,),
        ).fetchall()
        login = app.info.user
    assert history == [(f"db:{login}", "insert", "pending")]
    report = verify_database(db_url)
    assert report.intact and report.not_yet_audited == 1

    # Changed behind the trigger's back (replica role: no trigger fires): no chain, and the
    # row is no longer as inserted.
    with psycopg.connect(db_url) as superuser:
        superuser.execute("SET session_replication_role = replica")
        superuser.execute(
            "UPDATE outbox.payment_intents SET status = 'dead', completed_at = now() WHERE id = %s",
            (intent_id,),
        )
    report = verify_database(db_url)
    assert [(b.kind, b.entity, b.entity_id) for b in report.breaks] == [
        ("missing_chain", "intent", str(intent_id))
    ]
