"""What sql/0072's flow trigger costs the relay's write-back, for intents in no flow
(nearly all of them).

``payment_intents_flows`` is an AFTER UPDATE statement trigger on outbox.payment_intents:
every claim and every write-back batch runs it, and it probes outbox.flow_steps for each
settled row of the batch. This replays the relay's batch SQL with pgbench
(benchmarks/sql_limit.py: claim, set_actor, lock_payments, complete_intents; authorize
then capture per payment) with the trigger on and with it off, interleaved, best of
--rounds each, and prints intents/s of both and the ratio (on / off) from one run.

    python benchmarks/flows_write_back_cost.py [--intents 10000] [--rounds 2]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import table, write_result
from benchmarks.sql_limit import batch_script, measure

TRIGGER = [("outbox.payment_intents", "payment_intents_flows")]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--intents", type=int, default=10_000, help="backlog per run (10000)")
    parser.add_argument("--clients", type=int, default=2, help="pgbench clients (2)")
    parser.add_argument("--batch", type=int, default=100, help="intents per claim (100)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds, best kept (2)")
    args = parser.parse_args()
    script = batch_script()
    print(
        f"Flow trigger on the write-back: {args.intents:,} intents per run, {args.rounds} round(s)"
    )
    on: list[float] = []
    off: list[float] = []
    for _ in range(args.rounds):
        on.append(measure(args, script, [])["intents_per_second"])
        print(f"  trigger on:  {on[-1]:,.0f} intents/s", flush=True)
        off.append(measure(args, script, TRIGGER)["intents_per_second"])
        print(f"  trigger off: {off[-1]:,.0f} intents/s", flush=True)
    best_on, best_off = max(on), max(off)
    print(
        table(
            [
                ("write-back replay", "intents/s", "ratio to trigger off"),
                ("trigger off", f"{best_off:,.0f}", "1.00"),
                ("trigger on (as shipped)", f"{best_on:,.0f}", f"{best_on / best_off:.2f}"),
            ]
        )
    )
    write_result(
        "flows_write_back_cost",
        {
            "intents": args.intents,
            "rounds": args.rounds,
            "on": on,
            "off": off,
            "ratio": best_on / best_off,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
