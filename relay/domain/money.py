"""Money as an integer in minor units plus an ISO 4217 code. No float touches an amount.

Pure logic, no I/O. The exponent of a currency comes from outbox.currencies (generated
from the ISO 4217 list); functions here take it as an argument.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["CurrencyMismatch", "Money", "format_minor", "format_money", "parse_major"]

_CODE = re.compile(r"^[A-Z]{3}$")
_MAJOR = re.compile(r"^(-?)(\d+)(?:\.(\d+))?$")


class CurrencyMismatch(ValueError):
    code = "currency_mismatch"


@dataclass(frozen=True, slots=True, order=False)
class Money:
    amount_minor: int
    currency: str

    def __post_init__(self) -> None:
        if isinstance(self.amount_minor, bool) or not isinstance(self.amount_minor, int):
            raise TypeError(
                "amount_minor must be an int of minor units, "
                f"got {type(self.amount_minor).__name__}"
            )
        if not isinstance(self.currency, str) or not _CODE.match(self.currency):
            raise ValueError(f"currency must be three uppercase letters, got {self.currency!r}")

    def _same(self, other: Money) -> None:
        if other.currency != self.currency:
            raise CurrencyMismatch(f"cannot combine {self.currency} with {other.currency}")

    def __add__(self, other: Money) -> Money:
        self._same(other)
        return Money(self.amount_minor + other.amount_minor, self.currency)

    def __sub__(self, other: Money) -> Money:
        self._same(other)
        return Money(self.amount_minor - other.amount_minor, self.currency)

    def __lt__(self, other: Money) -> bool:
        self._same(other)
        return self.amount_minor < other.amount_minor

    def __le__(self, other: Money) -> bool:
        self._same(other)
        return self.amount_minor <= other.amount_minor


def format_money(money: Money, exponent: int) -> str:
    """``Money(1999, 'EUR'), 2`` -> ``'19.99 EUR'``; JPY (0) -> ``'1999 JPY'``; KWD (3)
    -> ``'1.999 KWD'``; CLF (4) -> ``'0.1999 CLF'``. Every amount a person reads goes
    through here (or :func:`format_minor`), so an approver sees what will move."""
    if exponent < 0:
        raise ValueError(f"exponent must be >= 0, got {exponent}")
    sign = "-" if money.amount_minor < 0 else ""
    major, minor = divmod(abs(money.amount_minor), 10**exponent)
    if exponent == 0:
        return f"{sign}{major} {money.currency}"
    return f"{sign}{major}.{minor:0{exponent}d} {money.currency}"


def parse_major(text: str, exponent: int) -> int:
    """``'19.99', 2`` -> ``1999``, by string arithmetic; more fraction digits is an error."""
    match = _MAJOR.match(text.strip())
    if match is None:
        raise ValueError(f"amount {text!r} is not a decimal number like 19.99")
    sign: str = match.group(1)
    whole: str = match.group(2)
    fraction: str = match.group(3) or ""
    if len(fraction) > exponent:
        raise ValueError(
            f"amount {text!r} has {len(fraction)} fraction digits; the currency allows {exponent}"
        )
    minor: int = int(whole) * 10**exponent + (int(fraction.ljust(exponent, "0")) if exponent else 0)
    return -minor if sign else minor


def format_minor(amount_minor: int, currency: str, exponent: int | None) -> str:
    """An amount in minor units as a person reads it: :func:`format_money` when the
    currency's exponent is known, else the minor units named as such (a currency missing
    from outbox.currencies, or a code that is not one), never a bare number that could be
    misread by a factor of 100."""
    if exponent is None or not _CODE.match(currency):
        return f"{amount_minor} minor units of {currency}"
    return format_money(Money(amount_minor, currency), exponent)
