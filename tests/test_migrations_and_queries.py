"""Migrations apply once, concurrently and repeatedly; every relay statement prepares."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from relay.infra.migrate import discover, migrate
from relay.infra.queries import QUERIES, parse_queries
from tests.support.databases import scratch_database

pytestmark = pytest.mark.integration


@pytest.fixture
def empty_db(pg_admin_url: str) -> Iterator[str]:
    with scratch_database(pg_admin_url, "outbox_relay_m") as url:
        yield url


def test_migrations_are_numbered_and_ordered() -> None:
    migrations = discover()
    assert [m.version for m in migrations] == sorted(m.version for m in migrations)
    assert [m.name for m in migrations[:2]] == ["0000_pre_bookkeeping", "0001_pre_core"]


def test_a_database_migrated_before_0000_gets_it_as_a_no_op(empty_db: str, tmp_path: Path) -> None:
    # What a deployed database looks like: migrated by a release whose files began at 0001
    # (its bootstrap created the bookkeeping table exactly as sql/0000 does).
    before_0000 = tmp_path / "before_0000"
    before_0000.mkdir()
    for migration in discover():
        if "0001" <= migration.version <= "0015":
            (before_0000 / migration.path.name).write_bytes(migration.path.read_bytes())
    migrate(empty_db, directory=before_0000)
    reported: list[str] = []
    applied = migrate(empty_db, report=reported.append)
    assert applied == [m.name for m in discover() if not "0001" <= m.version <= "0015"]
    assert applied[0] == "0000_pre_bookkeeping"
    assert [line for line in reported if line.startswith("warning")] == []
    with psycopg.connect(empty_db) as conn:
        rows = conn.execute("SELECT version FROM outbox.schema_migrations ORDER BY 1").fetchall()
    assert [r[0] for r in rows] == [m.version for m in discover()]


def test_concurrent_replicas_apply_each_file_once(empty_db: str) -> None:
    results: list[list[str]] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(migrate(empty_db))
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    applied = sorted(name for names in results for name in names)
    assert applied == sorted(m.name for m in discover())
    assert migrate(empty_db) == []  # re-running is a no-op
    with psycopg.connect(empty_db) as conn:
        rows = conn.execute("SELECT version FROM outbox.schema_migrations ORDER BY 1").fetchall()
    assert [r[0] for r in rows] == [m.version for m in discover()]


def test_every_relay_statement_prepares(conn: psycopg.Connection) -> None:
    assert set(QUERIES) >= {
        "claim_intents",
        "complete_intents",
        "lock_payments",
        "requeue_expired_leases",
        "release_leases",
    }
    for name, statement in QUERIES.items():
        # Turn %(name)s placeholders into $n so PostgreSQL parses and plans the statement.
        numbered: dict[str, int] = {}

        def place(match: re.Match[str], numbered: dict[str, int] = numbered) -> str:
            return f"${numbered.setdefault(match.group(1), len(numbered) + 1)}"

        text = re.sub(r"%\((\w+)\)s", place, statement)
        conn.execute(f"PREPARE q_{name} AS {text}")  # type: ignore[arg-type]
        conn.execute(f"DEALLOCATE q_{name}")  # type: ignore[arg-type]


def test_query_file_rejects_duplicate_names() -> None:
    with pytest.raises(ValueError, match="twice"):
        parse_queries("-- name: a\nSELECT 1;\n-- name: a\nSELECT 2;\n")


# The columns the relay reads by name from each statement (relay/core/store.py,
# relay/core/janitor.py, relay/events/store.py, relay/service/*): an alias in queries.sql
# that drifts from its reader fails here, not on the first claim of a deployed relay.
_INTENT = {
    "id", "payment_id", "action", "provider", "amount_minor", "currency", "payment_method",
    "idempotency_key", "attempts", "payment_state", "authorized_minor", "captured_minor",
    "refunded_minor", "payment_reference", "exponent",
}  # fmt: skip
READ_BY_NAME = {
    # sql/0035: the payment's dispute, for the state machine (a refund under a dispute).
    # sql/0038: an earlier intent awaiting its confirmation parks this one at dispatch.
    "claim_intents": _INTENT
    | {"lease_token", "traceparent", "disputed_minor", "dispute_status", "awaiting_action"},
    "complete_intents": {"id", "lease_token"},
    "lock_orphaned_blocked_payments": {"payment_id"},
    "promote_orphaned_blocked": {"id", "payment_id", "provider"},
    "janitor_reserve": _INTENT | {"dead_at", "error_code", "checks", "not_found"},
    "janitor_take": {"lease_token", "payment_state", "authorized_minor", "captured_minor",
                     "refunded_minor", "payment_reference"},
    "claim_events": {
        "id", "event_id", "lease_token", "ordering_key", "seq", "exchange", "routing_key",
        "event_type", "payload", "headers", "payment_id", "schema_version", "traceparent",
        "created_at", "attempts",
    },
    "lock_event_streams": {"ordering_key"},
    "mark_events": {"id"},
    "queue_depth": {"provider", "status", "intents", "oldest_pending_seconds"},
    "unpublished_events": {"events", "oldest_seconds"},
    "reconciliation_open": {"provider", "currency", "exceptions", "delta_minor"},
    "schema_version": {"version"},
}  # fmt: skip


def _output_columns(conn: psycopg.Connection, name: str) -> list[str]:
    text = re.sub(r"%\((\w+)\)s", lambda m: "NULL", QUERIES[name])
    conn.execute(f"PREPARE q_{name} AS {text}")  # type: ignore[arg-type]
    try:
        described = conn.pgconn.describe_prepared(f"q_{name}".encode())
        return [(described.fname(i) or b"").decode() for i in range(described.nfields)]
    finally:
        conn.execute(f"DEALLOCATE q_{name}")  # type: ignore[arg-type]


def test_every_column_read_by_name_is_returned_by_its_statement(
    conn: psycopg.Connection,
) -> None:
    for name, read in READ_BY_NAME.items():
        columns = _output_columns(conn, name)
        assert len(columns) == len(set(columns)), f"{name} returns a column twice: {columns}"
        assert read <= set(columns), f"{name} lacks {sorted(read - set(columns))}: {columns}"
    # The claim is read whole into IntentRow.from_columns: nothing more, nothing less.
    assert set(_output_columns(conn, "claim_intents")) == READ_BY_NAME["claim_intents"]
