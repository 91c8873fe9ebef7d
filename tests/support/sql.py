"""Read the test database in one line: each call opens its own connection, runs one
statement and returns every row, as tuples (``rows``) or as dicts by column (``dict_rows``)."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.rows import dict_row

__all__ = ["dict_rows", "rows"]


def rows(db_url: str, query: str, *params: object) -> list[tuple[Any, ...]]:
    with psycopg.connect(db_url) as conn:
        return conn.execute(query, params).fetchall()


def dict_rows(db_url: str, query: str, *params: object) -> list[dict[str, Any]]:
    with psycopg.connect(db_url) as conn:
        return conn.cursor(row_factory=dict_row).execute(query, params).fetchall()
