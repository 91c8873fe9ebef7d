"""Least privilege (sql/0008_pre_roles.sql): connect as each group role and show what works
and what is refused.

* the exact grants of outbox_app, outbox_relay and outbox_operator, and nothing for PUBLIC;
* the application inserts intents and events and reads outcomes, and nothing else;
* every statement of relay/infra/queries.sql passes the privilege check as the role that runs it;
* the real relay, logged in as an outbox_relay member, takes a workload to the end (claims,
  write-backs, promotions, the publisher, the janitor, the depth sampler, /readyz), the
  retention sweeper archives as that role, and audit verify and ledger check pass as an
  operator;
* the relay cannot delete intents, change what the application asked for, or touch the
  audit trail and the ledger; the operator changes intents only through the SQL API.
"""

from __future__ import annotations

import json
import re
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import psycopg
import pytest
from psycopg import sql

from relay.finance.audit import verify_database
from relay.finance.ledger import check_ledger
from relay.infra.migrate import migrate, sql_dir
from relay.infra.queries import QUERIES
from tests.login_roles import GROUP_ROLES, login_role
from tests.processes import FakeProviderProcess, RelayProcess
from tests.scrape import scrape
from tests.support.databases import scratch_database
from tests.support.waiting import block_until

pytestmark = pytest.mark.integration

Denied = psycopg.errors.InsufficientPrivilege

# -- the contract -----------------------------------------------------------------------------

APP_COLUMNS = (
    "payment_id,action,provider,amount_minor,currency,payment_method,idempotency_key,metadata"
)
# sql/0027: a converted intent's original amount and rate(s), beside what it charges.
APP_FX_COLUMNS = "original_amount_minor,original_currency,fx_rate_id,fx_via_rate_id"
RATE_COLUMNS = (
    "base,quote,rate,source_kind,source_name,source_url,source_sha256,{operator}published_at,"
    "fetched_at,valid_from,valid_until"
)
EVENT_WRITER_COLUMNS = (
    "event_id,exchange,routing_key,event_type,payload,headers,ordering_key,payment_id,"
    "schema_version,traceparent"
)

# (role, relation) -> table-level privileges
TABLE_GRANTS: dict[tuple[str, str], set[str]] = {
    ("outbox_app", "currencies"): {"SELECT"},
    ("outbox_app", "fx_rates"): {"SELECT"},  # sql/0027: convert in the app's transaction
    ("outbox_app", "fx_policy"): {"SELECT"},
    ("outbox_relay", "fx_rates"): {"SELECT"},  # the periodic ECB fetch and the rate-age gauge
    ("outbox_relay", "fx_policy"): {"SELECT"},
    ("outbox_relay", "fx_postings"): {"SELECT"},  # sql/0029: the FX difference gauge
    ("outbox_app", "events"): {"SELECT"},
    ("outbox_app", "payment_intents"): {"SELECT"},
    ("outbox_app", "payment_intents_archive"): {"SELECT"},
    ("outbox_app", "payments"): {"SELECT"},
    ("outbox_app", "flows"): {"SELECT"},  # sql/0072: the application reads its flows
    ("outbox_app", "flow_steps"): {"SELECT"},
    ("outbox_relay", "currencies"): {"SELECT"},  # sql/0014: exponents for the adapters
    ("outbox_relay", "event_streams"): {"SELECT"},
    ("outbox_relay", "events"): {"SELECT"},
    ("outbox_relay", "janitor_checks"): {"SELECT", "INSERT", "UPDATE"},
    ("outbox_relay", "lease_token_seq"): {"USAGE"},
    ("outbox_relay", "payment_intents"): {"SELECT", "DELETE"},
    ("outbox_relay", "payment_intents_archive"): {"SELECT", "INSERT"},
    ("outbox_relay", "payments"): {"SELECT"},
    ("outbox_relay", "provider_policies"): {"SELECT"},
    ("outbox_relay", "providers"): {"SELECT"},  # sql/0063: `status` with the relay's login
    # sql/0067: the guard-rail task reads the guards and the rules' weights (and `status`)
    ("outbox_relay", "routing_guards"): {"SELECT"},
    ("outbox_relay", "routing_rules"): {"SELECT"},
    ("outbox_relay", "reconciliation_open_delta"): {"SELECT"},
    ("outbox_relay", "relay_instances"): {"SELECT", "INSERT", "DELETE"},  # sql/0018
    ("outbox_relay", "relay_wakeup"): {"SELECT"},
    ("outbox_relay", "relay_wakeup_wants"): {"SELECT", "INSERT", "DELETE"},  # sql/0031
    ("outbox_relay", "events_wakeup"): {"SELECT"},  # sql/0021: the publisher's NOTIFY flag
    ("outbox_relay", "schema_migrations"): {"SELECT"},
    # sql/0023: the receiver stores notifications, relays apply and retention deletes them;
    # the near-real-time comparison reads the payment's ledger
    ("outbox_relay", "webhook_inbox"): {"SELECT", "DELETE"},
    ("outbox_relay", "ledger_transactions"): {"SELECT"},
    **{
        ("outbox_operator", table): {"SELECT"}
        for table in (
            "audit_log",
            "currencies",
            "event_streams",
            "events",
            "fx_ledger_entries",  # sql/0029
            "fx_policy",
            "fx_postings",
            "fx_rates",
            "events_wakeup",
            "flows",  # sql/0072: `outbox-relay flows`, audit verify
            "flow_steps",
            "authorization_policies",  # sql/0084, set through authorization_policy_set_v1
            "installation",
            "janitor_checks",
            "ledger_entries",
            "ledger_transactions",
            "payment_intents",
            "payment_intents_archive",
            "payments",
            "provider_policies",
            "provider_unit_rules",  # sql/0050
            "providers",  # sql/0050: the registry, changed through provider_set_v1
            "reconciliation_open_delta",
            "routing_rules",  # sql/0051
            "routing_guards",  # sql/0067
            "registry_policy",  # sql/0052
            "registry_requests",
            "relay_instances",
            "relay_wakeup",
            "relay_wakeup_wants",
            "schema_migrations",
            "webhook_inbox",
        )
    },
    **{
        ("outbox_operator", table): {"SELECT", "INSERT", "UPDATE"}
        for table in (
            "reconciliation_actions",
            "reconciliation_exceptions",
            "reconciliation_runs",
        )
    },
}

# (role, relation, privilege) -> columns
COLUMN_GRANTS: dict[tuple[str, str, str], str] = {
    ("outbox_app", "payment_intents", "INSERT"): f"{APP_COLUMNS},{APP_FX_COLUMNS}",
    ("outbox_relay", "fx_rates", "INSERT"): RATE_COLUMNS.format(operator=""),
    ("outbox_operator", "fx_rates", "INSERT"): RATE_COLUMNS.format(operator="operator,"),
    # sql/0029: reconciliation posts a settlement's FX difference
    ("outbox_operator", "fx_postings", "INSERT"): (
        "kind,payment_id,intent_id,provider,provider_reference,source_currency,"
        "source_amount_minor,currency,expected_minor,actual_minor,our_rate_id,our_via_rate_id,"
        "compared_rate_id,compared_via_rate_id,provider_rate"
    ),
    ("outbox_app", "events", "INSERT"): EVENT_WRITER_COLUMNS,
    ("outbox_operator", "payment_intents", "INSERT"): APP_COLUMNS,
    ("outbox_relay", "events", "INSERT"): EVENT_WRITER_COLUMNS,
    ("outbox_relay", "events", "UPDATE"): (
        "status,attempts,available_at,lease_token,claimed_by,error_code,error_message,published_at"
    ),
    ("outbox_relay", "event_streams", "UPDATE"): "done_seq",
    # unsent_attempts (sql/0064): the write-back counts an attempt that could not connect.
    # Provider and key change only through outbox.fail_over_intent_v1 (SECURITY DEFINER).
    ("outbox_relay", "payment_intents", "UPDATE"): (
        "status,attempts,available_at,lease_token,lease_expires_at,claimed_by,"
        "amount_applied_minor,provider_reference,error_code,error_message,updated_at,completed_at,"
        "unsent_attempts"
    ),
    ("outbox_relay", "payments", "UPDATE"): (
        "state,authorized_minor,captured_minor,refunded_minor,provider_reference,updated_at,"
        "disputed_minor,dispute_status,dispute_reference,awaiting_action,awaiting_minor"
    ),
    ("outbox_relay", "relay_wakeup", "UPDATE"): "wanted,updated_at",
    ("outbox_relay", "webhook_inbox", "INSERT"): (
        "provider,event_id,event_type,event_created_at,payload,payment_id"
    ),
    ("outbox_relay", "webhook_inbox", "UPDATE"): (
        "status,available_at,attempts,lease_token,claimed_by,payment_id,applied_at,result,"
        "last_error"
    ),
    ("outbox_relay", "events_wakeup", "UPDATE"): "wanted,updated_at",
    (
        "outbox_relay",
        "relay_instances",
        "UPDATE",
    ): "providers,heartbeat_interval_seconds,heartbeat_at,api_versions",  # sql/0045
}

# function -> the group roles that may EXECUTE it
FUNCTION_GRANTS: dict[str, set[str]] = {
    "retry_dead_intents": {"outbox_operator"},
    "cancel_dead_intents": {"outbox_operator"},
    "intent_history": {"outbox_operator"},
    "audit_intent_doc": {"outbox_operator"},
    "audit_payment_doc": {"outbox_operator"},
    "audit_redact_text": {"outbox_operator"},
    "audit_actor": {"outbox_operator"},
    "audit_generic_doc": {"outbox_operator"},  # sql/0014: audit verify's colder tables
    "audit_redact": {"outbox_operator"},
    # sql/0016: the write-back's and the sweep's promotion (cancel_dead_intents calls it as
    # the owner, so the operator needs no EXECUTE)
    "promote_next_blocked_v1": {"outbox_relay"},
    # sql/0023: a change a notification reported, posted and raised as the owner
    "post_notified_change_v1": {"outbox_relay"},
    "post_notified_change_v2": {"outbox_relay"},
    "open_notified_exception_v1": {"outbox_relay"},
    # sql/0038: confirmations: a withdrawn capture's reversal, an expiry's void, the
    # confirmation deadline's exception and its resolution by a late confirmation
    "post_notified_change_v3": {"outbox_relay"},
    "post_reversal_v1": {"outbox_relay"},
    "open_overdue_confirmation_v1": {"outbox_relay"},
    "resolve_overdue_confirmation_v1": {"outbox_relay"},
    # sql/0027: conversion, for applications in their transaction, the relay and `fx convert`
    "convert_v1": {"outbox_app", "outbox_relay", "outbox_operator"},
    "convert_at_rates_v1": {"outbox_app", "outbox_relay", "outbox_operator"},
    "audit_fx_rate_doc": {"outbox_operator"},  # audit verify compares each rate row
    # sql/0050, sql/0051: the registry and routing rules, changed as the owner, audited
    "provider_set_v1": {"outbox_operator"},
    "provider_set_v2": {"outbox_operator"},  # sql/0070: with the pinned API version
    "routing_rule_set_v1": {"outbox_operator"},
    "routing_bucket": {"outbox_operator"},  # `intents show` prints the payment's bucket
    # sql/0052: four eyes on registry changes
    "registry_policy_set_v1": {"outbox_operator"},
    "registry_request_v1": {"outbox_operator"},
    "registry_approve_v1": {"outbox_operator"},
    # sql/0067: guard rails, set by operators, a canary rolled back by a relay
    "routing_guard_set_v1": {"outbox_operator"},
    "routing_guard_rollback_v1": {"outbox_relay"},
    # sql/0072: a flow started in the application's transaction (advanced as the owner)
    "flow_start_v1": {"outbox_app"},
    "flow_audit_doc": {"outbox_operator"},  # audit verify compares each flow
    # sql/0083-0085: the relay's flow sweeper enforces deadlines and the policy for
    # uncovered authorisations; operators set the policy and act on flows (as the owner)
    "flow_sweep_v1": {"outbox_relay"},
    "authorization_sweep_v1": {"outbox_relay"},
    "authorization_sweep_v2": {"outbox_relay"},  # sql/0089: the sweep and the gauge's counts
    "uncovered_authorizations_v1": {"outbox_relay", "outbox_operator"},
    "uncovered_authorizations_v2": {"outbox_relay", "outbox_operator"},
    "authorization_policy_set_v1": {"outbox_operator"},
    "flow_cancel_v1": {"outbox_operator"},
    "flow_retry_step_v1": {"outbox_operator"},
    "flow_mark_compensated_v1": {"outbox_operator"},
    # sql/0064: failover for new payments, moved by the relay as the owner, audited
    "fail_over_intent_v1": {"outbox_relay"},
    "fail_over_pending_v1": {"outbox_relay"},
}

# The only functions PUBLIC may call (besides trigger functions, which cannot be called):
# pure helpers that triggers running as the writing role call, whoever that role is.
PUBLIC_HELPERS = {
    "is_valid_traceparent",  # sql/0006, the traceparent check on INSERT
    "looks_like_card_number",  # sql/0001
    "idempotency_key_lifetime",  # sql/0005, the key-lifetime guard on UPDATE
    "contains_card_number",  # sql/0009, the hostile-input checks on INSERT
    "is_card_number",  # the card shape those checks look for
    "may_hold_card_number",  # sql/0017, their pre-filter
    "card_scan_text",  # sql/0017, the text they scan
    "refuse_null",  # sql/0017, a NOT NULL refusal that shows no row
    "jsonb_deeper_than",
    "refuse_input",
    "refuse_card_number",
    "actor_entitled",  # sql/0012, whose outbox.actor names are kept
    "jsonb_redact_card_numbers",  # sql/0023, the inbox's insert trigger
    "card_invisible_characters",  # sql/0019, the card rule's character classes, one place
    "card_separator_characters",
    "card_gap",
    "new_event_id",  # sql/0019, events.event_id's default, evaluated as the inserting role
}

# Statements of relay/infra/queries.sql by the role that runs them. A new statement must be added
# to one of these (and granted in a migration), or this file fails.
RELAY_STATEMENTS = {
    "claim_intents",  # relay/core/store.py
    "set_actor",
    "lock_payments",
    "complete_intents",
    "requeue_expired_leases",
    "lock_orphaned_blocked_payments",  # relay/core/runtime.py: the reaper's sweep
    "promote_orphaned_blocked",
    "release_leases",
    "fail_over_claimed",  # sql/0064: relay/core/runtime.py, failover for new payments
    "fail_over_pending",
    "archive_terminal_intents",  # relay/service/retention.py through the store
    "want_wakeups",
    "lock_wakeup_flag",  # sql/0031: skip_wakeups' first statement
    "skip_wakeups",
    "schema_version",  # relay/service/main.py: /readyz
    "claim_events",  # relay/events/store.py: the publisher
    "lock_event_streams",
    "mark_events",
    "release_events",
    "want_event_wakeups",  # sql/0021
    "skip_event_wakeups",
    "unpublished_events",  # relay/service/depth.py
    "queue_depth",
    "reconciliation_open",
    "relay_heartbeat",  # sql/0018: relay/service/instances.py reports what this relay serves
    "relay_withdraw",
    "relay_instances",
    "provider_key_lifetimes",  # relay/service/main.py: the start-up check of key lifetimes
    "registered_api_versions",  # and of the registry's pinned API versions (sql/0070)
    "janitor_reserve",  # relay/core/janitor.py
    "janitor_take",
    "janitor_record",
    "inbox_insert",  # relay/service/webhooks.py: the receiver
    "inbox_claim",  # relay/core/inbox/: relays apply the inbox
    "inbox_take",
    "inbox_finish",
    "inbox_retry",
    "inbox_intent_payment",
    "inbox_intent_by_key",
    "inbox_take_intent",
    "inbox_payment_by_reference",
    "inbox_record_refund",
    "inbox_record_dispute",
    "inbox_record_capture",
    "inbox_unresolved_captures",
    "inbox_post_ledger",
    "inbox_open_exception",
    "inbox_event",
    "inbox_ledger_totals",
    # sql/0038: confirmations of asynchronous outcomes and their deadline
    "inbox_payment_by_id",
    "inbox_intent_by_reference",
    "inbox_intent_unsettled_of_action",
    "inbox_reversed",
    "inbox_post_reversal",
    "inbox_record_reversal",
    "inbox_record_authorisation_ended",
    "inbox_resolve_overdue",
    "awaiting_overdue",
    "awaiting_depth",  # relay/service/depth.py
    "open_overdue_confirmation",
    "inbox_retention",  # relay/service/retention.py
    "inbox_waiting",  # relay/service/depth.py
    "fx_insert_rates_as_relay",  # relay/service/fx_fetch.py: the opt-in ECB fetch
    "fx_rate_ages",  # relay/service/depth.py: the rate-age gauge
    "fx_difference_totals",  # and the FX difference gauge
    "guard_rails_list",  # sql/0067: relay/service/guard_rails.py
    "guard_rail_window",
    "guard_rail_rollback",
    "flow_sweep",  # sql/0083, sql/0084, sql/0089: relay/service/flow_sweep.py
}
OPERATOR_STATEMENTS = {
    # sql/0084: `outbox-relay flows policies|policy`
    "authorization_policies_list",
    "authorization_policy_set",
    # sql/0072: `outbox-relay flows list|show`
    "flows_list",
    # sql/0085: `outbox-relay flows cancel|retry-step|mark-compensated`
    "flow_cancel",
    "flow_retry_step",
    "flow_mark_compensated",
    "flow_detail",
    "flow_steps_detail",
    "flow_history",
    # sql/0050, sql/0051: relay/operations/providers.py, status.py, intents.py
    "providers_list",
    "provider_set",
    "routing_rules_list",
    "routing_rule_set",
    "registry_changes",
    "registered_enabled_providers",
    "registered_api_versions",  # sql/0070: `status` names a relay whose version differs
    "payment_routing",
    "registry_policy_set",  # sql/0052
    "registry_request",
    "registry_approve",
    "registry_requests",
    "guard_rails_list",  # sql/0067: `routes guards`, `status`
    "routing_guard_set",
    "status_counts",  # relay/operations/status.py
    "schema_version",
    "queue_depth",
    "unpublished_events",
    "relay_instances",  # sql/0018: which providers no running relay serves
    "set_actor",
    "set_operator_actor",  # relay/operations/dead_letters.py, relay/operations/intents.py
    "dead_letters_count",
    "dead_letters_list",
    "dead_letters_page",
    "dead_letters_by_id",
    "retry_dead_intents",
    "cancel_dead_intents",
    "intent_detail",
    "intent_payment",
    "payment_intents_in_order",
    "audit_trail_present",
    "intent_history",
    "audit_rows_by_chain",  # relay/finance/audit.py
    "audit_live_documents",
    "ledger_counts",  # relay/finance/ledger.py
    "ledger_unbalanced",
    "ledger_orphan_entries",  # sql/0022
    "ledger_posting_mismatches",
    "ledger_payment_mismatches",
    "ledger_account_balances",
    "ledger_payment_totals",
    "ledger_authorized_totals",
    "reconcile_start_run",  # relay/finance/reconcile.py
    "currency_exponents",
    "reconcile_internal_items",
    "reconcile_record_exception",
    "reconcile_clear_exceptions",
    "reconcile_finish_run",
    "exceptions_list",  # relay/finance/exceptions.py
    "exception_for_update",
    "exception_accept",
    "action_request",
    "action_for_update",
    "action_insert_intent",
    "action_dead_intents",
    "action_redrive",
    "action_executed",
    "exception_resolve",
    "webhooks_summary",  # relay/operations/webhooks.py
    "webhooks_list",
    "webhook_show",
    "webhooks_for_payment",  # relay/operations/intents.py
    "fx_insert_rates",  # relay/finance/fx.py: `fx import`
    "fx_current_rates",
    "fx_rate_history",
    "fx_convert",
    "fx_currency_exponent",
    "fx_postings_list",  # `fx differences`
    "ledger_fx_problems",  # `ledger check`
    "reconcile_convert",  # sql/0029: a settlement in another currency
    "reconcile_post_settlement",
}
# Operator statements the relay role must not be able to run at all.
RELAY_REFUSED = {
    "retry_dead_intents",
    "cancel_dead_intents",
    "intent_history",
    "audit_rows_by_chain",
    "ledger_counts",
    "ledger_account_balances",
    "reconcile_start_run",
    "exception_accept",
    "action_insert_intent",
}

# The statements the application role passes: reads of intents, payments, events and
# currencies, statements that touch no table, and action_insert_intent (an INSERT of the
# application's columns). Everything else (every write, the audit trail, the ledger, the
# janitor's and reconciliation's tables) is refused.
APP_MAY_RUN = {
    "action_dead_intents",
    # sql/0023's inbox statements that touch only what applications read or write anyway:
    # an intent by its key with its payment, and a result event (the writer's columns)
    "inbox_event",
    "inbox_intent_by_key",
    "inbox_intent_payment",
    "inbox_unresolved_captures",  # capture intents of a payment, which applications read
    # sql/0038: intents and payments only, which applications read
    "awaiting_overdue",
    "awaiting_depth",
    "inbox_intent_by_reference",
    "inbox_intent_unsettled_of_action",
    "currency_exponents",  # the currency table, which applications read too
    "action_insert_intent",
    "audit_trail_present",
    "dead_letters_by_id",
    "dead_letters_count",
    "dead_letters_list",
    "dead_letters_page",
    "flow_detail",  # sql/0072: applications read their flows and steps
    "flow_steps_detail",
    "flows_list",
    "fx_convert",  # sql/0027: applications read rates and convert
    "fx_currency_exponent",
    "fx_current_rates",
    "fx_rate_ages",
    "fx_rate_history",
    "intent_detail",
    "reconcile_convert",  # outbox.convert_v1 only, which applications call
    "intent_payment",
    "ledger_payment_totals",  # sums over outbox.payments only
    "payment_intents_in_order",
    "provider_key_lifetimes",  # outbox.provider_policies, which applications read (sql/0008)
    "queue_depth",
    "set_actor",
    "set_operator_actor",
    "status_counts",
    "unpublished_events",
}

APPEND_ONLY = ("audit_log", "ledger_transactions", "ledger_entries")


@pytest.fixture
def app_url(db_url: str) -> Iterator[str]:
    with login_role(db_url, "outbox_app", prefix="app") as url:
        yield url


@pytest.fixture
def relay_url(db_url: str) -> Iterator[str]:
    with login_role(db_url, "outbox_relay", prefix="relay") as url:
        yield url


@pytest.fixture
def operator_url(db_url: str) -> Iterator[str]:
    with login_role(db_url, "outbox_operator", prefix="operator") as url:
        yield url


def _insert_intent(conn: psycopg.Connection, payment_id: str, **values: Any) -> int:
    row = {
        "action": "charge",
        "provider": "stripe",
        "amount_minor": 1000,
        "currency": "EUR",
        "payment_method": "pm_card_visa",
        **values,
    }
    columns = sql.SQL(", ").join(sql.Identifier(c) for c in ("payment_id", *row))
    placeholders = sql.SQL(", ").join(sql.Placeholder() for _ in range(len(row) + 1))
    found = conn.execute(
        sql.SQL("INSERT INTO outbox.payment_intents ({}) VALUES ({}) RETURNING id").format(
            columns, placeholders
        ),
        (payment_id, *row.values()),
    ).fetchone()
    assert found is not None
    return int(found[0])


def _refused(conn: psycopg.Connection, statement: str, table: str) -> None:
    """The statement fails with insufficient_privilege naming ``table``; nothing changed."""
    with pytest.raises(Denied, match=rf"permission denied for (table|sequence|view) {table}\b"):
        conn.execute(statement)  # type: ignore[arg-type]


def _function_refused(conn: psycopg.Connection, statement: str, function: str) -> None:
    with pytest.raises(Denied, match=rf"permission denied for function {function}\b"):
        conn.execute(statement)  # type: ignore[arg-type]


# -- the roles and their grants ---------------------------------------------------------------


def test_group_roles_exist_cannot_log_in_and_migrate_reruns(db_url: str, pg_admin_url: str) -> None:
    with psycopg.connect(db_url) as conn:
        rows = conn.execute(
            "SELECT rolname, rolcanlogin, rolsuper, rolcreaterole, rolcreatedb, rolbypassrls"
            " FROM pg_roles WHERE rolname = ANY(%s) ORDER BY rolname",
            (list(GROUP_ROLES),),
        ).fetchall()
    assert rows == [(name, False, False, False, False, False) for name in sorted(GROUP_ROLES)]

    # Re-running is a no-op, and a database migrated while the roles already exist (they
    # do: the template database created them) gets every grant.
    assert migrate(db_url) == []
    with scratch_database(pg_admin_url, "outbox_relay_roles", hex_digits=10) as fresh:
        assert "0008_pre_roles" in migrate(fresh)
        assert _grants(fresh) == _grants(db_url)
        assert migrate(fresh) == []


def test_relay_role_starts_with_migrate_on_an_up_to_date_schema(
    db_url: str, relay_url: str
) -> None:
    """`run --migrate` as the relay role: nothing to apply, so nothing it may not do."""
    assert migrate(relay_url) == []
    with psycopg.connect(db_url) as conn:
        conn.execute("DELETE FROM outbox.schema_migrations WHERE version = '0010'")
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        migrate(relay_url)  # a pending migration needs the owner


def test_role_creation_survives_concurrent_migrations_of_other_databases(db_url: str) -> None:
    """The role-creating block of 0008, run at once from several sessions (as several
    databases of one cluster migrate together), creates each role once and fails none."""
    text = (sql_dir() / "0008_pre_roles.sql").read_text()
    block = re.search(r"^DO \$\$.*?^\$\$;", text, re.S | re.M)
    assert block is not None and "CREATE ROLE" in block.group(0)
    names = [f"race_{uuid.uuid4().hex[:8]}_{i}" for i in range(3)]
    statement = block.group(0).replace(
        "ARRAY['outbox_app', 'outbox_relay', 'outbox_operator']",
        "ARRAY[" + ", ".join(f"'{n}'" for n in names) + "]",
    )
    assert all(n in statement for n in names)
    barrier = threading.Barrier(4)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            with psycopg.connect(db_url) as conn:  # one transaction, held open a moment
                barrier.wait()
                conn.execute(statement)  # type: ignore[arg-type]
                conn.execute("SELECT pg_sleep(0.2)")
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        with psycopg.connect(db_url) as conn:
            created = conn.execute(
                "SELECT rolname, rolcanlogin FROM pg_roles WHERE rolname = ANY(%s) ORDER BY 1",
                (names,),
            ).fetchall()
        assert created == [(n, False) for n in sorted(names)]
    finally:
        with psycopg.connect(db_url, autocommit=True) as conn:
            for n in names:
                conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(n)))


def _grants(db_url: str) -> dict[str, Any]:
    with psycopg.connect(db_url) as conn:
        tables = conn.execute(
            """
            SELECT r.rolname, c.relname, a.privilege_type
            FROM pg_class AS c
            JOIN pg_namespace AS n ON n.oid = c.relnamespace
            CROSS JOIN LATERAL aclexplode(c.relacl) AS a
            JOIN pg_roles AS r ON r.oid = a.grantee
            WHERE n.nspname = 'outbox' AND r.rolname = ANY(%s)
            """,
            (list(GROUP_ROLES),),
        ).fetchall()
        columns = conn.execute(
            """
            SELECT r.rolname, c.relname, a.privilege_type,
                   string_agg(att.attname, ',' ORDER BY att.attnum)
            FROM pg_attribute AS att
            JOIN pg_class AS c ON c.oid = att.attrelid
            JOIN pg_namespace AS n ON n.oid = c.relnamespace
            CROSS JOIN LATERAL aclexplode(att.attacl) AS a
            JOIN pg_roles AS r ON r.oid = a.grantee
            WHERE n.nspname = 'outbox' AND r.rolname = ANY(%s)
            GROUP BY 1, 2, 3
            """,
            (list(GROUP_ROLES),),
        ).fetchall()
        functions = conn.execute(
            """
            SELECT p.proname, CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE r.rolname END
            FROM pg_proc AS p
            JOIN pg_namespace AS n ON n.oid = p.pronamespace
            CROSS JOIN LATERAL aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) AS a
            LEFT JOIN pg_roles AS r ON r.oid = a.grantee
            WHERE n.nspname = 'outbox' AND a.privilege_type = 'EXECUTE'
              AND a.grantee <> p.proowner AND p.prorettype <> 'trigger'::regtype
            """
        ).fetchall()
        schema = conn.execute(
            """
            SELECT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE r.rolname END, a.privilege_type
            FROM pg_namespace AS n
            CROSS JOIN LATERAL aclexplode(coalesce(n.nspacl, acldefault('n', n.nspowner))) AS a
            LEFT JOIN pg_roles AS r ON r.oid = a.grantee
            WHERE n.nspname = 'outbox' AND a.grantee <> n.nspowner
            """
        ).fetchall()
    table_grants: dict[tuple[str, str], set[str]] = {}
    for role, table, privilege in tables:
        table_grants.setdefault((role, table), set()).add(privilege)
    function_grants: dict[str, set[str]] = {}
    for function, grantee in functions:
        if grantee != "PUBLIC":
            function_grants.setdefault(function, set()).add(grantee)
    return {
        "tables": table_grants,
        "columns": {(role, table, priv): cols for role, table, priv, cols in columns},
        "functions": function_grants,
        "public_functions": {function for function, grantee in functions if grantee == "PUBLIC"},
        "schema": sorted(schema),
    }


def test_each_role_holds_exactly_its_grants_and_public_nothing(db_url: str) -> None:
    grants = _grants(db_url)
    assert grants["tables"] == TABLE_GRANTS
    assert grants["columns"] == COLUMN_GRANTS
    assert grants["functions"] == FUNCTION_GRANTS
    public = grants["public_functions"]
    assert public <= PUBLIC_HELPERS, "a function callable by any role that can log in"
    assert {"is_valid_traceparent", "looks_like_card_number", "idempotency_key_lifetime"} <= public
    assert grants["schema"] == sorted((role, "USAGE") for role in GROUP_ROLES)


def test_audit_trail_and_ledger_are_append_only_for_every_role(db_url: str) -> None:
    with psycopg.connect(db_url) as conn:
        held = conn.execute(
            """
            SELECT c.relname, coalesce(r.rolname, 'PUBLIC'), a.privilege_type
            FROM pg_class AS c
            JOIN pg_namespace AS n ON n.oid = c.relnamespace
            CROSS JOIN LATERAL aclexplode(coalesce(c.relacl, acldefault('r', c.relowner))) AS a
            LEFT JOIN pg_roles AS r ON r.oid = a.grantee
            WHERE n.nspname = 'outbox' AND c.relname = ANY(%s)
              AND a.privilege_type IN ('UPDATE', 'DELETE', 'TRUNCATE')
            UNION ALL
            SELECT c.relname, r.rolname, a.privilege_type
            FROM pg_attribute AS att
            JOIN pg_class AS c ON c.oid = att.attrelid
            JOIN pg_namespace AS n ON n.oid = c.relnamespace
            CROSS JOIN LATERAL aclexplode(att.attacl) AS a
            JOIN pg_roles AS r ON r.oid = a.grantee
            WHERE n.nspname = 'outbox' AND c.relname = ANY(%s) AND a.privilege_type = 'UPDATE'
            """,
            (list(APPEND_ONLY), list(APPEND_ONLY)),
        ).fetchall()
        # The writers of the trail run as the owner (SECURITY DEFINER, pinned search_path).
        definers = conn.execute(
            """
            SELECT p.proname, p.prosecdef, p.proconfig
            FROM pg_proc AS p JOIN pg_namespace AS n ON n.oid = p.pronamespace
            WHERE n.nspname = 'outbox' AND p.proname = ANY(%s) ORDER BY 1
            """,
            (
                [
                    "payment_intents_before_insert",
                    "events_before_insert",
                    "retry_dead_intents",
                    "cancel_dead_intents",
                ],
            ),
        ).fetchall()
    assert held == [], "nobody, the owner included, may UPDATE, DELETE or TRUNCATE these"
    assert len(definers) == 4
    for name, security_definer, config in definers:
        assert security_definer, name
        assert "search_path=pg_catalog, pg_temp" in config, name


def test_every_relay_statement_is_assigned_to_the_role_that_runs_it() -> None:
    assert set(QUERIES) == RELAY_STATEMENTS | OPERATOR_STATEMENTS, (
        "a statement of relay/infra/queries.sql is run by which role? add it to RELAY_STATEMENTS or "
        "OPERATOR_STATEMENTS here and grant what it needs in a migration"
    )
    assert RELAY_REFUSED <= OPERATOR_STATEMENTS - RELAY_STATEMENTS


def _check_privileges(conn: psycopg.Connection, name: str) -> None:
    """Plan ``name`` as the connected role: EXPLAIN checks every table, column and function
    privilege the statement needs, without running it."""
    numbered: dict[str, int] = {}

    def place(match: re.Match[str]) -> str:
        return f"${numbered.setdefault(match.group(1), len(numbered) + 1)}"

    text = re.sub(r"%\((\w+)\)s", place, QUERIES[name])
    conn.execute(f"PREPARE q_{name} AS {text}")  # type: ignore[arg-type]
    try:
        nulls = ", ".join("NULL" for _ in numbered)
        conn.execute(f"EXPLAIN EXECUTE q_{name}" + (f"({nulls})" if nulls else ""))  # type: ignore[arg-type]
    finally:
        conn.execute(f"DEALLOCATE q_{name}")  # type: ignore[arg-type]


def test_each_role_may_run_its_statements_and_not_the_others(
    app_url: str, relay_url: str, operator_url: str
) -> None:
    with psycopg.connect(relay_url, autocommit=True) as relay:
        for name in sorted(RELAY_STATEMENTS):
            _check_privileges(relay, name)
        for name in sorted(RELAY_REFUSED):
            with pytest.raises(Denied, match="permission denied"):
                _check_privileges(relay, name)
    with psycopg.connect(operator_url, autocommit=True) as operator:
        for name in sorted(OPERATOR_STATEMENTS):
            _check_privileges(operator, name)
    allowed = set()
    with psycopg.connect(app_url, autocommit=True) as app:
        for name in sorted(RELAY_STATEMENTS | OPERATOR_STATEMENTS):
            try:
                _check_privileges(app, name)
            except Denied:
                continue
            allowed.add(name)
    assert sorted(allowed) == sorted(APP_MAY_RUN)


# -- the application --------------------------------------------------------------------------


def test_application_inserts_intents_and_events_and_reads_outcomes_only(
    db_url: str, app_url: str
) -> None:
    with psycopg.connect(app_url, autocommit=True) as app:
        role = app.info.user
        intent_id = _insert_intent(app, "lp-app-1", metadata=json.dumps({"order": 1}))
        _insert_intent(
            app,
            "lp-app-1",
            action="refund",
            amount_minor=100,
            payment_method=None,
            metadata=json.dumps(
                {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}
            ),
        )
        event = app.execute(
            "INSERT INTO outbox.events (routing_key, payload, ordering_key)"
            " VALUES ('app.order.created', '{\"order\": 1}', 'order:1') RETURNING id, status, seq"
        ).fetchone()
        assert event is not None and event[1:] == ("pending", 1)
        # Reading outcomes: the intent, its payment, the events, the archive, currencies.
        assert app.execute(
            "SELECT status, payment_seq FROM outbox.payment_intents WHERE id = %s", (intent_id,)
        ).fetchone() == ("pending", 1)
        assert app.execute(
            "SELECT state, next_seq FROM outbox.payments WHERE payment_id = 'lp-app-1'"
        ).fetchone() == ("new", 2)
        assert app.execute("SELECT count(*) FROM outbox.events").fetchone() == (1,)
        assert app.execute("SELECT count(*) FROM outbox.payment_intents_archive").fetchone() == (0,)
        assert app.execute(
            "SELECT exponent FROM outbox.currencies WHERE code = 'JPY'"
        ).fetchone() == (0,)

        # The relay's columns are not the application's to write, even on INSERT.
        _refused(
            app,
            "INSERT INTO outbox.payment_intents (payment_id, action, provider, amount_minor,"
            " currency, payment_method, status) VALUES ('lp-app-2', 'charge', 'stripe', 1,"
            " 'EUR', 'pm_card_visa', 'succeeded')",
            "payment_intents",
        )
        _refused(
            app,
            "INSERT INTO outbox.events (routing_key, payload, status)"
            " VALUES ('x', '{}', 'published')",
            "events",
        )
        for statement, table in [
            ("UPDATE outbox.payment_intents SET amount_minor = 1", "payment_intents"),
            ("UPDATE outbox.payment_intents SET status = 'succeeded'", "payment_intents"),
            ("DELETE FROM outbox.payment_intents", "payment_intents"),
            ("TRUNCATE outbox.payment_intents", "payment_intents"),
            ("UPDATE outbox.payments SET captured_minor = 1", "payments"),
            ("DELETE FROM outbox.payments", "payments"),
            (
                "INSERT INTO outbox.payments (payment_id, provider, currency)"
                " VALUES ('p', 'stripe', 'EUR')",
                "payments",
            ),
            ("UPDATE outbox.events SET status = 'published'", "events"),
            ("DELETE FROM outbox.events", "events"),
            ("UPDATE outbox.event_streams SET done_seq = 9", "event_streams"),
            ("DELETE FROM outbox.payment_intents_archive", "payment_intents_archive"),
            (
                "INSERT INTO outbox.payment_intents_archive SELECT * FROM outbox.payment_intents",
                "payment_intents_archive",
            ),
            ("SELECT * FROM outbox.audit_log", "audit_log"),
            ("UPDATE outbox.audit_log SET actor = 'x'", "audit_log"),
            ("DELETE FROM outbox.audit_log", "audit_log"),
            ("TRUNCATE outbox.audit_log", "audit_log"),
            ("SELECT * FROM outbox.ledger_entries", "ledger_entries"),
            ("DELETE FROM outbox.ledger_transactions", "ledger_transactions"),
            ("UPDATE outbox.relay_wakeup SET wanted = false", "relay_wakeup"),
            ("UPDATE outbox.events_wakeup SET wanted = false", "events_wakeup"),
            (
                "UPDATE outbox.provider_policies SET idempotency_key_lifetime = '1 year'",
                "provider_policies",
            ),
            ("SELECT * FROM outbox.janitor_checks", "janitor_checks"),
            ("SELECT nextval('outbox.lease_token_seq')", "lease_token_seq"),
        ]:
            _refused(app, statement, table)
        for statement, function in [
            (
                "SELECT * FROM outbox.retry_dead_intents(ARRAY[1::bigint], 'me')",
                "retry_dead_intents",
            ),
            (
                "SELECT * FROM outbox.cancel_dead_intents(ARRAY[1::bigint], 'me')",
                "cancel_dead_intents",
            ),
            ("SELECT * FROM outbox.intent_history(1)", "intent_history"),
            (
                "SELECT outbox.audit_write('intent', '1', 'p', 'update', NULL, '{}', 'forger')",
                "audit_write",
            ),
            ("SELECT outbox.ledger_post('[]', 'forger')", "ledger_post"),
        ]:
            _function_refused(app, statement, function)

    with psycopg.connect(db_url) as admin:
        assert admin.execute(
            "SELECT status, attempts FROM outbox.payment_intents ORDER BY id"
        ).fetchall() == [("pending", 0), ("blocked", 0)], "the refused statements changed nothing"
        created_by = admin.execute(
            "SELECT DISTINCT created_by FROM outbox.payment_intents WHERE payment_id = 'lp-app-1'"
        ).fetchall()
        # The relay's first transaction on the intents writes their creation rows (sql/0019),
        # naming the role that inserted them, not the relay.
        admin.execute("UPDATE outbox.payment_intents SET updated_at = now()")
        actors = admin.execute(
            "SELECT DISTINCT actor FROM outbox.audit_log WHERE payment_id = 'lp-app-1'"
            " AND operation = 'insert'"
        ).fetchall()
    assert created_by == [(f"db:{role}",)], "the intent names the application's login role"
    assert actors == [(f"db:{role}",)], "the audit trail names the application's login role"


# -- the relay --------------------------------------------------------------------------------


def _unsettled(db_url: str) -> tuple[int, int, int]:
    with psycopg.connect(db_url) as conn:
        row = conn.execute(
            "SELECT (SELECT count(*) FROM outbox.payment_intents"
            "        WHERE status IN ('blocked', 'pending', 'in_flight')),"
            "       (SELECT count(*) FROM outbox.events WHERE status IN ('blocked', 'pending')),"
            "       (SELECT count(*) FROM outbox.janitor_checks WHERE checks > 0)"
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1]), int(row[2])


async def _delete_topology(amqp_url: str, exchange: str, queue: str) -> None:
    import aio_pika

    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.queue_delete(queue, if_unused=False, if_empty=False)
        await channel.exchange_delete(exchange, if_unused=False)


def test_real_relay_as_relay_role_finishes_a_workload(
    db_url: str,
    app_url: str,
    relay_url: str,
    operator_url: str,
    amqp_url: str,
    tmp_path: Path,
) -> None:
    with psycopg.connect(app_url) as app:  # the application's transaction
        for n in range(6):
            _insert_intent(app, f"lp-charge-{n}", amount_minor=1000 + n)
        _insert_intent(app, "lp-declined", payment_method="pm_card_chargeDeclined")
        for n in range(2):
            _insert_intent(app, f"lp-auth-{n}", action="authorize", amount_minor=5000)
            _insert_intent(
                app, f"lp-auth-{n}", action="capture", amount_minor=4000, payment_method=None
            )
        _insert_intent(app, "lp-auth-0", action="refund", amount_minor=1500, payment_method=None)
        dead_id = _insert_intent(app, "lp-invalid", payment_method="pm_card_nonexistent")
        app.execute(
            "INSERT INTO outbox.events (routing_key, payload, ordering_key)"
            " VALUES ('app.order.created', '{\"order\": 7}', 'order:7')"
        )
    total = 13

    suffix = uuid.uuid4().hex[:8]
    exchange, queue = f"lp.events.{suffix}", f"lp.example.{suffix}"
    fake = FakeProviderProcess(tmp_path)
    relay = RelayProcess(
        "lp-relay",
        {
            "RELAY_DATABASE_URL": relay_url,
            "RELAY_PROVIDERS__STRIPE__API_KEY": "sk_test_least_privilege",
            "RELAY_PROVIDERS__STRIPE__BASE_URL": fake.url,
            "RELAY_PROVIDERS__STRIPE__TIMEOUT_MS": "5000",
            "RELAY_MAX_ATTEMPTS": "3",
            "RELAY_BACKOFF_BASE_SECONDS": "0.05",
            "RELAY_BACKOFF_CAP_SECONDS": "0.2",
            "RELAY_POLL_INTERVAL_SECONDS": "0.1",
            "RELAY_POLL_MAX_INTERVAL_SECONDS": "0.5",
            "RELAY_JANITOR_INTERVAL_SECONDS": "0.5",
            "RELAY_JANITOR_BACKOFF_BASE_SECONDS": "0.5",
            "RELAY_DEPTH_INTERVAL_SECONDS": "0.5",
            "RELAY_RETENTION_INTERVAL_SECONDS": "0.5",
            "RELAY_AMQP_URL": amqp_url,
            "RELAY_EVENTS_EXCHANGE": exchange,
            "RELAY_EVENTS_DECLARE_TOPOLOGY": "true",
            "RELAY_EVENTS_EXAMPLE_QUEUE": queue,
            "RELAY_LOG_FORMAT": "json",
        },
        tmp_path,
    )
    try:
        relay.start()
        relay.wait_ready()
        # Every intent settles; every event is published; the janitor looked up the dead one.
        block_until(lambda: _unsettled(db_url) == (0, 0, 1))

        readyz = f"http://127.0.0.1:{relay.http_port}/readyz"
        # /readyz: the database answers and the schema version (read as the relay) is current.
        block_until(lambda: httpx.get(readyz, timeout=10).status_code == 200)
        # The depth sampler reads the queue as the relay: the dead intent shows.
        block_until(
            lambda: (
                scrape(relay.http_port).value("outbox_relay_dead_letters", provider="stripe") == 1
            )
        )
    finally:
        relay.terminate()
        fake.stop()
        anyio.run(_delete_topology, amqp_url, exchange, queue)

    log = relay.log_path.read_text()
    assert "relay_ready" in log
    for needle in ("permission denied", "InsufficientPrivilege", "insufficient_privilege"):
        assert needle not in log, f"the relay hit a privilege error: {needle}"

    with psycopg.connect(db_url) as admin:
        statuses = dict(
            admin.execute(
                "SELECT payment_id || '/' || action, status FROM outbox.payment_intents"
            ).fetchall()
        )
        events = admin.execute("SELECT status, count(*) FROM outbox.events GROUP BY 1").fetchall()
        claimed_by = admin.execute(
            "SELECT DISTINCT actor FROM outbox.audit_log WHERE actor LIKE 'relay:%'"
        ).fetchall()
    assert len(statuses) == total
    assert statuses["lp-declined/charge"] == "failed"
    assert statuses["lp-invalid/charge"] == "dead"
    assert statuses["lp-auth-0/refund"] == "succeeded"
    assert {statuses[f"lp-charge-{n}/charge"] for n in range(6)} == {"succeeded"}
    assert {statuses[f"lp-auth-{n}/capture"] for n in range(2)} == {"succeeded"}
    assert events == [("published", total + 1)]  # one per finished intent, and the app's
    assert claimed_by == [("relay:lp-relay",)]

    # The retention sweeper's statement, as the relay role, a month from now: every finished
    # intent moves to the archive (the DELETE guard lets an archiving DELETE through).
    with psycopg.connect(relay_url) as as_relay:
        moved = as_relay.execute(
            QUERIES["archive_terminal_intents"],
            {"now": "2999-01-01T00:00:00Z", "older_than_seconds": 86400, "limit": 1000},
        ).fetchall()
    assert len(moved) == total - 1
    with psycopg.connect(db_url) as admin:
        left = admin.execute("SELECT id, status FROM outbox.payment_intents").fetchall()
    assert left == [(dead_id, "dead")]

    # The operator verifies the trail and the ledger with its own role...
    report = verify_database(operator_url)
    assert report.breaks == [] and report.rows > 0
    ledger = check_ledger(operator_url)
    assert ledger.problems == [] and ledger.transactions == 11  # the succeeded intents
    # ...and ends the dead intent through the SQL API, the only way it changes intents.
    with psycopg.connect(operator_url) as operator:
        ended = operator.execute(
            "SELECT intent_id, status FROM outbox.cancel_dead_intents(%s, 'lp-operator', 'test')",
            ([dead_id],),
        ).fetchall()
    assert ended == [(dead_id, "failed")]
    assert verify_database(operator_url).breaks == []


def test_relay_role_cannot_delete_intents_rewrite_requests_or_touch_the_trail(
    db_url: str, relay_url: str
) -> None:
    with psycopg.connect(db_url, autocommit=True) as admin:
        finished = _insert_intent(admin, "lp-r-1")
        pending = _insert_intent(admin, "lp-r-2")
        admin.execute(
            "UPDATE outbox.payment_intents SET status = 'succeeded', amount_applied_minor = 1000,"
            " completed_at = now() - interval '30 days' WHERE id = %s",
            (finished,),
        )
        audited = admin.execute("SELECT count(*) FROM outbox.audit_log").fetchone()
        posted = admin.execute("SELECT count(*) FROM outbox.ledger_entries").fetchone()
    assert posted == (2,)

    with psycopg.connect(relay_url, autocommit=True) as relay:
        # DELETE is granted for the sweeper's move only: a plain DELETE is refused, for a
        # finished intent as for an unresolved one.
        for intent_id, status in ((finished, "succeeded"), (pending, "pending")):
            with pytest.raises(
                Denied,
                match=rf"permission denied for table payment_intents: DELETE of intent "
                rf"{intent_id} \(status {status}\) refused",
            ):
                relay.execute("DELETE FROM outbox.payment_intents WHERE id = %s", (intent_id,))
        # Archiving an unresolved intent is refused too.
        with pytest.raises(Denied, match=rf"DELETE of intent {pending} \(status pending\)"):
            relay.execute(
                "WITH moved AS (DELETE FROM outbox.payment_intents WHERE id = %s RETURNING *)"
                " INSERT INTO outbox.payment_intents_archive SELECT * FROM moved",
                (pending,),
            )
        for statement, table in [
            ("TRUNCATE outbox.payment_intents", "payment_intents"),
            (
                "INSERT INTO outbox.payment_intents (payment_id, action, provider, amount_minor,"
                " currency, payment_method) VALUES ('x', 'charge', 'stripe', 1, 'EUR', 'pm_x')",
                "payment_intents",
            ),
            # What the application asked for is not the relay's to change.
            ("UPDATE outbox.payment_intents SET amount_minor = 1", "payment_intents"),
            ("UPDATE outbox.payment_intents SET currency = 'USD'", "payment_intents"),
            ("UPDATE outbox.payment_intents SET idempotency_key = 'k'", "payment_intents"),
            ("UPDATE outbox.payment_intents SET metadata = '{}'", "payment_intents"),
            ("UPDATE outbox.payment_intents SET payment_seq = 9", "payment_intents"),
            ("UPDATE outbox.payments SET currency = 'USD'", "payments"),
            ("UPDATE outbox.payments SET next_seq = 1", "payments"),
            ("DELETE FROM outbox.payments", "payments"),
            ("UPDATE outbox.events SET payload = '{}'", "events"),
            ("DELETE FROM outbox.events", "events"),
            ("DELETE FROM outbox.payment_intents_archive", "payment_intents_archive"),
            (
                "UPDATE outbox.payment_intents_archive SET status = 'failed'",
                "payment_intents_archive",
            ),
            (
                "UPDATE outbox.provider_policies SET idempotency_key_lifetime = '1 year'",
                "provider_policies",
            ),
            ("DELETE FROM outbox.janitor_checks", "janitor_checks"),
            # The audit trail and the ledger: not even readable, let alone writable.
            ("SELECT * FROM outbox.audit_log", "audit_log"),
            ("UPDATE outbox.audit_log SET actor = 'x'", "audit_log"),
            ("DELETE FROM outbox.audit_log", "audit_log"),
            ("TRUNCATE outbox.audit_log", "audit_log"),
            (
                "INSERT INTO outbox.audit_log (at, actor, entity, entity_id, operation, chain_seq,"
                " hash) VALUES (now(), 'x', 'intent', '1', 'insert', 99, 'x')",
                "audit_log",
            ),
            ("UPDATE outbox.ledger_entries SET amount_minor = 1", "ledger_entries"),
            ("DELETE FROM outbox.ledger_entries", "ledger_entries"),
            ("TRUNCATE outbox.ledger_transactions", "ledger_transactions"),
            ("DELETE FROM outbox.ledger_transactions", "ledger_transactions"),
            ("SELECT * FROM outbox.reconciliation_exceptions", "reconciliation_exceptions"),
        ]:
            _refused(relay, statement, table)
        for statement, function in [
            (
                "SELECT * FROM outbox.retry_dead_intents(ARRAY[1::bigint], 'me')",
                "retry_dead_intents",
            ),
            (
                "SELECT * FROM outbox.cancel_dead_intents(ARRAY[1::bigint], 'me')",
                "cancel_dead_intents",
            ),
            (
                "SELECT outbox.audit_write('intent', '1', 'p', 'update', NULL, '{}', 'forger')",
                "audit_write",
            ),
        ]:
            _function_refused(relay, statement, function)

    with psycopg.connect(db_url) as admin:
        assert admin.execute(
            "SELECT id, status, amount_minor, currency FROM outbox.payment_intents ORDER BY id"
        ).fetchall() == [(finished, "succeeded", 1000, "EUR"), (pending, "pending", 1000, "EUR")]
        assert admin.execute("SELECT count(*) FROM outbox.payment_intents_archive").fetchone() == (
            0,
        )
        assert admin.execute("SELECT count(*) FROM outbox.audit_log").fetchone() == audited
        assert admin.execute("SELECT count(*) FROM outbox.ledger_entries").fetchone() == posted
    assert verify_database(db_url).breaks == []


def test_operator_changes_intents_only_through_the_sql_api(db_url: str, operator_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as admin:
        dead = _insert_intent(admin, "lp-o-1")
        admin.execute(
            "UPDATE outbox.payment_intents SET status = 'dead', attempts = 1,"
            " error_code = 'provider_timeout', completed_at = now() WHERE id = %s",
            (dead,),
        )
    with psycopg.connect(operator_url, autocommit=True) as operator:
        # Reads everything, the audit trail included (audit verify, intents show).
        history = operator.execute("SELECT * FROM outbox.intent_history(%s)", (dead,)).fetchall()
        assert [h[2] for h in history] == ["insert", "update"]
        for statement, table in [
            ("UPDATE outbox.payment_intents SET status = 'pending'", "payment_intents"),
            ("DELETE FROM outbox.payment_intents", "payment_intents"),
            ("UPDATE outbox.payments SET state = 'captured'", "payments"),
            ("UPDATE outbox.audit_log SET actor = 'x'", "audit_log"),
            ("DELETE FROM outbox.audit_log", "audit_log"),
            ("TRUNCATE outbox.ledger_entries", "ledger_entries"),
            ("DELETE FROM outbox.reconciliation_exceptions", "reconciliation_exceptions"),
            ("UPDATE outbox.events SET status = 'published'", "events"),
        ]:
            _refused(operator, statement, table)
        retried = operator.execute(
            "SELECT intent_id, status FROM outbox.retry_dead_intents(%s, 'alice')", ([dead],)
        ).fetchall()
    assert retried == [(dead, "pending")]
    with psycopg.connect(db_url) as admin:
        actor = admin.execute(
            "SELECT actor FROM outbox.audit_log WHERE entity = 'intent' AND entity_id = %s"
            " ORDER BY chain_seq DESC LIMIT 1",
            (str(dead),),
        ).fetchone()
    assert actor == ("operator:alice",)


def test_an_actor_name_is_recorded_only_from_a_role_entitled_to_it(
    db_url: str, app_url: str, relay_url: str, operator_url: str
) -> None:
    """sql/0012: set_config('outbox.actor', ...) names a writer only when its role may."""

    def actors(payment_id: str) -> list[str]:
        """The creation rows' actors (the payment's, the intent's), written by the intent's
        first UPDATE from what the INSERT recorded (sql/0019)."""
        with psycopg.connect(db_url) as admin:
            admin.execute(
                "UPDATE outbox.payment_intents SET updated_at = now() WHERE payment_id = %s",
                (payment_id,),
            )
            rows = admin.execute(
                "SELECT actor FROM outbox.audit_log WHERE payment_id = %s"
                " AND operation = 'insert' ORDER BY id",
                (payment_id,),
            ).fetchall()
        return [str(actor) for (actor,) in rows]

    def insert_as(url: str, payment_id: str, actor: str) -> str:
        with psycopg.connect(url) as conn:
            conn.execute("SELECT set_config('outbox.actor', %s, true)", (actor,))
            _insert_intent(conn, payment_id)
            return str(conn.info.user)

    app_role = insert_as(app_url, "lp-actor-app-relay", "relay:r1")
    assert actors("lp-actor-app-relay") == [f"db:{app_role}"] * 2
    insert_as(app_url, "lp-actor-app-operator", "operator:alice")
    assert actors("lp-actor-app-operator") == [f"db:{app_role}"] * 2
    insert_as(app_url, "lp-actor-app-db", "db:postgres")
    assert actors("lp-actor-app-db") == [f"db:{app_role}"] * 2

    # The entitled roles keep their names. The relay role may not insert intents: its
    # entitlement is checked directly at the end, and its audit rows in the real relay's
    # test above.
    insert_as(operator_url, "lp-actor-operator", "operator:alice")
    assert actors("lp-actor-operator") == ["operator:alice"] * 2
    operator_role = insert_as(operator_url, "lp-actor-operator-relay", "relay:r1")
    assert actors("lp-actor-operator-relay") == [f"db:{operator_role}"] * 2

    # The events guard's exemption for the relay's own result events: an application that
    # names itself the relay is still refused a card number in an event.
    card = "4242 4242 4242 4242"
    with psycopg.connect(app_url) as app:
        app.execute("SELECT set_config('outbox.actor', 'relay:r1', true)")
        with pytest.raises(psycopg.errors.CheckViolation) as refused:
            app.execute(
                "INSERT INTO outbox.events (routing_key, payload) VALUES ('app.x', %s)",
                (json.dumps({"note": card}),),
            )
    assert refused.value.diag.constraint_name == "events_payload_not_card_number"
    assert card not in str(refused.value)
    with psycopg.connect(relay_url) as relay:
        relay.execute("SELECT set_config('outbox.actor', 'relay:r1', true)")
        assert relay.execute(
            "SELECT outbox.actor_entitled('relay:r1'), outbox.actor_entitled('operator:x')"
        ).fetchone() == (True, False)
