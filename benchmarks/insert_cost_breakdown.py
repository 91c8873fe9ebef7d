"""Where the application's INSERT cost goes: insert_cost.py's workload with groups of the
outbox's triggers switched off.

The same four Python clients as benchmarks/insert_cost.py, one intent for a new payment per
transaction, against the trigger-less copy of the table and against outbox.payment_intents
with all triggers, and with all but the two audit rows of an insert (the new intent's and
the new payment's). Since sql/0015 the rest is one trigger (input guards, payment row,
order, idempotency key, NOTIFY), so there is no smaller group to switch on alone.
Rounds are interleaved and the best of each kept; the run-to-run noise on a shared VM is
large, so read the per-round lines too. Runs in a scratch database (triggers are switched
off there only).

    python benchmarks/insert_cost_breakdown.py [--rows 10000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import scratch_database, table
from benchmarks.insert_cost import PLAIN, run

TABLES = ("outbox.payment_intents", "outbox.payments")
INSERT_AUDIT = {"payment_intents_audit_insert", "payments_audit_insert"}


def triggers(conn: psycopg.Connection, relation: str) -> set[str]:
    rows = conn.execute(
        "SELECT tgname FROM pg_trigger WHERE tgrelid = %s::regclass AND NOT tgisinternal",
        (relation,),
    ).fetchall()
    return {name for (name,) in rows}


def enable_only(url: str, keep: set[str] | None) -> None:
    """Enable the named triggers of both tables and disable the rest (None: enable all)."""
    with psycopg.connect(url, autocommit=True) as conn:
        for relation in TABLES:
            for name in triggers(conn, relation):
                state = "ENABLE" if keep is None or name in keep else "DISABLE"
                conn.execute(f'ALTER TABLE {relation} {state} TRIGGER "{name}"')


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=10_000, help="intents per variant and round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (best kept)")
    parser.add_argument("--clients", type=int, default=4, help="concurrent app connections")
    args = parser.parse_args()
    with scratch_database("insert_breakdown") as url:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(PLAIN)
            conn.execute("UPDATE outbox.relay_wakeup SET wanted = false")  # relays busy
            every = triggers(conn, TABLES[0]) | triggers(conn, TABLES[1])
        variants: list[tuple[str, str, set[str] | None]] = [
            ("plain table (no triggers)", "bench_plain_intents", None),
            ("outbox, all triggers", "outbox.payment_intents", None),
            ("outbox, all but the insert's audit rows", "outbox.payment_intents",
             every - INSERT_AUDIT),
        ]  # fmt: skip
        run(url, "bench_plain_intents", 2_000, args.clients, "warm")
        best: dict[str, float] = {}
        for round_ in range(args.rounds):
            for n, (name, target, keep) in enumerate(variants):
                enable_only(url, keep)
                rate = run(url, target, args.rows, args.clients, f"b{n}-{round_}")
                best[name] = max(best.get(name, 0.0), rate)
                print(f"  round {round_ + 1}: {name}: {rate:,.0f}/s", flush=True)
        enable_only(url, None)
    base = best[variants[0][0]]
    rows: list[tuple[str, ...]] = [("variant", "best intents/s", "ratio to plain")]
    rows += [(name, f"{rate:,.0f}", f"{rate / base:.2f}") for name, rate in best.items()]
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
