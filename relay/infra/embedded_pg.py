"""A throw-away PostgreSQL for the demo and for tests on a bare machine.

Uses the `pgserver` package (wheels for CPython 3.11 and 3.12; installed by the `demo` and
`test` extras, never by the production package); where it is missing, falls back to
PostgreSQL's own `initdb` and `pg_ctl` on PATH. Neither present: a clear error telling the
user to set RELAY_DATABASE_URL.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["EmbeddedPostgresUnavailable", "embedded_postgres"]


class EmbeddedPostgresUnavailable(RuntimeError):
    code = "embedded_postgres_unavailable"


@contextmanager
def embedded_postgres() -> Iterator[str]:
    """Start a temporary cluster; yield its URL; stop and delete it on exit."""
    workdir = Path(tempfile.mkdtemp(prefix="outbox-relay-pg-"))
    try:
        server = _start_pgserver(workdir / "pgdata")
        if server is None:
            with _initdb_cluster(workdir) as url:
                yield url
            return
        try:
            yield str(server.get_uri())
        finally:
            server.cleanup()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _start_pgserver(pgdata: Path) -> Any | None:
    """pgserver's server for ``pgdata``, started; None when pgserver is not installed."""
    with _runtime_dir_warning_ignored():
        try:
            import pgserver
        except ImportError:
            return None
        return pgserver.get_server(pgdata, cleanup_mode="stop")  # type: ignore[attr-defined]


@contextmanager
def _runtime_dir_warning_ignored() -> Iterator[None]:
    """Without XDG_RUNTIME_DIR (containers, CI, root shells) platformdirs warns
    (RuntimeDirWarning) that it falls back to /tmp/runtime-UID, which is what pgserver
    should use for its lock file anyway. pgserver asks for that directory in a class body,
    so the warning comes at ``import pgserver``: the import and the start run under this
    one filter, matched by the warning's own text; nothing else is silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
        yield


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def _initdb_cluster(workdir: Path) -> Iterator[str]:
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if not (initdb and pg_ctl):
        for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
            if (candidate / "initdb").exists():
                initdb, pg_ctl = str(candidate / "initdb"), str(candidate / "pg_ctl")
                break
    if not (initdb and pg_ctl):
        raise EmbeddedPostgresUnavailable(
            "no embedded PostgreSQL: the pgserver package (in the demo and test extras, "
            "CPython 3.11 and 3.12 only) is not installed for this Python and initdb/pg_ctl "
            "are not on PATH; set RELAY_DATABASE_URL to a PostgreSQL you run"
        )
    data = workdir / "data"
    port = _free_port()
    subprocess.run(
        [initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [
            pg_ctl,
            "-D",
            str(data),
            "-l",
            str(workdir / "log"),
            "-w",
            "-o",
            f"-p {port} -k {workdir} -c listen_addresses=''",
            "start",
        ],
        check=True,
        capture_output=True,
    )
    try:
        yield f"postgresql://postgres@/postgres?host={workdir}&port={port}"
    finally:
        subprocess.run([pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
