"""Scratch PostgreSQL databases for tests: created, handed over by URL, dropped after.

``scratch_database(admin_url, prefix)`` creates ``{prefix}_{random}`` (from ``template``
when given) and drops it, connections and all, when the block ends, however it ends.
"""

from __future__ import annotations

import queue
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

__all__ = ["ReadyDatabases", "drop_database", "scratch_database", "with_dbname", "with_port"]


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
        drop_database(admin_url, name)


def drop_database(admin_url: str, name: str) -> None:
    """Drop ``name``, connections and all; nothing if it is gone."""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


class ReadyDatabases:
    """Databases copied from ``template`` one ahead of the test that takes the next, and
    dropped after the test that gave them back, both by one background thread.

    A copy costs about half a second of the server's time (CREATE DATABASE ... TEMPLATE
    writes every block to the WAL), and so does a drop: DROP DATABASE forces a checkpoint
    and waits for it (0.1 to 0.3 s on a quiet machine, seconds on a busy one; over a
    thousand tests, minutes). The thread makes the next copy while a test runs, which
    mostly waits on processes and sockets, and drops the databases given back while the
    next copy waits to be taken, so the suite waits for neither. Every database is the
    template's copy, as ``scratch_database`` makes it; the test that takes one gives it
    back (give_back) when it is done, and close() drops every database still here.
    """

    def __init__(self, admin_url: str, template: str, prefix: str) -> None:
        self.admin_url = admin_url
        self._template = template
        self._prefix = prefix
        self._ready: queue.Queue[str | BaseException] = queue.Queue(maxsize=1)
        self._given_back: queue.Queue[str] = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, name="ready-databases", daemon=True)
        self._thread.start()

    def _fill(self) -> None:
        try:
            with psycopg.connect(self.admin_url, autocommit=True) as conn:
                while not self._stop.is_set():
                    name = f"{self._prefix}_{uuid.uuid4().hex[:12]}"
                    conn.execute(
                        sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                            sql.Identifier(name), sql.Identifier(self._template)
                        )
                    )
                    while True:
                        if self._stop.is_set():
                            drop_database(self.admin_url, name)
                            return
                        try:
                            self._ready.put_nowait(name)
                            break
                        except queue.Full:
                            pass
                        # The next copy waits for its test: drop what earlier tests gave back.
                        try:
                            done = self._given_back.get(timeout=0.05)
                        except queue.Empty:
                            continue
                        drop_database(self.admin_url, done)
        except BaseException as exc:  # handed to the next test that asks, as its error
            self._ready.put(exc)

    def take(self, timeout: float = 300.0) -> str:
        """The name of a new database (give it back when done); a hang guard, no speed
        limit."""
        item = self._ready.get(timeout=timeout)
        if isinstance(item, BaseException):
            raise RuntimeError("making a test database from the template failed") from item
        return item

    def give_back(self, name: str) -> None:
        """``name`` (from take) is done with: the background thread drops it, connections
        and all (as drop_database), or close() does."""
        self._given_back.put(name)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)
        while True:
            try:
                item = self._ready.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, str):
                drop_database(self.admin_url, item)
        while True:
            try:
                drop_database(self.admin_url, self._given_back.get_nowait())
            except queue.Empty:
                return
