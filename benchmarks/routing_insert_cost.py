"""Cost of routing in the application's INSERT (issue 20): the same INSERT with ``provider``
left out (the routing rules choose: sql/0051's split of two providers) against the INSERT
naming a registered provider (sql/0050's registry check only).

Two measures, on one migrated scratch database with the registry closed (``stripe`` and
``canary`` registered, a 90/10 split rule):

* benchmarks/insert_cost.py's method: one intent for a new payment per transaction, from
  several client connections, the two variants in interleaved rounds (reversed every other
  round); the median of the per-round ratios is the figure to read.
* the trigger's own cost without commits: N INSERTs in one server-side loop (one
  transaction, rolled back), per variant, best of the rounds; the difference per INSERT in
  microseconds is what routing adds.

A third figure, from the loop only: the same named INSERT on a database migrated up to sql/0046
(before the registry), so the registry check's own cost shows as well.

Writes benchmarks/results/routing_insert_cost.json.

    python benchmarks/routing_insert_cost.py [--rows 2000] [--rounds 6] [--clients 4]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import scratch_database, table, write_result
from relay.infra.migrate import discover

BEFORE_REGISTRY = "0050"  # the first migration of the registry

SETUP = """
SELECT outbox.provider_set_v1('bench', 'stripe', 'stripe');
SELECT outbox.provider_set_v1('bench', 'canary', 'adyen');
SELECT outbox.routing_rule_set_v1('bench', 'main',
    '{"mode": "split", "providers": ["stripe", "canary"], "weights": [90, 10]}', 'benchmark', true);
UPDATE outbox.relay_wakeup SET wanted = false;
"""
NAMED = "'stripe'"
ROUTED = "NULL"
INSERT = (
    "INSERT INTO outbox.payment_intents (payment_id, action, provider, amount_minor, currency,"
    " payment_method, idempotency_key) VALUES (%s, 'charge', {provider}, %s, 'EUR', 'pm_card_visa', %s)"
)
LOOP = """
DO $$
BEGIN
    FOR i IN 1 .. {n} LOOP
        INSERT INTO outbox.payment_intents (payment_id, action, provider, amount_minor, currency,
                                            payment_method, idempotency_key)
        VALUES ('{tag}-' || i, 'charge', {provider}, 1000 + i, 'EUR', 'pm_card_visa', '{tag}-' || i);
    END LOOP;
END
$$;
"""
VARIANTS = {"named provider": NAMED, "routed (provider empty)": ROUTED}


def run(url: str, provider: str, rows: int, clients: int, tag: str) -> float:
    sql = INSERT.format(provider=provider)
    per_client = rows // clients
    barrier = threading.Barrier(clients + 1)
    errors: list[BaseException] = []

    def client(n: int) -> None:
        try:
            with psycopg.connect(url, autocommit=False) as conn:
                conn.execute("SELECT 1")
                conn.commit()
                barrier.wait()
                for i in range(per_client):
                    key = f"{tag}-{n}-{i}"
                    conn.execute(sql, (key, 1000 + i, key))
                    conn.commit()
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return per_client * clients / (time.perf_counter() - started)


def loop_seconds(url: str, provider: str, n: int, tag: str) -> float:
    """N INSERTs in one transaction, rolled back: the trigger's cost without commits."""
    with psycopg.connect(url) as conn:
        started = time.perf_counter()
        conn.execute(LOOP.format(n=n, tag=tag, provider=provider))
        elapsed = time.perf_counter() - started
        conn.rollback()
    return elapsed


@contextmanager
def database_before_registry() -> Iterator[str | None]:
    """A scratch database migrated up to the last migration before sql/0050 (None when no
    server is configured: the embedded one is not used for this figure)."""
    if not (os.environ.get("RELAY_DATABASE_URL") or os.environ.get("RELAY_TEST_DATABASE_URL")):
        yield None
        return
    early = Path(tempfile.mkdtemp())
    try:
        for found in discover():
            if found.version < BEFORE_REGISTRY:
                shutil.copy(found.path, early / found.path.name)
        with scratch_database("before", migrations=early) as url:
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute("UPDATE outbox.relay_wakeup SET wanted = false")
            yield url
    finally:
        shutil.rmtree(early, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=2_000, help="intents per variant and round")
    parser.add_argument("--rounds", type=int, default=6, help="interleaved rounds (default 6)")
    parser.add_argument("--clients", type=int, default=4, help="concurrent app connections")
    args = parser.parse_args()
    rates: dict[str, list[float]] = {name: [] for name in VARIANTS}
    loops: dict[str, list[float]] = {name: [] for name in VARIANTS}
    before: list[float] = []
    with scratch_database("routing") as url, database_before_registry() as early_url:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(SETUP)
        run(url, NAMED, 1_000, args.clients, "warm")
        for round_ in range(args.rounds):
            order = list(VARIANTS.items())
            if round_ % 2:
                order.reverse()
            for n, (name, provider) in enumerate(order):
                rates[name].append(run(url, provider, args.rows, args.clients, f"r{round_}v{n}"))
                loops[name].append(loop_seconds(url, provider, args.rows, f"l{round_}v{n}"))
            if early_url is not None:
                before.append(loop_seconds(early_url, NAMED, args.rows, f"b{round_}"))
            line = " ".join(f"{r[-1]:,.0f}/s" for r in rates.values())
            print(f"  round {round_ + 1}: {line}", flush=True)
    named, routed = list(VARIANTS)
    ratios = [r / b for r, b in zip(rates[routed], rates[named], strict=True)]
    per_insert_us = {name: min(s) / args.rows * 1e6 for name, s in loops.items()}
    print(
        table(
            [
                ("variant", "best intents/s (commit each)", "trigger cost per INSERT (us)"),
                *(
                    (name, f"{max(rates[name]):,.0f}", f"{per_insert_us[name]:.1f}")
                    for name in VARIANTS
                ),
            ]
        )
    )
    if before:
        print(
            f"named provider before sql/0050 (loop only): {min(before) / args.rows * 1e6:.1f} us per INSERT"
        )
    median = statistics.median(ratios)
    added = per_insert_us[routed] - per_insert_us[named]
    print(
        f"routed / named (median of per-round ratios): {median:.2f}; routing adds {added:.1f} us per INSERT"
    )
    path = write_result(
        "routing_insert_cost",
        {
            "rows_per_round": args.rows,
            "rounds": args.rounds,
            "clients": args.clients,
            "intents_per_second": rates,
            "loop_seconds": loops,
            "ratio_routed_to_named": median,
            "per_insert_us": per_insert_us,
            "routing_adds_us": added,
            "named_before_registry_us": min(before) / args.rows * 1e6 if before else None,
        },
    )
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
