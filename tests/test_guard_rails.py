"""Guard rails of canary splits (sql/0067): the pure comparison (relay/domain/guard_rails.py),
and one relay that rolls a declining (or timing-out) canary back by itself (relay/service/guard_rails.py).

The integration test runs a relay in-process with two lanes around in-memory providers on a
50/50 split; the canary starts declining (or timing out); the relay's guard-rail task sets its weight to 0,
the audit trail holds the comparison as the reason (actor relay:<instance>), an event and
the status say so, every new payment goes to the baseline, and a payment already started
on the canary keeps it. A relay that reaches the verdict late writes nothing; an operator's raise starts a clean window.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from datetime import datetime, timedelta

import anyio
import psycopg
import pytest
from prometheus_client import REGISTRY

from provider_adapters.base import Action, Ambiguous, Command, Declined, Outcome
from provider_adapters.memory import MemoryProvider
from relay.cli.main import main as cli_main
from relay.cli.providers import parse_percent_bp
from relay.cli.status import render_status
from relay.core.lanes import BreakerSettings, Lane
from relay.core.store import Store
from relay.domain.guard_rails import (
    GuardRail,
    SideCounts,
    classify,
    evaluate,
    format_bp,
    rate_bp,
)
from relay.domain.intents import WriteBack
from relay.infra.db import Database
from relay.operations.providers import list_guards, list_rules, set_guard, set_rule, set_weights
from relay.operations.status import collect_status
from relay.service.guard_rails import GuardRails, code_class
from tests.support.intents import payments_by_provider, register_provider
from tests.support.relays import relay_with_lanes, running, settled
from tests.support.waiting import wait_until

# -- the pure comparison ---------------------------------------------------------------


def _guard(**kw: object) -> GuardRail:
    spec: dict[str, object] = {
        "rule": "main",
        "canary": "new",
        "baseline": "old",
        "min_samples": 100,
        "failure_margin_bp": 500,
    }
    spec.update(kw)
    return GuardRail(**spec)  # type: ignore[arg-type]


def test_classes_follow_status_and_the_catalogue() -> None:
    assert classify("succeeded", None, None) == "succeeded"
    assert classify("awaiting_confirmation", "awaiting_confirmation", None) == "succeeded"
    assert classify("failed", "card_declined", "declined") == "declined"
    assert classify("dead", "authentication_failed", "invalid") == "error"
    assert classify("dead", "provider_timeout", "ambiguous") == "ambiguous"
    assert classify("pending", "provider_timeout", "ambiguous") == "ambiguous"
    assert classify("pending", "rate_limited", "retryable") == "error"
    assert classify("in_flight", "mystery", None) == "error"  # uncatalogued: an error
    assert classify("pending", None, None) is None  # not tried yet: no sample
    assert classify("blocked", None, None) is None
    assert classify("some_later_status", "card_declined", "declined") is None
    # The relay's lookup of the class: the catalogue's rows, shared (*) and per kind.
    assert code_class("stripe", "provider_timeout") == "ambiguous"
    assert code_class("stripe", "rate_limited") == "retryable"
    assert code_class("stripe", "no_such_code_anywhere") is None
    assert code_class("stripe", None) is None


def test_not_enough_samples_never_rolls_back() -> None:
    canary = SideCounts("new", succeeded=10, declined=89)  # 99 samples, 90 % failing
    baseline = SideCounts("old", succeeded=1000)
    verdict = evaluate(_guard(), canary, baseline)
    assert not verdict.rollback and not verdict.enough_samples
    assert "not enough samples yet (new 99" in verdict.reason
    verdict = evaluate(_guard(), SideCounts("new", succeeded=200), SideCounts("old", errors=99))
    assert not verdict.rollback and "old 99" in verdict.reason


def test_failure_margin_is_exact_at_the_boundary() -> None:
    # Baseline 10.00 % failures; margin 5.00 %: 15.00 % is within, one more failure is worse.
    baseline = SideCounts("old", succeeded=900, declined=60, errors=40)
    at_margin = SideCounts("new", succeeded=850, declined=150)
    assert not evaluate(_guard(), at_margin, baseline).rollback
    over = SideCounts("new", succeeded=849, declined=100, errors=51)
    verdict = evaluate(_guard(), over, baseline)
    assert verdict.rollback and verdict.enough_samples
    assert verdict.reason.startswith(
        "guard rail main: canary new worse than baseline old, rolled back to 0: failures "
        "15.10% (151/1000) on new vs 10.00% (100/1000) on old, margin 5.00%: WORSE"
    )
    (failures,) = verdict.comparisons
    assert (failures.measure, failures.canary, failures.baseline, failures.margin) == (
        "failures",
        1510,
        1000,
        500,
    )


def test_rates_compare_across_unequal_sample_sizes_without_rounding() -> None:
    # 1/3 against 0/7 with a margin of 33.33 %: 33.333... % exceeds it, exactly.
    guard = _guard(min_samples=3, failure_margin_bp=3333)
    assert evaluate(
        guard, SideCounts("new", succeeded=2, declined=1), SideCounts("old", succeeded=7)
    ).rollback
    guard = _guard(min_samples=3, failure_margin_bp=3334)
    assert not evaluate(
        guard, SideCounts("new", succeeded=2, declined=1), SideCounts("old", succeeded=7)
    ).rollback


def test_ambiguous_and_latency_margins() -> None:
    guard = _guard(
        failure_margin_bp=None, ambiguous_margin_bp=200, latency_margin_ms=250, min_samples=10
    )
    baseline = SideCounts("old", succeeded=98, ambiguous=2, latency_ms=400)
    fine = SideCounts("new", succeeded=96, ambiguous=4, declined=0, latency_ms=650)
    verdict = evaluate(guard, fine, baseline)
    assert not verdict.rollback
    assert "within its margins" in verdict.reason and "p95 latency 650 ms" in verdict.reason
    timing_out = SideCounts("new", succeeded=90, ambiguous=10, latency_ms=400)
    verdict = evaluate(guard, timing_out, baseline)
    assert verdict.rollback and "ambiguous 10.00% (10/100)" in verdict.reason
    assert "latency" not in verdict.reason  # only the measures that were worse
    slow = SideCounts("new", succeeded=100, latency_ms=651)
    verdict = evaluate(guard, slow, baseline)
    assert verdict.rollback and "p95 latency 651 ms on new vs 400 ms on old" in verdict.reason
    # No latency figure on a side (nothing finished): latency is not compared.
    assert not evaluate(guard, SideCounts("new", succeeded=100), baseline).rollback
    # Failures are not compared when their margin is unset, however bad.
    assert not evaluate(guard, SideCounts("new", declined=100), baseline).rollback


def test_guard_and_side_arithmetic() -> None:
    side = SideCounts.tally(
        "new", [("succeeded", 5), ("declined", 2), (None, 9), ("error", 1), ("ambiguous", 3)], 12
    )
    assert (side.samples, side.failures, side.ambiguous, side.latency_ms) == (11, 3, 3, 12)
    assert rate_bp(1, 3) == 3333 and rate_bp(0, 0) == 0
    assert format_bp(1234) == "12.34%" and format_bp(5) == "0.05%" and format_bp(10000) == "100.00%"
    for bad in (
        {"canary": "old"},
        {"min_samples": 0},
        {"failure_margin_bp": 10001},
        {"latency_margin_ms": -1},
        {"latency_percentile": 100},
    ):
        with pytest.raises(ValueError):
            _guard(**bad)


def test_margins_parse_as_text_to_basis_points() -> None:
    assert parse_percent_bp("5") == 500
    assert parse_percent_bp("2.5%") == 250
    assert parse_percent_bp("0.25") == 25
    assert parse_percent_bp("100") == 10_000
    for bad in ("1.234", "-1", "abc", "101", "5.", ".5"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_percent_bp(bad)


# -- one relay rolls a failing canary back -------------------------------------------


@dataclass
class SwitchableProvider(MemoryProvider):
    """The in-memory provider; once ``failing`` is set, every authorisation is declined
    (``declines``) or times out (``times_out``: ambiguous, retried under the same key)."""

    failing: str | None = None

    async def execute(self, command: Command) -> Outcome:
        if self.failing and command.action in (Action.AUTHORIZE, Action.CHARGE):
            self.calls += 1
            if self.failing == "declines":
                return Declined("card_declined", "the canary declines everything")
            return Ambiguous("provider_timeout", "the canary does not answer in time")
        return await super().execute(command)


CLOSED = BreakerSettings(failure_threshold=1_000_000)

ROUTED = (
    "INSERT INTO outbox.payment_intents (payment_id, action, amount_minor, currency,"
    " payment_method) VALUES (%s, 'authorize', 1000, 'EUR', 'pm_card_visa')"
)


def _guarded_canary(conn: psycopg.Connection, **guard: object) -> None:
    """Providers stripe and canary, rule ``main`` splitting 50/50 between them, and a guard
    of the canary against stripe with the given fields (alice sets both)."""
    register_provider(conn, "stripe")
    register_provider(conn, "canary")
    set_rule(
        conn,
        operator="alice",
        name="main",
        fields={"mode": "split", "providers": ["stripe", "canary"], "weights": [50, 50]},
        reason="canary 50%",
        create=True,
    )
    set_guard(
        conn,
        operator="alice",
        rule="main",
        fields={"canary": "canary", "baseline": "stripe", **guard},
        reason="guard the canary",
    )


def _insert(conn: psycopg.Connection, prefix: str, n: int) -> None:
    with conn.transaction():
        for k in range(n):
            conn.execute(ROUTED, (f"{prefix}-{k}",))


def _metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _rollbacks() -> float:
    return _metric("outbox_relay_guard_rail_rollbacks_total", rule="main", canary="canary")


@pytest.mark.integration
@pytest.mark.anyio
@pytest.mark.parametrize(
    ("failing", "margin", "measure"),
    [
        ("declines", "failure_margin_bp", "failures"),
        ("times_out", "ambiguous_margin_bp", "ambiguous"),
    ],
)
async def test_relay_rolls_a_failing_canary_back(
    db_url: str, failing: str, margin: str, measure: str
) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        _guarded_canary(conn, window_seconds=600, min_samples=10, **{margin: 2000})
        baseline, canary = MemoryProvider(name="stripe"), SwitchableProvider(name="canary")
        lanes = {
            # A breaker that stays closed: the timing-out canary's retries run back to back.
            name: Lane(name, adapter, concurrency=8, timeout_seconds=5.0, breaker=CLOSED)
            for name, adapter in (("stripe", baseline), ("canary", canary))
        }
        relay = relay_with_lanes(db_url, lanes, instance="guard-test", seed=3)
        guard = GuardRails(relay.db, instance="guard-test", interval_seconds=0.05)
        before = _rollbacks()

        def weights() -> list[int]:
            return next(r["weights"] for r in list_rules(conn) if r["name"] == "main")

        async with running(relay), anyio.create_task_group() as tg:
            tg.start_soon(guard.run)
            # Healthy: both sides succeed, the guard watches and does nothing.
            _insert(conn, "healthy", 40)
            await wait_until(lambda: settled(db_url), "the healthy payments finished")
            turns = guard.turns
            await wait_until(lambda: guard.turns >= turns + 2, "two more guard turns")
            assert weights() == [50, 50]
            started = conn.execute(
                "SELECT payment_id FROM outbox.payments WHERE provider = 'canary' LIMIT 1"
            ).fetchone()
            assert started is not None
            # The canary starts failing: the relay rolls it back by itself.
            canary.failing = failing
            _insert(conn, "declining", 40)
            await wait_until(lambda: weights() == [50, 0], "the canary rolled back")
            await wait_until(lambda: settled(db_url), "the declining payments finished")
            # Every new payment goes to the baseline; one already started keeps its provider.
            _insert(conn, "after", 30)
            conn.execute(
                "INSERT INTO outbox.payment_intents (payment_id, action, currency)"
                " VALUES (%s, 'capture', 'EUR')",
                (started[0],),
            )
            await wait_until(lambda: settled(db_url), "the payments after the rollback finished")
            turns = guard.turns  # one whole turn after all that, for the gauges below
            await wait_until(lambda: guard.turns >= turns + 2, "two more guard turns")
            tg.cancel_scope.cancel()

        assert payments_by_provider(conn, "after-") == {"stripe": 30}
        assert "canary" in payments_by_provider(conn, "declining-")  # those it had keep it
        assert payments_by_provider(conn, "healthy-").keys() == {"stripe", "canary"}
        capture = conn.execute(
            "SELECT provider, status FROM outbox.payment_intents"
            " WHERE payment_id = %s AND action = 'capture'",
            (started[0],),
        ).fetchone()
        assert capture == ("canary", "succeeded")
        assert _rollbacks() == before + 1
        # The comparison's gauges, from the same counts (after the rollback the window starts
        # at it: the canary has no sample left, the baseline the payments since).
        side = {"rule": "main", "side": "baseline", "provider": "stripe"}
        assert _metric("outbox_relay_guard_rail_samples", **side) > 0
        assert _metric("outbox_relay_guard_rail_canary_worse", rule="main") == 0

        # The audit trail: the rule's change by the relay, the comparison as the reason.
        actor, reason, before_doc, after_doc = conn.execute(
            "SELECT actor, reason, before, after FROM outbox.audit_log"
            " WHERE entity = 'routing_rule' AND entity_id = 'main'"
            " ORDER BY chain_seq DESC LIMIT 1"
        ).fetchone()  # type: ignore[misc]
        assert actor == "relay:guard-test"
        assert (before_doc["weights"], after_doc["weights"]) == ([50, 50], [50, 0])
        assert reason.startswith(
            "guard rail main: canary canary worse than baseline stripe, rolled back to 0: "
            + measure
        )
        assert "WORSE" in reason and "at least 10 samples a side" in reason
        (event,) = conn.execute(
            "SELECT payload FROM outbox.events WHERE routing_key = 'routing.guard_rail.rolled_back'"
        ).fetchall()
        assert event[0]["rule"] == "main" and event[0]["canary"] == "canary"
        assert event[0]["reason"] == reason and event[0]["comparison"][measure]["worse"]

        # A second relay that reaches the verdict late finds the canary at 0: nothing written.
        nothing = conn.execute(
            "SELECT (outbox.routing_guard_rollback_v1('second', 'main', 'canary', 'again')).id"
        ).fetchone()
        assert nothing == (None,)
        assert conn.execute(
            "SELECT count(*) FROM outbox.audit_log WHERE entity = 'routing_rule' AND actor LIKE 'relay:%'"
        ).fetchone() == (1,)

        # status and `routes guards` say which rule, when and why.
        (state,) = collect_status(db_url).guard_rails
        assert state.rolled_back and state.rolled_back_by == "relay:guard-test"
        assert state.rollback_reason == reason
        assert f"GUARD RAIL ROLLED BACK main: canary canary set to 0 at {state.rolled_back_at}" in (
            render_status(collect_status(db_url))
        )
        (listed,) = list_guards(conn)
        assert listed["canary_weight"] == 0 and listed["rolled_back_at"] is not None

        # Fixed and raised again by an operator: the failures before the rollback no longer
        # count, so the guard starts from a clean window instead of rolling back at once.
        set_weights(conn, operator="alice", name="main", weights={"canary": 50}, reason="fixed")
        again = GuardRails(Database(db_url, pool_size=1, name="again"), instance="again")
        await again.db.open()
        try:
            (turn,) = await again.evaluate_once()
        finally:
            await again.db.close()
        assert (turn.rolled_back, turn.verdict.enough_samples, turn.canary.samples) == (
            False,
            False,
            0,
        )
        assert weights() == [50, 50]


def _percentile_disc(values: list[int], percentile: int) -> int:
    """PostgreSQL's percentile_disc: the first value whose cumulative share reaches it."""
    ordered = sorted(values)
    return ordered[max(math.ceil(percentile / 100 * len(ordered)) - 1, 0)]


@pytest.mark.integration
@pytest.mark.anyio
async def test_a_guard_reads_outcomes_and_latency_of_its_window_from_the_intents(
    db_url: str,
) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        _guarded_canary(conn, min_samples=1, latency_percentile=75, latency_margin_ms=10_000)
        _insert(conn, "timed", 24)
        created: dict[int, datetime] = dict(
            conn.execute(
                "SELECT id, created_at FROM outbox.payment_intents WHERE payment_id LIKE 'timed-%'"
            ).fetchall()
        )
    db = Database(db_url, pool_size=2, name="guard-window-test")
    await db.open()
    try:
        store = Store(db, actor="relay:guard-window-test")
        expected: dict[str, dict[str, object]] = {}
        for provider, base_ms in (("stripe", 40), ("canary", 300)):
            rows = sorted(
                await store.claim(provider, 50, lease_seconds=600, instance="guard-window-test"),
                key=lambda r: r.id,
            )
            assert len(rows) >= 3, "a 50/50 split of 24 payments left a side nearly empty"
            # The first declines, the last stays in flight (no sample, no latency), the
            # others succeed after base_ms + 7 ms per step (rows end at different times).
            took: list[int] = []
            for k, row in enumerate(rows[:-1]):
                ms = base_ms + 7 * k
                took.append(ms)
                declined = k == 0
                assert row.lease_token is not None
                written = await store.complete(
                    [
                        WriteBack(
                            row.id,
                            row.lease_token,
                            row.payment_id,
                            "failed" if declined else "succeeded",
                            error_code="card_declined" if declined else None,
                            provider_reference=None if declined else f"ref-{row.id}",
                            amount_applied_minor=None if declined else row.amount_minor,
                        )
                    ],
                    now=created[row.id] + timedelta(milliseconds=ms),
                )
                assert written == {row.id}
            expected[provider] = {
                "samples": len(rows) - 1,
                "declined": 1,
                "latency_ms": _percentile_disc(took, 75),
            }
        guard = GuardRails(db, instance="guard-window-test")
        (turn,) = await guard.evaluate_once()
        for side in (turn.canary, turn.baseline):
            assert {
                "samples": side.samples,
                "declined": side.declined,
                "latency_ms": side.latency_ms,
            } == expected[side.provider]
        # Without a latency margin the latency is neither read nor compared.
        with psycopg.connect(db_url, autocommit=True) as conn:
            set_guard(
                conn,
                operator="alice",
                rule="main",
                fields={"latency_margin_ms": None, "failure_margin_bp": 9000},
                reason="failures only",
            )
        (turn,) = await guard.evaluate_once()
        assert (turn.canary.latency_ms, turn.baseline.latency_ms) == (None, None)
        assert (turn.canary.samples, turn.baseline.samples) == (
            expected["canary"]["samples"],
            expected["stripe"]["samples"],
        )
    finally:
        await db.close()


@pytest.mark.integration
def test_guard_set_is_audited_and_checked(conn: psycopg.Connection) -> None:
    register_provider(conn, "stripe")
    register_provider(conn, "adyen_eu", "adyen")
    set_rule(
        conn,
        operator="alice",
        name="prio",
        fields={"providers": ["stripe", "adyen_eu"]},
        reason="priority",
        create=True,
    )
    set_rule(
        conn,
        operator="alice",
        name="split",
        fields={"mode": "split", "providers": ["stripe", "adyen_eu"], "weights": [90, 10]},
        reason="canary",
        create=True,
    )
    fields = {"canary": "adyen_eu", "baseline": "stripe", "failure_margin_bp": 100}
    with pytest.raises(psycopg.Error) as caught:
        set_guard(conn, operator="alice", rule="prio", fields=fields, reason="x")
    assert caught.value.diag.constraint_name == "routing_guards_rule_is_split"
    with pytest.raises(psycopg.Error) as caught:
        set_guard(
            conn, operator="alice", rule="split", fields={**fields, "canary": "x"}, reason="x"
        )
    assert caught.value.diag.constraint_name == "routing_guards_sides_are_targets"
    with pytest.raises(psycopg.Error) as caught:
        set_guard(
            conn,
            operator="alice",
            rule="split",
            fields={**fields, "failure_margin_bp": None},
            reason="x",
        )
    assert caught.value.diag.constraint_name == "routing_guards_a_margin"
    with pytest.raises(ValueError, match="not settable"):
        set_guard(conn, operator="alice", rule="split", fields={"weights": 1}, reason="x")
    set_guard(conn, operator="alice", rule="split", fields=fields, reason="guard it")
    row = set_guard(conn, operator="bob", rule="split", fields={"enabled": False}, reason="off")
    assert (row["enabled"], row["version"], row["canary"]) == (False, 2, "adyen_eu")
    audit = conn.execute(
        "SELECT actor, reason, after FROM outbox.audit_log WHERE entity = 'routing_guard'"
        " AND entity_id = 'split' ORDER BY chain_seq"
    ).fetchall()
    assert [(a, r) for a, r, _ in audit] == [
        ("operator:alice", "guard it"),
        ("operator:bob", "off"),
    ]
    assert audit[1][2] == {"enabled": False, "version": 2}
    # Guards are never deleted (turn one off instead).
    with pytest.raises(psycopg.Error):
        conn.execute("DELETE FROM outbox.routing_guards")


@pytest.mark.integration
def test_cli_sets_lists_and_shows_a_guard(
    conn: psycopg.Connection,
    db_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    register_provider(conn, "stripe")
    register_provider(conn, "adyen_eu", "adyen")
    set_rule(
        conn,
        operator="alice",
        name="main",
        fields={"mode": "split", "providers": ["stripe", "adyen_eu"], "weights": [90, 10]},
        reason="canary",
        create=True,
    )
    monkeypatch.setenv("RELAY_DATABASE_URL", db_url)
    monkeypatch.setenv("RELAY_OPERATOR", "carol")
    args = ["routes", "guard", "main", "--canary", "adyen_eu", "--baseline", "stripe"]
    assert cli_main([*args, "--reason", "no margin"]) == 1
    assert "routing_guards_a_margin" in capsys.readouterr().err
    done = [*args, "--failure-margin", "2.5%", "--latency-margin", "800", "--reason", "guard it"]
    assert cli_main(done) == 0
    out = capsys.readouterr().out
    assert "failures +2.50%, p95 +800 ms" in out and "watching" in out
    assert cli_main(["routes", "show", "main"]) == 0
    assert "guard rail:" in capsys.readouterr().out
    assert cli_main(["routes", "guards"]) == 0
    assert "adyen_eu" in capsys.readouterr().out
    assert cli_main(["status"]) == 0
    assert "guard rail main: watching canary adyen_eu (weight 10) against stripe" in (
        capsys.readouterr().out
    )
    (row,) = list_guards(conn)
    assert (row["failure_margin_bp"], row["latency_margin_ms"], row["updated_by"]) == (
        250,
        800,
        "operator:carol",
    )
