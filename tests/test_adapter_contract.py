"""The adapter contract (provider_adapters/base.py), checked for every adapter against
its fake: StripeAdapter against the fake Stripe server over HTTP, AdyenAdapter against the
fake Adyen Checkout API over HTTP, and MemoryProvider.

Each test runs once per provider in :data:`PROVIDERS`. What only some providers do runs
for exactly those that declare it, and its counterpart for the others: no provider is
skipped, none is claimed to do what it cannot. The declared features:

* ``outage`` / ``lost_reply``: its fake can fail every call before any effect, or lose
  every reply after the effect;
* ``final_modifications``: capture, void and refund answer final (Succeeded); the other
  kind, ``received_modifications`` (Adyen), answers ``Ambiguous("awaiting_confirmation")``
  naming the modification, with the effect applied once and replayed under the same key;
* ``lookup``: :meth:`lookup` can settle an attempt (Adyen's Checkout API has none: its
  lookup answers ``Ambiguous("lookup_unavailable")`` and a lost reply is settled by the
  same key's replay instead, ``settles_by_replay``);
* ``sync_validation``: a refund above the captured amount or a second capture is refused
  in the reply (Adyen accepts both and fails them by webhook; the state machine refuses
  them before any provider call in any case);
* ``reports_replay``: a replayed answer is marked ``replayed`` (Adyen sends no marker).

A new adapter joins by adding one entry to :data:`PROVIDERS`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, replace

import pytest

from provider_adapters.base import (
    Action,
    Ambiguous,
    Command,
    Declined,
    Invalid,
    Outcome,
    ProviderAdapter,
    Retryable,
    Succeeded,
)
from provider_adapters.memory import MemoryProvider
from tests.support.adyen import adyen_on_fake
from tests.support.commands import authorized, charged, command, outcome_of
from tests.support.commands import succeeded as succeeded_on
from tests.support.providers import stripe_on_fake

pytestmark = pytest.mark.anyio


@dataclass
class ProviderUnderTest:
    """An adapter, how to read its fake's effects, and which faults the fake can inject."""

    adapter: ProviderAdapter
    effects: Callable[[], Awaitable[dict[str, int]]]  # applied effects per idempotency key
    # Make every call fail before any effect (True) or heal it (False); None: cannot.
    outage: Callable[[bool], Awaitable[None]] | None = None
    # Make every call lose its reply after the effect (True) or heal it; None: cannot.
    lost_reply: Callable[[bool], Awaitable[None]] | None = None
    name: str = ""  # the PROVIDERS entry, set by the fixture


@asynccontextmanager
async def stripe_against_fake() -> AsyncIterator[ProviderUnderTest]:
    async with stripe_on_fake() as (fake, adapter):

        async def effects() -> dict[str, int]:
            by_key = (await fake.effects())["effects_by_key"]
            return {key: int(entry["count"]) for key, entry in by_key.items()}

        async def outage(on: bool) -> None:
            await fake.configure(rate_503=1.0 if on else 0.0)

        async def lost_reply(on: bool) -> None:
            await fake.configure(rate_500_after_effect=1.0 if on else 0.0)

        yield ProviderUnderTest(adapter, effects, outage=outage, lost_reply=lost_reply)


@asynccontextmanager
async def adyen_against_fake() -> AsyncIterator[ProviderUnderTest]:
    async with adyen_on_fake() as (fake, adapter):

        async def outage(on: bool) -> None:
            await fake.configure(rate_503=1.0 if on else 0.0)

        async def lost_reply(on: bool) -> None:
            await fake.configure(rate_drop_after_effect=1.0 if on else 0.0)

        yield ProviderUnderTest(adapter, fake.effects, outage=outage, lost_reply=lost_reply)


@asynccontextmanager
async def in_memory() -> AsyncIterator[ProviderUnderTest]:
    memory = MemoryProvider()

    async def effects() -> dict[str, int]:
        return dict(memory.effects)

    yield ProviderUnderTest(memory, effects)


@dataclass(frozen=True)
class Entry:
    start: Callable[[], AbstractAsyncContextManager[ProviderUnderTest]]
    faults: frozenset[str] = frozenset()  # the features of the module docstring


_SYNCHRONOUS = frozenset({"final_modifications", "lookup", "sync_validation", "reports_replay"})

PROVIDERS: dict[str, Entry] = {
    "stripe+fake": Entry(stripe_against_fake, _SYNCHRONOUS | {"outage", "lost_reply"}),
    "adyen+fake": Entry(
        adyen_against_fake,
        frozenset({"outage", "lost_reply", "received_modifications", "settles_by_replay"}),
    ),
    "memory": Entry(in_memory, _SYNCHRONOUS),
}


def able_to(fault: str) -> list[str]:
    """The providers that declare ``fault`` (a feature of the module docstring)."""
    return [name for name, entry in PROVIDERS.items() if fault in entry.faults]


def has(provider: ProviderUnderTest, feature: str) -> bool:
    return feature in PROVIDERS[provider.name].faults


@pytest.fixture(params=list(PROVIDERS))
async def provider(request: pytest.FixtureRequest) -> AsyncIterator[ProviderUnderTest]:
    async with PROVIDERS[request.param].start() as under_test:
        under_test.name = request.param
        yield under_test


# -- helpers -----------------------------------------------------------------------------


async def execute(provider: ProviderUnderTest, cmd: Command) -> Outcome:
    return outcome_of(await provider.adapter.execute(cmd))


async def lookup(provider: ProviderUnderTest, cmd: Command) -> Outcome:
    return outcome_of(await provider.adapter.lookup(cmd))


async def succeeded(provider: ProviderUnderTest, cmd: Command) -> Succeeded:
    return await succeeded_on(provider.adapter, cmd)


async def paid(provider: ProviderUnderTest, action: Action, key: str, amount: int = 1000) -> str:
    """The payment reference of an authorized or charged payment."""
    pay = authorized if action is Action.AUTHORIZE else charged
    return await pay(provider.adapter, key, amount)


# -- the adapter and its outcomes --------------------------------------------------------


async def test_is_a_provider_adapter(provider: ProviderUnderTest) -> None:
    assert isinstance(provider.adapter, ProviderAdapter)
    assert provider.adapter.name


@pytest.mark.parametrize("action", [Action.AUTHORIZE, Action.CHARGE])
async def test_authorize_and_charge_succeed_once_on_a_new_payment(
    provider: ProviderUnderTest, action: Action
) -> None:
    outcome = await succeeded(provider, command(action, f"new-{action}", 1999))
    assert outcome.provider_reference == outcome.payment_reference != ""
    assert (outcome.amount_minor, outcome.currency, outcome.replayed) == (1999, "EUR", False)
    assert await provider.effects() == {f"new-{action}": 1}


@pytest.mark.parametrize("provider", able_to("final_modifications"), indirect=True)
@pytest.mark.parametrize("amount", [1000, 400], ids=["full", "partial"])
async def test_capture_succeeds_on_the_authorized_payment(
    provider: ProviderUnderTest, amount: int
) -> None:
    pi = await paid(provider, Action.AUTHORIZE, "cap-auth")
    outcome = await succeeded(provider, command(Action.CAPTURE, "cap", amount, reference=pi))
    assert (outcome.provider_reference, outcome.payment_reference) == (pi, pi)
    assert (outcome.amount_minor, outcome.currency, outcome.replayed) == (amount, "EUR", False)
    assert await provider.effects() == {"cap-auth": 1, "cap": 1}


@pytest.mark.parametrize("provider", able_to("final_modifications"), indirect=True)
async def test_void_succeeds_on_the_authorized_payment(provider: ProviderUnderTest) -> None:
    pi = await paid(provider, Action.AUTHORIZE, "void-auth", 700)
    outcome = await succeeded(provider, command(Action.VOID, "void", 700, reference=pi))
    assert (outcome.provider_reference, outcome.payment_reference) == (pi, pi)
    assert outcome.amount_minor == 700
    assert await provider.effects() == {"void-auth": 1, "void": 1}


@pytest.mark.parametrize("provider", able_to("final_modifications"), indirect=True)
async def test_refunds_succeed_up_to_the_captured_amount_each_its_own_object(
    provider: ProviderUnderTest,
) -> None:
    pi = await paid(provider, Action.CHARGE, "ref-ch", 1000)
    first = await succeeded(provider, command(Action.REFUND, "ref-1", 300, reference=pi))
    rest = await succeeded(provider, command(Action.REFUND, "ref-2", 700, reference=pi))
    assert first.provider_reference not in (pi, "", rest.provider_reference)
    assert rest.provider_reference not in (pi, "")
    assert (first.payment_reference, rest.payment_reference) == (pi, pi)
    assert (first.amount_minor, rest.amount_minor) == (300, 700)
    assert await provider.effects() == {"ref-ch": 1, "ref-1": 1, "ref-2": 1}


@pytest.mark.parametrize("action", [Action.AUTHORIZE, Action.CHARGE])
async def test_a_declined_card_is_declined_without_effect_and_lookup_agrees(
    provider: ProviderUnderTest, action: Action
) -> None:
    cmd = command(action, f"decl-{action}", method="pm_card_chargeDeclined")
    outcome = await execute(provider, cmd)
    # Only the class is the contract: the code is the provider's (Stripe's decline_code).
    assert isinstance(outcome, Declined) and outcome.code and outcome.message
    if has(provider, "lookup"):
        assert isinstance(await lookup(provider, cmd), Declined)
    else:  # the same key replays the refusal
        assert await execute(provider, replace(cmd, attempt=2)) == outcome
    assert await provider.effects() == {}


@pytest.mark.parametrize("provider", able_to("sync_validation"), indirect=True)
async def test_more_than_is_left_to_refund_or_a_second_capture_is_invalid(
    provider: ProviderUnderTest,
) -> None:
    pi = await paid(provider, Action.AUTHORIZE, "inv-auth")
    await succeeded(provider, command(Action.CAPTURE, "inv-cap", 600, reference=pi))
    await succeeded(provider, command(Action.REFUND, "inv-ref", 250, reference=pi))
    over = await execute(provider, command(Action.REFUND, "inv-over", 351, reference=pi))
    assert isinstance(over, Invalid) and over.code == "amount_too_large"
    twice = await execute(provider, command(Action.CAPTURE, "inv-cap-2", 100, reference=pi))
    assert isinstance(twice, Invalid) and twice.code == "payment_intent_unexpected_state"
    assert await provider.effects() == {"inv-auth": 1, "inv-cap": 1, "inv-ref": 1}


# -- idempotency -------------------------------------------------------------------------


@pytest.mark.parametrize("provider", able_to("final_modifications"), indirect=True)
@pytest.mark.parametrize("action", list(Action))
async def test_the_same_key_replays_the_result_with_one_effect(
    provider: ProviderUnderTest, action: Action
) -> None:
    if action in (Action.AUTHORIZE, Action.CHARGE):
        cmd = command(action, "rep")
    else:
        before = Action.CHARGE if action is Action.REFUND else Action.AUTHORIZE
        amount = 1000 if action is Action.VOID else 400  # a void releases the whole hold
        cmd = command(action, "rep", amount, reference=await paid(provider, before, "rep-pre"))
    first = await succeeded(provider, cmd)
    again = await succeeded(provider, replace(cmd, attempt=2))
    assert again == replace(first, replayed=True)
    assert (await provider.effects())["rep"] == 1


# -- lookups -----------------------------------------------------------------------------


@pytest.mark.parametrize("provider", able_to("lookup"), indirect=True)
async def test_lookup_finds_nothing_when_nothing_happened(provider: ProviderUnderTest) -> None:
    pi = await paid(provider, Action.AUTHORIZE, "nf-auth")
    for cmd in (
        command(Action.AUTHORIZE, "nf-never"),
        command(Action.CHARGE, "nf-never-ch"),
        command(Action.CAPTURE, "nf-cap", 500, reference=pi),
        command(Action.VOID, "nf-void", reference=pi),
        command(Action.REFUND, "nf-ref", 100, reference=pi),
    ):
        outcome = await lookup(provider, cmd)
        assert isinstance(outcome, Retryable) and outcome.code == "not_found", (cmd, outcome)


@pytest.mark.parametrize("provider", able_to("lookup"), indirect=True)
async def test_lookup_of_a_settled_key_says_what_execute_said(
    provider: ProviderUnderTest,
) -> None:
    pi = await paid(provider, Action.CHARGE, "lk-ch")
    refund_cmd = command(Action.REFUND, "lk-ref", 250, reference=pi)
    refund = await succeeded(provider, refund_cmd)
    assert await lookup(provider, refund_cmd) in (refund, replace(refund, replayed=True))
    assert await provider.effects() == {"lk-ch": 1, "lk-ref": 1}


# -- what only some fakes can be driven to -----------------------------------------------


@pytest.mark.parametrize("provider", able_to("outage"), indirect=True)
async def test_an_outage_is_retryable_and_the_retry_applies_once(
    provider: ProviderUnderTest,
) -> None:
    assert provider.outage is not None
    cmd = command(Action.AUTHORIZE, "out-1")
    await provider.outage(True)
    outcome = await execute(provider, cmd)
    assert isinstance(outcome, Retryable), outcome
    assert await provider.effects() == {}, "nothing happened"
    await provider.outage(False)
    retried = await succeeded(provider, replace(cmd, attempt=2))
    assert not retried.replayed, "nothing was stored: the retry ran for real"
    assert await provider.effects() == {"out-1": 1}


@pytest.mark.parametrize(
    "provider", sorted(set(able_to("lost_reply")) & set(able_to("lookup"))), indirect=True
)
async def test_a_reply_lost_after_the_effect_is_ambiguous_and_lookup_settles_it(
    provider: ProviderUnderTest,
) -> None:
    assert provider.lost_reply is not None
    cmd = command(Action.CHARGE, "lost-1", 800)
    await provider.lost_reply(True)
    outcome = await execute(provider, cmd)
    assert isinstance(outcome, Ambiguous), outcome
    await provider.lost_reply(False)
    settled = await lookup(provider, cmd)
    assert isinstance(settled, Succeeded), settled
    assert (settled.amount_minor, settled.currency) == (800, "EUR")
    assert await provider.effects() == {"lost-1": 1}


@pytest.mark.parametrize(
    "provider",
    sorted(set(able_to("lost_reply")) & set(able_to("settles_by_replay"))),
    indirect=True,
)
async def test_a_reply_lost_after_the_effect_is_ambiguous_and_the_same_key_settles_it(
    provider: ProviderUnderTest,
) -> None:
    assert provider.lost_reply is not None
    cmd = command(Action.CHARGE, "lost-2", 800)
    await provider.lost_reply(True)
    assert isinstance(await execute(provider, cmd), Ambiguous)
    await provider.lost_reply(False)
    settled = await succeeded(provider, replace(cmd, attempt=2))
    assert (settled.amount_minor, settled.currency) == (800, "EUR")
    assert await provider.effects() == {"lost-2": 1}


# -- providers that confirm modifications later (Adyen: 201 "received", then a webhook) ----


async def received(provider: ProviderUnderTest, cmd: Command) -> str:
    """The modification's reference: the answer is accepted-not-final, never Succeeded."""
    outcome = await execute(provider, cmd)
    assert isinstance(outcome, Ambiguous), outcome
    assert outcome.code == "awaiting_confirmation" and outcome.provider_reference, outcome
    return outcome.provider_reference


@pytest.mark.parametrize("provider", able_to("received_modifications"), indirect=True)
@pytest.mark.parametrize("action", [Action.CAPTURE, Action.VOID, Action.REFUND])
async def test_a_received_modification_is_not_final_and_its_key_replays_once(
    provider: ProviderUnderTest, action: Action
) -> None:
    before = Action.CHARGE if action is Action.REFUND else Action.AUTHORIZE
    pi = await paid(provider, before, "rcv-pre")
    cmd = command(action, "rcv", 1000 if action is Action.VOID else 400, reference=pi)
    first = await received(provider, cmd)
    assert first != pi, "the modification has its own reference"
    assert await received(provider, replace(cmd, attempt=2)) == first
    assert await provider.effects() == {"rcv-pre": 1, "rcv": 1}


@pytest.mark.parametrize("provider", able_to("received_modifications"), indirect=True)
async def test_received_refunds_are_each_their_own_modification(
    provider: ProviderUnderTest,
) -> None:
    pi = await paid(provider, Action.CHARGE, "rref-ch", 1000)
    one = await received(provider, command(Action.REFUND, "rref-1", 300, reference=pi))
    two = await received(provider, command(Action.REFUND, "rref-2", 700, reference=pi))
    assert len({one, two, pi}) == 3
    assert await provider.effects() == {"rref-ch": 1, "rref-1": 1, "rref-2": 1}


async def test_lookup_never_invents_an_answer(provider: ProviderUnderTest) -> None:
    """Without a lookup, the answer is Ambiguous (never not_found, which would let the
    janitor record "no effect" for something the provider may hold)."""
    pi = await paid(provider, Action.AUTHORIZE, "lk-any")
    outcome = await lookup(provider, command(Action.CAPTURE, "lk-any-cap", 500, reference=pi))
    if has(provider, "lookup"):
        assert isinstance(outcome, Retryable) and outcome.code == "not_found"
    else:
        assert isinstance(outcome, Ambiguous) and outcome.code == "lookup_unavailable"
