-- Issue 23 goal 3: the application's INSERT does less per row, with the same rules, refusals,
-- rows and order (docs/performance.md, "sql/0086"). Measured where the trigger's time went
-- (perf of the inserting backend; a trigger's statements timed alone in a loop): each SPI
-- statement costs its executor's set-up per row, every plan node of it, and above all the
-- CHECK constraints of a table it writes, whose stored expressions PostgreSQL parses and
-- plans again for every statement (payments' seven: about 20 us of the trigger's 70 us).
--
-- * outbox.payment_intents_before_insert (restated from sql/0062, changes marked sql/0086):
--   - the pre-filter is outbox.payment_intents_may_break_input_rules(NEW), the UPDATE guard's
--     function, now with the trigger's length guard on the depth test (a document nested 33
--     deep renders at least 66 characters): one definition, and no slower than the copy;
--   - the registry's rules (sql/0050 (d)): the provider's row is read here, and
--     payment_intents_check_provider_v1 (which words the refusals) runs only for a row one
--     of them may refuse; before, every INSERT called it, and it ran two or three statements;
--   - a payment's first intent runs no statement for the earlier-intents test (the
--     `next_seq > 1 AND EXISTS` was one SPI statement for every row);
--   - the common row is tested in one expression where it took several (the relay-owned
--     columns, which an INSERT that sends none of them needs no assignment for; the
--     payment's row as expected): PL/pgSQL prepares each expression again in every
--     transaction, so with one INSERT per transaction each one costs its set-up every time;
--   - the BEFORE INSERT triggers payment_intents_fx_charge_rate (sql/0029) and
--     payment_intents_fx_guard (sql/0027) are folded in, at its end, in their order and under
--     their WHEN conditions, calling the same code as row functions: a trigger's WHEN clause
--     is parsed and prepared again for every INSERT statement, whether it fires or not.
-- * payments_state_valid, payments_dispute_status_valid and payments_awaiting_valid state
--   their lists as one array constant instead of an ARRAY[...] of constants: the same rule
--   and name, a quarter less expression text to parse at every new payment. Added NOT
--   VALID here and validated by sql/0087 (docs/developing.md).
--
-- The old trigger functions payment_intents_fx_charge_rate() and payment_intents_fx_guard()
-- stay (unused) until a _post_ file drops them.

CREATE OR REPLACE FUNCTION outbox.payment_intents_may_break_input_rules(i outbox.payment_intents) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT i.amount_minor NOT BETWEEN -999999999999 AND 999999999999
        OR pg_column_size(i.metadata) > 16384
        OR length(i.payment_id) > 200
        OR outbox.may_hold_card_number(concat_ws('|', i.payment_id, i.action, i.provider, i.currency,
                                                 i.idempotency_key, i.metadata::text))
        OR i.payment_id ~ '[\x01-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]'
        OR (length(i.metadata::text) > 65 AND jsonb_path_exists(i.metadata, 'strict $.**{33}'))
        OR NOT (i.payment_method ~ '^[A-Za-z0-9_]+$' AND length(i.payment_method) BETWEEN 3 AND 255)
        OR translate(i.payment_method, '_', '') ~ '[0-9]{13}'
        OR (i.metadata ? 'traceparent'
            AND NOT (jsonb_typeof(i.metadata -> 'traceparent') = 'string'
                     AND outbox.is_valid_traceparent(i.metadata ->> 'traceparent')))
$$;

-- sql/0029's payment_intents_fx_charge_rate() as a row function: a refund of a converted
-- charge (the refund names no conversion) takes the charge's rates.
CREATE FUNCTION outbox.payment_intents_fx_charge_rate_v1(i outbox.payment_intents)
RETURNS outbox.payment_intents
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    charge record;
BEGIN
    -- SELECT INTO, not :=, so that no converted charge is a row of NULLs.
    SELECT * INTO charge FROM outbox.fx_charge_conversion(i.payment_id);
    IF charge.fx_rate_id IS NOT NULL AND charge.original_currency <> i.currency THEN
        i.original_currency := charge.original_currency;
        i.fx_rate_id := charge.fx_rate_id;
        i.fx_via_rate_id := charge.fx_via_rate_id;
        i.original_amount_minor := outbox.fx_back_at_charge_rate(
            i.amount_minor, i.currency, charge.original_currency, charge.fx_rate_id,
            charge.fx_via_rate_id);
    END IF;
    RETURN i;
END;
$$;

-- sql/0029's payment_intents_fx_guard() as a row function: a conversion given with the
-- intent is complete, in known currencies, and what its rates give.
CREATE FUNCTION outbox.payment_intents_fx_guard_v1(i outbox.payment_intents)
RETURNS outbox.payment_intents
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    expected bigint;
BEGIN
    IF i.original_amount_minor IS NULL OR i.original_currency IS NULL
       OR i.fx_rate_id IS NULL THEN
        PERFORM outbox.refuse_input('payment_intents', 'fx_rate_id', 'payment_intents_fx_all_or_none',
            'comes with original_amount_minor, original_currency and fx_rate_id: all three or none',
            'Send the three together, from outbox.convert_v1''s result, or none of them.');
    END IF;
    IF i.original_amount_minor <= 0 THEN
        PERFORM outbox.refuse_input('payment_intents', 'original_amount_minor',
            'payment_intents_original_amount_positive', 'is not positive');
    END IF;
    i.original_currency := upper(i.original_currency);
    IF NOT EXISTS (SELECT 1 FROM outbox.currencies WHERE code = i.original_currency) THEN
        PERFORM outbox.refuse_input('payment_intents', 'original_currency',
            'payment_intents_original_currency_known',
            'is not an ISO 4217 code with minor units',
            'Use a three-letter code listed in outbox.currencies, such as EUR, USD or JPY.');
    END IF;
    IF i.original_currency = i.currency THEN
        PERFORM outbox.refuse_input('payment_intents', 'original_currency',
            'payment_intents_original_currency_differs',
            'equals currency: nothing was converted',
            'Leave original_amount_minor, original_currency and fx_rate_id out.');
    END IF;
    IF i.amount_minor IS NULL THEN
        PERFORM outbox.refuse_input('payment_intents', 'amount_minor',
            'payment_intents_fx_amount_matches_rate',
            'is missing while original_amount_minor is given');
    END IF;
    IF i.action = 'refund' THEN
        expected := outbox.fx_back_at_charge_rate(i.amount_minor, i.currency,
                                                  i.original_currency, i.fx_rate_id,
                                                  i.fx_via_rate_id);
        IF expected <> i.original_amount_minor THEN
            RAISE EXCEPTION USING
                ERRCODE = 'check_violation',
                SCHEMA = 'outbox', TABLE = 'payment_intents', COLUMN = 'original_amount_minor',
                CONSTRAINT = 'payment_intents_fx_amount_matches_rate',
                MESSAGE = format('payment_intents.original_amount_minor %s is not what rate %s%s '
                                 'gives for the refund of %s minor units of %s: %s minor units of %s',
                                 i.original_amount_minor, i.fx_rate_id,
                                 coalesce(' (via ' || i.fx_via_rate_id || ')', ''),
                                 i.amount_minor, i.currency, expected, i.original_currency),
                HINT = 'Leave the conversion out of a refund: it takes the charge''s rate.';
        END IF;
        RETURN i;
    END IF;
    expected := outbox.convert_at_rates_v1(i.original_amount_minor, i.original_currency,
                                          i.currency, i.fx_rate_id, i.fx_via_rate_id);
    IF expected <> i.amount_minor THEN
        RAISE EXCEPTION USING
            ERRCODE = 'check_violation',
            SCHEMA = 'outbox', TABLE = 'payment_intents', COLUMN = 'amount_minor',
            CONSTRAINT = 'payment_intents_fx_amount_matches_rate',
            MESSAGE = format('payment_intents.amount_minor %s is not what rate %s%s gives for '
                             '%s minor units of %s: %s minor units of %s',
                             i.amount_minor, i.fx_rate_id,
                             coalesce(' (via ' || i.fx_via_rate_id || ')', ''),
                             i.original_amount_minor, i.original_currency, expected,
                             i.currency),
            HINT = 'Take amount_minor and the rate ids from one call of outbox.convert_v1.';
    END IF;
    RETURN i;
END;
$$;

CREATE OR REPLACE FUNCTION outbox.payment_intents_before_insert() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    pay       outbox.payments%ROWTYPE;
    wanted    boolean;
    archived  boolean;
    install   uuid;
    route_rule    bigint;   -- sql/0050 (a)
    route_version integer;
    checked       outbox.payment_intents;  -- sql/0050 (e)
    prov_enabled    boolean;   -- sql/0086
    prov_currencies text[];
    prov_limits     jsonb;
    prov_unit_rule  boolean;   -- a unit rule of its kind governs this currency's amounts
BEGIN
  -- sql/0086: the NULL case below leaves this block, so the conversion rules at the end
  -- run for every row, as the two triggers they were did.
  <<checks>>
  BEGIN
    -- Every rule that must refuse at INSERT: a row that may break one (or may hold card
    -- data) is checked rule by rule, each refusal named and showing no value, before any
    -- table constraint could echo the row in its DETAIL. sql/0086: the pre-filter is the
    -- UPDATE guard's (one definition).
    IF outbox.payment_intents_may_break_input_rules(NEW) THEN
        -- sql/0050 (e): an intent that leaves provider empty for the routing rules (below)
        -- is checked as if it named one, so that no NOT NULL refusal of provider comes first.
        checked := NEW;
        IF checked.provider IS NULL AND checked.payment_id IS NOT NULL
           AND checked.currency IS NOT NULL AND checked.action IS NOT NULL THEN
            checked.provider := 'routed';
        END IF;
        PERFORM outbox.payment_intents_check_input(checked);
    END IF;

    -- The relay owns these columns; whatever the application sent is replaced. sql/0086:
    -- tested in one expression first, so that a row that sent none of them (its defaults
    -- hold these values) costs one expression, not thirteen assignments.
    IF NEW.status IS DISTINCT FROM 'pending' OR NEW.attempts IS DISTINCT FROM 0
       OR NEW.available_at IS DISTINCT FROM now() OR NEW.lease_token IS NOT NULL
       OR NEW.lease_expires_at IS NOT NULL OR NEW.claimed_by IS NOT NULL
       OR NEW.amount_applied_minor IS NOT NULL OR NEW.provider_reference IS NOT NULL
       OR NEW.error_code IS NOT NULL OR NEW.error_message IS NOT NULL
       OR NEW.created_at IS DISTINCT FROM now() OR NEW.updated_at IS DISTINCT FROM now()
       OR NEW.completed_at IS NOT NULL THEN
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
    END IF;
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
        EXIT checks;
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
    -- sql/0086: the common row (a key no archived intent used, the payment's row written
    -- or created, its provider and currency) tested in one expression.
    IF archived OR pay.next_seq IS NULL OR pay.currency IS DISTINCT FROM NEW.currency
       OR pay.provider IS DISTINCT FROM NEW.provider THEN
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
    END IF;

    -- sql/0050 (d): the registry's rules (a payment's first intent: next_seq 1). sql/0086:
    -- what they read is read here, in one statement for a registered provider; the
    -- function that applies them (and words the refusal) runs only for a row one of them
    -- may refuse: an unregistered provider while the registry is in use, a disabled one,
    -- a currency or amount outside its lists, or an amount its unit rule must check.
    SELECT p.enabled, p.currencies, p.amount_limits,
           NEW.amount_minor IS NOT NULL AND EXISTS (
               SELECT 1 FROM outbox.provider_unit_rules AS r
               WHERE r.kind = p.kind AND r.currency = NEW.currency)
    INTO prov_enabled, prov_currencies, prov_limits, prov_unit_rule
    FROM outbox.providers AS p
    WHERE p.name = NEW.provider;
    IF NOT FOUND THEN
        IF pay.next_seq = 1 THEN
            IF EXISTS (SELECT 1 FROM outbox.providers) THEN
                PERFORM outbox.payment_intents_check_provider_v1(NEW, true);
            END IF;
        END IF;
    ELSIF prov_unit_rule
          OR (pay.next_seq = 1
              AND (NOT prov_enabled
                   OR (prov_currencies IS NOT NULL AND NOT NEW.currency = ANY (prov_currencies))
                   OR (NEW.amount_minor IS NOT NULL AND prov_limits ? NEW.currency
                       AND (NEW.amount_minor < (prov_limits -> NEW.currency ->> 'min')::bigint
                            OR NEW.amount_minor > (prov_limits -> NEW.currency ->> 'max')::bigint)))
             ) IS NOT FALSE THEN
        PERFORM outbox.payment_intents_check_provider_v1(NEW, pay.next_seq = 1);
    END IF;

    NEW.payment_seq := pay.next_seq;
    -- Per-payment order: wait behind any unresolved earlier intent (dead ones included).
    -- A payment's first intent (its row was just created) has none.
    IF pay.next_seq > 1 THEN
        IF EXISTS (
            SELECT 1 FROM outbox.payment_intents
            WHERE payment_id = NEW.payment_id AND status IN ('blocked', 'pending', 'in_flight', 'dead')
        ) THEN
            NEW.status := 'blocked';
        END IF;
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
  END checks;

    -- sql/0086: what the BEFORE INSERT triggers payment_intents_fx_charge_rate (sql/0029)
    -- and payment_intents_fx_guard (sql/0027) did after this one, in their order and under
    -- their WHEN conditions (a trigger's WHEN is prepared again for every statement).
    IF NEW.action = 'refund' OR NEW.original_amount_minor IS NOT NULL
       OR NEW.original_currency IS NOT NULL OR NEW.fx_rate_id IS NOT NULL
       OR NEW.fx_via_rate_id IS NOT NULL THEN
        IF NEW.action = 'refund' AND NEW.amount_minor IS NOT NULL AND NEW.original_amount_minor IS NULL
           AND NEW.original_currency IS NULL AND NEW.fx_rate_id IS NULL AND NEW.fx_via_rate_id IS NULL THEN
            NEW := outbox.payment_intents_fx_charge_rate_v1(NEW);
        END IF;
        IF NEW.original_amount_minor IS NOT NULL OR NEW.original_currency IS NOT NULL
           OR NEW.fx_rate_id IS NOT NULL OR NEW.fx_via_rate_id IS NOT NULL THEN
            NEW := outbox.payment_intents_fx_guard_v1(NEW);
        END IF;
    END IF;
    RETURN NEW;
END;
$$;

-- Only the insert trigger (running as the owner) calls them.
REVOKE ALL ON FUNCTION outbox.payment_intents_fx_charge_rate_v1(outbox.payment_intents) FROM PUBLIC;
REVOKE ALL ON FUNCTION outbox.payment_intents_fx_guard_v1(outbox.payment_intents) FROM PUBLIC;

DROP TRIGGER payment_intents_fx_charge_rate ON outbox.payment_intents;
DROP TRIGGER payment_intents_fx_guard ON outbox.payment_intents;

ALTER TABLE outbox.payments
    DROP CONSTRAINT payments_state_valid,
    DROP CONSTRAINT payments_dispute_status_valid,
    DROP CONSTRAINT payments_awaiting_valid;
ALTER TABLE outbox.payments
    ADD CONSTRAINT payments_state_valid
        CHECK (state = ANY ('{new,authorized,captured,partially_refunded,refunded,voided,failed}'::text[]))
        NOT VALID,
    ADD CONSTRAINT payments_dispute_status_valid
        CHECK (dispute_status = ANY ('{open,won,lost}'::text[])) NOT VALID,
    ADD CONSTRAINT payments_awaiting_valid
        CHECK (awaiting_action IS NULL AND awaiting_minor = 0
               OR awaiting_action = ANY ('{authorize,capture,charge,void,refund}'::text[])
                  AND awaiting_minor >= 0)
        NOT VALID;

COMMENT ON FUNCTION outbox.payment_intents_check_provider_v1(outbox.payment_intents, boolean) IS
    'The registry''s rules at INSERT (sql/0050): registered, enabled, currency and limits for a '
    'payment''s first intent; a representable amount for every intent. Since sql/0086 '
    'payment_intents_before_insert reads the provider''s row itself and calls this only when '
    'one of these rules may refuse the row; this function words every refusal.';
