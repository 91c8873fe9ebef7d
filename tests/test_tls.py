"""TLS: libpq's sslmode / sslrootcert in RELAY_DATABASE_URL reach every connection the relay
opens, and an amqps:// URL (with its TLS query options) reaches aio-pika unchanged.

The first checks adapt to the server under test: with `ssl = on` they show, from
pg_stat_ssl, that the relay's connections are encrypted; with `ssl = off` (this machine's
CI server) they show that `sslmode=require` is honoured by refusing to connect in clear,
with one readable error and no traceback. Either way a URL whose TLS parameters were
dropped would connect in clear and fail the test.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import anyio
import httpx
import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from relay.events.publisher import publisher_from_settings
from relay.infra.config import Settings
from relay.infra.db import Database
from relay.infra.migrate import migrate
from tests.processes import RelayProcess, free_port, idle_relay_env
from tests.support.cli import run_cli
from tests.support.waiting import block_until

pytestmark = pytest.mark.integration


def _with(url: str, **params: str) -> str:
    return make_conninfo(url, **params)


def _over_tcp(db_url: str) -> None:
    """libpq ignores sslmode on a Unix-domain socket (the embedded server's only way in):
    these checks need the server over TCP, as CI's is."""
    host = str(conninfo_to_dict(db_url).get("host") or "")
    if not host or host.startswith("/"):
        pytest.skip("TLS does not apply to a Unix-domain socket; run against a server over TCP")


def _server_ssl(db_url: str) -> bool:
    with psycopg.connect(db_url) as conn:
        row = conn.execute("SHOW ssl").fetchone()
    return row is not None and row[0] == "on"


def test_relay_connections_honour_sslmode_require(db_url: str, tmp_path: Path) -> None:
    _over_tcp(db_url)
    url = _with(db_url, sslmode="require")
    relay = RelayProcess(
        "tls-relay",
        idle_relay_env(url, RELAY_POLL_INTERVAL_SECONDS="0.1"),
        tmp_path,
    )
    encrypted = _server_ssl(db_url)
    try:
        relay.start()
        if encrypted:
            relay.wait_ready()

            def sessions() -> list[tuple[Any, ...]]:
                with psycopg.connect(db_url) as conn:
                    return conn.execute(
                        "SELECT a.application_name, s.ssl FROM pg_stat_activity AS a"
                        " JOIN pg_stat_ssl AS s ON s.pid = a.pid"
                        " WHERE a.datname = current_database()"
                        "   AND a.application_name IN ('tls-relay', 'outbox-relay-listen')"
                    ).fetchall()

            # The pool's connections and the LISTEN connection, every one over TLS.
            found = block_until(
                lambda: {name for name, _ in sessions()} >= {"tls-relay"} and sessions()
            )
            assert all(ssl for _, ssl in found), found
        else:
            block_until(lambda: "server does not support SSL" in relay.log_path.read_text())
            readyz = httpx.get(f"http://127.0.0.1:{relay.http_port}/readyz", timeout=10)
            assert readyz.status_code == 503 and "database unreachable" in readyz.text
    finally:
        relay.terminate()
    log = relay.log_path.read_text()
    assert "Traceback" not in log
    if not encrypted:
        # It never fell back to a clear-text connection.
        assert "relay_ready" not in log or "server does not support SSL" in log
        with psycopg.connect(db_url) as conn:
            clear = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND application_name IN ('tls-relay', 'outbox-relay-listen')"
            ).fetchone()
        assert clear == (0,)


def test_cli_verify_full_with_a_wrong_root_certificate_fails_clearly(
    db_url: str, tmp_path: Path
) -> None:
    _over_tcp(db_url)
    wrong_root = tmp_path / "not-our-ca.crt"
    wrong_root.write_text(
        "-----BEGIN CERTIFICATE-----\nMIIBnotarealcertificate\n-----END CERTIFICATE-----\n"
    )
    url = _with(db_url, sslmode="verify-full", sslrootcert=str(wrong_root))
    result = run_cli("status", env={"RELAY_DATABASE_URL": url})
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    if _server_ssl(db_url):
        assert any(word in lines[0] for word in ("certificate", "SSL")), lines[0]
    else:
        assert "server does not support SSL, but SSL was required" in lines[0]


def test_amqps_url_reaches_aio_pika_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    url = (
        "amqps://relay:secret@rabbit.example:5671/payments"
        "?cafile=/etc/relay/ca.crt&certfile=/etc/relay/client.crt&keyfile=/etc/relay/client.key"
        "&heartbeat=30"
    )
    seen: list[str] = []

    class Captured(BaseException):
        pass

    async def connect(given: str, **_kwargs: object) -> None:
        seen.append(given)
        raise Captured

    import relay.events.publisher

    monkeypatch.setattr(relay.events.publisher.aio_pika, "connect", connect)
    settings = Settings(amqp_url=url, providers={})  # type: ignore[arg-type]
    publisher = publisher_from_settings(settings, Database("dbname=unused"))
    assert publisher is not None
    with pytest.raises(Captured):
        anyio.run(publisher._connect_loop)
    assert seen == [url]


# -- a TLS PostgreSQL the test owns -----------------------------------------------------------
# The machine's server runs with ssl = off, so the tests above can only show that TLS is
# demanded. Here a pgserver cluster gets a certificate from a throw-away CA and listens on
# localhost with ssl = on: the relay must verify that certificate (verify-full) and encrypt
# every connection, and must refuse a server its root certificate does not vouch for.


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=120)


def _make_ca(directory: Path, name: str) -> None:
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        "-subj", f"/CN={name}", "-keyout", f"{name}.key", "-out", f"{name}.crt",
        cwd=directory,
    )  # fmt: skip


def _make_server_cert(directory: Path, ca: str) -> None:
    (directory / "san.cnf").write_text("subjectAltName = DNS:localhost\n")
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
        "-keyout", "server.key", "-out", "server.csr",
        cwd=directory,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", "server.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
        "-CAcreateserial", "-days", "2", "-extfile", "san.cnf", "-out", "server.crt",
        cwd=directory,
    )  # fmt: skip


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True)
    return str(candidates[0]) if candidates else None


@pytest.fixture(scope="module")
def tls_postgres() -> Any:
    """(URL without TLS parameters, our CA's certificate, another CA's certificate).

    A private cluster of the machine's own PostgreSQL (built with OpenSSL, unlike pgserver's),
    run as the ``postgres`` user when the tests run as root."""
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    tools = {"initdb": initdb, "pg_ctl": pg_ctl, "openssl": shutil.which("openssl")}
    running_as_root = os.geteuid() == 0  # PostgreSQL refuses to run as root
    if running_as_root:  # sbin is often off a user's PATH (an `env -i` shell)
        tools["runuser"] = shutil.which("runuser") or shutil.which(
            "runuser", path="/usr/sbin:/sbin"
        )
    missing = [name for name, path in tools.items() if path is None]
    if missing:
        if os.environ.get("RELAY_TEST_REQUIRE_SERVICES") == "1":
            pytest.fail(f"a TLS PostgreSQL the test owns needs {', '.join(missing)}")
        pytest.skip(f"{', '.join(missing)} not installed")
    assert initdb is not None and pg_ctl is not None
    workdir = Path(tempfile.mkdtemp(prefix="outbox-relay-tls-"))
    certs = workdir / "certs"
    certs.mkdir()
    _make_ca(certs, "outbox-test-ca")
    _make_ca(certs, "someone-elses-ca")
    _make_server_cert(certs, "outbox-test-ca")
    data = workdir / "data"
    as_user: list[str] = []
    if running_as_root:
        as_user = [str(tools["runuser"]), "-u", "postgres", "--"]
        shutil.chown(workdir, user="postgres")
    subprocess.run(
        [*as_user, initdb, "-D", str(data), "-U", "postgres", "--auth=trust"],
        check=True,
        capture_output=True,
        timeout=300,
    )
    for name in ("server.crt", "server.key"):
        shutil.copy(certs / name, data / name)
        (data / name).chmod(0o600)
        if as_user:
            shutil.chown(data / name, user="postgres")
    port = free_port()
    options = f"-p {port} -k {workdir} -c listen_addresses=localhost -c ssl=on"
    subprocess.run(
        [*as_user, pg_ctl, "-D", str(data), "-l", str(workdir / "log"), "-w", "-o", options,
         "start"],
        check=True,
        capture_output=True,
        timeout=300,
    )  # fmt: skip
    try:
        yield (
            f"postgresql://postgres@localhost:{port}/postgres",
            certs / "outbox-test-ca.crt",
            certs / "someone-elses-ca.crt",
        )
    finally:
        subprocess.run(
            [*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "stop"],
            capture_output=True,
            timeout=300,
        )
        shutil.rmtree(workdir, ignore_errors=True)


def test_relay_verifies_the_server_and_encrypts_every_connection(
    tls_postgres: Any, tmp_path: Path
) -> None:
    base, ca, _ = tls_postgres
    url = _with(base, sslmode="verify-full", sslrootcert=str(ca))
    assert migrate(url) is not None  # the migrations too, over verified TLS
    relay = RelayProcess(
        "tls-verified-relay",
        idle_relay_env(url, RELAY_POLL_INTERVAL_SECONDS="0.1"),
        tmp_path,
    )

    def sessions() -> list[tuple[Any, ...]]:
        with psycopg.connect(url) as conn:
            return conn.execute(
                "SELECT a.application_name, s.ssl, s.version FROM pg_stat_activity AS a"
                " JOIN pg_stat_ssl AS s ON s.pid = a.pid"
                " WHERE a.application_name IN ('tls-verified-relay', 'outbox-relay-listen')"
            ).fetchall()

    try:
        relay.start()
        relay.wait_ready()
        found = block_until(
            lambda: (
                {row[0] for row in sessions()} >= {"tls-verified-relay", "outbox-relay-listen"}
                and sessions()
            )
        )
        readyz = httpx.get(f"http://127.0.0.1:{relay.http_port}/readyz", timeout=10)
    finally:
        exit_code = relay.terminate()
    assert all(ssl and version.startswith("TLS") for _, ssl, version in found), found
    assert readyz.status_code == 200
    assert exit_code == 0
    assert "Traceback" not in relay.log_path.read_text()


def test_a_server_our_root_certificate_does_not_vouch_for_is_refused(tls_postgres: Any) -> None:
    base, _, other_ca = tls_postgres
    url = _with(base, sslmode="verify-full", sslrootcert=str(other_ca))
    result = run_cli("status", env={"RELAY_DATABASE_URL": url})
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    assert "certificate verify failed" in lines[0], lines[0]
