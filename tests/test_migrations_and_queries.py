"""Migrations apply once, concurrently and repeatedly; every relay statement prepares."""

from __future__ import annotations

import re
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from relay.infra.migrate import discover, migrate
from relay.infra.queries import QUERIES, parse_queries
from tests.conftest import with_dbname

pytestmark = pytest.mark.integration


@pytest.fixture
def empty_db(pg_admin_url: str) -> Iterator[str]:
    name = f"outbox_relay_m_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield with_dbname(pg_admin_url, name)
    finally:
        with psycopg.connect(pg_admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


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
