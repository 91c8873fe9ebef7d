"""The unserved rule (relay/domain/serving.py) that `status` and the unserved gauge share."""

from __future__ import annotations

from relay.domain.serving import unserved_intents


def test_waiting_intents_of_a_provider_no_live_relay_serves_are_unserved() -> None:
    counts = [
        ("stripe", "pending", 4),
        ("paypal", "pending", 2),
        ("paypal", "blocked", 1),
        ("paypal", "in_flight", 1),
        ("paypal", "pending", 3),  # a status may come over several rows
        ("paypal", "dead", 7),  # waits for an operator, not a relay
        ("paypal", "succeeded", 9),
    ]
    assert unserved_intents(counts, [(["stripe"], True)]) == {"paypal": 7}


def test_a_report_that_is_not_live_serves_nothing() -> None:
    counts = [("stripe", "pending", 1), ("adyen", "blocked", 2)]
    relays = [(["stripe", "adyen"], False), (["adyen"], True)]
    assert unserved_intents(counts, relays) == {"stripe": 1}


def test_finished_or_dead_intents_never_make_a_provider_unserved() -> None:
    counts = [("paypal", "dead", 3), ("paypal", "failed", 1), ("paypal", "pending", 0)]
    assert unserved_intents(counts, []) == {}


def test_no_relay_at_all_leaves_every_waiting_provider_unserved() -> None:
    counts = [("stripe", "in_flight", 1), ("adyen", "pending", 2)]
    assert unserved_intents(counts, []) == {"adyen": 2, "stripe": 1}
