"""Currency conversion with auditable rates (sql/0027, relay/domain/fx.py, relay/finance/fx.py,
`outbox-relay fx ...`).

What must hold, each tested below against a real PostgreSQL:

* outbox.convert_v1 is exact: it equals the rule computed on fractions in Python
  (relay.domain.fx.convert_minor) for exponents 0, 2 and 3, direct, inverse and cross
  rates; ties round half to even; a round trip stays within one minor unit where the
  target's minor unit is worth no more than the source's;
* no float is on the path: the fx modules hold no float, and no fx column, argument or
  result is a floating-point type;
* a rate older than outbox.fx_policy.max_rate_age is refused by name (fx_rate_stale), with
  the pair and the age in the message;
* a rate row cannot be updated, deleted or truncated by the app, relay or operator role,
  nor by the owner; one changed or removed behind the trigger's back is found by
  `audit verify`;
* a converted intent records its rate; a newer rate changes neither it nor what the
  recorded rate gives; an intent whose amount is not what its rate gives is refused;
* `fx import ecb` reads the ECB's format from a (fake) server, records each rate once.
"""

from __future__ import annotations

import ast
import itertools
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg.errors import InsufficientPrivilege

from provider_adapters.fake.rates import FakeRateServer, ecb_daily_xml
from relay.domain.fx import (
    FxDocumentError,
    convert_minor,
    ecb_publication_time,
    half_even,
    parse_ecb_xml,
    parse_rates_csv,
)
from relay.finance.audit import verify_database
from relay.infra.queries import QUERIES
from tests.login_roles import login_role
from tests.support.cli import run_cli

ROOT = Path(__file__).resolve().parent.parent
NOW = datetime.now(UTC)
SHA = b"\x01" * 32
# Currencies by exponent (outbox.currencies, ISO 4217).
BY_EXPONENT = {0: ("JPY", "ISK", "KRW"), 2: ("EUR", "USD", "GBP"), 3: ("KWD", "BHD", "JOD")}
EXPONENT = {code: e for e, codes in BY_EXPONENT.items() for code in codes}
# Rows of one test never share a publication time: the latest inserted is the one in force.
_TICK = itertools.count(1)


def tick() -> timedelta:
    return timedelta(microseconds=next(_TICK))


def add_rate(
    conn: psycopg.Connection,
    base: str,
    quote: str,
    rate: Decimal | str,
    *,
    published: datetime | None = None,
    kind: str = "ecb",
) -> int:
    published = (published or NOW - timedelta(hours=1)) + tick()
    row = conn.execute(
        "INSERT INTO outbox.fx_rates (base, quote, rate, source_kind, source_name, "
        "source_sha256, operator, published_at, valid_from) "
        "VALUES (%s, %s, %s, %s, 'test', %s, %s, %s, %s) RETURNING id",
        (
            base,
            quote,
            Decimal(rate),
            kind,
            SHA,
            "alice" if kind == "manual" else None,
            published,
            published,
        ),
    ).fetchone()
    assert row is not None
    return int(row[0])


def convert_sql(conn: psycopg.Connection, amount: int, src: str, dst: str, **kw: Any) -> Any:
    args = ", ".join(f"{k} => %({k})s" for k in kw)
    return conn.execute(
        "SELECT converted_minor, rate_id, via_rate_id, rate_age FROM outbox.convert_v1("
        f"%(a)s, %(s)s, %(d)s{', ' + args if args else ''})",
        {"a": amount, "s": src, "d": dst, **kw},
    ).fetchone()


def at_rates(
    conn: psycopg.Connection, amount: int, src: str, dst: str, r1: int, r2: int | None = None
) -> int:
    row = conn.execute(
        "SELECT outbox.convert_at_rates_v1(%s, %s, %s, %s, %s)", (amount, src, dst, r1, r2)
    ).fetchone()
    assert row is not None
    return int(row[0])


# -- the rule, pure --------------------------------------------------------------------------


def test_half_even_ties_go_to_the_even_neighbour() -> None:
    assert [half_even(Fraction(n, 2)) for n in (1, 3, 5, 7, -1, -3)] == [0, 2, 2, 4, 0, -2]
    assert half_even(Fraction(251, 100)) == 3
    assert half_even(Fraction(249, 100)) == 2


def test_ecb_publication_time_is_16_00_in_frankfurt() -> None:
    assert ecb_publication_time(date(2026, 12, 4)) == datetime(2026, 12, 4, 15, tzinfo=UTC)
    assert ecb_publication_time(date(2026, 7, 3)) == datetime(2026, 7, 3, 14, tzinfo=UTC)


def test_ecb_document_is_parsed_exactly_and_hostile_ones_refused() -> None:
    doc = parse_ecb_xml(ecb_daily_xml("2026-12-04", {"USD": "1.0876", "JPY": "161.23"}))
    assert [(r.base, r.quote, r.rate) for r in doc.rates] == [
        ("EUR", "USD", Decimal("1.0876")),
        ("EUR", "JPY", Decimal("161.23")),
    ]
    assert all(type(r.rate) is Decimal for r in doc.rates)
    bomb = (
        b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">]>'
        b"<gesmes:Envelope xmlns:gesmes='http://www.gesmes.org/xml/2002-08-01'/>"
    )
    with pytest.raises(FxDocumentError, match="DOCTYPE or an ENTITY"):
        parse_ecb_xml(bomb)
    with pytest.raises(FxDocumentError, match="rate '1e3' is not a positive decimal"):
        parse_ecb_xml(ecb_daily_xml("2026-12-04", {"USD": "1e3"}))
    with pytest.raises(FxDocumentError, match="root element"):
        parse_ecb_xml(b"<rates/>")


def test_csv_is_parsed_and_bad_lines_named() -> None:
    doc = parse_rates_csv(
        b"# our treasury's rates\nbase,quote,rate,published_at\nEUR,USD,1.0876,2026-12-04T15:00:00Z\n"
    )
    assert doc.rates[0].rate == Decimal("1.0876")
    with pytest.raises(FxDocumentError, match=r"CSV line 2: published_at .* has no time zone"):
        parse_rates_csv(b"base,quote,rate,published_at\nEUR,USD,1.0876,2026-12-04T15:00:00\n")
    with pytest.raises(FxDocumentError, match="CSV line 2: rate '-1' is not a positive decimal"):
        parse_rates_csv(b"base,quote,rate,published_at\nEUR,USD,-1,2026-12-04T15:00:00Z\n")


# -- no float on the path ---------------------------------------------------------------------

FX_MODULES = ("relay/domain/fx.py", "relay/finance/fx.py", "relay/cli/fx.py")


@pytest.mark.parametrize("module", FX_MODULES)
def test_no_float_in_the_fx_modules(module: str) -> None:
    tree = ast.parse((ROOT / module).read_text())
    floats = [
        f"line {node.lineno}"
        for node in ast.walk(tree)
        if (isinstance(node, ast.Name) and node.id == "float")
        or (isinstance(node, ast.Constant) and isinstance(node.value, float))
    ]
    assert floats == [], f"{module} uses a float: {floats}"


def test_no_floating_point_type_in_the_rates_or_the_conversion(conn: psycopg.Connection) -> None:
    columns = conn.execute(
        "SELECT table_name || '.' || column_name, data_type FROM information_schema.columns "
        "WHERE table_schema = 'outbox' AND (table_name = 'fx_rates' OR column_name IN "
        "('original_amount_minor', 'fx_rate_id', 'fx_via_rate_id'))"
    ).fetchall()
    assert dict(columns)["fx_rates.rate"] == "numeric"
    assert not [c for c, t in columns if t in ("real", "double precision")]
    arguments = conn.execute(
        "SELECT p.proname, format_type(t, NULL) FROM pg_proc AS p, "
        "unnest(coalesce(p.proallargtypes, p.proargtypes::oid[]) || p.prorettype) AS t "
        "WHERE p.pronamespace = 'outbox'::regnamespace AND (p.proname LIKE 'fx%%' OR "
        "p.proname LIKE 'convert%%')"
    ).fetchall()
    assert {name for name, _ in arguments} >= {
        "convert_v1",
        "convert_at_rates_v1",
        "fx_convert_with",
    }
    assert not [a for a in arguments if a[1] in ("real", "double precision")]


# -- conversion, exactly ---------------------------------------------------------------------

rates = st.decimals(
    min_value=Decimal("0.0001"), max_value=Decimal("5000"), places=6, allow_nan=False
).filter(lambda d: d > 0)
exponents = st.sampled_from((0, 2, 3))
amounts = st.integers(min_value=1, max_value=10**12)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(rate=rates, e_from=exponents, e_to=exponents, amount=amounts)
def test_sql_conversion_equals_the_exact_rule_direct_and_inverse(
    conn: psycopg.Connection, rate: Decimal, e_from: int, e_to: int, amount: int
) -> None:
    src, dst = BY_EXPONENT[e_from][0], BY_EXPONENT[e_to][1]
    rid = add_rate(conn, src, dst, rate)
    assert at_rates(conn, amount, src, dst, rid) == convert_minor(amount, e_from, e_to, rate)
    assert at_rates(conn, amount, dst, src, rid) == convert_minor(
        amount, e_to, e_from, Fraction(1) / Fraction(rate)
    )


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(r_from=rates, r_to=rates, e_from=exponents, e_to=exponents, amount=amounts)
def test_cross_rate_through_eur_is_exact(
    conn: psycopg.Connection, r_from: Decimal, r_to: Decimal, e_from: int, e_to: int, amount: int
) -> None:
    src, dst = BY_EXPONENT[e_from][2], BY_EXPONENT[e_to][1]  # never EUR, never equal
    published = NOW - timedelta(minutes=5) + tick()
    a = add_rate(conn, "EUR", src, r_from, published=published)
    b = add_rate(conn, "EUR", dst, r_to, published=published)
    converted, rate_id, via, _ = convert_sql(conn, amount, src, dst)
    assert (rate_id, via) == (a, b)
    assert converted == convert_minor(amount, e_from, e_to, Fraction(r_to) / Fraction(r_from))


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(rate=rates, e_from=exponents, e_to=exponents, amount=amounts)
def test_round_trip_stays_within_one_minor_unit(
    conn: psycopg.Connection, rate: Decimal, e_from: int, e_to: int, amount: int
) -> None:
    src, dst = BY_EXPONENT[e_from][0], BY_EXPONENT[e_to][1]
    rid = add_rate(conn, src, dst, rate)
    there = at_rates(conn, amount, src, dst, rid)
    back = at_rates(conn, there, dst, src, rid)
    # One target minor unit is worth `unit` source minor units: rounding there loses up to
    # half of it, rounding back up to half a source unit.
    unit = Fraction(10) ** (e_from - e_to) / Fraction(rate)
    if unit <= 1:
        assert abs(back - amount) <= 1
    else:
        assert abs(back - amount) <= unit / 2 + Fraction(1, 2)


@pytest.mark.parametrize(
    ("amount", "src", "dst", "rate", "expected"),
    [
        (1, "EUR", "USD", "2.5", 2),  # 2.5 cents -> 2 (even)
        (3, "EUR", "USD", "2.5", 8),  # 7.5 cents -> 8 (even)
        (5, "EUR", "JPY", "1", 0),  # 0.05 EUR = 0.05 JPY -> 0
        (50, "EUR", "JPY", "1", 0),  # 0.5 JPY -> 0 (even), not 1 as round() would
        (150, "EUR", "JPY", "1", 2),  # 1.5 JPY -> 2
        (1, "JPY", "KWD", "0.0025", 2),  # 2.5 fils -> 2
        (3, "JPY", "KWD", "0.0025", 8),  # 7.5 fils -> 8
    ],
)
def test_ties_round_half_to_even(
    conn: psycopg.Connection, amount: int, src: str, dst: str, rate: str, expected: int
) -> None:
    rid = add_rate(conn, src, dst, rate)
    assert at_rates(conn, amount, src, dst, rid) == expected
    assert convert_sql(conn, amount, src, dst)[0] == expected


def test_direct_rate_wins_over_inverse_and_cross_and_newest_wins(conn: psycopg.Connection) -> None:
    add_rate(conn, "EUR", "USD", "1.10", published=NOW - timedelta(days=1))
    add_rate(conn, "EUR", "JPY", "160", published=NOW - timedelta(days=1))
    newer = add_rate(conn, "EUR", "USD", "1.20", published=NOW - timedelta(hours=2))
    assert convert_sql(conn, 10000, "EUR", "USD")[:3] == (12000, newer, None)
    assert convert_sql(conn, 12000, "USD", "EUR")[:3] == (10000, newer, None)
    direct = add_rate(conn, "USD", "JPY", "150")
    assert convert_sql(conn, 100, "USD", "JPY")[:3] == (150, direct, None)
    # At a time before the newer rows, the older ones are in force.
    before = NOW - timedelta(hours=12)
    assert convert_sql(conn, 10000, "EUR", "USD", at=before)[0] == 11000


def test_missing_rate_and_unknown_currency_are_named(conn: psycopg.Connection) -> None:
    with pytest.raises(
        psycopg.errors.NoDataFound, match="fx_rate_missing: no rate converts EUR to GBP"
    ):
        convert_sql(conn, 100, "EUR", "GBP")
    with pytest.raises(
        psycopg.errors.ForeignKeyViolation, match="fx_currency_unknown: to_ccy 'XYZ'"
    ):
        convert_sql(conn, 100, "EUR", "XYZ")


def test_stale_rate_is_refused_by_name_with_pair_and_age(conn: psycopg.Connection) -> None:
    add_rate(conn, "EUR", "USD", "1.0876", published=NOW - timedelta(days=6, hours=3))
    with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState) as refused:
        # At the module's NOW, not the server's clock: the age in the message is exact.
        convert_sql(conn, 10000, "EUR", "USD", at=NOW)
    assert refused.value.diag.constraint_name == "fx_rate_stale"
    message = str(refused.value)
    assert "fx_rate_stale: rate" in message and "EUR/USD" in message
    assert "6 days 0" in message and "at most 5 days" in message
    # A weekend's age (Friday 16:00 CET to Monday) is within the default.
    add_rate(conn, "EUR", "USD", "1.09", published=NOW - timedelta(days=3, hours=1))
    assert convert_sql(conn, 10000, "EUR", "USD")[0] == 10900
    # A stricter limit per call, and the policy's, both apply.
    with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState, match="at most 1 day"):
        convert_sql(conn, 10000, "EUR", "USD", max_age=timedelta(days=1))
    conn.execute("UPDATE outbox.fx_policy SET max_rate_age = interval '2 days'")
    with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState, match="at most 2 days"):
        convert_sql(conn, 10000, "EUR", "USD")


def test_cross_rate_is_as_stale_as_its_staler_leg(conn: psycopg.Connection) -> None:
    add_rate(conn, "EUR", "USD", "1.08", published=NOW - timedelta(hours=1))
    old = add_rate(conn, "EUR", "JPY", "160", published=NOW - timedelta(days=9))
    with pytest.raises(
        psycopg.errors.ObjectNotInPrerequisiteState, match=f"rate {old} for EUR/JPY"
    ):
        convert_sql(conn, 100, "USD", "JPY")


# -- immutable, audited ----------------------------------------------------------------------


@pytest.fixture
def role_urls(db_url: str) -> Iterator[dict[str, str]]:
    with (
        login_role(db_url, "outbox_app", prefix="app") as app,
        login_role(db_url, "outbox_relay", prefix="relay") as relay,
        login_role(db_url, "outbox_operator", prefix="operator") as operator,
    ):
        yield {"app": app, "relay": relay, "operator": operator, "owner": db_url}


def test_no_role_can_update_delete_or_truncate_a_rate(
    conn: psycopg.Connection, role_urls: dict[str, str]
) -> None:
    rid = add_rate(conn, "EUR", "USD", "1.0876")
    for role, url in role_urls.items():
        with psycopg.connect(url, autocommit=True) as as_role:
            for statement in (
                f"UPDATE outbox.fx_rates SET rate = 2 WHERE id = {rid}",
                f"DELETE FROM outbox.fx_rates WHERE id = {rid}",
                "TRUNCATE outbox.fx_rates CASCADE",
            ):
                with pytest.raises(
                    (InsufficientPrivilege, psycopg.errors.RaiseException)
                ) as refused:
                    as_role.execute(statement)  # type: ignore[arg-type]
                assert refused.value.sqlstate == "42501", (role, statement)
                if role == "owner":  # a superuser passes the grants; the trigger stops it
                    assert "fx_rates_immutable" in str(refused.value), statement
    row = conn.execute("SELECT rate FROM outbox.fx_rates WHERE id = %s", (rid,)).fetchone()
    assert row == (Decimal("1.0876"),)


def test_relay_and_operator_may_insert_the_app_may_not(
    conn: psycopg.Connection, role_urls: dict[str, str]
) -> None:
    for role in ("relay", "operator"):
        with psycopg.connect(role_urls[role], autocommit=True) as as_role:
            as_role.execute(
                "INSERT INTO outbox.fx_rates (base, quote, rate, source_kind, source_name, "
                "source_sha256, published_at, valid_from) VALUES ('EUR', 'USD', 1.1, 'ecb', "
                "%s, %s, now(), now())",
                (role, SHA),
            )
    with psycopg.connect(role_urls["app"], autocommit=True) as app:
        with pytest.raises(InsufficientPrivilege):
            app.execute(
                "INSERT INTO outbox.fx_rates (base, quote, rate, source_kind, source_name, "
                "source_sha256, published_at, valid_from) VALUES ('EUR', 'USD', 1.1, 'ecb', "
                "'app', %s, now(), now())",
                (SHA,),
            )
        assert convert_sql(app, 1000, "EUR", "USD")[0] == 1100
    recorded = conn.execute("SELECT recorded_by FROM outbox.fx_rates ORDER BY id").fetchall()
    assert [r[0] for r in recorded] == [
        f"db:{psycopg.conninfo.conninfo_to_dict(role_urls[r])['user']}"
        for r in ("relay", "operator")
    ]


def test_every_rate_insert_is_in_the_audit_trail_and_verified(
    conn: psycopg.Connection, db_url: str
) -> None:
    rid = add_rate(conn, "EUR", "USD", "1.0876")
    row = conn.execute(
        "SELECT operation, after ->> 'rate', after ->> 'source_sha256' FROM outbox.audit_log "
        "WHERE entity = 'fx_rate' AND entity_id = %s",
        (str(rid),),
    ).fetchone()
    assert row == ("insert", "1.0876", SHA.hex())
    report = verify_database(db_url)
    assert report.intact and report.live_rows_checked >= 1


def test_a_rate_changed_or_deleted_behind_the_trigger_is_caught_by_audit_verify(
    conn: psycopg.Connection, db_url: str
) -> None:
    changed = add_rate(conn, "EUR", "USD", "1.0876")
    deleted = add_rate(conn, "EUR", "JPY", "161.23")
    assert verify_database(db_url).intact
    with conn.transaction():
        conn.execute("ALTER TABLE outbox.fx_rates DISABLE TRIGGER fx_rates_immutable")
        conn.execute("GRANT UPDATE, DELETE ON outbox.fx_rates TO CURRENT_USER")
        conn.execute("UPDATE outbox.fx_rates SET rate = 1.0877 WHERE id = %s", (changed,))
        conn.execute("DELETE FROM outbox.fx_rates WHERE id = %s", (deleted,))
        conn.execute("ALTER TABLE outbox.fx_rates ENABLE TRIGGER fx_rates_immutable")
    report = verify_database(db_url)
    found = {(b.entity, b.entity_id, b.kind) for b in report.breaks}
    assert found == {
        ("fx_rate", str(changed), "tail_mismatch"),
        ("fx_rate", str(deleted), "tail_mismatch"),
    }
    result = run_cli("audit", "verify", env={"RELAY_DATABASE_URL": db_url})
    assert result.returncode != 0
    assert f"fx_rate {changed}" in result.stdout + result.stderr


# -- converted intents ---------------------------------------------------------------------


def insert_converted(conn: psycopg.Connection, payment_id: str, **values: Any) -> int:
    row = {
        "payment_id": payment_id,
        "action": "charge",
        "provider": "stripe",
        "currency": "USD",
        "payment_method": "pm_card_visa",
        **values,
    }
    columns = ", ".join(row)
    found = conn.execute(
        f"INSERT INTO outbox.payment_intents ({columns}) VALUES "
        f"({', '.join(['%s'] * len(row))}) RETURNING id",  # type: ignore[arg-type]
        tuple(row.values()),
    ).fetchone()
    assert found is not None
    return int(found[0])


def test_app_converts_in_its_transaction_and_the_intent_keeps_its_rate(
    conn: psycopg.Connection, role_urls: dict[str, str], db_url: str
) -> None:
    first = add_rate(conn, "EUR", "USD", "1.0876")
    with psycopg.connect(role_urls["app"]) as app, app.transaction():
        amount, rate_id, via, _ = convert_sql(app, 10000, "EUR", "USD")
        intent = insert_converted(
            app,
            "pay-fx-1",
            amount_minor=amount,
            original_amount_minor=10000,
            original_currency="EUR",
            fx_rate_id=rate_id,
            fx_via_rate_id=via,
        )
    assert (amount, rate_id) == (10876, first)
    # A newer rate changes new conversions, not the recorded one.
    add_rate(conn, "EUR", "USD", "1.2000", published=NOW - timedelta(minutes=1))
    assert convert_sql(conn, 10000, "EUR", "USD")[0] == 12000
    recorded = conn.execute(
        "SELECT amount_minor, original_amount_minor, original_currency, fx_rate_id, "
        "outbox.convert_at_rates_v1(original_amount_minor, original_currency, currency, "
        "fx_rate_id, fx_via_rate_id) FROM outbox.payment_intents WHERE id = %s",
        (intent,),
    ).fetchone()
    assert recorded == (10876, 10000, "EUR", first, 10876)
    # The refund of what the customer paid, at the charge's rate: the original amount back.
    assert at_rates(conn, 10876, "USD", "EUR", first) == 10000
    # The relay's first transaction on the intent (its claim) writes the creation rows.
    conn.execute(
        QUERIES["claim_intents"],
        {"instance": "r1", "provider": "stripe", "now": None, "limit": 10, "lease_seconds": 30},
    )
    audit = conn.execute(
        "SELECT after ->> 'fx_rate_id', after ->> 'original_amount_minor' FROM outbox.audit_log "
        "WHERE entity = 'intent' AND entity_id = %s AND operation = 'insert'",
        (str(intent),),
    ).fetchone()
    assert audit == (str(first), "10000")
    assert verify_database(db_url).intact
    shown = run_cli("intents", "show", str(intent), env={"RELAY_DATABASE_URL": db_url})
    assert shown.returncode == 0, shown.stderr
    assert "converted from  100.00 EUR" in shown.stdout
    assert f"at rate 1.0876 (rate {first}" in shown.stdout
    assert "108.76 USD" in shown.stdout


@pytest.mark.parametrize(
    ("values", "constraint"),
    [
        (
            {"amount_minor": 10877, "original_amount_minor": 10000, "original_currency": "EUR"},
            "payment_intents_fx_amount_matches_rate",
        ),
        ({"amount_minor": 10876, "original_amount_minor": 10000}, "payment_intents_fx_all_or_none"),
        (
            {"amount_minor": 10876, "original_amount_minor": 10000, "original_currency": "USD"},
            "payment_intents_original_currency_differs",
        ),
        (
            {"amount_minor": 10876, "original_amount_minor": -5, "original_currency": "EUR"},
            "payment_intents_original_amount_positive",
        ),
    ],
)
def test_inconsistent_conversion_is_refused_by_name(
    conn: psycopg.Connection, values: dict[str, Any], constraint: str
) -> None:
    rid = add_rate(conn, "EUR", "USD", "1.0876")
    with pytest.raises(psycopg.errors.CheckViolation) as refused:
        insert_converted(conn, "pay-bad", fx_rate_id=rid, **values)
    assert refused.value.diag.constraint_name == constraint
    assert conn.execute("SELECT count(*) FROM outbox.payment_intents").fetchone() == (0,)


# -- the commands --------------------------------------------------------------------------


def test_fx_import_ecb_from_the_fake_server_show_convert_history(
    conn: psycopg.Connection, db_url: str
) -> None:
    today = datetime.now(UTC).date() - timedelta(days=1)  # published: 16:00 CET yesterday
    env = {"RELAY_DATABASE_URL": db_url, "RELAY_OPERATOR": "alice"}
    with FakeRateServer(today.isoformat()) as fake:
        first = run_cli("fx", "import", "ecb", "--url", fake.url, env=env)
        again = run_cli("fx", "import", "ecb", "--url", fake.url, env=env)
    assert first.returncode == 0, first.stderr
    assert "6 rate(s)" in first.stdout and "6 recorded, 0 already recorded" in first.stdout
    assert "0 recorded, 6 already recorded" in again.stdout
    rows = conn.execute(
        "SELECT base, quote, rate::text, source_kind, source_url, recorded_by, published_at "
        "FROM outbox.fx_rates WHERE quote = 'USD'"
    ).fetchall()
    assert rows == [
        ("EUR", "USD", "1.0876", "ecb", fake.url, "operator:alice", ecb_publication_time(today))
    ]
    shown = run_cli("fx", "show", env=env)
    assert "EUR/USD" in shown.stdout and "1.0876" in shown.stdout
    converted = run_cli("fx", "convert", "100.00", "USD", "KWD", env=env)
    assert converted.returncode == 0, converted.stderr
    expected = convert_minor(
        10000, 2, 3, Fraction(Decimal("0.33471")) / Fraction(Decimal("1.0876"))
    )
    assert "100.00 USD (10000 minor units, exponent 2)" in converted.stdout
    assert f"({expected} minor units, exponent 3)" in converted.stdout
    assert "cross rate" in converted.stdout
    history = run_cli("fx", "history", "USD", "EUR", env=env)
    assert "EUR/USD" in history.stdout and "operator:alice" in history.stdout


def test_fx_import_refuses_a_bad_document_whole(
    conn: psycopg.Connection, db_url: str, tmp_path: Path
) -> None:
    path = tmp_path / "rates.csv"
    path.write_text(
        "base,quote,rate,published_at\nEUR,USD,1.08,2026-12-04T15:00:00Z\nEUR,XXX,2,2026-12-04T15:00:00Z\n"
    )
    result = run_cli("fx", "import", "csv", "--file", str(path), env={"RELAY_DATABASE_URL": db_url})
    assert result.returncode == 1
    assert "not in outbox.currencies" in result.stderr and "nothing imported" in result.stderr
    assert conn.execute("SELECT count(*) FROM outbox.fx_rates").fetchone() == (0,)


def test_fx_convert_names_a_stale_rate(conn: psycopg.Connection, db_url: str) -> None:
    add_rate(conn, "EUR", "USD", "1.0876", published=NOW - timedelta(days=8))
    result = run_cli("fx", "convert", "10", "EUR", "USD", env={"RELAY_DATABASE_URL": db_url})
    assert result.returncode == 1
    assert "fx_rate_stale" in result.stderr and "EUR/USD" in result.stderr


# -- the relay's periodic fetch and the rate-age gauge --------------------------------------


def _sample(name: str, **labels: str) -> float | None:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name, labels)


@pytest.mark.anyio
async def test_periodic_ecb_fetch_records_once_survives_failures_and_feeds_the_age_gauge(
    db_url: str, conn: psycopg.Connection
) -> None:
    import aiohttp
    import anyio

    from relay.infra.db import Database
    from relay.service.depth import DepthSampler
    from relay.service.fx_fetch import EcbFetcher
    from tests.support.waiting import wait_until

    day = (datetime.now(UTC) - timedelta(days=2)).date()
    db = Database(db_url, pool_size=2, name="relay-fx")
    await db.open()
    try:
        with FakeRateServer(day.isoformat(), {"USD": "1.0876", "JPY": "161.23"}) as fake:
            fetcher = EcbFetcher(db, fake.url, interval_seconds=3_600)
            async with aiohttp.ClientSession() as session:
                first = await fetcher.fetch_once(session)
                second = await fetcher.fetch_once(session)  # another relay of the fleet
            assert (first.inserted, second.inserted) == (2, 0)
            actors = conn.execute("SELECT DISTINCT recorded_by FROM outbox.fx_rates").fetchall()
            assert actors == [("relay:relay-fx",)]

            failed_before = _sample("outbox_relay_fx_fetches_total", result="failed") or 0.0
            fake.fail_status = 503
            fetcher = EcbFetcher(db, fake.url, interval_seconds=0.01)
            async with anyio.create_task_group() as tg:
                tg.start_soon(fetcher.run)
                await wait_until(
                    lambda: (
                        (_sample("outbox_relay_fx_fetches_total", result="failed") or 0)
                        >= failed_before + 2
                    ),
                    "two failed fetches counted, the loop still running",
                )
                tg.cancel_scope.cancel()

        now = datetime.now(UTC)
        await DepthSampler(db, providers=["stripe"]).sample(now=now)
        age = _sample("outbox_relay_fx_rate_age_seconds", base="EUR", quote="USD", source="ecb")
        assert age == (now - ecb_publication_time(day)).total_seconds()
    finally:
        await db.close()


def test_ledger_check_names_an_fx_posting_without_a_succeeded_refund(
    conn: psycopg.Connection, db_url: str
) -> None:
    from relay.finance.ledger import check_ledger

    rid = add_rate(conn, "EUR", "USD", "1.0876")
    intent = insert_converted(
        conn,
        "pay-fx-x",
        amount_minor=10876,
        original_amount_minor=10000,
        original_currency="EUR",
        fx_rate_id=rid,
    )
    assert check_ledger(db_url).problems == []
    conn.execute(
        "INSERT INTO outbox.fx_postings (kind, payment_id, intent_id, provider, source_currency, "
        "source_amount_minor, currency, expected_minor, actual_minor, our_rate_id) VALUES "
        "('refund_at_charge_rate', 'pay-fx-x', %s, 'stripe', 'USD', 10876, 'EUR', 10000, 9000, %s)",
        (intent, rid),
    )
    problems = check_ledger(db_url).problems
    assert [(p.kind, p.subject) for p in problems] == [("fx_posting", "FX posting 1")]
    assert f"names intent {intent}, which is a pending charge" in problems[0].message


def test_fx_record_a_manual_rate_names_its_operator(conn: psycopg.Connection, db_url: str) -> None:
    env = {"RELAY_DATABASE_URL": db_url}
    done = run_cli("fx", "record", "eur", "usd", "1.0901", "--operator", "alice", env=env)
    assert done.returncode == 0, done.stderr
    assert "1 EUR = 1.0901 USD" in done.stdout and "by operator alice" in done.stdout
    row = conn.execute(
        "SELECT source_kind, operator, recorded_by, rate::text, length(source_sha256) "
        "FROM outbox.fx_rates"
    ).fetchone()
    assert row == ("manual", "alice", "operator:alice", "1.0901", 32)
    assert convert_sql(conn, 10000, "EUR", "USD")[0] == 10901
    bad = run_cli("fx", "record", "EUR", "USD", "1,09", "--operator", "alice", env=env)
    assert bad.returncode == 1 and "is not a positive decimal" in bad.stderr


def test_an_fx_posting_changed_behind_the_trigger_is_caught_by_audit_verify(
    conn: psycopg.Connection, db_url: str
) -> None:
    rid = add_rate(conn, "EUR", "USD", "1.0876")
    conn.execute(
        "INSERT INTO outbox.fx_postings (kind, payment_id, provider, provider_reference, "
        "source_currency, source_amount_minor, currency, expected_minor, actual_minor, "
        "our_rate_id, provider_rate) VALUES ('settlement', 'pay-s', 'stripe', 'txn_1', 'USD', "
        "10876, 'EUR', 10000, 9720, %s, '0.8937')",
        (rid,),
    )
    assert verify_database(db_url).intact
    with conn.transaction():
        conn.execute("ALTER TABLE outbox.fx_postings DISABLE TRIGGER fx_postings_append_only")
        conn.execute("GRANT UPDATE ON outbox.fx_postings TO CURRENT_USER")
        conn.execute("UPDATE outbox.fx_postings SET actual_minor = 10000")
        conn.execute("ALTER TABLE outbox.fx_postings ENABLE TRIGGER fx_postings_append_only")
    breaks = verify_database(db_url).breaks
    assert [(b.entity, b.entity_id, b.kind) for b in breaks] == [
        ("fx_posting", "1", "tail_mismatch")
    ]
