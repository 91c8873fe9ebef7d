"""The limit: the SQL the relay issues per batch, replayed by pgbench, no Python between.

The statements come from relay/infra/queries.sql through relay.infra.queries.QUERIES, so the replay
stays in step with the relay. One pgbench transaction is one relay batch:

    claim_intents                      (autocommit, as Store.claim runs it)
    BEGIN; set_actor; lock_payments; complete_intents; COMMIT     (as Store.complete)

The claim is wrapped so that pgbench can hand its rows to the write-back (\\gset of
arrays); the wrapper also computes what the relay's Python would write for a success
(state machine and outcome mapping: authorize -> authorized, capture -> captured), so
complete_intents writes the same rows, fires the same triggers (audit chain, ledger,
result events) and promotes the blocked captures. The table is filled beforehand
exactly as benchmarks/drain.py fills it (authorize then capture per payment).

Runs pgbench -M prepared (psycopg prepares repeated statements too) with 2 clients and
100 intents per batch by default. So that the ratio comes from one run on a machine whose
load moves, each round replays the SQL on a fresh backlog and then drains an identical
backlog with the relay (benchmarks/drain.py's in-process, zero-latency run); the best of
--rounds (2) of each is kept. Each round also runs the yardstick first
(benchmarks/standin_limit/: the same amount of writing per intent done set-based, no
triggers, no hash chain, pgbench -c 2 -t 600 as ../shared/bench/standin_limit/run.sh).
Prints intents/s of all three, SQL limit / yardstick (goal >= 0.5) and relay / SQL limit
(goal >= 0.6); writes benchmarks/results/sql_limit.json with the code's fingerprint.
--no-relay takes the relay's figure from benchmarks/results/drain.json instead;
--standin-transactions 0 leaves the yardstick out.

    python benchmarks/sql_limit.py [--intents 20000] [--rounds 2] [--diagnose] [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import (
    RESULTS,
    insert_backlog,
    load_average,
    quiet_relay_logging,
    scratch_database,
    status_counts,
    table,
    write_result,
)
from benchmarks.drain import run_variant, zero_latency_lane
from relay.infra.queries import QUERIES

_PARAM = re.compile(r"%\((\w+)\)s")

# What the relay's Python computes per claimed row for a success (relay/domain/state_machine.py
# apply_success, relay/domain/outcome_mapping.py from_outcome, the zero-latency adapter's
# references), as SQL over the claimed rows.
_AMOUNT = "CASE WHEN action = 'capture' THEN coalesce(amount_minor, authorized_minor) ELSE amount_minor END"
_REFERENCE = "CASE WHEN action = 'capture' THEN payment_reference ELSE 'pi_bench_' || id END"
_OUTCOME_ARRAYS = {
    "ids": "id",
    "lease_tokens": "lease_token",
    "statuses": "'succeeded'::text",
    "retry_delays": "0::float8",
    "provider_references": _REFERENCE,
    "amounts_applied": _AMOUNT,
    "error_codes": "NULL::text",
    "error_messages": "NULL::text",
    "payment_states": "CASE WHEN action = 'authorize' THEN 'authorized' ELSE 'captured' END",
    "authorized": f"CASE WHEN action = 'capture' THEN authorized_minor ELSE {_AMOUNT} END",
    "captured": f"CASE WHEN action = 'authorize' THEN 0 ELSE {_AMOUNT} END",
    "refunded": "0::bigint",
    "payment_references": _REFERENCE,
    "unsent": "false",
}


def pgbench_binary() -> str:
    found = shutil.which("pgbench")
    if found:
        return found
    for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin/pgbench"), reverse=True):
        return str(candidate)
    raise SystemExit("pgbench not found: install postgresql-contrib / postgresql-client")


def for_pgbench(name: str, nulls: frozenset[str] = frozenset()) -> str:
    """A statement of QUERIES with psycopg's %(x)s placeholders as pgbench :x variables
    (bound as parameters under -M prepared) and the given ones as NULL."""
    sql = QUERIES[name].strip().rstrip(";")
    if "%%" in sql or ";" in sql:
        raise ValueError(f"{name}: cannot be replayed as one pgbench command")
    return _PARAM.sub(lambda m: "NULL" if m.group(1) in nulls else f":{m.group(1)}", sql)


def split_final_select(sql: str) -> tuple[str, str]:
    """Split ``WITH ... <final SELECT>`` at its last top-level SELECT."""
    depth, last, i = 0, -1, 0
    while i < len(sql):
        char = sql[i]
        if char == "'":
            i = sql.index("'", i + 1)
        elif char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        elif depth == 0 and sql[i : i + 6].upper() == "SELECT" and not sql[i - 1].isalnum():
            last = i
        i += 1
    if last <= 0:
        raise ValueError("no top-level SELECT after the WITH clauses")
    return sql[:last].rstrip(), sql[last:]


def batch_script() -> str:
    ctes, final = split_final_select(for_pgbench("claim_intents", frozenset({"now"})))
    arrays = ",\n       ".join(
        f"coalesce(array_agg({expr} ORDER BY id), '{{}}') AS {name}"
        for name, expr in _OUTCOME_ARRAYS.items()
    )
    claim = (
        f"{ctes},\nclaim_rows AS (\n{final}\n)\n"
        f"SELECT {arrays},\n"
        "       coalesce((SELECT array_agg(DISTINCT payment_id ORDER BY payment_id)"
        " FROM claim_rows), '{}') AS payment_ids\n"
        "FROM claim_rows \\gset"
    )
    return "\n".join(
        [
            "-- one relay batch; generated by benchmarks/sql_limit.py from relay/infra/queries.sql",
            claim,
            "BEGIN;",
            for_pgbench("set_actor", frozenset({"reason"})) + ";",
            for_pgbench("lock_payments") + ";",
            for_pgbench("complete_intents", frozenset({"now"})) + ";",
            "COMMIT;",
            "",
        ]
    )


def replay(url: str, script: str, *, clients: int, transactions: int, batch: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "relay_batch.sql"
        path.write_text(script)
        command = [
            pgbench_binary(),
            "--no-vacuum",
            "--protocol=prepared",
            f"--client={clients}",
            f"--jobs={clients}",
            f"--transactions={transactions}",
            f"--file={path}",
            "--define=provider=stripe",
            "--define=instance=bench-sql",
            "--define=actor=relay:bench-sql",
            f"--define=limit={batch}",
            "--define=lease_seconds=60",
            url,
        ]
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        elapsed = time.perf_counter() - started
    failed = re.search(r"number of failed transactions: (\d+)", done.stdout)
    if done.returncode != 0 or (failed and int(failed.group(1))):
        print(done.stdout, done.stderr, sep="\n", file=sys.stderr)
        raise SystemExit(f"pgbench failed (exit {done.returncode})")
    return elapsed


STANDIN = Path(__file__).resolve().parent / "standin_limit"


def standin(clients: int, transactions: int) -> dict[str, Any]:
    """The yardstick: the same amount of writing per intent as a write-back (intent and
    payment updates, one audit row, one event, two ledger lines), done set-based with no
    triggers, hash chain or per-payment order (benchmarks/standin_limit/, a copy of the
    project's ../shared/bench/standin_limit). pgbench -c clients -t transactions, 100
    intents per transaction, as run.sh runs it."""
    with scratch_database("standin") as url, psycopg.connect(url, autocommit=True) as conn:
        for name in ("schema.sql", "fill.sql"):
            conn.execute((STANDIN / name).read_text().encode())
        conn.execute("VACUUM ANALYZE")
        print(
            f"  yardstick: {clients} clients x {transactions} batches of 100"
            f" (load {load_average()})",
            flush=True,
        )
        command = [
            pgbench_binary(),
            "--no-vacuum",
            f"--file={STANDIN / 'cycle.sql'}",
            f"--client={clients}",
            f"--jobs={clients}",
            f"--transactions={transactions}",
            url,
        ]
        done = subprocess.run(command, capture_output=True, text=True)
    tps = re.search(r"tps = ([0-9.]+)", done.stdout)
    if done.returncode != 0 or tps is None:
        print(done.stdout, done.stderr, sep="\n", file=sys.stderr)
        raise SystemExit(f"pgbench (yardstick) failed (exit {done.returncode})")
    return {"intents_per_second": float(tps.group(1)) * 100, "load_average_after": load_average()}


def check(url: str) -> dict[str, int]:
    """What the replay wrote: the same bookkeeping as the relay's write-back."""
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT (SELECT count(*) FROM outbox.events),"
            " (SELECT count(*) FROM outbox.ledger_transactions),"
            " (SELECT count(*) FROM outbox.audit_log)"
        ).fetchone()
    assert row is not None
    return {"events": row[0], "ledger_transactions": row[1], "audit_rows": row[2]}


# Diagnostics only (--diagnose): the same replay with some of the outbox's triggers off,
# to show where the database's time per intent goes. Never a configuration to ship.
class Diagnostic(NamedTuple):
    disabled: list[tuple[str, str]]  # (table, trigger) switched off for the replay
    charges: bool = False  # one charge per payment instead of authorize then capture


AUDIT = [
    ("outbox.payment_intents", "payment_intents_audit_update"),
    ("outbox.payments", "payments_audit_update"),
]
LEDGER = [("outbox.payment_intents", "payment_intents_ledger")]
CREATION_AUDIT = [("outbox.payment_intents", "payment_intents_audit_0_creation")]
CHARGES = "diagnostic: one charge per payment (the yardstick's workload)"
DIAGNOSTICS: dict[str, Diagnostic] = {
    "diagnostic: audit triggers off": Diagnostic(AUDIT),
    "diagnostic: audit and ledger triggers off": Diagnostic(AUDIT + LEDGER),
    # What the SQL would reach if the hash-chained audit (the creation rows written at the
    # claim and the promotion included) and the ledger cost nothing: the ceiling of the
    # ratio to the yardstick for any cheaper way of keeping them.
    "diagnostic: every audit trigger (creation rows too) and the ledger off": Diagnostic(
        CREATION_AUDIT + AUDIT + LEDGER
    ),
    # The yardstick's workload (one charge per payment: no capture waits blocked, none is
    # promoted), with everything on and then with the audit and ledger off: how much of
    # the distance is the authorize-then-capture workload's per-payment order.
    CHARGES: Diagnostic([], charges=True),
    f"{CHARGES}, every audit trigger and the ledger off": Diagnostic(
        CREATION_AUDIT + AUDIT + LEDGER, charges=True
    ),
}


def measure(
    args: argparse.Namespace,
    script: str,
    disabled: list[tuple[str, str]],
    *,
    charges: bool = False,
) -> dict[str, Any]:
    # Enough batches for the backlog; near the authorize->capture turn a claim may find
    # fewer than `batch` rows, so a few intents can stay: only finished ones are counted.
    transactions = math.ceil(args.intents / args.batch / args.clients)
    with scratch_database("sql_limit") as url:
        insert_backlog(url, args.intents, pairs=not charges)
        with psycopg.connect(url, autocommit=True) as conn:
            for table_name, trigger in disabled:
                found = conn.execute(
                    "SELECT 1 FROM pg_trigger WHERE tgrelid = %s::regclass AND tgname = %s",
                    (table_name, trigger),
                ).fetchone()
                if found is None:
                    print(f"  (no trigger {trigger} on {table_name} in this schema: left out)")
                    continue
                conn.execute(f"ALTER TABLE {table_name} DISABLE TRIGGER {trigger}")
            # No publisher runs here; one that keeps up with this rate claims full batches
            # and so has asked event inserts not to NOTIFY (sql/0021). Older schemas have
            # no such flag and notify on every write-back.
            conn.execute(
                "DO $$ BEGIN IF to_regclass('outbox.events_wakeup') IS NOT NULL THEN"
                " UPDATE outbox.events_wakeup SET wanted = false; END IF; END $$"
            )
            conn.execute("ANALYZE outbox.payment_intents")
        print(
            f"  replaying: {args.clients} clients x {transactions} batches of {args.batch}"
            f"{' with ' + ', '.join(t for _, t in disabled) + ' off' if disabled else ''}"
            f" (load {load_average()})",
            flush=True,
        )
        elapsed = replay(
            url, script, clients=args.clients, transactions=transactions, batch=args.batch
        )
        counts = status_counts(url)
        written = check(url)
    if set(counts) - {"succeeded", "pending", "blocked"}:
        raise SystemExit(f"unexpected statuses after the replay: {counts}")
    done = counts.get("succeeded", 0)
    return {
        "succeeded": done,
        "left": {k: v for k, v in counts.items() if k != "succeeded"},
        "seconds": elapsed,
        "intents_per_second": done / elapsed,
        "written": written,
        "load_average_after": load_average(),
    }


def explain_batches(batches: int, batch: int) -> dict[str, dict[str, float]]:
    """Where the database's time per intent goes: a few batches under EXPLAIN ANALYZE
    (claim, then the write-back as Store.complete runs it), milliseconds per intent for
    each statement and each trigger it fires. Timing is exact per run, unlike a
    throughput ratio, though EXPLAIN's instrumentation adds some overhead of its own."""
    params = {"provider": "stripe", "limit": batch, "lease_seconds": 60, "now": None}
    totals: dict[str, dict[str, float]] = {}
    intents = 0

    def add(statement: str, plan: dict[str, Any]) -> None:
        into = totals.setdefault(statement, {})
        into["statement (all)"] = into.get("statement (all)", 0.0) + plan["Execution Time"]
        for trigger in plan.get("Triggers", []):
            name = f"trigger {trigger['Trigger Name']}"
            into[name] = into.get(name, 0.0) + trigger["Time"]

    with scratch_database("sql_explain") as url:
        insert_backlog(url, 2 * batch * (batches + 1))
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("ANALYZE")
            for n in range(batches + 1):  # the first batch warms plan caches: left out
                if n == 1:
                    totals.clear()
                    intents = 0
                row = conn.execute(
                    "EXPLAIN (ANALYZE, FORMAT JSON) " + QUERIES["claim_intents"],
                    {**params, "instance": "bench-explain"},
                ).fetchone()
                assert row is not None
                add("claim_intents", row[0][0])
                claimed = conn.execute(
                    "SELECT i.id, i.lease_token, i.payment_id, i.action, i.amount_minor,"
                    " p.authorized_minor, p.provider_reference"
                    " FROM outbox.payment_intents AS i JOIN outbox.payments AS p USING (payment_id)"
                    " WHERE i.status = 'in_flight' AND i.claimed_by = 'bench-explain' ORDER BY i.id"
                ).fetchall()
                intents += len(claimed)
                outcome = outcome_params(claimed)
                with conn.transaction():
                    conn.execute(QUERIES["set_actor"], {"actor": "relay:bench", "reason": None})
                    conn.execute(
                        QUERIES["lock_payments"],
                        {"payment_ids": sorted({r[2] for r in claimed})},
                    )
                    row = conn.execute(
                        "EXPLAIN (ANALYZE, FORMAT JSON) " + QUERIES["complete_intents"],
                        {**outcome, "now": None},
                    ).fetchone()
                    assert row is not None
                    add("complete_intents", row[0][0])
    return {
        statement: {name: ms / max(intents, 1) for name, ms in parts.items()}
        for statement, parts in totals.items()
    }


def outcome_params(claimed: list[Any]) -> dict[str, list[Any]]:
    """What the relay writes for a success of each claimed (authorize|capture) intent."""
    out: dict[str, list[Any]] = {name: [] for name in _OUTCOME_ARRAYS}
    for intent_id, token, _payment, action, amount, authorized, reference in claimed:
        capture = action == "capture"
        applied = (amount or authorized) if capture else amount
        ref = reference if capture else f"pi_bench_{intent_id}"
        for name, value in (
            ("ids", intent_id),
            ("lease_tokens", token),
            ("statuses", "succeeded"),
            ("retry_delays", 0.0),
            ("provider_references", ref),
            ("amounts_applied", applied),
            ("error_codes", None),
            ("error_messages", None),
            ("payment_states", "captured" if capture else "authorized"),
            ("authorized", authorized if capture else applied),
            ("captured", applied if capture else 0),
            ("refunded", 0),
            ("payment_references", ref),
            ("unsent", False),
        ):
            out[name].append(value)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--intents", type=int, default=20_000, help="backlog per run (20000)")
    parser.add_argument("--clients", type=int, default=2, help="pgbench clients (2)")
    parser.add_argument("--batch", type=int, default=100, help="intents per claim (100)")
    parser.add_argument(
        "--rounds", type=int, default=2, help="interleaved limit/relay rounds, best kept (2)"
    )
    parser.add_argument(
        "--no-relay", action="store_true", help="replay only; take the relay from drain.json"
    )
    parser.add_argument("--quick", action="store_true", help="5,000 intents, one round")
    parser.add_argument(
        "--diagnose",
        action="store_true",
        help="also replay, in every round, with the audit (and ledger) triggers off (the third"
        " variant: every audit trigger, the creation rows' too, and the ledger), then on the"
        " yardstick's workload (one charge per payment) with everything on and with the audit"
        " and ledger off, and time each statement and trigger per intent with EXPLAIN ANALYZE",
    )
    parser.add_argument(
        "--standin-transactions",
        type=int,
        default=600,
        help="yardstick batches per client (600, as run.sh); 0 leaves the yardstick out",
    )
    parser.add_argument("--print-script", action="store_true", help="show the pgbench script")
    args = parser.parse_args()
    if args.quick:
        args.intents, args.rounds = 5_000, 1
    script = batch_script()
    if args.print_script:
        print(script)
    print(
        f"SQL limit: the relay's batch statements from relay/infra/queries.sql, {args.intents:,}"
        f" intents per run, {args.rounds} round(s)"
    )
    if not args.no_relay:
        quiet_relay_logging()
    limits: list[dict[str, Any]] = []
    relays: list[dict[str, Any]] = []
    standins: list[dict[str, Any]] = []
    tried: dict[str, list[dict[str, Any]]] = {label: [] for label in DIAGNOSTICS}
    for _ in range(args.rounds):
        if args.standin_transactions:
            standins.append(standin(args.clients, args.standin_transactions))
            print(f"  yardstick: {standins[-1]['intents_per_second']:,.0f} intents/s", flush=True)
        limits.append(measure(args, script, []))
        print(f"  limit: {limits[-1]['intents_per_second']:,.0f} intents/s", flush=True)
        # In the same round as the yardstick and the limit they are compared with, the best
        # of the rounds kept for each, as for those.
        for label, diagnostic in DIAGNOSTICS.items() if args.diagnose else ():
            tried[label].append(
                measure(args, script, diagnostic.disabled, charges=diagnostic.charges)
            )
        if not args.no_relay:
            relays.append(run_variant("relay", args.intents, zero_latency_lane, pool_size=4))
    limit = max(limits, key=lambda r: r["intents_per_second"])
    rate = limit["intents_per_second"]
    relay: dict[str, Any] | None = None
    source = "this run"
    if relays:
        relay = max(relays, key=lambda r: r["intents_per_second"])
    elif (RESULTS / "drain.json").exists():  # a drain.py run without it leaves None
        relay = json.loads((RESULTS / "drain.json").read_text())["runs"].get("in-process adapter")
        source = "drain.json"
    rows = [("measure", "intents", "intents/s", "ratio to limit")]
    yardstick = max(standins, key=lambda r: r["intents_per_second"]) if standins else None
    limit_to_yardstick = None
    if yardstick is not None:
        limit_to_yardstick = rate / yardstick["intents_per_second"]
        rows.append(
            (
                "yardstick: the same writing set-based (standin_limit)",
                f"{2 * args.standin_transactions * 100:,}",
                f"{yardstick['intents_per_second']:,.0f}",
                f"{yardstick['intents_per_second'] / rate:.2f}",
            )
        )
    rows.append(
        ("SQL limit (pgbench, full bookkeeping)", f"{limit['succeeded']:,}", f"{rate:,.0f}", "1.00")
    )
    ratio = None
    if relay is not None:
        ratio = relay["intents_per_second"] / rate
        rows.append(
            (
                f"relay, in-process adapter ({source})",
                f"{relay['intents']:,}",
                f"{relay['intents_per_second']:,.0f}",
                f"{ratio:.2f}",
            )
        )
    diagnostics: dict[str, dict[str, Any]] = {}
    if args.diagnose:
        for label in DIAGNOSTICS:
            diagnostics[label] = result = max(tried[label], key=lambda r: r["intents_per_second"])
            rows.append(
                (
                    label,
                    f"{result['succeeded']:,}",
                    f"{result['intents_per_second']:,.0f}",
                    f"{result['intents_per_second'] / rate:.2f}",
                )
            )
            if yardstick is not None:
                result["ratio_to_yardstick"] = (
                    result["intents_per_second"] / yardstick["intents_per_second"]
                )
                print(
                    f"  {label}: {result['ratio_to_yardstick']:.2f} of the yardstick",
                    flush=True,
                )
    print(table(rows))
    if limit_to_yardstick is not None:
        print(f"SQL limit / yardstick: {limit_to_yardstick:.2f} (goal >= 0.5)")
    if ratio is not None:
        print(f"relay / SQL limit: {ratio:.2f} (goal >= 0.6)")
    explained: dict[str, dict[str, float]] = {}
    if args.diagnose:
        explained = explain_batches(5, args.batch)
        parts = [("statement / trigger (EXPLAIN ANALYZE, authorize then capture)", "ms per intent")]
        for statement, items in explained.items():
            for name, per_intent in sorted(items.items(), key=lambda kv: -kv[1]):
                parts.append((f"{statement}: {name}", f"{per_intent:.3f}"))
        print(table(parts))
    if args.rounds > 1:
        print(
            "rounds: limit "
            + ", ".join(f"{r['intents_per_second']:,.0f}" for r in limits)
            + (
                "; relay " + ", ".join(f"{r['intents_per_second']:,.0f}" for r in relays)
                if relays
                else ""
            )
            + (
                "; yardstick " + ", ".join(f"{r['intents_per_second']:,.0f}" for r in standins)
                if standins
                else ""
            )
            + " intents/s (best kept)"
        )
    # Each replay against its own round's yardstick: a yardstick that moves between rounds
    # (its best and worst have differed by two thirds) shows here, not in the best-of figures.
    per_round: dict[str, list[float]] = {}
    if standins:
        per_round = {
            label: [
                r["intents_per_second"] / y["intents_per_second"]
                for r, y in zip(replays, standins, strict=True)
            ]
            for label, replays in {"SQL limit": limits, **(tried if args.diagnose else {})}.items()
        }
        print("ratio to the same round's yardstick, per round:")
        for label, ratios in per_round.items():
            print(f"  {label}: {', '.join(f'{x:.2f}' for x in ratios)}")
    written, done = limit["written"], max(limit["succeeded"], 1)
    print(
        f"per succeeded intent the replay wrote {written['events'] / done:.2f} events,"
        f" {written['ledger_transactions'] / done:.2f} ledger transactions,"
        f" {written['audit_rows'] / done:.2f} audit rows (the backlog's inserts included)"
    )
    path = write_result(
        "sql_limit",
        {
            "intents": args.intents,
            "clients": args.clients,
            "batch": args.batch,
            "rounds": args.rounds,
            "quick": args.quick,
            **limit,
            "limit_rounds": [r["intents_per_second"] for r in limits],
            "relay_rounds": [r["intents_per_second"] for r in relays],
            "relay_source": source if relay else None,
            "relay_intents_per_second": relay["intents_per_second"] if relay else None,
            "relay_intents": relay["intents"] if relay else None,
            "ratio_relay_to_limit": ratio,
            "yardstick_rounds": [r["intents_per_second"] for r in standins],
            "yardstick_intents_per_second": yardstick["intents_per_second"] if yardstick else None,
            "ratio_limit_to_yardstick": limit_to_yardstick,
            "ratios_to_the_rounds_yardstick": per_round,
            "diagnostics": diagnostics,
            "explain_ms_per_intent": explained,
            "script": script,
        },
    )
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
