"""Malformed provider replies never change state without verification.

The shipped fake provider serves every request and applies its effects; a middleware added
here replaces the reply the relay receives with a malformed one (truncated JSON, HTML with
200, wrong types, another amount or currency, unknown status, no id, another object, a
huge body, HTTP 200 carrying an error object, an id holding a card number...). Whatever
the reply, StripeAdapter must not return Succeeded for it; the relay (in process, the real
StripeAdapter) must keep running, settle the intent by looking it up (so it ends
succeeded with the amount the provider really applied, once), or, when the lookup is
malformed too, park it dead with a named error code and leave the payment's amounts
untouched.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import anyio
import psycopg
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from provider_adapters.base import Action, Ambiguous, Succeeded
from provider_adapters.fake import FaultConfig
from relay.core.lanes import BreakerSettings
from relay.infra.redaction import luhn_valid
from tests.invariants import intents
from tests.support.commands import command
from tests.support.fake_server import Handler, running_fake
from tests.support.intents import insert_intents
from tests.support.providers import stripe_adapter
from tests.support.relays import make_relay, run_until_settled

CARD = "4111 1111 1111 1111"


def _amount_fields(body: dict[str, Any], change: Callable[[Any], Any]) -> dict[str, Any]:
    out = dict(body)
    for name in ("amount", "amount_capturable", "amount_received"):
        if name in out:
            out[name] = change(out[name])
    return out


def _json(doc: Any) -> bytes:
    return json.dumps(doc).encode()


# name -> what the relay receives instead of the provider's real reply
MANGLERS: dict[str, Callable[[dict[str, Any], bytes], bytes]] = {
    "truncated_json": lambda _doc, raw: raw[: len(raw) // 2],
    "html_with_200": lambda _doc, _raw: b"<html><body>OK</body></html>",
    "empty_body": lambda _doc, _raw: b"",
    "json_array": lambda _doc, _raw: b"[]",
    "json_null": lambda _doc, _raw: b"null",
    "amount_as_string": lambda doc, _raw: _json(_amount_fields(doc, str)),
    "amount_as_float": lambda doc, _raw: _json(_amount_fields(doc, lambda v: v + 0.5)),
    "amount_as_bool": lambda doc, _raw: _json(_amount_fields(doc, lambda _v: True)),
    "other_amount": lambda doc, _raw: _json(_amount_fields(doc, lambda v: v + 1)),
    "zero_amount": lambda doc, _raw: _json(_amount_fields(doc, lambda _v: 0)),
    "other_currency": lambda doc, _raw: _json({**doc, "currency": "usd"}),
    "currency_as_number": lambda doc, _raw: _json({**doc, "currency": 978}),
    "status_as_number": lambda doc, _raw: _json({**doc, "status": 1}),
    "unknown_status": lambda doc, _raw: _json({**doc, "status": "teleported"}),
    "missing_id": lambda doc, _raw: _json({k: v for k, v in doc.items() if k != "id"}),
    "id_with_card": lambda doc, _raw: _json({**doc, "id": "pi_" + CARD.replace(" ", "")}),
    "id_huge": lambda doc, _raw: _json({**doc, "id": "pi_" + "A" * 100_000}),
    "id_with_newline": lambda doc, _raw: _json({**doc, "id": "pi_abc\nforged"}),
    "wrong_object": lambda doc, _raw: _json({**doc, "object": "charge"}),
    "huge_body": lambda doc, _raw: _json({**doc, "object": "list", "padding": "x" * 3_000_000}),
    "error_object_with_200": lambda _doc, _raw: _json(
        {"error": {"type": "card_error", "code": "card_declined", "message": f"card {CARD}"}}
    ),
}


@dataclass
class Mangler:
    """Which idempotency keys get which malformed reply, and how often."""

    scenario_by_key: dict[str, str] = field(default_factory=dict)
    always: set[str] = field(default_factory=set)  # keys whose lookups are mangled too
    scenario_by_pi: dict[str, str] = field(default_factory=dict)
    mangled: dict[str, int] = field(default_factory=dict)

    def scenario_for(self, request: web.Request) -> tuple[str | None, str | None]:
        key = request.headers.get("Idempotency-Key")
        if request.method == "POST" and key in self.scenario_by_key:
            return self.scenario_by_key[key], key
        if request.method == "GET":
            query = request.query.get("query", "")
            for known, scenario in self.scenario_by_key.items():
                if known in query and known in self.always:
                    return scenario, known
            match = re.fullmatch(r"/v1/payment_intents/(pi_[A-Za-z0-9]+)", request.path)
            if match and match.group(1) in self.scenario_by_pi:
                return self.scenario_by_pi[match.group(1)], None
        return None, None


@asynccontextmanager
async def mangling_fake(mangler: Mangler) -> AsyncIterator[str]:
    """The fake provider, its replies mangled by ``mangler``'s scenarios."""

    @web.middleware
    async def mangle(request: web.Request, handler: Handler) -> web.StreamResponse:
        response = await handler(request)
        if not request.path.startswith("/v1/") or not isinstance(response, web.Response):
            return response
        scenario, key = mangler.scenario_for(request)
        raw = response.body if isinstance(response.body, bytes) else b""
        try:
            doc = json.loads(raw)
        except ValueError:
            return response
        if request.method == "POST" and key is not None and isinstance(doc, dict) and "id" in doc:
            mangler.scenario_by_pi.setdefault(str(doc["id"]), mangler.scenario_by_key[key])
        if scenario is None or response.status != 200:
            return response
        seen = mangler.mangled.get(f"{request.method} {key or request.path}", 0)
        first_post = request.method == "POST" and seen == 0
        if not (first_post or (key or "") in mangler.always or scenario in mangler.always):
            return response
        mangler.mangled[f"{request.method} {key or request.path}"] = seen + 1
        body = doc
        if request.method == "GET" and isinstance(doc, dict) and isinstance(doc.get("data"), list):
            data = [json.loads(MANGLERS[scenario](d, _json(d)) or b"null") for d in doc["data"]]
            return web.Response(body=_json({**doc, "data": data}), content_type="application/json")
        return web.Response(body=MANGLERS[scenario](body, raw), content_type="application/json")

    async with running_fake(FaultConfig(seed=5), middlewares=[mangle]) as server:
        yield server.url


@pytest.mark.anyio
@pytest.mark.parametrize("scenario", sorted(MANGLERS))
async def test_the_adapter_never_calls_a_malformed_reply_a_success(scenario: str) -> None:
    mangler = Mangler(scenario_by_key={f"a-{scenario}": scenario, f"c-{scenario}": scenario})
    async with mangling_fake(mangler) as url, stripe_adapter(url) as adapter:
        auth = command(Action.AUTHORIZE, f"a-{scenario}")
        first = await adapter.execute(auth)
        assert isinstance(first, Ambiguous), first
        assert first.code == "invalid_provider_reply", first
        assert CARD.replace(" ", "") not in first.message and CARD not in first.message
        # The lookup finds what the provider really did, verified like any reply.
        settled = await adapter.lookup(auth)
        assert isinstance(settled, Succeeded), settled
        assert (settled.amount_minor, settled.currency) == (1000, "EUR")
        assert re.fullmatch(r"pi_[A-Za-z0-9]+", settled.provider_reference)

        capture = command(Action.CAPTURE, f"c-{scenario}", reference=settled.payment_reference)
        captured = await adapter.execute(capture)
        assert isinstance(captured, Ambiguous), captured
        by_lookup = await adapter.lookup(capture)
        assert isinstance(by_lookup, Succeeded) and by_lookup.amount_minor == 1000


# -- any reply at all: property over mutations of a valid one ------------------------------

VALID_AUTH_REPLY = {
    "id": "pi_3MtwBwLkdIwHu7ix28a3tqPa",
    "object": "payment_intent",
    "amount": 1000,
    "amount_capturable": 1000,
    "amount_received": 0,
    "currency": "eur",
    "status": "requires_capture",
}
HOSTILE_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=30),
    st.sampled_from(
        ["1000", "1000.0", "EUR", "eur", "succeeded", "pi_", "re_x", CARD, "pi_" + "9" * 16]
    ),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)


def _trustworthy(body: Any) -> bool:
    """The oracle: the only replies an authorize of 1000 EUR may call a success."""
    if not isinstance(body, dict):
        return False
    ident = body.get("id")
    amounts = [body.get(k) for k in ("amount", "amount_capturable")]
    return (
        body.get("object") == "payment_intent"
        and isinstance(ident, str)
        and re.fullmatch(r"pi_[A-Za-z0-9_]{1,250}", ident) is not None
        and not any(len(run) <= 19 and luhn_valid(run) for run in re.findall(r"[0-9]{13,}", ident))
        and isinstance(body.get("currency"), str)
        and body["currency"].upper() == "EUR"
        and body.get("status") == "requires_capture"
        and all(type(a) is int and a == 1000 for a in amounts)
    )


class _ScriptedProvider:
    """Answers every request with the scripted body (HTTP 200); lookups find nothing."""

    def __init__(self) -> None:
        self.body: bytes = b"{}"
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def _reply(self, body: bytes) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self._reply(owner.body)

            def do_GET(self) -> None:
                self._reply(b'{"object": "search_result", "data": [], "has_more": false}')

            def log_message(self, *_args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def scripted() -> Any:
    provider = _ScriptedProvider()
    yield provider
    provider.stop()


@settings(max_examples=120, deadline=None)
@given(
    changes=st.dictionaries(
        st.sampled_from([*VALID_AUTH_REPLY, "error", "extra"]), HOSTILE_VALUES, max_size=3
    ),
    drop=st.sets(st.sampled_from(list(VALID_AUTH_REPLY)), max_size=2),
)
def test_any_reply_is_success_only_when_it_verifies(
    scripted: _ScriptedProvider, changes: dict[str, Any], drop: set[str]
) -> None:
    body = {k: v for k, v in {**VALID_AUTH_REPLY, **changes}.items() if k not in drop}
    scripted.body = json.dumps(body).encode()

    async def once() -> Any:
        async with stripe_adapter(scripted.url) as adapter:
            return await adapter.execute(command(Action.AUTHORIZE, "prop-key"))

    outcome = anyio.run(once)
    if _trustworthy(body):
        assert isinstance(outcome, Succeeded), (body, outcome)
        assert (outcome.amount_minor, outcome.currency) == (1000, "EUR")
    else:
        assert not isinstance(outcome, Succeeded), (body, outcome)


# -- the whole relay -------------------------------------------------------------------------

FIRST_ONLY = sorted(MANGLERS)
ALWAYS = ["truncated_json", "other_amount", "unknown_status", "id_with_card"]


@pytest.mark.integration
@pytest.mark.anyio
async def test_the_relay_settles_malformed_replies_by_lookup_and_never_trusts_them(
    db_url: str,
) -> None:
    mangler = Mangler()
    rows: list[tuple[str, str, str, int | None, str]] = []
    for scenario in FIRST_ONLY:
        mangler.scenario_by_key[f"auth-{scenario}"] = scenario
        mangler.scenario_by_key[f"cap-{scenario}"] = scenario
        rows.append((f"first-{scenario}", "authorize", f"auth-{scenario}", 1000, "pm_card_visa"))
        rows.append((f"first-{scenario}", "capture", f"cap-{scenario}", 600, ""))
    for scenario in ALWAYS:
        key = f"always-{scenario}"
        mangler.scenario_by_key[key] = scenario
        mangler.always.add(key)
        rows.append((f"always-{scenario}", "authorize", key, 1000, "pm_card_visa"))
    insert_intents(
        db_url,
        [
            {
                "payment_id": payment_id,
                "action": action,
                "amount_minor": amount,
                "payment_method": method or None,
                "idempotency_key": key,
            }
            for payment_id, action, key, amount, method in rows
        ],
    )

    async with mangling_fake(mangler) as url, stripe_adapter(url) as adapter:
        # Garbage replies count as failures and would open the breaker for 30 s (as they
        # should in production); here the point is each reply's outcome, not the pause.
        breaker = BreakerSettings(failure_threshold=1000, cooldown_seconds=0.1)
        relay = make_relay(db_url, adapter, max_attempts=3, breaker=breaker)
        await run_until_settled(db_url, [relay], deadline=120)

    by_key = {row[4]: row for row in intents(db_url)}
    with psycopg.connect(db_url) as conn:
        payments = {
            row[0]: row[1:]
            for row in conn.execute(
                "SELECT payment_id, state, authorized_minor, captured_minor, provider_reference"
                " FROM outbox.payments"
            )
        }
        applied = dict(
            conn.execute(
                "SELECT idempotency_key, amount_applied_minor FROM outbox.payment_intents"
            ).fetchall()
        )
        stored_cards = conn.execute(
            "SELECT t.doc FROM (SELECT to_jsonb(i) - 'payment_method' AS doc"
            " FROM outbox.payment_intents i UNION ALL SELECT to_jsonb(p) FROM outbox.payments p"
            " UNION ALL SELECT to_jsonb(e) FROM outbox.events e"
            " UNION ALL SELECT to_jsonb(a) - 'hash' - 'prev_hash' FROM outbox.audit_log a) t"
            " WHERE outbox.contains_card_number(t.doc::text)"
        ).fetchall()

    for scenario in FIRST_ONLY:
        # Every malformed first reply was settled by a verified lookup: success, with the
        # amounts the command asked for, under the provider's real id.
        auth, cap = by_key[f"auth-{scenario}"], by_key[f"cap-{scenario}"]
        assert auth[3] == "succeeded", (scenario, auth)
        assert cap[3] == "succeeded", (scenario, cap)
        assert applied[f"auth-{scenario}"] == 1000 and applied[f"cap-{scenario}"] == 600
        state, authorized, captured, reference = payments[f"first-{scenario}"]
        assert (state, authorized, captured) == ("captured", 1000, 600), scenario
        assert re.fullmatch(r"pi_[A-Za-z0-9]+", reference), reference
        assert mangler.mangled.get(f"POST auth-{scenario}") == 1, scenario
    for scenario in ALWAYS:
        # Never verifiable: dead with a named code, the payment's amounts untouched.
        intent = by_key[f"always-{scenario}"]
        assert intent[3] == "dead", (scenario, intent)
        assert intent[6] in ("invalid_provider_reply", "not_found", "lookup_failed"), intent
        assert payments[f"always-{scenario}"][:3] == ("new", 0, 0), scenario
    assert stored_cards == []
