-- Issue 20, step 2: routing rules. The application may leave `provider` empty on a
-- payment's first intent (authorize or charge); the INSERT trigger then asks
-- outbox.route_payment_v1 (hook of sql/0050), which this migration replaces with the rules.
--
-- A rule matches on the intent's currency, amount range, payment-method kind (a prefix of
-- payment_method, e.g. 'pm_card_' or 'scheme_') and one metadata field (a key and the values
-- that match, e.g. merchant or country); NULL matches anything. Rules are tried by priority
-- (lower first, then id); the first that yields a provider decides. It yields, among its
-- targets that are registered, enabled and accept the currency:
--   mode 'priority': the first target in list order;
--   mode 'split':    a weighted choice by the payment's bucket (outbox.routing_bucket: the
--                    first 32 bits of sha256(payment_id), so the same payment always draws the
--                    same point), over the targets with weight > 0; when none has weight left
--                    (all rolled back to 0 or disabled) the first usable target in list order,
--                    so the list order is the fallback order.
-- No rule yields: refused with payment_intents_provider_required.
--
-- Sticky: the choice is made once, at the payment's first intent, and recorded on the
-- payment (routing_rule_id, routing_rule_version); every later intent of the payment leaves
-- provider empty or names the same one and takes the payment's provider (sql/0015's
-- payment_intents_provider_matches_payment). A rule change therefore applies to the next
-- payment only: payments already started keep their provider.
--
-- Rules change through outbox.routing_rule_set_v1 (the command `outbox-relay routes ...`):
-- every change bumps `version` and is a hash-chained audit row (entity 'routing_rule': who,
-- when, before, after, why). The pure twin of the bucket and the weighted choice is
-- relay/domain/routing.py; tests check both agree.

CREATE TABLE outbox.routing_rules (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name text NOT NULL UNIQUE
        CONSTRAINT routing_rules_name_identifier CHECK (name ~ '^[a-z][a-z0-9_-]*$' AND length(name) <= 63),
    version integer NOT NULL DEFAULT 1,
    priority integer NOT NULL DEFAULT 100,
    enabled boolean NOT NULL DEFAULT true,
    currencies text[]
        CONSTRAINT routing_rules_currencies_codes
            CHECK (cardinality(currencies) >= 1 AND array_to_string(currencies, ',') ~ '^[A-Z]{3}(,[A-Z]{3})*$'),
    min_amount_minor bigint CONSTRAINT routing_rules_min_amount_positive CHECK (min_amount_minor > 0),
    max_amount_minor bigint CONSTRAINT routing_rules_amount_range CHECK (max_amount_minor >= min_amount_minor OR min_amount_minor IS NULL),
    payment_method_prefixes text[] CONSTRAINT routing_rules_payment_method_prefixes CHECK (cardinality(payment_method_prefixes) >= 1),
    metadata_key text CONSTRAINT routing_rules_metadata_key_named CHECK (metadata_key ~ '\S' AND length(metadata_key) <= 100),
    metadata_values text[],
    mode text NOT NULL DEFAULT 'priority' CONSTRAINT routing_rules_mode_valid CHECK (mode IN ('priority', 'split')),
    providers text[] NOT NULL CONSTRAINT routing_rules_providers_named CHECK (cardinality(providers) >= 1),
    weights integer[],
    note text CONSTRAINT routing_rules_note_max_500 CHECK (length(note) <= 500),
    updated_at timestamptz NOT NULL DEFAULT now(),
    updated_by text,
    CONSTRAINT routing_rules_metadata_both CHECK ((metadata_key IS NULL) = (metadata_values IS NULL)),
    CONSTRAINT routing_rules_weights_match CHECK (
        (mode = 'priority' AND weights IS NULL)
        OR (mode = 'split' AND cardinality(weights) = cardinality(providers)
            AND 0 <= ALL (weights) AND 10000 >= ALL (weights)))
);

COMMENT ON TABLE outbox.routing_rules IS
    'How a payment whose first intent names no provider is routed (sql/0051): matched by '
    'currency, amount range, payment_method prefix and a metadata field, by priority; then '
    'the first usable provider (priority) or a weighted choice by the payment''s bucket '
    '(split). Changed through outbox.routing_rule_set_v1; each change bumps version and is '
    'audited as entity routing_rule.';

CREATE INDEX routing_rules_enabled_order ON outbox.routing_rules (priority, id) WHERE enabled;

CREATE FUNCTION outbox.routing_rules_bump_version() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.version := OLD.version + 1;
    NEW.updated_at := now();
    RETURN NEW;
END;
$$;

CREATE TRIGGER routing_rules_version
    BEFORE UPDATE ON outbox.routing_rules
    FOR EACH ROW WHEN (OLD.* IS DISTINCT FROM NEW.*)
    EXECUTE FUNCTION outbox.routing_rules_bump_version();

CREATE TRIGGER routing_rules_audit
    AFTER INSERT OR UPDATE ON outbox.routing_rules
    FOR EACH ROW EXECUTE FUNCTION outbox.audit_generic(
        'routing_rule', 'name',
        'id,name,version,priority,enabled,currencies,min_amount_minor,max_amount_minor,payment_method_prefixes,metadata_key,metadata_values,mode,providers,weights,note');

CREATE TRIGGER routing_rules_no_delete
    BEFORE DELETE OR TRUNCATE ON outbox.routing_rules
    FOR EACH STATEMENT EXECUTE FUNCTION outbox.refuse_change();

-- The payment's bucket: the first 32 bits of sha256(payment_id), 0 .. 2^32 - 1.
-- relay/domain/routing.py's routing_bucket is its twin.
CREATE FUNCTION outbox.routing_bucket(p_payment_id text) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT ('x' || left(encode(sha256(convert_to(p_payment_id, 'UTF8')), 'hex'), 8))::bit(32)::bigint
$$;

CREATE OR REPLACE FUNCTION outbox.route_payment_v1(i outbox.payment_intents, OUT provider text,
                                                   OUT rule_id bigint, OUT rule_version integer)
LANGUAGE plpgsql AS $$
DECLARE
    r       record;
    bucket  bigint;
    usable  text[];
    total   bigint;
    upto    bigint;
    k       integer;
BEGIN
    -- A later intent of an existing payment: its payment's provider.
    SELECT p.provider INTO provider FROM outbox.payments AS p WHERE p.payment_id = i.payment_id;
    IF FOUND THEN
        RETURN;
    END IF;
    IF i.action IN ('authorize', 'charge') THEN
        bucket := outbox.routing_bucket(i.payment_id);
        -- One query: the matching rules in order, each with its usable targets (registered,
        -- enabled, taking the currency; unordered), list order and weights then walked in
        -- plpgsql (an ordered aggregate over unnest ... WITH ORDINALITY, and a query per rule,
        -- cost tens of microseconds per INSERT more).
        FOR r IN
            SELECT rr.id, rr.version, rr.mode, rr.providers, rr.weights,
                   (SELECT array_agg(p.name) FROM outbox.providers AS p
                    WHERE p.name = ANY (rr.providers) AND p.enabled
                      AND (p.currencies IS NULL OR i.currency = ANY (p.currencies))) AS usable
            FROM outbox.routing_rules AS rr
            WHERE rr.enabled
              AND (rr.currencies IS NULL OR i.currency = ANY (rr.currencies))
              AND (rr.min_amount_minor IS NULL OR i.amount_minor >= rr.min_amount_minor)
              AND (rr.max_amount_minor IS NULL OR i.amount_minor <= rr.max_amount_minor)
              AND (rr.payment_method_prefixes IS NULL
                   OR EXISTS (SELECT 1 FROM unnest(rr.payment_method_prefixes) AS pre
                              WHERE starts_with(i.payment_method, pre)))
              AND (rr.metadata_key IS NULL
                   OR (i.metadata ->> rr.metadata_key) = ANY (rr.metadata_values))
            ORDER BY rr.priority, rr.id
        LOOP
            usable := r.usable;
            CONTINUE WHEN usable IS NULL;
            provider := NULL;
            IF r.mode = 'split' THEN
                total := 0;
                FOR k IN 1 .. cardinality(r.providers) LOOP
                    IF r.providers[k] = ANY (usable) THEN
                        total := total + r.weights[k];
                    END IF;
                END LOOP;
                IF total > 0 THEN
                    upto := 0;
                    FOR k IN 1 .. cardinality(r.providers) LOOP
                        CONTINUE WHEN NOT r.providers[k] = ANY (usable);
                        upto := upto + r.weights[k];
                        IF bucket % total < upto THEN
                            provider := r.providers[k];
                            EXIT;
                        END IF;
                    END LOOP;
                END IF;
            END IF;
            IF provider IS NULL THEN  -- priority, or a split with no weight left: list order
                FOR k IN 1 .. cardinality(r.providers) LOOP
                    IF r.providers[k] = ANY (usable) THEN
                        provider := r.providers[k];
                        EXIT;
                    END IF;
                END LOOP;
            END IF;
            rule_id := r.id;
            rule_version := r.version;
            RETURN;
        END LOOP;
    END IF;
    RAISE EXCEPTION USING
        ERRCODE = 'not_null_violation',
        SCHEMA = 'outbox', TABLE = 'payment_intents', COLUMN = 'provider',
        CONSTRAINT = 'payment_intents_provider_required',
        MESSAGE = CASE WHEN i.action IN ('authorize', 'charge')
                       THEN 'payment_intents.provider is empty and no routing rule chose an enabled provider for it'
                       ELSE 'payment_intents.provider is empty and the payment does not exist: '
                            'only a payment''s first intent (authorize or charge) is routed' END,
        HINT = 'Name the provider, or add a routing rule that matches (outbox-relay routes list).';
END;
$$;

-- Adds or changes one rule as operator p_operator, p_reason the audit row's why. p_rule is
-- a JSON object of the columns to set (name is the key; unknown keys are refused); for a new
-- rule `providers` is required. Every provider a rule names must be registered.
CREATE FUNCTION outbox.routing_rule_set_v1(p_operator text, p_name text, p_rule jsonb, p_reason text DEFAULT NULL,
                                           p_create boolean DEFAULT true)
RETURNS outbox.routing_rules
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    cur     outbox.routing_rules;
    merged  outbox.routing_rules;
    extra   text;
    missing text;
BEGIN
    PERFORM outbox.set_operator_actor(p_operator);
    PERFORM set_config('outbox.reason', coalesce(p_reason, ''), true);
    SELECT string_agg(k, ', ') INTO extra FROM jsonb_object_keys(p_rule) AS k
    WHERE k NOT IN ('priority', 'enabled', 'currencies', 'min_amount_minor', 'max_amount_minor',
                    'payment_method_prefixes', 'metadata_key', 'metadata_values', 'mode',
                    'providers', 'weights', 'note');
    IF extra IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = format('routing rule fields %s are not settable', extra);
    END IF;
    SELECT * INTO cur FROM outbox.routing_rules WHERE name = p_name FOR UPDATE;
    IF NOT FOUND THEN
        IF NOT p_create THEN
            RAISE EXCEPTION USING ERRCODE = 'no_data_found',
                MESSAGE = format('no routing rule %s', quote_literal(p_name)),
                HINT = 'outbox-relay routes list shows the rules.';
        END IF;
        cur := jsonb_populate_record(NULL::outbox.routing_rules,
                                     jsonb_build_object('name', p_name, 'priority', 100, 'enabled', true, 'mode', 'priority'));
    END IF;
    merged := jsonb_populate_record(cur, p_rule);
    SELECT string_agg(u.wanted, ', ') INTO missing
    FROM unnest(merged.currencies) AS u(wanted)
    WHERE NOT EXISTS (SELECT 1 FROM outbox.currencies AS c WHERE c.code = u.wanted);
    IF missing IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'check_violation', CONSTRAINT = 'routing_rules_currencies_known',
            MESSAGE = format('routing rule %s: currencies %s not in outbox.currencies', quote_literal(p_name), missing),
            HINT = 'Use upper-case ISO 4217 codes, e.g. EUR, USD, JPY.';
    END IF;
    SELECT string_agg(quote_literal(n), ', ') INTO missing
    FROM unnest(merged.providers) AS n
    WHERE NOT EXISTS (SELECT 1 FROM outbox.providers AS p WHERE p.name = n);
    IF missing IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'foreign_key_violation', CONSTRAINT = 'routing_rules_providers_registered',
            MESSAGE = format('routing rule %s names unregistered provider(s) %s', quote_literal(p_name), missing),
            HINT = 'Register them first: outbox-relay providers add NAME --kind KIND.';
    END IF;
    IF cur.id IS NULL THEN
        INSERT INTO outbox.routing_rules (name, priority, enabled, currencies, min_amount_minor, max_amount_minor,
                                          payment_method_prefixes, metadata_key, metadata_values, mode,
                                          providers, weights, note, updated_by)
        VALUES (merged.name, merged.priority, merged.enabled, merged.currencies, merged.min_amount_minor,
                merged.max_amount_minor, merged.payment_method_prefixes, merged.metadata_key,
                merged.metadata_values, merged.mode, merged.providers, merged.weights, merged.note,
                outbox.audit_actor())
        RETURNING * INTO merged;
    ELSE
        UPDATE outbox.routing_rules SET
            priority = merged.priority, enabled = merged.enabled, currencies = merged.currencies,
            min_amount_minor = merged.min_amount_minor, max_amount_minor = merged.max_amount_minor,
            payment_method_prefixes = merged.payment_method_prefixes, metadata_key = merged.metadata_key,
            metadata_values = merged.metadata_values, mode = merged.mode, providers = merged.providers,
            weights = merged.weights, note = merged.note, updated_by = outbox.audit_actor()
        WHERE id = cur.id
        RETURNING * INTO merged;
    END IF;
    RETURN merged;
END;
$$;

COMMENT ON FUNCTION outbox.routing_rule_set_v1(text, text, jsonb, text, boolean) IS
    'Add or change a routing rule (p_rule: the columns to set, as JSON) as operator '
    'p_operator, with p_reason as the audit row''s why; takes effect for the next payment.';

GRANT SELECT ON outbox.routing_rules TO outbox_operator;
REVOKE EXECUTE ON FUNCTION outbox.routing_bucket(text),
                           outbox.route_payment_v1(outbox.payment_intents)
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION outbox.routing_bucket(text) TO outbox_operator;  -- `intents show`
REVOKE EXECUTE ON FUNCTION outbox.routing_rule_set_v1(text, text, jsonb, text, boolean) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION outbox.routing_rule_set_v1(text, text, jsonb, text, boolean) TO outbox_operator;
