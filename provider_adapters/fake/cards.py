"""The fake provider's test cards: the one table the server, `--help` and the README read.

Stripe's test payment methods of the same names behave the same way: the approved ones
place a hold or charge; the declining ones answer 402 ``card_error`` with Stripe's
``code`` and, for issuer declines, its ``decline_code``. The relay records the decline
code when there is one, else the code, as the intent's ``error_code``
(provider_adapters/stripe_errors.py). Pure data, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["TEST_CARDS", "Card", "card", "cards_help", "cards_markdown"]


@dataclass(frozen=True, slots=True)
class Card:
    """One test payment method; ``code`` is None for a card that is approved."""

    payment_method: str
    code: str | None = None
    decline_code: str | None = None
    message: str = ""

    @property
    def declines(self) -> bool:
        return self.code is not None

    @property
    def error_code(self) -> str | None:
        """What the relay records as the intent's ``error_code`` for this card's decline."""
        return self.decline_code or self.code

    def outcome(self) -> str:
        """``approved``, or ``declined: CODE / DECLINE_CODE`` as the 402 carries them."""
        if self.code is None:
            return "approved"
        return "declined: " + " / ".join(c for c in (self.code, self.decline_code) if c)


TEST_CARDS: tuple[Card, ...] = (
    Card("pm_card_visa"),
    Card("pm_card_mastercard"),
    Card("pm_card_amex"),
    Card("pm_card_visa_debit"),
    Card("pm_card_chargeDeclined", "card_declined", "generic_decline", "Your card was declined."),
    Card(
        "pm_card_chargeDeclinedInsufficientFunds",
        "card_declined",
        "insufficient_funds",
        "Your card has insufficient funds.",
    ),
    Card("pm_card_chargeDeclinedExpiredCard", "expired_card", None, "Your card has expired."),
)

_BY_METHOD = {c.payment_method: c for c in TEST_CARDS}


def card(payment_method: str) -> Card | None:
    """The test card of that name, or None (the server answers 400 resource_missing)."""
    return _BY_METHOD.get(payment_method)


def cards_help() -> str:
    """The table for `fake-provider --help`: one line per card."""
    width = max(len(c.payment_method) for c in TEST_CARDS)
    lines = [f"  {c.payment_method:<{width}}  {c.outcome()}" for c in TEST_CARDS]
    return "\n".join(
        [
            "test cards (payment_method; any other is refused: 400 resource_missing):",
            *lines,
            "A decline is a 402 card_error with Stripe's code / decline_code; the relay",
            "records the decline_code, else the code, as the intent's error_code.",
        ]
    )


def cards_markdown() -> str:
    """The same table in Markdown, as the README carries it (tests/test_fake_provider.py
    compares the two and prints this when they differ)."""
    rows = ["| `payment_method` | the fake answers | the intent's `error_code` |", "|---|---|---|"]
    for c in TEST_CARDS:
        if c.code is None:
            rows.append(f"| `{c.payment_method}` | approved | — |")
            continue
        codes = " / ".join(f"`{code}`" for code in (c.code, c.decline_code) if code)
        rows.append(f"| `{c.payment_method}` | declined: 402 {codes} | `{c.error_code}` |")
    return "\n".join(rows)
