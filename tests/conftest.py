"""Fixtures: a real PostgreSQL for integration tests, and the fake provider with a Stripe
adapter pointed at it (``fake``, ``adapter``; a module may override them, e.g. seeded).

RELAY_TEST_DATABASE_URL points at a server whose user may CREATE DATABASE; without it an
embedded PostgreSQL is started (pgserver). Each test gets its own database, cloned from a
migrated template, and dropped afterwards. With RELAY_TEST_REQUIRE_SERVICES=1 (CI) a
missing server fails the run instead of skipping.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from provider_adapters.stripe import StripeAdapter
from relay.infra.migrate import migrate
from tests.support.databases import (
    ReadyDatabases,
    scratch_database,
    with_dbname,
)
from tests.support.fake_server import FakeServer, running_fake
from tests.support.providers import stripe_adapter

REQUIRE_SERVICES = os.environ.get("RELAY_TEST_REQUIRE_SERVICES") == "1"


def _unavailable(reason: str) -> None:
    if REQUIRE_SERVICES:
        pytest.fail(f"{reason} (RELAY_TEST_REQUIRE_SERVICES=1)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def pg_admin_url() -> Iterator[str]:
    url = os.environ.get("RELAY_TEST_DATABASE_URL")
    if url:
        try:
            psycopg.connect(url, connect_timeout=5).close()
        except psycopg.OperationalError as exc:
            _unavailable(f"PostgreSQL at RELAY_TEST_DATABASE_URL is unreachable: {exc}")
        yield url
        return
    from relay.infra.embedded_pg import EmbeddedPostgresUnavailable, embedded_postgres

    try:
        with embedded_postgres() as embedded:
            yield embedded
    except EmbeddedPostgresUnavailable as exc:
        _unavailable(str(exc))


@pytest.fixture(scope="session")
def template_db(pg_admin_url: str) -> Iterator[str]:
    with scratch_database(pg_admin_url, "outbox_relay_tmpl", hex_digits=10) as url:
        migrate(url)
        yield str(conninfo_to_dict(url)["dbname"])


@pytest.fixture(scope="session")
def ready_databases(pg_admin_url: str, template_db: str) -> Iterator[ReadyDatabases]:
    supply = ReadyDatabases(pg_admin_url, template_db, "outbox_relay_t")
    try:
        yield supply
    finally:
        supply.close()


@pytest.fixture
def db_url(pg_admin_url: str, ready_databases: ReadyDatabases) -> Iterator[str]:
    """A fresh, migrated database for one test (copied from the template ahead of it,
    dropped in the background after it)."""
    name = ready_databases.take()
    try:
        yield with_dbname(pg_admin_url, name)
    finally:
        ready_databases.give_back(name)


@pytest.fixture
def conn(db_url: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(db_url, autocommit=True) as connection:
        yield connection


@pytest.fixture(scope="session")
def amqp_url() -> str:
    """RabbitMQ for publisher tests (RELAY_TEST_AMQP_URL; default: the local broker).

    Tests use their own exchange and queue names and delete them afterwards.
    """
    url = os.environ.get("RELAY_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")

    async def probe() -> None:
        import aio_pika

        connection = await aio_pika.connect(url, timeout=5)
        await connection.close()

    try:
        import anyio

        anyio.run(probe)
    except Exception as exc:
        _unavailable(f"RabbitMQ at RELAY_TEST_AMQP_URL is unreachable: {exc!r}")
    return url


@pytest.fixture
async def fake() -> AsyncIterator[FakeServer]:
    async with running_fake() as server:
        yield server


@pytest.fixture
async def adapter(fake: FakeServer) -> AsyncIterator[StripeAdapter]:
    async with stripe_adapter(fake.url) as pointed_at_fake:
        yield pointed_at_fake
