"""What one AFTER UPDATE trigger on outbox.payment_intents costs the relay's write-back, for
the intents it has nothing to do for (nearly all of them).

Replays the relay's batch SQL with pgbench (benchmarks/sql_limit.py's batch script: claim,
write-back, audit, ledger, events) with the trigger as shipped and with it disabled, in
interleaved rounds, and prints the best of each and their ratio. Triggers it knows:

* ``flows``: sql/0072's ``payment_intents_flows``, a row trigger whose ``WHEN`` (a settled
  intent whose metadata names a flow) spares intents in no flow the function call;
* ``fx-refund``: sql/0029's ``payment_intents_fx_refund_difference``, a statement trigger
  that looks through each batch for refunds of converted charges.

    python benchmarks/trigger_write_back_cost.py flows [--intents 10000] [--rounds 2]

Writes benchmarks/results/<trigger>_write_back_cost.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import table, write_result
from benchmarks.sql_limit import batch_script, measure

# name on the command line -> (the trigger disabled for "off", what the result file is called)
TRIGGERS = {
    "flows": ("payment_intents_flows", "flows_write_back_cost"),
    "fx-refund": ("payment_intents_fx_refund_difference", "fx_write_back_cost"),
}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("trigger", choices=sorted(TRIGGERS), help="which trigger to measure")
    parser.add_argument("--intents", type=int, default=10_000, help="backlog per run (10000)")
    parser.add_argument("--clients", type=int, default=2, help="pgbench clients (2)")
    parser.add_argument("--batch", type=int, default=100, help="intents per claim (100)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds, best kept (2)")
    args = parser.parse_args()
    name, result = TRIGGERS[args.trigger]
    disabled = [("outbox.payment_intents", name)]
    script = batch_script()
    print(f"{name} on the write-back: {args.intents:,} intents per run, {args.rounds} round(s)")
    on: list[float] = []
    off: list[float] = []
    for _ in range(args.rounds):
        on.append(measure(args, script, [])["intents_per_second"])
        print(f"  trigger on:  {on[-1]:,.0f} intents/s", flush=True)
        off.append(measure(args, script, disabled)["intents_per_second"])
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
        result,
        {
            "trigger": name,
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
