from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.domain.money import CurrencyMismatch, Money, format_money, parse_major


def test_formats_by_exponent() -> None:
    assert format_money(Money(1999, "EUR"), 2) == "19.99 EUR"
    assert format_money(Money(1999, "JPY"), 0) == "1999 JPY"
    assert format_money(Money(1999, "KWD"), 3) == "1.999 KWD"
    assert format_money(Money(-5, "EUR"), 2) == "-0.05 EUR"


def test_parse_refuses_too_many_fraction_digits() -> None:
    assert parse_major("19.99", 2) == 1999
    assert parse_major("19.9", 2) == 1990
    with pytest.raises(ValueError, match="fraction digits"):
        parse_major("1.5", 0)
    with pytest.raises(ValueError, match="decimal number"):
        parse_major("1e3", 2)


def test_floats_and_bools_are_refused() -> None:
    with pytest.raises(TypeError, match="amount_minor"):
        Money(19.99, "EUR")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="amount_minor"):
        Money(True, "EUR")
    with pytest.raises(ValueError, match="currency"):
        Money(1, "eur")


def test_currencies_do_not_mix() -> None:
    with pytest.raises(CurrencyMismatch):
        Money(1, "EUR") + Money(1, "USD")
    assert Money(5, "EUR") - Money(2, "EUR") == Money(3, "EUR")
    assert Money(2, "EUR") < Money(5, "EUR")


@given(st.integers(min_value=-(10**15), max_value=10**15), st.integers(min_value=0, max_value=4))
def test_format_parse_round_trip(amount: int, exponent: int) -> None:
    text = format_money(Money(amount, "EUR"), exponent).removesuffix(" EUR")
    assert parse_major(text, exponent) == amount


@given(st.integers(), st.integers())
def test_addition_is_exact(a: int, b: int) -> None:
    assert (Money(a, "JPY") + Money(b, "JPY")).amount_minor == a + b
