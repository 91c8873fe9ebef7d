"""The SQLSTATE of a failed PostgreSQL login, which psycopg does not expose.

When the server refuses a login (wrong password, no such role or database) libpq keeps
only a message; the SQLSTATE the server sent is printed in it solely in libpq's verbose
error format (``FATAL:  3D000: database "x" does not exist``). psycopg has no call to ask
for that format, so this module sets it through the libpq that psycopg itself loaded
(PQsetErrorVerbosity), repeats the login once, and reads the code at its fixed place.
Where that libpq cannot be reached the answer is "unknown", and the caller treats the
failure as one that may heal (it retries, and says so), never as fatal.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import glob
import os
import re
from collections.abc import Callable

import anyio
import psycopg
from psycopg import pq
from psycopg.conninfo import conninfo_to_dict

__all__ = ["login_sqlstate"]

_PQERRORS_VERBOSE = 2
# After "failed: ", the severity (localized: any word) and the five-character code.
_VERBOSE_SQLSTATE = re.compile(r"failed: \w+:\s+([0-9A-Z]{5}):\s")


@functools.cache
def _set_verbosity() -> Callable[[int], None] | None:
    """PQsetErrorVerbosity of the libpq psycopg uses, or None if it cannot be found."""
    library: ctypes.CDLL | None = None
    with contextlib.suppress(Exception):
        if pq.__impl__ == "python":
            from psycopg.pq import _pq_ctypes

            library = vars(_pq_ctypes)["pq"]  # its loaded libpq (not in the stubs)
        elif pq.__impl__ == "binary":
            import psycopg_binary  # type: ignore[import-not-found,unused-ignore]

            libs = os.path.join(
                os.path.dirname(psycopg_binary.__file__), "..", "psycopg_binary.libs"
            )
            found = sorted(glob.glob(os.path.join(libs, "libpq*")))
            if found:  # already loaded by psycopg_binary: the same copy, not a second one
                library = ctypes.CDLL(found[0], mode=getattr(os, "RTLD_NOLOAD", 0))
        elif name := ctypes.util.find_library("pq"):
            library = ctypes.CDLL(name)
    if library is None:
        return None
    function = library.PQsetErrorVerbosity
    function.argtypes = [ctypes.c_void_p, ctypes.c_int]
    function.restype = ctypes.c_int

    def set_verbose(pgconn_ptr: int) -> None:
        function(pgconn_ptr, _PQERRORS_VERBOSE)

    return set_verbose


def _on_unix_socket(conninfo: str) -> bool:
    host = str(conninfo_to_dict(conninfo).get("host") or "")
    # No host: libpq's default socket directory; a path or "@name": a socket.
    return host == "" or host.startswith(("/", "@"))


async def login_sqlstate(conninfo: str, timeout_seconds: float) -> str | None:
    """Log in once more with verbose errors; the SQLSTATE the server refused it with,
    ``""`` when libpq refuses the options before any I/O (e.g. ``port=abc``), or None:
    it succeeded, failed without a server answer (refused, unreachable, timed out), or
    the code could not be read."""
    conn = pq.PGconn.connect_start(conninfo.encode())
    try:
        if conn.status == pq.ConnStatus.BAD:
            # Before any I/O libpq refused the options (e.g. port=abc): "". Except that on
            # a Unix socket the connect itself is synchronous, so a server that is not
            # running (no socket file) is BAD here too, and may well heal: unknown.
            return None if _on_unix_socket(conninfo) else ""
        set_verbose = _set_verbosity()
        pointer: int | None = conn.pgconn_ptr  # type: ignore[attr-defined]
        if set_verbose is not None and pointer:
            set_verbose(pointer)
        with anyio.move_on_after(timeout_seconds):
            while True:
                status = conn.connect_poll()
                if status == pq.PollingStatus.READING:
                    await anyio.wait_readable(conn.socket)
                elif status == pq.PollingStatus.WRITING:
                    await anyio.wait_writable(conn.socket)
                elif status == pq.PollingStatus.FAILED:
                    message = conn.get_error_message("utf-8")
                    found = _VERBOSE_SQLSTATE.search(message)
                    return found.group(1) if found else None
                else:
                    return None
        return None
    except psycopg.Error:
        return None
    finally:
        conn.finish()
