"""The write path's statement triggers keep plans that stay linear in the statement's size.

PL/pgSQL plans a trigger's statements at its first call on a connection, for the transition
tables' row counts of that call, and keeps the plans. A relay connection's first claim or
write-back often holds one intent; a join of OLD TABLE with NEW TABLE planned for one row
is a nested loop that rescans the inner transition table (no index) for every outer row,
so each later batch of 100 costs 100 x 100 (sql/0080). This test makes the first claim and
write-back of a connection hold one intent and reads every plan the server makes meanwhile
(``debug_print_plan``, sent to the client): no nested loop may have a transition table on
its inner side.
"""

from __future__ import annotations

import re

import psycopg

from relay.infra.queries import QUERIES

_NODE = re.compile(r"\{([A-Z_]+)")
# Plan fields print with their struct's prefix (":join.plan.righttree").
_RIGHT = re.compile(r":(?:\w+\.)*righttree\b")
_LEFT = re.compile(r":(?:\w+\.)*lefttree\b")


def _subtree(text: str, start: int) -> str:
    """The balanced ``{...}`` node beginning at or after ``start``."""
    begin = text.index("{", start)
    depth = 0
    for at in range(begin, len(text)):
        if text[at] == "{":
            depth += 1
        elif text[at] == "}":
            depth -= 1
            if depth == 0:
                return text[begin : at + 1]
    raise AssertionError("unbalanced plan dump")


def _inner_side(loop: str) -> str:
    """A nested loop's inner input: its righttree, looked through a Materialize."""
    right = _RIGHT.search(loop)
    assert right is not None, loop[:300]
    inner = _subtree(loop, right.end())
    kind = _NODE.match(inner)
    if kind and kind.group(1) == "MATERIAL":
        left = _LEFT.search(inner)
        assert left is not None, inner[:300]
        inner = _subtree(inner, left.end())
    return inner


def _nested_loops_over_transition_tables(plan: str) -> list[str]:
    found = []
    for match in re.finditer(r"\{NESTLOOP\b", plan):
        inner = _inner_side(_subtree(plan, match.start()))
        kind = _NODE.match(inner)
        if kind and kind.group(1) == "NAMEDTUPLESTORESCAN":
            found.append(inner[:200])
    return found


def test_one_intent_first_plans_no_nested_loop_over_a_transition_table(
    conn: psycopg.Connection,
) -> None:
    row = conn.execute(
        "INSERT INTO outbox.payment_intents (payment_id, action, provider, amount_minor,"
        " currency, payment_method) VALUES ('plan-1', 'authorize', 'stripe', 1000, 'EUR',"
        " 'pm_card_visa') RETURNING id"
    ).fetchone()
    assert row is not None
    intent_id = row[0]
    plans: list[str] = []
    conn.add_notice_handler(
        lambda d: (
            plans.append(d.message_detail or "")
            if (d.message_primary or "").startswith("plan")
            else None
        )
    )
    conn.execute("SET client_min_messages = log")
    conn.execute("SET debug_print_plan = on")
    claimed = conn.execute(
        QUERIES["claim_intents"],
        {"provider": "stripe", "limit": 1, "lease_seconds": 60, "instance": "t", "now": None},
    ).fetchall()
    assert [claim[0] for claim in claimed] == [intent_id]
    lease_token = claimed[0][9]
    with conn.transaction():
        conn.execute(QUERIES["set_actor"], {"actor": "relay:t", "reason": None})
        conn.execute(QUERIES["lock_payments"], {"payment_ids": ["plan-1"]})
        written = conn.execute(
            QUERIES["complete_intents"],
            {
                "ids": [intent_id],
                "lease_tokens": [lease_token],
                "statuses": ["succeeded"],
                "retry_delays": [0.0],
                "provider_references": ["pi_plan_1"],
                "amounts_applied": [1000],
                "error_codes": [None],
                "error_messages": [None],
                "payment_states": ["authorized"],
                "authorized": [1000],
                "captured": [0],
                "refunded": [0],
                "payment_references": ["pi_plan_1"],
                "unsent": [False],
                "now": None,
            },
        ).fetchall()
    conn.execute("SET debug_print_plan = off")
    assert len(written) == 1
    # The write-back ran the audit (intent and payment) and ledger triggers: their rows exist.
    counts = conn.execute(
        "SELECT (SELECT count(*) FROM outbox.audit_log WHERE operation = 'update'),"
        " (SELECT count(*) FROM outbox.ledger_transactions)"
    ).fetchone()
    assert counts == (2, 1)
    joined = [p for p in plans if p.count("NAMEDTUPLESTORESCAN") >= 2]
    assert joined, "no plan joined two transition tables: the check saw nothing"
    offenders = [loop for p in plans for loop in _nested_loops_over_transition_tables(p)]
    assert offenders == []
