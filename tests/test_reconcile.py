"""Reconciliation against the fake provider's balance transactions, and the exception workflow.

A real relay run against the fake Stripe-compatible server fills the ledger; the fake is
then told to make its settlement data disagree, once per exception class.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from provider_adapters.base import BalanceTransaction
from provider_adapters.stripe import StripeAdapter
from relay.finance.exceptions import ExceptionCommandError, approve, request_action
from relay.finance.reconcile import (
    EXCEPTION_KINDS,
    FeeSchedule,
    InternalItem,
    match,
    run,
    write_reports,
)
from tests.invariants import assert_audit_intact, assert_ledger_balanced
from tests.login_roles import login_role
from tests.support.cli import run_cli
from tests.support.fake_server import API_KEY, FakeServer
from tests.support.intents import insert_intent, insert_intents
from tests.support.relays import make_relay, run_until_settled

T0 = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
# Every class a workload in one currency can show; fx_rate_drift needs a settlement in
# another currency and our rate for it (tests/test_fx_settlement.py).
SAME_CURRENCY_KINDS = tuple(k for k in EXCEPTION_KINDS if k != "fx_rate_drift")
FAKE_FEES = FeeSchedule(bps=290, fixed_minor=30)  # the fake's default price list


# -- pure matching ---------------------------------------------------------------------------


def bt(
    id_: str,
    type_: str,
    amount: int,
    source: str | None,
    *,
    fee: int | None = None,
    currency: str = "EUR",
    status: str = "succeeded",
    at: datetime = T0,
) -> BalanceTransaction:
    """A balance transaction; a charge's fee defaults to the fake's price list."""
    if fee is None:
        fee = (amount * 290 + 5_000) // 10_000 + 30 if amount > 0 else 0
    return BalanceTransaction(id_, type_, amount, fee, amount - fee, currency, source, status, at)


def item(n: int, kind: str, reference: str, amount: int, *, at: datetime = T0) -> InternalItem:
    return InternalItem(n, f"pay-{n}", kind, reference, amount, "EUR", at)


def test_each_discrepancy_is_one_finding_of_its_class() -> None:
    provider = [
        bt("txn_ok", "charge", 1000, "pi_ok"),
        bt("txn_ref", "refund", -300, "re_ok"),
        bt("txn_amt", "charge", 2100, "pi_amt"),
        bt("txn_cur", "charge", 3000, "pi_cur", currency="USD"),
        bt("txn_fee", "charge", 4000, "pi_fee", fee=999),
        bt("txn_status", "refund", -500, "re_failed", status="failed"),
        bt("txn_phantom", "charge", 1234, "pi_nobody"),
        bt("txn_payout", "payout", -9000, "po_1"),
    ]
    internal = [
        item(1, "charge", "pi_ok", 1000),
        item(2, "refund", "re_ok", 300),
        item(3, "capture", "pi_amt", 2000),
        item(4, "charge", "pi_cur", 3000),
        item(5, "charge", "pi_fee", 4000),
        item(6, "refund", "re_failed", 500),
        item(7, "charge", "pi_lost", 800),
    ]
    result = match(
        provider,
        internal,
        window_start=T0 - timedelta(hours=1),
        window_end=T0 + timedelta(hours=1),
        fees=FAKE_FEES,
    )
    found = {(f.kind, f.match_key, f.delta_minor) for f in result.findings}
    assert found == {
        ("amount_mismatch", "pi_amt", 100),
        ("currency_mismatch", "pi_cur", 0),
        ("unexpected_fee", "pi_fee", 999 - (4000 * 290 + 5000) // 10000 - 30),
        ("status_mismatch", "re_failed", 500),
        ("missing_internal", "txn_phantom", 1234),
        ("missing_at_provider", "pi_lost", -800),
    }
    assert sorted(f.kind for f in result.findings) == sorted(SAME_CURRENCY_KINDS)
    assert (result.matched, result.ignored) == (2, 1)


def test_details_show_amounts_in_currency_units() -> None:
    provider = [
        bt("txn_amt", "charge", 2099, "pi_amt"),
        bt("txn_fee", "charge", 4200, "pi_fee", fee=999),
        bt("txn_phantom", "charge", 4200, "pi_nobody"),
        bt("txn_yen", "charge", 1999, "pi_yen", currency="JPY"),
        bt("txn_xyz", "charge", 55, "pi_xyz", currency="XYZ"),
    ]
    internal = [
        item(1, "capture", "pi_amt", 1999),
        item(2, "charge", "pi_fee", 4200),
        item(3, "charge", "pi_lost", 100),
    ]
    result = match(
        provider,
        internal,
        window_start=T0 - timedelta(hours=1),
        window_end=T0 + timedelta(hours=1),
        fees=FAKE_FEES,
        exponents={"EUR": 2, "JPY": 0},
    )
    details = {f.match_key: f.detail for f in result.findings}
    assert details["pi_amt"] == "capture pi_amt: the ledger says 19.99 EUR, the provider 20.99 EUR"
    assert details["pi_fee"] == "charge pi_fee: fee 9.99 EUR, expected 1.52 EUR"
    assert details["txn_phantom"].startswith("the provider shows a charge of 42.00 EUR (")
    assert details["pi_lost"].startswith("the ledger records a charge of 1.00 EUR (")
    assert details["txn_yen"].startswith("the provider shows a charge of 1999 JPY (")
    # A currency outbox.currencies does not know is not guessed: its unit is named.
    assert details["txn_xyz"].startswith("the provider shows a charge of 55 minor units of XYZ (")


def test_only_items_dated_inside_the_window_are_judged() -> None:
    early, late = T0 - timedelta(minutes=30), T0 + timedelta(hours=2)
    provider = [bt("txn_edge", "charge", 500, "pi_edge", at=T0 + timedelta(seconds=2))]
    internal = [
        # Booked just before the window, settled just inside: matched, not "missing".
        item(1, "charge", "pi_edge", 500, at=T0 - timedelta(seconds=1)),
        item(2, "charge", "pi_outside", 700, at=late),
    ]
    result = match(
        provider, internal, window_start=T0, window_end=T0 + timedelta(hours=1), fees=FAKE_FEES
    )
    assert result.findings == [] and result.matched == 1
    before = match(provider, internal, window_start=early, window_end=T0, fees=FAKE_FEES)
    assert before.findings == [] and before.matched == 1


def test_fees_are_checked_against_the_schedule_and_refunds_carry_none() -> None:
    provider = [
        bt("txn_c", "charge", 10_000, "pi_c", fee=330),
        bt("txn_r", "refund", -100, "re_r", fee=5),
    ]
    internal = [item(1, "charge", "pi_c", 10_000), item(2, "refund", "re_r", 100)]
    window = {"window_start": T0 - timedelta(hours=1), "window_end": T0 + timedelta(hours=1)}
    unchecked = match(provider, internal, fees=FeeSchedule(), **window)
    assert [(f.kind, f.match_key) for f in unchecked.findings] == [("unexpected_fee", "re_r")]
    lenient = match(
        provider, internal, fees=FeeSchedule(bps=290, fixed_minor=30, tolerance_minor=10), **window
    )
    assert [(f.kind, f.match_key) for f in lenient.findings] == []
    strict = match(provider, internal, fees=FeeSchedule(bps=290, fixed_minor=30), **window)
    assert {(f.kind, f.match_key) for f in strict.findings} == {
        ("unexpected_fee", "pi_c"),
        ("unexpected_fee", "re_r"),
    }


# -- against the fake provider -------------------------------------------------------------


WORKLOAD: list[dict[str, Any]] = [
    {
        "payment_id": "p-charge",
        "action": "charge",
        "amount_minor": 1000,
        "payment_method": "pm_card_visa",
    },
    {
        "payment_id": "p-auth",
        "action": "authorize",
        "amount_minor": 2000,
        "payment_method": "pm_card_visa",
    },
    {"payment_id": "p-auth", "action": "capture", "amount_minor": 1500},
    {
        "payment_id": "p-refund",
        "action": "charge",
        "amount_minor": 3000,
        "payment_method": "pm_card_visa",
    },
    {"payment_id": "p-refund", "action": "refund", "amount_minor": 500},
    {
        "payment_id": "p-amount",
        "action": "charge",
        "amount_minor": 4000,
        "payment_method": "pm_card_visa",
    },
    {
        "payment_id": "p-currency",
        "action": "charge",
        "amount_minor": 5000,
        "payment_method": "pm_card_visa",
    },
    {
        "payment_id": "p-fee",
        "action": "charge",
        "amount_minor": 6000,
        "payment_method": "pm_card_visa",
    },
    {
        "payment_id": "p-status",
        "action": "charge",
        "amount_minor": 7000,
        "payment_method": "pm_card_visa",
    },
    {"payment_id": "p-status", "action": "refund", "amount_minor": 700},
    {
        "payment_id": "p-missing",
        "action": "charge",
        "amount_minor": 8000,
        "payment_method": "pm_card_visa",
    },
    {
        "payment_id": "p-hold",
        "action": "authorize",
        "amount_minor": 900,
        "payment_method": "pm_card_visa",
    },
    {
        "payment_id": "p-dead",
        "action": "charge",
        "amount_minor": 100,
        "payment_method": "pm_no_such_card",
    },
]


def references(db_url: str) -> dict[str, str]:
    """payment_id -> the provider's object each injection targets (pi_ or re_)."""
    with psycopg.connect(db_url) as conn:
        rows = conn.execute(
            "SELECT payment_id, action, provider_reference FROM outbox.payment_intents"
            " WHERE status = 'succeeded' ORDER BY id"
        ).fetchall()
    refs: dict[str, str] = {}
    for payment_id, action, reference in rows:
        if action == "refund" or payment_id not in refs:
            refs[payment_id] = reference
    return refs


async def inject(fake: FakeServer, **spec: Any) -> dict[str, Any]:
    response = await fake.control.post("/_fake/discrepancies", json=spec)
    response.raise_for_status()
    body: dict[str, Any] = response.json()
    return body


async def relay_then_inject(db_url: str, fake: FakeServer, adapter: StripeAdapter) -> None:
    insert_intents(db_url, WORKLOAD)
    await run_until_settled(db_url, [make_relay(db_url, adapter, instance="recon-relay")])
    refs = references(db_url)
    await inject(fake, kind="amount_mismatch", source=refs["p-amount"], delta=150)
    await inject(fake, kind="currency_mismatch", source=refs["p-currency"], currency="usd")
    await inject(fake, kind="unexpected_fee", source=refs["p-fee"], fee=999)
    await inject(fake, kind="status_mismatch", source=refs["p-status"])
    await inject(fake, kind="missing_at_provider", source=refs["p-missing"])
    await inject(fake, kind="missing_internal", amount=4321, currency="eur")


@pytest.mark.integration
@pytest.mark.anyio
async def test_reconciliation_finds_each_class_once_and_a_rerun_adds_none(
    db_url: str, fake: FakeServer, adapter: StripeAdapter, tmp_path: Path
) -> None:
    started = datetime.now(UTC) - timedelta(minutes=1)
    await relay_then_inject(db_url, fake, adapter)
    until = datetime.now(UTC) + timedelta(minutes=1)
    lines: list[str] = []

    async def reconcile() -> Any:
        return await run(
            db_url,
            "stripe",
            adapter.balance_transactions,
            since=started,
            until=until,
            fees=FAKE_FEES,
            slack=timedelta(0),
            actor="operator:carol",
            progress=lines.append,
        )

    first = await reconcile()
    kinds = sorted(f.kind for f in first.result.findings)
    assert kinds == sorted(SAME_CURRENCY_KINDS), [f.detail for f in first.result.findings]
    assert first.new == 6 and first.cleared == []
    by_kind = {f.kind: f for f in first.result.findings}
    refs = references(db_url)
    assert by_kind["amount_mismatch"].payment_id == "p-amount"
    assert by_kind["amount_mismatch"].delta_minor == 150
    assert by_kind["currency_mismatch"].payment_id == "p-currency"
    assert by_kind["unexpected_fee"].payment_id == "p-fee"
    assert by_kind["status_mismatch"].match_key == refs["p-status"]  # the failed refund
    assert by_kind["missing_at_provider"].payment_id == "p-missing"
    assert by_kind["missing_internal"].provider_amount_minor == 4321
    assert any("balance transactions" in line for line in lines)

    second = await reconcile()
    assert second.new == 0
    assert [e for e, _, _ in second.recorded] == [e for e, _, _ in first.recorded]
    with psycopg.connect(db_url) as conn:
        exceptions = conn.execute(
            "SELECT kind, times_seen, status, first_run_id, last_run_id"
            " FROM outbox.reconciliation_exceptions ORDER BY kind"
        ).fetchall()
        runs = conn.execute(
            "SELECT status, exceptions_found, exceptions_new, run_by"
            " FROM outbox.reconciliation_runs ORDER BY id"
        ).fetchall()
        delta = conn.execute(
            "SELECT sum(exceptions), sum(delta_minor) FROM outbox.reconciliation_open_delta"
        ).fetchone()
        audited = conn.execute(
            "SELECT entity, count(*) FROM outbox.audit_log"
            " WHERE entity LIKE 'reconciliation%%' AND actor = 'operator:carol' GROUP BY entity"
            " ORDER BY entity"
        ).fetchall()
    assert len(exceptions) == 6
    assert {(t, s) for _, t, s, _, _ in exceptions} == {(2, "open")}
    assert {(first_seen, last_seen) for *_, first_seen, last_seen in exceptions} == {
        (first.run_id, second.run_id)
    }
    assert runs == [("finished", 6, 6, "operator:carol"), ("finished", 6, 0, "operator:carol")]
    assert delta is not None and delta[0] == 6
    assert dict(audited) == {
        "reconciliation_exception": 12,  # found, then seen again
        "reconciliation_run": 4,  # started and finished, twice
    }

    csv_path, json_path = write_reports(second, tmp_path)
    with csv_path.open() as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(r["kind"] for r in rows) == sorted(SAME_CURRENCY_KINDS)
    assert json.loads(json_path.read_text())["exceptions_found"] == 6
    assert_ledger_balanced(db_url)
    assert_audit_intact(db_url)


@pytest.mark.integration
@pytest.mark.anyio
async def test_exceptions_no_longer_found_are_cleared_and_can_come_back(
    db_url: str, fake: FakeServer, adapter: StripeAdapter
) -> None:
    started = datetime.now(UTC) - timedelta(minutes=1)
    insert_intents(db_url, WORKLOAD[:1])
    await run_until_settled(db_url, [make_relay(db_url, adapter)])
    phantom = await inject(fake, kind="missing_internal", amount=777)
    until = datetime.now(UTC) + timedelta(minutes=1)
    seen = [t async for t in adapter.balance_transactions(started, until)]

    async def without_phantom(since: datetime, to: datetime) -> AsyncIterator[BalanceTransaction]:
        for t in seen:
            if t.id != phantom["balance_transaction"]:
                yield t

    kwargs: dict[str, Any] = {
        "since": started,
        "until": until,
        "fees": FAKE_FEES,
        "slack": timedelta(0),
        "actor": "reconcile:stripe",
    }
    first = await run(db_url, "stripe", adapter.balance_transactions, **kwargs)
    assert [f.kind for f in first.result.findings] == ["missing_internal"]
    cleared = await run(db_url, "stripe", without_phantom, **kwargs)
    assert cleared.result.findings == [] and cleared.cleared == [first.recorded[0][0]]
    back = await run(db_url, "stripe", adapter.balance_transactions, **kwargs)
    assert back.recorded == [(first.recorded[0][0], False, "open")]


@pytest.mark.integration
@pytest.mark.anyio
async def test_a_clean_run_over_many_small_pages_finds_nothing(
    db_url: str, fake: FakeServer, adapter: StripeAdapter
) -> None:
    """Pagination: two transactions a page, far more transactions than a page, every one
    read once (starting_after), every one matched, no exception."""
    started = datetime.now(UTC) - timedelta(minutes=1)
    insert_intents(db_url, WORKLOAD)
    await run_until_settled(db_url, [make_relay(db_url, adapter, instance="page-relay")])
    until = datetime.now(UTC) + timedelta(minutes=1)
    whole = [t async for t in adapter.balance_transactions(started, until)]
    assert len(whole) >= 8  # captures, charges and refunds of WORKLOAD

    def pages_requested() -> int:
        return sum(1 for r in fake.seen if r.path == "/v1/balance_transactions")

    before = pages_requested()

    def two_a_page(since: datetime, to: datetime) -> AsyncIterator[BalanceTransaction]:
        return adapter.balance_transactions(since, to, page_size=2)

    report = await run(
        db_url,
        "stripe",
        two_a_page,
        since=started,
        until=until,
        fees=FAKE_FEES,
        slack=timedelta(0),
        actor="reconcile:stripe",
    )
    assert pages_requested() - before == (len(whole) + 1) // 2
    assert report.result.findings == []
    assert report.result.provider_items == len(whole)
    assert report.result.matched == report.result.internal_items == len(whole)
    paged = [t async for t in two_a_page(started, until)]
    assert [t.id for t in paged] == [t.id for t in whole]


# -- the command line and the four-eyes workflow -------------------------------------------


@pytest.fixture
def two_operator_logins(db_url: str) -> Iterator[tuple[str, str]]:
    """Two database logins of outbox_operator: four eyes means two logins, not two names."""
    with (
        login_role(db_url, "outbox_operator", prefix="opa") as first,
        login_role(db_url, "outbox_operator", prefix="opb") as second,
    ):
        yield first, second


@pytest.mark.integration
@pytest.mark.anyio
async def test_cli_reconciles_and_money_moves_need_a_second_approver(
    db_url: str,
    fake: FakeServer,
    adapter: StripeAdapter,
    tmp_path: Path,
    two_operator_logins: tuple[str, str],
) -> None:
    await relay_then_inject(db_url, fake, adapter)
    env = {
        "RELAY_DATABASE_URL": db_url,
        "RELAY_PROVIDERS__STRIPE__API_KEY": API_KEY,
        "RELAY_PROVIDERS__STRIPE__BASE_URL": fake.url,
        "RELAY_RECONCILE_FEE_BPS": "290",
        "RELAY_RECONCILE_FEE_FIXED_MINOR": "30",
    }
    # The requesters (alice, dana) work from one database login, the approvers (bob, erin,
    # carol) from another.
    requester_url, approver_url = two_operator_logins

    def as_requester(*args: str, url: str = requester_url) -> subprocess.CompletedProcess[str]:
        return run_cli(*args, env={**env, "RELAY_DATABASE_URL": url})

    def approve_cli(*args: str) -> subprocess.CompletedProcess[str]:
        return as_requester(*args, url=approver_url)

    async def call(*args: str) -> subprocess.CompletedProcess[str]:
        # The fake provider is served by this test's event loop: keep it turning.
        return await anyio.to_thread.run_sync(lambda: as_requester(*args))

    since = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    done = await call(
        "reconcile", "--provider", "stripe", "--since", since, "--output-dir", str(tmp_path)
    )
    assert done.returncode == 0, done.stderr
    for kind in SAME_CURRENCY_KINDS:
        assert kind in done.stdout
    assert "report written to" in done.stdout
    assert len(sorted(os.listdir(tmp_path))) == 2  # the CSV and the JSON
    assert "balance transactions" in done.stderr  # progress
    again = await call(
        "reconcile",
        "--provider",
        "stripe",
        "--since",
        since,
        "--output-dir",
        str(tmp_path),
        "--json",
    )
    report = json.loads(again.stdout)
    assert report["exceptions_found"] == 6 and report["exceptions_new"] == 0

    listed = json.loads(as_requester("exceptions", "list", "--json").stdout)
    ids = {row["kind"]: row["id"] for row in listed}
    assert set(ids) == set(SAME_CURRENCY_KINDS)

    # Accepting moves no money: one operator, with a reason. The operator's name comes
    # from RELAY_OPERATOR when --operator is not given, as for every operator command.
    fee = run_cli(
        "exceptions",
        "accept",
        str(ids["unexpected_fee"]),
        "--reason",
        "disputed with the provider, ticket 4411",
        env={**env, "RELAY_DATABASE_URL": requester_url, "RELAY_OPERATOR": "alice"},
    )
    assert fee.returncode == 0, fee.stderr
    assert "accepted by alice" in fee.stdout
    refused = as_requester(
        "exceptions", "accept", str(ids["unexpected_fee"]), "--operator", "bob", "--reason", "again"
    )
    assert refused.returncode == 1 and "only an open exception" in refused.stderr

    # The provider took 150 too much: refund the excess (the default amount), four eyes.
    asked = as_requester(
        "exceptions",
        "refund",
        str(ids["amount_mismatch"]),
        "--operator",
        "alice",
        "--reason",
        "over-captured by 150",
    )
    assert asked.returncode == 0, asked.stderr
    assert "refund 1.50 EUR of payment p-amount" in asked.stdout
    action_id = asked.stdout.split()[1]
    same = as_requester("exceptions", "approve", action_id, "--operator", "alice")
    assert same.returncode == 1
    assert "second, different operator" in same.stderr
    # Another name is not another person: the requester's login cannot approve as bob.
    same_login = as_requester("exceptions", "approve", action_id, "--operator", "bob")
    assert same_login.returncode == 1
    assert "approve it from your own database login" in same_login.stderr
    with psycopg.connect(db_url) as conn:
        before = conn.execute(
            "SELECT count(*) FROM outbox.payment_intents WHERE payment_id = 'p-amount'"
        ).fetchone()
    assert before == (1,)  # nothing happened yet
    approved = approve_cli("exceptions", "approve", action_id, "--operator", "bob")
    assert approved.returncode == 0, approved.stderr
    twice = approve_cli("exceptions", "approve", action_id, "--operator", "carol")
    assert twice.returncode == 1 and "already executed" in twice.stderr

    # A void of the open hold and a re-drive of the dead intent go the same way.
    with psycopg.connect(db_url, autocommit=True) as conn:
        row = conn.execute(
            "INSERT INTO outbox.reconciliation_runs (provider, window_start, window_end)"
            " VALUES ('stripe', now() - interval '1 hour', now()) RETURNING id"
        ).fetchone()
        assert row is not None
        for payment_id, key in (("p-hold", "hold-key"), ("p-dead", "dead-key")):
            conn.execute(
                "INSERT INTO outbox.reconciliation_exceptions (provider, kind, match_key,"
                " payment_id, detail, occurred_at, first_run_id, last_run_id)"
                " VALUES ('stripe', 'status_mismatch', %s, %s, 'test', now(), %s, %s)",
                (key, payment_id, row[0], row[0]),
            )
    listed = json.loads(as_requester("exceptions", "list", "--json").stdout)
    hold = next(r["id"] for r in listed if r["payment_id"] == "p-hold")
    dead = next(r["id"] for r in listed if r["payment_id"] == "p-dead")
    with_amount = as_requester(
        "exceptions", "void", str(hold), "--operator", "dana", "--reason", "x"
    )
    assert with_amount.returncode == 0, with_amount.stderr
    void_action = with_amount.stdout.split()[1]
    redrive = as_requester(
        "exceptions", "redrive", str(dead), "--operator", "dana", "--reason", "card fixed"
    )
    assert redrive.returncode == 0, redrive.stderr
    redrive_action = redrive.stdout.split()[1]
    for action in (void_action, redrive_action):
        assert as_requester("exceptions", "approve", action, "--operator", "dana").returncode == 1
        ok = approve_cli("exceptions", "approve", action, "--operator", "erin")
        assert ok.returncode == 0, ok.stderr

    with psycopg.connect(db_url) as conn:
        intents = conn.execute(
            "SELECT payment_id, action, amount_minor, status, metadata ? 'reconciliation_action'"
            " FROM outbox.payment_intents WHERE payment_id IN ('p-amount', 'p-hold', 'p-dead')"
            " ORDER BY id"
        ).fetchall()
        actions = conn.execute(
            "SELECT action, requested_by, approved_by, status, requested_login, approved_login"
            " FROM outbox.reconciliation_actions ORDER BY id"
        ).fetchall()
        statuses = dict(
            conn.execute(
                "SELECT kind || ':' || coalesce(payment_id, '-'), status"
                " FROM outbox.reconciliation_exceptions"
            ).fetchall()
        )
        operators = conn.execute(
            "SELECT DISTINCT actor FROM outbox.audit_log WHERE actor LIKE 'operator:%%' ORDER BY 1"
        ).fetchall()
        # The four-eyes rule holds in the database itself, whatever the client.
        with pytest.raises(psycopg.errors.CheckViolation, match="second_approver"):
            conn.execute(
                "UPDATE outbox.reconciliation_actions SET approved_by = requested_by WHERE id = %s",
                (int(action_id),),
            )
    assert intents == [
        ("p-amount", "charge", 4000, "succeeded", False),
        ("p-hold", "authorize", 900, "succeeded", False),
        ("p-dead", "charge", 100, "pending", False),  # re-driven under its own key
        ("p-amount", "refund", 150, "pending", True),  # the relay sends it exactly once
        ("p-hold", "void", None, "pending", True),
    ]
    requester, approver = (conninfo_to_dict(url)["user"] for url in two_operator_logins)
    assert actions == [
        ("refund", "alice", "bob", "executed", requester, approver),
        ("void", "dana", "erin", "executed", requester, approver),
        ("redrive", "dana", "erin", "executed", requester, approver),
    ]
    assert statuses["amount_mismatch:p-amount"] == "resolved"
    assert statuses["unexpected_fee:p-fee"] == "accepted"
    assert statuses["status_mismatch:p-hold"] == "resolved"
    assert [o for (o,) in operators] == [
        "operator:alice",
        "operator:bob",
        "operator:dana",
        "operator:erin",
    ]
    assert_audit_intact(db_url)


@pytest.mark.integration
@pytest.mark.anyio
async def test_stored_details_take_the_exponent_from_the_currency_table(db_url: str) -> None:
    """Exponents 0, 2, 3 and 4 (JPY, EUR, KWD, CLF) as outbox.currencies has them."""
    at = datetime.now(UTC)
    charges = [
        bt(f"txn_{code}", "charge", 1999, f"pi_{code}", currency=code, at=at)
        for code in ("JPY", "EUR", "KWD", "CLF")
    ]

    async def provider(_since: datetime, _until: datetime) -> AsyncIterator[BalanceTransaction]:
        for txn in charges:
            yield txn

    report = await run(
        db_url,
        "stripe",
        provider,
        since=at - timedelta(minutes=1),
        until=at + timedelta(minutes=1),
        fees=FeeSchedule(),
        slack=timedelta(0),
        actor="reconcile:stripe",
    )
    with psycopg.connect(db_url) as conn:
        stored = dict(
            conn.execute("SELECT currency, detail FROM outbox.reconciliation_exceptions").fetchall()
        )
    shown = {code: text.split(" (")[0] for code, text in stored.items()}
    assert shown == {
        "JPY": "the provider shows a charge of 1999 JPY",
        "EUR": "the provider shows a charge of 19.99 EUR",
        "KWD": "the provider shows a charge of 1.999 KWD",
        "CLF": "the provider shows a charge of 0.1999 CLF",
    }
    assert report.exponents["CLF"] == 4


@pytest.mark.integration
def test_exceptions_list_shows_money_and_what_waits_for_approval(
    db_url: str, two_operator_logins: tuple[str, str]
) -> None:
    """A requested refund shows in the default list, amounts in currency units, a long
    detail cut with an ellipsis."""
    requester, _ = two_operator_logins
    long_detail = "the provider took more than the ledger records " + "and more " * 12 + "END"
    insert_intent(
        db_url,
        payment_id="p-kwd",
        action="charge",
        amount_minor=1999,
        currency="KWD",
        payment_method="pm_card_visa",
    )
    with psycopg.connect(db_url, autocommit=True) as admin:
        run_row = admin.execute(
            "INSERT INTO outbox.reconciliation_runs (provider, window_start, window_end)"
            " VALUES ('stripe', now() - interval '1 hour', now()) RETURNING id"
        ).fetchone()
        assert run_row is not None
        exception = admin.execute(
            "INSERT INTO outbox.reconciliation_exceptions (provider, kind, match_key,"
            " payment_id, currency, delta_minor, detail, occurred_at, first_run_id, last_run_id)"
            " VALUES ('stripe', 'amount_mismatch', 'pi_kwd', 'p-kwd', 'KWD', 1500, %s, now(),"
            " %s, %s) RETURNING id",
            (long_detail, run_row[0], run_row[0]),
        ).fetchone()
        assert exception is not None
    env = {"RELAY_DATABASE_URL": requester}
    asked = run_cli(
        "exceptions",
        "refund",
        str(exception[0]),
        "--amount",
        "100",
        "--operator",
        "alice",
        "--reason",
        "over-captured",
        env=env,
    )
    assert asked.returncode == 0, asked.stderr
    assert "refund 0.100 KWD of payment p-kwd" in asked.stdout

    listed = run_cli("exceptions", "list", env=env)
    assert listed.returncode == 0, listed.stderr
    rows = [line for line in listed.stdout.splitlines() if "pi_kwd" in line]
    assert len(rows) == 1, (
        f"the default list hides the refund waiting for approval:\n{listed.stdout}"
    )
    row = rows[0]
    assert "awaiting_approval" in row
    assert "1.500 KWD" in row
    assert row.endswith("…") and "END" not in row
    assert len(row.split("  ")[-1].strip()) <= 80
    only_open = run_cli("exceptions", "list", "--status", "open", env=env)
    assert "pi_kwd" not in only_open.stdout


@pytest.mark.integration
def test_one_login_cannot_request_and_approve_under_two_names(
    db_url: str, two_operator_logins: tuple[str, str]
) -> None:
    """Four eyes are two database logins: the names an operator types prove nothing."""
    first, second = two_operator_logins
    with psycopg.connect(db_url, autocommit=True) as admin:
        admin.execute(
            "INSERT INTO outbox.payment_intents (payment_id, action, provider, amount_minor,"
            " currency, payment_method, idempotency_key)"
            " VALUES ('p-4eyes', 'authorize', 'stripe', 900, 'EUR', 'pm_card_visa', 'k-4eyes')"
        )
        run = admin.execute(
            "INSERT INTO outbox.reconciliation_runs (provider, window_start, window_end)"
            " VALUES ('stripe', now() - interval '1 hour', now()) RETURNING id"
        ).fetchone()
        assert run is not None
        exception = admin.execute(
            "INSERT INTO outbox.reconciliation_exceptions (provider, kind, match_key,"
            " payment_id, detail, occurred_at, first_run_id, last_run_id)"
            " VALUES ('stripe', 'status_mismatch', 'pi_4eyes', 'p-4eyes', 'test', now(), %s, %s)"
            " RETURNING id",
            (run[0], run[0]),
        ).fetchone()
        assert exception is not None
    asked = request_action(first, int(exception[0]), "void", operator="alice", reason="test")

    with pytest.raises(ExceptionCommandError, match="approve it from your own database login"):
        approve(first, asked.action_id, operator="bob")
    # The database holds the rule whatever the client: the login is the session's, and an
    # approval from the requester's login violates reconciliation_actions_second_login.
    with (
        psycopg.connect(first) as conn,
        pytest.raises(psycopg.errors.CheckViolation, match="second_login"),
    ):
        conn.execute(
            "UPDATE outbox.reconciliation_actions SET approved_by = 'bob', approved_at = now(),"
            " status = 'executed' WHERE id = %s",
            (asked.action_id,),
        )
    with psycopg.connect(first) as conn:
        forged = conn.execute(
            "INSERT INTO outbox.reconciliation_actions (exception_id, action, reason,"
            " requested_by, requested_login) VALUES (%s, 'void', 'x', 'mallory', 'nobody')"
            " RETURNING requested_login",
            (exception[0],),
        ).fetchone()
        conn.rollback()
    assert forged == (conninfo_to_dict(first)["user"],)

    done = approve(second, asked.action_id, operator="bob")
    assert done.action == "void" and len(done.intent_ids) == 1
    with psycopg.connect(db_url) as conn:
        row = conn.execute(
            "SELECT requested_by, approved_by, requested_login, approved_login, status"
            " FROM outbox.reconciliation_actions WHERE id = %s",
            (asked.action_id,),
        ).fetchone()
    assert row == (
        "alice",
        "bob",
        conninfo_to_dict(first)["user"],
        conninfo_to_dict(second)["user"],
        "executed",
    )
    assert_audit_intact(db_url)


def test_every_money_command_has_help() -> None:
    for args in (
        ("ledger", "check"),
        ("audit", "verify"),
        ("reconcile",),
        ("exceptions", "list"),
        ("exceptions", "accept"),
        ("exceptions", "refund"),
        ("exceptions", "void"),
        ("exceptions", "redrive"),
        ("exceptions", "approve"),
    ):
        result = run_cli(*args, "--help", env={})
        assert result.returncode == 0, args
        assert "usage: outbox-relay" in result.stdout
        assert len(result.stdout.splitlines()) > 3
