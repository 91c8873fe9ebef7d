"""Flows: what a two-step flow costs over the same two intents inserted plainly.

Two backlogs of the same shape, each drained by one in-process relay against a provider
that answers at once (ZeroLatencyProvider, benchmarks/_common.py), in one run:

* plain: per payment an authorize and a capture, inserted together by one set-based
  INSERT (the capture waits ``blocked`` until the authorize is written, then is promoted);
* flows: per payment a flow of the same two steps (capture ``depends_on`` the authorize),
  started by one set-based ``SELECT outbox.flow_start_v1(...)``: the authorize is inserted
  at once, the capture by the authorize's write-back (sql/0072's trigger).

Prints the start cost (payments/s), the drain rate (intents/s, payments/s), the ratios
flows / plain and the extra cost per step over a plain intent (milliseconds of wall time
per intent, started and drained: the difference of the inverse rates; the best round of
each); writes benchmarks/results/flows.json with the code's fingerprint.

    python benchmarks/flows.py [--payments 5000] [--rounds 1]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import (
    load_average,
    quiet_relay_logging,
    scratch_database,
    table,
    write_result,
)
from benchmarks.drain import drain, zero_latency_lane

PLAIN = """
INSERT INTO outbox.payment_intents (payment_id, action, provider, amount_minor, currency,
                                    payment_method)
SELECT 'p-' || n, a.action, 'stripe', CASE WHEN a.action = 'authorize' THEN 1000 END, 'EUR',
       CASE WHEN a.action = 'authorize' THEN 'pm_card_visa' END
FROM generate_series(1, %(payments)s) AS n
CROSS JOIN (VALUES (1, 'authorize'), (2, 'capture')) AS a(k, action)
ORDER BY n, a.k
"""

FLOWS = """
SELECT outbox.flow_start_v1('f-' || n, jsonb_build_array(
    jsonb_build_object('payment_id', 'f-' || n, 'action', 'authorize', 'provider', 'stripe',
                       'amount_minor', 1000, 'currency', 'EUR',
                       'payment_method', 'pm_card_visa'),
    jsonb_build_object('payment_id', 'f-' || n, 'action', 'capture', 'currency', 'EUR',
                       'depends_on', jsonb_build_array(1))))
FROM generate_series(1, %(payments)s) AS n
"""


def start(url: str, statement: str, payments: int) -> float:
    """Run the set-based start statement in one transaction; return its seconds."""
    with psycopg.connect(url) as conn:
        started = time.perf_counter()
        conn.execute(statement, {"payments": payments})
        conn.commit()
        return time.perf_counter() - started


def completed_flows(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM outbox.flows WHERE state = 'completed'").fetchone()
    assert row is not None
    return int(row[0])


def variant(name: str, statement: str, payments: int) -> dict[str, Any]:
    with scratch_database(f"flows_{name}") as url:
        start_seconds = start(url, statement, payments)
        result = anyio.run(
            lambda: drain(
                url,
                zero_latency_lane(),
                payments * 2,
                batch_size=100,
                max_in_flight=200,
                pool_size=4,
                writers=2,
            )
        )
        if name == "flows":
            done = completed_flows(url)
            assert done == payments, f"{done} of {payments} flows completed"
    return {"start_seconds": start_seconds, **result}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--payments", type=int, default=5_000, help="payments per run (5000)")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds, best kept (1)")
    args = parser.parse_args()
    quiet_relay_logging()
    print(f"flows vs plain intents: {args.payments:,} payments of 2 intents, load {load_average()}")
    runs: dict[str, list[dict[str, Any]]] = {"plain": [], "flows": []}
    for round_ in range(1, args.rounds + 1):
        for name, statement in (("plain", PLAIN), ("flows", FLOWS)):
            runs[name].append(variant(name, statement, args.payments))
            r = runs[name][-1]
            print(
                f"  round {round_}/{args.rounds} {name}: start {args.payments / r['start_seconds']:,.0f} payments/s, drain "
                f"{r['intents_per_second']:,.0f} intents/s (load {load_average()})",
                flush=True,
            )
    best = {
        name: {
            "start": max(args.payments / r["start_seconds"] for r in rs),
            "drain": max(r["intents_per_second"] for r in rs),
        }
        for name, rs in runs.items()
    }
    # Per step: a flow's step is one intent; the difference of the inverse rates is what
    # one step costs over the same intent inserted plainly.
    extra_ms = {
        what: 1000 * (1 / best["flows"][what] - 1 / best["plain"][what]) / intents_per_unit
        for what, intents_per_unit in (("start", 2), ("drain", 1))
    }
    print(
        table(
            [
                ("", "payments started/s", "intents drained/s", "payments drained/s"),
                *(
                    (
                        name,
                        f"{b['start']:,.0f}",
                        f"{b['drain']:,.0f}",
                        f"{b['drain'] / 2:,.0f}",
                    )
                    for name, b in best.items()
                ),
                (
                    "ratio flows / plain",
                    f"{best['flows']['start'] / best['plain']['start']:.2f}",
                    f"{best['flows']['drain'] / best['plain']['drain']:.2f}",
                    "",
                ),
                (
                    "extra ms per step",
                    f"{extra_ms['start']:.2f}",
                    f"{extra_ms['drain']:.2f}",
                    "",
                ),
            ]
        )
    )
    path = write_result(
        "flows",
        {
            "payments": args.payments,
            "rounds": args.rounds,
            "runs": runs,
            "best": best,
            "extra_ms_per_step": extra_ms,
            "load_average_at_end": load_average(),
        },
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
