"""The intent row the claim, the janitor and tools share (pure), and the purity of relay.domain."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from provider_adapters.base import Action, Command
from relay.domain.intents import IntentRow, payment_from_columns
from relay.domain.state_machine import PaymentSnapshot, PaymentState

ROOT = Path(__file__).resolve().parent.parent

# Columns as claim_intents returns them (relay/infra/queries.sql), in another order.
CLAIMED = {
    "exponent": 2,
    "payment_reference": "pi_1",
    "refunded_minor": 0,
    "captured_minor": 0,
    "authorized_minor": 1000,
    "payment_state": "authorized",
    "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    "lease_token": 41,
    "attempts": 2,
    "idempotency_key": "k",
    "payment_method": None,
    "currency": "EUR",
    "amount_minor": None,
    "provider": "stripe",
    "action": "capture",
    "payment_id": "p",
    "id": 7,
}


def test_an_intent_is_built_from_its_columns_by_name() -> None:
    intent = IntentRow.from_columns(**CLAIMED)
    assert intent == IntentRow(
        id=7,
        payment_id="p",
        action=Action.CAPTURE,
        provider="stripe",
        amount_minor=None,
        currency="EUR",
        payment_method=None,
        idempotency_key="k",
        attempts=2,
        lease_token=41,
        traceparent=CLAIMED["traceparent"],
        payment=PaymentSnapshot(PaymentState.AUTHORIZED, "EUR", 1000, 0, 0, "pi_1"),
        exponent=2,
    )
    assert intent.action is Action.CAPTURE and intent.payment.state is PaymentState.AUTHORIZED
    assert intent.require_lease() == 41


def test_the_command_carries_the_stored_key_the_reference_and_the_resolved_amount() -> None:
    """Every attempt of an intent asks the provider with the intent's own stored key."""
    intent = IntentRow.from_columns(**CLAIMED)
    command = intent.command(1000, traceparent=CLAIMED["traceparent"])
    assert command == Command(
        intent_id=7,
        payment_id="p",
        action=Action.CAPTURE,
        idempotency_key="k",
        amount_minor=1000,
        currency="EUR",
        payment_method=None,
        payment_reference="pi_1",
        attempt=2,
        traceparent=CLAIMED["traceparent"],
        exponent=2,
    )
    retried = IntentRow.from_columns(**{**CLAIMED, "attempts": 5, "lease_token": 99})
    assert retried.command(1000).idempotency_key == command.idempotency_key
    assert retried.command(1000).traceparent is None


def test_an_intent_read_without_a_lease_has_none_and_refuses_a_fence() -> None:
    reserved = {k: v for k, v in CLAIMED.items() if k not in {"lease_token", "traceparent"}}
    intent = IntentRow.from_columns(**reserved)
    assert (intent.lease_token, intent.traceparent, intent.exponent) == (None, None, 2)
    with pytest.raises(ValueError, match="intent 7 was read without a lease"):
        intent.require_lease()


def test_a_missing_column_or_an_unknown_one_is_an_error() -> None:
    with pytest.raises(TypeError, match="payment_state"):
        IntentRow.from_columns(**{k: v for k, v in CLAIMED.items() if k != "payment_state"})
    with pytest.raises(TypeError, match="status"):
        IntentRow.from_columns(**CLAIMED, status="in_flight")


def test_the_payment_carries_the_currency_it_is_given() -> None:
    snapshot = payment_from_columns("JPY", "captured", 500, 500, 100, None)
    assert snapshot == PaymentSnapshot(PaymentState.CAPTURED, "JPY", 500, 500, 100, None)
    assert snapshot.refundable_minor == 400


_IO_PACKAGES = ["psycopg", "psycopg_pool", "anyio", "httpx", "aio_pika", "aiormq", "stripe"]
_IO_PACKAGES += ["prometheus_client", "structlog"]
_RELAY_IO = ["relay.core", "relay.infra", "relay.events", "relay.service", "relay.cli"]


@pytest.mark.parametrize(
    "module", sorted(f"relay.domain.{p.stem}" for p in (ROOT / "relay/domain").glob("[!_]*.py"))
)
def test_domain_modules_import_nothing_that_does_io(module: str) -> None:
    # A fresh interpreter: what this test process imported already must not count.
    probe = (
        f"import importlib, json, sys; importlib.import_module({module!r}); "
        "print(json.dumps(sorted(sys.modules)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    )
    loaded = json.loads(result.stdout)
    reached = [
        name
        for name in loaded
        if name.split(".")[0] in _IO_PACKAGES
        or any(name == p or name.startswith(p + ".") for p in _RELAY_IO)
    ]
    assert reached == [], f"{module} imports modules that do I/O: {reached}"
