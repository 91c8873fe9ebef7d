"""The provider registry (sql/0050) and routing rules (sql/0051), against real PostgreSQL.

Refusals at INSERT by name; a 90/10 split over 10,000 new payments, set-based, equal payment
by payment to the pure twin (relay/domain/routing.py) and within stated bounds; every later
intent stays with its payment's provider; a rollback to 0 mid-run sends no new payment to
the canary, moves no payment already started, and is in the audit trail.
"""

from __future__ import annotations

import psycopg
import pytest

from provider_adapters.currency_units import ADYEN_UNITS, STRIPE_UNITS
from relay.domain.routing import Target, choose, routing_bucket
from relay.operations.providers import list_rules, set_provider, set_rule, set_weights
from tests.support.cli import run_cli
from tests.support.intents import payments_by_provider, register_provider

FIRST = (
    "INSERT INTO outbox.payment_intents (payment_id, action, provider, amount_minor, currency,"
    " payment_method, metadata) VALUES (%s, 'authorize', %s, %s, %s, 'pm_card_visa', %s)"
)


def _first(
    conn: psycopg.Connection,
    pid: str,
    provider: str | None,
    amount: int = 1000,
    currency: str = "EUR",
    metadata: str = "{}",
) -> None:
    conn.execute(FIRST, (pid, provider, amount, currency, metadata))


def _refused(
    conn: psycopg.Connection, rule: str, *args: object
) -> psycopg.errors.CheckViolation | psycopg.Error:
    with pytest.raises(psycopg.Error) as caught:
        _first(conn, *args)  # type: ignore[arg-type]
    assert caught.value.diag.constraint_name == rule, caught.value.diag.message_primary
    return caught.value


def test_empty_registry_is_open(conn: psycopg.Connection) -> None:
    _first(conn, "p1", "anything_goes")
    assert conn.execute("SELECT provider FROM outbox.payments").fetchone() == ("anything_goes",)


def test_first_registration_registers_providers_in_use(conn: psycopg.Connection) -> None:
    _first(conn, "p1", "legacy")
    register_provider(conn, "stripe")
    names = [r[0] for r in conn.execute("SELECT name FROM outbox.providers ORDER BY name")]
    assert names == ["legacy", "stripe"]
    _first(conn, "p2", "legacy")  # still accepted: it was in use


def test_refusals_at_insert_are_named(conn: psycopg.Connection) -> None:
    register_provider(conn, "stripe")
    register_provider(
        conn,
        "adyen_eu",
        "adyen",
        currencies=["EUR", "IDR"],
        amount_limits={"EUR": {"min": 50, "max": 100_000}},
    )
    register_provider(conn, "old", enabled=False)
    _refused(conn, "payment_intents_provider_registered", "p1", "nope")
    _refused(conn, "payment_intents_provider_enabled", "p2", "old")
    _refused(conn, "payment_intents_provider_currency", "p3", "adyen_eu", 1000, "USD")
    _refused(conn, "payment_intents_amount_within_provider_limits", "p4", "adyen_eu", 49)
    _refused(conn, "payment_intents_amount_within_provider_limits", "p5", "adyen_eu", 100_001)
    # Adyen counts IDR in whole rupiah; Stripe counts MGA in whole ariary, KWD in tens of fils.
    _refused(conn, "payment_intents_amount_representable", "p6", "adyen_eu", 150, "IDR")
    _refused(conn, "payment_intents_amount_representable", "p7", "stripe", 150, "MGA")
    _refused(conn, "payment_intents_amount_representable", "p8", "stripe", 1235, "KWD")
    _first(conn, "ok1", "adyen_eu", 200, "IDR")
    _first(conn, "ok2", "stripe", 1230, "KWD")
    _first(conn, "ok3", "adyen_eu", 100_000)
    # Nothing of a refused INSERT was written.
    assert conn.execute("SELECT count(*) FROM outbox.payments").fetchone() == (3,)


def test_card_rule_runs_before_the_registry(conn: psycopg.Connection) -> None:
    register_provider(conn, "stripe")
    error = _refused(
        conn,
        "payment_intents_metadata_not_card_number",
        "p1",
        "nope",
        1000,
        "EUR",
        '{"note": "4242 4242 4242 4242"}',
    )
    assert "4242" not in str(error)


def test_disabling_refuses_no_later_intent_of_a_started_payment(conn: psycopg.Connection) -> None:
    register_provider(conn, "stripe")
    _first(conn, "p1", "stripe")
    register_provider(conn, "stripe", enabled=False)
    _refused(conn, "payment_intents_provider_enabled", "p2", "stripe")
    conn.execute(
        "INSERT INTO outbox.payment_intents (payment_id, action, provider, amount_minor, currency)"
        " VALUES ('p1', 'capture', NULL, 500, 'EUR')"
    )
    assert conn.execute(
        "SELECT provider FROM outbox.payment_intents WHERE action = 'capture'"
    ).fetchone() == ("stripe",)


def test_unit_rules_match_the_adapters(conn: psycopg.Connection) -> None:
    stored = {
        (k, c): (e, m)
        for k, c, e, m in conn.execute(
            "SELECT kind, currency, exponent, multiple_of FROM outbox.provider_unit_rules"
        )
    }
    expected = {
        (kind, code): (rule.exponent, rule.multiple_of)
        for kind, units in (("stripe", STRIPE_UNITS), ("adyen", ADYEN_UNITS))
        for code, rule in units.overrides.items()
    }
    assert stored == expected


def test_bucket_agrees_with_the_pure_twin(conn: psycopg.Connection) -> None:
    ids = ["x", "pay_1", "ordre-é", "🙂", "a" * 200]
    got = [
        r[0]
        for r in conn.execute(
            "SELECT outbox.routing_bucket(id) FROM unnest(%s::text[]) WITH ORDINALITY AS t(id, n) ORDER BY n",
            (ids,),
        )
    ]
    assert got == [routing_bucket(i) for i in ids]


def test_named_provider_wins_and_no_rule_is_refused(conn: psycopg.Connection) -> None:
    register_provider(conn, "stripe")
    register_provider(conn, "canary", "adyen")
    _refused(conn, "payment_intents_provider_required", "p0", None)
    set_rule(
        conn,
        operator="alice",
        name="all",
        fields={"providers": ["canary"]},
        reason="t",
        create=True,
    )
    _first(conn, "p1", "stripe")
    _first(conn, "p2", None)
    rows = dict(conn.execute("SELECT payment_id, provider FROM outbox.payments").fetchall())
    assert rows == {"p1": "stripe", "p2": "canary"}


def test_rules_match_currency_amount_method_and_metadata(conn: psycopg.Connection) -> None:
    for name in ("stripe", "big", "gb", "jpy"):
        register_provider(conn, name)
    set_rule(
        conn,
        operator="a",
        name="fallback",
        fields={"providers": ["stripe"], "priority": 900},
        reason="t",
        create=True,
    )
    set_rule(
        conn,
        operator="a",
        name="big",
        fields={"providers": ["big"], "min_amount_minor": 100_000},
        reason="t",
        create=True,
    )
    set_rule(
        conn,
        operator="a",
        name="gb",
        fields={
            "providers": ["gb"],
            "metadata_key": "country",
            "metadata_values": ["GB"],
            "priority": 50,
        },
        reason="t",
        create=True,
    )
    set_rule(
        conn,
        operator="a",
        name="jpy",
        fields={
            "providers": ["jpy"],
            "currencies": ["JPY"],
            "payment_method_prefixes": ["pm_card_"],
            "priority": 10,
        },
        reason="t",
        create=True,
    )
    _first(conn, "small", None, 1000)
    _first(conn, "large", None, 200_000)
    _first(conn, "uk", None, 200_000, "EUR", '{"country": "GB"}')
    _first(conn, "yen", None, 1000, "JPY", '{"country": "GB"}')
    rows = dict(conn.execute("SELECT payment_id, provider FROM outbox.payments").fetchall())
    assert rows == {"small": "stripe", "large": "big", "uk": "gb", "yen": "jpy"}


def _insert_routed(conn: psycopg.Connection, prefix: str, n: int) -> None:
    conn.execute(
        "INSERT INTO outbox.payment_intents (payment_id, action, amount_minor, currency, payment_method)"
        " SELECT %s || g, 'authorize', 1000, 'EUR', 'pm_card_visa' FROM generate_series(1, %s) AS g",
        (prefix, n),
    )


def test_split_90_10_over_10000_payments_is_sticky(conn: psycopg.Connection) -> None:
    register_provider(conn, "stripe")
    register_provider(conn, "canary", "adyen")
    rule = set_rule(
        conn,
        operator="alice",
        name="canary",
        fields={"mode": "split", "providers": ["stripe", "canary"], "weights": [90, 10]},
        reason="start the canary",
        create=True,
    )
    _insert_routed(conn, "s", 10_000)
    routed = dict(conn.execute("SELECT payment_id, provider FROM outbox.payments").fetchall())
    # Payment by payment, the database chose what the pure twin chooses.
    targets = [Target("stripe", 90), Target("canary", 10)]
    assert routed == {pid: choose("split", targets, routing_bucket(pid)) for pid in routed}
    # Binomial(10,000, 0.1): mean 1,000, standard deviation 30; bounds at 5 sigma (850..1,150),
    # which a fair 10 % split leaves about once in 3.5 million runs.
    canary = payments_by_provider(conn, "s")["canary"]
    assert 850 <= canary <= 1150, canary
    assert conn.execute(
        "SELECT DISTINCT routing_rule_id, routing_rule_version FROM outbox.payments"
    ).fetchall() == [(rule["id"], 1)]
    # Every later intent names no provider and stays with its payment's.
    conn.execute(
        "INSERT INTO outbox.payment_intents (payment_id, action, amount_minor, currency)"
        " SELECT payment_id, 'capture', 1000, 'EUR' FROM outbox.payments"
    )
    moved = conn.execute(
        "SELECT count(*) FROM outbox.payment_intents AS i JOIN outbox.payments AS p USING (payment_id)"
        " WHERE i.provider <> p.provider"
    ).fetchone()
    assert moved == (0,)
    assert conn.execute(
        "SELECT count(*) FROM outbox.payment_intents WHERE action = 'capture'"
    ).fetchone() == (10_000,)


def test_rollback_to_zero_mid_run(conn: psycopg.Connection) -> None:
    register_provider(conn, "stripe")
    register_provider(conn, "canary", "adyen")
    set_rule(
        conn,
        operator="alice",
        name="canary",
        fields={"mode": "split", "providers": ["stripe", "canary"], "weights": [90, 10]},
        reason="start the canary",
        create=True,
    )
    _insert_routed(conn, "before", 2_000)
    before = dict(conn.execute("SELECT payment_id, provider FROM outbox.payments").fetchall())
    assert sum(p == "canary" for p in before.values()) > 100
    # Some canary payments are in flight: claimed by a relay.
    conn.execute(
        "UPDATE outbox.payment_intents SET status = 'in_flight', attempts = 1, lease_token = 1,"
        " lease_expires_at = now() + interval '1 minute' WHERE provider = 'canary'"
    )
    rolled = set_weights(
        conn,
        operator="bob",
        name="canary",
        weights={"canary": 0},
        reason="canary declines too much",
    )
    assert rolled["weights"] == [100 - 10, 0] and rolled["version"] == 2
    _insert_routed(conn, "after", 2_000)
    assert payments_by_provider(conn, "after") == {"stripe": 2_000}
    # Nothing started moved; later intents of canary payments still go to the canary.
    now = dict(
        conn.execute(
            "SELECT payment_id, provider FROM outbox.payments WHERE payment_id LIKE 'before%'"
        )
    )
    assert now == before
    conn.execute(
        "INSERT INTO outbox.payment_intents (payment_id, action, amount_minor, currency)"
        " SELECT payment_id, 'capture', 1000, 'EUR' FROM outbox.payments WHERE payment_id LIKE 'before%'"
    )
    assert conn.execute(
        "SELECT count(*) FROM outbox.payment_intents AS i JOIN outbox.payments AS p USING (payment_id)"
        " WHERE i.provider <> p.provider"
    ).fetchone() == (0,)
    assert conn.execute(
        "SELECT DISTINCT routing_rule_version FROM outbox.payments WHERE payment_id LIKE 'after%'"
    ).fetchall() == [(2,)]
    # The audit trail holds the change: who, why, before and after.
    row = conn.execute(
        "SELECT actor, reason, before ->> 'weights', after ->> 'weights', after ->> 'version' FROM outbox.audit_log"
        " WHERE entity = 'routing_rule' AND entity_id = 'canary' ORDER BY chain_seq DESC LIMIT 1"
    ).fetchone()
    assert row == ("operator:bob", "canary declines too much", "[90, 10]", "[90, 0]", "2")


def test_disabling_the_canary_provider_is_a_kill_switch(conn: psycopg.Connection) -> None:
    register_provider(conn, "stripe")
    register_provider(conn, "canary", "adyen")
    set_rule(
        conn,
        operator="alice",
        name="canary",
        fields={"mode": "split", "providers": ["stripe", "canary"], "weights": [50, 50]},
        reason="t",
        create=True,
    )
    set_provider(conn, operator="bob", name="canary", enabled=False, reason="outage")
    _insert_routed(conn, "k", 500)
    assert payments_by_provider(conn, "k") == {"stripe": 500}
    set_provider(conn, operator="bob", name="stripe", enabled=False, reason="both down")
    with pytest.raises(psycopg.Error) as caught:
        _insert_routed(conn, "none", 1)
    assert caught.value.diag.constraint_name == "payment_intents_provider_required"


def test_cli_providers_and_routes(db_url: str) -> None:
    env = {"RELAY_DATABASE_URL": db_url, "RELAY_OPERATOR": "carol"}
    assert (
        run_cli(
            "providers", "add", "stripe", "--kind", "stripe", "--reason", "first", env=env
        ).returncode
        == 0
    )
    done = run_cli(
        "providers",
        "add",
        "canary",
        "--kind",
        "adyen",
        "--currencies",
        "EUR,USD",
        "--limit",
        "EUR:50:",
        "--reason",
        "canary",
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert "EUR 50..-" in done.stdout
    done = run_cli(
        "routes", "add", "main", "stripe=90", "canary=10", "--reason", "canary 10%", env=env
    )
    assert done.returncode == 0, done.stderr
    assert "stripe=90.0%" in done.stdout and "canary=10.0%" in done.stdout
    done = run_cli("routes", "weights", "main", "canary=0", "--reason", "rollback", env=env)
    assert done.returncode == 0, done.stderr
    assert "canary=0.0%" in done.stdout
    shown = run_cli("routes", "show", "main", env=env)
    assert "operator:carol" in shown.stdout and "rollback" in shown.stdout
    unknown = run_cli(
        "routes", "add", "y", "stripe", "--currencies", "QQQ", "--reason", "r", env=env
    )
    assert unknown.returncode == 1 and "routing_rules_currencies_known" in unknown.stderr
    bad = run_cli("routes", "add", "x", "ghost", "--reason", "r", env=env)
    assert bad.returncode == 1 and "routing_rules_providers_registered" in bad.stderr
    listed = run_cli("providers", "list", env=env)
    assert "canary" in listed.stdout and "EUR,USD" in listed.stdout
    with psycopg.connect(db_url, autocommit=True) as conn:
        assert [r["version"] for r in list_rules(conn)] == [2]
        _first(conn, "p1", None)
        found = run_cli(
            "intents",
            "show",
            str(conn.execute("SELECT id FROM outbox.payment_intents").fetchone()[0]),
            env=env,
        )
    assert "routed to stripe by rule main version 2" in found.stdout, found.stdout
    status = run_cli("status", env=env)
    # canary: registered, enabled, no intent, no relay; stripe has a waiting intent, so the
    # louder UNSERVED line names it instead.
    assert "NOT SERVED canary" in status.stdout, status.stdout
    assert "UNSERVED stripe" in status.stdout and "NOT SERVED stripe" not in status.stdout


def test_audit_verify_checks_the_registry_against_its_chains(db_url: str) -> None:
    from relay.finance.audit import verify_database

    with psycopg.connect(db_url, autocommit=True) as conn:
        _first(conn, "legacy1", "legacy")  # registered by the first add below
        register_provider(conn, "stripe")
        register_provider(conn, "canary", "adyen", amount_limits={"EUR": {"max": 5000}})
        set_rule(
            conn,
            operator="a",
            name="main",
            reason="t",
            create=True,
            fields={"mode": "split", "providers": ["stripe", "canary"], "weights": [90, 10]},
        )
        set_weights(conn, operator="b", name="main", weights={"canary": 0}, reason="rollback")
        set_provider(conn, operator="b", name="canary", enabled=False, reason="off")
    report = verify_database(db_url)
    assert report.breaks == []
    # A change made behind the audit trigger's back is found.
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("ALTER TABLE outbox.routing_rules DISABLE TRIGGER routing_rules_audit")
        conn.execute("UPDATE outbox.routing_rules SET weights = '{50,50}'")
    broken = verify_database(db_url).breaks
    assert [(b.kind, b.entity, b.entity_id) for b in broken] == [
        ("tail_mismatch", "routing_rule", "main")
    ]


def test_a_routed_intent_that_may_hold_card_data_is_checked_then_routed(
    conn: psycopg.Connection,
) -> None:
    """A row the input rules check one by one (13 digits in a row, not a card) is not refused
    for its empty provider before routing runs; a card number still is, by the card rule."""
    register_provider(conn, "stripe")
    set_rule(
        conn, operator="a", name="all", fields={"providers": ["stripe"]}, reason="t", create=True
    )
    _first(conn, "p1", None, 1000, "EUR", '{"ref": "1111 1111 1111 1111"}')
    assert conn.execute("SELECT provider FROM outbox.payments").fetchone() == ("stripe",)
    _refused(
        conn,
        "payment_intents_metadata_not_card_number",
        "p2",
        None,
        1000,
        "EUR",
        '{"ref": "4242 4242 4242 4242"}',
    )


def test_providers_apply_registers_declared_providers_all_or_none(db_url: str) -> None:
    env = {"RELAY_DATABASE_URL": db_url}
    declared = (
        '[{"name": "stripe", "kind": "stripe"},'
        ' {"name": "adyen_eu", "kind": "adyen", "currencies": ["EUR"], "limits": {"EUR": {"min": 100}}}]'
    )
    done = run_cli(
        "providers", "apply", declared, "--operator", "helm:rel", "--reason", "release 1", env=env
    )
    assert done.returncode == 0, done.stderr
    again = run_cli(
        "providers", "apply", declared, "--operator", "helm:rel", "--reason", "release 2", env=env
    )
    assert again.returncode == 0, again.stderr
    bad = run_cli(
        "providers",
        "apply",
        '[{"name": "x", "kind": "stripe", "currencies": ["QQQ"]}]',
        "--operator",
        "helm:rel",
        "--reason",
        "r",
        env=env,
    )
    assert bad.returncode == 1 and "providers_currencies_known" in bad.stderr
    missing = run_cli("providers", "apply", '[{"name": "y"}]', "--reason", "r", env=env)
    assert missing.returncode == 2 and "providers[0].kind" in missing.stderr
    with psycopg.connect(db_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT name, kind, currencies, amount_limits FROM outbox.providers ORDER BY name"
        ).fetchall()
        assert rows == [
            ("adyen_eu", "adyen", ["EUR"], {"EUR": {"min": 100}}),
            ("stripe", "stripe", None, {}),
        ]
        # The second, identical apply changed nothing: one audit row per provider.
        audit = conn.execute(
            "SELECT entity_id, count(*) FROM outbox.audit_log WHERE entity = 'provider'"
            " GROUP BY 1 ORDER BY 1"
        ).fetchall()
        assert audit == [("adyen_eu", 1), ("stripe", 1)]


def test_four_eyes_hold_changes_that_send_traffic_not_rollbacks(db_url: str) -> None:
    from relay.operations.providers import (
        ApprovalRequested,
        approve_request,
        set_four_eyes,
    )
    from tests.login_roles import login_role

    with (
        login_role(db_url, "outbox_operator", prefix="alice") as alice_url,
        login_role(db_url, "outbox_operator", prefix="bob") as bob_url,
        psycopg.connect(alice_url, autocommit=True) as alice,
        psycopg.connect(bob_url, autocommit=True) as bob,
    ):
        set_provider(alice, operator="alice", name="stripe", kind="stripe", reason="t", create=True)
        set_provider(alice, operator="alice", name="canary", kind="adyen", reason="t", create=True)
        set_rule(
            alice,
            operator="alice",
            name="main",
            reason="t",
            create=True,
            fields={"mode": "split", "providers": ["stripe", "canary"], "weights": [100, 0]},
        )
        assert set_four_eyes(alice, operator="alice", on=True, reason="policy") is True
        # Raising the canary's weight waits for a second operator, and changes nothing yet.
        with pytest.raises(ApprovalRequested) as asked:
            set_weights(
                alice, operator="alice", name="main", weights={"canary": 10}, reason="canary 10%"
            )
        assert list_rules(alice)[0]["weights"] == [100, 0]
        request = asked.value.request_id
        # Not by the same login, even under another operator name.
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as same:
            approve_request(alice, operator="carol", request_id=request)
        assert same.value.diag.constraint_name == "registry_approval_second_operator"
        done = approve_request(bob, operator="bob", request_id=request)
        assert done["status"] == "applied" and done["approved_by"] == "bob"
        assert list_rules(bob)[0]["weights"] == [100, 10]
        with pytest.raises(psycopg.errors.NoDataFound) as again:
            approve_request(bob, operator="bob", request_id=request)  # applied once only
        assert again.value.diag.constraint_name == "registry_request_pending"
        # A rollback and a kill switch apply at once, by one operator.
        assert set_weights(
            alice, operator="alice", name="main", weights={"canary": 0}, reason="rollback"
        )["weights"] == [100, 0]
        assert (
            set_provider(alice, operator="alice", name="canary", enabled=False, reason="outage")[
                "enabled"
            ]
            is False
        )
        # Enabling it again, or turning four eyes off, needs two.
        with pytest.raises(ApprovalRequested):
            set_provider(alice, operator="alice", name="canary", enabled=True, reason="back")
        with pytest.raises(ApprovalRequested):
            set_four_eyes(alice, operator="alice", on=False, reason="tired of it")
        # The trail: the applied change names the approver and the request.
        row = alice.execute(
            "SELECT actor, reason FROM outbox.audit_log WHERE entity = 'routing_rule'"
            " AND after ->> 'weights' = '[100, 10]'"
        ).fetchone()
        assert row is not None and row[0] == "operator:bob"
        assert f"request {request} by alice, approved by bob" in row[1]
