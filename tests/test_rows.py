"""Rows read by column name (relay/infra/rows.py) and the transport's typed fetch."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from relay.infra.db import Database, fetch
from relay.infra.migrate import discover
from relay.infra.rows import columns_row

pytestmark = pytest.mark.integration


@pytest.fixture
def server(pg_admin_url: str) -> Iterator[psycopg.Connection]:
    """Statements here read literals only: no database of their own is needed."""
    with psycopg.connect(pg_admin_url, autocommit=True) as connection:
        yield connection


def _rows(conn: psycopg.Connection, build: Any, sql: str) -> list[Any]:
    cur = conn.cursor(row_factory=columns_row(build))
    return cur.execute(sql).fetchall()  # type: ignore[arg-type]


def pair(a: int, b: str) -> tuple[int, str]:
    return a, b


def test_each_parameter_gets_the_column_of_its_name_wherever_it_is(
    server: psycopg.Connection,
) -> None:
    sql = "SELECT 'x' AS b, 0 AS ignored, g AS a FROM generate_series(1, 3) AS g"
    assert _rows(server, pair, sql) == [(1, "x"), (2, "x"), (3, "x")]


def test_an_absent_column_gets_the_parameters_default(server: psycopg.Connection) -> None:
    def with_default(a: int, note: str | None = "none", b: str = "-") -> tuple[Any, ...]:
        return a, note, b

    assert _rows(server, with_default, "SELECT 'y' AS b, 5 AS a") == [(5, "none", "y")]


def test_a_missing_required_column_fails_before_any_row(server: psycopg.Connection) -> None:
    with pytest.raises(KeyError, match=r"pair reads column 'b'; the statement returns \['a'\]"):
        _rows(server, pair, "SELECT 1 AS a WHERE false")


def test_keyword_collecting_builders_receive_the_other_columns(
    server: psycopg.Connection,
) -> None:
    def split(a: int, **rest: Any) -> tuple[int, dict[str, Any]]:
        return a, rest

    assert _rows(server, split, "SELECT 'p' AS c, 1 AS a, 2 AS b") == [(1, {"c": "p", "b": 2})]


def test_one_column_and_keyword_only_builders(server: psycopg.Connection) -> None:
    def only(version: int) -> int:
        return version

    assert _rows(server, only, "SELECT 0 AS other, 17 AS version") == [17]

    def keyword_only(*, a: int) -> int:
        return a

    with pytest.raises(TypeError, match="keyword-only"):
        columns_row(keyword_only)


@pytest.mark.anyio
async def test_fetch_all_builds_rows_as_asked_and_tuples_by_default(db_url: str) -> None:
    latest = discover()[-1].version
    db = Database(db_url, pool_size=1)
    await db.open()
    try:
        assert await db.fetch_all("schema_version") == [(latest,)]
        assert await db.fetch_all("schema_version", row=dict_row) == [{"version": latest}]

        def version(version: int) -> str:
            return f"v{version}"

        assert await db.fetch_all("schema_version", row=columns_row(version)) == [f"v{latest}"]
        async with db.pool.connection() as conn, conn.transaction():
            assert await fetch(conn, "schema_version", row=dict_row) == [{"version": latest}]
    finally:
        await db.close()
