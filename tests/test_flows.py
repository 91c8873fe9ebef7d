"""Payment flows (sql/0072, docs/flows.md): started in the application's transaction,
advanced in the write-back's, compensated in reverse order exactly once.

The split-tender tests run a real in-process relay with two lanes (a gift-card provider
and a card provider, each an in-memory provider that counts effects per idempotency key).
The settling test drives write-backs through the relay's own Store, so it can hold a step
ambiguous for as long as it likes.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import anyio
import psycopg
import pytest
from psycopg.types.json import Jsonb

from provider_adapters.memory import MemoryProvider
from relay.domain.intents import WriteBack
from relay.domain.state_machine import PaymentSnapshot, PaymentState
from relay.finance.audit import verify_database
from relay.operations.flows import find_flow
from tests.login_roles import login_role
from tests.support.cli import run_cli
from tests.support.flows import (
    authorized_snapshot,
    claim_one,
    flow_by_key,
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
from tests.support.waiting import wait_until

pytestmark = pytest.mark.anyio

GIFT_DECLINED = "pm_card_chargeDeclined"


async def test_split_tender_card_declined_voids_the_gift_card_once(db_url: str) -> None:
    gift, card = MemoryProvider("giftco"), MemoryProvider("cardco")
    flow = start_flow(db_url, "order-1", split_tender(card_method=GIFT_DECLINED))
    relay = make_relay_with(db_url, {"giftco": gift, "cardco": card})
    await run_until_settled(db_url, [relay])

    state, reason = flow_state(db_url, flow)
    assert state == "compensated"
    assert reason is not None and "step 2 (authorize of payment order-1-card) failed" in reason
    assert flow_intents(db_url, flow) == [
        ("step", "authorize", "order-1-gift", "succeeded"),
        ("step", "authorize", "order-1-card", "failed"),
        ("compensation", "void", "order-1-gift", "succeeded"),
    ]
    # The gift card: one hold and one void, each applied once; the card: nothing.
    assert gift.effects.total() == 2 and set(gift.effects.values()) == {1}
    assert card.effects.total() == 0
    assert flow_events(db_url, flow) == ["flow.compensating", "flow.compensated"]
    report = verify_database(db_url)
    assert report.intact, [b.describe() for b in report.breaks]


async def test_split_tender_both_holding_captures_both_once_then_cancel_refunds_both(
    db_url: str,
) -> None:
    gift, card = MemoryProvider("giftco"), MemoryProvider("stripe")
    relay = make_relay_with(db_url, {"giftco": gift, "stripe": card})
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(recipe("split-tender"))  # type: ignore[arg-type]
    flow = flow_by_key(db_url, "order-1042")
    await run_until_settled(db_url, [relay])

    assert flow_state(db_url, flow) == ("completed", None)
    assert flow_intents(db_url, flow) == [
        ("step", "authorize", "order-1042-gift", "succeeded"),
        ("step", "authorize", "order-1042-card", "succeeded"),
        ("step", "capture", "order-1042-gift", "succeeded"),
        ("step", "capture", "order-1042-card", "succeeded"),
    ]
    assert gift.effects.total() == 2 and set(gift.effects.values()) == {1}
    assert card.effects.total() == 2 and set(card.effects.values()) == {1}
    assert flow_events(db_url, flow) == ["flow.completed"]
    with psycopg.connect(db_url) as conn:
        payload = conn.execute(
            "SELECT payload FROM outbox.events WHERE ordering_key = %s", (f"flow:{flow}",)
        ).fetchone()
    assert payload is not None
    assert [s["status"] for s in payload[0]["flow"]["steps"]] == ["succeeded"] * 4

    # The order is cancelled after capture: both payments are refunded, once each.
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(recipe("order-cancellation"))  # type: ignore[arg-type]
    cancel = flow_by_key(db_url, "order-1042-cancel")
    await run_until_settled(db_url, [make_relay_with(db_url, {"giftco": gift, "stripe": card})])
    assert flow_state(db_url, cancel) == ("completed", None)
    assert [(i[1], i[3]) for i in flow_intents(db_url, cancel)] == [("refund", "succeeded")] * 2
    assert gift.effects.total() == 3 and set(gift.effects.values()) == {1}
    assert card.effects.total() == 3 and set(card.effects.values()) == {1}
    with psycopg.connect(db_url) as conn:
        states = conn.execute("SELECT state FROM outbox.payments ORDER BY payment_id").fetchall()
    assert states == [("refunded",), ("refunded",)]
    report = verify_database(db_url)
    assert report.intact, [b.describe() for b in report.breaks]


async def test_an_ambiguous_step_is_settled_before_anything_is_compensated(db_url: str) -> None:
    flow = start_flow(db_url, "order-1", split_tender())
    async with open_store(db_url, "flows-test", pool_size=2) as store:
        gift = await claim_one(store, "giftco")
        card = await claim_one(store, "cardco")
        # The card is declined while the gift card's hold is in flight, then comes back
        # ambiguous (retried under the same key): the flow will compensate, but not yet.
        await write_back(store, card, "failed", error_code="card_declined")
        await write_back(store, gift, "pending", error_code="timeout")
        assert flow_state(db_url, flow)[0] == "compensating"
        assert [i[0] for i in flow_intents(db_url, flow)] == ["step", "step"]

        gift = await claim_one(store, "giftco")
        await write_back(store, gift, "succeeded", amount_applied_minor=500,
                         provider_reference="pi_x", payment=authorized_snapshot(500))  # fmt: skip
        # Settled with an effect: its void, once, and nothing for the declined card.
        assert flow_intents(db_url, flow)[2:] == [
            ("compensation", "void", "order-1-gift", "pending")
        ]
        void = await claim_one(store, "giftco")
        assert void.action == "void"
        # The void fails for good: the flow goes to an operator, with the reason.
        await write_back(store, void, "failed", error_code="provider_refused")
        state, reason = flow_state(db_url, flow)
        assert state == "needs_operator"
        assert reason is not None and "compensation of step 1 (void" in reason
        assert "provider_refused" in reason
        assert flow_events(db_url, flow) == ["flow.compensating", "flow.needs_operator"]
        assert len(flow_intents(db_url, flow)) == 3  # no second void
    report = verify_database(db_url)
    assert report.intact, [b.describe() for b in report.breaks]

    # The operator finds it, and sees the whole flow's context.
    env = {"RELAY_DATABASE_URL": db_url}
    listed = run_cli("flows", "list", "--state", "needs_operator", env=env)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines()[1].split()[:3] == [str(flow), "order-1", "needs_operator"]
    shown = run_cli("flows", "show", str(flow), env=env)
    assert shown.returncode == 0, shown.stderr
    assert f"flow {flow} (order-1): needs_operator" in shown.stdout
    assert "compensation of step 1 (void of payment order-1-gift) failed" in shown.stdout
    assert "void #" in shown.stdout  # the compensation's intent, by id
    found = find_flow(db_url, flow)  # what `flows show --json` prints
    assert found is not None
    assert [(s["status"], s["compensation_status"]) for s in found["steps"]] == [
        ("succeeded", "failed"),
        ("failed", None),
        ("skipped", None),
        ("skipped", None),
    ]
    history = found["history"]
    assert [h["operation"] for h in history] == ["insert"] + ["update"] * (len(history) - 1)
    assert history[-1]["changes"]["state"] == ["compensating", "needs_operator"]


MALFORMED: list[tuple[str, Any]] = [
    ("flows_steps_array_of_1_to_50", []),
    ("flows_steps_array_of_1_to_50", {"payment_id": "p"}),
    ("flow_steps_step_is_object", ["capture"]),
    ("flow_steps_known_fields", [{"payment_id": "p", "action": "capture", "currency": "EUR",
                                  "amount": 5}]),
    ("flow_steps_action_valid", [{"payment_id": "p", "action": "sell", "currency": "EUR"}]),
    ("flow_steps_depends_on_earlier_steps",
     [{"payment_id": "p", "action": "capture", "currency": "EUR", "depends_on": [1]}]),
    ("flow_steps_depends_on_step_numbers",
     [{"payment_id": "p", "action": "capture", "currency": "EUR", "depends_on": ["one"]}]),
    ("flow_steps_compensation_fits_action",
     [{"payment_id": "p", "action": "capture", "currency": "EUR", "compensation": "void"}]),
    ("flow_steps_amount_minor_integer",
     [{"payment_id": "p", "action": "authorize", "currency": "EUR", "amount_minor": 1.5,
       "payment_method": "pm_card_visa"}]),
    ("flow_steps_amount_minor_required_for_authorize_charge",
     [{"payment_id": "p", "action": "authorize", "currency": "EUR",
       "payment_method": "pm_card_visa"}]),
    ("flow_steps_currency_known", [{"payment_id": "p", "action": "capture", "currency": "XXY"}]),
    ("flow_steps_payment_consistent",
     [{"payment_id": "p", "action": "authorize", "provider": "a", "currency": "EUR",
       "amount_minor": 5, "payment_method": "pm_card_visa"},
      {"payment_id": "p", "action": "capture", "provider": "b", "currency": "EUR"}]),
    ("payment_intents_payment_id_no_control_characters",
     [{"payment_id": "p\u202eq", "action": "capture", "currency": "EUR"}]),
    ("payment_intents_traceparent_w3c",
     [{"payment_id": "p", "action": "capture", "currency": "EUR",
       "metadata": {"traceparent": "00-nope"}}]),
    ("flows_no_card_number",
     [{"payment_id": "p", "action": "authorize", "currency": "EUR", "amount_minor": 5,
       "payment_method": "4242424242424242"}]),
]  # fmt: skip


def test_malformed_flows_are_refused_by_name_and_leave_nothing(db_url: str) -> None:
    with psycopg.connect(db_url) as conn:
        for constraint, steps in MALFORMED:
            with pytest.raises(psycopg.errors.IntegrityError) as caught, conn.transaction():
                conn.execute("SELECT outbox.flow_start_v1('bad', %s)", (Jsonb(steps),))
            assert caught.value.diag.constraint_name == constraint, (constraint, steps)
            assert "4242424242424242" not in str(caught.value)
        # A first step refused by the intent INSERT's own rules refuses the whole flow.
        conn.execute(
            "INSERT INTO outbox.payment_intents (payment_id, action, provider, amount_minor,"
            " currency, payment_method) VALUES ('usd-pay', 'authorize', 'stripe', 5, 'USD',"
            " 'pm_card_visa')"
        )
        with pytest.raises(psycopg.errors.IntegrityError) as caught, conn.transaction():
            conn.execute(
                "SELECT outbox.flow_start_v1('bad', %s)",
                (Jsonb([{"payment_id": "usd-pay", "action": "capture", "currency": "EUR"}]),),
            )
        assert caught.value.diag.constraint_name == "payment_intents_currency_matches_payment"
        # The same flow key twice: the application's retry of a committed start is refused.
        conn.execute("SELECT outbox.flow_start_v1('once', %s)", (Jsonb(split_tender()),))
        with pytest.raises(psycopg.errors.UniqueViolation) as dup, conn.transaction():
            conn.execute("SELECT outbox.flow_start_v1('once', %s)", (Jsonb(split_tender()),))
        assert dup.value.diag.constraint_name == "flows_flow_key_unique"
        counts = conn.execute(
            "SELECT (SELECT count(*) FROM outbox.flows), (SELECT count(*) FROM outbox.flow_steps),"
            " (SELECT count(*) FROM outbox.payment_intents)"
        ).fetchone()
    assert counts == (1, 4, 3)

    # An application's login starts flows and reads them; it cannot advance one itself.
    with login_role(db_url, "outbox_app") as app_url, psycopg.connect(app_url) as app:
        started = app.execute(
            "SELECT outbox.flow_start_v1('as-app', %s)",
            (
                Jsonb(
                    [
                        {
                            "payment_id": "app-pay",
                            "action": "capture",
                            "provider": "stripe",
                            "currency": "EUR",
                        }
                    ]
                ),
            ),
        ).fetchone()
        assert started is not None
        created_by = app.execute(
            "SELECT created_by FROM outbox.flows WHERE id = %s", (started[0],)
        ).fetchone()
        assert created_by == (f"db:{app.info.user}",)
        app.commit()
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            app.execute("SELECT outbox.flow_advance(%s)", (started[0],))


async def test_two_steps_settling_at_once_in_two_transactions_start_the_next_steps_once(
    db_url: str,
) -> None:
    """The flow's row lock orders the two write-backs: the second, once granted the lock,
    sees the first's committed outcome (a fresh snapshot), so neither misses the advance."""
    flow = start_flow(db_url, "order-1", split_tender())
    async with open_store(db_url, "flows-test", pool_size=3) as store:
        gift = await claim_one(store, "giftco")
        card = await claim_one(store, "cardco")
        first = await psycopg.AsyncConnection.connect(db_url)  # its transaction, held open
        try:
            await store.complete_in(first, [WriteBack(gift.id, gift.lease_token,
                gift.payment_id, "succeeded", amount_applied_minor=500,
                payment=authorized_snapshot(500))])  # fmt: skip
            async with anyio.create_task_group() as tg:
                tg.start_soon(
                    partial(
                        write_back, amount_applied_minor=1500, payment=authorized_snapshot(1500)
                    ),
                    store,
                    card,
                    "succeeded",
                )

                def second_waits() -> bool:
                    with psycopg.connect(db_url) as conn:
                        row = conn.execute(
                            "SELECT count(*) FROM pg_stat_activity"
                            " WHERE datname = current_database() AND wait_event_type = 'Lock'"
                        ).fetchone()
                    return row is not None and row[0] == 1

                async def waits() -> bool:
                    return await anyio.to_thread.run_sync(second_waits)

                await wait_until(waits, "the second write-back waits for the flow's lock")
                # Neither has seen both outcomes yet: nothing started.
                assert len(flow_intents(db_url, flow)) == 2
                await first.commit()  # the second goes on, and sees this outcome
        finally:
            await first.close()
    assert flow_intents(db_url, flow)[2:] == [
        ("step", "capture", "order-1-gift", "pending"),
        ("step", "capture", "order-1-card", "pending"),
    ]
    assert flow_state(db_url, flow)[0] == "running"


async def test_a_dead_step_waits_for_the_operator_and_a_dead_compensation_can_be_redriven(
    db_url: str,
) -> None:
    flow = start_flow(db_url, "order-1", split_tender())
    async with open_store(db_url, "flows-test", pool_size=2) as store:
        gift = await claim_one(store, "giftco")
        card = await claim_one(store, "cardco")
        await write_back(store, card, "succeeded", amount_applied_minor=1500,
                         payment=authorized_snapshot(1500))  # fmt: skip
        # Attempts exhausted on ambiguous replies: its effect is unknown, the flow waits.
        await write_back(store, gift, "dead", error_code="attempts_exhausted")
        assert flow_state(db_url, flow) == ("running", None)
        assert len(flow_intents(db_url, flow)) == 2
        # The operator gives up on it (the janitor found no effect): the flow compensates.
        with psycopg.connect(db_url) as conn:
            conn.execute("SELECT outbox.cancel_dead_intents(ARRAY[%s]::bigint[], 'alice')",
                         (gift.id,))  # fmt: skip
        assert flow_state(db_url, flow)[0] == "compensating"
        void = await claim_one(store, "cardco")
        assert (void.action, void.payment_id) == ("void", "order-1-card")
        await write_back(store, void, "dead", error_code="attempts_exhausted")
        state, reason = flow_state(db_url, flow)
        assert state == "needs_operator" and reason is not None and "is dead" in reason
        # Re-driven under the same key, it succeeds: the flow finishes undoing.
        with psycopg.connect(db_url) as conn:
            conn.execute(
                "SELECT * FROM outbox.retry_dead_intents(ARRAY[%s]::bigint[], 'alice')", (void.id,)
            )
        again = await claim_one(store, "cardco")
        assert (again.id, again.idempotency_key) == (void.id, void.idempotency_key)
        await write_back(store, again, "succeeded", amount_applied_minor=1500,
                         payment=PaymentSnapshot(PaymentState.VOIDED, "EUR", authorized_minor=1500))  # fmt: skip
    state, reason = flow_state(db_url, flow)
    assert state == "compensated"
    assert reason is not None and "step 1 (authorize of payment order-1-gift) failed" in reason
    assert "cancelled_by_operator" in reason
    assert flow_events(db_url, flow) == [
        "flow.compensating", "flow.needs_operator", "flow.compensated"
    ]  # fmt: skip
    assert len(flow_intents(db_url, flow)) == 3
    report = verify_database(db_url)
    assert report.intact, [b.describe() for b in report.breaks]


async def test_a_step_not_yet_sent_when_the_flow_compensates_is_never_sent(db_url: str) -> None:
    """A capture declined while the other capture waits unsent: the other is withdrawn
    (failed, never sent), and both authorisations are voided, the later step's first."""
    flow = start_flow(db_url, "order-1", split_tender())
    async with open_store(db_url, "flows-test", pool_size=2) as store:
        for provider, amount in (("giftco", 500), ("cardco", 1500)):
            held = await claim_one(store, provider)
            await write_back(store, held, "succeeded", amount_applied_minor=amount,
                             payment=authorized_snapshot(amount))  # fmt: skip
        capture = await claim_one(store, "giftco")
        assert capture.action == "capture"
        await write_back(store, capture, "failed", error_code="capture_refused")
        assert flow_intents(db_url, flow)[2:] == [
            ("step", "capture", "order-1-gift", "failed"),
            ("step", "capture", "order-1-card", "failed"),
            ("compensation", "void", "order-1-card", "pending"),
        ]
        with psycopg.connect(db_url) as conn:
            withdrawn = conn.execute(
                "SELECT error_code, attempts FROM outbox.payment_intents"
                " WHERE payment_id = 'order-1-card' AND action = 'capture'"
            ).fetchone()
            event = conn.execute(
                "SELECT count(*) FROM outbox.events WHERE ordering_key = 'payment:order-1-card'"
                " AND event_type = 'payment.capture.failed'"
            ).fetchone()
        assert withdrawn == ("flow_compensating", 0) and event == (1,)
        for provider, amount in (("cardco", 1500), ("giftco", 500)):
            void = await claim_one(store, provider)
            assert void.action == "void"
            await write_back(store, void, "succeeded", amount_applied_minor=amount,
                             payment=PaymentSnapshot(PaymentState.VOIDED, "EUR",
                                                     authorized_minor=amount))  # fmt: skip
        assert await store.claim("cardco", 10, lease_seconds=60, instance="flows-test") == []
    assert flow_state(db_url, flow)[0] == "compensated"
    assert [i[:2] for i in flow_intents(db_url, flow)[4:]] == [
        ("compensation", "void"), ("compensation", "void")
    ]  # fmt: skip
    report = verify_database(db_url)
    assert report.intact, [b.describe() for b in report.breaks]
