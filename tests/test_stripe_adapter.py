"""Contract tests of StripeAdapter against the real fake provider over HTTP.

The adapter must turn every reply into exactly one outcome, never claim success for a reply
it cannot trust, settle an ambiguous attempt by looking it up (never by a new key), and
send the intent's idempotency key and trace context on every POST. What every adapter
promises (StripeAdapter and MemoryProvider alike) is in tests/test_adapter_contract.py;
this module checks what is Stripe's own: the fake's record of each effect, decline codes,
each way a reply can break, transport, credentials and headers.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from dataclasses import replace

import aiohttp
import anyio
import anyio.abc
import pytest
import stripe

from provider_adapters.base import (
    Action,
    Ambiguous,
    Command,
    Declined,
    Invalid,
    Retryable,
    Succeeded,
)
from provider_adapters.fake import FaultConfig
from provider_adapters.stripe import StripeAdapter
from tests.support.commands import authorized, charged, command, succeeded
from tests.support.fake_server import FakeServer, running_fake
from tests.support.providers import stripe_adapter
from tests.support.waiting import wait_until

pytestmark = pytest.mark.anyio

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.fixture
async def fake() -> AsyncIterator[FakeServer]:
    async with running_fake(FaultConfig(seed=11)) as server:
        yield server


def closed_port() -> int:
    """A port nobody listens on: bound, then released, so a connect is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# -- every action succeeds with a validated reply ----------------------------------------


async def test_authorize(fake: FakeServer, adapter: StripeAdapter) -> None:
    outcome = await succeeded(adapter, command(Action.AUTHORIZE, "a-1", 1999))
    assert outcome.provider_reference.startswith("pi_")
    assert outcome.payment_reference == outcome.provider_reference
    assert (outcome.amount_minor, outcome.currency, outcome.replayed) == (1999, "EUR", False)
    effect = (await fake.effects())["effects_by_key"]["a-1"]
    assert (effect["kinds"], effect["amount"], effect["currency"], effect["object"]) == (
        ["authorize"],
        1999,
        "eur",
        outcome.provider_reference,
    )


@pytest.mark.parametrize("amount", [1000, 400], ids=["full", "partial"])
async def test_capture(fake: FakeServer, adapter: StripeAdapter, amount: int) -> None:
    pi = await authorized(adapter, "c-auth")
    outcome = await succeeded(adapter, command(Action.CAPTURE, "c-cap", amount, reference=pi))
    assert (outcome.provider_reference, outcome.payment_reference) == (pi, pi)
    assert outcome.amount_minor == amount
    effect = (await fake.effects())["effects_by_key"]["c-cap"]
    assert (effect["kinds"], effect["amount"]) == (["capture"], amount)


async def test_charge(fake: FakeServer, adapter: StripeAdapter) -> None:
    outcome = await succeeded(adapter, command(Action.CHARGE, "ch-1", 250))
    assert outcome.provider_reference.startswith("pi_")
    assert outcome.amount_minor == 250
    assert (await fake.effects())["effects_by_key"]["ch-1"]["kinds"] == ["charge"]


async def test_void(fake: FakeServer, adapter: StripeAdapter) -> None:
    pi = await authorized(adapter, "v-auth", 700)
    outcome = await succeeded(adapter, command(Action.VOID, "v-void", 700, reference=pi))
    assert (outcome.provider_reference, outcome.amount_minor) == (pi, 700)
    effect = (await fake.effects())["effects_by_key"]["v-void"]
    assert (effect["kinds"], effect["amount"]) == (["void"], 700)


async def test_refund_partial_then_full(fake: FakeServer, adapter: StripeAdapter) -> None:
    pi = await charged(adapter, "r-ch", 1000)
    first = await succeeded(adapter, command(Action.REFUND, "r-1", 300, reference=pi))
    rest = await succeeded(adapter, command(Action.REFUND, "r-2", 700, reference=pi))
    for outcome in (first, rest):
        assert outcome.provider_reference.startswith("re_")
        assert outcome.payment_reference == pi
    assert first.provider_reference != rest.provider_reference
    assert (first.amount_minor, rest.amount_minor) == (300, 700)
    # Nothing is left to refund: the provider refuses, and that is our bug, not a retry.
    over = await adapter.execute(command(Action.REFUND, "r-3", 1, reference=pi))
    assert isinstance(over, Invalid) and over.code == "amount_too_large"
    by_key = (await fake.effects())["effects_by_key"]
    assert [by_key[k]["amount"] for k in ("r-1", "r-2")] == [300, 700]
    assert "r-3" not in by_key


# -- declines ----------------------------------------------------------------------------


@pytest.mark.parametrize("action", [Action.AUTHORIZE, Action.CHARGE])
@pytest.mark.parametrize(
    ("method", "code"),
    [
        ("pm_card_chargeDeclined", "generic_decline"),
        ("pm_card_chargeDeclinedInsufficientFunds", "insufficient_funds"),
        ("pm_card_chargeDeclinedExpiredCard", "expired_card"),
    ],
)
async def test_decline_is_declined_and_lookup_agrees(
    fake: FakeServer, adapter: StripeAdapter, action: Action, method: str, code: str
) -> None:
    cmd = command(action, f"d-{action}-{method}", method=method)
    outcome = await adapter.execute(cmd)
    assert isinstance(outcome, Declined) and outcome.code == code
    assert outcome.message  # the provider's words, for the operator
    # A lookup after a lost reply must reach the same verdict, not "not found" (retry).
    looked_up = await adapter.lookup(cmd)
    assert isinstance(looked_up, Declined) and looked_up.code == code
    assert await fake.effect_count(cmd.idempotency_key) == 0


async def test_unknown_payment_method_is_invalid(adapter: StripeAdapter) -> None:
    outcome = await adapter.execute(command(Action.AUTHORIZE, "pm-x", method="pm_card_bogus"))
    assert isinstance(outcome, Invalid) and outcome.code == "resource_missing"


# -- ambiguity is settled by lookup, exactly one effect ----------------------------------


async def _prepare(adapter: StripeAdapter, action: Action, key: str) -> Command:
    """The command under test, with whatever earlier step it needs already applied."""
    if action in (Action.AUTHORIZE, Action.CHARGE):
        return command(action, key, 1000)
    if action is Action.REFUND:
        return command(action, key, 400, reference=await charged(adapter, f"{key}-pre"))
    pi = await authorized(adapter, f"{key}-pre")
    return command(action, key, 1000 if action is Action.VOID else 600, reference=pi)


@pytest.mark.parametrize("action", list(Action))
async def test_effect_then_500_is_settled_by_lookup(
    fake: FakeServer, adapter: StripeAdapter, action: Action
) -> None:
    cmd = await _prepare(adapter, action, f"amb500-{action}")
    await fake.configure(rate_500_after_effect=1.0)
    outcome = await adapter.execute(cmd)
    assert isinstance(outcome, Ambiguous) and outcome.code == "provider_error_5xx"

    await fake.configure()
    # Retrying with the same key cannot settle it: Stripe replays the stored 500.
    assert isinstance(await adapter.execute(replace(cmd, attempt=2)), Ambiguous)
    settled = await adapter.lookup(cmd)
    assert isinstance(settled, Succeeded), settled
    effect = (await fake.effects())["effects_by_key"][cmd.idempotency_key]
    assert effect["count"] == 1
    assert settled.provider_reference == effect["object"]
    assert settled.amount_minor == cmd.amount_minor


@pytest.mark.parametrize(
    "key", ["o'brien-1", "back\\slash-1", 'say-"hi"', "trailing-\\", "\\'\"\\\\"]
)
async def test_lookup_settles_a_key_holding_quotes_or_backslashes(
    fake: FakeServer, adapter: StripeAdapter, key: str
) -> None:
    """The key is a quoted string in the search query: unescaped, a quote in it ended the
    string early and the search failed, so the ambiguous authorize was never settled."""
    cmd = command(Action.AUTHORIZE, key, 1000)
    await fake.configure(rate_500_after_effect=1.0)
    assert isinstance(await adapter.execute(cmd), Ambiguous)
    await fake.configure()
    settled = await adapter.lookup(cmd)
    assert isinstance(settled, Succeeded), settled
    effect = (await fake.effects())["effects_by_key"][key]
    assert (effect["count"], settled.provider_reference) == (1, effect["object"])


async def test_a_key_cannot_extend_the_search_query(
    fake: FakeServer, adapter: StripeAdapter
) -> None:
    await authorized(adapter, "victim")
    forged = "victim' OR metadata['outbox_idempotency_key']:'victim"
    outcome = await adapter.lookup(command(Action.AUTHORIZE, forged))
    assert isinstance(outcome, Retryable) and outcome.code == "not_found", outcome


@pytest.mark.parametrize("action", [Action.AUTHORIZE, Action.CAPTURE, Action.REFUND])
async def test_effect_then_timeout_is_settled_by_lookup(fake: FakeServer, action: Action) -> None:
    # Read timeout well below the fake's stall: the reply is lost after the effect.
    async with (
        stripe_adapter(fake.url) as patient,
        stripe_adapter(fake.url, read_timeout_seconds=0.15) as impatient,
    ):
        cmd = await _prepare(patient, action, f"ambto-{action}")
        await fake.configure(rate_timeout_after_effect=1.0, timeout_seconds=0.5)
        outcome = await impatient.execute(cmd)
        assert isinstance(outcome, Ambiguous) and outcome.code == "provider_timeout"
        await fake.configure()
        settled = await patient.lookup(cmd)
    assert isinstance(settled, Succeeded), settled
    effect = (await fake.effects())["effects_by_key"][cmd.idempotency_key]
    assert (effect["count"], settled.provider_reference) == (1, effect["object"])


@pytest.mark.parametrize("action", [Action.AUTHORIZE, Action.CHARGE, Action.REFUND, Action.VOID])
async def test_malformed_body_is_ambiguous_never_succeeded(
    fake: FakeServer, adapter: StripeAdapter, action: Action
) -> None:
    # Ten seeds walk the fake through all its ways of breaking a body (truncated JSON,
    # amount as string, wrong amount, wrong currency, unknown status).
    for seed in range(10):
        cmd = await _prepare(adapter, action, f"mal-{action}-{seed}")
        await fake.configure(rate_malformed=1.0, seed=seed)
        outcome = await adapter.execute(cmd)
        await fake.configure()
        assert isinstance(outcome, Ambiguous), (seed, outcome)
        assert outcome.code == "invalid_provider_reply"
        # The effect did happen; the lookup (a clean GET) is what may call it success.
        settled = await adapter.lookup(cmd)
        assert isinstance(settled, Succeeded), (seed, settled)
        assert await fake.effect_count(cmd.idempotency_key) == 1
    assert (await fake.effects())["faults_injected"]["malformed"] == 10


async def test_missing_payment_reference_never_reaches_the_provider(
    fake: FakeServer, adapter: StripeAdapter
) -> None:
    for action in (Action.CAPTURE, Action.VOID, Action.REFUND):
        outcome = await adapter.execute(command(action, f"noref-{action}"))
        assert isinstance(outcome, Ambiguous) and outcome.code == "missing_payment_reference"
    assert fake.posts() == []


# -- transport and credentials -----------------------------------------------------------


async def test_connection_refused_is_retryable() -> None:
    async with stripe_adapter(f"http://127.0.0.1:{closed_port()}") as closed:
        outcome = await closed.execute(command(Action.AUTHORIZE, "refused"))
        looked_up = await closed.lookup(command(Action.AUTHORIZE, "refused"))
    assert isinstance(outcome, Retryable) and outcome.code == "provider_unreachable"
    assert isinstance(looked_up, Ambiguous) and looked_up.code == "lookup_failed"


async def test_wrong_api_key_is_invalid_and_not_echoed(fake: FakeServer) -> None:
    wrong_key = "sk_live_definitely_wrong_123"
    async with stripe_adapter(fake.url, api_key=wrong_key) as wrong:
        outcome = await wrong.execute(command(Action.AUTHORIZE, "auth-x"))
    assert isinstance(outcome, Invalid) and outcome.code == "authentication_failed"
    assert wrong_key not in outcome.message
    assert await fake.effect_count("auth-x") == 0


async def test_injected_429_is_retryable_with_retry_after(
    fake: FakeServer, adapter: StripeAdapter
) -> None:
    await fake.configure(rate_429=1.0)
    outcome = await adapter.execute(command(Action.AUTHORIZE, "rl-1"))
    assert outcome == Retryable("rate_limited", "Too many requests hit the API too quickly.", 1.0)
    await fake.configure()
    retry = await succeeded(adapter, command(Action.AUTHORIZE, "rl-1"))
    assert not retry.replayed  # nothing was stored: the retry ran for real, once
    assert await fake.effect_count("rl-1") == 1


# -- what goes on the wire ---------------------------------------------------------------


async def test_traceparent_is_forwarded(fake: FakeServer, adapter: StripeAdapter) -> None:
    pi = (
        await succeeded(adapter, command(Action.AUTHORIZE, "tp-auth", traceparent=TRACEPARENT))
    ).payment_reference
    await succeeded(adapter, command(Action.CAPTURE, "tp-cap", 500, reference=pi))
    by_key = {r.headers.get("Idempotency-Key"): r.headers for r in fake.posts()}
    assert by_key["tp-auth"].get("traceparent") == TRACEPARENT
    assert "traceparent" not in {h.lower() for h in by_key["tp-cap"]}  # none given, none sent


async def test_traceparent_is_forwarded_on_lookups(
    fake: FakeServer, adapter: StripeAdapter
) -> None:
    """A lookup settles the same intent as the call: it belongs to the same trace."""
    pi = await authorized(adapter, "tpl-auth")
    await succeeded(adapter, command(Action.CAPTURE, "tpl-cap", 500, reference=pi))
    await succeeded(adapter, command(Action.REFUND, "tpl-ref", 100, reference=pi))
    lookups = [
        command(Action.AUTHORIZE, "tpl-auth", traceparent=TRACEPARENT),  # search
        command(Action.CAPTURE, "tpl-cap", 500, reference=pi, traceparent=TRACEPARENT),  # get
        command(Action.REFUND, "tpl-ref", 100, reference=pi, traceparent=TRACEPARENT),  # list
        command(Action.AUTHORIZE, "tpl-none"),  # no trace context: no header
    ]
    for cmd in lookups:
        before = len(fake.seen)
        await adapter.lookup(cmd)
        sent = [r for r in fake.seen[before:] if r.method == "GET"]
        assert sent, f"{cmd.action} looked up with a GET"
        expected = cmd.traceparent
        assert all(r.headers.get("traceparent") == expected for r in sent), (cmd.action, sent)


async def test_idempotency_key_is_sent_on_every_post(
    fake: FakeServer, adapter: StripeAdapter
) -> None:
    pi = await authorized(adapter, "ik-auth")
    await succeeded(adapter, command(Action.CAPTURE, "ik-cap", 1000, reference=pi))
    await succeeded(adapter, command(Action.REFUND, "ik-ref", 100, reference=pi))
    other = await authorized(adapter, "ik-auth2")
    await succeeded(adapter, command(Action.VOID, "ik-void", reference=other))
    await succeeded(adapter, command(Action.CHARGE, "ik-ch"))
    await adapter.execute(command(Action.AUTHORIZE, "ik-decl", method="pm_card_chargeDeclined"))
    sent = [(r.path, r.headers.get("Idempotency-Key")) for r in fake.posts()]
    assert sent == [
        ("/v1/payment_intents", "ik-auth"),
        (f"/v1/payment_intents/{pi}/capture", "ik-cap"),
        ("/v1/refunds", "ik-ref"),
        ("/v1/payment_intents", "ik-auth2"),
        (f"/v1/payment_intents/{other}/cancel", "ik-void"),
        ("/v1/payment_intents", "ik-ch"),
        ("/v1/payment_intents", "ik-decl"),
    ]


async def test_the_lanes_session_bounds_its_connections_and_closes(fake: FakeServer) -> None:
    """The SDK reaches the provider only through the lane's own aiohttp session, whose
    connector holds at most ``max_connections`` connections (the lane's bulkhead): with 3
    allowed and 9 calls at once against a provider taking 150 ms, the provider sees exactly
    3 requests in flight at its busiest. Closing the adapter closes the session."""
    await fake.configure(latency_ms=150)
    async with stripe_adapter(fake.url, max_connections=3) as bounded:
        async with anyio.create_task_group() as tg:
            for n in range(9):
                tg.start_soon(succeeded, bounded, command(Action.CHARGE, f"bound-{n}"))
        session = bounded._session.session
        assert session is not None and not session.closed
        assert session.connector is not None and session.connector.limit == 3
    assert session.closed
    entries = [e for e in await fake.request_log() if e["idempotency_key"].startswith("bound-")]
    assert len(entries) == 9
    busiest = max(
        sum(1 for other in entries if other["started"] <= e["started"] < other["finished"])
        for e in entries
    )
    assert busiest == 3


async def _serve_truncated_reply(port_ready: list[int], stop: anyio.Event) -> None:
    """An HTTP server that sends a 200 with Content-Length 1000, ten bytes of body, and
    closes the connection: a reply cut off after the provider may have applied it."""

    async def reply(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            received = b""
            while b"\r\n\r\n" not in received:
                received += await stream.receive()
            await stream.send(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Content-Length: 1000\r\n\r\n" + b'{"id": "pi'
            )

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port_ready.append(listener.extra(anyio.abc.SocketAttribute.local_port))
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, reply)
        await stop.wait()
        tg.cancel_scope.cancel()


async def test_a_reply_cut_off_mid_body_is_a_connection_error_and_ambiguous() -> None:
    """The SDK's aiohttp client reads the body outside its own error handling; the lane's
    client raises what a failure before the headers raises (``APIConnectionError`` from
    the aiohttp error), and the adapter calls it ambiguous (it may have been applied)."""
    port: list[int] = []
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(_serve_truncated_reply, port, stop)
        await wait_until(lambda: bool(port), "the truncating server to listen")
        try:
            async with stripe_adapter(f"http://127.0.0.1:{port[0]}") as cut:
                outcome = await cut.execute(command(Action.CHARGE, "cut-off"))
                with pytest.raises(stripe.APIConnectionError) as caught:
                    await cut._client.v1.payment_intents.create_async(
                        {"amount": 1000, "currency": "eur"}, {"idempotency_key": "cut-off"}
                    )
        finally:
            stop.set()
    assert isinstance(caught.value.__cause__, aiohttp.ClientPayloadError)
    assert isinstance(outcome, Ambiguous) and outcome.code == "provider_timeout", outcome
