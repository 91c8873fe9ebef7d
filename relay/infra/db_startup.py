"""Can the relay use this database? One probe at start-up, and what its failure means.

An error that cannot heal by waiting (a malformed URL, a failed login, a database or role
that does not exist, no outbox schema) is :class:`StartupRefused`: the process should stop
and say why, so that an orchestrator shows the reason (Kubernetes: CrashLoopBackOff with
the line in the log) instead of a relay that looks alive and retries forever. Anything
else (connection refused, the server starting up or out of connection slots, a timeout)
is :class:`DatabaseNotYet`: wait and try again.

The classification is by psycopg error class and SQLSTATE, never by message text. libpq
does not hand a login failure's SQLSTATE to its caller (psycopg's ``exc.sqlstate`` is
None for every connection failure), but it prints it in its verbose error format, a
fixed ``SEVERITY:  SQLSTATE: message`` layout whatever the server's language: after a
failed connection the probe asks libpq once more in that format (:mod:`relay.infra.libpq`).
"""

from __future__ import annotations

from dataclasses import dataclass

import anyio
import psycopg
from psycopg.conninfo import conninfo_attempts_async, conninfo_to_dict, make_conninfo
from psycopg.rows import dict_row

from relay.infra.db import fetch
from relay.infra.libpq import login_sqlstate
from relay.infra.redaction import describe_conninfo, redact_text

__all__ = ["DatabaseNotYet", "StartupRefused", "check_conninfo", "probe_database"]

# Login failures that no amount of waiting repairs; the remedy says what to change.
_FATAL_LOGIN: dict[str, tuple[str, str]] = {
    "28P01": (
        "database_login_failed",
        "the password is wrong: fix it in RELAY_DATABASE_URL (or RELAY_DATABASE_URL_FILE)",
    ),
    "28000": (
        "database_login_refused",
        "the role does not exist or pg_hba.conf refuses it: create the role, or fix the user "
        "in RELAY_DATABASE_URL",
    ),
    "3D000": (
        "database_missing",
        "the database does not exist: create it, or fix the database name in RELAY_DATABASE_URL",
    ),
    "42501": (
        "database_connect_denied",
        "the role may not connect to this database: GRANT CONNECT ON DATABASE ... TO it",
    ),
}
_SCHEMA_MISSING = (psycopg.errors.UndefinedTable, psycopg.errors.InvalidSchemaName)
CONNECT_TIMEOUT_SECONDS = 10.0


@dataclass(frozen=True)
class StartupRefused(Exception):
    """The database cannot be used and waiting will not change that (exit, say why)."""

    code: str
    message: str
    remedy: str

    def __str__(self) -> str:
        return f"{self.message}; {self.remedy} (code {self.code})"


@dataclass(frozen=True)
class DatabaseNotYet(Exception):
    """The database may well answer later (refused, starting up, busy, timed out)."""

    reason: str

    def __str__(self) -> str:
        return self.reason


_URL_REMEDY = "write it as postgresql://USER:PASSWORD@HOST:5432/DATABASE"


def _malformed(message: str) -> StartupRefused:
    return StartupRefused("database_url_malformed", message, _URL_REMEDY)


def check_conninfo(conninfo: str) -> None:
    """Refuse a URL libpq cannot even parse (psycopg.ProgrammingError), or whose port is
    not a number (libpq refuses that only when it connects), before any I/O."""
    try:
        params = conninfo_to_dict(conninfo)
    except psycopg.ProgrammingError as exc:
        raise _malformed(
            f"RELAY_DATABASE_URL is not a valid PostgreSQL URL ({redact_text(str(exc).strip())})"
        ) from None
    ports = str(params.get("port") or "").split(",")
    if any(port and not port.strip().isdigit() for port in ports):
        raise _malformed(f"RELAY_DATABASE_URL's port {params['port']!r} is not a number")


async def probe_database(conninfo: str) -> str:
    """Connect once and read the schema version; return it, or raise
    :class:`StartupRefused` (stop) or :class:`DatabaseNotYet` (wait and retry)."""
    check_conninfo(conninfo)
    where = describe_conninfo(conninfo)
    try:
        with anyio.fail_after(CONNECT_TIMEOUT_SECONDS):
            conn = await psycopg.AsyncConnection.connect(
                conninfo, autocommit=True, application_name="outbox-relay-startup"
            )
    except TimeoutError:
        raise DatabaseNotYet(
            f"no answer from {where} within {CONNECT_TIMEOUT_SECONDS:.0f} s"
        ) from None
    except psycopg.ProgrammingError as exc:  # conninfo accepted by the parser, not by libpq
        raise _malformed(
            f"RELAY_DATABASE_URL is not usable ({redact_text(str(exc).strip())})"
        ) from None
    except psycopg.OperationalError as exc:
        await _raise_classified(conninfo, exc)
        raise  # unreachable: _raise_classified always raises
    async with conn:
        try:
            rows = await fetch(conn, "schema_version", row=dict_row)
        except _SCHEMA_MISSING:
            raise StartupRefused(
                "schema_missing",
                f"the outbox schema is missing in {where}",
                "run 'outbox-relay migrate' first",
            ) from None
    version = rows[0]["version"] if rows else None
    if version is None:
        raise StartupRefused(
            "schema_missing",
            f"no migration is applied in {where}",
            "run 'outbox-relay migrate' first",
        )
    return str(version)


async def _raise_classified(conninfo: str, exc: psycopg.OperationalError) -> None:
    detail = redact_text(str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc))
    pgconn = exc.pgconn
    # PQconnectionNeedsPassword: the server asked for a password and none was available
    # (used_password cannot tell: newer libpq sets it whenever the server asks for one).
    if pgconn is not None and pgconn.needs_password:
        raise StartupRefused(
            "database_password_missing",
            f"the database asks for a password and none is given ({detail})",
            "put the password in RELAY_DATABASE_URL (or RELAY_DATABASE_URL_FILE)",
        ) from None
    state = exc.sqlstate
    if state is None:
        try:
            # Host names resolved as psycopg resolves them: a name that does not resolve
            # (yet: DNS in a starting cluster) is a failure that may heal.
            attempts = await conninfo_attempts_async(conninfo_to_dict(conninfo))
        except psycopg.OperationalError:
            raise DatabaseNotYet(detail) from None
        state = await login_sqlstate(make_conninfo("", **attempts[0]), CONNECT_TIMEOUT_SECONDS)
    if state == "":  # libpq refused the options before any I/O (e.g. port=abc)
        raise _malformed(f"RELAY_DATABASE_URL is not usable ({detail})") from None
    if state in _FATAL_LOGIN:
        code, remedy = _FATAL_LOGIN[state]
        raise StartupRefused(code, f"{detail} (SQLSTATE {state})", remedy) from None
    raise DatabaseNotYet(detail) from None
