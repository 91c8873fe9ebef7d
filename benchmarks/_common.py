"""Shared by the benchmark scripts: a database to run on, result output."""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import psycopg
from psycopg.conninfo import make_conninfo

from provider_adapters.base import Command, Outcome, Succeeded
from relay.infra.migrate import migrate

RESULTS = Path(__file__).parent / "results"


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_at_write": load_average(),
    }


@contextmanager
def scratch_database(label: str, *, migrations: Path | None = None) -> Iterator[str]:
    """A fresh database on RELAY_DATABASE_URL's server (or an embedded one), migrated with
    the migrations in ``migrations`` (default: sql/)."""
    admin = os.environ.get("RELAY_DATABASE_URL") or os.environ.get("RELAY_TEST_DATABASE_URL")
    if not admin:
        from relay.infra.embedded_pg import embedded_postgres

        with embedded_postgres() as url:
            migrate(url, directory=migrations)
            yield url
        return
    name = f"outbox_bench_{label}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = make_conninfo(admin, dbname=name)
    try:
        migrate(url, directory=migrations)
        yield url
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def code_version() -> dict[str, Any]:
    """The commit, and fingerprints of the SQL and relay code and of the provider adapters
    actually measured (the working tree may differ from the commit)."""
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for path in sorted(
        [*root.glob("sql/*.sql"), *root.glob("relay/**/*.sql"), *root.glob("relay/**/*.py")]
    ):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        head = ""
    # The provider adapters apart, so the relay's fingerprint keeps its meaning across runs.
    adapters = hashlib.sha256()
    for path in sorted(root.glob("provider_adapters/**/*.py")):
        adapters.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return {
        "git_head": head or None,
        "sql_and_relay_sha256": digest.hexdigest()[:12],
        "provider_adapters_sha256": adapters.hexdigest()[:12],
    }


def write_result(name: str, result: dict[str, Any]) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    stamp = {"machine": machine(), "code": code_version(), "finished_at": time.strftime("%FT%T%z")}
    path.write_text(json.dumps({**stamp, **result}, indent=2) + "\n")
    return path


def table(rows: Sequence[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


# -- shared by the relay benchmarks ------------------------------------------------------

BENCH_API_KEY = "sk_test_bench"
INTENT_COLUMNS = "payment_id, action, provider, amount_minor, currency, payment_method"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class FakeProvider:
    """`python -m relay fake-provider` (Stripe-compatible), or with ``adyen`` the fake
    Adyen Checkout API (`python -m provider_adapters.fake.adyen`), in its own process,
    ready when constructed."""

    def __init__(self, *flags: str, adyen: bool = False) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        serve = ["provider_adapters.fake.adyen"] if adyen else ["relay", "fake-provider"]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", *serve, "--port", str(self.port), *flags],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(300):
            try:
                httpx.get(f"{self.url}/_fake/effects", timeout=1).raise_for_status()
                return
            except httpx.HTTPError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("fake provider did not start")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class ZeroLatencyProvider:
    """A provider adapter (provider_adapters.base.ProviderAdapter) that answers at once.

    Every command succeeds for the amount asked, like MemoryProvider's outcomes but with
    no bookkeeping of its own, so a benchmark measures the relay and nothing else.
    ``on_call`` (optional) sees every command as it arrives; ``latency`` (seconds,
    default 0) makes every answer wait, as a provider far away would, without using CPU.
    """

    def __init__(
        self,
        name: str = "stripe",
        on_call: Callable[[Command], None] | None = None,
        latency: float = 0.0,
    ) -> None:
        self.name = name
        self.calls = 0
        self._on_call = on_call
        self._latency = latency

    async def execute(self, command: Command) -> Outcome:
        self.calls += 1
        if self._on_call is not None:
            self._on_call(command)
        if self._latency:
            await anyio.sleep(self._latency)
        reference = command.payment_reference or f"pi_bench_{command.intent_id}"
        return Succeeded(reference, reference, command.amount_minor, command.currency)

    async def lookup(self, command: Command) -> Outcome:
        return await self.execute(command)

    async def aclose(self) -> None:
        return None


def insert_backlog(
    url: str,
    intents: int,
    *,
    provider: str = "stripe",
    prefix: str = "p",
    pairs: bool = True,
    start: int = 0,
) -> None:
    """COPY ``intents`` intents in: authorize then capture per payment (``pairs``), or
    one charge per payment. The outbox's insert triggers run as for any application."""
    with (
        psycopg.connect(url) as conn,
        conn.cursor() as cur,
        cur.copy(f"COPY outbox.payment_intents ({INTENT_COLUMNS}) FROM STDIN") as copy,
    ):
        if pairs:
            for n in range(start, start + intents // 2):
                payment = f"{prefix}-{n}"
                copy.write_row((payment, "authorize", provider, 1000, "EUR", "pm_card_visa"))
                copy.write_row((payment, "capture", provider, None, "EUR", None))
        else:
            for n in range(start, start + intents):
                copy.write_row((f"{prefix}-{n}", "charge", provider, 1000, "EUR", "pm_card_visa"))


def terminal_count(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        return count_terminal(conn)


def count_terminal(conn: psycopg.Connection[Any]) -> int:
    """Intents finished (succeeded, failed or dead), on a connection the caller keeps open
    (a poll loop's)."""
    row = conn.execute(
        "SELECT count(*) FROM outbox.payment_intents"
        " WHERE status IN ('succeeded', 'failed', 'dead')"
    ).fetchone()
    assert row is not None
    return int(row[0])


def status_counts(url: str) -> dict[str, int]:
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT status, count(*) FROM outbox.payment_intents GROUP BY status"
        ).fetchall()
    return {status: int(n) for status, n in rows}


def quiet_relay_logging() -> None:
    """Log as `outbox-relay run` does in production (JSON lines), into /dev/null: the
    relay pays for its logging, the terminal shows only the benchmark's table."""
    from relay.infra.logs import configure_logging

    configure_logging("json", stream=open(os.devnull, "w"))  # noqa: SIM115 - lives for the run


def relay_env(database_url: str, provider_url: str, **settings: str) -> dict[str, str]:
    """Environment for an `outbox-relay run` process against the fake provider."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("RELAY_", "FAKE_PROVIDER_"))
    }
    env.update(
        RELAY_DATABASE_URL=database_url,
        RELAY_PROVIDERS__STRIPE__BASE_URL=provider_url,
        RELAY_PROVIDERS__STRIPE__API_KEY=BENCH_API_KEY,
        RELAY_LOG_FORMAT="json",
    )
    env.update({f"RELAY_{key.upper()}": value for key, value in settings.items()})
    return env


def relay_command() -> list[str]:
    return [sys.executable, "-m", "relay", "run"]


def rss_mb(pid: int) -> float:
    """Resident set size of ``pid`` from /proc/<pid>/status (VmRSS), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` so far, from /proc/<pid>/stat (0 if gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def machine_ticks() -> tuple[int, int]:
    """(busy, all) CPU ticks of the whole machine so far, every core, from /proc/stat:
    what a run cost the machine is the difference of two readings. Busy is user, nice,
    system, irq and softirq; all adds idle, iowait and steal (time the hypervisor gave
    to another guest: not ours, so not busy)."""
    user, nice, system, idle, iowait, irq, softirq, steal = (
        int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
    )
    busy = user + nice + system + irq + softirq
    return busy, busy + idle + iowait + steal


def machine_cores() -> int:
    """The cores /proc/stat counts (cpu0, cpu1, ...), which machine_ticks() adds up."""
    return sum(
        1
        for line in Path("/proc/stat").read_text().splitlines()
        if line.startswith("cpu") and line[3:4].isdigit()
    )


def machine_busy_share(before: tuple[int, int], after: tuple[int, int]) -> float:
    """Share of the machine's cores (0 to 1) busy between two machine_ticks() readings."""
    return (after[0] - before[0]) / max(after[1] - before[1], 1)


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])
