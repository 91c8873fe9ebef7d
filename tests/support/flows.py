"""Payment flows for tests (sql/0072, docs/flows.md): docs/flows.md's split tender as steps
(``split_tender``) and its recipes as a reader pastes them (``recipe``); a flow started
(``start_flow``) or found by key (``flow_by_key``); its state, intents and events as the
database holds them; and write-backs driven by hand through the relay's Store
(``claim_one``, ``write_back``), so a test can hold a step where it likes."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from relay.core.store import Store
from relay.domain.intents import WriteBack
from relay.domain.state_machine import PaymentSnapshot, PaymentState
from relay.infra.db import Database
from tests.support.sql import rows

__all__ = [
    "authorized_snapshot",
    "claim_one",
    "flow_by_key",
    "flow_events",
    "flow_intents",
    "flow_state",
    "recipe",
    "split_tender",
    "start_flow",
    "write_back",
]

_FLOWS_MD = Path(__file__).resolve().parent.parent.parent / "docs" / "flows.md"


@asynccontextmanager
async def open_store(db_url: str, name: str, *, pool_size: int = 2) -> AsyncIterator[Store]:
    """The relay's Store on a pool of its own, writing as ``relay:<name>``; closed on exit."""
    db = Database(db_url, pool_size=pool_size, name=name)
    await db.open()
    try:
        yield Store(db, actor=f"relay:{name}")
    finally:
        await db.close()


def split_tender(card_method: str = "pm_card_visa") -> list[dict[str, Any]]:
    """docs/flows.md's recipe: hold both tenders, then capture both."""
    return [
        {"payment_id": "order-1-gift", "action": "authorize", "provider": "giftco",
         "amount_minor": 500, "currency": "EUR", "payment_method": "gift_card_tok"},
        {"payment_id": "order-1-card", "action": "authorize", "provider": "cardco",
         "amount_minor": 1500, "currency": "EUR", "payment_method": card_method},
        {"payment_id": "order-1-gift", "action": "capture", "currency": "EUR",
         "depends_on": [1, 2]},
        {"payment_id": "order-1-card", "action": "capture", "currency": "EUR",
         "depends_on": [1, 2]},
    ]  # fmt: skip


def recipe(name: str) -> str:
    """The SQL of docs/flows.md's recipe ``name``, as a reader pastes it."""
    text = _FLOWS_MD.read_text()
    blocks = re.findall(r"```sql\n(-- recipe: [a-z-]+\n.*?)```", text, re.DOTALL)
    found = [b for b in blocks if b.startswith(f"-- recipe: {name}\n")]
    assert len(found) == 1, f"docs/flows.md has no single recipe {name}"
    return str(found[0])


def start_flow(db_url: str, key: str, steps: list[dict[str, Any]]) -> int:
    with psycopg.connect(db_url) as conn:
        row = conn.execute("SELECT outbox.flow_start_v1(%s, %s)", (key, Jsonb(steps))).fetchone()
    assert row is not None
    return int(row[0])


def flow_by_key(db_url: str, key: str) -> int:
    [(flow_id,)] = rows(db_url, "SELECT id FROM outbox.flows WHERE flow_key = %s", key)
    return int(flow_id)


def flow_state(db_url: str, flow_id: int) -> tuple[str, str | None]:
    [(state, reason)] = rows(
        db_url, "SELECT state, reason FROM outbox.flows WHERE id = %s", flow_id
    )
    return str(state), reason


def flow_intents(db_url: str, flow_id: int) -> list[tuple[str, str, str, str]]:
    """(role, action, payment_id, status) of every intent of the flow, in id order."""
    found = rows(
        db_url,
        """
        SELECT metadata -> 'flow' ->> 'role', action, payment_id, status
        FROM outbox.payment_intents
        WHERE (metadata -> 'flow' ->> 'id')::bigint = %s ORDER BY id
        """,
        flow_id,
    )
    return [(str(a), str(b), str(c), str(d)) for a, b, c, d in found]


def flow_events(db_url: str, flow_id: int) -> list[str]:
    """The event types of the flow's events, in order; each names the flow."""
    events = rows(
        db_url,
        "SELECT event_type, payload FROM outbox.events WHERE ordering_key = %s ORDER BY seq",
        f"flow:{flow_id}",
    )
    for _, payload in events:
        assert payload["flow"]["id"] == flow_id
    return [str(event_type) for event_type, _ in events]


def authorized_snapshot(amount: int) -> PaymentSnapshot:
    """The payment as an authorisation of ``amount`` (EUR minor units) leaves it."""
    return PaymentSnapshot(PaymentState.AUTHORIZED, "EUR", authorized_minor=amount,
                           provider_reference="pi_x")  # fmt: skip


async def claim_one(store: Store, provider: str) -> Any:
    """The one intent waiting for ``provider``, claimed (fails if there is not exactly one)."""
    claimed = await store.claim(provider, 10, lease_seconds=60, instance="flows-test")
    assert len(claimed) == 1, claimed
    return claimed[0]


async def write_back(store: Store, row: Any, status: str, **fields: Any) -> None:
    """Write ``row``'s outcome back under its lease; fails if the write-back was fenced off."""
    written = await store.complete(
        [WriteBack(row.id, row.lease_token, row.payment_id, status, **fields)]
    )
    assert written == {row.id}
