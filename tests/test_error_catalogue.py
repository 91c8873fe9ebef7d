"""The error catalogue (provider_adapters/error_catalogue.csv): every code either fake can
make its adapter report has a row of the same class; docs/errors.md is generated from it;
an uncatalogued code is counted by code."""

from __future__ import annotations

import ast
from dataclasses import replace
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from provider_adapters.base import (
    Action,
    Ambiguous,
    Declined,
    Invalid,
    Outcome,
    ProviderAdapter,
    Retryable,
    Succeeded,
)
from provider_adapters.error_catalogue import (
    CLASSES,
    _parse,
    catalogue,
    catalogued_outcome,
    class_of,
    lookup,
    lookup_in,
)
from provider_adapters.fake.adyen import CARDS
from provider_adapters.fake.cards import TEST_CARDS
from relay.cli.errors import markdown
from tests.support.adyen import adyen_adapter, adyen_on_fake
from tests.support.commands import command
from tests.support.providers import stripe_adapter, stripe_on_fake

ROOT = Path(__file__).resolve().parent.parent


class Seen:
    """The (class, code) pairs an adapter reported."""

    def __init__(self, adapter: ProviderAdapter) -> None:
        self.adapter = adapter
        self.pairs: set[tuple[str, str]] = set()

    def add(self, outcome: Outcome) -> Outcome:
        if not isinstance(outcome, Succeeded):
            self.pairs.add((type(outcome).__name__.lower(), outcome.code))
        return outcome

    async def run(self, action: Action, key: str, amount: int = 1000, **kw: object) -> Outcome:
        return self.add(await self.adapter.execute(command(action, key, amount, **kw)))  # type: ignore[arg-type]


def assert_catalogued(kind: str, pairs: set[tuple[str, str]]) -> None:
    """Every code has a row, and the row's class is the one the relay then acts on: a
    row the adapter's class overrides (an ambiguous outcome stays ambiguous) would say
    one thing and the relay do another."""
    missing = sorted(f"{kind} {code} ({klass})" for klass, code in pairs if not lookup(kind, code))
    assert missing == [], f"add rows to provider_adapters/error_catalogue.csv: {missing}"
    outcome_of = {"declined": Declined, "invalid": Invalid, "retryable": Retryable}
    wrong = sorted(
        f"{code}: adapter says {klass}, catalogue {entry.klass}, relay acts on {acted}"
        for klass, code in pairs
        if (entry := lookup(kind, code))
        and (
            acted := class_of(
                catalogued_outcome(kind, outcome_of.get(klass, Ambiguous)(code, "m"))  # type: ignore[abstract]
            )
        )
        != entry.klass
    )
    assert wrong == []


@pytest.mark.anyio
async def test_every_code_the_stripe_fake_can_emit_is_catalogued() -> None:
    async with stripe_on_fake() as (fake, adapter):
        seen = Seen(adapter)
        for card in TEST_CARDS:
            await seen.run(
                Action.AUTHORIZE, f"card-{card.payment_method}", method=card.payment_method
            )
        await seen.run(Action.AUTHORIZE, "no-such-card", method="pm_card_nosuch")
        pi = (await adapter.execute(command(Action.AUTHORIZE, "a"))).payment_reference  # type: ignore[union-attr]
        await seen.run(Action.CAPTURE, "cap", 600, reference=pi)
        await seen.run(Action.CAPTURE, "cap-2", 100, reference=pi)
        await seen.run(Action.REFUND, "over", 601, reference=pi)
        await seen.run(Action.CAPTURE, "missing", 100, reference=None)
        first = command(Action.AUTHORIZE, "reused", 1000)
        await adapter.execute(first)
        seen.add(await adapter.execute(replace(first, amount_minor=2000)))
        seen.add(
            await adapter.execute(
                replace(command(Action.CHARGE, "isk", 150), currency="ISK", exponent=0)
            )
        )
        seen.add(await adapter.execute(replace(command(Action.CHARGE, "isk-x", 1), currency="ISK")))
        for fault in ("rate_429", "rate_503", "rate_500_after_effect", "rate_malformed"):
            await fake.configure(**{fault: 1.0})
            await seen.run(Action.AUTHORIZE, f"fault-{fault}")
            await fake.configure(**{fault: 0.0})
        await fake.configure(rate_timeout_after_effect=1.0, timeout_seconds=2.0)
        async with stripe_adapter(fake.url, read_timeout_seconds=0.2) as slow:
            seen.add(await slow.execute(command(Action.AUTHORIZE, "timeout")))
            seen.add(await slow.lookup(command(Action.AUTHORIZE, "never-sent")))
        await fake.configure(rate_timeout_after_effect=0.0)
        async with stripe_adapter(fake.url, api_key="sk_test_wrong") as wrong:
            seen.add(await wrong.execute(command(Action.AUTHORIZE, "wrong-key")))
        async with stripe_adapter("http://127.0.0.1:9") as down:
            seen.add(await down.execute(command(Action.AUTHORIZE, "down")))
    assert len(seen.pairs) >= 12, seen.pairs
    assert_catalogued("stripe", seen.pairs)


@pytest.mark.anyio
async def test_every_code_the_adyen_fake_can_emit_is_catalogued() -> None:
    async with adyen_on_fake() as (fake, adapter):
        seen = Seen(adapter)
        for method in CARDS:
            await seen.run(Action.AUTHORIZE, f"card-{method}", method=method)
        pi = (await adapter.execute(command(Action.AUTHORIZE, "a"))).payment_reference  # type: ignore[union-attr]
        for action in (Action.CAPTURE, Action.VOID, Action.REFUND):
            await seen.run(action, f"mod-{action}", 100, reference=pi)
        await seen.run(Action.CAPTURE, "unknown-psp", 100, reference="0000000000000000")
        await seen.run(Action.CAPTURE, "no-psp", 100, reference=None)
        seen.add(await adapter.lookup(command(Action.CAPTURE, "lk", reference=pi)))
        seen.add(
            await adapter.execute(
                replace(command(Action.CHARGE, "idr", 12_345), currency="IDR", exponent=2)
            )
        )
        seen.add(await adapter.execute(replace(command(Action.CHARGE, "clp", 1), currency="CLP")))
        for fault in (
            "rate_429",
            "rate_503",
            "rate_500_after_effect",
            "rate_drop_after_effect",
            "rate_malformed_after_effect",
        ):
            await fake.configure(**{fault: 1.0})
            await seen.run(Action.AUTHORIZE, f"fault-{fault}")
            await fake.configure(**{fault: 0.0})
        await fake.configure(latency_ms=300)
        async with adyen_adapter(fake.url) as other:
            import anyio

            async with anyio.create_task_group() as tg:
                tg.start_soon(seen.run, Action.AUTHORIZE, "busy")
                await anyio.sleep(0.1)
                seen.add(await other.execute(command(Action.AUTHORIZE, "busy")))
        await fake.configure(latency_ms=0)
        async with adyen_adapter(fake.url, api_key="wrong") as wrong:
            seen.add(await wrong.execute(command(Action.AUTHORIZE, "k")))
        async with adyen_adapter(fake.url, merchant_account="Other") as other_account:
            seen.add(await other_account.execute(command(Action.AUTHORIZE, "m")))
        async with adyen_adapter("http://127.0.0.1:9") as down:
            seen.add(await down.execute(command(Action.AUTHORIZE, "down")))
    codes = {code for _, code in seen.pairs}
    assert {"idempotency_in_progress", "adyen_167", "awaiting_confirmation"} <= codes, codes
    assert_catalogued("adyen", seen.pairs)


def test_the_catalogue_is_well_formed_and_its_rules_are_enforced() -> None:
    entries = catalogue()
    assert {e.klass for e in entries} == set(CLASSES)
    assert all(e.customer_message for e in entries)
    header = (
        "provider,code,unified_code,class,other_card_may_succeed,remediation,customer_message\n"
    )
    with pytest.raises(ValueError, match="class 'fatal'"):
        _parse(header + "adyen,x,x,fatal,,fix,msg\n")
    with pytest.raises(ValueError, match="appears twice"):
        _parse(header + "adyen,x,x,invalid,,fix,msg\nadyen,x,x,invalid,,fix,msg\n")
    # The same meaning has the same unified code across providers.
    stripe_funds = lookup("stripe", "insufficient_funds")
    adyen_funds = lookup("adyen", "not_enough_balance")
    assert stripe_funds and adyen_funds
    assert stripe_funds.unified_code == adyen_funds.unified_code == "insufficient_funds"
    assert lookup("adyen", "rate_limited") is not None, "shared rows apply to every provider"
    assert lookup("adyen", "generic_decline") is None, "Stripe's rows are Stripe's"


def test_docs_errors_md_is_generated_from_the_catalogue() -> None:
    text = (ROOT / "docs" / "errors.md").read_text(encoding="utf-8")
    assert text.endswith(markdown()), (
        "docs/errors.md is stale: regenerate its table with `outbox-relay errors --markdown`"
    )


def test_an_uncatalogued_code_is_counted_by_code() -> None:
    from types import SimpleNamespace

    from provider_adapters.base import Declined
    from relay.core.runtime import _count_uncatalogued

    def count(code: str) -> float:
        value = REGISTRY.get_sample_value(
            "outbox_relay_uncatalogued_codes_total", {"provider": "adyen-eu", "code": code}
        )
        return value or 0.0

    lane = SimpleNamespace(adapter=SimpleNamespace(kind="adyen"))
    intent = SimpleNamespace(provider="adyen-eu")
    before_new, before_known = count("refused_99"), count("fraud")
    _count_uncatalogued(lane, intent, Declined("refused_99", "x"))  # type: ignore[arg-type]
    _count_uncatalogued(lane, intent, Declined("fraud", "x"))  # type: ignore[arg-type]
    assert count("refused_99") == before_new + 1
    assert count("fraud") == before_known, "a catalogued code is not counted"


# -- the catalogue decides the class ------------------------------------------------------

HEADER = "provider,code,unified_code,class,other_card_may_succeed,remediation,customer_message\n"


def _with_rows(text: str) -> list[object]:
    """The shipped catalogue with ``text``'s rows added or replacing the same (provider, code)."""
    new = _parse(HEADER + text)
    replaced = {(e.provider, e.code) for e in new}
    return [e for e in catalogue() if (e.provider, e.code) not in replaced] + list(new)


def test_the_row_decides_the_class_so_a_code_is_a_data_change() -> None:
    # Shipped: Adyen's refusal 7 (invalid_amount) is our amount, not the card: dead for an
    # operator, not a failed payment, although the adapter reads a refusal.
    assert catalogued_outcome("adyen", Declined("invalid_amount", "m")) == Invalid(
        "invalid_amount", "m"
    )
    # Changing a row changes what the relay does, nothing else.
    refusal = Declined("issuer_unavailable", "Issuer Unavailable")
    assert catalogued_outcome("adyen", refusal) == refusal
    rows = lookup_in(
        _with_rows("adyen,issuer_unavailable,issuer_unavailable,retryable,no,Retried.,Try later.\n")  # type: ignore[arg-type]
    )
    assert catalogued_outcome("adyen", refusal, rows) == Retryable(
        "issuer_unavailable", "Issuer Unavailable"
    )
    # A new code: counted while it has no row (the adapter's class holds), then its row's.
    new = Invalid("adyen_999", "m")
    assert lookup("adyen", "adyen_999") is None
    assert catalogued_outcome("adyen", new) == new
    rows = lookup_in(_with_rows("adyen,adyen_999,x,declined,yes,Nothing.,Use another card.\n"))  # type: ignore[arg-type]
    assert catalogued_outcome("adyen", new, rows) == Declined("adyen_999", "m")
    # Rows are per provider kind; the shared rows apply to every kind.
    assert catalogued_outcome("stripe", Declined("invalid_amount", "m")) == Declined(
        "invalid_amount", "m"
    )
    assert catalogued_outcome("adyen", Invalid("rate_limited", "m")) == Retryable(
        "rate_limited", "m"
    )


def test_no_row_turns_may_have_happened_into_nothing_happened() -> None:
    rows = lookup_in(
        _with_rows(  # type: ignore[arg-type]
            "*,provider_timeout,x,declined,,x,x\n"
            "adyen,awaiting_confirmation,x,invalid,,x,x\n"
            "*,connection_lost,x,retryable,,x,x\n"
        )
    )
    for outcome in (
        Ambiguous("provider_timeout", "m"),
        Ambiguous("awaiting_confirmation", "m", "8815000000000001"),
        Ambiguous("connection_lost", "m"),
    ):
        assert catalogued_outcome("adyen", outcome, rows) is outcome
    # ... while a row may make any other outcome more cautious.
    cautious = lookup_in(_with_rows("stripe,card_declined,x,ambiguous,,x,x\n"))  # type: ignore[arg-type]
    assert catalogued_outcome("stripe", Declined("card_declined", "m"), cautious) == Ambiguous(
        "card_declined", "m"
    )
    assert catalogued_outcome("stripe", Succeeded("pi_1", "pi_1", 1, "EUR"), cautious) == (
        Succeeded("pi_1", "pi_1", 1, "EUR")
    )


def test_an_uncatalogued_code_keeps_the_adapters_class() -> None:
    for outcome in (
        Declined("refused_99", "m"),
        Invalid("adyen_999", "m"),
        Retryable("new_throttle", "m", 2.0),
        Ambiguous("new_5xx", "m", None),
    ):
        assert lookup("adyen", outcome.code) is None
        assert catalogued_outcome("adyen", outcome) is outcome


@pytest.mark.anyio
async def test_the_lane_gives_the_relay_the_catalogues_class() -> None:
    """Through the lane the relay runs: Adyen refuses the amount (refusal reason 7), the
    adapter reads a refusal, the relay gets the row's class; the breaker counts the
    provider's answer as healthy."""
    from relay.core.lanes import BreakerSettings, Lane
    from relay.domain.breaker import BreakerState

    async with adyen_on_fake() as (_fake, adapter):
        raw = await adapter.execute(
            command(Action.AUTHORIZE, "amount-7", method="adyen_invalid_amount")
        )
        assert raw == Declined("invalid_amount", "Invalid Amount")
        lane = Lane(
            "adyen-eu",
            adapter,
            concurrency=1,
            timeout_seconds=10,
            breaker=BreakerSettings(failure_threshold=1),
        )
        outcome = await lane.execute(
            command(Action.AUTHORIZE, "amount-7b", method="adyen_invalid_amount")
        )
        assert outcome == Invalid("invalid_amount", "Invalid Amount")
        assert lane.breaker.state is BreakerState.CLOSED  # one failure would open it


# -- every code the fakes' source can make, found by reading it ----------------------------
#
# The tests above drive the fakes; this one reads their source, so a new error answer added
# to a fake fails here even before a test drives it. Each answer goes through the real
# reading of the reply: the Stripe SDK's own error construction and the adapter's
# classification, the Adyen adapter's own error and result mapping.

FAKE_DIR = ROOT / "provider_adapters" / "fake"


def _literal(node: ast.expr | None) -> object:
    try:
        return ast.literal_eval(node) if node is not None else None
    except ValueError:
        return _NOT_LITERAL


_NOT_LITERAL = object()


def _calls(name: str, pattern: str = "*.py") -> list[tuple[str, ast.Call]]:
    found = []
    for path in sorted(FAKE_DIR.glob(pattern)):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == name
            ):
                found.append((f"{path.name}:{node.lineno}", node))
    return found


def _stripe_answers() -> list[tuple[str, int, dict[str, str]]]:
    """(where, HTTP status, error object) of every stripe_error(...) in the fake's source,
    and of every test card's decline."""
    answers = []
    for where, call in _calls("stripe_error"):
        if len(call.args) < 3:
            continue  # the definition's own recursion or a call by *args: none today
        status, type_ = _literal(call.args[0]), _literal(call.args[1])
        keywords = {k.arg: _literal(k.value) for k in call.keywords if k.arg}
        code = keywords.get("code")
        assert isinstance(status, int) and isinstance(type_, str), (
            f"{where}: stripe_error with a computed status or type; make them literals so "
            "this test can check the answer's code against the catalogue"
        )
        assert code is None or isinstance(code, str), f"{where}: a computed code"
        error = {"type": type_, "message": "m"}
        if code:
            error["code"] = code
        answers.append((where, status, error))
    for where, call in _calls("_error", "settlement.py"):  # Stripe's listing errors
        status = _literal(call.args[0])
        if isinstance(call.args[0], ast.Name):
            continue  # the helper's own body
        assert isinstance(status, int), f"{where}: a computed status"
        answers.append((where, status, {"type": "invalid_request_error", "message": "m"}))
    for card in TEST_CARDS:
        if card.declines:
            error = {"type": "card_error", "message": "m", "code": card.code or "card_declined"}
            if card.decline_code:
                error["decline_code"] = card.decline_code
            answers.append((f"cards.py {card.payment_method}", 402, error))
    return answers


def _adyen_answers() -> list[tuple[str, int, str]]:
    """(where, HTTP status, errorCode) of every _error(...) and error body in the fake."""
    answers = []
    for where, call in _calls("_error", "adyen.py"):
        status, code = _literal(call.args[0]), _literal(call.args[1])
        if isinstance(call.args[0], ast.Name):
            continue  # the helper's own body
        assert isinstance(status, int) and isinstance(code, str), f"{where}: computed answer"
        answers.append((where, status, code))
    source = (FAKE_DIR / "adyen.py").read_text(encoding="utf-8")
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Dict):
            keys = [_literal(k) for k in node.keys]
            if "errorCode" in keys and "status" in keys:
                nodes = dict(zip(keys, node.values, strict=True))
                if isinstance(nodes["status"], ast.Name):
                    continue  # _error's own body
                status, code = _literal(nodes["status"]), _literal(nodes["errorCode"])
                assert isinstance(status, int) and isinstance(code, str), node.lineno
                answers.append((f"adyen.py:{node.lineno}", status, code))
    return answers


def test_every_error_answer_in_the_fakes_source_has_a_catalogued_code() -> None:
    import json

    import stripe
    from stripe._api_requestor import _APIRequestor

    from provider_adapters.adyen import AdyenAdapter
    from provider_adapters.fake.adyen import CARDS as ADYEN_CARDS
    from provider_adapters.stripe_errors import classify_stripe_error

    missing: list[str] = []
    requestor = _APIRequestor()
    stripe_answers = _stripe_answers()
    assert len(stripe_answers) >= 15, stripe_answers
    for where, status, error in stripe_answers:
        body = {"error": error}
        for headers in ({}, {"Stripe-Should-Retry": "true"}, {"Stripe-Should-Retry": "false"}):
            try:
                requestor.handle_error_response(json.dumps(body), status, body, headers, "V1")
            except stripe.StripeError as exc:
                outcome = classify_stripe_error(exc)
            code = getattr(outcome, "code", None)
            if code is None or lookup("stripe", code) is None:
                missing.append(f"stripe {code} ({where}, HTTP {status})")

    adyen_answers = _adyen_answers()
    assert {code for _, _, code in adyen_answers} >= {"167", "138", "704", "702", "905"}
    for where, status, code in adyen_answers:
        outcome = AdyenAdapter._error(status, {"errorCode": code, "message": "m"}, None)
        if lookup("adyen", outcome.code) is None:  # type: ignore[union-attr]
            missing.append(f"adyen {outcome.code} ({where}, HTTP {status} errorCode {code})")  # type: ignore[union-attr]
    adapter = AdyenAdapter(name="adyen", api_key="k", merchant_account="m")
    for method, (result, reason, reason_code) in ADYEN_CARDS.items():
        reply = {"resultCode": result, "pspReference": "8815000000000001"}
        if reason_code:
            reply |= {"refusalReason": reason, "refusalReasonCode": reason_code}
        outcome = adapter._answer(
            command(Action.AUTHORIZE, method, method=method),
            1000,
            200,
            json.dumps(reply).encode(),
            None,
        )
        if not isinstance(outcome, Succeeded) and lookup("adyen", outcome.code) is None:
            missing.append(f"adyen {outcome.code} (card {method}: {result} {reason_code})")
    assert missing == [], (
        f"add rows to provider_adapters/error_catalogue.csv: {sorted(set(missing))}"
    )
