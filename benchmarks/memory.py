"""Memory: a relay process's RSS with a 1,000,000-intent backlog, and over a soak.

The backlog (one charge per payment) goes in with COPY, through the outbox's insert
trigger, before the relay starts. The INSERT writes no audit row (sql/0019): the relay's
claim of each intent writes its creation rows, then its own. The provider is the fake one in its own process with --latency-ms (default
200 ms), so the relay keeps a steady set of calls in flight (lane concurrency 32,
the default) and works the whole time without ever emptying the backlog.

The relay is a real `outbox-relay run` process (`python -m relay run`) with the default
settings (RELAY_HTTP_PORT=0, logs to /dev/null). Its RSS is read from /proc/<pid>/status
(VmRSS) every second for --soak-seconds (default 600). Prints RSS at 1 minute, the
peak, the end, and the growth over the soak (goal: <= 150 MB, flat); writes
benchmarks/results/memory.json.

    python benchmarks/memory.py [--backlog 1000000] [--soak-seconds 600] [--quick]
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import (
    FakeProvider,
    cpu_seconds,
    insert_backlog,
    load_average,
    relay_command,
    relay_env,
    rss_mb,
    scratch_database,
    status_counts,
    table,
    write_result,
)


def load(url: str, backlog: int) -> float:
    """COPY the backlog in through the outbox's insert trigger. It writes no audit row
    (sql/0019): the relay writes each intent's creation rows with its claim."""
    started = time.perf_counter()
    chunk = 100_000
    for start in range(0, backlog, chunk):
        insert_backlog(url, min(chunk, backlog - start), pairs=False, start=start)
        print(f"  loaded {start + min(chunk, backlog - start):,}", flush=True)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE outbox.payment_intents")
        conn.execute("VACUUM ANALYZE outbox.payments")
    return time.perf_counter() - started


def slope_mb_per_minute(samples: list[tuple[float, float]]) -> float:
    """Least-squares slope of RSS over time, in MB per minute."""
    n = len(samples)
    if n < 2:
        return 0.0
    mean_t = sum(t for t, _ in samples) / n
    mean_r = sum(r for _, r in samples) / n
    var = sum((t - mean_t) ** 2 for t, _ in samples)
    cov = sum((t - mean_t) * (r - mean_r) for t, r in samples)
    return cov / var * 60 if var else 0.0


def soak(url: str, provider_url: str, seconds: float) -> dict[str, Any]:
    env = relay_env(
        url,
        provider_url,
        http_port="0",
        instance_name="bench-memory",
        shutdown_grace_seconds="2",
    )
    with tempfile.TemporaryFile() as errors:
        proc = subprocess.Popen(relay_command(), env=env, stdout=subprocess.DEVNULL, stderr=errors)
        samples: list[tuple[float, float]] = []
        started = time.monotonic()
        try:
            next_at = started
            while time.monotonic() - started < seconds:
                next_at += 1.0
                time.sleep(max(next_at - time.monotonic(), 0))
                if proc.poll() is not None:
                    errors.seek(0)
                    raise SystemExit(
                        f"the relay exited ({proc.returncode}):\n{errors.read().decode()[-2000:]}"
                    )
                samples.append((time.monotonic() - started, rss_mb(proc.pid)))
                if len(samples) % 60 == 0:
                    print(
                        f"  {len(samples)} s: RSS {samples[-1][1]:.1f} MB (load {load_average()})",
                        flush=True,
                    )
            cpu = cpu_seconds(proc.pid)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    rss = [r for _, r in samples]
    after_minute = [s for s in samples if s[0] >= min(60.0, seconds / 4)]
    half = [s for s in samples if s[0] >= seconds / 2]
    return {
        "samples": samples,
        "rss_mb_first": rss[0],
        "rss_mb_at_1_minute": after_minute[0][1],
        "rss_mb_peak": max(rss),
        "rss_mb_end": rss[-1],
        "growth_mb_after_1_minute": rss[-1] - after_minute[0][1],
        "slope_mb_per_minute_second_half": slope_mb_per_minute(half),
        "relay_cpu_seconds": cpu,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backlog", type=int, default=1_000_000, help="intents (1000000)")
    parser.add_argument("--soak-seconds", type=float, default=600.0, help="soak (600 s)")
    parser.add_argument("--latency-ms", type=int, default=200, help="fake provider latency")
    parser.add_argument("--quick", action="store_true", help="10,000 intents, 30 s")
    args = parser.parse_args()
    if args.quick:
        args.backlog, args.soak_seconds = 10_000, 30.0
    fake = FakeProvider("--latency-ms", str(args.latency_ms))
    try:
        with scratch_database("memory") as url:
            print(f"loading {args.backlog:,} intents (load {load_average()})", flush=True)
            seconds = load(url, args.backlog)
            print(
                f"  {args.backlog / seconds:,.0f} intents/s loaded; soaking {args.soak_seconds:g} s"
            )
            result = soak(url, fake.url, args.soak_seconds)
            counts = status_counts(url)
    finally:
        fake.stop()
    relayed = counts.get("succeeded", 0)
    rows = [("relay RSS", "MB")]
    rows += [
        ("first sample (1 s)", f"{result['rss_mb_first']:.1f}"),
        ("after 1 minute", f"{result['rss_mb_at_1_minute']:.1f}"),
        ("peak (goal <= 150)", f"{result['rss_mb_peak']:.1f}"),
        ("end of soak", f"{result['rss_mb_end']:.1f}"),
        ("growth after 1 minute", f"{result['growth_mb_after_1_minute']:+.1f}"),
        ("slope, second half (MB/min)", f"{result['slope_mb_per_minute_second_half']:+.2f}"),
    ]
    print(table(rows))
    print(
        f"relayed {relayed:,} intents in {args.soak_seconds:g} s"
        f" ({relayed / args.soak_seconds:,.0f}/s) with {counts.get('pending', 0):,} still pending;"
        f" relay CPU {result['relay_cpu_seconds']:.0f} s"
    )
    path = write_result(
        "memory",
        {
            "backlog": args.backlog,
            "soak_seconds": args.soak_seconds,
            "provider_latency_ms": args.latency_ms,
            "load_seconds": seconds,
            "relayed": relayed,
            "statuses": counts,
            "quick": args.quick,
            **result,
        },
    )
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
