-- Issue 20, step 1: the provider registry, and refusals at INSERT by a named rule.
--
-- outbox.providers: every provider instance the relays may serve, by the name intents carry
-- (payment_intents.provider, RELAY_PROVIDERS__<NAME>__KIND): its kind (the adapter: stripe,
-- adyen, ...), whether it takes new payments (enabled), the currencies it accepts (NULL:
-- every currency of outbox.currencies) and per-currency amount limits for a payment's first
-- intent ({"EUR": {"min": 50, "max": 99999999}}, minor units; either bound may be left out).
-- outbox.provider_unit_rules: where a provider kind counts a currency differently from ISO
-- 4217 (the SQL twin of provider_adapters/currency_units.py; tests/test_provider_registry.py
-- fails when the two disagree).
--
-- The rules, checked by the INSERT trigger after every input rule (the card rule first) and
-- after the payment's row is found or created (outbox.payment_intents_check_provider_v1):
--   payment_intents_provider_registered    a payment's first intent names an unregistered
--                                          provider (only while the registry is closed, below)
--   payment_intents_provider_enabled       a payment's first intent names a disabled provider
--   payment_intents_provider_currency      ... a currency the provider does not accept
--   payment_intents_amount_within_provider_limits
--                                          ... an amount outside the provider's limits
--   payment_intents_amount_representable   any intent with an amount the provider's units
--                                          cannot represent (Stripe MGA in cents, Adyen IDR
--                                          with cents): before this rule such an intent went
--                                          dead with amount_not_representable after its claim
-- Later intents of a payment (capture, void, refund) are never refused because its provider
-- was disabled since: a payment stays with its provider to its end.
--
-- A database with no registry rows (decision, documented in docs/routing.md): an EMPTY
-- registry is OPEN, every name is accepted as before this migration (the unit rule still
-- applies to providers it knows the kind of: none). The first registered provider closes
-- it. So that closing it refuses nothing that worked before, this migration registers every
-- provider already named by a payment or a relay's report (not by outbox.provider_policies:
-- sql/0046 gives every database an 'adyen' row, which says nothing about use) (kind 'adyen' for a name starting with adyen, else 'stripe': the two adapters that exist;
-- check with `outbox-relay providers list`), and outbox.provider_set_v1 does the same when
-- it adds the first row to an empty registry.
--
-- Changes go through outbox.provider_set_v1 (the command `outbox-relay providers ...` and
-- the chart's providers job), which names the operator; every change is a hash-chained
-- audit row (entity 'provider': who, when, before, after, and why from outbox.reason).
--
-- The INSERT trigger (outbox.payment_intents_before_insert, last replaced by sql/0019) is
-- replaced with exactly these changes, so that a later replacement can carry them over:
--   a. new variables route_rule, route_version;
--   b. before the NULL test: IF NEW.provider IS NULL ... route (outbox.route_payment_v1,
--      defined as a stub here that refuses with payment_intents_provider_required; sql/0051
--      gives it its routing rules);
--   c. both INSERTs into outbox.payments also write routing_rule_id, routing_rule_version;
--   d. after the provider-matches-payment test:
--      PERFORM outbox.payment_intents_check_provider_v1(NEW, pay.next_seq = 1);
--   e. the input rules (payment_intents_check_input, only for a row that may break one) see
--      an empty provider that routing will fill as 'routed', so that the NOT NULL rule of
--      sql/0017's refuse_like_constraints does not refuse it before routing can run.

-- 1. The registry ---------------------------------------------------------------------------

CREATE TABLE outbox.providers (
    name text PRIMARY KEY
        CONSTRAINT providers_name_lowercase_identifier
            CHECK (name ~ '^[a-z][a-z0-9_]*$' AND length(name) <= 63),
    kind text NOT NULL
        CONSTRAINT providers_kind_lowercase_identifier
            CHECK (kind ~ '^[a-z][a-z0-9_]*$' AND length(kind) <= 63),
    enabled boolean NOT NULL DEFAULT true,
    currencies text[]
        CONSTRAINT providers_currencies_codes
            CHECK (cardinality(currencies) >= 1 AND array_to_string(currencies, ',') ~ '^[A-Z]{3}(,[A-Z]{3})*$'),
    amount_limits jsonb NOT NULL DEFAULT '{}'::jsonb
        CONSTRAINT providers_amount_limits_shape
            CHECK (jsonb_typeof(amount_limits) = 'object'
                   AND NOT jsonb_path_exists(amount_limits,
                       'strict $.keyvalue() ? (!(@.key like_regex "^[A-Z]{3}$") || @.value.type() != "object")')
                   AND NOT jsonb_path_exists(amount_limits,
                       'strict $.*.keyvalue() ? (!(@.key == "min" || @.key == "max") || @.value.type() != "number" || @.value < 1 || @.value.floor() != @.value)')),
    note text CONSTRAINT providers_note_max_500 CHECK (length(note) <= 500),
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    updated_by text
);

COMMENT ON TABLE outbox.providers IS
    'The provider registry (sql/0050): every provider instance relays may serve, by the name '
    'intents carry. A payment''s first intent must name a registered, enabled provider that '
    'accepts its currency and amount (empty registry: open, every name accepted). Changed '
    'through outbox.provider_set_v1, audited as entity provider.';
COMMENT ON COLUMN outbox.providers.currencies IS
    'ISO 4217 codes the provider takes; NULL: every currency of outbox.currencies.';
COMMENT ON COLUMN outbox.providers.amount_limits IS
    'Per currency, bounds for a payment''s first intent in minor units: {"EUR": {"min": 50, '
    '"max": 99999999}}; a currency without an entry has no bounds.';

CREATE TABLE outbox.provider_unit_rules (
    kind text NOT NULL,
    currency text NOT NULL CONSTRAINT provider_unit_rules_currency_code CHECK (currency ~ '^[A-Z]{3}$'),
    exponent smallint CONSTRAINT provider_unit_rules_exponent_range CHECK (exponent BETWEEN 0 AND 4),
    multiple_of integer NOT NULL DEFAULT 1 CONSTRAINT provider_unit_rules_multiple_positive CHECK (multiple_of >= 1),
    why text NOT NULL,
    PRIMARY KEY (kind, currency)
);

COMMENT ON TABLE outbox.provider_unit_rules IS
    'Where a provider kind counts a currency differently from ISO 4217 (exponent: its decimal '
    'places, NULL: ISO''s; multiple_of: in its own units). The twin of '
    'provider_adapters/currency_units.py; a test keeps them equal.';

INSERT INTO outbox.provider_unit_rules (kind, currency, exponent, multiple_of, why) VALUES
    ('stripe', 'ISK', 2, 100, 'Stripe counts ISK with two decimals and takes whole krónur only (amounts divisible by 100)'),
    ('stripe', 'MGA', 0, 1, 'Stripe counts MGA as a zero-decimal currency'),
    ('stripe', 'BHD', NULL, 10, 'Stripe takes three-decimal BHD amounts only with the last digit 0'),
    ('stripe', 'JOD', NULL, 10, 'Stripe takes three-decimal JOD amounts only with the last digit 0'),
    ('stripe', 'KWD', NULL, 10, 'Stripe takes three-decimal KWD amounts only with the last digit 0'),
    ('stripe', 'OMR', NULL, 10, 'Stripe takes three-decimal OMR amounts only with the last digit 0'),
    ('stripe', 'TND', NULL, 10, 'Stripe takes three-decimal TND amounts only with the last digit 0'),
    ('adyen', 'CLP', 2, 1, 'Adyen counts CLP with two decimals'),
    ('adyen', 'ISK', 2, 1, 'Adyen counts ISK with two decimals'),
    ('adyen', 'CVE', 0, 1, 'Adyen counts CVE in whole escudos (no decimals)'),
    ('adyen', 'IDR', 0, 1, 'Adyen counts IDR in whole rupiah (no decimals)');

-- Seed: every provider already in use (see the header).
CREATE FUNCTION outbox.providers_seed_in_use() RETURNS integer
LANGUAGE sql AS $$
    WITH named AS (
        SELECT provider AS name FROM outbox.payments
        UNION SELECT unnest(providers) FROM outbox.relay_instances
    ), added AS (
        INSERT INTO outbox.providers (name, kind, note, updated_by)
        SELECT name, CASE WHEN name LIKE 'adyen%' THEN 'adyen' ELSE 'stripe' END,
               'registered because it was in use when the registry was created; check its kind',
               outbox.audit_actor()
        FROM named
        WHERE name ~ '^[a-z][a-z0-9_]*$' AND length(name) <= 63
        ON CONFLICT (name) DO NOTHING
        RETURNING 1
    )
    SELECT count(*)::integer FROM added
$$;

-- Every change is an audit row (who, when, before, after; why from outbox.reason).
CREATE TRIGGER providers_audit
    AFTER INSERT OR UPDATE ON outbox.providers
    FOR EACH ROW EXECUTE FUNCTION outbox.audit_generic(
        'provider', 'name', 'name,kind,enabled,currencies,amount_limits,note');

CREATE TRIGGER providers_no_delete
    BEFORE DELETE OR TRUNCATE ON outbox.providers
    FOR EACH STATEMENT EXECUTE FUNCTION outbox.refuse_change();

SELECT outbox.providers_seed_in_use();

-- 2. Maintaining it: one function for the command and the chart -----------------------------

-- Adds or changes one provider. NULL arguments keep the current value (for a new row: kind
-- is required, enabled defaults to true). p_currencies '{}' means every currency (NULL in the
-- table). Returns the row as it is now. The operator names who acts (outbox.actor) and
-- p_reason is the audit row's why.
CREATE FUNCTION outbox.provider_set_v1(
    p_operator text, p_name text, p_kind text DEFAULT NULL, p_enabled boolean DEFAULT NULL,
    p_currencies text[] DEFAULT NULL, p_amount_limits jsonb DEFAULT NULL, p_note text DEFAULT NULL,
    p_reason text DEFAULT NULL, p_create boolean DEFAULT true
) RETURNS outbox.providers
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    row_now outbox.providers;
    unknown text;
BEGIN
    PERFORM outbox.set_operator_actor(p_operator);
    PERFORM set_config('outbox.reason', coalesce(p_reason, ''), true);
    SELECT string_agg(u.wanted, ', ') INTO unknown
    FROM unnest(p_currencies) AS u(wanted)
    WHERE NOT EXISTS (SELECT 1 FROM outbox.currencies AS c WHERE c.code = upper(u.wanted));
    IF unknown IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'check_violation', CONSTRAINT = 'providers_currencies_known',
            MESSAGE = format('providers.currencies: %s not in outbox.currencies', unknown),
            HINT = 'Use ISO 4217 codes, e.g. EUR, USD, JPY.';
    END IF;
    -- The first row of an empty registry closes it: register what is in use first.
    PERFORM pg_advisory_xact_lock(hashtext('outbox.providers'));
    IF NOT EXISTS (SELECT 1 FROM outbox.providers) THEN
        PERFORM outbox.providers_seed_in_use();
    END IF;
    UPDATE outbox.providers AS p SET
        kind = coalesce(p_kind, p.kind),
        enabled = coalesce(p_enabled, p.enabled),
        currencies = CASE WHEN p_currencies IS NULL THEN p.currencies
                          WHEN cardinality(p_currencies) = 0 THEN NULL
                          ELSE (SELECT array_agg(DISTINCT upper(c) ORDER BY upper(c)) FROM unnest(p_currencies) AS c) END,
        amount_limits = coalesce(p_amount_limits, p.amount_limits),
        note = coalesce(p_note, p.note),
        updated_at = now(),
        updated_by = outbox.audit_actor()
    WHERE p.name = p_name
    RETURNING * INTO row_now;
    IF FOUND THEN
        RETURN row_now;
    END IF;
    IF NOT p_create THEN
        RAISE EXCEPTION USING ERRCODE = 'no_data_found',
            MESSAGE = format('provider %s is not registered', quote_literal(p_name)),
            HINT = 'Register it first: outbox-relay providers add NAME --kind KIND.';
    END IF;
    IF p_kind IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'not_null_violation', CONSTRAINT = 'providers_kind_required',
            MESSAGE = format('provider %s is new: its kind (the adapter, e.g. stripe or adyen) is required', quote_literal(p_name));
    END IF;
    INSERT INTO outbox.providers (name, kind, enabled, currencies, amount_limits, note, updated_by)
    VALUES (p_name, p_kind, coalesce(p_enabled, true),
            CASE WHEN cardinality(p_currencies) = 0 THEN NULL
                 ELSE (SELECT array_agg(DISTINCT upper(c) ORDER BY upper(c)) FROM unnest(p_currencies) AS c) END,
            coalesce(p_amount_limits, '{}'::jsonb), p_note, outbox.audit_actor())
    RETURNING * INTO row_now;
    RETURN row_now;
END;
$$;

COMMENT ON FUNCTION outbox.provider_set_v1(text, text, text, boolean, text[], jsonb, text, text, boolean) IS
    'Register or change a provider (NULL keeps a value; currencies ''{}'': all), as operator '
    'p_operator, with p_reason as the audit row''s why. The first row of an empty registry '
    'registers every provider in use first.';

-- 3. The rules at INSERT ----------------------------------------------------------------------

-- Amount in ISO minor units -> the provider's units, or NULL when it has no exact equivalent.
CREATE FUNCTION outbox.provider_units(p_amount bigint, p_iso_exponent integer, p_exponent integer,
                                      p_multiple_of integer) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN shift >= 0 THEN units_up ELSE units_down END
    FROM (SELECT coalesce(p_exponent, p_iso_exponent) - p_iso_exponent AS shift) AS s,
         LATERAL (SELECT CASE WHEN s.shift >= 0 THEN p_amount * (10::bigint ^ s.shift)::bigint END AS up,
                         CASE WHEN s.shift < 0 AND p_amount % (10::bigint ^ (-s.shift))::bigint = 0
                              THEN p_amount / (10::bigint ^ (-s.shift))::bigint END AS down) AS v,
         LATERAL (SELECT CASE WHEN v.up % p_multiple_of = 0 THEN v.up END AS units_up,
                         CASE WHEN v.down % p_multiple_of = 0 THEN v.down END AS units_down) AS w
$$;

CREATE FUNCTION outbox.payment_intents_check_provider_v1(i outbox.payment_intents, first_intent boolean)
RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    p       outbox.providers%ROWTYPE;
    rule    outbox.provider_unit_rules%ROWTYPE;
    iso     integer;
    bound   bigint;
BEGIN
    SELECT * INTO p FROM outbox.providers WHERE name = i.provider;
    IF NOT FOUND THEN
        IF first_intent AND EXISTS (SELECT 1 FROM outbox.providers) THEN
            RAISE EXCEPTION USING
                ERRCODE = 'check_violation',
                SCHEMA = 'outbox', TABLE = 'payment_intents', COLUMN = 'provider',
                CONSTRAINT = 'payment_intents_provider_registered',
                MESSAGE = format('payment_intents.provider %s is not a registered provider', quote_literal(i.provider)),
                HINT = 'Name a provider of `outbox-relay providers list`, leave provider empty to have '
                       'the routing rules choose, or register it: outbox-relay providers add NAME --kind KIND.';
        END IF;
        RETURN;
    END IF;
    IF first_intent THEN
        IF NOT p.enabled THEN
            RAISE EXCEPTION USING
                ERRCODE = 'check_violation',
                SCHEMA = 'outbox', TABLE = 'payment_intents', COLUMN = 'provider',
                CONSTRAINT = 'payment_intents_provider_enabled',
                MESSAGE = format('payment_intents.provider %s is disabled: it takes no new payments', quote_literal(i.provider)),
                HINT = 'Name another provider, or leave provider empty to have the routing rules choose '
                       '(`outbox-relay providers list` shows which are enabled).';
        END IF;
        IF p.currencies IS NOT NULL AND NOT i.currency = ANY (p.currencies) THEN
            RAISE EXCEPTION USING
                ERRCODE = 'check_violation',
                SCHEMA = 'outbox', TABLE = 'payment_intents', COLUMN = 'currency',
                CONSTRAINT = 'payment_intents_provider_currency',
                MESSAGE = format('payment_intents.currency %s is not accepted by provider %s (it takes %s)',
                                 i.currency, quote_literal(i.provider), array_to_string(p.currencies, ', ')),
                HINT = 'Name a provider that takes this currency, or leave provider empty to have the routing rules choose.';
        END IF;
        IF i.amount_minor IS NOT NULL AND p.amount_limits ? i.currency THEN
            bound := (p.amount_limits -> i.currency ->> 'min')::bigint;
            IF i.amount_minor < bound THEN
                PERFORM outbox.refuse_input('payment_intents', 'amount_minor',
                    'payment_intents_amount_within_provider_limits',
                    format('is below provider %s''s minimum of %s minor units of %s', i.provider, bound, i.currency));
            END IF;
            bound := (p.amount_limits -> i.currency ->> 'max')::bigint;
            IF i.amount_minor > bound THEN
                PERFORM outbox.refuse_input('payment_intents', 'amount_minor',
                    'payment_intents_amount_within_provider_limits',
                    format('is above provider %s''s maximum of %s minor units of %s', i.provider, bound, i.currency));
            END IF;
        END IF;
    END IF;
    IF i.amount_minor IS NOT NULL THEN
        SELECT * INTO rule FROM outbox.provider_unit_rules AS r WHERE r.kind = p.kind AND r.currency = i.currency;
        IF FOUND THEN
            SELECT c.exponent INTO iso FROM outbox.currencies AS c WHERE c.code = i.currency;
            IF outbox.provider_units(i.amount_minor, iso, rule.exponent, rule.multiple_of) IS NULL THEN
                RAISE EXCEPTION USING
                    ERRCODE = 'check_violation',
                    SCHEMA = 'outbox', TABLE = 'payment_intents', COLUMN = 'amount_minor',
                    CONSTRAINT = 'payment_intents_amount_representable',
                    MESSAGE = format('payment_intents.amount_minor %s %s cannot be sent to provider %s: %s',
                                     i.amount_minor, i.currency, i.provider, rule.why),
                    HINT = 'Round the amount to what the provider can represent (docs/providers.md, "Minor units").';
            END IF;
        END IF;
    END IF;
END;
$$;

COMMENT ON FUNCTION outbox.payment_intents_check_provider_v1(outbox.payment_intents, boolean) IS
    'The registry''s rules at INSERT (sql/0050), called by payment_intents_before_insert once '
    'the payment''s row is known: registered, enabled, currency and limits for a payment''s '
    'first intent; a representable amount for every intent.';

-- The routing hook the trigger calls when the application leaves provider empty. This
-- migration's version routes nothing: a later intent takes its payment's provider, a first
-- intent is refused by name. sql/0051 replaces it with the routing rules.
CREATE FUNCTION outbox.route_payment_v1(i outbox.payment_intents, OUT provider text,
                                        OUT rule_id bigint, OUT rule_version integer)
LANGUAGE plpgsql AS $$
BEGIN
    SELECT p.provider INTO provider FROM outbox.payments AS p WHERE p.payment_id = i.payment_id;
    IF FOUND THEN
        RETURN;
    END IF;
    RAISE EXCEPTION USING
        ERRCODE = 'not_null_violation',
        SCHEMA = 'outbox', TABLE = 'payment_intents', COLUMN = 'provider',
        CONSTRAINT = 'payment_intents_provider_required',
        MESSAGE = 'payment_intents.provider is empty and no routing rule chose a provider',
        HINT = 'Name the provider, or add a routing rule that matches (outbox-relay routes add).';
END;
$$;

-- 4. The payment records how its provider was chosen ---------------------------------------

ALTER TABLE outbox.payments
    ADD COLUMN routing_rule_id bigint,
    ADD COLUMN routing_rule_version integer;

COMMENT ON COLUMN outbox.payments.routing_rule_id IS
    'The routing rule that chose the provider (sql/0051), NULL when the first intent named it.';
COMMENT ON COLUMN outbox.payments.routing_rule_version IS
    'The version of that rule when it chose.';

-- 5. The trigger ------------------------------------------------------------------------------

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
    IF NEW.amount_minor >= 1000000000000
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


-- 6. Who may read and change it -----------------------------------------------------------------

-- Operators read and (through provider_set_v1) change the registry; the INSERT trigger reads it
-- as its owner, so applications and relays need no right on it. The helpers run inside the
-- trigger as the owner too: PUBLIC may not call them.
GRANT SELECT ON outbox.providers, outbox.provider_unit_rules TO outbox_operator;
REVOKE EXECUTE ON FUNCTION outbox.providers_seed_in_use(),
                           outbox.provider_units(bigint, integer, integer, integer),
                           outbox.payment_intents_check_provider_v1(outbox.payment_intents, boolean),
                           outbox.route_payment_v1(outbox.payment_intents)
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION outbox.provider_set_v1(text, text, text, boolean, text[], jsonb, text, text, boolean)
    TO outbox_operator;
REVOKE EXECUTE ON FUNCTION outbox.provider_set_v1(text, text, text, boolean, text[], jsonb, text, text, boolean)
    FROM PUBLIC;
