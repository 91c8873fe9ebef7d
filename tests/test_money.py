from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.domain.money import CurrencyMismatch, Money, format_minor, format_money, parse_major


def test_formats_by_exponent() -> None:
    assert format_money(Money(1999, "EUR"), 2) == "19.99 EUR"
    assert format_money(Money(1999, "JPY"), 0) == "1999 JPY"
    assert format_money(Money(1999, "KWD"), 3) == "1.999 KWD"
    assert format_money(Money(-5, "EUR"), 2) == "-0.05 EUR"


@pytest.mark.parametrize(
    ("amount", "currency", "exponent", "shown"),
    [
        (1999, "JPY", 0, "1999 JPY"),
        (-42, "JPY", 0, "-42 JPY"),
        (100, "EUR", 2, "1.00 EUR"),
        (4200, "EUR", 2, "42.00 EUR"),
        (7, "EUR", 2, "0.07 EUR"),
        (1999, "KWD", 3, "1.999 KWD"),
        (-1, "KWD", 3, "-0.001 KWD"),
        (1999, "CLF", 4, "0.1999 CLF"),
        (123_4567, "UYW", 4, "123.4567 UYW"),
    ],
)
def test_format_minor_per_exponent(amount: int, currency: str, exponent: int, shown: str) -> None:
    assert format_minor(amount, currency, exponent) == shown


def test_format_minor_without_an_exponent_names_the_unit() -> None:
    # A currency outbox.currencies does not know: never a bare number read as major units.
    assert format_minor(4200, "XYZ", None) == "4200 minor units of XYZ"
    assert format_minor(4200, "eur", 2) == "4200 minor units of eur"


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
