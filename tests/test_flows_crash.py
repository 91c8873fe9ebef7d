"""Crash test of payment flows (issue 21, docs/flows.md): real relays SIGKILLed throughout.

Two fake Stripe processes stand for two providers (``stripe`` for the card, ``giftco`` for
the gift card), each injecting 429, 503, timeout-after-effect, 500-after-effect and
malformed replies. Split-tender flows arrive in waves (some declined on either tender, some
only holding both, some capturing both, some refused a capture of more than the gift card
holds); once a flow marked for cancellation completes, its order-cancellation flow
(docs/flows.md's recipe) starts: it refunds what was captured and voids what is held.
Meanwhile three relay processes are SIGKILLed and restarted at random.

Then: every flow ends in the state its inputs call for (``completed`` or ``compensated``;
a ``needs_operator`` flow must say why), with one result event per transition; every
intent is terminal, every succeeded intent has exactly one effect at its provider with the
same amount and none other has any; each compensation key has at most one effect, and one
only where its step's own key has one; no compensated flow leaves money held; the ledger
balances and the audit trail verifies.

Lean for CI: 160 split tenders and their cancellations (some 210 flows, 650 intents)
on short leases and back-offs. The chaos is counted in kills, never in seconds.
"""

from __future__ import annotations

import os
import random
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from tests.invariants import assert_audit_intact, assert_exactly_once, assert_ledger_balanced
from tests.processes import FakeProviderProcess, RelayProcess
from tests.support.waiting import block_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RELAYS = 3
SPLIT_TENDERS = 160
WAVES = 5
MIN_KILLS = 8
DECLINED = "pm_card_chargeDeclined"
APPROVED = "pm_card_visa"
FAULT_FLAGS = (
    "--latency-ms", "5",
    "--rate-429", "0.03",
    "--rate-503", "0.03",
    "--rate-timeout-after-effect", "0.03",
    "--rate-500-after-effect", "0.03",
    "--rate-malformed", "0.02",
    "--timeout-seconds", "1.5",
)  # fmt: skip
# What each kind of split tender does: its card and gift card methods, whether it captures
# once both hold, whether an order cancellation follows it, and the state it must end in.
KINDS: dict[str, tuple[str, str, bool, bool, str]] = {
    "capture": (APPROVED, APPROVED, True, False, "completed"),
    "capture-cancel": (APPROVED, APPROVED, True, True, "completed"),
    "hold-cancel": (APPROVED, APPROVED, False, True, "completed"),
    "card-declined": (DECLINED, APPROVED, True, False, "compensated"),
    "gift-declined": (APPROVED, DECLINED, True, False, "compensated"),
    "both-declined": (DECLINED, DECLINED, True, False, "compensated"),
    # The gift card's capture asks for more than it holds (the state machine refuses it)
    # while the card's capture is unsent, in flight or done: withdrawn, or refunded.
    "capture-refused": (APPROVED, APPROVED, True, False, "compensated"),
}
WEIGHTS = (20, 18, 16, 14, 14, 6, 12)
# Each payment's possible states at the end, by kind: (gift card, card). A declined
# authorisation leaves its payment without an authorisation ('failed').
FINAL_PAYMENTS: dict[str, tuple[set[str], set[str]]] = {
    "capture": ({"captured"}, {"captured"}),
    "capture-cancel": ({"refunded"}, {"refunded"}),
    "hold-cancel": ({"voided"}, {"voided"}),
    "card-declined": ({"voided"}, {"failed"}),
    "gift-declined": ({"failed"}, {"voided"}),
    "both-declined": ({"failed"}, {"failed"}),
    # The card's capture withdrawn unsent (its hold voided) or taken (then refunded).
    "capture-refused": ({"voided"}, {"voided", "refunded"}),
}


@dataclass(frozen=True)
class Tender:
    n: int
    kind: str
    gift_minor: int
    card_minor: int

    @property
    def key(self) -> str:
        return f"order-{self.n}"

    @property
    def gift(self) -> str:
        return f"order-{self.n}-gift"

    @property
    def card(self) -> str:
        return f"order-{self.n}-card"

    def steps(self) -> list[dict[str, Any]]:
        card_method, gift_method, captures, _, _ = KINDS[self.kind]
        steps: list[dict[str, Any]] = [
            {"payment_id": self.gift, "action": "authorize", "provider": "giftco",
             "amount_minor": self.gift_minor, "currency": "EUR", "payment_method": gift_method},
            {"payment_id": self.card, "action": "authorize", "provider": "stripe",
             "amount_minor": self.card_minor, "currency": "EUR", "payment_method": card_method},
        ]  # fmt: skip
        if captures:
            steps += [
                {"payment_id": p, "action": "capture", "currency": "EUR", "depends_on": [1, 2]}
                for p in (self.gift, self.card)
            ]
        if self.kind == "capture-refused":
            steps[2]["amount_minor"] = self.gift_minor + 1
        return steps


def tenders(rng: random.Random) -> list[Tender]:
    kinds = rng.choices(list(KINDS), weights=WEIGHTS, k=SPLIT_TENDERS)
    return [
        Tender(n, kind, rng.randint(100, 5_000), rng.randint(100, 50_000))
        for n, kind in enumerate(kinds)
    ]


# docs/flows.md's order-cancellation recipe, for one order's two payments.
CANCEL = """
SELECT outbox.flow_start_v1(
    %(key)s,
    (SELECT jsonb_agg(jsonb_build_object(
                'payment_id', p.payment_id,
                'action', CASE WHEN p.state = 'authorized' THEN 'void' ELSE 'refund' END,
                'currency', p.currency,
                'compensation', 'none') ORDER BY p.payment_id)
     FROM outbox.payments AS p
     WHERE p.payment_id = ANY (%(payments)s)
       AND p.state IN ('authorized', 'captured', 'partially_refunded')),
    '{"why": "customer cancelled"}')
"""


def start_split_tenders(db_url: str, wave: list[Tender]) -> None:
    with psycopg.connect(db_url) as conn:
        for tender in wave:
            conn.execute("SELECT outbox.flow_start_v1(%s, %s)", (tender.key, Jsonb(tender.steps())))


def start_due_cancellations(db_url: str, pending: dict[str, Tender]) -> None:
    """Start the cancellation of every order in ``pending`` whose flow has completed, and
    drop it from ``pending``: the application cancels an order it knows is settled. (A flow
    that ended otherwise is dropped uncancelled; the checks at the end name it.)"""
    if not pending:
        return
    with psycopg.connect(db_url) as conn:
        done = conn.execute(
            "SELECT flow_key, state FROM outbox.flows WHERE flow_key = ANY (%s)"
            " AND state IN ('completed', 'compensated', 'needs_operator')",
            (list(pending),),
        ).fetchall()
        for key, state in done:
            tender = pending.pop(key)
            if state == "completed":
                conn.execute(
                    CANCEL, {"key": f"{key}-cancel", "payments": [tender.gift, tender.card]}
                )


def open_flows(db_url: str) -> int:
    with psycopg.connect(db_url) as conn:
        row = conn.execute(
            "SELECT (SELECT count(*) FROM outbox.flows"
            "        WHERE state NOT IN ('completed', 'compensated', 'needs_operator'))"
            "     + (SELECT count(*) FROM outbox.payment_intents"
            "        WHERE status NOT IN ('succeeded', 'failed', 'dead'))"
        ).fetchone()
    assert row is not None
    return int(row[0])


def test_sigkilled_relays_finish_or_undo_every_flow_exactly_once(
    db_url: str, tmp_path: Path
) -> None:
    rng = random.Random(int(os.environ.get("RELAY_TEST_SEED", "20261207")))
    orders = tenders(rng)
    card_fake = FakeProviderProcess(tmp_path, "--seed", "21", *FAULT_FLAGS)
    gift_fake = FakeProviderProcess(tmp_path, "--seed", "22", *FAULT_FLAGS)
    env = {
        "RELAY_DATABASE_URL": db_url,
        "RELAY_PROVIDERS__STRIPE__API_KEY": "sk_test_flows_crash",
        "RELAY_PROVIDERS__STRIPE__BASE_URL": card_fake.url,
        "RELAY_PROVIDERS__GIFTCO__KIND": "stripe",
        "RELAY_PROVIDERS__GIFTCO__API_KEY": "sk_test_flows_crash_gift",
        "RELAY_PROVIDERS__GIFTCO__BASE_URL": gift_fake.url,
        "RELAY_LEASE_SECONDS": "4",
        "RELAY_MAX_ATTEMPTS": "30",
        "RELAY_BACKOFF_BASE_SECONDS": "0.05",
        "RELAY_BACKOFF_CAP_SECONDS": "0.5",
        "RELAY_POLL_INTERVAL_SECONDS": "0.1",
        "RELAY_POLL_MAX_INTERVAL_SECONDS": "0.3",
        "RELAY_SHUTDOWN_GRACE_SECONDS": "5",
        "RELAY_DB_POOL_SIZE": "4",
        # Should a step die after all, the janitor settles it soon (the flow waits for it).
        "RELAY_JANITOR_INTERVAL_SECONDS": "1",
        "RELAY_JANITOR_BACKOFF_BASE_SECONDS": "0.5",
        "RELAY_JANITOR_BACKOFF_CAP_SECONDS": "2",
        "RELAY_LOG_FORMAT": "json",
    }
    for lane in ("STRIPE", "GIFTCO"):
        env |= {
            f"RELAY_PROVIDERS__{lane}__TIMEOUT_MS": "1000",
            f"RELAY_PROVIDERS__{lane}__CONNECT_TIMEOUT_MS": "500",
            f"RELAY_PROVIDERS__{lane}__CONCURRENCY": "16",
            f"RELAY_PROVIDERS__{lane}__BREAKER_FAILURE_THRESHOLD": "10",
            f"RELAY_PROVIDERS__{lane}__BREAKER_COOLDOWN_SECONDS": "0.5",
        }
    relays = [RelayProcess(f"flows-relay-{n}", env, tmp_path) for n in range(RELAYS)]
    waves = [orders[i::WAVES] for i in range(WAVES)]
    to_cancel = {t.key: t for t in orders if KINDS[t.kind][3]}
    started = time.monotonic()
    try:
        for relay in relays:
            relay.start()
        # Kill until every wave is in, every cancellation started and enough kills landed.
        # Only a relay at work is killed (a start takes seconds of imports on a loaded
        # machine), and only while another one works: the flows move on between kills.
        while waves or to_cancel or sum(r.kills for r in relays) < MIN_KILLS:
            if waves:
                start_split_tenders(db_url, waves.pop(0))
            start_due_cancellations(db_url, to_cancel)
            working = [relay for relay in relays if relay.ready()]
            if len(working) >= 2:
                victim = rng.choice(working)
                victim.kill()
                time.sleep(rng.uniform(0.05, 0.3))
                victim.start()
            time.sleep(rng.uniform(0.3, 1.0))
        block_until(lambda: open_flows(db_url) == 0, "every flow and intent finished", every=0.3)
        for relay in relays:
            relay.wait_ready()
        exit_codes = [relay.terminate() for relay in relays]
        card_effects, gift_effects = card_fake.effects(), gift_fake.effects()
    finally:
        for relay in relays:
            relay.kill()
        card_fake.stop()
        gift_fake.stop()

    kills = sum(relay.kills for relay in relays)
    assert exit_codes == [0] * RELAYS, "SIGTERM drains and exits 0"
    faults: Counter[str] = Counter()
    for reply in (card_effects, gift_effects):
        injected: dict[str, int] = reply["faults_injected"]  # type: ignore[assignment]
        faults.update(injected)
    assert faults["timeout_after_effect"] > 0 and faults["500_after_effect"] > 0, faults

    # The two providers' effects, by idempotency key (a flow's keys are unique).
    card_by_key: dict[str, Any] = card_effects["effects_by_key"]  # type: ignore[assignment]
    gift_by_key: dict[str, Any] = gift_effects["effects_by_key"]  # type: ignore[assignment]
    assert set(card_by_key).isdisjoint(gift_by_key)
    by_key = {**card_by_key, **gift_by_key}

    with psycopg.connect(db_url) as conn:
        flows = {
            key: (state, reason, events)
            for key, state, reason, events in conn.execute(
                "SELECT f.flow_key, f.state, f.reason, array(SELECT e.event_type"
                "  FROM outbox.events AS e WHERE e.ordering_key = 'flow:' || f.id ORDER BY e.seq)"
                " FROM outbox.flows AS f"
            ).fetchall()
        }
        intent_count = conn.execute("SELECT count(*) FROM outbox.payment_intents").fetchone()
        # Every intent of a flow against the provider's record of its key.
        applied = conn.execute(
            "SELECT i.idempotency_key, i.action, i.status, i.amount_applied_minor"
            " FROM outbox.payment_intents AS i WHERE i.status = 'succeeded'"
        ).fetchall()
        steps = conn.execute(
            "SELECT f.flow_key, f.state, s.seq, s.status, s.compensation_status,"
            "       outbox.flow_idempotency_key(f.id, s.seq, 'step'),"
            "       outbox.flow_idempotency_key(f.id, s.seq, 'compensation'),"
            "       s.compensation_intent_id, c.status"
            " FROM outbox.flow_steps AS s JOIN outbox.flows AS f ON f.id = s.flow_id"
            " LEFT JOIN outbox.payment_intents AS c ON c.id = s.compensation_intent_id"
        ).fetchall()
        withdrawn = conn.execute(
            "SELECT count(*) FROM outbox.payment_intents WHERE error_code = 'flow_compensating'"
        ).fetchone()
        payments: dict[str, str] = dict(
            conn.execute("SELECT payment_id, state FROM outbox.payments").fetchall()
        )

    # Every flow: its expected end, reached through one event per transition.
    cancels = [t for t in orders if KINDS[t.kind][3]]
    assert len(flows) == len(orders) + len(cancels), "every flow and cancellation started once"
    wrong: list[tuple[Any, ...]] = []
    for tender in orders:
        expected = KINDS[tender.kind][4]
        state, reason, events = flows[tender.key]
        want = [["flow.completed"]] if expected == "completed" else [
            ["flow.compensating", "flow.compensated"]
        ]  # fmt: skip
        if tender.kind == "both-declined":
            # Both declines written back in one batch: nothing to undo, straight there.
            want.append(["flow.compensated"])
        has_reason = reason is not None
        if state != expected or events not in want or has_reason != (state == "compensated"):
            wrong.append((tender.key, tender.kind, state, reason, events))
    for tender in cancels:
        state, reason, events = flows[f"{tender.key}-cancel"]
        if (state, reason, events) != ("completed", None, ["flow.completed"]):
            wrong.append((f"{tender.key}-cancel", state, reason, events))
    silent = [
        k for k, (state, reason, _) in flows.items() if state == "needs_operator" and not reason
    ]
    assert silent == [], "a flow left to the operator says why"
    assert wrong == [], "every flow ends as its inputs call for, one event per transition"

    # Provider effects and the database agree: one effect per succeeded intent, none for
    # the others, with the amount the intent recorded.
    assert intent_count is not None
    assert_exactly_once(db_url, {"effects_by_key": by_key}, expected_intents=intent_count[0])
    mismatched = [
        (key, action, amount, by_key[key]["kinds"], by_key[key]["amount"])
        for key, action, _, amount in applied
        if by_key[key]["kinds"] != [action]
        or (amount is not None and amount != by_key[key]["amount"])
    ]
    assert mismatched == [], "each effect is the intent's action, for the amount it recorded"

    # Compensations: at most one effect per compensation key, one only for a step whose
    # own key has an effect, and every effect of a compensated flow undone.
    twice: list[tuple[Any, ...]] = []
    without_effect: list[tuple[Any, ...]] = []
    left_standing: list[tuple[Any, ...]] = []
    for (
        flow_key,
        flow_state,
        seq,
        status,
        comp_status,
        step_key,
        comp_key,
        comp_id,
        comp_intent,
    ) in steps:
        step_effects = by_key.get(step_key, {}).get("count", 0)
        comp_effects = by_key.get(comp_key, {}).get("count", 0)
        if comp_effects > 1:
            twice.append((flow_key, seq, comp_effects))
        if comp_effects and not step_effects:
            without_effect.append((flow_key, seq, status))
        if comp_id is not None and not step_effects:
            without_effect.append((flow_key, seq, status, "compensation inserted"))
        if (
            flow_state == "compensated"
            and step_effects
            and comp_status not in ("succeeded", "not_needed")
        ):
            left_standing.append((flow_key, seq, comp_status, comp_intent))
        if comp_status == "succeeded" and comp_effects != 1:
            left_standing.append((flow_key, seq, comp_status, comp_effects))
    assert twice == [], "no compensation runs twice"
    assert without_effect == [], "no compensation for a step without an effect"
    assert left_standing == [], "a compensated flow undid every effect, once"
    wrong_payments = [
        (t.key, t.kind, (payments.get(t.gift), payments.get(t.card)), FINAL_PAYMENTS[t.kind])
        for t in orders
        if not all(
            payments.get(p, "failed") in allowed
            for p, allowed in zip((t.gift, t.card), FINAL_PAYMENTS[t.kind], strict=True)
        )
    ]
    assert wrong_payments == [], "no money held or taken that the flows did not leave"

    assert_ledger_balanced(db_url)
    assert_audit_intact(db_url)
    outcomes = Counter(state for state, _, _ in flows.values())
    print(
        f"\nflows crash test: {len(flows)} flows {dict(outcomes)}, {intent_count[0]} intents, "
        f"{withdrawn[0] if withdrawn else 0} withdrawn unsent, "
        f"{kills} SIGKILLs, faults {dict(faults)}, "
        f"{time.monotonic() - started:.0f} s on this machine (not a limit)"
    )
