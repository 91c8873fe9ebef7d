from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.domain.retry_policy import IDEMPOTENCY_KEY_LIFETIME_SECONDS, RetryPolicy

POLICY = RetryPolicy(base_seconds=1.0, cap_seconds=300.0, max_attempts=8)


def test_ceilings_double_up_to_the_cap() -> None:
    assert [POLICY.ceiling_seconds(n) for n in range(1, 12)] == [
        1,
        2,
        4,
        8,
        16,
        32,
        64,
        128,
        256,
        300,
        300,
    ]


def test_full_jitter_bounds() -> None:
    assert POLICY.backoff_seconds(4, lambda: 0.0) == 0.0
    assert POLICY.backoff_seconds(4, lambda: 0.999) == pytest.approx(7.992)


def test_retry_after_is_honoured_and_bounded() -> None:
    assert POLICY.backoff_seconds(1, lambda: 0.0, retry_after_seconds=20) == 20
    assert POLICY.backoff_seconds(9, lambda: 1.0, retry_after_seconds=20) == 256
    assert POLICY.backoff_seconds(1, lambda: 0.0, retry_after_seconds=10**9) == 3600


def test_huge_attempt_numbers_do_not_overflow() -> None:
    assert POLICY.backoff_seconds(10_000, lambda: 1.0) == 300


def test_exhausted_at_max_attempts() -> None:
    assert not POLICY.exhausted(7)
    assert POLICY.exhausted(8)


def test_default_window_stays_inside_the_key_lifetime() -> None:
    assert POLICY.worst_case_total_seconds() < IDEMPOTENCY_KEY_LIFETIME_SECONDS


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"base_seconds": 0}, "base_seconds"),
        ({"cap_seconds": 0.5}, "cap_seconds"),
        ({"max_attempts": 0}, "max_attempts"),
    ],
)
def test_bad_values_name_the_field(kwargs: dict[str, float], field: str) -> None:
    values = {"base_seconds": 1.0, "cap_seconds": 10.0, "max_attempts": 3, **kwargs}
    with pytest.raises(ValueError, match=field):
        RetryPolicy(**values)  # type: ignore[arg-type]


@given(st.integers(min_value=1, max_value=10**6), st.floats(min_value=0, max_value=1))
def test_delay_never_exceeds_the_ceiling(attempt: int, r: float) -> None:
    delay = POLICY.backoff_seconds(attempt, lambda: r)
    assert 0 <= delay <= POLICY.ceiling_seconds(attempt) <= 300
