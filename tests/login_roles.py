"""LOGIN roles for tests that connect as an application, a relay or an operator.

Roles are cluster-wide while each test has its own database, so every role gets a unique
name and is dropped when the test ends (its privileges in the test database first, so
the database can still be dropped by conftest).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

GROUP_ROLES = ("outbox_app", "outbox_relay", "outbox_operator")


@contextmanager
def login_role(
    db_url: str, group: str | None, *, prefix: str = "t", password: str | None = None
) -> Iterator[str]:
    """Create a LOGIN role (member of ``group``), yield a URL that connects as it."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(db_url, autocommit=True) as admin:
        create = sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(name))
        if password is not None:
            create = sql.SQL("{} PASSWORD {}").format(create, sql.Literal(password))
        admin.execute(create)
        if group is not None:
            admin.execute(
                sql.SQL("GRANT {} TO {}").format(sql.Identifier(group), sql.Identifier(name))
            )
    login = {"user": name} if password is None else {"user": name, "password": password}
    try:
        yield make_conninfo(db_url, **login)
    finally:
        with psycopg.connect(db_url, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
                (name,),
            )
            admin.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(name)))
            admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))
