-- A negative amount of 13 or more digits went past the INSERT's pre-filter (it tested
-- amount_minor >= 1,000,000,000,000 only): with another column NULL, the NOT NULL refusal's
-- DETAIL then echoed the row, and a 16-digit amount such as -1146450391457058 passes Luhn,
-- so the error text held a card-like number (found by tests/test_hostile_input.py's
-- hypothesis run). Both copies of the pre-filter (the INSERT trigger's, and the UPDATE
-- guard's payment_intents_may_break_input_rules) now send any amount of 13 or more digits,
-- either sign, through the named rules first. The trigger is restated from sql/0050 with
-- that one change.

CREATE OR REPLACE FUNCTION outbox.payment_intents_may_break_input_rules(i outbox.payment_intents) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT i.amount_minor NOT BETWEEN -999999999999 AND 999999999999
        OR pg_column_size(i.metadata) > 16384
        OR length(i.payment_id) > 200
        OR outbox.may_hold_card_number(concat_ws('|', i.payment_id, i.action, i.provider, i.currency,
                                                 i.idempotency_key, i.metadata::text))
        OR i.payment_id ~ '[\x01-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]'
        OR jsonb_path_exists(i.metadata, 'strict $.**{33}')
        OR NOT (i.payment_method ~ '^[A-Za-z0-9_]+$' AND length(i.payment_method) BETWEEN 3 AND 255)
        OR translate(i.payment_method, '_', '') ~ '[0-9]{13}'
        OR (i.metadata ? 'traceparent'
            AND NOT (jsonb_typeof(i.metadata -> 'traceparent') = 'string'
                     AND outbox.is_valid_traceparent(i.metadata ->> 'traceparent')))
$$;

CREATE OR REPLACE FUNCTION outbox.payment_intents_before_insert() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    pay       outbox.payments%ROWTYPE;
    meta      text := NEW.metadata::text;
    wanted    boolean;
    archived  boolean;
    install   uuid;
    route_rule    bigint;   -- sql/0050 (a)
    route_version integer;
    checked       outbox.payment_intents;  -- sql/0050 (e)
BEGIN
    -- Every rule that must refuse at INSERT, on the row's text built once. A row that may
    -- break one (or may hold card data) is checked rule by rule, each refusal named and
    -- showing no value, before any table constraint could echo the row in its DETAIL.
    -- (A document nested 33 deep renders at least 66 characters: the depth test runs only
    -- for such text. '|' is no separator: digits of two columns never join.)
    IF NEW.amount_minor NOT BETWEEN -999999999999 AND 999999999999
       OR pg_column_size(NEW.metadata) > 16384
       OR length(NEW.payment_id) > 200
       OR outbox.may_hold_card_number(concat_ws('|', NEW.payment_id, NEW.action, NEW.provider,
                                                NEW.currency, NEW.idempotency_key, meta))
       OR NEW.payment_id ~ '[\x01-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]'
       OR (length(meta) > 65 AND jsonb_path_exists(NEW.metadata, 'strict $.**{33}'))
       OR NOT (NEW.payment_method ~ '^[A-Za-z0-9_]+$' AND length(NEW.payment_method) BETWEEN 3 AND 255)
       OR translate(NEW.payment_method, '_', '') ~ '[0-9]{13}'
       OR (NEW.metadata ? 'traceparent'
           AND NOT (jsonb_typeof(NEW.metadata -> 'traceparent') = 'string'
                    AND outbox.is_valid_traceparent(NEW.metadata ->> 'traceparent')))
    THEN
        -- sql/0050 (e): an intent that leaves provider empty for the routing rules (below)
        -- is checked as if it named one, so that no NOT NULL refusal of provider comes first.
        checked := NEW;
        IF checked.provider IS NULL AND checked.payment_id IS NOT NULL
           AND checked.currency IS NOT NULL AND checked.action IS NOT NULL THEN
            checked.provider := 'routed';
        END IF;
        PERFORM outbox.payment_intents_check_input(checked);
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
    NEW.created_by := outbox.audit_actor();

    -- sql/0050 (b): no provider named: a later intent takes its payment's, a first intent
    -- is routed by the rules (outbox.route_payment_v1). A provider named always wins.
    IF NEW.provider IS NULL AND NEW.payment_id IS NOT NULL AND NEW.currency IS NOT NULL
       AND NEW.action IS NOT NULL THEN
        NEW.currency := upper(NEW.currency);
        SELECT r.provider, r.rule_id, r.rule_version INTO NEW.provider, route_rule, route_version
        FROM outbox.route_payment_v1(NEW) AS r;
    END IF;

    -- NULLs and malformed values are left to the column constraints, which name them.
    IF NEW.payment_id IS NULL OR NEW.provider IS NULL OR NEW.currency IS NULL OR NEW.action IS NULL THEN
        RETURN NEW;
    END IF;

    NEW.currency := upper(NEW.currency);
    -- The payment's row gives each intent its position (payment_seq) in commit order (see
    -- sql/0015): concurrent inserts for one payment queue on its row, or for its first
    -- intents on the primary key. The currency is looked up in the insert's own statement.
    -- The same statement reads the two facts every row needs: whether a relay asked to be
    -- woken (sql/0007), and whether the key was used by an archived intent.
    WITH created AS (
        INSERT INTO outbox.payments (payment_id, provider, currency, created_by,
                                     routing_rule_id, routing_rule_version)  -- sql/0050 (c)
        SELECT NEW.payment_id, NEW.provider, c.code, NEW.created_by, route_rule, route_version
        FROM outbox.currencies AS c
        WHERE c.code = NEW.currency
        ON CONFLICT (payment_id) DO NOTHING
        RETURNING next_seq, provider, currency
    )
    SELECT created.next_seq, created.provider, created.currency,
           coalesce((SELECT w.wanted FROM outbox.relay_wakeup AS w), true),
           NEW.idempotency_key IS NOT NULL AND EXISTS (
               SELECT 1 FROM outbox.payment_intents_archive AS a
               WHERE a.provider = NEW.provider AND a.idempotency_key = NEW.idempotency_key)
    INTO pay.next_seq, pay.provider, pay.currency, wanted, archived
    FROM (VALUES (1)) AS one
    LEFT JOIN created ON true;
    IF archived THEN
        RAISE EXCEPTION USING
            ERRCODE = 'unique_violation',
            SCHEMA = 'outbox', TABLE = 'payment_intents', COLUMN = 'idempotency_key',
            CONSTRAINT = 'payment_intents_idempotency_key_unique',
            MESSAGE = 'payment_intents.idempotency_key was already used by an archived intent of this provider',
            HINT = 'Use a new idempotency key for a new intent, or omit it to have one derived.';
    END IF;
    WHILE pay.next_seq IS NULL LOOP
        -- Nothing inserted: the payment exists, or the currency is unknown.
        UPDATE outbox.payments AS p SET next_seq = p.next_seq + 1, updated_at = now()
        WHERE p.payment_id = NEW.payment_id
        RETURNING p.next_seq, p.provider, p.currency INTO pay.next_seq, pay.provider, pay.currency;
        EXIT WHEN FOUND;
        PERFORM outbox.payment_intents_refuse_unknown_currency(NEW.currency);
        -- The row was deleted between the two statements (by hand): insert it again.
        INSERT INTO outbox.payments (payment_id, provider, currency, created_by,
                                     routing_rule_id, routing_rule_version)  -- sql/0050 (c)
        VALUES (NEW.payment_id, NEW.provider, NEW.currency, NEW.created_by, route_rule, route_version)
        ON CONFLICT (payment_id) DO NOTHING
        RETURNING next_seq, provider, currency INTO pay.next_seq, pay.provider, pay.currency;
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

    -- sql/0050 (d): the registry's rules (a payment's first intent: next_seq 1).
    PERFORM outbox.payment_intents_check_provider_v1(NEW, pay.next_seq = 1);

    NEW.payment_seq := pay.next_seq;
    -- Per-payment order: wait behind any unresolved earlier intent (dead ones included).
    -- A payment's first intent (its row was just created) has none.
    IF pay.next_seq > 1 AND EXISTS (
        SELECT 1 FROM outbox.payment_intents
        WHERE payment_id = NEW.payment_id AND status IN ('blocked', 'pending', 'in_flight', 'dead')
    ) THEN
        NEW.status := 'blocked';
    END IF;

    -- A derived key spells the digest's hex digits as letters (0-9 as g-p): a hex digest
    -- holds 13 decimal digits in a row about once in twelve keys, and the card rule would
    -- then find a Luhn-valid run in a value the relay stores and sends (sql/0001's form,
    -- hex, stays on the intents that have it).
    IF NEW.idempotency_key IS NULL THEN
        SELECT installation_id INTO install FROM outbox.installation;
        NEW.idempotency_key := 'outbox_' || translate(left(encode(sha256(convert_to(
            install::text || '/' || NEW.payment_id || '/' || NEW.payment_seq::text || '/' || NEW.action,
            'UTF8')), 'hex'), 48), '0123456789', 'ghijklmnop');
    END IF;

    -- sql/0007: wake an idle relay; identical notifications of a transaction are one.
    IF wanted THEN
        PERFORM pg_notify('outbox_payment_intents', '');
    END IF;
    RETURN NEW;
END;
$$;
