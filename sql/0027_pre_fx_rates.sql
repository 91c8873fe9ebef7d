-- Currency conversion with auditable rates (issue 22).
--
-- 1. outbox.fx_rates: exchange rates as immutable, sourced records. A rate says how many
--    units of `quote` one unit of `base` buys (ECB style: base EUR, quote USD, 1.0876),
--    as an exact NUMERIC, never a float. Each row names its source (the ECB's daily
--    reference rates, a CSV file, a provider's quoted rate, a manual entry by a named
--    operator), the source's own publication time, when we fetched it, the SHA-256 of the
--    source document, and its validity. Rows are never updated or deleted: a trigger
--    refuses it for every role (the owner and superusers included) and nobody holds the
--    privilege. A rate is superseded by the next row of its pair with a later valid_from,
--    or by a correction with the same valid_from and a larger id. Every insert writes a
--    hash-chained audit row (entity 'fx_rate'), and `audit verify` compares each rate row
--    with its chain, so a rate changed behind the trigger's back is found.
-- 2. outbox.fx_policy: the largest age of a rate a new conversion accepts (default
--    5 days: the ECB publishes on TARGET business days at about 16:00 CET, so Friday's
--    rate is 3 days old on Monday afternoon, and Maundy Thursday's is 5 days old when
--    Tuesday's arrives after Easter).
-- 3. outbox.convert_v1: the conversion an application calls in its own transaction.
--    Exact NUMERIC arithmetic over both currencies' ISO 4217 exponents, rounded half to
--    even (banker's rounding; written out, because PostgreSQL's round(numeric) rounds
--    half away from zero), through a common base currency (EUR first) when the pair has
--    no rate of its own; a stale or missing rate is refused by name.
--    outbox.convert_at_rates_v1 recomputes a conversion at given rate rows (no age
--    check): what an intent's recorded rate says, and what a refund at the charge's rate
--    comes to.
-- 4. An intent can carry original_amount_minor, original_currency and fx_rate_id (and
--    fx_via_rate_id for a cross rate) beside what it charges: all or none, and the
--    charged amount must be what the recorded rates give, so "why this amount" has one
--    answer in the row and in its audit trail.

-- ==========================================================================================
-- 1. Rates
-- ==========================================================================================

CREATE TABLE outbox.fx_rates (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    base text NOT NULL REFERENCES outbox.currencies (code),
    quote text NOT NULL REFERENCES outbox.currencies (code),
    rate numeric NOT NULL,
    source_kind text NOT NULL,
    source_name text NOT NULL,
    source_url text,
    source_sha256 bytea,
    operator text,
    published_at timestamptz NOT NULL,
    fetched_at timestamptz NOT NULL DEFAULT now(),
    valid_from timestamptz NOT NULL,
    valid_until timestamptz,
    recorded_by text NOT NULL DEFAULT '',
    recorded_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    CONSTRAINT fx_rates_pair_differs CHECK (base <> quote),
    CONSTRAINT fx_rates_rate_positive CHECK (rate > 0),
    CONSTRAINT fx_rates_rate_precision CHECK (scale(rate) <= 12 AND rate < 1000000000000),
    CONSTRAINT fx_rates_source_kind_valid
        CHECK (source_kind IN ('ecb', 'csv', 'provider', 'manual')),
    CONSTRAINT fx_rates_source_name_nonblank_max_200
        CHECK (source_name ~ '\S' AND length(source_name) <= 200),
    CONSTRAINT fx_rates_source_url_max_2000 CHECK (length(source_url) <= 2000),
    CONSTRAINT fx_rates_manual_names_operator CHECK (source_kind <> 'manual' OR operator ~ '\S'),
    CONSTRAINT fx_rates_operator_max_200 CHECK (length(operator) <= 200),
    CONSTRAINT fx_rates_document_hashed CHECK (source_kind = 'manual' OR source_sha256 IS NOT NULL),
    CONSTRAINT fx_rates_sha256_32_bytes CHECK (length(source_sha256) = 32),
    CONSTRAINT fx_rates_validity_ordered CHECK (valid_until IS NULL OR valid_until > valid_from)
);

COMMENT ON TABLE outbox.fx_rates IS
    'Exchange rates as immutable, sourced records: 1 base = rate quote (exact NUMERIC). Never '
    'updated or deleted (fx_rates_immutable); the rate of a pair at time t is the row with the '
    'latest valid_from <= t (then the largest id) whose valid_until, if any, is after t. Every '
    'insert is in the audit trail (entity fx_rate). Convert with outbox.convert_v1.';
COMMENT ON COLUMN outbox.fx_rates.rate IS
    'Units of quote per one unit of base, exact (at most 12 decimals); never a float.';
COMMENT ON COLUMN outbox.fx_rates.published_at IS
    'The source''s own publication time (ECB: the reference date at 16:00 CET); a rate''s age '
    'is measured from it.';
COMMENT ON COLUMN outbox.fx_rates.source_sha256 IS
    'SHA-256 of the source document as fetched (the ECB XML, the CSV file, the provider''s '
    'reply); NULL only for a manual entry.';
COMMENT ON COLUMN outbox.fx_rates.recorded_by IS
    'Who inserted the row (outbox.audit_actor()): set by a trigger, whatever the writer sent.';

-- Re-importing the same document inserts nothing (ON CONFLICT DO NOTHING).
CREATE UNIQUE INDEX fx_rates_once
    ON outbox.fx_rates (base, quote, source_kind, source_name, valid_from, rate);
-- The rate of a pair at a time: one index probe.
CREATE INDEX fx_rates_pair_valid_idx ON outbox.fx_rates (base, quote, valid_from DESC, id DESC);
CREATE INDEX fx_rates_quote_idx ON outbox.fx_rates (quote, base);

-- The writer names neither who recorded the row nor when.
CREATE FUNCTION outbox.fx_rates_before_insert() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path TO 'pg_catalog', 'pg_temp'
AS $$
BEGIN
    NEW.recorded_by := outbox.audit_actor();
    NEW.recorded_at := clock_timestamp();
    NEW.base := upper(NEW.base);
    NEW.quote := upper(NEW.quote);
    RETURN NEW;
END;
$$;

CREATE TRIGGER fx_rates_before_insert
    BEFORE INSERT ON outbox.fx_rates
    FOR EACH ROW EXECUTE FUNCTION outbox.fx_rates_before_insert();

CREATE FUNCTION outbox.fx_rates_refuse_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        RAISE EXCEPTION USING
            ERRCODE = 'insufficient_privilege',
            SCHEMA = 'outbox', TABLE = 'fx_rates', CONSTRAINT = 'fx_rates_immutable',
            MESSAGE = 'fx_rates_immutable: outbox.fx_rates is never truncated',
            HINT = 'Rates are evidence for the amounts converted with them; they are kept.';
    END IF;
    RAISE EXCEPTION USING
        ERRCODE = 'insufficient_privilege',
        SCHEMA = 'outbox', TABLE = 'fx_rates', CONSTRAINT = 'fx_rates_immutable',
        MESSAGE = format('fx_rates_immutable: %s of rate %s (%s/%s) refused; rates are never '
                         'changed or deleted', TG_OP, OLD.id, OLD.base, OLD.quote),
        HINT = 'Insert a new rate instead: a later valid_from (or the same valid_from, as a '
               'correction) supersedes this one for new conversions.';
END;
$$;

CREATE TRIGGER fx_rates_immutable
    BEFORE UPDATE OR DELETE ON outbox.fx_rates
    FOR EACH ROW EXECUTE FUNCTION outbox.fx_rates_refuse_change();
CREATE TRIGGER fx_rates_no_truncate
    BEFORE TRUNCATE ON outbox.fx_rates
    FOR EACH STATEMENT EXECUTE FUNCTION outbox.fx_rates_refuse_change();

-- The audited document: every column, the rate as text (a JSON number read back by a
-- client becomes a float, and a float cannot tell 1.0876 from 1.08760000000000001),
-- times in UTC whatever the session's TimeZone.
CREATE FUNCTION outbox.audit_fx_rate_doc(r outbox.fx_rates) RETURNS jsonb
LANGUAGE sql STABLE PARALLEL SAFE
SET "TimeZone" TO 'UTC'
AS $$
    SELECT jsonb_build_object(
        'id', r.id, 'base', r.base, 'quote', r.quote, 'rate', r.rate::text,
        'source_kind', r.source_kind, 'source_name', r.source_name,
        'source_url', r.source_url, 'source_sha256', encode(r.source_sha256, 'hex'),
        'operator', r.operator, 'published_at', r.published_at, 'fetched_at', r.fetched_at,
        'valid_from', r.valid_from, 'valid_until', r.valid_until,
        'recorded_by', r.recorded_by, 'recorded_at', r.recorded_at)
$$;

CREATE FUNCTION outbox.fx_rates_audit() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path TO 'pg_catalog', 'pg_temp'
AS $$
BEGIN
    PERFORM outbox.audit_write('fx_rate', NEW.id::text, NULL, 'insert', NULL,
                               outbox.audit_redact(outbox.audit_fx_rate_doc(NEW)),
                               NEW.recorded_by);
    RETURN NULL;
END;
$$;

CREATE TRIGGER fx_rates_audit
    AFTER INSERT ON outbox.fx_rates
    FOR EACH ROW EXECUTE FUNCTION outbox.fx_rates_audit();

-- Nobody, the owner included, may change or remove a rate: the trigger above refuses it
-- for superusers too, the missing privilege for everyone else (as sql/0005 does for the
-- audit trail and the ledger).
REVOKE ALL ON outbox.fx_rates FROM PUBLIC;
REVOKE UPDATE, DELETE, TRUNCATE ON outbox.fx_rates FROM CURRENT_USER;

-- ==========================================================================================
-- 2. Policy
-- ==========================================================================================

CREATE TABLE outbox.fx_policy (
    singleton boolean PRIMARY KEY DEFAULT true,
    max_rate_age interval NOT NULL DEFAULT interval '5 days',
    CONSTRAINT fx_policy_single_row CHECK (singleton),
    CONSTRAINT fx_policy_max_rate_age_positive CHECK (max_rate_age > interval '0')
);
COMMENT ON TABLE outbox.fx_policy IS
    'max_rate_age: a new conversion (outbox.convert_v1) refuses a rate published longer ago '
    'than this (fx_rate_stale). Default 5 days: Friday''s ECB rate on Monday is 3 days old, '
    'Maundy Thursday''s on the Tuesday after Easter 5. Change with UPDATE as the owner '
    '(audited).';
INSERT INTO outbox.fx_policy (singleton) VALUES (true);

CREATE TRIGGER fx_policy_audit
    AFTER INSERT OR UPDATE ON outbox.fx_policy
    FOR EACH ROW EXECUTE FUNCTION outbox.audit_generic('fx_policy', 'singleton', 'max_rate_age');

-- ==========================================================================================
-- 3. Conversion
-- ==========================================================================================

-- num / den rounded to an integer, half to even, exactly: div() on numeric is an exact
-- truncating division (long division, not the approximate one of `/`), so the remainder
-- decides the rounding with no digit lost. den > 0.
CREATE FUNCTION outbox.fx_div_half_even(num numeric, den numeric) RETURNS numeric
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
DECLARE
    a numeric := abs(num);
    q numeric;
    r numeric;
BEGIN
    IF den <= 0 THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = format('fx_div_half_even: the divisor must be positive, got %s', den);
    END IF;
    q := div(a, den);
    r := a - q * den;
    IF 2 * r > den OR (2 * r = den AND mod(q, 2) = 1) THEN
        q := q + 1;
    END IF;
    RETURN sign(num) * q;
END;
$$;

-- The rate row of base/quote valid at `at` (NULLs when none).
CREATE FUNCTION outbox.fx_rate_at(p_base text, p_quote text, p_at timestamptz)
RETURNS outbox.fx_rates
LANGUAGE sql STABLE AS $$
    SELECT r.*
    FROM outbox.fx_rates AS r
    WHERE r.base = p_base AND r.quote = p_quote AND r.valid_from <= p_at
      AND (r.valid_until IS NULL OR r.valid_until > p_at)
    ORDER BY r.valid_from DESC, r.id DESC
    LIMIT 1
$$;

-- The rate rows that convert p_from to p_to at p_at, by the rule of convert_v1: a rate of
-- from/to, else of to/from, else a cross rate through a base both are quoted against (EUR
-- first, then the others in code order: leg1 base/from, leg2 base/to). NULL legs when
-- nothing connects them. No age check here: convert_v1 applies it.
CREATE FUNCTION outbox.fx_legs_at(p_from text, p_to text, p_at timestamptz,
                                  OUT leg1 outbox.fx_rates, OUT leg2 outbox.fx_rates)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_base text;
BEGIN
    leg1 := outbox.fx_rate_at(p_from, p_to, p_at);
    IF leg1.id IS NOT NULL THEN
        RETURN;
    END IF;
    leg1 := outbox.fx_rate_at(p_to, p_from, p_at);
    IF leg1.id IS NOT NULL THEN
        RETURN;
    END IF;
    SELECT f.base INTO v_base
    FROM outbox.fx_rates AS f
    JOIN outbox.fx_rates AS t ON t.base = f.base AND t.quote = p_to AND t.valid_from <= p_at
    WHERE f.quote = p_from AND f.valid_from <= p_at
    ORDER BY f.base <> 'EUR', f.base
    LIMIT 1;
    IF v_base IS NOT NULL THEN
        leg1 := outbox.fx_rate_at(v_base, p_from, p_at);
        leg2 := outbox.fx_rate_at(v_base, p_to, p_at);
        IF leg1.id IS NULL OR leg2.id IS NULL THEN
            leg1 := NULL;
            leg2 := NULL;
        END IF;
    END IF;
END;
$$;

CREATE FUNCTION outbox.fx_exponent(p_code text, p_argument text) RETURNS integer
LANGUAGE plpgsql STABLE AS $$
DECLARE
    e integer;
BEGIN
    SELECT c.exponent INTO e FROM outbox.currencies AS c WHERE c.code = p_code;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING
            ERRCODE = 'foreign_key_violation', CONSTRAINT = 'fx_currency_known',
            MESSAGE = format('fx_currency_unknown: %s %s is not an ISO 4217 code with minor units',
                             p_argument, CASE WHEN p_code ~ '^[A-Z]{1,8}$' THEN quote_literal(p_code)
                                              ELSE '(value withheld)' END),
            HINT = 'Use a three-letter code listed in outbox.currencies, such as EUR, USD or JPY.';
    END IF;
    RETURN e;
END;
$$;

-- amount_minor of from_ccy in to_ccy at the given rate rows, half to even. One leg: a
-- rate of from/to (multiply) or of to/from (divide). Two legs: leg1 is base/from, leg2
-- base/to (a cross rate through their common base). Raises when the rows do not connect
-- the two currencies.
CREATE FUNCTION outbox.fx_convert_with(p_amount bigint, p_from text, p_to text,
                                       leg1 outbox.fx_rates, leg2 outbox.fx_rates)
RETURNS bigint
LANGUAGE plpgsql STABLE AS $$
DECLARE
    e_from integer := outbox.fx_exponent(p_from, 'from_ccy');
    e_to   integer := outbox.fx_exponent(p_to, 'to_ccy');
    num    numeric;
    den    numeric;
    result numeric;
BEGIN
    IF leg1.id IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'no_data_found', CONSTRAINT = 'fx_rate_missing',
            MESSAGE = 'fx_rate_missing: no rate row given';
    END IF;
    IF leg2.id IS NULL AND leg1.base = p_from AND leg1.quote = p_to THEN
        num := p_amount * leg1.rate * 10::numeric ^ e_to;
        den := 10::numeric ^ e_from;
    ELSIF leg2.id IS NULL AND leg1.base = p_to AND leg1.quote = p_from THEN
        num := p_amount * 10::numeric ^ e_to;
        den := leg1.rate * 10::numeric ^ e_from;
    ELSIF leg2.id IS NOT NULL AND leg1.base = leg2.base AND leg1.quote = p_from
          AND leg2.quote = p_to THEN
        num := p_amount * leg2.rate * 10::numeric ^ e_to;
        den := leg1.rate * 10::numeric ^ e_from;
    ELSE
        RAISE EXCEPTION USING ERRCODE = 'check_violation', CONSTRAINT = 'fx_rates_connect_pair',
            MESSAGE = format('fx_rates_connect_pair: rate %s (%s/%s)%s does not convert %s to %s',
                             leg1.id, leg1.base, leg1.quote,
                             CASE WHEN leg2.id IS NULL THEN ''
                                  ELSE format(' with rate %s (%s/%s)', leg2.id, leg2.base, leg2.quote) END,
                             p_from, p_to),
            HINT = 'Give a rate of from/to or to/from, or two rates base/from and base/to.';
    END IF;
    -- 10 ^ e is exact for integer exponents, and numeric * is exact: num / den is the
    -- amount to the last digit, and fx_div_half_even rounds it without losing one.
    result := outbox.fx_div_half_even(num, den);
    IF result < -9223372036854775808 OR result > 9223372036854775807 THEN
        RAISE EXCEPTION USING ERRCODE = 'numeric_value_out_of_range',
            CONSTRAINT = 'fx_amount_out_of_range',
            MESSAGE = format('fx_amount_out_of_range: %s %s in %s is %s minor units, beyond bigint',
                             p_amount, p_from, p_to, result);
    END IF;
    RETURN result::bigint;
END;
$$;

CREATE FUNCTION outbox.convert_v1(amount_minor bigint, from_ccy text, to_ccy text,
                                  at timestamptz DEFAULT now(), max_age interval DEFAULT NULL)
RETURNS TABLE (converted_minor bigint, currency text, rate numeric, rate_id bigint,
               via_rate_id bigint, rate_published_at timestamptz, rate_age interval)
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path TO 'pg_catalog', 'pg_temp'
AS $$
#variable_conflict use_variable
DECLARE
    v_from  text := upper(from_ccy);
    v_to    text := upper(to_ccy);
    v_at    timestamptz := coalesce(at, now());
    v_max   interval;
    legs    record;
    leg1    outbox.fx_rates;
    leg2    outbox.fx_rates;
    stale   outbox.fx_rates;
    v_rate  numeric;
BEGIN
    IF amount_minor IS NULL OR from_ccy IS NULL OR to_ccy IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'null_value_not_allowed',
            MESSAGE = 'convert_v1: amount_minor, from_ccy and to_ccy are required';
    END IF;
    PERFORM outbox.fx_exponent(v_from, 'from_ccy');
    PERFORM outbox.fx_exponent(v_to, 'to_ccy');
    IF v_from = v_to THEN
        RETURN QUERY SELECT amount_minor, v_to, 1::numeric, NULL::bigint, NULL::bigint,
                            NULL::timestamptz, NULL::interval;
        RETURN;
    END IF;
    v_max := coalesce(max_age, (SELECT p.max_rate_age FROM outbox.fx_policy AS p),
                      interval '5 days');

    legs := outbox.fx_legs_at(v_from, v_to, v_at);
    leg1 := legs.leg1;
    leg2 := legs.leg2;
    IF leg1.id IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'no_data_found', CONSTRAINT = 'fx_rate_missing',
            MESSAGE = format('fx_rate_missing: no rate converts %s to %s at %s (no %s/%s, '
                             'no %s/%s, no common base)', v_from, v_to, v_at,
                             v_from, v_to, v_to, v_from),
            HINT = 'Import rates (outbox-relay fx import ecb|csv) or record a manual one.';
    END IF;
    v_rate := CASE WHEN leg2.id IS NOT NULL THEN round(leg2.rate / leg1.rate, 12)
                   WHEN leg1.base = v_from THEN leg1.rate
                   ELSE round(1 / leg1.rate, 12) END;

    -- The older leg decides: a cross rate is as stale as its staler half.
    stale := CASE WHEN leg2.id IS NOT NULL AND leg2.published_at < leg1.published_at
                  THEN leg2 ELSE leg1 END;
    IF v_at - stale.published_at > v_max THEN
        RAISE EXCEPTION USING ERRCODE = 'object_not_in_prerequisite_state',
            CONSTRAINT = 'fx_rate_stale',
            MESSAGE = format('fx_rate_stale: rate %s for %s/%s (%s %s) was published at %s, '
                             '%s before %s; a new conversion accepts at most %s',
                             stale.id, stale.base, stale.quote, stale.source_kind,
                             stale.source_name, stale.published_at,
                             justify_hours(date_trunc('second', v_at - stale.published_at)), v_at, v_max),
            HINT = 'Import a current rate (outbox-relay fx import ecb), or raise '
                   'outbox.fx_policy.max_rate_age if the source has not published since.';
    END IF;

    RETURN QUERY SELECT outbox.fx_convert_with(amount_minor, v_from, v_to, leg1, leg2), v_to,
                        v_rate, leg1.id, leg2.id, stale.published_at, v_at - stale.published_at;
END;
$$;

COMMENT ON FUNCTION outbox.convert_v1(bigint, text, text, timestamptz, interval) IS
    'amount_minor of from_ccy in to_ccy at the rate valid at `at` (default now()): exact '
    'NUMERIC arithmetic over both ISO 4217 exponents, rounded half to even; a direct rate, '
    'its inverse, or a cross rate through a common base (EUR first). Returns the amount, the '
    'rate applied (informative, 12 decimals), rate_id (and via_rate_id for a cross rate), '
    'and the rate''s publication time and age. Refuses a rate older than max_age (default '
    'outbox.fx_policy.max_rate_age) with fx_rate_stale, and a missing one with fx_rate_missing.';

CREATE FUNCTION outbox.convert_at_rates_v1(amount_minor bigint, from_ccy text, to_ccy text,
                                           rate_id bigint, via_rate_id bigint DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path TO 'pg_catalog', 'pg_temp'
AS $$
#variable_conflict use_variable
DECLARE
    leg1 outbox.fx_rates;
    leg2 outbox.fx_rates;
BEGIN
    SELECT r.* INTO leg1 FROM outbox.fx_rates AS r WHERE r.id = rate_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'no_data_found', CONSTRAINT = 'fx_rate_missing',
            MESSAGE = format('fx_rate_missing: no rate %s in outbox.fx_rates', rate_id);
    END IF;
    IF via_rate_id IS NOT NULL THEN
        SELECT r.* INTO leg2 FROM outbox.fx_rates AS r WHERE r.id = via_rate_id;
        IF NOT FOUND THEN
            RAISE EXCEPTION USING ERRCODE = 'no_data_found', CONSTRAINT = 'fx_rate_missing',
                MESSAGE = format('fx_rate_missing: no rate %s in outbox.fx_rates', via_rate_id);
        END IF;
    END IF;
    RETURN outbox.fx_convert_with(amount_minor, upper(from_ccy), upper(to_ccy), leg1, leg2);
END;
$$;

COMMENT ON FUNCTION outbox.convert_at_rates_v1(bigint, text, text, bigint, bigint) IS
    'amount_minor of from_ccy in to_ccy at the given rate rows, half to even, with no age '
    'check: what a recorded conversion comes to (a refund at its charge''s rate).';

-- ==========================================================================================
-- 4. Intents that were converted
-- ==========================================================================================

-- Nullable, no default: a catalog change, no table rewrite. The archive gets the same
-- columns in the same order (the relay moves rows with INSERT ... SELECT *).
ALTER TABLE outbox.payment_intents
    ADD COLUMN original_amount_minor bigint,
    ADD COLUMN original_currency text,
    ADD COLUMN fx_rate_id bigint,
    ADD COLUMN fx_via_rate_id bigint;
ALTER TABLE outbox.payment_intents_archive
    ADD COLUMN original_amount_minor bigint,
    ADD COLUMN original_currency text,
    ADD COLUMN fx_rate_id bigint,
    ADD COLUMN fx_via_rate_id bigint;

COMMENT ON COLUMN outbox.payment_intents.original_amount_minor IS
    'What the amount was before conversion, in original_currency''s minor units; with '
    'original_currency and fx_rate_id (all or none): amount_minor = '
    'outbox.convert_at_rates_v1(original_amount_minor, original_currency, currency, fx_rate_id, '
    'fx_via_rate_id).';
COMMENT ON COLUMN outbox.payment_intents.fx_via_rate_id IS
    'The second rate of a cross rate (base/currency), fx_rate_id being base/original_currency.';

-- NOT VALID: no scan under ACCESS EXCLUSIVE of the hot table (every existing row is NULL
-- in these columns); sql/0028 validates them.
ALTER TABLE outbox.payment_intents
    ADD CONSTRAINT payment_intents_fx_all_or_none CHECK (
        (original_amount_minor IS NULL) = (original_currency IS NULL)
        AND (original_currency IS NULL) = (fx_rate_id IS NULL)
        AND (fx_via_rate_id IS NULL OR fx_rate_id IS NOT NULL)) NOT VALID,
    ADD CONSTRAINT payment_intents_original_amount_positive
        CHECK (original_amount_minor > 0) NOT VALID,
    ADD CONSTRAINT payment_intents_original_currency_differs
        CHECK (original_currency <> currency) NOT VALID,
    ADD CONSTRAINT payment_intents_fx_rate_id_fkey
        FOREIGN KEY (fx_rate_id) REFERENCES outbox.fx_rates (id) NOT VALID,
    ADD CONSTRAINT payment_intents_fx_via_rate_id_fkey
        FOREIGN KEY (fx_via_rate_id) REFERENCES outbox.fx_rates (id) NOT VALID;

-- The same rules as named refusals before the row is written (a CHECK's error would show
-- the row, which may hold what sql/0009 keeps out of errors), plus the one a CHECK cannot
-- say: the charged amount is what the recorded rates give. Runs after
-- payment_intents_before_insert (trigger names in order), on its checked, upper-cased row.
CREATE FUNCTION outbox.payment_intents_fx_guard() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path TO 'pg_catalog', 'pg_temp'
AS $$
DECLARE
    expected bigint;
BEGIN
    IF NEW.original_amount_minor IS NULL OR NEW.original_currency IS NULL
       OR NEW.fx_rate_id IS NULL THEN
        PERFORM outbox.refuse_input('payment_intents', 'fx_rate_id', 'payment_intents_fx_all_or_none',
            'comes with original_amount_minor, original_currency and fx_rate_id: all three or none',
            'Send the three together, from outbox.convert_v1''s result, or none of them.');
    END IF;
    IF NEW.original_amount_minor <= 0 THEN
        PERFORM outbox.refuse_input('payment_intents', 'original_amount_minor',
            'payment_intents_original_amount_positive', 'is not positive');
    END IF;
    NEW.original_currency := upper(NEW.original_currency);
    IF NOT EXISTS (SELECT 1 FROM outbox.currencies WHERE code = NEW.original_currency) THEN
        PERFORM outbox.refuse_input('payment_intents', 'original_currency',
            'payment_intents_original_currency_known',
            'is not an ISO 4217 code with minor units',
            'Use a three-letter code listed in outbox.currencies, such as EUR, USD or JPY.');
    END IF;
    IF NEW.original_currency = NEW.currency THEN
        PERFORM outbox.refuse_input('payment_intents', 'original_currency',
            'payment_intents_original_currency_differs',
            'equals currency: nothing was converted',
            'Leave original_amount_minor, original_currency and fx_rate_id out.');
    END IF;
    IF NEW.amount_minor IS NULL THEN
        PERFORM outbox.refuse_input('payment_intents', 'amount_minor',
            'payment_intents_fx_amount_matches_rate',
            'is missing while original_amount_minor is given');
    END IF;
    expected := outbox.convert_at_rates_v1(NEW.original_amount_minor, NEW.original_currency,
                                          NEW.currency, NEW.fx_rate_id, NEW.fx_via_rate_id);
    IF expected <> NEW.amount_minor THEN
        RAISE EXCEPTION USING
            ERRCODE = 'check_violation',
            SCHEMA = 'outbox', TABLE = 'payment_intents', COLUMN = 'amount_minor',
            CONSTRAINT = 'payment_intents_fx_amount_matches_rate',
            MESSAGE = format('payment_intents.amount_minor %s is not what rate %s%s gives for '
                             '%s minor units of %s: %s minor units of %s',
                             NEW.amount_minor, NEW.fx_rate_id,
                             coalesce(' (via ' || NEW.fx_via_rate_id || ')', ''),
                             NEW.original_amount_minor, NEW.original_currency, expected,
                             NEW.currency),
            HINT = 'Take amount_minor and the rate ids from one call of outbox.convert_v1.';
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER payment_intents_fx_guard
    BEFORE INSERT ON outbox.payment_intents
    FOR EACH ROW
    WHEN (NEW.original_amount_minor IS NOT NULL OR NEW.original_currency IS NOT NULL
          OR NEW.fx_rate_id IS NOT NULL OR NEW.fx_via_rate_id IS NOT NULL)
    EXECUTE FUNCTION outbox.payment_intents_fx_guard();

-- The intent's audited document names the conversion when there was one (and only then,
-- so the documents of every other intent, and their chains' ends, stay as they were).
CREATE OR REPLACE FUNCTION outbox.audit_intent_doc(i outbox.payment_intents) RETURNS jsonb
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
    || CASE WHEN i.fx_rate_id IS NULL THEN '{}'::jsonb ELSE jsonb_strip_nulls(jsonb_build_object(
        'original_amount_minor', i.original_amount_minor,
        'original_currency', i.original_currency,
        'fx_rate_id', i.fx_rate_id, 'fx_via_rate_id', i.fx_via_rate_id)) END
$$;

-- ==========================================================================================
-- Grants (tests/test_least_privilege.py pins them)
-- ==========================================================================================

REVOKE ALL ON FUNCTION outbox.fx_rates_before_insert(), outbox.fx_rates_refuse_change(),
    outbox.audit_fx_rate_doc(outbox.fx_rates), outbox.fx_rates_audit(),
    outbox.fx_div_half_even(numeric, numeric), outbox.fx_rate_at(text, text, timestamptz),
    outbox.fx_exponent(text, text),
    outbox.fx_legs_at(text, text, timestamptz),
    outbox.fx_convert_with(bigint, text, text, outbox.fx_rates, outbox.fx_rates),
    outbox.convert_v1(bigint, text, text, timestamptz, interval),
    outbox.convert_at_rates_v1(bigint, text, text, bigint, bigint),
    outbox.payment_intents_fx_guard()
    FROM PUBLIC;
REVOKE ALL ON outbox.fx_policy FROM PUBLIC;

-- Applications: convert in their transaction, read the rates, record a converted intent.
GRANT SELECT ON outbox.fx_rates, outbox.fx_policy TO outbox_app;
GRANT EXECUTE ON FUNCTION outbox.convert_v1(bigint, text, text, timestamptz, interval),
    outbox.convert_at_rates_v1(bigint, text, text, bigint, bigint)
    TO outbox_app, outbox_relay, outbox_operator;
GRANT INSERT (original_amount_minor, original_currency, fx_rate_id, fx_via_rate_id)
    ON outbox.payment_intents TO outbox_app;

-- The relay: the opt-in periodic ECB fetch (fx_insert_rates) and the rate-age gauge.
GRANT SELECT ON outbox.fx_rates, outbox.fx_policy TO outbox_relay;
GRANT INSERT (base, quote, rate, source_kind, source_name, source_url, source_sha256,
              published_at, fetched_at, valid_from, valid_until)
    ON outbox.fx_rates TO outbox_relay;

-- Operators: `fx import`, `fx show|history|convert`, `audit verify` (the rate documents).
GRANT SELECT ON outbox.fx_rates, outbox.fx_policy TO outbox_operator;
GRANT INSERT (base, quote, rate, source_kind, source_name, source_url, source_sha256,
              operator, published_at, fetched_at, valid_from, valid_until)
    ON outbox.fx_rates TO outbox_operator;
GRANT EXECUTE ON FUNCTION outbox.audit_fx_rate_doc(outbox.fx_rates) TO outbox_operator;
