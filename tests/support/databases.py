"""Scratch PostgreSQL databases for tests: created, handed over by URL, dropped after.

``scratch_database(admin_url, prefix)`` creates ``{prefix}_{random}`` (from ``template``
when given) and drops it, connections and all, when the block ends, however it ends.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

__all__ = ["scratch_database", "with_dbname", "with_port"]


def with_dbname(url: str, dbname: str) -> str:
    """``url`` with its database name replaced."""
    return make_conninfo(url, dbname=dbname)


def with_port(url: str, port: int) -> str:
    """``url`` pointed at ``port`` on 127.0.0.1 (a proxy in front of the server)."""
    return make_conninfo(url, host="127.0.0.1", port=str(port))


@contextmanager
def scratch_database(
    admin_url: str, prefix: str, *, template: str | None = None, hex_digits: int = 12
) -> Iterator[str]:
    """A new database on ``admin_url``'s server (whose user may CREATE DATABASE)."""
    name = f"{prefix}_{uuid.uuid4().hex[:hex_digits]}"
    create = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
    if template is not None:
        create = sql.SQL("{} TEMPLATE {}").format(create, sql.Identifier(template))
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(create)
    try:
        yield with_dbname(admin_url, name)
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
