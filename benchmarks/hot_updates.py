"""HOT updates: how many of the relay's row updates PostgreSQL could do without index writes.

An UPDATE is HOT (heap-only) when no column that an index of the table reads (its key
columns, expressions or partial predicate, in PostgreSQL 15) changes and the page has room
for the new version: then no index is written. Otherwise every index of the table gets an
entry for the new version. This counts, deterministically (pg_stat_user_tables n_tup_upd and
n_tup_hot_upd, no timing), what a drain does to outbox.payments and outbox.payment_intents
under variants of the payments' indexes, on a fresh scratch database each:

* pairs: authorize + capture per payment inserted together (benchmarks/drain.py's backlog:
  the capture's insert bumps the payment while it is `new`), then drained;
* later: the authorizations inserted and drained first, then the captures inserted (each
  bumps an `authorized` payment) and drained, as an application that captures on shipping.

The drain is the relay's own SQL (claim_intents, then set_actor, lock_payments and
complete_intents in one transaction, as Store runs them), one batch at a time on one
connection, with the outcomes a zero-latency provider would give (benchmarks/sql_limit.py).
Autovacuum is off on both tables, so only the updates' own page pruning makes room; that
pruning depends on the server's other transactions, so the HOT counts that page space
limits move a little from run to run (printed as min-max over --repeat runs). The size of
payments' indexes after each run shows what the non-HOT updates wrote into them.

    python benchmarks/hot_updates.py [--payments 2000] [--batch 100]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import psycopg
from psycopg.rows import dict_row

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import INTENT_COLUMNS, scratch_database, table, write_result
from benchmarks.sql_limit import outcome_params
from relay.infra.queries import QUERIES

TABLES = ("payments", "payment_intents")

# Every variant starts from the migrated schema with its authorised-payments index dropped.
_DROP = [
    "DROP INDEX IF EXISTS outbox.payments_authorized_idx",
    "DROP INDEX IF EXISTS outbox.payments_authorized_created_idx",
]
VARIANTS: dict[str, list[str]] = {
    "sql/0084 (provider, updated_at) WHERE state = 'authorized'": [
        *_DROP,
        "CREATE INDEX payments_authorized_idx ON outbox.payments (provider, updated_at)"
        " WHERE state = 'authorized'",
    ],
    "sql/0088 (provider, created_at) WHERE state = 'authorized'": [
        *_DROP,
        "CREATE INDEX payments_authorized_created_idx ON outbox.payments"
        " (provider, created_at) WHERE state = 'authorized'",
    ],
    "no index for the sweep (before sql/0084)": _DROP,
}
# HOT also needs room on the page for the new version: the same, with less of each page filled
# by inserts (payments has fillfactor 80 since sql/0001).
for _name in list(VARIANTS)[1:]:
    for _ff in (65, 50):
        VARIANTS[f"{_name.split(' (')[0]}, fillfactor {_ff}"] = [
            *VARIANTS[_name],
            f"ALTER TABLE outbox.payments SET (fillfactor = {_ff})",
        ]
# Autovacuum off, so that only the updates' own page pruning makes room and the counts do not
# depend on when a worker happens to pass.
SETUP = [f"ALTER TABLE outbox.{t} SET (autovacuum_enabled = false)" for t in TABLES]


def counters(url: str) -> dict[str, tuple[int, int]]:
    """(n_tup_upd, n_tup_hot_upd) per table, as the statistics system has them now."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT pg_stat_clear_snapshot()")
        rows = conn.execute(
            "SELECT relname, n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables"
            " WHERE schemaname = 'outbox' AND relname = ANY(%s)",
            (list(TABLES),),
        ).fetchall()
    return {name: (int(upd), int(hot)) for name, upd, hot in rows}


def payments_index_kb(url: str) -> int:
    """The size of every index of payments: a non-HOT update adds an entry to each."""
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT pg_indexes_size('outbox.payments'::regclass) / 1024").fetchone()
    assert row is not None
    return int(row[0])


def flush(conn: psycopg.Connection[Any]) -> None:
    """Make this backend's pending table statistics visible to the others (PostgreSQL 15
    flushes them at most once a second otherwise)."""
    conn.execute("SELECT pg_stat_force_next_flush()")
    conn.execute("SELECT 1")


def insert(url: str, rows: list[tuple[Any, ...]]) -> None:
    with psycopg.connect(url) as conn:
        with (
            conn.cursor() as cur,
            cur.copy(f"COPY outbox.payment_intents ({INTENT_COLUMNS}) FROM STDIN") as copy,
        ):
            for row in rows:
                copy.write_row(row)
        conn.commit()
        flush(conn)


def drain(url: str, batch: int, provider: str = "stripe") -> int:
    """Claim and write back successes until nothing is claimable; returns intents written."""
    params = {"provider": provider, "limit": batch, "lease_seconds": 60, "now": None}
    done = 0
    with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
        while True:
            rows = conn.execute(
                QUERIES["claim_intents"], {**params, "instance": "bench-hot"}
            ).fetchall()
            # What outcome_params reads, positionally, in id order.
            claimed = sorted(
                (r["id"], r["lease_token"], r["payment_id"], r["action"], r["amount_minor"],
                 r["authorized_minor"], r["payment_reference"])
                for r in rows
            )  # fmt: skip
            if not claimed:
                break
            with conn.transaction():
                conn.execute(QUERIES["set_actor"], {"actor": "relay:bench-hot", "reason": None})
                conn.execute(
                    QUERIES["lock_payments"], {"payment_ids": sorted({r[2] for r in claimed})}
                )
                conn.execute(QUERIES["complete_intents"], {**outcome_params(claimed), "now": None})
            done += len(claimed)
        flush(conn)
    return done


Growth = dict[str, tuple[int, int]]


def phases(url: str, workload: str, payments: int, batch: int) -> list[tuple[str, int, Growth]]:
    """Run the workload; after each phase, the counters' growth during it."""
    Row = tuple[Any, ...]
    authorize: list[Row] = [
        (f"p-{n}", "authorize", "stripe", 1000, "EUR", "pm_card_visa") for n in range(payments)
    ]
    capture: list[Row] = [
        (f"p-{n}", "capture", "stripe", None, "EUR", None) for n in range(payments)
    ]
    if workload == "pairs":
        steps = [
            ("insert", [r for pair in zip(authorize, capture, strict=True) for r in pair]),
            ("drain", []),
        ]
    else:
        steps = [
            ("insert authorizations", authorize),
            ("drain", []),
            ("insert captures", capture),
            ("drain captures", []),
        ]
    out = []
    before = counters(url)
    for name, rows in steps:
        if rows:
            insert(url, rows)
            written = len(rows)
        else:
            written = drain(url, batch)
        after = counters(url)
        growth = {t: (after[t][0] - before[t][0], after[t][1] - before[t][1]) for t in TABLES}
        out.append((name, written, growth))
        before = after
    return out


def spread(values: list[int]) -> str:
    return str(values[0]) if min(values) == max(values) else f"{min(values)}-{max(values)}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--payments", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs of each; page pruning moves the HOT counts"
    )
    args = parser.parse_args()

    # (variant, workload, phase) -> intents, then per run [payments upd, HOT, intents upd, HOT]
    runs: dict[tuple[str, str, str], tuple[int, list[list[int]]]] = {}
    for _ in range(args.repeat):
        for variant, statements in VARIANTS.items():
            for workload in ("pairs", "later"):
                with scratch_database("hot") as url:
                    with psycopg.connect(url, autocommit=True) as conn:
                        for statement in [*SETUP, *statements]:
                            conn.execute(statement)
                    measured = phases(url, workload, args.payments, args.batch)
                    index_kb = payments_index_kb(url)
                total = [0, 0, 0, 0]
                for phase, written, growth in measured:
                    counts = [growth[t][i] for t in TABLES for i in (0, 1)]
                    total = [a + b for a, b in zip(total, counts, strict=True)]
                    runs.setdefault((variant, workload, phase), (written, []))[1].append(counts)
                runs.setdefault((variant, workload, "total"), (0, []))[1].append([*total, index_kb])
    rows: list[tuple[str, ...]] = [
        (
            "variant",
            "workload",
            "phase",
            "intents",
            "payments upd",
            "HOT",
            "intents upd",
            "HOT",
            "payments' indexes kB",
        )
    ]
    for (variant, workload, phase), (written, per_run) in runs.items():
        rows.append(
            (variant[:40], workload, phase, str(written or ""),
             *(spread([c[i] for c in per_run]) if i < len(per_run[0]) else ""
               for i in range(5)))
        )  # fmt: skip
    print(table(rows))
    result = {
        "payments": args.payments,
        "batch": args.batch,
        "repeat": args.repeat,
        "variants": {v: s for v, s in VARIANTS.items()},
        "runs": [
            {"variant": v, "workload": w, "phase": p, "intents": n,
             "payments_upd_hot_intents_upd_hot": per_run}
            for (v, w, p), (n, per_run) in runs.items()
        ],
    }  # fmt: skip
    print(f"wrote {write_result('hot_updates', result)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
