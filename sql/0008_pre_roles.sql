-- Least privilege: three NOLOGIN group roles, granted exactly what each kind of client does.
-- docs/security.md is the deployer's guide (login users, GRANT, TLS, secrets); this file is
-- the contract, and tests/test_least_privilege.py pins every grant below.
--
--   outbox_app       applications: INSERT intents and their own events, read outcomes.
--                    No UPDATE, no DELETE, no TRUNCATE anywhere.
--   outbox_relay     `outbox-relay run`: claim, write back, publish, sweep, sample, janitor,
--                    and the schema-version check of /readyz. Every statement it runs is in
--                    relay/queries.sql; each grant below names the statements that need it.
--   outbox_operator  the operator CLI: status, intents show, dead-letters, audit verify,
--                    ledger check, reconcile and exceptions. Reads everything; changes
--                    intents only through the SQL API functions of sql/0006.
--
-- Deployers create LOGIN users and GRANT them a group role (docs/security.md); migrations
-- keep running as the database owner. Nobody, the owner included, holds UPDATE, DELETE or
-- TRUNCATE on the audit trail or the ledger (sql/0005 revoked them; their triggers refuse
-- them too): every role writes there only through SECURITY DEFINER triggers.
--
-- Privileges inside a database are per database, roles are per cluster: several databases
-- of one cluster (tests, staging beside production) migrate concurrently, so each role is
-- created only when missing, and a concurrent creation by another database's migration is
-- taken as success (a second CREATE ROLE waits for the first and then fails with
-- unique_violation, or with duplicate_object when it comes later).

DO $$
DECLARE
    wanted text;
BEGIN
    FOREACH wanted IN ARRAY ARRAY['outbox_app', 'outbox_relay', 'outbox_operator'] LOOP
        CONTINUE WHEN EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = wanted);
        BEGIN
            EXECUTE format('CREATE ROLE %I NOLOGIN', wanted);
        EXCEPTION
            WHEN duplicate_object OR unique_violation THEN
                NULL;  -- another database's migration created it meanwhile
            WHEN insufficient_privilege THEN
                RAISE EXCEPTION USING
                    ERRCODE = 'insufficient_privilege',
                    MESSAGE = format('role %s does not exist and %s may not create roles',
                                     wanted, current_user),
                    HINT = 'Ask an administrator to run, once per cluster: CREATE ROLE outbox_app '
                           'NOLOGIN; CREATE ROLE outbox_relay NOLOGIN; CREATE ROLE outbox_operator '
                           'NOLOGIN; then run `outbox-relay migrate` again (docs/security.md).';
        END;
    END LOOP;
END;
$$;

-- ==========================================================================================
-- Nothing for PUBLIC
-- ==========================================================================================
-- PostgreSQL grants EXECUTE on every new function to PUBLIC. Functions that change data
-- (retry_dead_intents, cancel_dead_intents) or read the audit trail (intent_history) must
-- not be callable by any role that can log in, so every function starts from nothing and
-- is granted below by name. (Trigger functions need no EXECUTE right to fire.) Tables,
-- sequences and the schema get no PUBLIC rights by default; the REVOKEs make that explicit.
REVOKE ALL ON SCHEMA outbox FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA outbox FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA outbox FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA outbox FROM PUBLIC;

-- Except three helpers that triggers running as the writing role call, whoever that role
-- is (an application's own role, a relay role a deployer made before this migration): the
-- traceparent check on INSERT (is_valid_traceparent) and the key-lifetime guard on UPDATE
-- (idempotency_key_lifetime, which reads outbox.provider_policies with the caller's own
-- rights). They are pure or read only what the caller may read; looks_like_card_number
-- lets any writer check a value before sending it.
GRANT EXECUTE ON FUNCTION outbox.is_valid_traceparent(text),
    outbox.looks_like_card_number(text),
    outbox.idempotency_key_lifetime(text)
    TO PUBLIC;

-- ==========================================================================================
-- Triggers that write on behalf of the inserting role
-- ==========================================================================================
-- An intent's INSERT creates or bumps its payment row (its position, payment_seq) and an
-- event's INSERT locks its payment and bumps its ordering key's stream row. Run as the
-- schema owner (SECURITY DEFINER, with a search_path nobody can plant objects in), so the
-- inserting role needs no right on outbox.payments or outbox.event_streams: outbox_app could
-- otherwise UPDATE payments. Every object they use is schema-qualified or in pg_catalog.
ALTER FUNCTION outbox.payment_intents_before_insert()
    SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION outbox.events_before_insert()
    SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

-- The operator's re-drive and cancel (sql/0006) change intents, lock payments and record
-- result events. As SECURITY DEFINER functions they are the operator's only way to change
-- an intent: the function enforces the rules (only dead intents, per-payment order, the
-- idempotency-key lifetime, a named operator), and outbox_operator holds no UPDATE on
-- intents or payments at all. EXECUTE on them is granted to outbox_operator only.
ALTER FUNCTION outbox.retry_dead_intents(bigint[], text, boolean)
    SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION outbox.cancel_dead_intents(bigint[], text, text)
    SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

-- ==========================================================================================
-- Deleting an intent means archiving it
-- ==========================================================================================
-- The relay's retention sweeper (relay/queries.sql, archive_terminal_intents) moves
-- finished intents to outbox.payment_intents_archive with one statement: DELETE ...
-- RETURNING feeding INSERT INTO the archive. That needs DELETE on the hot table, which
-- would also let the relay drop an intent. So for every role other than the table's owner,
-- a DELETE statement must leave each deleted intent finished (succeeded or failed) and in
-- the archive by the end of the statement; anything else is refused and rolled back.
CREATE FUNCTION outbox.payment_intents_delete_only_archived() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    lost  record;
BEGIN
    -- The owner (the migration role, a superuser) keeps an unrestricted DELETE.
    IF pg_has_role(current_user,
                   (SELECT c.relowner FROM pg_class AS c WHERE c.oid = TG_RELID), 'USAGE') THEN
        RETURN NULL;
    END IF;
    SELECT d.id, d.status INTO lost
    FROM deleted_rows AS d
    WHERE d.status NOT IN ('succeeded', 'failed')
       OR NOT EXISTS (SELECT 1 FROM outbox.payment_intents_archive AS a WHERE a.id = d.id)
    ORDER BY d.id
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION USING
            ERRCODE = 'insufficient_privilege',
            SCHEMA = 'outbox', TABLE = 'payment_intents',
            MESSAGE = format('permission denied for table payment_intents: DELETE of intent %s '
                             '(status %s) refused; %s may only move finished intents to '
                             'outbox.payment_intents_archive', lost.id, lost.status, current_user),
            HINT = 'Intents are never deleted: finished ones are archived by the relay''s '
                   'retention sweeper, dead ones are ended with outbox.cancel_dead_intents.';
    END IF;
    RETURN NULL;
END;
$$;

REVOKE ALL ON FUNCTION outbox.payment_intents_delete_only_archived() FROM PUBLIC;

-- AFTER the statement: the archive INSERT of the sweeper's statement is visible by then.
CREATE TRIGGER payment_intents_delete_only_archived
    AFTER DELETE ON outbox.payment_intents
    REFERENCING OLD TABLE AS deleted_rows
    FOR EACH STATEMENT EXECUTE FUNCTION outbox.payment_intents_delete_only_archived();

-- ==========================================================================================
-- outbox_app
-- ==========================================================================================
GRANT USAGE ON SCHEMA outbox TO outbox_app;

-- The public contract of sql/0001 and sql/0004: the application writes only these columns
-- (the insert triggers own every other one), so INSERT is granted on them alone and an
-- INSERT that names a relay column (status, attempts, ...) is refused outright.
GRANT INSERT (payment_id, action, provider, amount_minor, currency, payment_method,
              idempotency_key, metadata)
    ON outbox.payment_intents TO outbox_app;
GRANT INSERT (event_id, exchange, routing_key, event_type, payload, headers, ordering_key,
              payment_id, schema_version, traceparent)
    ON outbox.events TO outbox_app;

-- Outcomes: intents (finished ones move to the archive after RELAY_RETENTION_HOURS), the
-- payment's state and amounts, result events; the currency table to validate codes and
-- find exponents. SELECT on the archive is also what the insert trigger
-- payment_intents_a_key_not_archived needs to refuse a key an archived intent used.
GRANT SELECT ON outbox.payment_intents, outbox.payment_intents_archive, outbox.payments,
    outbox.events, outbox.currencies
    TO outbox_app;

-- ==========================================================================================
-- outbox_relay (statement names from relay/queries.sql)
-- ==========================================================================================
GRANT USAGE ON SCHEMA outbox TO outbox_relay;

-- claim_intents, complete_intents, requeue_expired_leases, release_leases, janitor_reserve,
-- janitor_take, queue_depth, status_counts: read intents and write the relay's own columns.
-- Column-level UPDATE: the relay cannot change what the application asked for (amount,
-- currency, payment_id, payment_method, idempotency key, metadata) or an intent's position.
GRANT SELECT ON outbox.payment_intents TO outbox_relay;
GRANT UPDATE (status, attempts, available_at, lease_token, lease_expires_at, claimed_by,
              amount_applied_minor, provider_reference, error_code, error_message,
              updated_at, completed_at)
    ON outbox.payment_intents TO outbox_relay;
-- archive_terminal_intents (the retention sweeper): DELETE from the hot table and INSERT
-- into the archive in one statement; the trigger above refuses any other DELETE. SELECT on
-- the archive for the statement's RETURNING.
GRANT DELETE ON outbox.payment_intents TO outbox_relay;
GRANT SELECT, INSERT ON outbox.payment_intents_archive TO outbox_relay;
-- claim_intents, claim_events, janitor_take: fencing tokens.
GRANT USAGE ON SEQUENCE outbox.lease_token_seq TO outbox_relay;

-- claim_intents, complete_intents, lock_payments (FOR UPDATE), janitor_take: the payment's
-- state and amounts as the provider confirmed them. Its identity (provider, currency) and
-- ordering counter (next_seq) stay with the insert trigger.
GRANT SELECT ON outbox.payments TO outbox_relay;
GRANT UPDATE (state, authorized_minor, captured_minor, refunded_minor, provider_reference,
              updated_at)
    ON outbox.payments TO outbox_relay;

-- complete_intents writes one result event per finished intent (the writer columns, as
-- for applications); claim_events, mark_events, release_events, unpublished_events run
-- the publisher's lease and results on the relay's columns.
GRANT SELECT ON outbox.events TO outbox_relay;
GRANT INSERT (event_id, exchange, routing_key, event_type, payload, headers, ordering_key,
              payment_id, schema_version, traceparent)
    ON outbox.events TO outbox_relay;
GRANT UPDATE (status, attempts, available_at, lease_token, claimed_by, error_code,
              error_message, published_at)
    ON outbox.events TO outbox_relay;
-- lock_event_streams (FOR UPDATE SKIP LOCKED) and mark_events advance a key's done_seq.
GRANT SELECT, UPDATE (done_seq) ON outbox.event_streams TO outbox_relay;

-- want_wakeups, skip_wakeups: the debounced NOTIFY flag of sql/0007.
GRANT SELECT, UPDATE (wanted, updated_at) ON outbox.relay_wakeup TO outbox_relay;

-- schema_version: /readyz compares the applied migrations with the ones it ships.
GRANT SELECT ON outbox.schema_migrations TO outbox_relay;

-- janitor_reserve (INSERT ... ON CONFLICT DO UPDATE) and janitor_record: the janitor's
-- lookup schedule for dead intents.
GRANT SELECT, INSERT, UPDATE ON outbox.janitor_checks TO outbox_relay;

-- The key-lifetime guard (sql/0005, a BEFORE UPDATE trigger that runs as the relay) reads
-- the provider's idempotency-key lifetime (outbox.idempotency_key_lifetime, see above).
GRANT SELECT ON outbox.provider_policies TO outbox_relay;

-- reconciliation_open: the depth sampler's gauges of open reconciliation exceptions.
GRANT SELECT ON outbox.reconciliation_open_delta TO outbox_relay;

-- ==========================================================================================
-- outbox_operator
-- ==========================================================================================
GRANT USAGE ON SCHEMA outbox TO outbox_operator;

-- status, intents show, dead-letters list, audit verify (the trail and every live row),
-- ledger check, reconcile: read everything. Later migrations grant their new tables.
GRANT SELECT ON ALL TABLES IN SCHEMA outbox TO outbox_operator;

-- dead-letters retry / cancel and the exception workflow's re-drive: the SECURITY DEFINER
-- functions above. intent_history reads the audit trail for `intents show`; the audit
-- document functions (and audit_redact_text, which they call: SQL functions are inlined
-- and run with the caller's rights) let `audit verify` compare each chain's end with the
-- live row;
-- audit_actor names the run's author (reconciliation_runs.run_by's default and
-- reconcile_clear_exceptions).
GRANT EXECUTE ON FUNCTION outbox.retry_dead_intents(bigint[], text, boolean),
    outbox.cancel_dead_intents(bigint[], text, text),
    outbox.intent_history(bigint),
    outbox.audit_intent_doc(outbox.payment_intents),
    outbox.audit_payment_doc(outbox.payments),
    outbox.audit_redact_text(text),
    outbox.audit_actor()
    TO outbox_operator;

-- reconcile: runs and exceptions; exceptions accept / request / approve: the actions.
-- UPDATE because a run is closed with its counts and an exception moves through its
-- workflow; never DELETE (the audit trail records every change of these rows).
GRANT INSERT, UPDATE ON outbox.reconciliation_runs, outbox.reconciliation_exceptions,
    outbox.reconciliation_actions
    TO outbox_operator;

-- exceptions approve of a refund or void: action_insert_intent inserts an ordinary intent,
-- with the application's columns only.
GRANT INSERT (payment_id, action, provider, amount_minor, currency, payment_method,
              idempotency_key, metadata)
    ON outbox.payment_intents TO outbox_operator;
