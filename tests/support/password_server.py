"""A PostgreSQL of the test's own that demands a password, for login failures the shared
test server (trust authentication) cannot produce.

``password_server(role, password)`` starts the embedded PostgreSQL
(:func:`relay.infra.embedded_pg.embedded_postgres`), creates ``role`` with ``password``,
puts a ``scram-sha-256`` line for that role at the head of the server's own
``pg_hba.conf`` (asked with ``SHOW hba_file``, so never the machine's) and reloads it;
it yields the role's URL with the right password. The superuser keeps its trust line.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from relay.infra.embedded_pg import embedded_postgres

__all__ = ["password_server"]


@contextmanager
def password_server(role: str, password: str) -> Iterator[str]:
    with embedded_postgres() as admin_url:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute("SET password_encryption = 'scram-sha-256'")
            conn.execute(
                sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                    sql.Identifier(role), sql.Literal(password)
                )
            )
            row = conn.execute("SHOW hba_file").fetchone()
            assert row is not None
            hba = Path(row[0])
            rules = [
                f"local all {role} scram-sha-256",
                f"host all {role} 0.0.0.0/0 scram-sha-256",
                f"host all {role} ::/0 scram-sha-256",
            ]
            hba.write_text("\n".join(rules) + "\n" + hba.read_text())
            conn.execute("SELECT pg_reload_conf()")
        yield make_conninfo(admin_url, user=role, password=password)
