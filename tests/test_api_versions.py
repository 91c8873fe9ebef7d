"""Pinned provider API versions (issue 19): the Stripe adapter sends the configured
``Stripe-Version`` on every request (the fake counts and echoes what it received), Adyen's
version is in the path (tests/test_adyen_adapter.py); a version the adapter was not tested
with is refused at start, naming the variable and the tested versions, unless
ALLOW_UNTESTED_API_VERSION is set: then the relay starts and says so in its log, in the
``outbox_relay_provider_api_version`` metric and in `outbox-relay status`."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import structlog
from prometheus_client import REGISTRY

from provider_adapters import adyen, stripe
from provider_adapters.base import Action, Succeeded, UntestedApiVersion
from provider_adapters.registry import api_versions
from relay.cli.status import render_status
from relay.infra.config import ConfigError, load_settings
from relay.infra.db import Database
from relay.operations.status import collect_status
from relay.service.instances import InstanceHeartbeat
from relay.service.main import build_lane, pinned_api_version
from tests.processes import FakeProviderProcess, RelayProcess
from tests.scrape import scrape
from tests.support.cli import run_cli
from tests.support.commands import command
from tests.support.providers import stripe_adapter, stripe_on_fake
from tests.support.waiting import block_until

UNTESTED_STRIPE = "2027-01-15.future"


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    for name in list(os.environ):
        if name.startswith("RELAY_"):
            monkeypatch.delenv(name)
    yield monkeypatch


# -- the header on every request ---------------------------------------------------------


@pytest.mark.anyio
async def test_every_stripe_request_carries_the_pinned_version() -> None:
    async with stripe_on_fake() as (fake, adapter):
        assert adapter.api_version == stripe.DEFAULT_API_VERSION
        auth = await adapter.execute(command(Action.AUTHORIZE, "v-auth"))
        assert isinstance(auth, Succeeded)
        reference = auth.payment_reference
        await adapter.execute(command(Action.CAPTURE, "v-cap", 600, reference=reference))
        await adapter.execute(command(Action.REFUND, "v-ref", 100, reference=reference))
        await adapter.lookup(command(Action.AUTHORIZE, "v-auth"))  # a search (GET)
        await adapter.lookup(command(Action.REFUND, "v-ref", 100, reference=reference))
        effects = await fake.effects()
    # Every request the fake answered, POST and GET alike, named the pinned version, and
    # nothing else: not the SDK's own default, not an empty header.
    assert effects["api_versions"] == {stripe.DEFAULT_API_VERSION: effects["requests"]}
    assert effects["requests"] >= 5
    assert {r.headers.get("Stripe-Version") for r in fake.seen if r.path.startswith("/v1/")} == {
        stripe.DEFAULT_API_VERSION
    }


@pytest.mark.anyio
async def test_a_configured_version_is_the_one_sent() -> None:
    async with stripe_on_fake() as (fake, _default):
        async with stripe_adapter(
            fake.url, api_version=UNTESTED_STRIPE, allow_untested_version=True
        ) as adapter:
            assert adapter.untested_version
            assert isinstance(await adapter.execute(command(Action.CHARGE, "v-new")), Succeeded)
        effects = await fake.effects()
        (log,) = await fake.request_log()
    assert effects["api_versions"] == {UNTESTED_STRIPE: 1}
    assert log["stripe_version"] == UNTESTED_STRIPE


def test_the_default_is_tested_and_the_versions_are_spelt_as_the_provider_does() -> None:
    for kind, module in (("stripe", stripe), ("adyen", adyen)):
        versions = api_versions(kind)
        assert versions.default == module.DEFAULT_API_VERSION
        assert versions.default in versions.tested == module.TESTED_API_VERSIONS
    assert api_versions("stripe").default == "2026-10-28.endive"


def test_the_adapter_refuses_an_untested_stripe_version_naming_the_tested_ones() -> None:
    with pytest.raises(UntestedApiVersion, match=r"tested: 2026-10-28\.endive"):
        stripe.StripeAdapter(name="stripe", api_key="sk_test_x", api_version=UNTESTED_STRIPE)


# -- start-up: refused, or allowed and said ----------------------------------------------


@pytest.mark.parametrize(
    ("version", "expected"),
    [
        (UNTESTED_STRIPE, "(tested: 2026-10-28.endive); set __ALLOW_UNTESTED_API_VERSION=true"),
        ("2026-10-28", "(tested: 2026-10-28.endive)"),
        ("v71", "is not like 2026-10-28.endive"),
    ],
)
def test_an_untested_stripe_version_is_a_config_error_naming_the_variable(
    clean_env: pytest.MonkeyPatch, version: str, expected: str
) -> None:
    clean_env.setenv("RELAY_PROVIDERS__STRIPE__API_KEY", "sk_test_x")
    clean_env.setenv("RELAY_PROVIDERS__STRIPE__API_VERSION", version)
    with pytest.raises(ConfigError) as info:
        load_settings()
    (line,) = info.value.lines
    assert line.startswith("RELAY_PROVIDERS__STRIPE") and expected in line, line


def test_run_exits_2_on_an_untested_version(tmp_path: Path) -> None:
    done = run_cli(
        "run",
        env={
            "RELAY_DATABASE_URL": "postgresql://nobody@127.0.0.1:9/none",
            "RELAY_PROVIDERS__STRIPE__API_KEY": "sk_test_x",
            "RELAY_PROVIDERS__ADYEN__KIND": "adyen",
            "RELAY_PROVIDERS__ADYEN__API_KEY": "AQE_x",
            "RELAY_PROVIDERS__ADYEN__BASE_URL": "https://checkout-test.adyen.com",
            "RELAY_PROVIDERS__ADYEN__MERCHANT_ACCOUNT": "Shop",
            "RELAY_PROVIDERS__STRIPE__API_VERSION": UNTESTED_STRIPE,
            "RELAY_PROVIDERS__ADYEN__API_VERSION": "v72",
        },
    )
    assert done.returncode == 2, done.stderr
    assert "RELAY_PROVIDERS__STRIPE" in done.stderr and "tested: 2026-10-28.endive" in done.stderr
    assert "RELAY_PROVIDERS__ADYEN" in done.stderr and "tested: v71" in done.stderr


def _gauge(**labels: str) -> float | None:
    return REGISTRY.get_sample_value("outbox_relay_provider_api_version", labels)


def test_with_the_override_the_lane_starts_and_says_so(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("RELAY_PROVIDERS__CANARY__API_KEY", "sk_test_x")
    clean_env.setenv("RELAY_PROVIDERS__CANARY__API_VERSION", UNTESTED_STRIPE)
    clean_env.setenv("RELAY_PROVIDERS__CANARY__ALLOW_UNTESTED_API_VERSION", "true")
    clean_env.setenv("RELAY_PROVIDERS__STRIPE__API_KEY", "sk_test_x")
    settings = load_settings()
    with structlog.testing.capture_logs() as logs:
        canary = build_lane("canary", settings.providers["canary"])
        default = build_lane("stripe", settings.providers["stripe"])
    assert canary.adapter.api_version == UNTESTED_STRIPE  # type: ignore[attr-defined]
    (warning,) = [e for e in logs if e["event"] == "provider_api_version_untested"]
    assert warning["provider"] == "canary" and warning["api_version"] == UNTESTED_STRIPE
    assert warning["tested_versions"] == ["2026-10-28.endive"]
    assert warning["log_level"] == "warning"
    labels = {"provider": "canary", "kind": "stripe", "version": UNTESTED_STRIPE}
    assert _gauge(**labels, tested="false") == 1
    assert _gauge(**labels, tested="true") is None
    assert _gauge(provider="stripe", kind="stripe", version="2026-10-28.endive", tested="true") == 1
    assert pinned_api_version(default.adapter) == {
        "kind": "stripe",
        "version": "2026-10-28.endive",
        "tested": True,
        "tested_versions": ["2026-10-28.endive"],
    }


@pytest.mark.anyio
async def test_an_adyen_override_is_reported_as_well(clean_env: pytest.MonkeyPatch) -> None:
    values = {
        "KIND": "adyen",
        "API_KEY": "AQE_x",
        "BASE_URL": "https://checkout-test.adyen.com",
        "MERCHANT_ACCOUNT": "Shop",
        "API_VERSION": "v72",
        "ALLOW_UNTESTED_API_VERSION": "true",
    }
    for field, value in values.items():
        clean_env.setenv(f"RELAY_PROVIDERS__ADYEN__{field}", value)
    lane = build_lane("adyen", load_settings().providers["adyen"])
    assert pinned_api_version(lane.adapter) == {
        "kind": "adyen",
        "version": "v72",
        "tested": False,
        "tested_versions": ["v71"],
    }
    assert _gauge(provider="adyen", kind="adyen", version="v72", tested="false") == 1
    await lane.adapter.aclose()


# -- status ------------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.anyio
async def test_status_shows_each_relays_version_and_names_an_untested_one(db_url: str) -> None:
    db = Database(db_url, pool_size=2, name="versions")
    await db.open()
    stable = {"kind": "stripe", "version": "2026-10-28.endive", "tested": True}
    try:
        await InstanceHeartbeat(
            db,
            instance="relay-a",
            providers=["stripe"],
            api_versions={"stripe": {**stable, "tested_versions": ["2026-10-28.endive"]}},
        ).beat()
        await InstanceHeartbeat(
            db,
            instance="relay-canary",
            providers=["stripe"],
            api_versions={
                "stripe": {
                    "kind": "stripe",
                    "version": UNTESTED_STRIPE,
                    "tested": False,
                    "tested_versions": ["2026-10-28.endive"],
                }
            },
        ).beat()
        # A relay of the previous release reports no versions (sql/0045's default).
        with psycopg.connect(db_url, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO outbox.relay_instances (instance, providers, "
                "heartbeat_interval_seconds) VALUES ('relay-old', '{stripe}', 10)"
            )
    finally:
        await db.close()
    status = collect_status(db_url)
    by_name = {relay.instance: relay for relay in status.relays}
    assert by_name["relay-canary"].untested_versions() == [("stripe", UNTESTED_STRIPE)]
    assert by_name["relay-a"].untested_versions() == []
    assert by_name["relay-old"].api_versions == {}
    text = render_status(status)
    assert (
        "provider API versions: stripe 2026-10-28.endive (1 relays) and "
        f"{UNTESTED_STRIPE} (1 relays)"
    ) in text
    assert (
        f"UNTESTED API VERSION stripe {UNTESTED_STRIPE} on relay relay-canary: started with "
        "RELAY_PROVIDERS__STRIPE__ALLOW_UNTESTED_API_VERSION (tested: 2026-10-28.endive)"
    ) in text
    reported = {
        r["instance"]: r["api_versions"] for r in json.loads(json.dumps(status.to_json()))["relays"]
    }
    assert reported["relay-canary"]["stripe"]["tested"] is False  # `status --json`
    assert reported["relay-a"]["stripe"]["tested"] is True


@pytest.mark.integration
@pytest.mark.slow
def test_a_relay_process_with_the_override_runs_and_says_so(db_url: str, tmp_path: Path) -> None:
    """The whole path: a real `outbox-relay run` with an untested Stripe version and the
    override starts, sends that version, logs the warning, exports the metric label, and
    `outbox-relay status` names it."""
    fake = FakeProviderProcess(tmp_path)
    relay = RelayProcess(
        "canary-relay",
        {
            "RELAY_DATABASE_URL": db_url,
            "RELAY_PROVIDERS__STRIPE__API_KEY": "sk_test_versions",
            "RELAY_PROVIDERS__STRIPE__BASE_URL": fake.url,
            "RELAY_PROVIDERS__STRIPE__API_VERSION": UNTESTED_STRIPE,
            "RELAY_PROVIDERS__STRIPE__ALLOW_UNTESTED_API_VERSION": "true",
            "RELAY_POLL_INTERVAL_SECONDS": "0.1",
            "RELAY_POLL_MAX_INTERVAL_SECONDS": "0.3",
            "RELAY_LOG_FORMAT": "json",
        },
        tmp_path,
    )
    relay.start()
    try:
        relay.wait_ready()
        with psycopg.connect(db_url, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO outbox.payment_intents (payment_id, action, provider, amount_minor,"
                " currency, payment_method) VALUES ('v-1', 'charge', 'stripe', 500, 'EUR',"
                " 'pm_card_visa')"
            )

        def done() -> bool:
            with psycopg.connect(db_url) as conn:
                row = conn.execute(
                    "SELECT status FROM outbox.payment_intents WHERE payment_id = 'v-1'"
                ).fetchone()
            return row is not None and row[0] == "succeeded"

        block_until(done, "the charge to succeed", guard_seconds=60)
        metrics = scrape(relay.http_port)
        assert (
            metrics.value(
                "outbox_relay_provider_api_version",
                provider="stripe",
                kind="stripe",
                version=UNTESTED_STRIPE,
                tested="false",
            )
            == 1
        )
        status = run_cli("status", env={"RELAY_DATABASE_URL": db_url})
        assert status.returncode == 0, status.stderr
        assert f"UNTESTED API VERSION stripe {UNTESTED_STRIPE} on relay canary-relay" in (
            status.stdout
        )
    finally:
        relay.terminate()
        effects = fake.effects()
        fake.stop()
    log = relay.log_path.read_text()
    assert '"provider_api_version_untested"' in log
    assert effects["api_versions"] == {UNTESTED_STRIPE: effects["requests"]}
