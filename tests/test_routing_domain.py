"""relay/domain/routing.py: the payment's bucket and a rule's choice, pure (the SQL twin's
agreement is tests/test_routing.py's)."""

from __future__ import annotations

import argparse

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.cli.providers import parse_limit, parse_weight
from relay.domain.routing import BUCKETS, Target, choose, routing_bucket, split_share


def test_bucket_is_sha256_prefix_and_stable() -> None:
    assert routing_bucket("x") == 762385986  # outbox.routing_bucket('x') on PostgreSQL
    assert routing_bucket("pay_1") == routing_bucket("pay_1")
    assert 0 <= routing_bucket("🙂") < BUCKETS


def test_priority_takes_the_first_usable_target() -> None:
    targets = [Target("a", usable=False), Target("b"), Target("c")]
    assert choose("priority", targets, 0) == "b"
    assert choose("priority", [Target("a", usable=False)], 0) is None


def test_split_walks_cumulative_weights() -> None:
    targets = [Target("a", 90), Target("b", 10)]
    assert [choose("split", targets, b) for b in (0, 89, 90, 99, 100, 189, 190)] == [
        "a",
        "a",
        "b",
        "b",
        "a",
        "a",
        "b",
    ]


def test_split_without_weight_left_falls_back_to_list_order() -> None:
    assert choose("split", [Target("a", 0), Target("b", 0)], 7) == "a"
    assert choose("split", [Target("a", 100, usable=False), Target("b", 0)], 7) == "b"


def test_a_canary_at_zero_is_never_chosen() -> None:
    targets = [Target("stable", 100), Target("canary", 0)]
    assert all(choose("split", targets, b) == "stable" for b in range(1000))
    assert split_share(targets, "canary") == 0.0


def test_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="priority or split"):
        choose("random", [Target("a")], 0)


@given(
    st.lists(st.integers(min_value=0, max_value=100), min_size=1, max_size=5),
    st.integers(min_value=0, max_value=BUCKETS - 1),
)
def test_split_picks_a_weighted_target_or_the_fallback(weights: list[int], bucket: int) -> None:
    targets = [Target(f"p{n}", w) for n, w in enumerate(weights)]
    chosen = choose("split", targets, bucket)
    if sum(weights):
        assert chosen is not None and weights[int(chosen[1:])] > 0
    else:
        assert chosen == "p0"


@given(st.lists(st.integers(min_value=1, max_value=100), min_size=1, max_size=4))
def test_shares_over_every_point_equal_the_weights(weights: list[int]) -> None:
    """Over one full cycle of points (0 .. total - 1) each target gets exactly its weight."""
    targets = [Target(f"p{n}", w) for n, w in enumerate(weights)]
    total = sum(weights)
    counts = {t.provider: 0 for t in targets}
    for point in range(total):
        counts[str(choose("split", targets, point))] += 1
    assert counts == {t.provider: t.weight for t in targets}
    assert sum(split_share(targets, t.provider) for t in targets) == pytest.approx(1.0)


def test_cli_parses_limits_and_weights() -> None:
    assert parse_limit("eur:50:") == ("EUR", {"min": 50})
    assert parse_limit("JPY::1000") == ("JPY", {"max": 1000})
    assert parse_weight("adyen=10") == ("adyen", 10)
    for bad in ("EUR:0:", "EURO:1:2", "EUR:1.5:"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_limit(bad)
    for bad in ("adyen", "adyen=-1", "adyen=10001", "=5"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_weight(bad)
