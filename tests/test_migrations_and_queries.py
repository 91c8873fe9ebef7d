"""Migrations apply once, concurrently and repeatedly; every relay statement prepares."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator

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
    assert migrations[0].name == "0001_pre_core"


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
