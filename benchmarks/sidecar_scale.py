"""Sidecar scale: many relays against one database.

1. Idle cost. --relays (default 50) `outbox-relay run` processes (`python -m relay run`,
   default settings, RELAY_HTTP_PORT=0) against one database with an empty queue. Once
   they have connected, their polling has backed off and their pools have shrunk
   (80 s), for --window seconds (30):
   the connections they hold (pg_stat_activity), the transactions they cause
   (pg_stat_database), and the CPU of the PostgreSQL processes and of the relays
   (utime + stime from /proc/<pid>/stat).
2. Claim contention. The same backlog (--intents charges, one per payment) drained by 1
   relay and by 10 (--many), each through the fake provider (HTTP, no latency). So that
   process start-up is not timed, every relay first connects while a lock on
   outbox.payment_intents holds its first claim; the lock is released when all of them
   wait on it, and the clock starts then. Prints intents/s and the ratio many / one, and
   how many intents were sent more than once (must be 0).

The database is, by default, a private PostgreSQL cluster started for this run with the
server's own binaries (initdb, pg_ctl; as the postgres user when run as root), with
max_connections = 300: 50 relays need about 100 connections, which is the whole of a
default server's max_connections, and a private cluster's processes are the only
PostgreSQL processes whose CPU the benchmark adds up. --shared runs on
RELAY_DATABASE_URL's server instead (scratch database; only the relays' backends' CPU is
counted). Writes benchmarks/results/sidecar_scale.json.

    python benchmarks/sidecar_scale.py [--relays 50] [--intents 10000] [--quick]
"""

from __future__ import annotations

import argparse
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import (
    FakeProvider,
    count_terminal,
    cpu_seconds,
    free_port,
    insert_backlog,
    load_average,
    machine_busy_share,
    machine_ticks,
    relay_command,
    relay_env,
    scratch_database,
    table,
    terminal_count,
    write_result,
)
from relay.infra.migrate import migrate

# -- the database --------------------------------------------------------------------------


def _pg_bin(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    for candidate in sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True):
        return str(candidate)
    raise SystemExit(f"{name} not found; use --shared with RELAY_DATABASE_URL")


@contextmanager
def private_cluster(max_connections: int) -> Iterator[tuple[str, Path]]:
    """A throw-away cluster; yields (url, data directory)."""
    workdir = Path(tempfile.mkdtemp(prefix="outbox-bench-pg-"))
    data = workdir / "data"
    as_user: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        postgres = pwd.getpwnam("postgres")
        os.chown(workdir, postgres.pw_uid, postgres.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    subprocess.run(
        [*as_user, _pg_bin("initdb"), "-D", str(data), "-U", "postgres", "--auth=trust"],
        check=True,
        capture_output=True,
    )
    options = (
        f"-p {port} -k {workdir} -c listen_addresses=127.0.0.1 -c max_connections={max_connections}"
    )
    pg_ctl = _pg_bin("pg_ctl")
    subprocess.run(
        [
            *as_user,
            pg_ctl,
            "-D",
            str(data),
            "-l",
            str(workdir / "log"),
            "-w",
            "-o",
            options,
            "start",
        ],
        check=True,
        capture_output=True,
    )
    try:
        url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        migrate(url)
        yield url, data
    finally:
        subprocess.run(
            [*as_user, pg_ctl, "-D", str(data), "-m", "fast", "stop"], capture_output=True
        )
        shutil.rmtree(workdir, ignore_errors=True)


@contextmanager
def database(shared: bool) -> Iterator[tuple[str, Path | None]]:
    if shared:
        with scratch_database("sidecar") as url:
            yield url, None
    else:
        with private_cluster(max_connections=300) as (url, data):
            yield url, data


def _children(parent: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat[stat.rindex(")") + 2 :].split()[1]) == parent:
            pids.append(int(entry.name))
    return pids


def postgres_pids(url: str, data: Path | None) -> list[int]:
    """Every process of the private cluster; on a shared server, our database's backends."""
    if data is not None:
        postmaster = int((data / "postmaster.pid").read_text().split()[0])
        return [postmaster, *_children(postmaster)]
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
            " AND pid <> pg_backend_pid()"
        ).fetchall()
    return [pid for (pid,) in rows]


def connections(url: str) -> dict[str, int]:
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT CASE WHEN application_name LIKE 'sidecar-%' THEN 'relay pools'"
            " ELSE application_name END, count(*)"
            " FROM pg_stat_activity WHERE datname = current_database()"
            " AND pid <> pg_backend_pid() GROUP BY 1"
        ).fetchall()
    return {name or "(none)": int(n) for name, n in rows}


def transactions(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT xact_commit + xact_rollback FROM pg_stat_database"
            " WHERE datname = current_database()"
        ).fetchone()
    assert row is not None
    return int(row[0])


# -- relays --------------------------------------------------------------------------------


def start_relays(
    url: str, provider_url: str, count: int, tag: str, **settings: str
) -> list[subprocess.Popen[bytes]]:
    """``count`` `outbox-relay run` processes named sidecar-<tag>-<n>; ``settings`` are
    further RELAY_* variables (lower-case names without the prefix)."""
    return [
        subprocess.Popen(
            relay_command(),
            env=relay_env(
                url,
                provider_url,
                http_port="0",
                instance_name=f"sidecar-{tag}-{n}",
                shutdown_grace_seconds="2",
                **settings,
            ),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for n in range(count)
    ]


def stop_relays(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 30
    for proc in procs:
        try:
            proc.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def idle_cost(
    url: str, data: Path | None, relays: int, window: float, settle: float
) -> dict[str, Any]:
    procs = start_relays(url, "http://127.0.0.1:9", relays, "idle")
    try:
        # Connected: every relay's pool and LISTEN connection is there, and stays.
        deadline = time.monotonic() + 300
        while True:
            held = connections(url)
            if held.get("relay pools", 0) >= relays and (
                held.get("outbox-relay-listen", 0) >= relays
            ):
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"relays did not all connect within 300 s: {held}")
            if any(proc.poll() is not None for proc in procs):
                raise SystemExit("a relay exited during start-up")
            time.sleep(1)
        print(f"  {relays} relays connected (load {load_average()}); letting polling back off")
        # Polling backs off 1 s -> 2 s -> 4 s -> the 5 s ceiling, and each pool gives back
        # what start-up grew it to, one connection per 20 s idle (relay/infra/db.py).
        time.sleep(settle)
        pg = postgres_pids(url, data)
        pg_cpu0 = sum(cpu_seconds(p) for p in pg)
        relay_cpu0 = sum(cpu_seconds(p.pid) for p in procs)
        xacts0, started = transactions(url), time.monotonic()
        time.sleep(window)
        elapsed = time.monotonic() - started
        xacts = transactions(url) - xacts0
        pg_after = postgres_pids(url, data)
        pg_cpu = sum(cpu_seconds(p) for p in pg_after) - pg_cpu0
        relay_cpu = sum(cpu_seconds(p.pid) for p in procs) - relay_cpu0
        held = connections(url)
    finally:
        stop_relays(procs)
    return {
        "relays": relays,
        "window_seconds": elapsed,
        "connections": held,
        "connections_per_relay": (held.get("relay pools", 0) + held.get("outbox-relay-listen", 0))
        / relays,
        "transactions_per_second": xacts / elapsed,
        "postgres_cpu_share_of_one_core": pg_cpu / elapsed,
        "relays_cpu_share_of_one_core": relay_cpu / elapsed,
        "postgres_processes_counted": len(pg_after),
    }


def drain(
    url: str,
    provider_url: str,
    relays: int,
    intents: int,
    tag: str,
    *,
    pairs: bool = False,
    provider_pid: int | None = None,
    **settings: str,
) -> dict[str, Any]:
    """``intents`` (one charge per payment, or authorize then capture with ``pairs``)
    drained by ``relays`` `outbox-relay run` processes started together; ``settings`` are
    further RELAY_* variables for them. Also the relays' CPU and the machine's, and with
    ``provider_pid`` that process's (the fake provider's), over the same window."""
    before = terminal_count(url)
    insert_backlog(url, intents, pairs=pairs, prefix=tag)
    with psycopg.connect(url, autocommit=True) as gate, psycopg.connect(url) as locker:
        # Start line: every relay's first claim waits on this lock.
        locker.execute("LOCK TABLE outbox.payment_intents IN ACCESS EXCLUSIVE MODE")
        procs = start_relays(url, provider_url, relays, tag, **settings)
        try:
            deadline = time.monotonic() + 300
            while True:
                row = gate.execute(
                    "SELECT count(DISTINCT application_name) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND wait_event_type = 'Lock'"
                    " AND application_name LIKE %s",
                    (f"sidecar-{tag}-%",),
                ).fetchone()
                assert row is not None
                if row[0] >= relays:
                    break
                if time.monotonic() > deadline:
                    raise SystemExit(f"only {row[0]} of {relays} relays reached the start line")
                if any(proc.poll() is not None for proc in procs):
                    raise SystemExit("a relay exited before the start line")
                time.sleep(0.2)
            relay_cpu0 = sum(cpu_seconds(proc.pid) for proc in procs)
            provider_cpu0 = cpu_seconds(provider_pid) if provider_pid else 0.0
            machine0 = machine_ticks()
            locker.commit()  # go
            started = time.perf_counter()
            while count_terminal(gate) < before + intents:
                time.sleep(0.1)
            elapsed = time.perf_counter() - started
            machine = machine_busy_share(machine0, machine_ticks())
            relay_cpu = sum(cpu_seconds(proc.pid) for proc in procs) - relay_cpu0
            provider_cpu = cpu_seconds(provider_pid) - provider_cpu0 if provider_pid else 0.0
        finally:
            stop_relays(procs)
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM outbox.payment_intents WHERE attempts > 1 AND payment_id LIKE %s",
            (f"{tag}-%",),
        ).fetchone()
    assert row is not None
    return {
        "relays": relays,
        "intents": intents,
        "seconds": elapsed,
        "intents_per_second": intents / elapsed,
        "relays_cpu_ms_per_intent": relay_cpu / intents * 1000,
        "relays_cpu_share_of_one_core": relay_cpu / elapsed,
        "machine_busy_share": machine,
        "provider_cpu_seconds": provider_cpu,
        "sent_more_than_once": int(row[0]),
        "load_average_after": load_average(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--relays", type=int, default=50, help="idle relays (50)")
    parser.add_argument("--window", type=float, default=30.0, help="idle measurement (30 s)")
    parser.add_argument("--intents", type=int, default=10_000, help="drain backlog (10000)")
    parser.add_argument("--many", type=int, default=10, help="relays in the contended drain")
    parser.add_argument("--shared", action="store_true", help="use RELAY_DATABASE_URL's server")
    parser.add_argument(
        "--quick", action="store_true", help="3 idle relays, 10 s; 1,000 intents, 1 vs 3 relays"
    )
    args = parser.parse_args()
    if args.quick:
        args.relays, args.window, args.intents, args.many = 3, 10.0, 1_000, 3
    with database(args.shared) as (url, data):
        print(f"idle: {args.relays} relays, {args.window:g} s window (load {load_average()})")
        idle = idle_cost(url, data, args.relays, args.window, 5.0 if args.quick else 80.0)
        fake = FakeProvider()
        try:
            drains = {}
            for n in (1, args.many):
                print(f"drain: {n} relay(s), {args.intents:,} intents (load {load_average()})")
                drains[n] = drain(url, fake.url, n, args.intents, f"d{n}")
                print(f"  {drains[n]['intents_per_second']:,.0f} intents/s", flush=True)
        finally:
            fake.stop()
    where = "private cluster" if data is not None else "shared server (our backends only)"
    rows: list[tuple[str, ...]] = [("idle relays", "value")]
    rows += [
        ("relays", str(idle["relays"])),
        ("connections held (all)", str(sum(idle["connections"].values()))),
        ("connections per relay", f"{idle['connections_per_relay']:.1f}"),
        ("transactions/s caused", f"{idle['transactions_per_second']:.1f}"),
        (
            f"PostgreSQL CPU, {where}",
            f"{idle['postgres_cpu_share_of_one_core'] * 100:.1f} % of a core",
        ),
        (
            "relays' own CPU, all together",
            f"{idle['relays_cpu_share_of_one_core'] * 100:.1f} % of a core",
        ),
    ]
    print(table(rows))
    one, many = drains[1], drains[args.many]
    ratio = many["intents_per_second"] / one["intents_per_second"]
    rows = [("drain (fake provider, HTTP)", "intents/s", "ratio to 1 relay", "sent twice")]
    rows += [
        (
            f"{d['relays']} relay(s)",
            f"{d['intents_per_second']:,.0f}",
            f"{d['intents_per_second'] / one['intents_per_second']:.2f}",
            str(d["sent_more_than_once"]),
        )
        for d in (one, many)
    ]
    print(table(rows))
    path = write_result(
        "sidecar_scale",
        {
            "database": where,
            "quick": args.quick,
            "idle": idle,
            "drain": {str(k): v for k, v in drains.items()},
            "ratio_many_to_one": ratio,
        },
    )
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
