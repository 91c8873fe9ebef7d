"""The app-facing SQL contract on a real PostgreSQL: what INSERT accepts and refuses."""

from __future__ import annotations

import threading
from typing import Any

import psycopg
import pytest
from psycopg import errors

pytestmark = pytest.mark.integration

INSERT = """
INSERT INTO outbox.payment_intents
    (payment_id, action, provider, amount_minor, currency, payment_method, idempotency_key, metadata)
VALUES (%(payment_id)s, %(action)s, %(provider)s, %(amount_minor)s, %(currency)s,
        %(payment_method)s, %(idempotency_key)s, %(metadata)s)
RETURNING id, status, idempotency_key, payment_seq
"""


def intent(**overrides: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "payment_id": "order-1",
        "action": "authorize",
        "provider": "stripe",
        "amount_minor": 1999,
        "currency": "EUR",
        "payment_method": "pm_card_visa",
        "idempotency_key": None,
        "metadata": psycopg.types.json.Jsonb({"order_id": 1}),
    }
    row.update(overrides)
    return row


def insert(conn: psycopg.Connection, **overrides: Any) -> tuple[Any, ...]:
    row = conn.execute(INSERT, intent(**overrides)).fetchone()
    assert row is not None
    return row


def count_rows(conn: psycopg.Connection) -> tuple[int, int]:
    row = conn.execute(
        "SELECT (SELECT count(*) FROM outbox.payment_intents), (SELECT count(*) FROM outbox.payments)"
    ).fetchone()
    assert row is not None
    return row[0], row[1]


@pytest.mark.parametrize(
    ("overrides", "error", "constraint", "column_word"),
    [
        ({"action": "steal"}, errors.CheckViolation, "payment_intents_action_valid", "action"),
        (
            {"currency": "XYZ"},
            errors.ForeignKeyViolation,
            "payment_intents_currency_known",
            "currency",
        ),
        (
            {"amount_minor": 0},
            errors.CheckViolation,
            "payment_intents_amount_minor_positive",
            "amount_minor",
        ),
        (
            {"amount_minor": -5},
            errors.CheckViolation,
            "payment_intents_amount_minor_positive",
            "amount_minor",
        ),
        (
            {"amount_minor": None},
            errors.CheckViolation,
            "payment_intents_amount_minor_required_for_authorize_charge",
            "amount_minor",
        ),
        (
            {"payment_method": None},
            errors.CheckViolation,
            "payment_intents_payment_method_required_for_authorize_charge",
            "payment_method",
        ),
        (
            {"action": "charge", "payment_method": None},
            errors.CheckViolation,
            "payment_intents_payment_method_required_for_authorize_charge",
            "payment_method",
        ),
        (
            {"payment_method": "4242424242424242"},
            errors.CheckViolation,
            "payment_intents_payment_method_not_card_number",
            "payment_method",
        ),
        (
            {"payment_method": "4242 4242 4242 4242"},
            errors.CheckViolation,
            "payment_intents_payment_method_not_card_number",
            "payment_method",
        ),
        (
            {"payment_method": "5555-5555-5555-4444"},
            errors.CheckViolation,
            "payment_intents_payment_method_not_card_number",
            "payment_method",
        ),
        (
            {"payment_method": "pm 1"},
            errors.CheckViolation,
            "payment_intents_payment_method_token_format",
            "payment_method",
        ),
        (
            {"provider": "Stripe!"},
            errors.CheckViolation,
            "payment_intents_provider_lowercase_identifier",
            "provider",
        ),
        (
            {"payment_id": "  "},
            errors.CheckViolation,
            "payment_intents_payment_id_nonblank_max_200",
            "payment_id",
        ),
        ({"payment_id": None}, errors.NotNullViolation, None, "payment_id"),
        (
            {"metadata": psycopg.types.json.Jsonb([1, 2])},
            errors.CheckViolation,
            "payment_intents_metadata_is_object",
            "metadata",
        ),
    ],
)
def test_bad_rows_are_refused_with_a_named_rule(
    conn: psycopg.Connection,
    overrides: dict[str, Any],
    error: type[Exception],
    constraint: str | None,
    column_word: str,
) -> None:
    with pytest.raises(error) as caught:
        insert(conn, **overrides)
    diag = caught.value.diag  # type: ignore[attr-defined]
    if constraint is not None:
        assert diag.constraint_name == constraint
        assert column_word in constraint
    else:
        assert diag.column_name == column_word
    assert count_rows(conn) == (0, 0), "a refused insert leaves nothing half-written"


def test_card_number_is_never_echoed_back(conn: psycopg.Connection) -> None:
    with pytest.raises(errors.CheckViolation) as caught:
        insert(conn, payment_method="4111111111111111")
    text = " ".join(
        str(part)
        for part in (
            caught.value,
            caught.value.diag.message_detail,  # type: ignore[attr-defined]
            caught.value.diag.message_hint,
        )  # type: ignore[attr-defined]
    )
    assert "4111" not in text
    assert "raw card number" in str(caught.value)


def test_a_token_holds_fewer_than_13_digits_luhn_or_not(conn: psycopg.Connection) -> None:
    """sql/0013: testing windows for Luhn would refuse numbers that are no card at random;
    a provider token never holds 13 digits in a row, so 13 are refused whatever they are."""
    row = insert(conn, payment_method="pm_424242424242")
    assert row[1] == "pending"
    with pytest.raises(errors.CheckViolation) as caught:
        insert(conn, payment_id="order-2", payment_method="pm_4242424242424241")
    diag = caught.value.diag  # type: ignore[attr-defined]
    assert diag.constraint_name == "payment_intents_payment_method_not_card_number"
    assert "4242" not in str(caught.value) and diag.message_detail is None


def test_currency_and_provider_must_match_the_payment(conn: psycopg.Connection) -> None:
    insert(conn)
    with pytest.raises(errors.CheckViolation) as caught:
        insert(conn, action="capture", currency="USD", amount_minor=None, payment_method=None)
    assert caught.value.diag.constraint_name == "payment_intents_currency_matches_payment"  # type: ignore[attr-defined]
    with pytest.raises(errors.CheckViolation) as caught:
        insert(conn, action="capture", provider="adyen", amount_minor=None, payment_method=None)
    assert caught.value.diag.constraint_name == "payment_intents_provider_matches_payment"  # type: ignore[attr-defined]
    assert count_rows(conn) == (1, 1)


def test_lowercase_currency_is_normalised(conn: psycopg.Connection) -> None:
    insert(conn, currency="eur")
    row = conn.execute("SELECT currency FROM outbox.payment_intents").fetchone()
    assert row == ("EUR",)


def test_reused_idempotency_key_is_refused(conn: psycopg.Connection) -> None:
    insert(conn, idempotency_key="order-1-auth")
    with pytest.raises(errors.UniqueViolation) as caught:
        insert(conn, payment_id="order-2", idempotency_key="order-1-auth")
    assert "idempotency_key" in caught.value.diag.constraint_name  # type: ignore[attr-defined]


def test_relay_columns_are_owned_by_the_relay(conn: psycopg.Connection) -> None:
    conn.execute(
        "INSERT INTO outbox.payment_intents (payment_id, action, provider, amount_minor, currency,"
        " payment_method, status, attempts, provider_reference)"
        " VALUES ('o', 'charge', 'stripe', 100, 'JPY', 'pm_card_visa', 'succeeded', 7, 'pi_fake')"
    )
    row = conn.execute(
        "SELECT status, attempts, provider_reference FROM outbox.payment_intents"
    ).fetchone()
    assert row == ("pending", 0, None)


def test_later_intents_of_a_payment_wait_blocked_in_order(conn: psycopg.Connection) -> None:
    first = insert(conn)
    second = insert(conn, action="capture", amount_minor=None, payment_method=None)
    third = insert(conn, action="refund", amount_minor=500, payment_method=None)
    other = insert(conn, payment_id="order-2")
    assert [first[1], second[1], third[1], other[1]] == ["pending", "blocked", "blocked", "pending"]
    assert [first[3], second[3], third[3]] == [1, 2, 3]


def test_derived_idempotency_keys_are_stable_and_distinct(conn: psycopg.Connection) -> None:
    a = insert(conn)
    b = insert(conn, action="capture", amount_minor=None, payment_method=None)
    stored = conn.execute(
        "SELECT idempotency_key FROM outbox.payment_intents ORDER BY id"
    ).fetchall()
    assert [row[0] for row in stored] == [a[2], b[2]]
    assert a[2] != b[2]
    assert a[2].startswith("outbox_") and len(a[2]) <= 255
    # Same inputs -> same key: the derivation is a pure function of the intent.
    recomputed = conn.execute(
        "SELECT 'outbox_' || translate(left(encode(sha256(convert_to(installation_id::text"
        " || '/order-1/1/authorize', 'UTF8')), 'hex'), 48), '0123456789', 'ghijklmnop')"
        " FROM outbox.installation"
    ).fetchone()
    assert recomputed == (a[2],)
    # No digit at all (sql/0019): a derived key never holds a run the card rule refuses.
    assert a[2][len("outbox_") :].isalpha() and len(a[2]) == len("outbox_") + 48
    # The relay never changes it: attempts reuse the stored value (see test_relay_integration).
    conn.execute("UPDATE outbox.payment_intents SET attempts = 3")
    again = conn.execute(
        "SELECT idempotency_key FROM outbox.payment_intents ORDER BY id"
    ).fetchall()
    assert again == stored


def test_an_explicit_idempotency_key_is_kept(conn: psycopg.Connection) -> None:
    row = insert(conn, idempotency_key="app-key-42")
    assert row[2] == "app-key-42"


def test_jpy_and_kwd_exponents_come_from_the_currency_table(conn: psycopg.Connection) -> None:
    rows = dict(
        conn.execute(
            "SELECT code, exponent FROM outbox.currencies WHERE code IN ('JPY','EUR','KWD')"
        ).fetchall()
    )
    assert rows == {"JPY": 0, "EUR": 2, "KWD": 3}


def test_a_currency_in_use_is_neither_deleted_nor_renamed(conn: psycopg.Connection) -> None:
    insert(conn)
    for statement in (
        "DELETE FROM outbox.currencies WHERE code = 'EUR'",
        "UPDATE outbox.currencies SET code = 'EUX' WHERE code = 'EUR'",
    ):
        with pytest.raises(errors.ForeignKeyViolation) as caught:
            conn.execute(statement)
        assert caught.value.diag.constraint_name == "payments_currency_fkey"  # type: ignore[attr-defined]
        assert "EUR" in str(caught.value)
    # A code no payment uses can go; a payment's currency cannot change.
    conn.execute("DELETE FROM outbox.currencies WHERE code = 'CHF'")
    with pytest.raises(errors.CheckViolation) as caught:
        conn.execute("UPDATE outbox.payments SET currency = 'USD' WHERE payment_id = 'order-1'")
    assert caught.value.diag.constraint_name == "payments_currency_fixed"  # type: ignore[attr-defined]
    row = conn.execute("SELECT currency FROM outbox.payments").fetchone()
    assert row == ("EUR",)


def test_an_unknown_currency_is_refused_for_a_new_and_an_existing_payment(
    conn: psycopg.Connection,
) -> None:
    insert(conn)
    for payment_id in ("order-1", "order-2"):
        with pytest.raises(errors.ForeignKeyViolation) as caught:
            insert(conn, payment_id=payment_id, currency="XYZ")
        assert caught.value.diag.constraint_name == "payment_intents_currency_known"  # type: ignore[attr-defined]
    assert count_rows(conn) == (1, 1)
    row = conn.execute("SELECT next_seq FROM outbox.payments").fetchone()
    assert row == (1,)


@pytest.mark.parametrize("first_commits", [True, False])
def test_concurrent_first_intents_of_one_payment_queue_in_commit_order(
    db_url: str, first_commits: bool
) -> None:
    """Two transactions insert a payment's first intent at once: the second waits for the
    first, then takes the next position (or the first one, if the first rolled back)."""
    first = psycopg.connect(db_url)
    second = psycopg.connect(db_url, autocommit=True)
    try:
        insert(first, payment_id="order-c")
        result: list[tuple[Any, ...]] = []
        waiter = threading.Thread(
            target=lambda: result.append(insert(second, payment_id="order-c", action="charge"))
        )
        waiter.start()
        with psycopg.connect(db_url, autocommit=True) as observer:
            while not observer.execute(
                "SELECT 1 FROM pg_stat_activity WHERE datname = current_database()"
                " AND wait_event_type = 'Lock'"
            ).fetchone():
                waiter.join(0.05)
                assert waiter.is_alive(), "the second insert did not wait for the first"
        if first_commits:
            first.commit()
        else:
            first.rollback()
        waiter.join()
        ((_, status, _, payment_seq),) = result
        assert (status, payment_seq) == (("blocked", 2) if first_commits else ("pending", 1))
    finally:
        first.close()
        second.close()


def test_the_first_update_of_an_intent_audits_its_creation_and_a_manual_payment_is_audited(
    conn: psycopg.Connection,
) -> None:
    """sql/0019: the INSERT writes no audit row; the intent's first UPDATE (a claim, a
    promotion) writes its creation rows first: the payment's when the intent created it, then
    the intent's, as the INSERT left them, with its actor and time. A payment inserted by
    hand is audited at once."""
    insert(conn)
    insert(conn, action="capture", amount_minor=None, payment_method=None)
    conn.execute(
        "INSERT INTO outbox.payments (payment_id, provider, currency) VALUES ('by-hand', 'stripe', 'EUR')"
    )
    ids = [row[0] for row in conn.execute("SELECT id FROM outbox.payment_intents ORDER BY id")]

    def trail() -> list[tuple[Any, ...]]:
        return conn.execute(
            "SELECT entity, entity_id, operation, chain_seq, coalesce(after ->> 'state',"
            " after ->> 'status') FROM outbox.audit_log ORDER BY id"
        ).fetchall()

    assert trail() == [("payment", "by-hand", "insert", 1, "new")]
    conn.execute(
        "UPDATE outbox.payment_intents SET status = 'in_flight', attempts = 1, lease_token = 1,"
        " lease_expires_at = now() + interval '1 minute' WHERE id = %s",
        (ids[0],),
    )
    conn.execute("UPDATE outbox.payment_intents SET status = 'pending' WHERE id = %s", (ids[1],))
    assert trail() == [
        ("payment", "by-hand", "insert", 1, "new"),
        ("payment", "order-1", "insert", 1, "new"),
        ("intent", str(ids[0]), "insert", 1, "pending"),
        # The claim itself writes no row (sql/0021): the outcome's row will record it.
        ("intent", str(ids[1]), "insert", 1, "blocked"),
        ("intent", str(ids[1]), "update", 2, "pending"),
    ]
    # Later updates find the creation rows and write none again.
    conn.execute("UPDATE outbox.payment_intents SET status = 'blocked' WHERE id = %s", (ids[1],))
    assert len(trail()) == 6
    same = conn.execute(
        "SELECT count(*) FROM outbox.audit_log AS a JOIN outbox.payment_intents AS i"
        " ON a.entity = 'intent' AND a.entity_id = i.id::text AND a.operation = 'insert'"
        " WHERE a.at = i.created_at AND a.actor = i.created_by"
    ).fetchone()
    assert same == (2,)
