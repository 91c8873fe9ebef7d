"""The fake provider's settlement data: Stripe-style balance transactions, and discrepancies
injected on demand so reconciliation has something to find.

Pure logic, no I/O. Money that moves creates a balance transaction, as at Stripe: a charge
or a capture (type ``charge``, the captured amount, a fee, the net) and a refund (type
``refund``, a negative amount, no fee). An authorisation or a void moves no money and
creates none. The fee follows ``fees`` (basis points of the amount, half up, plus a fixed
part), like a Stripe price list, rounded half up to the currency's grid at Stripe (whole
krónur for ISK, a last digit 0 for three-decimal currencies), as every amount there is.
Amounts are in Stripe's units (provider_adapters/currency_units.py).

``inject`` changes what the provider reports, never what happened, one reconciliation
exception class at a time (see docs/audit-and-reconciliation.md):

==================== ======================================================================
missing_at_provider  the balance transaction of ``source`` disappears from the list
missing_internal     a charge nobody asked for appears (``amount``, ``currency``)
amount_mismatch      the amount of ``source``'s transaction changes by ``delta``
currency_mismatch    its currency becomes ``currency``
status_mismatch      its source object (charge or refund) reports ``failed``
unexpected_fee       its fee becomes ``fee``
==================== ======================================================================

**Settlement in another currency.** ``account_currency`` set (``POST
/_fake/settlement_currency {"currency": "eur", "rates": {"usd": "0.9123"}}``), a charge or
refund in another currency settles converted, as at Stripe: the balance transaction's
``amount`` is in the account's currency (the charge's amount times ``exchange_rate``,
rounded half up to the account currency's grid; Stripe does not document its rounding),
its ``fee`` and ``net`` too, and ``exchange_rate`` is the rate used (a JSON number, as
Stripe sends it; ``null`` when nothing was converted). ``rates`` maps the charge's
currency to units of the account currency per unit.

``source`` names what the relay knows: a PaymentIntent (``pi_...``, its charge's
transaction), a refund (``re_...``), a charge (``ch_...``) or a transaction (``txn_...``).
"""

from __future__ import annotations

import itertools
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from provider_adapters.currency_units import STRIPE_UNITS

__all__ = ["DISCREPANCIES", "FeeSchedule", "Settlement"]

Reply = tuple[int, dict[str, Any]]

DISCREPANCIES = (
    "missing_at_provider",
    "missing_internal",
    "amount_mismatch",
    "currency_mismatch",
    "status_mismatch",
    "unexpected_fee",
)


# Stripe's decimal places where they are not 2 (its "zero-decimal" and "three-decimal"
# currency lists), for the conversion of a settled amount between two currencies' units.
_ZERO_DECIMAL = frozenset(
    [
        "bif",
        "clp",
        "djf",
        "gnf",
        "jpy",
        "kmf",
        "krw",
        "mga",
        "pyg",
        "rwf",
        "ugx",
        "vnd",
        "vuv",
        "xaf",
        "xof",
        "xpf",
    ]
)
_THREE_DECIMAL = frozenset(["bhd", "jod", "kwd", "omr", "tnd"])


def _stripe_exponent(currency: str) -> int:
    code = currency.lower()
    return 0 if code in _ZERO_DECIMAL else 3 if code in _THREE_DECIMAL else 2


def _error(status: int, message: str, param: str | None = None) -> Reply:
    error: dict[str, Any] = {"type": "invalid_request_error", "message": message}
    if param:
        error["param"] = param
        error["code"] = "parameter_invalid"
    return status, {"error": error}


@dataclass
class FeeSchedule:
    bps: int = 290
    fixed_minor: int = 30

    def fee(self, amount: int, currency: str) -> int:
        raw = (amount * self.bps + 5_000) // 10_000 + self.fixed_minor
        step = STRIPE_UNITS.granularity(currency)
        return (raw + step // 2) // step * step


@dataclass
class Settlement:
    refunds: Mapping[str, dict[str, Any]]
    fees: FeeSchedule = field(default_factory=FeeSchedule)
    clock: Callable[[], float] = time.time
    transactions: list[dict[str, Any]] = field(default_factory=list)
    charges: dict[str, dict[str, Any]] = field(default_factory=dict)
    injected: list[dict[str, Any]] = field(default_factory=list)
    # Settlement in another currency: the account's currency (lower case) and, per charge
    # currency, units of it per unit (decimal strings). None: every charge settles as is.
    account_currency: str | None = None
    exchange_rates: dict[str, str] = field(default_factory=dict)
    _seq: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def _id(self, prefix: str) -> str:
        # 'x' between counter and random tail: no run of 13 digits, which the adapter
        # would refuse as card-like (a real Stripe id is random base 62).
        return f"{prefix}_{next(self._seq):06d}x{secrets.token_hex(6)}"

    # -- what happened -------------------------------------------------------------------

    def record(
        self,
        kind: str,
        object_id: str,
        payment_intent: str,
        amount: int,
        currency: str,
        charge_id: str | None,
    ) -> None:
        """An effect was applied; money that moved gets its balance transaction."""
        if kind in ("charge", "capture"):
            charge = charge_id or self._id("ch")
            self.charges[charge] = {
                "id": charge,
                "object": "charge",
                "payment_intent": payment_intent,
                "amount": amount,
                "amount_captured": amount,
                "currency": currency,
                "status": "succeeded",
            }
            settled, settled_currency, rate = self._settled(amount, currency)
            self._add(
                "charge",
                settled,
                self.fees.fee(settled, settled_currency),
                settled_currency,
                charge,
                rate,
            )
        elif kind == "refund":
            settled, settled_currency, rate = self._settled(amount, currency)
            self._add("refund", -settled, 0, settled_currency, object_id, rate)

    def _settled(self, amount: int, currency: str) -> tuple[int, str, str | None]:
        """The amount in the account's currency (Stripe units), and the rate used."""
        account = self.account_currency
        if account is None or account == currency or currency not in self.exchange_rates:
            return amount, currency, None
        rate = self.exchange_rates[currency]
        # Stripe units of both currencies: their exponents as Stripe counts them.
        scale = Decimal(10) ** (_stripe_exponent(account) - _stripe_exponent(currency))
        exact = Decimal(amount) * Decimal(rate) * scale
        step = STRIPE_UNITS.granularity(account)
        settled = int((exact / step).quantize(Decimal(1), rounding=ROUND_HALF_UP)) * step
        return settled, account, rate

    def settle_in(self, spec: Mapping[str, Any]) -> Reply:
        """``{"currency": "eur", "rates": {"usd": "0.9123"}}``; ``{"currency": null}``: off."""
        currency = spec.get("currency")
        rates = spec.get("rates", {})
        if currency is not None and not (isinstance(currency, str) and len(currency) == 3):
            return _error(400, "currency must be a three-letter code or null", "currency")
        if not isinstance(rates, dict):
            return _error(400, "rates must map currencies to decimal strings", "rates")
        try:
            parsed = {str(k).lower(): str(Decimal(str(v))) for k, v in rates.items()}
        except ArithmeticError:
            return _error(400, 'every rate must be a decimal string such as "0.9123"', "rates")
        self.account_currency = currency.lower() if isinstance(currency, str) else None
        self.exchange_rates = parsed
        return 200, {"currency": self.account_currency, "rates": self.exchange_rates}

    def _add(
        self,
        type_: str,
        amount: int,
        fee: int,
        currency: str,
        source: str,
        exchange_rate: str | None = None,
    ) -> dict[str, Any]:
        created = int(self.clock())
        txn = {
            "id": self._id("txn"),
            "object": "balance_transaction",
            "amount": amount,
            "fee": fee,
            "net": amount - fee,
            "currency": currency,
            "type": type_,
            "reporting_category": type_,
            "source": source,
            "status": "available",
            "created": created,
            "available_on": created + 2 * 86_400,
            "description": None,
            # A JSON number at Stripe; the decimal's shortest float is what its JSON shows.
            "exchange_rate": None if exchange_rate is None else float(exchange_rate),
            "fee_details": (
                [
                    {
                        "amount": fee,
                        "currency": currency,
                        "type": "stripe_fee",
                        "description": "processing fees",
                    }
                ]
                if fee
                else []
            ),
        }
        self.transactions.append(txn)
        return txn

    # -- GET /v1/balance_transactions --------------------------------------------------

    def list(self, query: Mapping[str, str]) -> Reply:
        """Stripe's list: newest first, ``limit`` (1-100, default 10), ``starting_after``,
        ``created[gte|gt|lte|lt]``, ``type``, ``expand[]=data.source``."""
        try:
            limit = int(query.get("limit", "10"))
        except ValueError:
            return _error(400, "Invalid integer: limit", "limit")
        if not 1 <= limit <= 100:
            return _error(400, "limit must be between 1 and 100", "limit")
        bounds: dict[str, int] = {}
        for op in ("gte", "gt", "lte", "lt"):
            raw = query.get(f"created[{op}]")
            if raw is not None:
                try:
                    bounds[op] = int(raw)
                except ValueError:
                    return _error(400, f"Invalid integer: created[{op}]", f"created[{op}]")
        rows = [
            t
            for t in self.transactions
            if t["created"] >= bounds.get("gte", t["created"])
            and t["created"] > bounds.get("gt", t["created"] - 1)
            and t["created"] <= bounds.get("lte", t["created"])
            and t["created"] < bounds.get("lt", t["created"] + 1)
            and ("type" not in query or t["type"] == query["type"])
        ]
        rows.reverse()  # newest first; ties keep the reverse of creation order
        after = query.get("starting_after")
        if after:
            ids = [t["id"] for t in rows]
            if after not in ids:
                return _error(404, f"No such balance transaction: '{after}'", "starting_after")
            rows = rows[ids.index(after) + 1 :]
        page = rows[:limit]
        expand = any(k.startswith("expand") and v == "data.source" for k, v in query.items())
        data = [self._expanded(t) if expand else dict(t) for t in page]
        return 200, {
            "object": "list",
            "data": data,
            "has_more": len(rows) > limit,
            "url": "/v1/balance_transactions",
        }

    def _expanded(self, txn: dict[str, Any]) -> dict[str, Any]:
        out = dict(txn)
        source = txn["source"]
        if source in self.charges:
            out["source"] = dict(self.charges[source])
        elif source in self.refunds:
            out["source"] = dict(self.refunds[source])
        return out

    # -- discrepancies -------------------------------------------------------------------

    def _find(self, source: str) -> dict[str, Any] | None:
        for txn in self.transactions:
            charge = self.charges.get(txn["source"])
            if source in (txn["id"], txn["source"]) or (
                charge is not None and charge["payment_intent"] == source
            ):
                return txn
        return None

    def inject(self, spec: Mapping[str, Any]) -> Reply:
        kind = spec.get("kind")
        if kind not in DISCREPANCIES:
            return _error(400, f"kind must be one of {', '.join(DISCREPANCIES)}", "kind")
        if kind == "missing_internal":
            amount = int(spec.get("amount", 1234))
            currency = str(spec.get("currency", "eur")).lower()
            charge = self._id("ch")
            self.charges[charge] = {
                "id": charge,
                "object": "charge",
                "payment_intent": self._id("pi"),
                "amount": amount,
                "amount_captured": amount,
                "currency": currency,
                "status": "succeeded",
            }
            txn = self._add("charge", amount, self.fees.fee(amount, currency), currency, charge)
        else:
            source = str(spec.get("source", ""))
            found = self._find(source)
            if found is None:
                return _error(404, f"no balance transaction for source '{source}'", "source")
            txn = found
            if kind == "missing_at_provider":
                self.transactions.remove(txn)
            elif kind == "amount_mismatch":
                # As if the provider had moved a different amount: its fee follows it.
                delta = int(spec.get("delta", 1))
                txn["amount"] += delta
                if txn["fee"]:
                    txn["fee"] = self.fees.fee(abs(txn["amount"]), txn["currency"])
                txn["net"] = txn["amount"] - txn["fee"]
            elif kind == "currency_mismatch":
                txn["currency"] = str(spec.get("currency", "usd")).lower()
            elif kind == "status_mismatch":
                target = self.charges.get(txn["source"]) or self.refunds.get(txn["source"])
                if target is None:
                    return _error(400, f"{txn['id']} has no source object", "source")
                target["status"] = "failed"
            else:  # unexpected_fee
                txn["fee"] = int(spec.get("fee", txn["fee"] + 100))
                txn["net"] = txn["amount"] - txn["fee"]
                txn["fee_details"] = [
                    {
                        "amount": txn["fee"],
                        "currency": txn["currency"],
                        "type": "stripe_fee",
                        "description": "processing fees",
                    }
                ]
        record = {"kind": kind, "balance_transaction": txn["id"], "source": txn["source"]}
        self.injected.append(record)
        return 200, record
