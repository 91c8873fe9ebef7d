"""What every operator command shares: who acts, how long ago, and the acting transaction.

An operator command names its operator (``--operator``, else ``RELAY_OPERATOR``, else the
OS user) and runs each change in a transaction whose first statement sets ``outbox.actor``
to ``operator:<name>``, so the audit trail (sql/0005) records who did it.
"""

from __future__ import annotations

import getpass
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg

from relay.infra.queries import QUERIES

__all__ = ["acting_as", "check_operator_name", "default_operator", "parse_age"]

_OPERATOR = re.compile(r"\S[^\x00-\x1f\x7f]{0,199}")
_AGE_PART = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3_600, "d": 86_400, "w": 604_800}


def default_operator() -> str:
    """RELAY_OPERATOR, else the OS user (``uid:N`` when the user has no name)."""
    named = os.environ.get("RELAY_OPERATOR", "").strip()
    if named:
        return named
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # a container user without a passwd entry
        return f"uid:{os.getuid()}"


def check_operator_name(value: str) -> str:
    """``value`` stripped; ValueError unless it is 1 to 200 printable characters."""
    value = value.strip()
    if not _OPERATOR.fullmatch(value):
        raise ValueError("must name who acts: 1 to 200 printable characters, e.g. --operator alice")
    return value


def parse_age(text: str) -> float:
    """``'2h'`` -> 7200.0; ``'1h30m'``, ``'45s'``, ``'3d'``, ``'1w'``; ValueError otherwise."""
    value = text.strip().lower()
    parts = _AGE_PART.findall(value)
    if not value or "".join(n + u for n, u in parts) != value:
        raise ValueError(f"{text!r} is not an age like 45s, 30m, 2h, 1h30m, 3d or 1w")
    return sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)


@contextmanager
def acting_as(conn: psycopg.Connection, operator: str) -> Iterator[psycopg.Connection]:
    """A transaction on ``conn`` in which the audit trail names ``operator:<operator>``."""
    with conn.transaction():
        conn.execute(QUERIES["set_operator_actor"], {"operator": operator})
        yield conn
