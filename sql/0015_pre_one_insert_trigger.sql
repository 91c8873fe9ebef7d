-- The application's INSERT: one trigger call for every insert-time rule, cheaper regular
-- expressions, no foreign-key lock on the currency, and the creation's audit rows in one
-- statement. The rules, their names, their messages and the rows written are unchanged.
--
-- Measured with benchmarks/insert_cost.py (docs/performance.md): each trigger of a row costs
-- the INSERT more than its checks do. Before this migration an INSERT ran six BEFORE ROW
-- triggers (four guards with WHEN clauses, the archived-key check, the core), two AFTER ROW
-- audit triggers and an AFTER STATEMENT NOTIFY trigger; a WHEN clause is prepared again for
-- every statement, and the core trigger's lookups were planned again for every row. Now:
--
-- * payment_intents_before_insert is the one BEFORE INSERT trigger. In this order, as the
--   triggers' name order had it: the input guards of sql/0009, 0011, 0013 and the
--   traceparent rule (outbox.payment_intents_check_input, entered only when the old WHEN
--   clauses, now outbox.payment_intents_may_break_input_rules, say the row may break
--   one), the archived-key rule, then the core (the payment's
--   row and position, the order, the key) and the wake-up NOTIFY. PostgreSQL delivers one
--   notification per transaction for identical ones, so notifying per row still wakes a
--   relay once per committing transaction (it was once per statement). Its statements run
--   with generic plans: a custom plan per row cost about 50 us.
-- * An UPDATE of a checked column runs the same guards, behind the same test, through
--   payment_intents_0_input_guard (the relay cannot update those columns: its write-backs
--   never fire it).
-- * The currency's existence is checked in the payments upsert's own statement, which
--   replaces the foreign key payments.currency -> currencies.code: the key took a KEY SHARE
--   lock on the currency's row at every new payment, and concurrent payments in one
--   currency turned that into a MultiXact per commit. outbox.currencies now refuses to
--   delete (or rename) a code some payment uses, under the old constraint's name, and a
--   payment's currency cannot change.
-- * An intent's creation and, for a payment's first intent, the payment's creation are
--   written to the audit trail by one statement of payment_intents_audit_insert (the
--   payment's row first, as before). payments_audit_insert now audits only a payments row
--   inserted outside the intent trigger (by hand, as the schema owner).
-- * Bounded repetitions in regular expressions (`{3,255}`) cost 15 to 30 us a match in
--   PostgreSQL: the CHECKs on payment_method, idempotency_key and provider, and on events'
--   exchange and event_type, state the same rules as a class match and a length test. They
--   keep their names; ADD CONSTRAINT checks the stored rows again (a scan of the hot table
--   and of events under an exclusive lock: 0.7 s for a million intents on a 2-core VM).

-- 1. Cheaper regular expressions, same rules and names ---------------------------------------

ALTER TABLE outbox.payment_intents
    DROP CONSTRAINT payment_intents_payment_method_token_format,
    ADD CONSTRAINT payment_intents_payment_method_token_format
        CHECK (payment_method ~ '^[A-Za-z0-9_]+$' AND length(payment_method) BETWEEN 3 AND 255),
    DROP CONSTRAINT payment_intents_idempotency_key_printable_max_255,
    ADD CONSTRAINT payment_intents_idempotency_key_printable_max_255
        CHECK (idempotency_key ~ '^[!-~]+$' AND length(idempotency_key) <= 255),
    DROP CONSTRAINT payment_intents_provider_lowercase_identifier,
    ADD CONSTRAINT payment_intents_provider_lowercase_identifier
        CHECK (provider ~ '^[a-z][a-z0-9_]*$' AND length(provider) <= 63);

ALTER TABLE outbox.events
    DROP CONSTRAINT events_exchange_name_format,
    ADD CONSTRAINT events_exchange_name_format
        CHECK (exchange ~ '^[A-Za-z0-9_.:-]+$' AND length(exchange) <= 255),
    DROP CONSTRAINT events_event_type_format,
    ADD CONSTRAINT events_event_type_format
        CHECK (event_type ~ '^[!-~]+$' AND length(event_type) <= 255);

-- 2. The input guards as one function of the row --------------------------------------------

-- True when a row may break an input rule: the old guard triggers' WHEN clauses in one
-- expression, a superset of what the refusals below refuse (cheap enough for every row,
-- which the refusals are not). SQL, so the planner inlines it into the insert trigger's
-- test and the UPDATE trigger's WHEN clause.
CREATE FUNCTION outbox.payment_intents_may_break_input_rules(i outbox.payment_intents) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT i.amount_minor >= 1000000000000
        OR pg_column_size(i.metadata) > 16384
        OR length(i.payment_id) > 200
        OR concat_ws(E'\x01', i.payment_id, i.action, i.provider, i.currency,
                     i.idempotency_key, i.metadata::text) ~ '[0-9](?:[ -]?[0-9]){12}'
        OR i.payment_id ~ '[\x01-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]'
        OR jsonb_path_exists(i.metadata, 'strict $.**{33}')
        OR NOT (i.payment_method ~ '^[A-Za-z0-9_]+$' AND length(i.payment_method) BETWEEN 3 AND 255)
        OR translate(i.payment_method, '_', '') ~ '[0-9]{13}'
        OR (i.metadata ? 'traceparent'
            AND NOT (jsonb_typeof(i.metadata -> 'traceparent') = 'string'
                     AND outbox.is_valid_traceparent(i.metadata ->> 'traceparent')))
$$;
REVOKE ALL ON FUNCTION outbox.payment_intents_may_break_input_rules(outbox.payment_intents) FROM PUBLIC;

-- Every rule an application's column values must pass, in the order the guard triggers
-- fired: amount, hostile input (sizes, card numbers, control characters, depth),
-- payment_method, traceparent. Called only for a row that may break one.
CREATE FUNCTION outbox.payment_intents_check_input(i outbox.payment_intents) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF i.amount_minor >= 1000000000000 THEN
        RAISE EXCEPTION USING
            ERRCODE = 'check_violation',
            SCHEMA = 'outbox', TABLE = 'payment_intents', COLUMN = 'amount_minor',
            CONSTRAINT = 'payment_intents_amount_minor_max_12_digits',
            MESSAGE = 'payment_intents.amount_minor has more than 12 digits; amounts are in minor '
                      'units below 1,000,000,000,000 (the value was not stored)',
            HINT = 'Send the amount in minor units of the currency, e.g. 1999 for EUR 19.99.';
    END IF;
    PERFORM outbox.payment_intents_refuse_hostile_input(i);
    PERFORM outbox.payment_intents_refuse_payment_method(i);
    IF jsonb_typeof(i.metadata) = 'object' AND i.metadata ? 'traceparent' AND NOT (
        jsonb_typeof(i.metadata -> 'traceparent') = 'string'
        AND outbox.is_valid_traceparent(i.metadata ->> 'traceparent')
    ) THEN
        RAISE EXCEPTION USING
            ERRCODE = 'check_violation',
            SCHEMA = 'outbox', TABLE = 'payment_intents', COLUMN = 'metadata',
            CONSTRAINT = 'payment_intents_traceparent_w3c',
            MESSAGE = 'payment_intents.metadata.traceparent is not a W3C traceparent (value withheld)',
            HINT = 'Use 00-<32 lower-case hex trace id, not all zero>-<16 hex parent id, not all zero>-<2 hex flags>, '
                   'e.g. 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01, or leave traceparent out.';
    END IF;
END;
$$;
REVOKE ALL ON FUNCTION outbox.payment_intents_check_input(outbox.payment_intents) FROM PUBLIC;

-- sql/0009's and sql/0013's refusals, as functions of the row (their messages unchanged).
CREATE FUNCTION outbox.payment_intents_refuse_hostile_input(i outbox.payment_intents) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    card_hint constant text :=
        'A card number must never be stored: tokenise it with the provider and send its token '
        '(pm_...) in payment_method; keep card data out of ids, keys and metadata.';
BEGIN
    -- Sizes first: nothing below scans a value larger than its rule allows.
    IF pg_column_size(i.metadata) > 16384 THEN
        PERFORM outbox.refuse_input('payment_intents', 'metadata', 'payment_intents_metadata_max_16kb',
            format('is %s bytes; at most 16384', pg_column_size(i.metadata)));
    END IF;
    IF length(i.payment_id) > 200 THEN
        PERFORM outbox.refuse_input('payment_intents', 'payment_id', 'payment_intents_payment_id_nonblank_max_200',
            format('is %s characters long; at most 200', length(i.payment_id)));
    END IF;
    -- Card numbers before any rule whose error could show the row.
    PERFORM outbox.refuse_card_number('payment_intents', 'payment_id', i.payment_id, card_hint);
    PERFORM outbox.refuse_card_number('payment_intents', 'action', i.action, card_hint);
    PERFORM outbox.refuse_card_number('payment_intents', 'provider', i.provider, card_hint);
    PERFORM outbox.refuse_card_number('payment_intents', 'currency', i.currency, card_hint);
    PERFORM outbox.refuse_card_number('payment_intents', 'idempotency_key', i.idempotency_key, card_hint);
    -- jsonb rendered as text: every key and every string or number value, at any depth.
    PERFORM outbox.refuse_card_number('payment_intents', 'metadata', i.metadata::text, card_hint, ' in a key or value');
    IF i.payment_id ~ '[\x01-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]' THEN
        PERFORM outbox.refuse_input('payment_intents', 'payment_id', 'payment_intents_payment_id_no_control_characters',
            'holds a control character or a bidirectional override',
            'Use printable characters; newlines, escape sequences and direction overrides forge logs.');
    END IF;
    IF outbox.jsonb_deeper_than(i.metadata, 33) THEN
        PERFORM outbox.refuse_input('payment_intents', 'metadata', 'payment_intents_metadata_max_depth_32',
            'nests deeper than 32 levels');
    END IF;
END;
$$;
REVOKE ALL ON FUNCTION outbox.payment_intents_refuse_hostile_input(outbox.payment_intents) FROM PUBLIC;

CREATE FUNCTION outbox.payment_intents_refuse_payment_method(i outbox.payment_intents) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF regexp_replace(i.payment_method, '[^A-Za-z0-9]+', '', 'g') ~ '[0-9]{13}' THEN
        PERFORM outbox.refuse_input('payment_intents', 'payment_method',
            'payment_intents_payment_method_not_card_number',
            'looks like a raw card number: 13 or more digits in a row (separators ignored), '
            'which no provider token holds; it was not stored',
            'Tokenise the card with the provider and send its token (pm_...).');
    END IF;
    IF NOT (i.payment_method ~ '^[A-Za-z0-9_]+$' AND length(i.payment_method) BETWEEN 3 AND 255) THEN
        PERFORM outbox.refuse_input('payment_intents', 'payment_method',
            'payment_intents_payment_method_token_format',
            format('is not a provider token (%s characters; a token has 3 to 255, each a letter, '
                   'a digit or _)', length(i.payment_method)),
            'Send the provider''s token for the payment method, such as pm_card_visa.');
    END IF;
END;
$$;
REVOKE ALL ON FUNCTION outbox.payment_intents_refuse_payment_method(outbox.payment_intents) FROM PUBLIC;

CREATE FUNCTION outbox.payment_intents_input_guard() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM outbox.payment_intents_check_input(NEW);
    RETURN NEW;
END;
$$;
REVOKE ALL ON FUNCTION outbox.payment_intents_input_guard() FROM PUBLIC;

DROP TRIGGER payment_intents_0_amount_bound ON outbox.payment_intents;
DROP TRIGGER payment_intents_0_hostile_input ON outbox.payment_intents;
DROP TRIGGER payment_intents_0_payment_method ON outbox.payment_intents;
DROP TRIGGER payment_intents_b_traceparent_w3c ON outbox.payment_intents;
DROP TRIGGER payment_intents_a_key_not_archived ON outbox.payment_intents;
DROP TRIGGER payment_intents_notify ON outbox.payment_intents;
DROP FUNCTION outbox.payment_intents_amount_bound();
DROP FUNCTION outbox.payment_intents_hostile_input();
DROP FUNCTION outbox.payment_intents_payment_method_guard();
DROP FUNCTION outbox.payment_intents_traceparent_check();
DROP FUNCTION outbox.payment_intents_key_not_archived();
DROP FUNCTION outbox.payment_intents_notify();

CREATE TRIGGER payment_intents_0_input_guard
    BEFORE UPDATE OF amount_minor, payment_id, action, provider, currency, idempotency_key,
                     metadata, payment_method
    ON outbox.payment_intents
    FOR EACH ROW
    WHEN (outbox.payment_intents_may_break_input_rules(NEW))
    EXECUTE FUNCTION outbox.payment_intents_input_guard();

-- 3. The one insert trigger ---------------------------------------------------------------

-- sql/0001's unknown-currency refusal, for the insert trigger's paths that find no
-- currency row (its common path reads the currency in the payment insert itself).
CREATE FUNCTION outbox.payment_intents_refuse_unknown_currency(p_code text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM outbox.currencies AS c WHERE c.code = p_code) THEN
        RAISE EXCEPTION USING
            ERRCODE = 'foreign_key_violation',
            SCHEMA = 'outbox', TABLE = 'payment_intents', COLUMN = 'currency',
            CONSTRAINT = 'payment_intents_currency_known',
            MESSAGE = format('payment_intents.currency %s is not an ISO 4217 code with minor units',
                             CASE WHEN p_code ~ '^[A-Z]{1,8}$' THEN quote_literal(p_code)
                                  ELSE '(value withheld)' END),
            HINT = 'Use a three-letter code listed in outbox.currencies, such as EUR, USD or JPY.';
    END IF;
END;
$$;
REVOKE ALL ON FUNCTION outbox.payment_intents_refuse_unknown_currency(text) FROM PUBLIC;

CREATE OR REPLACE FUNCTION outbox.payment_intents_before_insert() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    pay       outbox.payments%ROWTYPE;
    install   uuid;
BEGIN
    -- Checked first, so no later error can echo a card number back in its DETAIL.
    IF outbox.payment_intents_may_break_input_rules(NEW) THEN
        PERFORM outbox.payment_intents_check_input(NEW);
    END IF;
    -- (sql/0001's Luhn scan of payment_method is gone: sql/0013's rule, checked above,
    -- refuses every value that scan could find.)

    IF NEW.idempotency_key IS NOT NULL AND EXISTS (
        SELECT 1 FROM outbox.payment_intents_archive
        WHERE provider = NEW.provider AND idempotency_key = NEW.idempotency_key
    ) THEN
        RAISE EXCEPTION USING
            ERRCODE = 'unique_violation',
            SCHEMA = 'outbox', TABLE = 'payment_intents', COLUMN = 'idempotency_key',
            CONSTRAINT = 'payment_intents_idempotency_key_unique',
            MESSAGE = 'payment_intents.idempotency_key was already used by an archived intent of this provider',
            HINT = 'Use a new idempotency key for a new intent, or omit it to have one derived.';
    END IF;

    -- The relay owns these columns; whatever the application sent is replaced.
    NEW.status := 'pending';
    NEW.attempts := 0;
    NEW.available_at := now();
    NEW.lease_token := NULL;
    NEW.lease_expires_at := NULL;
    NEW.claimed_by := NULL;
    NEW.amount_applied_minor := NULL;
    NEW.provider_reference := NULL;
    NEW.error_code := NULL;
    NEW.error_message := NULL;
    NEW.created_at := now();
    NEW.updated_at := now();
    NEW.completed_at := NULL;

    -- NULLs and malformed values are left to the column constraints, which name them.
    IF NEW.payment_id IS NULL OR NEW.provider IS NULL OR NEW.currency IS NULL OR NEW.action IS NULL THEN
        RETURN NEW;
    END IF;

    NEW.currency := upper(NEW.currency);
    -- The payment's row gives each intent its position (payment_seq) in commit order:
    -- concurrent inserts for one payment queue on its row (or, for its first intents, on
    -- the primary key: ON CONFLICT waits for the other insert and then finds its row).
    -- Not one upsert: INSERT ... ON CONFLICT DO UPDATE fires payments' statement-level
    -- UPDATE trigger (the audit) even when it inserts. The currency is looked up in the
    -- insert's own statement, which takes its snapshot after the table lock that a
    -- currency's deletion waits for (outbox.currencies_refuse_used_code).
    LOOP
        INSERT INTO outbox.payments (payment_id, provider, currency)
        SELECT NEW.payment_id, NEW.provider, c.code
        FROM outbox.currencies AS c
        WHERE c.code = NEW.currency
        ON CONFLICT (payment_id) DO NOTHING
        RETURNING * INTO pay;
        EXIT WHEN FOUND;
        -- Nothing inserted: the payment exists, or the currency is unknown.
        UPDATE outbox.payments AS p SET next_seq = p.next_seq + 1, updated_at = now()
        WHERE p.payment_id = NEW.payment_id
        RETURNING * INTO pay;
        EXIT WHEN FOUND;
        PERFORM outbox.payment_intents_refuse_unknown_currency(NEW.currency);
        -- The row was deleted between the two statements (by hand): insert it again.
    END LOOP;

    IF pay.currency <> NEW.currency THEN
        PERFORM outbox.payment_intents_refuse_unknown_currency(NEW.currency);
        RAISE EXCEPTION USING
            ERRCODE = 'check_violation',
            SCHEMA = 'outbox', TABLE = 'payment_intents', COLUMN = 'currency',
            CONSTRAINT = 'payment_intents_currency_matches_payment',
            MESSAGE = format('payment_intents.currency %s differs from payment %s''s currency %s',
                             quote_literal(NEW.currency), quote_literal(NEW.payment_id), quote_literal(pay.currency)),
            HINT = 'Every intent of one payment_id uses the currency of its first intent.';
    END IF;
    IF pay.provider <> NEW.provider THEN
        RAISE EXCEPTION USING
            ERRCODE = 'check_violation',
            SCHEMA = 'outbox', TABLE = 'payment_intents', COLUMN = 'provider',
            CONSTRAINT = 'payment_intents_provider_matches_payment',
            MESSAGE = format('payment_intents.provider %s differs from payment %s''s provider %s',
                             quote_literal(NEW.provider), quote_literal(NEW.payment_id), quote_literal(pay.provider)),
            HINT = 'Every intent of one payment_id goes to the provider of its first intent.';
    END IF;

    NEW.payment_seq := pay.next_seq;
    -- Per-payment order: wait behind any unresolved earlier intent (dead ones included,
    -- so a dead intent stalls its own payment until an operator resolves it). A payment's
    -- first intent (its row was just created) has none.
    IF pay.next_seq > 1 AND EXISTS (
        SELECT 1 FROM outbox.payment_intents
        WHERE payment_id = NEW.payment_id AND status IN ('blocked', 'pending', 'in_flight', 'dead')
    ) THEN
        NEW.status := 'blocked';
    END IF;

    IF NEW.idempotency_key IS NULL THEN
        SELECT installation_id INTO install FROM outbox.installation;
        NEW.idempotency_key := 'outbox_' || left(encode(sha256(convert_to(
            install::text || '/' || NEW.payment_id || '/' || NEW.payment_seq::text || '/' || NEW.action,
            'UTF8')), 'hex'), 48);
    END IF;

    -- sql/0007: wake an idle relay; identical notifications of a transaction are one.
    IF coalesce((SELECT wanted FROM outbox.relay_wakeup), true) THEN
        PERFORM pg_notify('outbox_payment_intents', '');
    END IF;
    RETURN NEW;
END;
$$;

-- 4. The creation's audit rows in one statement ---------------------------------------------

-- A payment's row is created by its first intent's insert (payment_seq 1): its audit row
-- is written here, before the intent's and in the same statement, with the same actor,
-- time and reason. The payment's chain continues from its tail, as in outbox.audit_write
-- (a payment's row is never deleted, so normally there is none); an intent's id is new,
-- so its chain starts at 1 (audit_log_chain_position would refuse a second start).
CREATE OR REPLACE FUNCTION outbox.audit_payment_intent_inserted() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    v_actor     text := outbox.audit_actor();
    v_at        timestamptz := clock_timestamp();
    v_reason    text := nullif(current_setting('outbox.reason', true), '');
    v_payment   jsonb;
    v_pay_id    bigint;
    v_pay_seq   bigint;
    v_pay_prev  bytea;
BEGIN
    IF NEW.payment_seq = 1 THEN
        SELECT outbox.audit_payment_doc(p) INTO v_payment FROM outbox.payments AS p WHERE p.payment_id = NEW.payment_id;
        SELECT a.chain_seq, a.hash INTO v_pay_seq, v_pay_prev
        FROM outbox.audit_log AS a
        WHERE a.entity = 'payment' AND a.entity_id = NEW.payment_id
        ORDER BY a.chain_seq DESC LIMIT 1;
        v_pay_seq := coalesce(v_pay_seq, 0) + 1;
        v_pay_id := nextval('outbox.audit_log_id_seq');
    END IF;
    -- The intent's id is drawn after the payment's, so the payment's row comes first.
    INSERT INTO outbox.audit_log
        (id, at, actor, entity, entity_id, payment_id, operation, reason, before, after,
         chain_seq, prev_hash, hash)
    SELECT e.id, v_at, v_actor, e.entity, e.entity_id, NEW.payment_id, 'insert', v_reason,
           NULL, e.after, e.chain_seq, e.prev_hash,
           sha256(outbox.audit_canonical(e.id, v_at, v_actor, e.entity, e.entity_id,
                                         NEW.payment_id, 'insert', v_reason, NULL, e.after,
                                         e.chain_seq, e.prev_hash))
    FROM (VALUES
        (v_pay_id, 'payment', NEW.payment_id, v_payment, v_pay_seq, v_pay_prev),
        (nextval('outbox.audit_log_id_seq'), 'intent', NEW.id::text, outbox.audit_intent_doc(NEW), 1::bigint, NULL::bytea)
    ) AS e(id, entity, entity_id, after, chain_seq, prev_hash)
    WHERE e.id IS NOT NULL;
    RETURN NULL;
END;
$$;

DROP TRIGGER payments_audit_insert ON outbox.payments;
CREATE TRIGGER payments_audit_insert
    AFTER INSERT ON outbox.payments
    FOR EACH ROW
    WHEN (pg_trigger_depth() = 0)
    EXECUTE FUNCTION outbox.audit_payment_inserted();

-- 5. The currency of a payment, without the foreign key's lock ------------------------------

ALTER TABLE outbox.payments DROP CONSTRAINT payments_currency_fkey;

-- A code in use stays: deleting or renaming it waits for the payments being inserted
-- (SHARE lock against their ROW EXCLUSIVE) and is refused if any payment uses it.
-- (TRUNCATE stays refused by the ledger's foreign key and its no-truncate trigger.)
CREATE FUNCTION outbox.currencies_refuse_used_code() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND NEW.code = OLD.code THEN
        RETURN NEW;
    END IF;
    LOCK TABLE outbox.payments IN SHARE MODE;
    IF EXISTS (SELECT 1 FROM outbox.payments WHERE currency = OLD.code) THEN
        RAISE EXCEPTION USING
            ERRCODE = 'foreign_key_violation',
            SCHEMA = 'outbox', TABLE = 'currencies', COLUMN = 'code',
            CONSTRAINT = 'payments_currency_fkey',
            MESSAGE = format('currencies.code %s is used by payments; it cannot be deleted or changed',
                             quote_literal(OLD.code)),
            HINT = 'A currency that payments use stays in outbox.currencies.';
    END IF;
    RETURN CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
END;
$$;
REVOKE ALL ON FUNCTION outbox.currencies_refuse_used_code() FROM PUBLIC;

CREATE TRIGGER currencies_used_code
    BEFORE DELETE OR UPDATE OF code ON outbox.currencies
    FOR EACH ROW EXECUTE FUNCTION outbox.currencies_refuse_used_code();

CREATE FUNCTION outbox.payments_refuse_currency_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION USING
        ERRCODE = 'check_violation',
        SCHEMA = 'outbox', TABLE = 'payments', COLUMN = 'currency',
        CONSTRAINT = 'payments_currency_fixed',
        MESSAGE = format('payments.currency of payment %s cannot change (from %s to %s)',
                         quote_literal(OLD.payment_id), quote_literal(OLD.currency), quote_literal(NEW.currency)),
        HINT = 'A payment keeps the currency of its first intent.';
END;
$$;
REVOKE ALL ON FUNCTION outbox.payments_refuse_currency_change() FROM PUBLIC;

CREATE TRIGGER payments_currency_fixed
    BEFORE UPDATE OF currency ON outbox.payments
    FOR EACH ROW WHEN (NEW.currency IS DISTINCT FROM OLD.currency)
    EXECUTE FUNCTION outbox.payments_refuse_currency_change();
