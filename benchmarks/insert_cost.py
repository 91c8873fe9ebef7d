"""Cost to the application: INSERT throughput into outbox.payment_intents against the same
table without the outbox's triggers.

Each application transaction inserts one intent for a new payment and commits, from
several client connections at once, as an application's request handlers would. Four
variants on identical data: a trigger-less copy of the table (same columns, constraints and
indexes); the outbox table while relays are saturated (they asked for no NOTIFY, see
sql/0007_pre_wakeup.sql); the outbox table while a relay idles (every transaction
notifies); and, as the yardstick a team would otherwise pick, procrastinate's job INSERT
into ``procrastinate_jobs`` with its triggers (NOTIFY of the queue, a status event row per
job), as ``../shared/bench/insert_cost_peer.py`` does it. procrastinate is a benchmark-only
dependency (``pip install -e '.[bench]'``); its schema is applied to the scratch database. Every commit waits for the WAL flush, whose latency on a shared VM drifts by
tens of percent within a minute, so the variants run in many short interleaved rounds
(in reverse order every other round): each round's ratio compares runs a few seconds
apart, and the median of those ratios is the figure to read (the best rates are printed
too). Writes benchmarks/results/insert_cost.json. benchmarks/insert_cost_breakdown.py
runs the same rounds with parts of the outbox's work switched off.

    python benchmarks/insert_cost.py [--rows 4000] [--rounds 8] [--clients 4]

The goals (issue 23): the outbox (relays busy) at 0.80 or more of the plain table, and at
0.95 or more of procrastinate's job INSERT; both ratios are medians of per-round ratios.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import scratch_database, table, write_result

# The same table in every way but its triggers: LIKE copies neither fillfactor nor the
# autovacuum settings (sql/0001, sql/0003), so those are copied from pg_class.
PLAIN = """
CREATE TABLE bench_plain_intents
    (LIKE outbox.payment_intents INCLUDING DEFAULTS INCLUDING IDENTITY INCLUDING CONSTRAINTS INCLUDING INDEXES);
DO $$
BEGIN
    EXECUTE format('ALTER TABLE bench_plain_intents SET (%s)', (
        SELECT array_to_string(reloptions, ', ') FROM pg_class
        WHERE oid = 'outbox.payment_intents'::regclass));
END
$$;
"""
INSERT = (
    "INSERT INTO {table} (payment_id, action, provider, amount_minor, currency, payment_method,"
    " idempotency_key) VALUES (%s, 'charge', 'stripe', %s, 'EUR', 'pm_card_visa', %s)"
)
# procrastinate's job INSERT as the yardstick makes it (a job per payment, its lock the key).
PROCRASTINATE = "procrastinate_jobs"
PROCRASTINATE_INSERT = (
    "INSERT INTO procrastinate_jobs (queue_name, task_name, lock, queueing_lock, args)"
    " VALUES ('payments', 'charge', %s, NULL,"
    " jsonb_build_object('amount_minor', %s, 'key', %s::text))"
)


def apply_procrastinate_schema(url: str) -> None:
    """procrastinate's own schema.sql, as ``procrastinate schema --apply`` runs it."""
    from procrastinate.schema import SchemaManager

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(SchemaManager.get_schema())


def run(url: str, target: str, rows: int, clients: int, tag: str) -> float:
    sql = PROCRASTINATE_INSERT if target == PROCRASTINATE else INSERT.format(table=target)
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


@dataclass(frozen=True)
class Variant:
    """One side of the comparison: a table to insert into, and SQL run before each run."""

    name: str
    target: str
    setup: str = ""


@dataclass
class Rounds:
    """Each variant's rate per round, the first variant being the baseline."""

    variants: Sequence[Variant]
    rates: dict[str, list[float]] = field(default_factory=dict)

    def summary(self) -> dict[str, dict[str, float]]:
        base = self.rates[self.variants[0].name]
        result: dict[str, dict[str, float]] = {}
        for variant in self.variants:
            rates = self.rates[variant.name]
            per_round = [rate / b for rate, b in zip(rates, base, strict=True)]
            result[variant.name] = {
                "best_per_second": max(rates),
                "median_ratio": statistics.median(per_round),
                "min_ratio": min(per_round),
                "max_ratio": max(per_round),
            }
        return result

    def median_ratio(self, name: str, baseline: str) -> float:
        """The median over rounds of ``name``'s rate over ``baseline``'s in the same round."""
        pairs = zip(self.rates[name], self.rates[baseline], strict=True)
        return statistics.median(rate / base for rate, base in pairs)

    def report(self) -> str:
        rows = [("variant", "best intents/s", "median ratio", "ratios (min to max)")]
        rows += [
            (
                name,
                f"{s['best_per_second']:,.0f}",
                f"{s['median_ratio']:.2f}",
                f"{s['min_ratio']:.2f} to {s['max_ratio']:.2f}",
            )
            for name, s in self.summary().items()
        ]
        return table(rows)


def paired_rounds(
    url: str, variants: Sequence[Variant], rounds: int, rows: int, clients: int
) -> Rounds:
    """Run every variant once per round, in reverse order every other round, so that each
    round's ratios compare runs a few seconds apart and a drift within a round (a
    checkpoint's burst of full-page writes) favours none of them."""
    result = Rounds(variants, {v.name: [] for v in variants})
    run(url, variants[0].target, 2_000, clients, "warm")
    for round_ in range(rounds):
        order = list(enumerate(variants))
        if round_ % 2:
            order.reverse()
        for n, variant in order:
            if variant.setup:
                with psycopg.connect(url, autocommit=True) as conn:
                    conn.execute(variant.setup)
            result.rates[variant.name].append(
                run(url, variant.target, rows, clients, f"v{n}-{round_}")
            )
        line = " ".join(f"{result.rates[v.name][-1]:,.0f}/s" for v in variants)
        base = result.rates[variants[0].name][-1]
        ratios = " ".join(f"{result.rates[v.name][-1] / base:.2f}" for v in variants[1:])
        print(f"  round {round_ + 1}: {line}  ratios {ratios}", flush=True)
    return result


VARIANTS = (
    Variant("plain table (no triggers)", "bench_plain_intents"),
    Variant(
        "outbox, relays busy (no NOTIFY)",
        "outbox.payment_intents",
        "UPDATE outbox.relay_wakeup SET wanted = false",
    ),
    Variant(
        "outbox, a relay idle (NOTIFY)",
        "outbox.payment_intents",
        "UPDATE outbox.relay_wakeup SET wanted = true",
    ),
    Variant("procrastinate job INSERT (its triggers)", PROCRASTINATE),
)
BUSY, PEER = VARIANTS[1].name, VARIANTS[3].name


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=4_000, help="intents per variant and round")
    parser.add_argument("--rounds", type=int, default=8, help="interleaved rounds (default 8)")
    parser.add_argument("--clients", type=int, default=4, help="concurrent app connections")
    args = parser.parse_args()
    with scratch_database("insert") as url:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(PLAIN)
        apply_procrastinate_schema(url)
        print(
            f"inserting {args.rows} intents per variant in each of {args.rounds} rounds,"
            f" {args.clients} clients, one intent per transaction"
        )
        result = paired_rounds(url, VARIANTS, args.rounds, args.rows, args.clients)
    print(result.report())
    summary = result.summary()
    to_peer = result.median_ratio(BUSY, PEER)
    print(
        f"outbox (relays busy) / plain table: {summary[BUSY]['median_ratio']:.2f} (goal 0.80);"
        f" outbox / procrastinate: {to_peer:.2f} (goal 0.95);"
        f" procrastinate / plain table: {summary[PEER]['median_ratio']:.2f}"
    )
    path = write_result(
        "insert_cost",
        {
            "rows_per_round": args.rows,
            "rounds": args.rounds,
            "clients": args.clients,
            "intents_per_second": result.rates,
            "summary": summary,
            "ratio_outbox_busy_to_plain": summary[VARIANTS[1].name]["median_ratio"],
            "ratio_outbox_idle_to_plain": summary[VARIANTS[2].name]["median_ratio"],
            "ratio_procrastinate_to_plain": summary[PEER]["median_ratio"],
            "ratio_outbox_busy_to_procrastinate": to_peer,
        },
    )
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
