"""Amounts in a provider's own units, where the provider departs from ISO 4217.

The relay's amounts are integers in ISO 4217 minor units, with the exponent from
``outbox.currencies`` (JPY 0, EUR 2, KWD 3). Most providers count the same way, but not
for every currency: Stripe counts ISK with two decimals (ISO: none) and MGA with none
(ISO: two), and accepts three-decimal amounts only when their last digit is 0. A
:class:`ProviderUnits` holds one provider's departures (a :class:`UnitRule` per currency;
a currency without one is counted as ISO counts it) and converts both ways, exactly: an
amount the provider cannot represent raises :class:`AmountNotRepresentable`, never rounds.

Pure logic, no I/O. The ISO exponent is always passed in (the relay reads it from the
currency table); it is needed only for a currency whose rule changes the exponent.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = [
    "ADYEN_UNITS",
    "STRIPE_THREE_DECIMAL",
    "STRIPE_UNITS",
    "STRIPE_ZERO_DECIMAL",
    "AmountNotRepresentable",
    "ProviderUnits",
    "UnitRule",
]


class AmountNotRepresentable(ValueError):
    """The amount has no exact equivalent in the other side's units."""

    def __init__(self, message: str, *, code: str = "amount_not_representable") -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class UnitRule:
    """How a provider counts one currency where that differs from ISO 4217.

    ``exponent``: the provider's decimal places for the currency (None: ISO's own).
    ``multiple_of``: the provider accepts only multiples of this, in its own units.
    ``why``: the provider's rule in words, for error messages.
    """

    exponent: int | None = None
    multiple_of: int = 1
    why: str = ""

    def __post_init__(self) -> None:
        if self.exponent is not None and self.exponent < 0:
            raise ValueError(f"exponent must be >= 0, got {self.exponent}")
        if self.multiple_of < 1:
            raise ValueError(f"multiple_of must be >= 1, got {self.multiple_of}")


def _pow10(n: int) -> int:
    """10 ** n for n >= 0 (int ** int is typed Any: a negative power is a float)."""
    if n < 0:
        raise ValueError(f"negative power {n}")
    result: int = 10**n
    return result


def _major(amount_minor: int, exponent: int) -> str:
    """``12345, 2`` -> ``'123.45'``; for messages only."""
    sign = "-" if amount_minor < 0 else ""
    whole, fraction = divmod(abs(amount_minor), _pow10(exponent))
    return f"{sign}{whole}.{fraction:0{exponent}d}" if exponent else f"{sign}{whole}"


@dataclass(frozen=True, slots=True)
class ProviderUnits:
    provider: str
    overrides: Mapping[str, UnitRule] = field(default_factory=dict)

    def rule(self, currency: str) -> UnitRule | None:
        return self.overrides.get(currency.upper())

    def granularity(self, currency: str) -> int:
        """The smallest step the provider accepts, in its own units (1 for most)."""
        rule = self.rule(currency)
        return rule.multiple_of if rule else 1

    def _shift(self, rule: UnitRule, currency: str, iso_exponent: int | None) -> int:
        """Provider exponent minus ISO exponent: the power of ten between the two units."""
        if rule.exponent is None:
            return 0
        if iso_exponent is None:
            raise AmountNotRepresentable(
                f"{self.provider} counts {currency.upper()} with {rule.exponent} decimal(s) "
                f"({rule.why}); converting needs the ISO 4217 exponent from outbox.currencies, "
                "and none was given",
                code="currency_exponent_unknown",
            )
        return rule.exponent - iso_exponent

    def to_provider(self, amount_minor: int, currency: str, iso_exponent: int | None) -> int:
        """Our ISO minor units -> the provider's units, or AmountNotRepresentable."""
        code = currency.upper()
        rule = self.rule(code)
        if rule is None:
            return amount_minor
        shift = self._shift(rule, code, iso_exponent)
        if shift >= 0:
            units = amount_minor * _pow10(shift)
        else:
            step = _pow10(-shift)
            if amount_minor % step:
                lower = amount_minor - amount_minor % step
                raise AmountNotRepresentable(
                    f"{self._ours(amount_minor, code, iso_exponent)} cannot be sent to "
                    f"{self.provider}: {rule.why}; use {lower} or {lower + step} minor units"
                )
            units = amount_minor // step
        if units % rule.multiple_of:
            lower = units - units % rule.multiple_of
            raise AmountNotRepresentable(
                f"{self._ours(amount_minor, code, iso_exponent)} cannot be sent to "
                f"{self.provider}: {rule.why}; use "
                f"{self.from_provider(lower, code, iso_exponent)} or "
                f"{self.from_provider(lower + rule.multiple_of, code, iso_exponent)} minor units"
            )
        return units

    def from_provider(self, amount: int, currency: str, iso_exponent: int | None) -> int:
        """The provider's units -> our ISO minor units, or AmountNotRepresentable."""
        code = currency.upper()
        rule = self.rule(code)
        if rule is None:
            return amount
        shift = self._shift(rule, code, iso_exponent)
        if shift <= 0:
            return amount * _pow10(-shift)
        step = _pow10(shift)
        if amount % step:
            raise AmountNotRepresentable(
                f"{self.provider} reports {amount} in its units of {code} ({rule.why}), "
                f"which is not a whole number of ISO 4217 minor units (exponent {iso_exponent})"
            )
        return amount // step

    @staticmethod
    def _ours(amount_minor: int, code: str, iso_exponent: int | None) -> str:
        if iso_exponent is None:
            return f"{amount_minor} minor units of {code}"
        return f"{_major(amount_minor, iso_exponent)} {code} ({amount_minor} minor units)"


# -- Stripe (docs.stripe.com/currencies) ----------------------------------------------------
#
# Stripe counts every currency with two decimals unless it says otherwise:
# * zero-decimal: the list below. All are zero-decimal in ISO 4217 too, except MGA (ISO: 2).
# * three-decimal (BHD, JOD, KWD, OMR, TND, as ISO): accepted only with the last digit 0,
#   "to ensure compatibility with Stripe's payments partners".
# * ISK: zero-decimal in ISO; Stripe keeps it two-decimal "for backwards compatibility"
#   and requires amounts evenly divisible by 100 (400 invalid_charge_amount_no_decimal_
#   compatible otherwise, since 2023-04-14).
# * HUF and TWD: two-decimal at Stripe as in ISO; only payouts must be whole units (a
#   multiple of 100). The relay makes no payouts, and charges, captures and refunds may
#   carry decimals, so they need no rule here.
# * UGX: zero-decimal at Stripe and in ISO 4217 (the table's exponent 0): no departure.

STRIPE_ZERO_DECIMAL = frozenset(
    {
        "BIF",
        "CLP",
        "DJF",
        "GNF",
        "JPY",
        "KMF",
        "KRW",
        "MGA",
        "PYG",
        "RWF",
        "UGX",
        "VND",
        "VUV",
        "XAF",
        "XOF",
        "XPF",
    }
)
STRIPE_THREE_DECIMAL = frozenset({"BHD", "JOD", "KWD", "OMR", "TND"})

# Only the departures from ISO 4217: a zero-decimal currency ISO also counts in whole units
# needs no rule. tests/test_currency_units.py checks this against outbox.currencies.
_STRIPE_OVERRIDES: dict[str, UnitRule] = {
    "ISK": UnitRule(
        exponent=2,
        multiple_of=100,
        why="Stripe counts ISK with two decimals and takes whole krónur only "
        "(amounts divisible by 100)",
    ),
    "MGA": UnitRule(exponent=0, why="Stripe counts MGA as a zero-decimal currency"),
    **{
        code: UnitRule(
            multiple_of=10,
            why=f"Stripe takes three-decimal {code} amounts only with the last digit 0",
        )
        for code in sorted(STRIPE_THREE_DECIMAL)
    },
}

STRIPE_UNITS = ProviderUnits("stripe", _STRIPE_OVERRIDES)


# -- Adyen (docs.adyen.com/development-resources/currency-codes) ----------------------------
#
# Adyen counts amounts in minor units by its own table, which departs from ISO 4217 in four
# currencies (../shared/PROVIDERS.md, "Minor units"): CLP and ISK with two decimals (ISO:
# none), CVE and IDR with none (ISO: two). Every other currency is counted as ISO counts it,
# the three-decimal ones (BHD, JOD, KWD, OMR, TND) included, with no grid of their own.
# An amount with cents in CVE or IDR has no Adyen equivalent and is refused before any
# request, naming the nearest whole amounts.

_ADYEN_OVERRIDES: dict[str, UnitRule] = {
    "CLP": UnitRule(exponent=2, why="Adyen counts CLP with two decimals"),
    "ISK": UnitRule(exponent=2, why="Adyen counts ISK with two decimals"),
    "CVE": UnitRule(exponent=0, why="Adyen counts CVE in whole escudos (no decimals)"),
    "IDR": UnitRule(exponent=0, why="Adyen counts IDR in whole rupiah (no decimals)"),
}

ADYEN_UNITS = ProviderUnits("adyen", _ADYEN_OVERRIDES)
