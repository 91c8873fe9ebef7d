"""Secrets and card numbers never reach logs, metrics or stored error messages."""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import psycopg
import pytest
from hypothesis import given
from hypothesis import strategies as st
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from relay.infra.config import load_settings
from relay.infra.redaction import (
    REDACTED,
    REDACTED_CARD,
    describe_conninfo,
    luhn_valid,
    redact_processor,
    redact_text,
    redact_value,
    register_secret,
    safe_label,
)
from tests.processes import RelayProcess
from tests.scrape import Scrape, scrape
from tests.stub_provider import LeakyProvider
from tests.support.waiting import block_until

# -- pure rules ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "card",
    [
        "4111111111111111",
        "4111 1111 1111 1111",
        "4111-1111-1111-1111",
        "4222222222222",  # 13 digits
        "6011000990139424",
        "3530111333300000",
        "4000056655665556",
        "6250941006528599",  # 16
        "6759649826438453",
        "5019717010103742",
    ],
)
def test_card_numbers_are_masked_in_any_text(card: str) -> None:
    assert luhn_valid(re.sub(r"\D", "", card))
    out = redact_text(f"declined: card {card}, try again")
    assert out == f"declined: card {REDACTED_CARD}, try again"


@pytest.mark.parametrize(
    "text",
    [
        "4111111111111112",  # fails Luhn
        "411111111111",  # 12 digits
        "41111111111111111111",  # 20 digits: not a card number (the database's rule too)
        "2025-11-25T09:42:00Z",
        "intent 1234 attempt 3",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    ],
)
def test_other_numbers_are_left_alone(text: str) -> None:
    assert redact_text(text) == text


def _with_check_digit(body: str) -> str:
    for check in "0123456789":
        if luhn_valid(body + check):
            return body + check
    raise AssertionError("unreachable")


@given(
    body=st.text("0123456789", min_size=12, max_size=18),
    separator=st.sampled_from(["", " ", "-"]),
    before=st.text(st.characters(blacklist_categories=["Nd"]), max_size=20),
    after=st.text(st.characters(blacklist_categories=["Nd"]), max_size=20),
)
def test_no_card_number_survives(body: str, separator: str, before: str, after: str) -> None:
    card = _with_check_digit(body)
    spaced = separator.join(card[i : i + 4] for i in range(0, len(card), 4))
    out = redact_text(before + spaced + after)
    assert card not in re.sub(r"[ -]", "", out)


@pytest.mark.integration
def test_every_card_the_database_refuses_is_masked(conn: psycopg.Connection) -> None:
    # The log rule is the database's rule widened (other separators), never narrower.
    samples = [
        "4111111111111111",
        "4111 1111 1111 1111",
        "4111-1111-1111-1111",
        "4111111111111112",
        "411111111111",
        "41111111111111111111",
        "pm_card_visa",
        "x4222222222222y",
        "4111  1111 1111 1111",
        "4111.1111.1111.1111",
        "2025-11-25T09:42:00Z",
    ]
    for text in samples:
        row = conn.execute("SELECT outbox.looks_like_card_number(%s)", (text,)).fetchone()
        assert row is not None
        masked = REDACTED_CARD in redact_text(text)
        assert masked or not row[0], text
        assert masked == (row[0] or text in ("4111  1111 1111 1111", "4111.1111.1111.1111")), text


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("key sk_live_51HxAbCdEfGh1234567890 rejected", "51HxAbCdEfGh1234567890"),
        ("key rk_test_abcdef123456", "abcdef123456"),
        ("webhook whsec_abcdefgh12345678", "abcdefgh12345678"),
        ("postgresql://relay:s3cr3t@db:5432/app", "s3cr3t"),
        ("amqps://relay:p@ss/w0rd@rabbit:5671/", "p@ss/w0rd"),
        ("host=db password=s3cr3t user=relay", "s3cr3t"),
        ("host=db password='with space' user=relay", "with space"),
        ("Authorization: Bearer abc.def-ghi", "abc.def-ghi"),
    ],
)
def test_credentials_are_masked_in_any_text(text: str, secret: str) -> None:
    out = redact_text(text)
    assert secret not in out
    assert REDACTED in out


def test_the_processor_masks_secret_keys_at_any_depth() -> None:
    event = {
        "event": "configured",
        "api_key": "anything",
        "nested": {"password": "hunter2", "note": "card 4111 1111 1111 1111", "n": 3},
        "items": ["sk_test_abcdefgh1234", ("x", 4111111111111111)],
        "database_url": "postgresql://u@h/d",
        "Authorization": "Bearer zzz",
        "intent_id": 42,
        "lease_token": 123456,
        "idempotency_key": "outbox_abc",
        "ratio": 0.5,
        "missing_secret": None,
    }
    out = redact_processor(None, "info", dict(event))
    assert out["api_key"] == REDACTED and out["database_url"] == REDACTED
    assert out["Authorization"] == REDACTED
    assert out["nested"] == {"password": REDACTED, "note": f"card {REDACTED_CARD}", "n": 3}
    assert out["items"] == ["sk_test_" + REDACTED, ("x", REDACTED_CARD)]
    assert (out["intent_id"], out["lease_token"], out["idempotency_key"]) == (
        42,
        123456,
        "outbox_abc",
    )
    assert out["ratio"] == 0.5 and out["missing_secret"] is None


# Secrets in free text that only a name, a scheme or a URL gives away: (text, secret).
FREE_TEXT_LEAKS = [
    ("api_key=abcdef123456", "abcdef123456"),
    ('request failed: {"api_key": "abcdef123456", "amount": 100}', "abcdef123456"),
    ("body {'password': 'hunter2hunter2'} refused", "hunter2hunter2"),
    ('payload {\\"api_key\\": \\"abc def 123456\\"}', "def 123456"),
    ("password=hunter2hunter2", "hunter2hunter2"),
    ("password: hunter2hunter2", "hunter2hunter2"),
    ("RELAY_PROVIDERS__ADYEN__API_KEY=AQEyhmfxK4", "AQEyhmfxK4"),
    ("X-Api-Key: AQEyhmfxK4 sent", "AQEyhmfxK4"),
    ("Authorization: Basic dXNlcjpwYXNzd29yZA==", "dXNlcjpwYXNzd29yZA"),
    ("sent Basic dXNlcjpwYXNzd29yZA== upstream", "dXNlcjpwYXNzd29yZA"),
    ("Authorization: Bearer eyJhbGciOi.eyJzdWIi.SflKxw", "eyJhbGciOi"),
    ("Authorization: Token 9944b09199c62bcf9418ad846dd0e4bbdfc6ee4b", "9944b09199c62bcf"),
    (
        "OperationalError: connection to postgresql://relay:s3cr3t-pw@db:5432/app failed",
        "s3cr3t-pw",
    ),
]

# Cards with the separators people and systems print them with.
OTHER_SEPARATOR_CARDS = [
    "4111.1111.1111.1111",
    "4111  1111  1111  1111",
    "4111/1111/1111/1111",
    "4111_1111_1111_1111",
    "4111 - 1111 - 1111 - 1111",
    "4111\t1111\t1111\t1111",
    "4111\u00a01111\u00a01111\u00a01111",
    "3782.822463.10005",  # American Express, 4-6-5
    "3056/930902/5904",  # Diners, 4-6-4
    "4222.2222.2222.2",  # 13 digits, 4-4-4-1
]


@pytest.mark.parametrize(("text", "secret"), FREE_TEXT_LEAKS)
def test_secrets_named_in_free_text_are_masked(text: str, secret: str) -> None:
    out = redact_text(text)
    assert secret not in out
    assert REDACTED in out


@pytest.mark.parametrize("card", OTHER_SEPARATOR_CARDS)
def test_cards_with_other_separators_are_masked(card: str) -> None:
    assert luhn_valid(re.sub(r"\D", "", card))
    assert redact_text(f"card {card} declined") == f"card {REDACTED_CARD} declined"


@pytest.mark.parametrize(
    "text",
    [
        "from 10.244.1.23 to 10.244.1.24",
        "version 1.2.3 build 2025.11.25",
        "took 0.123456789 s, 4111.11 EUR",
        "HTTP Basic authentication failed",
        "lease_token=123456 idempotency_key=outbox_abc attempt=3",
        "Authorization: Bearer [redacted]",
    ],
)
def test_ordinary_text_is_left_alone(text: str) -> None:
    assert redact_text(text) == text


def test_a_registered_secret_is_masked_whatever_its_shape() -> None:
    plain = f"Plain{secrets.token_hex(8)}"  # no rule would recognise it
    odd = f"p@ss w/{secrets.token_hex(4)}\"'"
    register_secret(plain, odd, None, "short")
    assert redact_text(f"the key {plain} was refused") == f"the key {REDACTED} was refused"
    assert plain not in redact_text(f"x{plain}y")
    url = f"amqp://relay:{quote(odd, safe='')}@rabbit/"
    assert quote(odd, safe="") not in redact_text(url)
    assert odd not in redact_text(f"failed for {odd}")
    assert redact_text("short and sweet") == "short and sweet", "too short to scrub"


def test_a_secret_registered_after_a_text_was_seen_is_masked_in_it() -> None:
    # Short texts' redaction is memoised (they recur in every log line): registering a
    # secret must not leave an earlier, unmasked answer in the memo.
    later = f"Later{secrets.token_hex(6)}"
    text = f"code {later}"
    assert redact_text(text) == text, "nothing to mask yet"
    register_secret(later)
    assert redact_text(text) == f"code {REDACTED}"
    assert redact_value({"error_code": text}) == {"error_code": f"code {REDACTED}"}


def test_integers_are_masked_only_when_they_can_be_card_numbers() -> None:
    assert redact_value(4111111111111111) == REDACTED_CARD
    assert redact_value(-4111111111111111) == REDACTED_CARD
    assert redact_value(999_999_999_999) == 999_999_999_999  # 12 digits: no card
    assert redact_value(1_000_000_000_000) == 1_000_000_000_000  # 13 digits, fails Luhn


def test_settings_register_the_configured_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    api_key = f"AQE{secrets.token_hex(8)}"  # not shaped like a Stripe key
    db_password = f"Db{secrets.token_hex(6)}"
    amqp_password = f"Mq{secrets.token_hex(6)}"
    monkeypatch.setenv("RELAY_PROVIDERS__ADYEN__API_KEY", api_key)
    monkeypatch.setenv("RELAY_DATABASE_URL", f"postgresql://relay:{db_password}@db/app")
    monkeypatch.setenv("RELAY_AMQP_URL", f"amqp://relay:{amqp_password}@rabbit/")
    settings = load_settings()
    assert {api_key, db_password, amqp_password} <= set(settings.secret_values())
    line = redact_text(f"{api_key} {db_password} {amqp_password}")
    assert line == f"{REDACTED} {REDACTED} {REDACTED}"


@pytest.mark.parametrize(
    "value",
    [text for text, _ in FREE_TEXT_LEAKS] + OTHER_SEPARATOR_CARDS,
)
def test_labels_from_data_cannot_carry_a_secret(value: str) -> None:
    assert safe_label(value) == "redacted"


def test_labels_from_data_cannot_carry_a_card_number() -> None:
    assert safe_label("stripe") == "stripe"
    assert safe_label("p4111111111111111") == "redacted"


def test_a_database_url_is_described_without_its_password() -> None:
    described = describe_conninfo("postgresql://relay:s3cr3t@db:5432/app?sslmode=require")
    assert "s3cr3t" not in described and "db" in described and "app" in described
    assert describe_conninfo("host=db password=s3cr3t dbname=app") == "dbname=app host=db"
    assert describe_conninfo("not a :// url ===") == REDACTED


# -- the logging chain, in a fresh process ---------------------------------------------------------

_LOG_SCRIPT = """
import logging, sys
import structlog
from relay.infra.logs import configure_logging
configure_logging(sys.argv[1])
log = structlog.get_logger("t")
with structlog.contextvars.bound_contextvars(intent_id=7, trace_id="4bf92f3577b34da6a3ce929d0e0e4736"):
    log.info("attempt", api_key="sk_test_SECRETSECRET", error_message="card 4111 1111 1111 1111")
logging.getLogger("psycopg.pool").warning("cannot connect to postgresql://u:PW_SECRET@h/d")
try:
    raise ValueError("card 4111-1111-1111-1111")
except ValueError:
    log.exception("failed")
"""


def _run_logging(fmt: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", _LOG_SCRIPT, fmt], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", "every line goes to stdout"
    return result.stdout


def test_json_logs_are_one_redacted_event_per_line_on_stdout() -> None:
    out = _run_logging("json")
    events = [json.loads(line) for line in out.splitlines()]
    assert [e["event"] for e in events][:2] == [
        "attempt",
        "cannot connect to postgresql://u:[redacted]@h/d",
    ]
    assert events[0]["intent_id"] == 7 and events[0]["trace_id"].startswith("4bf9")
    assert events[0]["api_key"] == REDACTED
    assert events[0]["error_message"] == f"card {REDACTED_CARD}"
    assert events[1]["level"] == "warning" and events[1]["logger"] == "psycopg.pool"
    assert "ValueError" in events[2]["exception"]
    for secret in ("SECRETSECRET", "PW_SECRET", "4111"):
        assert secret not in out


def test_console_logs_are_redacted_too() -> None:
    out = _run_logging("console")
    assert "attempt" in out and REDACTED_CARD in out
    for secret in ("SECRETSECRET", "PW_SECRET", "4111"):
        assert secret not in out


_LEAK_SCRIPT = """
import json, logging, os, sys
import structlog
from relay.infra.config import load_settings
from relay.infra.logs import configure_logging
load_settings()  # registers the configured secrets, as every command does at start-up
configure_logging(sys.argv[1])
leaks = json.loads(sys.argv[2])
api_key = os.environ["RELAY_PROVIDERS__ADYEN__API_KEY"]
log = structlog.get_logger("t")
for text in leaks:
    log.info(text)
    log.info("attempt", error_message=text, nested={"detail": [text], text: 1})
    logging.getLogger("aiohttp.client").warning("upstream said %s", text)
    try:
        raise ValueError(text)
    except ValueError:
        log.exception("failed")
log.info("provider_said", body="unknown key " + api_key, **{api_key: "as a key"})
log.info("connecting", url=os.environ["RELAY_DATABASE_URL"])
"""


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_free_text_secrets_and_configured_values_never_reach_the_log(
    fmt: str, tmp_path: Path
) -> None:
    api_key = f"AQE{secrets.token_hex(8)}"
    db_password = f"Db{secrets.token_hex(6)}"
    texts = [text for text, _ in FREE_TEXT_LEAKS] + [f"card {c}" for c in OTHER_SEPARATOR_CARDS]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env |= {
        "RELAY_PROVIDERS__ADYEN__API_KEY": api_key,
        "RELAY_DATABASE_URL": f"host=db user=relay dbname=app password={db_password}",
    }
    result = subprocess.run(
        [sys.executable, "-c", _LEAK_SCRIPT, fmt, json.dumps(texts)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.count("attempt") >= len(texts) and "provider_said" in out
    for secret in [secret for _, secret in FREE_TEXT_LEAKS] + [api_key, db_password]:
        assert secret not in out, f"{secret!r} in the {fmt} log"
    # Separators as printed or as JSON escapes them (\t, \u00a0) taken out: no card left.
    squeezed = re.sub(r"\\t|\\u00a0|[\s./\\_-]", "", out)
    for card in OTHER_SEPARATOR_CARDS:
        assert re.sub(r"\D", "", card) not in squeezed, f"{card!r} in the {fmt} log"


# -- a real relay process: planted secrets never leave it ----------------------------------------


def _status(db_url: str, intent_id: int) -> str | None:
    with psycopg.connect(db_url) as conn:
        row = conn.execute(
            "SELECT status FROM outbox.payment_intents WHERE id = %s", (intent_id,)
        ).fetchone()
    return row[0] if row else None


@pytest.mark.integration
def test_planted_key_password_and_card_numbers_never_reach_logs_or_metrics(
    db_url: str, tmp_path: Path
) -> None:
    api_key = f"sk_test_PLANTED{secrets.token_hex(8)}"
    db_password = f"PlantedDbPw{secrets.token_hex(6)}"
    provider_card = "4000 0566 5566 5556"
    metadata_card = "4242-4242-4242-4242"
    leaky = LeakyProvider(provider_card)
    # The test server trusts local users: the password is ignored, but planted.
    url_with_password = make_conninfo(db_url, password=db_password)
    with psycopg.connect(db_url) as conn:
        # A card in metadata is refused at INSERT (sql/0009), naming the rule, not the card.
        with pytest.raises(psycopg.errors.CheckViolation) as refused:
            conn.execute(
                "INSERT INTO outbox.payment_intents (payment_id, action, provider, amount_minor,"
                " currency, payment_method, metadata) VALUES ('leak-0', 'charge', 'stripe', 100,"
                " 'EUR', 'pm_card_visa', %s)",
                (json.dumps({"note": f"card {metadata_card}"}),),
            )
        assert refused.value.diag.constraint_name == "payment_intents_metadata_not_card_number"
        assert metadata_card not in str(refused.value)
        conn.rollback()
        row = conn.execute(
            "INSERT INTO outbox.payment_intents (payment_id, action, provider, amount_minor,"
            " currency, payment_method, metadata) VALUES ('leak-1', 'charge', 'stripe', 100,"
            " 'EUR', 'pm_card_visa', %s) RETURNING id",
            (json.dumps({"note": "card on file", "api_key": api_key}),),
        ).fetchone()
    assert row is not None
    relay = RelayProcess(
        "leak-relay",
        {
            "RELAY_DATABASE_URL": url_with_password,
            "RELAY_PROVIDERS__STRIPE__API_KEY": api_key,
            "RELAY_PROVIDERS__STRIPE__BASE_URL": leaky.url,
            "RELAY_POLL_INTERVAL_SECONDS": "0.1",
            "RELAY_DEPTH_INTERVAL_SECONDS": "0.2",
            "RELAY_LOG_FORMAT": "json",
        },
        tmp_path,
    )
    relay.start()
    try:
        relay.wait_ready()
        block_until(lambda: _status(db_url, row[0]) == "dead")
        block_until(
            lambda: (
                scrape(relay.http_port).value("outbox_relay_dead_letters", provider="stripe") == 1
            )
        )
        metrics = scrape(relay.http_port).text
        with psycopg.connect(db_url) as conn:
            stored = conn.execute(
                "SELECT error_message FROM outbox.payment_intents WHERE id = %s", (row[0],)
            ).fetchone()
    finally:
        relay.terminate()
        relay.kill()
        leaky.stop()
    log = relay.log_path.read_text()

    # The planted values did travel: the provider got the key and echoed it with a card.
    assert leaky.requests and leaky.requests[0]["authorization"] == f"Bearer {api_key}"
    attempted = [json.loads(line) for line in log.splitlines() if '"intent_attempted"' in line]
    assert attempted and REDACTED_CARD in attempted[0]["error_message"]
    assert attempted[0]["error_message"].endswith("Bearer " + REDACTED)
    ready = next(json.loads(line) for line in log.splitlines() if '"relay_ready"' in line)
    assert conninfo_to_dict(db_url)["dbname"] in ready["database"]
    assert stored is not None and REDACTED_CARD in stored[0]

    # ... and never came out.
    digits = [re.sub(r"\D", "", provider_card), re.sub(r"\D", "", metadata_card)]
    forbidden = [
        api_key,
        api_key.removeprefix("sk_test_"),
        db_password,
        provider_card,
        metadata_card,
        *digits,
    ]
    for secret in forbidden:
        assert secret not in log, f"{secret!r} in the relay's log"
        assert secret not in metrics, f"{secret!r} in /metrics"
        assert secret not in stored[0], f"{secret!r} in the stored error message"
    labels = {v for _, sample_labels, _ in Scrape(metrics).samples for v in sample_labels.values()}
    assert "stripe" in labels
    assert all(redact_text(value) == value for value in labels), "no label carries a secret"
