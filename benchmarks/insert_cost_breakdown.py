"""Where the application's INSERT cost goes, and how low it could go: insert_cost.py's
workload and paired rounds with parts of the outbox's work switched off.

The same Python clients as benchmarks/insert_cost.py, one intent for a new payment per
transaction (relays busy: no NOTIFY), against the trigger-less copy of the table and
against outbox.payment_intents:

* with every trigger (as shipped; since sql/0019 the INSERT writes no audit row, the
  relay's first transaction on the intent writes its creation rows);
* floors, with the outbox's insert triggers off and a stand-in BEFORE INSERT trigger on:
  one that only sets the relay's columns (what any trigger costs), one that also reads
  what the checks read (the currency, the archived key, the payment's row and earlier
  intents), one that instead writes the payment's row (the upsert that orders a
  payment's intents), without its audit, and one that does both (a new payment's
  intent: the currency and archived-key reads, then the payment's row);
* procrastinate's job INSERT, as benchmarks/insert_cost.py measures it, so each floor can
  be read against issue 23's goal of 0.95 of it.

The floors are not the outbox: they show what a trigger, a lookup and a row cost on this
machine, so what the shipped INSERT costs can be read against them. Runs in a scratch
database; prints the median per-round ratio of each variant.

    python benchmarks/insert_cost_breakdown.py [--rows 3000] [--rounds 6]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import scratch_database, write_result
from benchmarks.insert_cost import (
    PLAIN,
    PROCRASTINATE,
    Variant,
    apply_procrastinate_schema,
    paired_rounds,
)

# Stand-in triggers for the floors, created disabled; each variant's setup switches on
# the triggers it measures and off the rest. Each one is the columns' defaults plus some of
# these parts of the outbox's work.
_COLUMNS = """
    NEW.status := 'pending';
    NEW.attempts := 0;
    NEW.payment_seq := 1;"""
_KEY_READS = """
    PERFORM FROM outbox.currencies WHERE code = NEW.currency;
    PERFORM FROM outbox.payment_intents_archive
    WHERE provider = NEW.provider AND idempotency_key = NEW.idempotency_key;"""
_PAYMENT_READS = """
    PERFORM FROM outbox.payments WHERE payment_id = NEW.payment_id FOR UPDATE;
    PERFORM FROM outbox.payment_intents
    WHERE payment_id = NEW.payment_id AND status IN ('blocked', 'pending', 'in_flight', 'dead');"""
_PAYMENT_ROW = """
    INSERT INTO outbox.payments (payment_id, provider, currency)
    VALUES (NEW.payment_id, NEW.provider, NEW.currency)
    ON CONFLICT (payment_id) DO NOTHING;"""
_STAND_IN_BODIES = {
    "bench_floor_defaults": _COLUMNS,
    "bench_floor_reads": _COLUMNS + _KEY_READS + _PAYMENT_READS,
    "bench_floor_payment_row": _COLUMNS + _PAYMENT_ROW,
    "bench_floor_reads_and_payment_row": _COLUMNS + _KEY_READS + _PAYMENT_ROW,
}
FLOORS = (
    "".join(
        f"""
CREATE FUNCTION outbox.{name}() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp{
            "" if body == _COLUMNS else " SET plan_cache_mode = force_generic_plan"
        } AS $$
BEGIN{body}
    RETURN NEW;
END $$;
CREATE TRIGGER {name} BEFORE INSERT ON outbox.payment_intents
    FOR EACH ROW EXECUTE FUNCTION outbox.{name}();"""
        for name, body in _STAND_IN_BODIES.items()
    )
    + "\nUPDATE outbox.relay_wakeup SET wanted = false;\n"
)
SHIPPED = ("payment_intents_before_insert",)
STAND_INS = tuple(_STAND_IN_BODIES)


def only(*enabled: str) -> str:
    """SQL that enables the named insert triggers of payment_intents and disables the rest
    of the shipped and stand-in ones (payments' own audit trigger is off for the floors)."""
    statements = [
        f"ALTER TABLE outbox.payment_intents {'ENABLE' if name in enabled else 'DISABLE'}"
        f" TRIGGER {name}"
        for name in (*SHIPPED, *STAND_INS)
    ]
    audit = "ENABLE" if "payment_intents_before_insert" in enabled else "DISABLE"
    statements.append(f"ALTER TABLE outbox.payments {audit} TRIGGER payments_audit_insert")
    return ";\n".join(statements)


VARIANTS = (
    Variant("plain table (no triggers)", "bench_plain_intents"),
    Variant("outbox, as shipped", "outbox.payment_intents", only(*SHIPPED)),
    Variant(
        "floor: a trigger that sets columns",
        "outbox.payment_intents",
        only("bench_floor_defaults"),
    ),
    Variant(
        "floor: ... and reads what the checks read",
        "outbox.payment_intents",
        only("bench_floor_reads"),
    ),
    Variant(
        "floor: ... and writes the payment's row",
        "outbox.payment_intents",
        only("bench_floor_payment_row"),
    ),
    # Both at once, as the outbox needs them: a new payment's intent reads the currency and
    # the archived key, and writes the payment's row (which it then holds for its order).
    Variant(
        "floor: ... reads (currency, archived key) and writes the payment's row",
        "outbox.payment_intents",
        only("bench_floor_reads_and_payment_row"),
    ),
    Variant("procrastinate job INSERT (its triggers)", PROCRASTINATE),
)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=3_000, help="intents per variant and round")
    parser.add_argument("--rounds", type=int, default=6, help="interleaved rounds (default 6)")
    parser.add_argument("--clients", type=int, default=4, help="concurrent app connections")
    args = parser.parse_args()
    with scratch_database("insert_breakdown") as url:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(PLAIN)
            conn.execute(FLOORS)
        apply_procrastinate_schema(url)
        print(
            f"inserting {args.rows} intents per variant in each of {args.rounds} rounds,"
            f" {args.clients} clients, one intent per transaction; variants in this order:"
        )
        for n, variant in enumerate(VARIANTS, 1):
            print(f"  {n}. {variant.name}")
        result = paired_rounds(url, VARIANTS, args.rounds, args.rows, args.clients)
    print(result.report())
    path = write_result(
        "insert_cost_breakdown",
        {
            "rows_per_round": args.rows,
            "rounds": args.rounds,
            "clients": args.clients,
            "intents_per_second": result.rates,
            "summary": result.summary(),
        },
    )
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
