"""The API version canary (issue 20, sql/0070): one provider kind registered twice, `stripe`
on the current API version and `stripe_next` on a newer one, each pinned in the registry;
a split rule moves new payments between them and rolls back the same way.

The newer version is not in the Stripe adapter's tested list (it has one tested version),
so `stripe_next` runs it under the existing override, ALLOW_UNTESTED_API_VERSION: what an
operator does for a canary (README "Moving to a new provider API version"). The fake Stripe
records the ``Stripe-Version`` and ``Idempotency-Key`` of every request it sees.

The split's statistics over 10,000 payments are tests/test_routing.py's; here a few hundred
payments run through a real relay and the fake, and every request is checked against the
version of the instance the routing chose for its payment.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import psycopg
import pytest
import structlog

from provider_adapters import stripe
from relay.cli.status import render_status
from relay.domain.routing import Target, choose, routing_bucket
from relay.domain.version_pins import pin_mismatches
from relay.finance.audit import verify_database
from relay.infra.db import Database
from relay.infra.db_startup import StartupRefused
from relay.infra.migrate import discover, migrate
from relay.operations.providers import (
    ApprovalRequested,
    apply_declared,
    approve_request,
    list_providers,
    parse_declared,
    set_four_eyes,
    set_provider,
    set_rule,
    set_weights,
)
from relay.operations.status import collect_status
from relay.service.instances import InstanceHeartbeat
from relay.service.main import check_registered_api_versions
from tests.processes import UNREACHABLE_PROVIDER
from tests.support.cli import run_cli
from tests.support.databases import scratch_database
from tests.support.fake_server import FakeServer
from tests.support.relays import provider, relay_for, run_until_settled

CURRENT = stripe.DEFAULT_API_VERSION  # 2026-10-28.endive, the one tested version
NEXT = "2027-01-15.future"  # the canary's: untested, run under the override
VERSION_OF = {"stripe": CURRENT, "stripe_next": NEXT}


def _register_canary(conn: psycopg.Connection, weights: tuple[int, int] = (90, 10)) -> None:
    for name, version in VERSION_OF.items():
        set_provider(
            conn,
            operator="alice",
            name=name,
            kind="stripe",
            api_version=version,
            reason="API version canary",
            create=True,
        )
    set_rule(
        conn,
        operator="alice",
        name="version_canary",
        fields={"mode": "split", "providers": list(VERSION_OF), "weights": list(weights)},
        reason=f"{NEXT} on {weights[1]}%",
        create=True,
    )


def _lanes(url: str) -> dict[str, object]:
    return {
        "stripe": provider(url),
        "stripe_next": provider(url, api_version=NEXT, allow_untested_api_version=True),
    }


def _insert_payments(conn: psycopg.Connection, prefix: str, n: int) -> None:
    """n new payments, the provider left to the routing: an authorisation and its capture
    (which waits, blocked, for the authorisation), neither naming a provider."""
    conn.execute(
        "INSERT INTO outbox.payment_intents (payment_id, action, amount_minor, currency,"
        " payment_method) SELECT %s || g, a, 1000, 'EUR', CASE a WHEN 'authorize' THEN"
        " 'pm_card_visa' END FROM generate_series(1, %s) AS g,"
        " unnest(ARRAY['authorize', 'capture']) WITH ORDINALITY AS x(a, n) ORDER BY g, n",
        (prefix, n),
    )


def _versions_by_payment(conn: psycopg.Connection, fake: FakeServer) -> dict[str, set[str]]:
    """Per payment, the Stripe-Version of every request the fake saw for its intents."""
    payment_of = dict(
        conn.execute("SELECT idempotency_key, payment_id FROM outbox.payment_intents").fetchall()
    )
    seen: dict[str, set[str]] = {}
    for request in fake.seen:
        key = request.headers.get("Idempotency-Key")
        if key is not None:
            seen.setdefault(payment_of[key], set()).add(request.headers["Stripe-Version"])
    return seen


def _providers_of(conn: psycopg.Connection, prefix: str) -> dict[str, str]:
    return dict(
        conn.execute(
            "SELECT payment_id, provider FROM outbox.payments WHERE payment_id LIKE %s || '%%'",
            (prefix,),
        ).fetchall()
    )


@pytest.mark.integration
@pytest.mark.anyio
async def test_a_split_sends_each_payment_with_its_instances_version_and_rolls_back(
    db_url: str, fake: FakeServer
) -> None:
    with psycopg.connect(db_url, autocommit=True) as sync:
        _register_canary(sync)
        _insert_payments(sync, "c", 200)

    relay = relay_for(db_url, _lanes(fake.url))
    try:
        await relay.db.open()
        await check_registered_api_versions(relay)  # each lane pins its registry version
        await run_until_settled(db_url, [relay])
    finally:
        for lane in relay.lanes.values():
            await lane.adapter.aclose()

    with psycopg.connect(db_url, autocommit=True) as sync:
        routed = _providers_of(sync, "c")
        # The database chose, payment by payment, what the pure twin chooses.
        targets = [Target("stripe", 90), Target("stripe_next", 10)]
        assert routed == {pid: choose("split", targets, routing_bucket(pid)) for pid in routed}
        canary = {pid for pid, name in routed.items() if name == "stripe_next"}
        # Both instances take traffic: Binomial(200, 0.1) has mean 20 and sd 4.2; these ids
        # are fixed, so the count is too (14).
        assert 5 <= len(canary) <= 35, len(canary)
        assert sync.execute("SELECT DISTINCT status FROM outbox.payment_intents").fetchall() == [
            ("succeeded",)
        ]
        # Every request of a payment, its authorisation's and its capture's, carried the
        # version of the instance the routing chose for it, and no other.
        versions = _versions_by_payment(sync, fake)
        assert versions == {pid: {VERSION_OF[routed[pid]]} for pid in routed}

        # Rollback: the canary's weight to 0, one command, audited.
        rolled = set_weights(
            sync,
            operator="bob",
            name="version_canary",
            weights={"stripe_next": 0},
            reason=f"{NEXT} declines",
        )
        assert rolled["weights"] == [90, 0]
        _insert_payments(sync, "r", 100)
        # Payments already on the new version keep it for their later intents: a refund.
        sync.execute(
            "INSERT INTO outbox.payment_intents (payment_id, action, amount_minor, currency)"
            " SELECT payment_id, 'refund', 400, 'EUR' FROM outbox.payments"
            " WHERE provider = 'stripe_next'"
        )
        assert sync.execute(
            "SELECT actor, reason FROM outbox.audit_log WHERE entity = 'routing_rule'"
            " AND entity_id = 'version_canary' ORDER BY chain_seq DESC LIMIT 1"
        ).fetchone() == ("operator:bob", f"{NEXT} declines")

    await run_until_settled(db_url, [relay_for(db_url, _lanes(fake.url))])

    with psycopg.connect(db_url, autocommit=True) as sync:
        after = _providers_of(sync, "r")
        assert set(after.values()) == {"stripe"}, "a new payment went to the rolled-back version"
        assert _providers_of(sync, "c") == routed  # nothing started moved
        versions = _versions_by_payment(sync, fake)
        assert all(versions[pid] == {CURRENT} for pid in after)
        assert all(versions[pid] == {NEXT} for pid in canary)  # authorise, capture, refund
        refunds = sync.execute(
            "SELECT count(*), count(*) FILTER (WHERE status = 'succeeded')"
            " FROM outbox.payment_intents WHERE action = 'refund'"
        ).fetchone()
        assert refunds == (len(canary), len(canary))
    # The fake's own count of the version it received: the canary's requests and no more.
    assert (await fake.effects())["api_versions"][NEXT] == sum(
        1 for r in fake.seen if r.headers.get("Stripe-Version") == NEXT
    )


@pytest.mark.integration
@pytest.mark.anyio
async def test_a_relay_pinned_otherwise_than_the_registry_refuses_to_start(db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        _register_canary(conn)
    # stripe_next left at the adapter's default: the registry pins it to NEXT.
    wrong = relay_for(
        db_url,
        {"stripe": provider(UNREACHABLE_PROVIDER), "stripe_next": provider(UNREACHABLE_PROVIDER)},
    )
    await wrong.db.open()
    try:
        with pytest.raises(StartupRefused) as info:
            await check_registered_api_versions(wrong, {"stripe": None, "stripe_next": None})
    finally:
        await wrong.db.close()
        for lane in wrong.lanes.values():
            await lane.adapter.aclose()
    refused = info.value
    assert refused.code == "api_version_differs_from_registry"
    assert refused.message.startswith(
        f"RELAY_PROVIDERS__STRIPE_NEXT__API_VERSION is unset, so the adapter's default "
        f"{CURRENT}, but the provider registry pins stripe_next to {NEXT}"
    )
    assert "stripe:" not in refused.message  # stripe itself is pinned as registered
    assert f"set RELAY_PROVIDERS__STRIPE_NEXT__API_VERSION={NEXT}" in refused.remedy
    assert "__ALLOW_UNTESTED_API_VERSION=true" in refused.remedy
    assert f"outbox-relay providers set stripe_next --api-version {CURRENT}" in refused.remedy


@pytest.mark.integration
def test_run_exits_2_naming_the_variable_and_the_registry_value(db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        _register_canary(conn)
    done = run_cli(
        "run",
        env={
            "RELAY_DATABASE_URL": db_url,
            "RELAY_HTTP_PORT": "0",
            "RELAY_PROVIDERS__STRIPE_NEXT__KIND": "stripe",
            "RELAY_PROVIDERS__STRIPE_NEXT__API_KEY": "sk_test_canary",
            "RELAY_PROVIDERS__STRIPE_NEXT__API_VERSION": CURRENT,
        },
    )
    assert done.returncode == 2, done.stderr
    assert (
        f"error: RELAY_PROVIDERS__STRIPE_NEXT__API_VERSION is {CURRENT}, but the provider "
        f"registry pins stripe_next to {NEXT}"
    ) in done.stderr
    assert "(code api_version_differs_from_registry)" in done.stderr


@pytest.mark.integration
@pytest.mark.anyio
async def test_status_and_providers_list_show_versions_and_a_relay_that_differs(
    db_url: str,
) -> None:
    add = [
        "providers",
        "add",
        "stripe_next",
        "--kind",
        "stripe",
        "--operator",
        "alice",
        "--reason",
        "canary",
    ]
    added = run_cli(*add, "--api-version", NEXT, env={"RELAY_DATABASE_URL": db_url})
    assert added.returncode == 0, added.stderr
    with psycopg.connect(db_url, autocommit=True) as conn:
        pin = {"operator": "alice", "reason": "pin", "api_version": CURRENT}
        set_provider(conn, name="stripe", kind="stripe", create=True, **pin)
        # Spelt as the kind's adapter spells versions, or refused naming the field.
        with pytest.raises(ValueError, match="api_version 'v71' is not a stripe API version"):
            set_provider(conn, operator="alice", name="stripe", api_version="v71", reason="x")
    listed = run_cli("providers", "list", env={"RELAY_DATABASE_URL": db_url})
    lines = {line.split()[0]: line for line in listed.stdout.splitlines() if line.strip()}
    assert CURRENT in lines["stripe"] and "untested" not in lines["stripe"]
    assert f"{NEXT} (untested)" in lines["stripe_next"]

    # The registry changed after this relay started: it still sends the default.
    db = Database(db_url, pool_size=1, name="canary-status")
    await db.open()
    try:
        for instance, next_sent in (("relay-a", NEXT), ("relay-b", CURRENT)):
            sent = {
                "stripe": {"kind": "stripe", "version": CURRENT, "tested": True},
                "stripe_next": {"kind": "stripe", "version": next_sent, "tested": False},
            }
            await InstanceHeartbeat(db, instance=instance, providers=sent, api_versions=sent).beat()
    finally:
        await db.close()
    status = collect_status(db_url)
    assert status.registered_api_versions == VERSION_OF
    assert status.api_version_mismatches == [
        {
            "relay": "relay-b",
            "provider": "stripe_next",
            "relay_version": CURRENT,
            "registry_version": NEXT,
        }
    ]
    text = render_status(status)
    assert f"registry API versions: stripe {CURRENT}, stripe_next {NEXT}" in text
    assert (
        f"API VERSION MISMATCH stripe_next on relay relay-b: it sends {CURRENT}, the registry "
        f"pins {NEXT}"
    ) in text
    assert f"RELAY_PROVIDERS__STRIPE_NEXT__API_VERSION={NEXT}" in text


def test_a_mismatch_is_a_version_the_registry_records_and_the_relay_serves() -> None:
    pins = pin_mismatches(
        {"stripe": CURRENT, "stripe_next": CURRENT, "adyen": "v71"},
        {"stripe": CURRENT, "stripe_next": NEXT, "adyen": None, "other": "v72"},
    )
    assert [(m.provider, m.relay_version, m.registry_version) for m in pins] == [
        ("stripe_next", CURRENT, NEXT)
    ]


@pytest.mark.integration
def test_four_eyes_hold_a_new_pinned_version(db_url: str) -> None:
    """A new version is new traffic: with four eyes on it waits for a second login, and the
    approval applies it (sql/0070 restates registry_approve_v1); the trail has both."""
    from tests.login_roles import login_role

    with (
        login_role(db_url, "outbox_operator", prefix="alice") as alice_url,
        login_role(db_url, "outbox_operator", prefix="bob") as bob_url,
        psycopg.connect(alice_url, autocommit=True) as alice,
        psycopg.connect(bob_url, autocommit=True) as bob,
    ):
        _register_canary(alice)
        set_four_eyes(alice, operator="alice", on=True, reason="policy")
        with pytest.raises(ApprovalRequested) as asked:
            set_provider(
                alice,
                operator="alice",
                name="stripe_next",
                api_version="2027-02-01.next",
                reason="next one",
            )
        assert {p["name"]: p["api_version"] for p in list_providers(alice)} == VERSION_OF
        approve_request(bob, operator="bob", request_id=asked.value.request_id)
        now = {p["name"]: p["api_version"] for p in list_providers(bob)}
        assert now == {"stripe": CURRENT, "stripe_next": "2027-02-01.next"}
        row = bob.execute(
            "SELECT actor, before ->> 'api_version', after ->> 'api_version' FROM outbox.audit_log"
            " WHERE entity = 'provider' AND entity_id = 'stripe_next' ORDER BY chain_seq DESC LIMIT 1"
        ).fetchone()
        assert row == ("operator:bob", NEXT, "2027-02-01.next")


@pytest.mark.integration
@pytest.mark.anyio
async def test_providers_registered_before_the_column_still_verify(
    pg_admin_url: str, tmp_path: Path
) -> None:
    """sql/0070 adds api_version to the audited columns: a provider registered before it
    gets a baseline audit row, so `audit verify` still finds its chain ending in its row.
    A relay started on the schema before it has nothing to compare with, and says so."""
    before = tmp_path / "sql"
    before.mkdir()
    for migration in discover():
        if migration.version < "0070":
            shutil.copy(migration.path, before / migration.path.name)
    with scratch_database(pg_admin_url, "outbox_relay_t0070") as url:
        migrate(url, directory=before)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(
                "SELECT outbox.provider_set_v1('alice', 'stripe', 'stripe', NULL, NULL, NULL,"
                " NULL, 'before sql/0070', true)"
            )
        early = relay_for(url, {"stripe": provider(UNREACHABLE_PROVIDER)})
        await early.db.open()
        try:
            with structlog.testing.capture_logs() as logs:
                await check_registered_api_versions(early)
        finally:
            await early.db.close()
            await early.lanes["stripe"].adapter.aclose()
        assert [e["event"] for e in logs] == ["api_version_check_skipped"]
        # Later migrations follow it; 0070 is the one that adds the column and its baseline.
        assert migrate(url)[0] == "0070_pre_provider_api_versions"
        assert verify_database(url).breaks == []
        with psycopg.connect(url, autocommit=True) as conn:
            baseline = conn.execute(
                "SELECT operation, after, reason FROM outbox.audit_log WHERE entity = 'provider'"
                " AND entity_id = 'stripe' ORDER BY chain_seq DESC LIMIT 1"
            ).fetchone()
            assert baseline == (
                "baseline",
                {"api_version": None},
                "sql/0070: the registry records API versions",
            )
            set_provider(conn, operator="bob", name="stripe", api_version=CURRENT, reason="pin")
        assert verify_database(url).breaks == []


def test_providers_apply_sets_a_declared_version_and_keeps_an_undeclared_one(
    conn: psycopg.Connection,
) -> None:
    """The chart's path (`providers apply`): ``apiVersion`` is checked per kind, naming the
    entry; a declared one is set, and an entry without one keeps what the registry records."""
    with pytest.raises(ValueError, match=r"providers\[1\]\.apiVersion: api_version 'v71'"):
        parse_declared(
            [
                {"name": "a", "kind": "adyen", "apiVersion": "v71"},
                {"name": "s", "kind": "stripe", "apiVersion": "v71"},
            ]
        )
    declared = parse_declared([{"name": "stripe_next", "kind": "stripe", "apiVersion": NEXT}])
    apply_declared(conn, operator="helm:r", entries=declared, reason="release 1")
    apply_declared(
        conn,
        operator="helm:r",
        entries=parse_declared([{"name": "stripe_next", "kind": "stripe"}]),
        reason="release 2",
    )
    assert [(p["name"], p["api_version"]) for p in list_providers(conn)] == [("stripe_next", NEXT)]
