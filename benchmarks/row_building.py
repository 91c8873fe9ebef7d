"""Row building: what reading the claim's rows by name costs per row, in Python alone.

One real ``claim_intents`` batch (``--batch`` rows, default 100) is claimed from a scratch
database; its rows and cursor description are kept, and each way of turning a row into
an :class:`~relay.domain.intents.IntentRow` is timed on them, as psycopg calls a row maker
per row (best of ``--repeat`` runs):

* positional: the tuple unpacked by position (the relay before rows were read by name);
* ``class_row``-style: ``IntentRow.from_columns(**dict(zip(names, values)))``, which is
  exactly what psycopg's ``class_row`` and ``kwargs_row`` do per row;
* ``dict_row`` then ``from_columns(**row)``: a dict per row, then the call;
* ``columns_row`` (relay/infra/rows.py): columns found by name once per result, each row
  passed positionally.

The database's own time is not in these figures (benchmarks/drain.py measures the whole).

    python benchmarks/row_building.py [--batch 100] [--repeat 9]
"""

from __future__ import annotations

import argparse
import sys
import timeit
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import psycopg
from psycopg.rows import dict_row, kwargs_row

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import insert_backlog, scratch_database, table, write_result
from provider_adapters.base import Action
from relay.domain.intents import IntentRow
from relay.domain.state_machine import PaymentSnapshot, PaymentState
from relay.infra.queries import QUERIES
from relay.infra.rows import columns_row


def positional(row: Sequence[Any]) -> IntentRow:
    """The claim's row unpacked by position, in claim_intents' column order (what the
    relay did before rows were read by name), as the same IntentRow."""
    (
        intent_id,
        payment_id,
        action,
        provider_name,
        amount,
        currency,
        method,
        key,
        attempts,
        token,
        traceparent,
        state,
        authorized,
        captured,
        refunded,
        reference,
        disputed,
        dispute_status,
        awaiting_action,
        exponent,
    ) = row
    return IntentRow(
        id=intent_id,
        payment_id=payment_id,
        action=Action(action),
        provider=provider_name,
        amount_minor=amount,
        currency=currency,
        payment_method=method,
        idempotency_key=key,
        attempts=attempts,
        lease_token=token,
        traceparent=traceparent,
        payment=PaymentSnapshot(
            state=PaymentState(state),
            currency=currency,
            authorized_minor=authorized,
            captured_minor=captured,
            refunded_minor=refunded,
            provider_reference=reference,
            disputed_minor=disputed,
            dispute_status=dispute_status,
            awaiting_action=awaiting_action,
        ),
        exponent=exponent,
    )


def claimed_batch(url: str, batch: int) -> tuple[psycopg.Cursor[Any], list[tuple[Any, ...]]]:
    conn = psycopg.connect(url, autocommit=True)
    cur = conn.cursor()
    cur.execute(
        QUERIES["claim_intents"],
        {
            "provider": "stripe",
            "limit": batch,
            "lease_seconds": 60.0,
            "instance": "bench",
            "now": None,
        },
    )
    return cur, cur.fetchall()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=100, help="rows per claim (100)")
    parser.add_argument("--repeat", type=int, default=9, help="timing runs, best kept (9)")
    args = parser.parse_args()
    with scratch_database("rows") as url:
        # Half authorize (pending), half capture (blocked): claim only sees the authorizes.
        insert_backlog(url, args.batch * 2)
        cur, rows = claimed_batch(url, args.batch)
        try:
            as_dict = dict_row(cur)
            makers: dict[str, Callable[[Sequence[Any]], IntentRow]] = {
                "positional (before)": positional,
                "class_row-style (dict per row, **kwargs)": kwargs_row(IntentRow.from_columns)(cur),
                "dict_row + from_columns(**row)": lambda values: IntentRow.from_columns(
                    **as_dict(values)
                ),
                "columns_row(from_columns) (after)": columns_row(IntentRow.from_columns)(
                    cur  # type: ignore[arg-type]
                ),
            }
        finally:
            cur.connection.close()
    expected = [positional(row) for row in rows]
    figures: dict[str, float] = {}
    for name, make in makers.items():
        assert [make(row) for row in rows] == expected, name

        def batch(make: Callable[[Sequence[Any]], IntentRow] = make) -> list[IntentRow]:
            return [make(row) for row in rows]

        runs = timeit.repeat(batch, number=200, repeat=args.repeat)
        figures[name] = min(runs) / 200 / len(rows) * 1e6
    base = figures["positional (before)"]
    print(f"row building: {len(rows)} claim_intents rows, best of {args.repeat} runs")
    print(
        table(
            [
                ("row maker", "us per row", "vs positional"),
                *((name, f"{us:.2f}", f"{us / base:.2f}x") for name, us in figures.items()),
            ]
        )
    )
    path = write_result("row_building", {"rows": len(rows), "us_per_row": figures})
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
