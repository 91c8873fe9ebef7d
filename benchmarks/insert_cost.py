"""Cost to the application: INSERT throughput into outbox.payment_intents against the same
table without the outbox's triggers.

Each application transaction inserts one intent for a new payment and commits, from
several client connections at once, as an application's request handlers would. Three
runs on identical data: a trigger-less copy of the table (same columns, constraints and
indexes); the outbox table while relays are saturated (they asked for no NOTIFY, see
sql/0007_pre_wakeup.sql); and the outbox table while a relay idles (every statement
notifies). Prints intents/s and the ratios; writes benchmarks/results/insert_cost.json.

    python benchmarks/insert_cost.py [--rows 20000] [--clients 4]
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import scratch_database, table, write_result

PLAIN = """
CREATE TABLE bench_plain_intents
    (LIKE outbox.payment_intents INCLUDING DEFAULTS INCLUDING IDENTITY INCLUDING CONSTRAINTS INCLUDING INDEXES);
"""
INSERT = (
    "INSERT INTO {table} (payment_id, action, provider, amount_minor, currency, payment_method,"
    " idempotency_key) VALUES (%s, 'charge', 'stripe', %s, 'EUR', 'pm_card_visa', %s)"
)


def run(url: str, target: str, rows: int, clients: int, tag: str) -> float:
    sql = INSERT.format(table=target)
    per_client = rows // clients
    barrier = threading.Barrier(clients + 1)

    def client(n: int) -> None:
        with psycopg.connect(url, autocommit=False) as conn:
            conn.execute("SELECT 1")
            conn.commit()
            barrier.wait()
            for i in range(per_client):
                key = f"{tag}-{n}-{i}"
                conn.execute(sql, (key, 1000 + i, key))
                conn.commit()

    errors: list[BaseException] = []

    def guarded(n: int) -> None:
        try:
            client(n)
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=guarded, args=(n,)) for n in range(clients)]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise errors[0]
    return per_client * clients / elapsed


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=20_000, help="intents per run (default 20000)")
    parser.add_argument("--clients", type=int, default=4, help="concurrent app connections")
    args = parser.parse_args()
    with scratch_database("insert") as url:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(PLAIN)
        print(f"inserting {args.rows} intents with {args.clients} clients, one per transaction")
        results: dict[str, float] = {}
        # Warm-up, then each variant twice, interleaved, keeping the best: noisy machines.
        run(url, "bench_plain_intents", 2_000, args.clients, "warm")
        for round_ in range(2):
            for variant, (name, target, notify) in enumerate(
                (
                    ("plain table (no triggers)", "bench_plain_intents", True),
                    ("outbox, relays busy (no NOTIFY)", "outbox.payment_intents", False),
                    ("outbox, a relay idle (NOTIFY)", "outbox.payment_intents", True),
                )
            ):
                with psycopg.connect(url, autocommit=True) as conn:
                    conn.execute("UPDATE outbox.relay_wakeup SET wanted = %s", (notify,))
                rate = run(url, target, args.rows, args.clients, f"v{variant}-{round_}")
                results[name] = max(results.get(name, 0.0), rate)
                print(f"  round {round_ + 1}: {name}: {rate:,.0f}/s", flush=True)
    base = results["plain table (no triggers)"]
    rows = [("variant", "intents/s", "ratio to plain")]
    rows += [(name, f"{rate:,.0f}", f"{rate / base:.2f}") for name, rate in results.items()]
    print(table(rows))
    path = write_result(
        "insert_cost",
        {
            "rows": args.rows,
            "clients": args.clients,
            "intents_per_second": results,
            "ratio_outbox_busy_to_plain": results["outbox, relays busy (no NOTIFY)"] / base,
            "ratio_outbox_idle_to_plain": results["outbox, a relay idle (NOTIFY)"] / base,
        },
    )
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
