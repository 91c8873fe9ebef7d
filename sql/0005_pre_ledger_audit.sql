-- Money you can audit: a tamper-evident audit trail, a double-entry ledger, the janitor's
-- bookkeeping, the idempotency-key lifetime guard and reconciliation against the provider.
-- docs/audit-and-reconciliation.md explains each part; this file is the contract.
--
-- Everything here is written by triggers or by SECURITY DEFINER functions, so every writer
-- (relay, janitor, operator SQL, CLI, the application's INSERT) is covered without any
-- change to the statements that write intents and payments.

-- ==========================================================================================
-- Audit trail
-- ==========================================================================================
--
-- One append-only table. Every row belongs to one chain: the rows of one entity
-- (entity, entity_id), numbered chain_seq = 1, 2, 3... Each row carries the hash of the
-- chain's previous row (prev_hash) and its own hash over a canonical encoding of its
-- fields (outbox.audit_canonical; relay/audit.py recomputes it byte for byte).
--
-- NOTE: a chain per entity row rather than per payment. Every writer of a chain already
-- holds that row's lock (the UPDATE that fired the trigger), so appending needs no lock
-- of its own: claims never wait for an application's transaction, nothing new can
-- deadlock, and writers of different rows never wait for each other. A payment's whole
-- history is still one query away (payment_id is on every row); `outbox-relay audit
-- verify` also checks that each chain ends in the row's live state, which catches a
-- deleted tail or a change made with the trigger disabled.

CREATE TABLE outbox.audit_log (
    id          bigserial PRIMARY KEY,
    at          timestamptz NOT NULL,
    -- outbox.actor when the writer set it ('relay:<instance>', 'janitor:<instance>',
    -- 'operator:<name>', 'reconcile:<provider>'), else 'db:<role>'
    actor       text NOT NULL,
    entity      text NOT NULL,
    entity_id   text NOT NULL,
    payment_id  text,
    operation   text NOT NULL,
    -- outbox.reason when the writer set it (the janitor says what the provider showed)
    reason      text,
    -- INSERT: before is NULL, after the row's audited columns; UPDATE: only the audited
    -- columns that changed, old values in before and new ones in after
    before      jsonb,
    after       jsonb,
    chain_seq   bigint NOT NULL CONSTRAINT audit_log_chain_seq_positive CHECK (chain_seq > 0),
    prev_hash   bytea,
    hash        bytea NOT NULL,
    CONSTRAINT audit_log_chain_link CHECK ((chain_seq = 1) = (prev_hash IS NULL))
);

COMMENT ON TABLE outbox.audit_log IS
    'Append-only, hash-chained history of every intent, payment, janitor check and '
    'reconciliation change (who, when, before, after). UPDATE, DELETE and TRUNCATE are refused. '
    'Verify with `outbox-relay audit verify`.';

-- The chain's tail is found through this index, and it refuses a fork (two rows with
-- the same position), so a writer that read a stale tail fails instead of branching.
CREATE UNIQUE INDEX audit_log_chain_position ON outbox.audit_log (entity, entity_id, chain_seq);
CREATE INDEX audit_log_payment_idx ON outbox.audit_log (payment_id, id) WHERE payment_id IS NOT NULL;

-- The canonical encoding a row's hash is taken over: a version line, then one line per
-- field, `<length in characters>:<text>` or `-` for NULL. Timestamps in UTC with
-- microseconds; jsonb as PostgreSQL renders it; prev_hash in lowercase hex.
CREATE FUNCTION outbox.audit_field(v text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT E'\n' || coalesce(length(v)::text || ':' || v, '-')
$$;

CREATE FUNCTION outbox.audit_canonical(
    p_id bigint, p_at timestamptz, p_actor text, p_entity text, p_entity_id text,
    p_payment_id text, p_operation text, p_reason text, p_before jsonb, p_after jsonb,
    p_chain_seq bigint, p_prev_hash bytea
) RETURNS bytea
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT convert_to(
        'outbox-audit-v1'
        || outbox.audit_field(p_id::text)
        || outbox.audit_field(to_char(p_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'))
        || outbox.audit_field(p_actor)
        || outbox.audit_field(p_entity)
        || outbox.audit_field(p_entity_id)
        || outbox.audit_field(p_payment_id)
        || outbox.audit_field(p_operation)
        || outbox.audit_field(p_reason)
        || outbox.audit_field(p_before::text)
        || outbox.audit_field(p_after::text)
        || outbox.audit_field(p_chain_seq::text)
        || outbox.audit_field(encode(p_prev_hash, 'hex')),
        'UTF8')
$$;

-- Text that must never be stored: a card-like number (13-19 digits passing Luhn, see
-- outbox.looks_like_card_number) replaces the whole value; API keys and webhook secrets
-- are cut out. Applied to every audited column a writer can fill with free text.
CREATE FUNCTION outbox.audit_redact_text(v text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE
        WHEN v IS NULL THEN NULL
        WHEN v ~ '[0-9](?:[ -]?[0-9]){12}'
             AND (length(v) > 1024 OR outbox.looks_like_card_number(v))
            THEN '[redacted: card-like number]'
        WHEN v ~ '(sk|rk)_(live|test)_|whsec_'
            THEN regexp_replace(v, '(sk|rk)_(live|test)_[0-9A-Za-z]+|whsec_[0-9A-Za-z]+',
                                '[redacted: secret]', 'g')
        ELSE v
    END
$$;

-- The same for every string value of a document (the colder tables' rows).
CREATE FUNCTION outbox.audit_redact(doc jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN doc IS NULL THEN NULL ELSE (
        SELECT coalesce(jsonb_object_agg(key,
                   CASE WHEN jsonb_typeof(value) = 'string'
                        THEN to_jsonb(outbox.audit_redact_text(value #>> '{}'))
                        ELSE value END), '{}'::jsonb)
        FROM jsonb_each(doc)) END
$$;

-- Who is writing: the transaction's outbox.actor, else the database role of the session.
-- (The audit triggers run as the schema owner, so the session's role is the one that
-- logged in.)
CREATE FUNCTION outbox.audit_actor() RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT coalesce(nullif(current_setting('outbox.actor', true), ''), 'db:' || session_user)
$$;

-- Append one row to the chain of (entity, entity_id). The audit triggers call it as the
-- schema owner (they are SECURITY DEFINER), so roles that write intents need no right on
-- the audit table; nobody else may call it (EXECUTE is revoked).
CREATE FUNCTION outbox.audit_write(
    p_entity text, p_entity_id text, p_payment_id text, p_operation text,
    p_before jsonb, p_after jsonb, p_actor text
) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_id        bigint := nextval('outbox.audit_log_id_seq');
    v_at        timestamptz := clock_timestamp();
    v_reason    text := nullif(current_setting('outbox.reason', true), '');
    v_seq       bigint;
    v_prev      bytea;
BEGIN
    -- The caller holds the entity row's lock, so the tail cannot move under us; in
    -- READ COMMITTED this statement sees the tail the previous holder committed. (A
    -- writer that read a stale tail anyway fails on audit_log_chain_position.)
    SELECT a.chain_seq, a.hash INTO v_seq, v_prev
    FROM outbox.audit_log AS a
    WHERE a.entity = p_entity AND a.entity_id = p_entity_id
    ORDER BY a.chain_seq DESC
    LIMIT 1;
    v_seq := coalesce(v_seq, 0) + 1;
    INSERT INTO outbox.audit_log
        (id, at, actor, entity, entity_id, payment_id, operation, reason, before, after,
         chain_seq, prev_hash, hash)
    VALUES (v_id, v_at, p_actor, p_entity, p_entity_id, p_payment_id, p_operation, v_reason,
            p_before, p_after, v_seq, v_prev,
            sha256(outbox.audit_canonical(v_id, v_at, p_actor, p_entity, p_entity_id,
                                          p_payment_id, p_operation, v_reason, p_before,
                                          p_after, v_seq, v_prev)));
END;
$$;
REVOKE ALL ON FUNCTION outbox.audit_write(text, text, text, text, jsonb, jsonb, text) FROM PUBLIC;

-- The audited columns of an intent (an allow-list: never payment_method or metadata),
-- free-text ones redacted. `audit verify` compares each chain's end with this document.
CREATE FUNCTION outbox.audit_intent_doc(i outbox.payment_intents) RETURNS jsonb
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT jsonb_build_object(
        'id', i.id, 'payment_id', i.payment_id, 'action', i.action, 'provider', i.provider,
        'amount_minor', i.amount_minor, 'currency', i.currency,
        'idempotency_key', outbox.audit_redact_text(i.idempotency_key), 'status', i.status,
        'payment_seq', i.payment_seq, 'attempts', i.attempts,
        'claimed_by', outbox.audit_redact_text(i.claimed_by),
        'amount_applied_minor', i.amount_applied_minor,
        'provider_reference', outbox.audit_redact_text(i.provider_reference),
        'error_code', outbox.audit_redact_text(i.error_code),
        'error_message', outbox.audit_redact_text(i.error_message))
$$;

CREATE FUNCTION outbox.audit_payment_doc(p outbox.payments) RETURNS jsonb
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT jsonb_build_object(
        'payment_id', p.payment_id, 'provider', p.provider, 'currency', p.currency,
        'state', p.state, 'authorized_minor', p.authorized_minor,
        'captured_minor', p.captured_minor, 'refunded_minor', p.refunded_minor,
        'provider_reference', outbox.audit_redact_text(p.provider_reference))
$$;

-- The hot tables are audited by statement-level triggers over transition tables: one
-- set-based INSERT per statement instead of a function call per row, so a write-back of
-- hundreds of intents pays once. One statement changes each row at most once, so every
-- audit row of a statement starts from its chain's committed tail (the LATERAL lookup).
-- Only rows whose audited columns changed are recorded, and only those columns.

-- Insert the audit rows of one statement: `changes` holds (entity_id, payment_id,
-- operation, before, after) per changed row, in the order the ids are drawn.
CREATE FUNCTION outbox.audit_write_set(p_entity text, changes jsonb) RETURNS void
LANGUAGE sql AS $$
    WITH change AS MATERIALIZED (
        SELECT nextval('outbox.audit_log_id_seq') AS id, clock_timestamp() AS at,
               c ->> 'entity_id' AS entity_id, c ->> 'payment_id' AS payment_id,
               c ->> 'operation' AS operation, c -> 'before' AS before, c -> 'after' AS after,
               coalesce(t.chain_seq, 0) + 1 AS chain_seq, t.hash AS prev_hash,
               outbox.audit_actor() AS actor,
               nullif(current_setting('outbox.reason', true), '') AS reason
        FROM jsonb_array_elements(changes) WITH ORDINALITY AS x(c, n)
        LEFT JOIN LATERAL (
            SELECT a.chain_seq, a.hash
            FROM outbox.audit_log AS a
            WHERE a.entity = p_entity AND a.entity_id = x.c ->> 'entity_id'
            ORDER BY a.chain_seq DESC
            LIMIT 1
        ) AS t ON true
        ORDER BY x.n
    )
    INSERT INTO outbox.audit_log
        (id, at, actor, entity, entity_id, payment_id, operation, reason, before, after,
         chain_seq, prev_hash, hash)
    SELECT id, at, actor, p_entity, entity_id, payment_id, operation, reason,
           nullif(before, 'null'), after, chain_seq, prev_hash,
           sha256(outbox.audit_canonical(id, at, actor, p_entity, entity_id, payment_id,
                                         operation, reason, nullif(before, 'null'), after,
                                         chain_seq, prev_hash))
    FROM change
$$;
REVOKE ALL ON FUNCTION outbox.audit_write_set(text, jsonb) FROM PUBLIC;

-- The audited columns that changed between two versions of a row: their old values
-- (side 0) or their new ones (side 1). Plain expressions, so the planner inlines them.
CREATE FUNCTION outbox.audit_intent_changes(o outbox.payment_intents, n outbox.payment_intents, side int)
RETURNS jsonb
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN o.status IS DISTINCT FROM n.status
             THEN jsonb_build_object('status', CASE WHEN side = 0 THEN o.status ELSE n.status END)
             ELSE '{}'::jsonb END
        || CASE WHEN o.attempts IS DISTINCT FROM n.attempts
             THEN jsonb_build_object('attempts', CASE WHEN side = 0 THEN o.attempts ELSE n.attempts END)
             ELSE '{}'::jsonb END
        || CASE WHEN o.claimed_by IS DISTINCT FROM n.claimed_by
             THEN jsonb_build_object('claimed_by', CASE WHEN side = 0 THEN outbox.audit_redact_text(o.claimed_by) ELSE outbox.audit_redact_text(n.claimed_by) END)
             ELSE '{}'::jsonb END
        || CASE WHEN o.amount_applied_minor IS DISTINCT FROM n.amount_applied_minor
             THEN jsonb_build_object('amount_applied_minor', CASE WHEN side = 0 THEN o.amount_applied_minor ELSE n.amount_applied_minor END)
             ELSE '{}'::jsonb END
        || CASE WHEN o.provider_reference IS DISTINCT FROM n.provider_reference
             THEN jsonb_build_object('provider_reference', CASE WHEN side = 0 THEN outbox.audit_redact_text(o.provider_reference) ELSE outbox.audit_redact_text(n.provider_reference) END)
             ELSE '{}'::jsonb END
        || CASE WHEN o.error_code IS DISTINCT FROM n.error_code
             THEN jsonb_build_object('error_code', CASE WHEN side = 0 THEN outbox.audit_redact_text(o.error_code) ELSE outbox.audit_redact_text(n.error_code) END)
             ELSE '{}'::jsonb END
        || CASE WHEN o.error_message IS DISTINCT FROM n.error_message
             THEN jsonb_build_object('error_message', CASE WHEN side = 0 THEN outbox.audit_redact_text(o.error_message) ELSE outbox.audit_redact_text(n.error_message) END)
             ELSE '{}'::jsonb END
        || CASE WHEN o.payment_id IS DISTINCT FROM n.payment_id
             THEN jsonb_build_object('payment_id', CASE WHEN side = 0 THEN o.payment_id ELSE n.payment_id END)
             ELSE '{}'::jsonb END
        || CASE WHEN o.action IS DISTINCT FROM n.action
             THEN jsonb_build_object('action', CASE WHEN side = 0 THEN o.action ELSE n.action END)
             ELSE '{}'::jsonb END
        || CASE WHEN o.provider IS DISTINCT FROM n.provider
             THEN jsonb_build_object('provider', CASE WHEN side = 0 THEN o.provider ELSE n.provider END)
             ELSE '{}'::jsonb END
        || CASE WHEN o.amount_minor IS DISTINCT FROM n.amount_minor
             THEN jsonb_build_object('amount_minor', CASE WHEN side = 0 THEN o.amount_minor ELSE n.amount_minor END)
             ELSE '{}'::jsonb END
        || CASE WHEN o.currency IS DISTINCT FROM n.currency
             THEN jsonb_build_object('currency', CASE WHEN side = 0 THEN o.currency ELSE n.currency END)
             ELSE '{}'::jsonb END
        || CASE WHEN o.idempotency_key IS DISTINCT FROM n.idempotency_key
             THEN jsonb_build_object('idempotency_key', CASE WHEN side = 0 THEN outbox.audit_redact_text(o.idempotency_key) ELSE outbox.audit_redact_text(n.idempotency_key) END)
             ELSE '{}'::jsonb END
        || CASE WHEN o.payment_seq IS DISTINCT FROM n.payment_seq
             THEN jsonb_build_object('payment_seq', CASE WHEN side = 0 THEN o.payment_seq ELSE n.payment_seq END)
             ELSE '{}'::jsonb END
$$;

CREATE FUNCTION outbox.audit_payment_changes(o outbox.payments, n outbox.payments, side int)
RETURNS jsonb
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN o.state IS DISTINCT FROM n.state
             THEN jsonb_build_object('state', CASE WHEN side = 0 THEN o.state ELSE n.state END)
             ELSE '{}'::jsonb END
        || CASE WHEN o.authorized_minor IS DISTINCT FROM n.authorized_minor
             THEN jsonb_build_object('authorized_minor', CASE WHEN side = 0 THEN o.authorized_minor ELSE n.authorized_minor END)
             ELSE '{}'::jsonb END
        || CASE WHEN o.captured_minor IS DISTINCT FROM n.captured_minor
             THEN jsonb_build_object('captured_minor', CASE WHEN side = 0 THEN o.captured_minor ELSE n.captured_minor END)
             ELSE '{}'::jsonb END
        || CASE WHEN o.refunded_minor IS DISTINCT FROM n.refunded_minor
             THEN jsonb_build_object('refunded_minor', CASE WHEN side = 0 THEN o.refunded_minor ELSE n.refunded_minor END)
             ELSE '{}'::jsonb END
        || CASE WHEN o.provider_reference IS DISTINCT FROM n.provider_reference
             THEN jsonb_build_object('provider_reference', CASE WHEN side = 0 THEN outbox.audit_redact_text(o.provider_reference) ELSE outbox.audit_redact_text(n.provider_reference) END)
             ELSE '{}'::jsonb END
        || CASE WHEN o.provider IS DISTINCT FROM n.provider
             THEN jsonb_build_object('provider', CASE WHEN side = 0 THEN o.provider ELSE n.provider END)
             ELSE '{}'::jsonb END
        || CASE WHEN o.currency IS DISTINCT FROM n.currency
             THEN jsonb_build_object('currency', CASE WHEN side = 0 THEN o.currency ELSE n.currency END)
             ELSE '{}'::jsonb END
$$;

CREATE FUNCTION outbox.audit_payment_intents() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        PERFORM outbox.audit_write_set('intent', (
            SELECT jsonb_agg(jsonb_build_object(
                       'entity_id', n.id::text, 'payment_id', n.payment_id, 'operation', 'insert',
                       'after', outbox.audit_intent_doc(n)) ORDER BY n.id)
            FROM inserted_rows AS n))
        WHERE EXISTS (SELECT 1 FROM inserted_rows);
    ELSE
        PERFORM outbox.audit_write_set('intent', (
            SELECT jsonb_agg(jsonb_build_object(
                       'entity_id', c.id::text, 'payment_id', c.payment_id, 'operation', 'update',
                       'before', c.before, 'after', c.after) ORDER BY c.id)
            FROM (SELECT n.id, n.payment_id,
                         outbox.audit_intent_changes(o, n, 0) AS before,
                         outbox.audit_intent_changes(o, n, 1) AS after
                  FROM old_rows AS o
                  JOIN new_rows AS n ON n.id = o.id
                  OFFSET 0) AS c
            WHERE c.after <> '{}'))
        WHERE EXISTS (SELECT 1 FROM new_rows);
    END IF;
    RETURN NULL;
END;
$$;

CREATE FUNCTION outbox.audit_payments() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        PERFORM outbox.audit_write_set('payment', (
            SELECT jsonb_agg(jsonb_build_object(
                       'entity_id', n.payment_id, 'payment_id', n.payment_id, 'operation', 'insert',
                       'after', outbox.audit_payment_doc(n)) ORDER BY n.payment_id)
            FROM inserted_rows AS n))
        WHERE EXISTS (SELECT 1 FROM inserted_rows);
    ELSE
        PERFORM outbox.audit_write_set('payment', (
            SELECT jsonb_agg(jsonb_build_object(
                       'entity_id', c.payment_id, 'payment_id', c.payment_id, 'operation', 'update',
                       'before', c.before, 'after', c.after) ORDER BY c.payment_id)
            FROM (SELECT n.payment_id,
                         outbox.audit_payment_changes(o, n, 0) AS before,
                         outbox.audit_payment_changes(o, n, 1) AS after
                  FROM old_rows AS o
                  JOIN new_rows AS n ON n.payment_id = o.payment_id
                  OFFSET 0) AS c
            WHERE c.after <> '{}'))
        WHERE EXISTS (SELECT 1 FROM new_rows);
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER payment_intents_audit_insert
    AFTER INSERT ON outbox.payment_intents
    REFERENCING NEW TABLE AS inserted_rows
    FOR EACH STATEMENT EXECUTE FUNCTION outbox.audit_payment_intents();
CREATE TRIGGER payment_intents_audit_update
    AFTER UPDATE ON outbox.payment_intents
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION outbox.audit_payment_intents();
CREATE TRIGGER payments_audit_insert
    AFTER INSERT ON outbox.payments
    REFERENCING NEW TABLE AS inserted_rows
    FOR EACH STATEMENT EXECUTE FUNCTION outbox.audit_payments();
CREATE TRIGGER payments_audit_update
    AFTER UPDATE ON outbox.payments
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION outbox.audit_payments();

-- For the colder tables below: TG_ARGV = entity name, key column, comma-separated
-- allow-list of audited columns.
CREATE FUNCTION outbox.audit_generic() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET TimeZone = 'UTC' AS $$
DECLARE
    allowed   text[] := string_to_array(TG_ARGV[2], ',');
    new_row   jsonb := to_jsonb(NEW);
    b         jsonb;
    a         jsonb;
BEGIN
    IF TG_OP = 'INSERT' THEN
        SELECT jsonb_object_agg(key, value) INTO a
        FROM jsonb_each(new_row) WHERE key = ANY(allowed);
    ELSE
        SELECT jsonb_object_agg(n.key, o.value), jsonb_object_agg(n.key, n.value) INTO b, a
        FROM jsonb_each(new_row) AS n
        JOIN jsonb_each(to_jsonb(OLD)) AS o ON o.key = n.key
        WHERE n.key = ANY(allowed) AND n.value IS DISTINCT FROM o.value;
        IF a IS NULL THEN
            RETURN NULL;
        END IF;
    END IF;
    PERFORM outbox.audit_write(TG_ARGV[0], new_row ->> TG_ARGV[1], new_row ->> 'payment_id',
        lower(TG_OP), outbox.audit_redact(b), outbox.audit_redact(a), outbox.audit_actor());
    RETURN NULL;
END;
$$;

-- Append-only tables refuse changes to existing rows, whoever asks (a superuser who turns
-- triggers off is caught by `audit verify` / `ledger check` instead).
CREATE FUNCTION outbox.refuse_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION USING
        ERRCODE = 'insufficient_privilege',
        MESSAGE = format('%I.%I is append-only: %s refused', TG_TABLE_SCHEMA, TG_TABLE_NAME, TG_OP),
        HINT = 'Record a correction as a new row (a reversing ledger transaction, an operator action).';
END;
$$;

CREATE TRIGGER audit_log_append_only
    BEFORE UPDATE OR DELETE ON outbox.audit_log
    FOR EACH ROW EXECUTE FUNCTION outbox.refuse_change();
CREATE TRIGGER audit_log_no_truncate
    BEFORE TRUNCATE ON outbox.audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION outbox.refuse_change();

-- Rows that exist before this migration get a baseline row, so every chain starts where
-- the trail does (`audit verify` checks that each live row ends its chain).
SELECT outbox.audit_write('payment', p.payment_id, p.payment_id, 'baseline', NULL,
                          outbox.audit_payment_doc(p), 'db:' || current_user)
FROM outbox.payments AS p ORDER BY p.payment_id;
SELECT outbox.audit_write('intent', (i).id::text, (i).payment_id, 'baseline', NULL,
                          outbox.audit_intent_doc(i), 'db:' || current_user)
FROM (SELECT h FROM outbox.payment_intents AS h
      UNION ALL
      SELECT ROW(a.*)::outbox.payment_intents FROM outbox.payment_intents_archive AS a) AS s(i)
ORDER BY (i).id;

-- ==========================================================================================
-- Ledger
-- ==========================================================================================
--
-- Double entry in integer minor units. Each succeeded intent posts one ledger transaction
-- in the same database transaction as its outcome (trigger below); its entries sum to
-- zero. Amounts are signed: debit > 0, credit < 0. Accounts are '<provider>:<name>' and
-- every entry carries its currency, so each provider and currency has its own books:
--
--   holds           authorisation holds open at the provider (debit balance)
--   authorizations  the customers' side of those holds (credit balance)
--   receivable      captured funds the provider owes us, net of refunds
--   captured        funds captured from customers (credit balance)
--   refunded        funds returned to customers (debit balance)
--
--   authorize A   Dr holds A            Cr authorizations A
--   capture C     Dr authorizations H   Cr holds H    (H: the whole hold is released)
--                 Dr receivable C       Cr captured C
--   charge C      Dr receivable C       Cr captured C
--   void H        Dr authorizations H   Cr holds H
--   refund R      Dr refunded R         Cr receivable R

CREATE TABLE outbox.ledger_transactions (
    id                  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    intent_id           bigint NOT NULL,
    payment_id          text NOT NULL,
    provider            text NOT NULL,
    currency            text NOT NULL REFERENCES outbox.currencies (code),
    kind                text NOT NULL
        CONSTRAINT ledger_transactions_kind_valid CHECK (kind IN ('authorize', 'capture', 'charge', 'void', 'refund')),
    amount_minor        bigint NOT NULL CONSTRAINT ledger_transactions_amount_positive CHECK (amount_minor > 0),
    provider_reference  text,
    posted_at           timestamptz NOT NULL DEFAULT clock_timestamp(),
    posted_by           text NOT NULL,
    -- One posting per intent: a second success can never post twice.
    CONSTRAINT ledger_transactions_one_per_intent UNIQUE (intent_id)
);
CREATE INDEX ledger_transactions_payment_idx ON outbox.ledger_transactions (payment_id);
CREATE INDEX ledger_transactions_posted_idx ON outbox.ledger_transactions (provider, posted_at);

CREATE TABLE outbox.ledger_entries (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    transaction_id  bigint NOT NULL REFERENCES outbox.ledger_transactions (id),
    account         text NOT NULL,
    currency        text NOT NULL REFERENCES outbox.currencies (code),
    amount_minor    bigint NOT NULL CONSTRAINT ledger_entries_amount_not_zero CHECK (amount_minor <> 0)
);
CREATE INDEX ledger_entries_transaction_idx ON outbox.ledger_entries (transaction_id);

COMMENT ON TABLE outbox.ledger_transactions IS
    'One per succeeded intent, posted by a trigger in the outcome''s transaction. Append-only; '
    'check with `outbox-relay ledger check`.';
COMMENT ON COLUMN outbox.ledger_entries.amount_minor IS
    'Signed minor units: debit > 0, credit < 0; a transaction''s entries sum to 0 per currency.';

-- The posting rules above, in one place: the entries of a `kind` transaction of `amount`
-- (`hold`: the payment's authorised amount, released by a capture).
CREATE FUNCTION outbox.ledger_lines(p_kind text, p_amount bigint, p_hold bigint)
RETURNS TABLE (account text, amount_minor bigint)
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT e.account, e.amount
    FROM (VALUES
        (1,  'authorize', 'holds',           p_amount),
        (2,  'authorize', 'authorizations', -p_amount),
        (3,  'capture',   'authorizations',  p_hold),
        (4,  'capture',   'holds',          -p_hold),
        (5,  'capture',   'receivable',      p_amount),
        (6,  'capture',   'captured',       -p_amount),
        (7,  'charge',    'receivable',      p_amount),
        (8,  'charge',    'captured',       -p_amount),
        (9,  'void',      'authorizations',  p_amount),
        (10, 'void',      'holds',          -p_amount),
        (11, 'refund',    'refunded',        p_amount),
        (12, 'refund',    'receivable',     -p_amount)
    ) AS e(n, kind, account, amount)
    WHERE e.kind = p_kind AND e.amount IS NOT NULL AND e.amount <> 0
    ORDER BY e.n
$$;

-- Post the intents in `intents` (rows of payment_intents that just succeeded), one ledger
-- transaction each, with its entries. Called by the ledger trigger as the schema owner
-- (so roles that write intents need no right on the ledger) and by this migration's
-- backfill; nobody else may call it (EXECUTE is revoked).
CREATE FUNCTION outbox.ledger_post(intents jsonb, p_actor text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    bad record;
BEGIN
    SELECT i ->> 'id' AS id, i ->> 'amount_applied_minor' AS amount INTO bad
    FROM jsonb_array_elements(intents) AS x(i)
    WHERE coalesce((i ->> 'amount_applied_minor')::bigint, 0) <= 0
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION USING
            ERRCODE = 'check_violation',
            MESSAGE = format('intent %s succeeded without a positive amount_applied_minor (%s); '
                             'nothing can be posted to the ledger', bad.id, bad.amount),
            HINT = 'Set amount_applied_minor to what the provider confirmed in the same UPDATE.';
    END IF;
    WITH posted AS (
        INSERT INTO outbox.ledger_transactions
            (intent_id, payment_id, provider, currency, kind, amount_minor, provider_reference,
             posted_by)
        SELECT (i ->> 'id')::bigint, i ->> 'payment_id', i ->> 'provider', i ->> 'currency',
               i ->> 'action', (i ->> 'amount_applied_minor')::bigint, i ->> 'provider_reference',
               p_actor
        FROM jsonb_array_elements(intents) WITH ORDINALITY AS x(i, n)
        ORDER BY x.n
        RETURNING id, payment_id, provider, currency, kind, amount_minor
    )
    INSERT INTO outbox.ledger_entries (transaction_id, account, currency, amount_minor)
    SELECT t.id, t.provider || ':' || l.account, t.currency, l.amount_minor
    FROM posted AS t
    LEFT JOIN outbox.payments AS p ON p.payment_id = t.payment_id
    CROSS JOIN LATERAL outbox.ledger_lines(t.kind, t.amount_minor, p.authorized_minor) AS l
    ORDER BY t.id;
END;
$$;
REVOKE ALL ON FUNCTION outbox.ledger_post(jsonb, text) FROM PUBLIC;

-- One posting per intent that turned succeeded in this statement, in its transaction.
-- A second posting for the same intent is refused (ledger_transactions_one_per_intent).
CREATE FUNCTION outbox.payment_intents_post_ledger() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off AS $$
DECLARE
    succeeded jsonb;
BEGIN
    SELECT jsonb_agg(to_jsonb(n) ORDER BY n.id) INTO succeeded
    FROM new_rows AS n
    JOIN old_rows AS o ON o.id = n.id
    WHERE n.status = 'succeeded' AND o.status IS DISTINCT FROM 'succeeded';
    IF succeeded IS NOT NULL THEN
        PERFORM outbox.ledger_post(succeeded, outbox.audit_actor());
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER payment_intents_ledger
    AFTER UPDATE ON outbox.payment_intents
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION outbox.payment_intents_post_ledger();

CREATE TRIGGER ledger_transactions_append_only
    BEFORE UPDATE OR DELETE ON outbox.ledger_transactions
    FOR EACH ROW EXECUTE FUNCTION outbox.refuse_change();
CREATE TRIGGER ledger_transactions_no_truncate
    BEFORE TRUNCATE ON outbox.ledger_transactions
    FOR EACH STATEMENT EXECUTE FUNCTION outbox.refuse_change();
CREATE TRIGGER ledger_entries_append_only
    BEFORE UPDATE OR DELETE ON outbox.ledger_entries
    FOR EACH ROW EXECUTE FUNCTION outbox.refuse_change();
CREATE TRIGGER ledger_entries_no_truncate
    BEFORE TRUNCATE ON outbox.ledger_entries
    FOR EACH STATEMENT EXECUTE FUNCTION outbox.refuse_change();

-- Intents that succeeded before this migration are posted now, oldest first.
SELECT outbox.ledger_post(jsonb_agg(to_jsonb(s) ORDER BY s.id), 'db:' || current_user)
FROM (
    SELECT id, payment_id, action, provider, currency, amount_applied_minor, provider_reference
    FROM outbox.payment_intents WHERE status = 'succeeded'
    UNION ALL
    SELECT id, payment_id, action, provider, currency, amount_applied_minor, provider_reference
    FROM outbox.payment_intents_archive WHERE status = 'succeeded'
) AS s
HAVING count(*) > 0;

-- ==========================================================================================
-- Idempotency-key lifetime guard and the janitor
-- ==========================================================================================
--
-- A provider forgets an idempotency key after a while (Stripe: at least 24 hours). An
-- intent first sent longer ago than that must not be sent again under its key: if the
-- first attempt took effect and the key is gone, a retry would take effect twice. The
-- trigger below parks such an intent `dead` (error_code idempotency_key_expired) at the
-- moment it would be retried or claimed again; the janitor then settles it by a lookup.

CREATE TABLE outbox.provider_policies (
    provider                  text PRIMARY KEY,  -- '*' is the default for every provider
    idempotency_key_lifetime  interval NOT NULL
        CONSTRAINT provider_policies_lifetime_at_least_an_hour CHECK (idempotency_key_lifetime >= interval '1 hour')
);
INSERT INTO outbox.provider_policies VALUES ('*', interval '24 hours');

COMMENT ON TABLE outbox.provider_policies IS
    'Per-provider facts the database enforces. idempotency_key_lifetime: how long the provider '
    'deduplicates a key (Stripe: 24 hours); ''*'' applies to providers without a row.';

CREATE FUNCTION outbox.idempotency_key_lifetime(p_provider text) RETURNS interval
LANGUAGE sql STABLE AS $$
    SELECT coalesce(
        (SELECT idempotency_key_lifetime FROM outbox.provider_policies WHERE provider = p_provider),
        (SELECT idempotency_key_lifetime FROM outbox.provider_policies WHERE provider = '*'),
        interval '24 hours')
$$;

CREATE FUNCTION outbox.payment_intents_key_lifetime_guard() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    lifetime interval := outbox.idempotency_key_lifetime(NEW.provider);
BEGIN
    IF OLD.created_at >= now() - lifetime THEN
        RETURN NEW;
    END IF;
    NEW.status := 'dead';
    NEW.attempts := OLD.attempts;
    NEW.lease_token := NULL;
    NEW.lease_expires_at := NULL;
    NEW.claimed_by := NULL;
    NEW.available_at := OLD.available_at;
    NEW.completed_at := now();
    NEW.error_code := 'idempotency_key_expired';
    NEW.error_message := format(
        'created more than %s ago and already sent %s time(s): the provider may have forgotten '
        'its idempotency key, so it is not sent again; the janitor settles it by a lookup',
        lifetime, OLD.attempts);
    RETURN NEW;
END;
$$;

-- Fires only when an intent that was already sent would go out again: a claim
-- (pending -> in_flight) or a retry, lease expiry or hand-back (in_flight -> pending).
-- The WHEN clause keeps it off the hot path (nothing younger than an hour qualifies).
CREATE TRIGGER payment_intents_key_lifetime
    BEFORE UPDATE OF status ON outbox.payment_intents
    FOR EACH ROW
    WHEN (OLD.status IN ('pending', 'in_flight') AND NEW.status IN ('pending', 'in_flight')
          AND OLD.status <> NEW.status
          AND OLD.attempts > 0 AND NEW.attempts > 0
          AND OLD.created_at < now() - interval '1 hour')
    EXECUTE FUNCTION outbox.payment_intents_key_lifetime_guard();

-- The janitor's scan over dead intents stays small however large the hot table grows.
CREATE INDEX payment_intents_dead_idx ON outbox.payment_intents (id) WHERE status = 'dead';

-- One row per dead intent the janitor has looked at: its lookup schedule and result.
CREATE TABLE outbox.janitor_checks (
    intent_id        bigint PRIMARY KEY,
    payment_id       text NOT NULL,
    provider         text NOT NULL,
    -- the intent's completed_at when it died; a later death (after a re-drive) starts over
    dead_at          timestamptz,
    checks           integer NOT NULL DEFAULT 0,
    not_found        integer NOT NULL DEFAULT 0,
    result           text
        CONSTRAINT janitor_checks_result_valid CHECK (result IN (
            'settled_succeeded', 'settled_failed', 'no_effect', 'not_found_yet',
            'lookup_failed', 'not_settleable')),
    detail           text,
    next_check_at    timestamptz NOT NULL DEFAULT now(),
    last_checked_at  timestamptz,
    settled_at       timestamptz
);
CREATE INDEX janitor_checks_due_idx ON outbox.janitor_checks (next_check_at) WHERE settled_at IS NULL;

COMMENT ON COLUMN outbox.janitor_checks.result IS
    'settled_succeeded / settled_failed: the provider showed the effect or a decline, the intent was settled; '
    'no_effect: several lookups found no trace, safe to re-drive; not_found_yet: looked, nothing yet, '
    'checked again later; lookup_failed: the lookup itself failed, retried on the backoff schedule; '
    'not_settleable: the payment no longer allows the command (an operator decides).';

CREATE TRIGGER janitor_checks_audit
    AFTER INSERT OR UPDATE ON outbox.janitor_checks
    FOR EACH ROW EXECUTE FUNCTION outbox.audit_generic(
        'janitor_check', 'intent_id', 'intent_id,payment_id,provider,checks,not_found,result,detail,settled_at');

-- ==========================================================================================
-- Reconciliation
-- ==========================================================================================

CREATE TABLE outbox.reconciliation_runs (
    id                  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    provider            text NOT NULL,
    window_start        timestamptz NOT NULL,
    window_end          timestamptz NOT NULL,
    status              text NOT NULL DEFAULT 'running'
        CONSTRAINT reconciliation_runs_status_valid CHECK (status IN ('running', 'finished', 'failed')),
    started_at          timestamptz NOT NULL DEFAULT now(),
    finished_at         timestamptz,
    run_by              text NOT NULL DEFAULT outbox.audit_actor(),
    provider_items      integer,
    internal_items      integer,
    matched             integer,
    exceptions_found    integer,
    exceptions_new      integer,
    exceptions_cleared  integer,
    CONSTRAINT reconciliation_runs_window_ordered CHECK (window_start < window_end)
);

CREATE TABLE outbox.reconciliation_exceptions (
    id                       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    provider                 text NOT NULL,
    kind                     text NOT NULL
        CONSTRAINT reconciliation_exceptions_kind_valid CHECK (kind IN (
            'missing_internal', 'missing_at_provider', 'amount_mismatch',
            'currency_mismatch', 'status_mismatch', 'unexpected_fee')),
    -- what the exception is about: the provider object (pi_..., re_...) or balance transaction
    match_key                text NOT NULL,
    payment_id               text,
    ledger_transaction_id    bigint,
    provider_transaction_id  text,
    currency                 text,
    internal_amount_minor    bigint,
    provider_amount_minor    bigint,
    fee_minor                bigint,
    expected_fee_minor       bigint,
    -- provider minus internal (for unexpected_fee: fee minus expected fee)
    delta_minor              bigint NOT NULL DEFAULT 0,
    detail                   text NOT NULL,
    occurred_at              timestamptz NOT NULL,
    status                   text NOT NULL DEFAULT 'open'
        CONSTRAINT reconciliation_exceptions_status_valid CHECK (status IN (
            'open', 'awaiting_approval', 'accepted', 'resolved', 'cleared')),
    first_run_id             bigint NOT NULL REFERENCES outbox.reconciliation_runs (id),
    last_run_id              bigint NOT NULL REFERENCES outbox.reconciliation_runs (id),
    times_seen               integer NOT NULL DEFAULT 1,
    resolution               text,
    resolution_reason        text,
    resolved_by              text,
    resolved_at              timestamptz,
    -- Re-running a window finds the same exception again instead of a second one.
    CONSTRAINT reconciliation_exceptions_once UNIQUE (provider, kind, match_key)
);
CREATE INDEX reconciliation_exceptions_open_idx
    ON outbox.reconciliation_exceptions (provider, occurred_at) WHERE status IN ('open', 'awaiting_approval');

-- Money-moving commands on an exception wait here for a second, different operator.
CREATE TABLE outbox.reconciliation_actions (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    exception_id    bigint NOT NULL REFERENCES outbox.reconciliation_exceptions (id),
    payment_id      text,
    action          text NOT NULL
        CONSTRAINT reconciliation_actions_action_valid CHECK (action IN ('refund', 'void', 'redrive')),
    amount_minor    bigint CONSTRAINT reconciliation_actions_amount_positive CHECK (amount_minor > 0),
    reason          text NOT NULL CONSTRAINT reconciliation_actions_reason_given CHECK (reason ~ '\S'),
    requested_by    text NOT NULL,
    requested_at    timestamptz NOT NULL DEFAULT now(),
    approved_by     text,
    approved_at     timestamptz,
    status          text NOT NULL DEFAULT 'awaiting_approval'
        CONSTRAINT reconciliation_actions_status_valid CHECK (status IN ('awaiting_approval', 'executed')),
    intent_id       bigint,
    -- Four eyes, enforced where no client can skip it.
    CONSTRAINT reconciliation_actions_second_approver CHECK (approved_by IS NULL OR approved_by <> requested_by),
    CONSTRAINT reconciliation_actions_executed_approved CHECK (status <> 'executed' OR approved_by IS NOT NULL)
);

CREATE TRIGGER reconciliation_runs_audit
    AFTER INSERT OR UPDATE ON outbox.reconciliation_runs
    FOR EACH ROW EXECUTE FUNCTION outbox.audit_generic(
        'reconciliation_run', 'id',
        'id,provider,window_start,window_end,status,run_by,provider_items,internal_items,matched,'
        'exceptions_found,exceptions_new,exceptions_cleared');
CREATE TRIGGER reconciliation_exceptions_audit
    AFTER INSERT OR UPDATE ON outbox.reconciliation_exceptions
    FOR EACH ROW EXECUTE FUNCTION outbox.audit_generic(
        'reconciliation_exception', 'id',
        'id,provider,kind,match_key,payment_id,ledger_transaction_id,provider_transaction_id,'
        'currency,internal_amount_minor,provider_amount_minor,fee_minor,expected_fee_minor,'
        'delta_minor,detail,status,last_run_id,times_seen,resolution,resolution_reason,resolved_by');
CREATE TRIGGER reconciliation_actions_audit
    AFTER INSERT OR UPDATE ON outbox.reconciliation_actions
    FOR EACH ROW EXECUTE FUNCTION outbox.audit_generic(
        'reconciliation_action', 'id',
        'id,exception_id,payment_id,action,amount_minor,reason,requested_by,approved_by,status,intent_id');

-- What is still unexplained, per provider, currency and class: for metrics and dashboards.
CREATE VIEW outbox.reconciliation_open_delta AS
SELECT provider, coalesce(currency, '-') AS currency, kind,
       count(*) AS exceptions,
       sum(abs(delta_minor))::bigint AS delta_minor
FROM outbox.reconciliation_exceptions
WHERE status IN ('open', 'awaiting_approval')
GROUP BY provider, coalesce(currency, '-'), kind;

-- ==========================================================================================
-- Privileges
-- ==========================================================================================
-- Nobody, the owner included, keeps UPDATE, DELETE or TRUNCATE on the append-only tables
-- (the triggers above refuse them too). Grant SELECT to auditors as your roles require.
REVOKE UPDATE, DELETE, TRUNCATE ON outbox.audit_log, outbox.ledger_transactions,
    outbox.ledger_entries FROM PUBLIC, CURRENT_USER;
