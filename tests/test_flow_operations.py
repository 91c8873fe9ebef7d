"""Flows past their deadlines, authorisations no flow covers, and the operator's controls
(sql/0083 to 0085, docs/flows.md).

The deadline test owns the clock: it passes ``now`` to the sweep (outbox.flow_sweep_v1), so
nothing waits for time to pass. Provider effects go through an in-memory provider that
counts them per idempotency key; the later refusal is the relay's own state machine.
"""

from __future__ import annotations

import argparse
import json
import re
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import anyio
import psycopg
import pytest
from psycopg.types.json import Jsonb

from provider_adapters.base import Action, Command, Succeeded
from provider_adapters.memory import MemoryProvider
from relay.cli.flows import duration_seconds
from relay.cli.main import main as cli_main
from relay.core.store import Store
from relay.domain.intents import WriteBack
from relay.domain.state_machine import PaymentSnapshot, PaymentState
from relay.finance.audit import verify_database
from relay.infra.db import Database
from relay.service.flow_sweep import FlowSweeper
from tests.support.cli import run_cli
from tests.support.flows import (
    authorized_snapshot,
    claim_one,
    flow_events,
    flow_intents,
    flow_state,
    open_store,
    recipe,
    split_tender,
    start_flow,
    write_back,
)
from tests.support.relays import make_relay_with, run_until_settled

pytestmark = pytest.mark.anyio

WEEK = 7 * 86_400


def hold_then_capture(payment: str = "order-7", within: int | None = WEEK) -> list[dict[str, Any]]:
    """Authorise, then capture within ``within`` seconds of the flow's start, or void."""
    capture: dict[str, Any] = {"payment_id": payment, "action": "capture", "currency": "EUR",
                               "depends_on": [1]}  # fmt: skip
    if within is not None:
        capture["within_seconds"] = within
    return [
        {"payment_id": payment, "action": "authorize", "provider": "giftco",
         "amount_minor": 500, "currency": "EUR", "payment_method": "pm_card_visa"},
        capture,
    ]  # fmt: skip


def sweep(db_url: str, now: datetime | None) -> int:
    with psycopg.connect(db_url) as conn:
        row = conn.execute("SELECT outbox.flow_sweep_v1(%s, 100)", (now,)).fetchone()
    assert row is not None
    return int(row[0])


async def authorise_at(
    provider: MemoryProvider, store: Store, count: int = 1, *, leave: str | None = None
) -> None:
    """Claim the ``count`` authorisations waiting and apply them at ``provider``, as the
    relay would (the relay itself would go on to the next steps at once); the one of
    payment ``leave`` stays in flight."""
    rows = await store.claim(provider.name, 10, lease_seconds=600, instance="flow-ops-test")
    assert len(rows) == count and {r.action for r in rows} == {"authorize"}
    for row in (r for r in rows if r.payment_id != leave):
        outcome = await provider.execute(
            Command(
                row.id,
                row.payment_id,
                Action.AUTHORIZE,
                row.idempotency_key,
                row.amount_minor,
                row.currency,
                payment_method=row.payment_method,
            )
        )
        assert isinstance(outcome, Succeeded)
        ref, amount = outcome.provider_reference, row.amount_minor
        written = await store.complete([WriteBack(
            row.id, row.lease_token, row.payment_id, "succeeded", amount_applied_minor=amount,
            provider_reference=ref, payment=PaymentSnapshot(
                PaymentState.AUTHORIZED, "EUR", authorized_minor=amount,
                provider_reference=ref))])  # fmt: skip
        assert written == {row.id}


async def test_a_missed_capture_deadline_voids_the_hold_and_a_later_capture_is_refused(
    db_url: str,
) -> None:
    gift = MemoryProvider("giftco")
    with psycopg.connect(db_url) as conn:
        row = conn.execute(
            "SELECT outbox.flow_start_v1('order-7', %s)", (Jsonb(hold_then_capture()),)
        ).fetchone()
        assert row is not None
        flow = int(row[0])
        started = conn.execute(
            "SELECT created_at FROM outbox.flows WHERE id = %s", (flow,)
        ).fetchone()
    assert started is not None
    async with open_store(db_url, "flow-ops-test", pool_size=2) as store:
        await authorise_at(gift, store)
    # The capture is in the queue, unsent (its relay is down, say), for eight days.
    assert flow_intents(db_url, flow) == [
        ("step", "authorize", "order-7", "succeeded"),
        ("step", "capture", "order-7", "pending"),
    ]
    assert sweep(db_url, started[0] + timedelta(days=6)) == 0  # not due yet
    assert flow_state(db_url, flow) == ("running", None)
    assert sweep(db_url, started[0] + timedelta(days=8)) == 1
    state, reason = flow_state(db_url, flow)
    assert state == "compensating"
    assert reason is not None and reason.startswith(
        "step 2 (capture of payment order-7) missed its deadline"
    )
    # The capture never goes out; the hold is released, once.
    assert flow_intents(db_url, flow)[1:] == [
        ("step", "capture", "order-7", "failed"),
        ("compensation", "void", "order-7", "pending"),
    ]
    assert sweep(db_url, started[0] + timedelta(days=9)) == 0  # enforced once
    await run_until_settled(db_url, [make_relay_with(db_url, {"giftco": gift})])
    assert flow_state(db_url, flow)[0] == "compensated"
    assert flow_events(db_url, flow) == ["flow.compensating", "flow.compensated"]
    assert gift.effects.total() == 2 and set(gift.effects.values()) == {1}

    # A capture the application inserts after the void: the state machine refuses it, and
    # it never reaches the provider.
    with psycopg.connect(db_url) as conn:
        conn.execute(
            "INSERT INTO outbox.payment_intents (payment_id, action, provider, currency)"
            " VALUES ('order-7', 'capture', 'giftco', 'EUR')"
        )
    await run_until_settled(db_url, [make_relay_with(db_url, {"giftco": gift})])
    with psycopg.connect(db_url) as conn:
        late = conn.execute(
            "SELECT status, error_code FROM outbox.payment_intents"
            " WHERE payment_id = 'order-7' AND action = 'capture' AND NOT metadata ? 'flow'"
        ).fetchone()
        payment = conn.execute(
            "SELECT state FROM outbox.payments WHERE payment_id = 'order-7'"
        ).fetchone()
    assert late == ("failed", "payment_voided")
    assert payment == ("voided",)
    assert gift.effects.total() == 2
    report = verify_database(db_url)
    assert report.intact, [b.describe() for b in report.breaks]


def test_deadlines_are_checked_when_the_flow_starts(db_url: str) -> None:
    with psycopg.connect(db_url) as conn:
        for steps, within, constraint in (
            (hold_then_capture(within=0), None, "flow_steps_within_seconds_1_to_366_days"),
            (hold_then_capture(within=1.5), None, "flow_steps_within_seconds_1_to_366_days"),  # type: ignore[arg-type]
            (hold_then_capture(within=None), 0, "flows_within_seconds_1_to_366_days"),
        ):
            with pytest.raises(psycopg.errors.IntegrityError) as caught, conn.transaction():
                conn.execute(
                    "SELECT outbox.flow_start_v1('bad', %s, '{}', %s)", (Jsonb(steps), within)
                )
            assert caught.value.diag.constraint_name == constraint
        # A flow's own deadline: the sweep finds it once it passed with a step unfinished.
        conn.execute(
            "SELECT outbox.flow_start_v1('own', %s, '{}', 3600)",
            (Jsonb(hold_then_capture(within=None)),),
        )
        row = conn.execute(
            "SELECT id, next_deadline - created_at FROM outbox.flows WHERE flow_key = 'own'"
        ).fetchone()
    assert row is not None and row[1] == timedelta(hours=1)
    with psycopg.connect(db_url, autocommit=True) as conn:  # docs/flows.md's recipe, pasted
        conn.execute(recipe("capture-or-void"))  # type: ignore[arg-type]
        pasted = conn.execute(
            "SELECT s.deadline - f.created_at, f.next_deadline = s.deadline FROM outbox.flows AS f"
            " JOIN outbox.flow_steps AS s ON s.flow_id = f.id AND s.seq = 2"
            " WHERE f.flow_key = 'order-1043'"
        ).fetchone()
    assert pasted == (timedelta(days=6), True)
    assert sweep(db_url, datetime.now(UTC) + timedelta(hours=2)) == 1
    state, reason = flow_state(db_url, row[0])
    # Its authorisation was never sent: withdrawn, nothing to undo.
    assert state == "compensated" and reason is not None
    assert reason.startswith("the flow missed its deadline")
    assert [i[3] for i in flow_intents(db_url, row[0])] == ["failed"]


async def test_authorisations_no_flow_covers_are_voided_or_alerted_by_provider_policy(
    db_url: str,
) -> None:
    gift, card = MemoryProvider("giftco"), MemoryProvider("cardco")
    with psycopg.connect(db_url) as conn:
        for provider, action in (("giftco", "void"), ("cardco", "alert")):
            conn.execute(
                "SELECT outbox.authorization_policy_set_v1('alice', %s, %s, 86400, 'holds lapse')",
                (provider, action),
            )
        with pytest.raises(psycopg.errors.CheckViolation) as caught, conn.transaction():
            conn.execute(
                "SELECT outbox.authorization_policy_set_v1('alice', 'giftco', 'void', 5, 'x')"
            )
        assert caught.value.diag.constraint_name == (
            "authorization_policies_after_seconds_1_minute_to_366_days"
        )
        for payment, provider in (("loose-gift", "giftco"), ("loose-card", "cardco")):
            conn.execute(
                "INSERT INTO outbox.payment_intents (payment_id, action, provider, amount_minor,"
                " currency, payment_method) VALUES (%s, 'authorize', %s, 700, 'EUR', 'pm_card_visa')",
                (payment, provider),
            )
        # Covered: its flow still runs (the card's hold is pending), so it is the flow's.
        conn.execute(
            "SELECT outbox.flow_start_v1('covered', %s)",
            (
                Jsonb(
                    [
                        {
                            "payment_id": "cov-gift",
                            "action": "authorize",
                            "provider": "giftco",
                            "amount_minor": 300,
                            "currency": "EUR",
                            "payment_method": "pm_card_visa",
                        },
                        {
                            "payment_id": "cov-card",
                            "action": "authorize",
                            "provider": "cardco",
                            "amount_minor": 300,
                            "currency": "EUR",
                            "payment_method": "pm_card_visa",
                        },
                        {
                            "payment_id": "cov-gift",
                            "action": "capture",
                            "currency": "EUR",
                            "depends_on": [1, 2],
                        },
                    ]
                ),
            ),
        )
    db = Database(db_url, pool_size=2, name="flow-ops-test")
    await db.open()
    try:
        store = Store(db, actor="relay:flow-ops-test")
        await authorise_at(gift, store, count=2)  # loose-gift, cov-gift
        await authorise_at(card, store, count=2, leave="cov-card")  # cov-card in flight
        sweeper = FlowSweeper(db, instance="flow-ops-test")
        soon = await sweeper.sweep_once()
        assert (soon.flows, soon.voids, soon.uncovered) == (0, 0, {})  # not aged yet
        later = datetime.now(UTC) + timedelta(days=2)
        swept = await sweeper.sweep_once(now=later)
        assert (swept.flows, swept.voids) == (0, 1)
        assert swept.uncovered == {("cardco", "alert"): 1}
        again = await sweeper.sweep_once(now=later + timedelta(days=1))
        assert again.voids == 0  # its void is on its way: never a second one
    finally:
        await db.close()
    with psycopg.connect(db_url) as conn:
        voids = conn.execute(
            "SELECT payment_id, status, metadata -> 'authorization_policy' ->> 'action'"
            " FROM outbox.payment_intents WHERE action = 'void'"
        ).fetchall()
    assert voids == [("loose-gift", "pending", "void")]
    report = verify_database(db_url)
    assert report.intact, [b.describe() for b in report.breaks]


async def test_operators_cancel_retry_and_mark_compensated_with_four_eyes(db_url: str) -> None:
    from relay.operations.flows import (
        ApprovalNeeded,
        approve,
        cancel_flow,
        find_flow,
        retry_step,
    )
    from tests.login_roles import login_role

    flow = start_flow(db_url, "order-1", split_tender())
    redo = start_flow(db_url, "order-2", hold_then_capture("order-2", within=None))
    charge = start_flow(db_url, "order-3", [
        {"payment_id": "order-3", "action": "charge", "provider": "cardco", "amount_minor": 900,
         "currency": "EUR", "payment_method": "pm_card_visa"}])  # fmt: skip
    with (
        login_role(db_url, "outbox_operator", prefix="alice") as alice,
        login_role(db_url, "outbox_operator", prefix="bob") as bob,
    ):
        async with open_store(db_url, "flow-ops-test", pool_size=2) as store:
            held = await store.claim("giftco", 10, lease_seconds=600, instance="flow-ops-test")
            gift, other = sorted(held, key=lambda r: r.payment_id)
            assert (gift.payment_id, other.payment_id) == ("order-1-gift", "order-2")
            await write_back(store, gift, "succeeded", amount_applied_minor=500,
                             payment=authorized_snapshot(500))  # fmt: skip
            # A cancel that only releases holds: one operator. The card's hold, unsent, is
            # withdrawn; the gift card's is voided.
            done = await anyio.to_thread.run_sync(partial(
                run_cli, "flows", "cancel", str(flow), "--reason", "customer called",
                "--operator", "alice", env={"RELAY_DATABASE_URL": alice}))  # fmt: skip
            assert done.returncode == 0, done.stderr
            assert done.stdout.strip() == (
                f"flow {flow} (order-1): compensating: cancelled by operator alice: customer called"
            )
            void = await claim_one(store, "giftco")
            assert (void.action, void.payment_id) == ("void", "order-1-gift")
            # order-2's hold dies with its outcome unknown; order-3's charge is pending.
            await write_back(store, other, "dead", error_code="attempts_exhausted")
            await write_back(store, void, "failed", error_code="provider_refused")
        assert flow_state(db_url, flow)[0] == "needs_operator"

        # Refusals name the rule.
        with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState) as running:
            cancel_flow(alice, flow, operator="alice", reason="again")
        assert running.value.diag.constraint_name == "flow_cancel_running_only"
        with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState) as alive:
            retry_step(alice, flow, 1, operator="alice", reason="try again")
        assert alive.value.diag.constraint_name == "flow_retry_step_dead_only"
        with pytest.raises(psycopg.errors.CheckViolation) as why:
            retry_step(alice, redo, 1, operator="alice", reason=" ")
        assert why.value.diag.constraint_name == "flow_operation_reason_given"

        # A dead step is re-driven under its own key by one operator; the flow waits again.
        retried = retry_step(alice, redo, 1, operator="alice", reason="provider was down")
        assert retried["state"] == "running"
        # A cancel that would refund (the charge may take effect) needs a second operator.
        with pytest.raises(ApprovalNeeded):
            cancel_flow(alice, charge, operator="alice", reason="duplicate order")
        assert flow_state(db_url, charge) == ("running", None)

        # The void was refused: alice releases the hold in the provider's dashboard, and
        # records it; bob approves from his own login.
        asked = run_cli("flows", "mark-compensated", str(flow), "1", "--reason",
                        "voided in dashboard", "--operator", "alice",
                        env={"RELAY_DATABASE_URL": alice})  # fmt: skip
        assert asked.returncode == 3, asked.stderr
        found_request = re.search(r"flows approve (\d+)", asked.stdout)
        assert found_request is not None, asked.stdout
        request = int(found_request[1])
        assert flow_state(db_url, flow)[0] == "needs_operator"
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as same:
            approve(alice, request, operator="carol")
        assert same.value.diag.constraint_name == "registry_approval_second_operator"
        approved = run_cli("flows", "approve", str(request), "--operator", "bob",
                           env={"RELAY_DATABASE_URL": bob})  # fmt: skip
        assert approved.returncode == 0, approved.stderr
        assert f"request {request} applied: mark_compensated on flow {flow}" in approved.stdout
    state, reason = flow_state(db_url, flow)
    assert state == "compensated" and reason == "cancelled by operator alice: customer called"
    with psycopg.connect(db_url) as conn:
        key = conn.execute(
            "SELECT count(DISTINCT idempotency_key), min(status) FROM outbox.payment_intents"
            " WHERE payment_id = 'order-2'"
        ).fetchone()
    assert key == (1, "pending")  # the same intent, the same key, due again
    found = find_flow(db_url, flow)
    assert found is not None
    assert found["steps"][0]["compensation_status"] == "marked_by_operator"
    assert found["steps"][0]["compensation_note"].startswith("marked compensated by operator bob")
    actors = [h["actor"] for h in found["history"]]
    assert "operator:alice" in actors and actors[-1] == "operator:bob"
    assert flow_events(db_url, flow) == [
        "flow.compensating", "flow.needs_operator", "flow.compensated"
    ]  # fmt: skip
    report = verify_database(db_url)
    assert report.intact, [b.describe() for b in report.breaks]


def test_duration_arguments() -> None:
    assert [duration_seconds(t) for t in ("7d", "36h", "1h30m", "600s", "1w")] == [
        604800,
        129600,
        5400,
        600,
        604800,
    ]
    for bad in ("", "7x", "d", "-5m", "3600"):
        with pytest.raises(argparse.ArgumentTypeError):
            duration_seconds(bad)


@pytest.mark.integration
def test_policy_commands_set_list_and_refuse_by_name(
    db_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("RELAY_DATABASE_URL", db_url)
    monkeypatch.setenv("RELAY_OPERATOR", "carol")
    assert cli_main(["flows", "policies"]) == 0
    assert "no policies" in capsys.readouterr().out
    assert cli_main(["flows", "policy", "giftco", "void", "--after", "1d", "--reason", "x"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"giftco\s+void\s+1d\s+0\s+carol", out), out
    # Below a minute: refused by the table's named check, nothing written.
    assert cli_main(["flows", "policy", "giftco", "off", "--after", "30s", "--reason", "y"]) == 1
    err = capsys.readouterr().err
    assert "authorization_policies_after_seconds_1_minute_to_366_days" in err
    assert "1m and 366d" in err
    assert cli_main(["flows", "policy", "stripe", "alert", "--after", "7d", "--reason", "z"]) == 0
    capsys.readouterr()
    assert cli_main(["flows", "policies", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["provider"], r["action"], r["after_seconds"]) for r in rows] == [
        ("giftco", "void", 86400),
        ("stripe", "alert", 604800),
    ]
    with psycopg.connect(db_url) as conn:
        audited = conn.execute(
            "SELECT entity_id, actor, reason FROM outbox.audit_log"
            " WHERE entity = 'authorization_policy' ORDER BY chain_seq, entity_id"
        ).fetchall()
    assert sorted(audited) == [("giftco", "operator:carol", "x"), ("stripe", "operator:carol", "z")]
    assert verify_database(db_url).breaks == []
