"""The migrations apply with plain `psql -f`, one file after another, into an empty database.

How the two paths relate, honestly:

* `psql -v ON_ERROR_STOP=1 -f` of every sql/NNNN file in order succeeds, and builds exactly
  the schema `relay.infra.migrate.migrate` builds (sql/0000_pre_bookkeeping.sql creates the
  bookkeeping table that sql/0008 grants on, as migrate.py's bootstrap does).
* psql records nothing: outbox.schema_migrations stays empty, so `migrate` takes such a
  database for an empty one and fails on the first file whose objects already exist.
* Recording each file as migrate.py would (version, name, SHA-256 of the file's bytes)
  hands the database over: `migrate` then applies nothing and reports nothing.
"""

from __future__ import annotations

import importlib.util
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from relay.infra.migrate import MigrationError, discover, migrate
from tests.conftest import REQUIRE_SERVICES
from tests.support.databases import scratch_database

pytestmark = pytest.mark.integration

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "generate_schema.py"


@pytest.fixture
def psql(pg_admin_url: str) -> str:
    generator = _generator()
    try:
        return str(generator.find_client("psql", generator.server_major(pg_admin_url)))
    except SystemExit as exc:
        if REQUIRE_SERVICES:
            pytest.fail(f"{exc} (RELAY_TEST_REQUIRE_SERVICES=1)", pytrace=False)
        pytest.skip(str(exc))


@pytest.fixture
def empty_db(pg_admin_url: str) -> Iterator[str]:
    with scratch_database(pg_admin_url, "outbox_relay_psql") as url:
        yield url


def apply_with_psql(psql: str, url: str) -> None:
    for migration in discover():
        result = subprocess.run(
            [psql, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", url, "-f", str(migration.path)],
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, f"{migration.path.name}: {result.stderr}"


def _generator() -> Any:
    """scripts/generate_schema.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("generate_schema", SCRIPT)
    assert spec is not None and spec.loader is not None
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    return generator


def schema_dump(url: str) -> str:
    """The outbox schema as sql/schema.sql shows it (scripts/generate_schema.py's dump)."""
    return str(_generator().dump_schema(url))


def test_psql_builds_the_schema_migrate_builds(psql: str, empty_db: str, db_url: str) -> None:
    apply_with_psql(psql, empty_db)
    assert schema_dump(empty_db) == schema_dump(db_url)  # db_url: a clone of a migrate run


def test_a_psql_built_database_is_handed_to_migrate_by_recording_the_files(
    psql: str, empty_db: str
) -> None:
    apply_with_psql(psql, empty_db)
    with psycopg.connect(empty_db) as conn:
        recorded = conn.execute("SELECT count(*) FROM outbox.schema_migrations").fetchone()
    assert recorded == (0,), "psql records nothing"
    with pytest.raises(MigrationError, match=r"0001_pre_core\.sql failed"):
        migrate(empty_db)  # 0000 is a no-op; 0001's tables already exist

    with psycopg.connect(empty_db) as conn:
        conn.execute("DELETE FROM outbox.schema_migrations")  # the 0000 that migrate recorded
        for migration in discover():
            conn.execute(
                "INSERT INTO outbox.schema_migrations (version, name, checksum)"
                " VALUES (%s, %s, %s)",
                (migration.version, migration.name, migration.checksum),
            )
    reported: list[str] = []
    assert migrate(empty_db, report=reported.append) == []
    assert reported == []
