"""The operator commands' work without a command line: plain calls return typed results.

relay/operations and relay/finance hold the queries and the logic; relay/cli parses
arguments and prints. These tests call the domain functions directly (no argparse, no
subprocess) and check the layering itself: no module below the command line imports
argparse or relay.cli, or prints.
"""

from __future__ import annotations

import ast
from pathlib import Path

import psycopg
import pytest

from relay.cli.dead_letters import describe_filters
from relay.cli.operator_args import age, operator_name
from relay.cli.status import render_status
from relay.operations.dead_letters import (
    Action,
    Filters,
    act_on_database,
    list_dead_in_database,
    natural_key,
)
from relay.operations.intents import find_intent
from relay.operations.operators import check_operator_name, parse_age
from relay.operations.status import ProviderDepth, RelayInstance, Status, collect_status
from tests.support.dead_intents import history, insert, make_dead, state

ROOT = Path(__file__).resolve().parent.parent
BELOW_THE_COMMAND_LINE = ("domain", "core", "events", "finance", "operations", "infra", "service")


def _offences(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        offending = [n for n in names if n == "argparse" or f"{n}.".startswith("relay.cli.")]
        if offending:
            found.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {offending[0]}")
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "print"
        ):
            found.append(f"{path.relative_to(ROOT)}:{node.lineno} calls print")
    return found


def test_no_module_below_the_command_line_parses_arguments_or_prints() -> None:
    modules = [
        path
        for package in BELOW_THE_COMMAND_LINE
        for path in sorted((ROOT / "relay" / package).rglob("*.py"))
    ]
    assert len(modules) > 30  # the packages were found
    assert [offence for path in modules for offence in _offences(path)] == []


def test_ages_and_operator_names_are_checked_without_argparse() -> None:
    assert parse_age("1h30m") == 5_400.0 and parse_age(" 2D ") == 172_800.0
    with pytest.raises(ValueError, match="not an age like 45s"):
        parse_age("3x")
    assert check_operator_name("  alice ") == "alice"
    with pytest.raises(ValueError, match="must name who acts"):
        check_operator_name("   ")
    # The command line's types say the same, as argparse errors.
    assert age("45s") == 45.0 and operator_name("bob") == "bob"


def test_filters_are_described_for_people() -> None:
    assert describe_filters(Filters()) == "all"
    assert (
        describe_filters(Filters("stripe", "rate_limited", 7_200.0))
        == "provider stripe, error_code rate_limited, dead for over 2h 0m"
    )


def test_status_renders_from_its_typed_result() -> None:
    status = Status(
        schema_version="0015",
        providers={"stripe": ProviderDepth({"pending": 2, "dead": 1}, 75.0)},
        dead_letters=1,
        unpublished_events=0,
        oldest_unpublished_event_seconds=0.0,
    )
    text = render_status(status).splitlines()
    assert text[0] == "schema version 0015"
    assert text[2].split() == ["stripe", "0", "2", "0", "0", "0", "1", "0", "1m", "15s"]
    assert text[3].startswith("running relays: none reported")
    assert "dead intents: 1 (they block their payments" in text[5]
    assert text[6] == "unpublished events: 0"
    assert status.to_json()["providers"] == {
        "stripe": {"counts": {"pending": 2, "dead": 1}, "oldest_pending_seconds": 75.0, "relays": 0}
    }


def test_status_names_the_providers_no_running_relay_serves() -> None:
    status = Status(
        schema_version="0018",
        providers={
            "paypal": ProviderDepth({"pending": 2, "blocked": 1}, 5.0, relays=0),
            "stripe": ProviderDepth({"pending": 1}, 1.0, relays=2),
        },
        dead_letters=0,
        unpublished_events=0,
        oldest_unpublished_event_seconds=0.0,
        relays=[
            RelayInstance("a:1", ["stripe"], 2.0, live=True),
            RelayInstance("b:2", ["stripe"], 3.0, live=True),
            RelayInstance("c:3", ["paypal"], 600.0, live=False),
        ],
        unserved_providers=["paypal"],
    )
    text = render_status(status).splitlines()
    assert text[2].split()[7] == "0" and text[3].split()[7] == "2"
    assert text[4] == (
        "UNSERVED paypal: no running relay serves it; its 3 waiting intent(s) stay pending"
        ' until one does (configure RELAY_PROVIDERS__PAYPAL__KIND on a relay; README "Providers'
        ' no relay serves")'
    )
    assert text[5] == "running relays: 2 (serving stripe)"
    assert status.to_json()["unserved_providers"] == ["paypal"]


@pytest.mark.integration
def test_dead_intents_are_listed_and_retried_by_plain_calls(db_url: str) -> None:
    ids = insert(
        db_url,
        ("api-1", "charge", 100, "pm_card_visa"),
        ("api-2", "charge", 200, "pm_card_visa"),
    )
    make_dead(db_url, ids, error_code="rate_limited")
    with psycopg.connect(db_url) as conn:
        conn.execute(
            "UPDATE outbox.payment_intents SET error_message = 'card 4242424242424242 refused'"
            " WHERE id = %s",
            (ids[0],),
        )
    listed = list_dead_in_database(db_url, Filters(error_code="rate_limited"), limit=10)
    assert sorted(row["id"] for row in listed) == ids
    message = next(row["error_message"] for row in listed if row["id"] == ids[0])
    assert "4242424242424242" not in message  # masked for the operator's eyes
    assert list_dead_in_database(db_url, Filters(provider="adyen"), limit=10) == []

    asked: list[int] = []

    def refuse(matched: int) -> bool:
        asked.append(matched)
        return False

    refused = act_on_database(
        db_url,
        "retry",
        operator="alice",
        filters=Filters(error_code="rate_limited"),
        confirm=refuse,
    )
    assert asked == [2] and refused.matched == 2 and refused.done == []
    assert [state(db_url, i)[0] for i in ids] == ["dead", "dead"]

    steps: list[tuple[int, int]] = []
    report = act_on_database(
        db_url,
        "retry",
        operator="alice",
        filters=Filters(error_code="rate_limited"),
        batch_size=1,
        progress=lambda done, total: steps.append((done, total)),
    )
    assert sorted(row["intent_id"] for row in report.done) == ids
    assert steps == [(1, 2), (2, 2)]
    assert [state(db_url, i)[0] for i in ids] == ["pending", "pending"]
    assert history(db_url, ids[0])[-1] == ("operator:alice", "pending")


@pytest.mark.integration
@pytest.mark.parametrize("action", ["retry", "cancel"])
def test_bulk_results_are_in_numeric_order_of_their_payments(db_url: str, action: Action) -> None:
    numbers = (100, 2, 10, 1, 20)
    ids = insert(db_url, *[(f"bulk-{n}", "charge", 100, "pm_card_visa") for n in numbers])
    make_dead(db_url, ids)
    by_ids = act_on_database(db_url, action, operator="alice", ids=ids)
    assert [row["payment_id"] for row in by_ids.done] == [
        "bulk-1",
        "bulk-2",
        "bulk-10",
        "bulk-20",
        "bulk-100",
    ]


def test_natural_order_compares_numbers_as_numbers() -> None:
    rows = [
        {"payment_id": "bulk-10", "intent_id": 3},
        {"payment_id": "bulk-9", "intent_id": 9},
        {"payment_id": "bulk-9", "intent_id": 2},
        {"payment_id": "abc", "intent_id": 1},
        {"payment_id": "bulk-1b", "intent_id": 4},
    ]
    ordered = [(r["payment_id"], r["intent_id"]) for r in sorted(rows, key=natural_key)]
    assert ordered == [
        ("abc", 1),
        ("bulk-1b", 4),
        ("bulk-9", 2),
        ("bulk-9", 9),
        ("bulk-10", 3),
    ]


@pytest.mark.integration
def test_status_and_intents_are_read_by_plain_calls(db_url: str) -> None:
    (intent_id,) = insert(db_url, ("api-3", "charge", 100, "pm_card_visa"))
    status = collect_status(db_url)
    assert status.providers["stripe"].counts == {"pending": 1}
    assert status.dead_letters == 0 and status.schema_version is not None
    found = find_intent(db_url, intent_id)
    assert found is not None and found["intent"]["payment_id"] == "api-3"
    assert find_intent(db_url, intent_id + 1_000) is None
