-- Refunds of converted charges, settlement in another currency, and the FX difference
-- journal (issue 22, after sql/0027).
--
-- 1. A refund of a converted charge uses the charge's rate by default: the customer gets
--    back what they paid, in their currency, and the refund intent records the charge's
--    original currency, rate(s), and what the refund is worth at that rate
--    (original_amount_minor). A refund intent's recorded conversion runs the other way
--    from a charge's: original_amount_minor is what amount_minor gives at the rate(s).
-- 2. outbox.fx_postings: the FX difference account's journal. When a refund of a
--    converted charge succeeds, the difference between its worth at the charge's rate and
--    at the rate in force now is posted, in the charge's original currency, in the same
--    transaction as the refund's outcome; when reconciliation finds a charge or refund
--    the provider settled in another currency, the difference between the provider's
--    settled amount and ours (at our rate) is posted in the account's currency. Each row
--    is a balanced double entry (outbox.fx_ledger_entries); rows are never changed or
--    deleted, and every insert is in the audit trail.
-- 3. reconciliation_exceptions.kind gains fx_rate_drift: a settlement whose amount is
--    further from ours than the configured tolerance (RELAY_RECONCILE_FX_TOLERANCE_BPS).

-- ==========================================================================================
-- 2. The journal (first: the refund trigger below writes to it)
-- ==========================================================================================

CREATE TABLE outbox.fx_postings (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind text NOT NULL,
    payment_id text NOT NULL,
    intent_id bigint,
    provider text NOT NULL,
    provider_reference text,
    source_currency text NOT NULL REFERENCES outbox.currencies (code),
    source_amount_minor bigint NOT NULL,
    currency text NOT NULL REFERENCES outbox.currencies (code),
    expected_minor bigint NOT NULL,
    actual_minor bigint NOT NULL,
    difference_minor bigint GENERATED ALWAYS AS (actual_minor - expected_minor) STORED,
    our_rate_id bigint REFERENCES outbox.fx_rates (id),
    our_via_rate_id bigint REFERENCES outbox.fx_rates (id),
    compared_rate_id bigint REFERENCES outbox.fx_rates (id),
    compared_via_rate_id bigint REFERENCES outbox.fx_rates (id),
    provider_rate text,
    posted_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    posted_by text NOT NULL DEFAULT '',
    CONSTRAINT fx_postings_kind_valid CHECK (kind IN ('refund_at_charge_rate', 'settlement')),
    CONSTRAINT fx_postings_source_amount_positive CHECK (source_amount_minor > 0),
    CONSTRAINT fx_postings_currencies_differ CHECK (source_currency <> currency),
    CONSTRAINT fx_postings_refund_names_intent
        CHECK (kind <> 'refund_at_charge_rate' OR (intent_id IS NOT NULL AND our_rate_id IS NOT NULL)),
    CONSTRAINT fx_postings_settlement_names_transaction
        CHECK (kind <> 'settlement' OR provider_reference IS NOT NULL),
    CONSTRAINT fx_postings_provider_rate_decimal CHECK (provider_rate ~ '^[0-9]+(\.[0-9]+)?$')
);
COMMENT ON TABLE outbox.fx_postings IS
    'The FX difference account''s journal: per refund of a converted charge (its worth at '
    'the charge''s rate against the rate in force when it succeeded, in the original '
    'currency) and per settlement in another currency (the provider''s settled amount against '
    'ours at our rate, in the account''s currency). difference_minor = actual - expected. '
    'Entries: outbox.fx_ledger_entries. Never changed or deleted; audited (entity fx_posting).';

CREATE UNIQUE INDEX fx_postings_refund_once ON outbox.fx_postings (intent_id)
    WHERE kind = 'refund_at_charge_rate';
CREATE UNIQUE INDEX fx_postings_settlement_once ON outbox.fx_postings (provider, provider_reference)
    WHERE kind = 'settlement';
CREATE INDEX fx_postings_payment_idx ON outbox.fx_postings (payment_id);

CREATE FUNCTION outbox.fx_postings_before_insert() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path TO 'pg_catalog', 'pg_temp'
AS $$
BEGIN
    NEW.posted_by := outbox.audit_actor();
    NEW.posted_at := clock_timestamp();
    RETURN NEW;
END;
$$;
CREATE TRIGGER fx_postings_before_insert
    BEFORE INSERT ON outbox.fx_postings
    FOR EACH ROW EXECUTE FUNCTION outbox.fx_postings_before_insert();
CREATE TRIGGER fx_postings_append_only
    BEFORE UPDATE OR DELETE ON outbox.fx_postings
    FOR EACH ROW EXECUTE FUNCTION outbox.refuse_change();
CREATE TRIGGER fx_postings_no_truncate
    BEFORE TRUNCATE ON outbox.fx_postings
    FOR EACH STATEMENT EXECUTE FUNCTION outbox.refuse_change();
CREATE TRIGGER fx_postings_audit
    AFTER INSERT ON outbox.fx_postings
    FOR EACH ROW EXECUTE FUNCTION outbox.audit_generic('fx_posting', 'id',
        'id,kind,payment_id,intent_id,provider,provider_reference,source_currency,'
        'source_amount_minor,currency,expected_minor,actual_minor,difference_minor,our_rate_id,'
        'our_via_rate_id,compared_rate_id,compared_via_rate_id,provider_rate,posted_at,posted_by');

REVOKE ALL ON outbox.fx_postings FROM PUBLIC;
REVOKE UPDATE, DELETE, TRUNCATE ON outbox.fx_postings FROM CURRENT_USER;

-- Each posting as balanced entries in its currency (debit > 0, credit < 0; zero lines left
-- out), accounts named as the ledger's (<provider>:<account>):
--   refund_at_charge_rate: refunded_converted debit expected (the refund as the charge's rate
--     values it), fx_difference debit actual - expected (a loss when the refund costs more
--     today; negative: a gain), refund_cost credit actual (what it costs at today's rate).
--   settlement: settled debit actual (what the provider settled), receivable_converted
--     credit expected (what our rate expected), fx_difference debit expected - actual (a loss
--     when the provider settled less).
CREATE VIEW outbox.fx_ledger_entries AS
SELECT p.id AS posting_id, p.kind, p.payment_id, p.provider || ':' || e.account AS account,
       p.currency, e.amount_minor
FROM outbox.fx_postings AS p
CROSS JOIN LATERAL (VALUES
    (1, CASE WHEN p.kind = 'refund_at_charge_rate' THEN 'refunded_converted' ELSE 'settled' END,
        CASE WHEN p.kind = 'refund_at_charge_rate' THEN p.expected_minor ELSE p.actual_minor END),
    (2, 'fx_difference',
        CASE WHEN p.kind = 'refund_at_charge_rate' THEN p.actual_minor - p.expected_minor
             ELSE p.expected_minor - p.actual_minor END),
    (3, CASE WHEN p.kind = 'refund_at_charge_rate' THEN 'refund_cost' ELSE 'receivable_converted' END,
        CASE WHEN p.kind = 'refund_at_charge_rate' THEN -p.actual_minor ELSE -p.expected_minor END)
) AS e(n, account, amount_minor)
WHERE e.amount_minor <> 0;
COMMENT ON VIEW outbox.fx_ledger_entries IS
    'outbox.fx_postings as balanced double entries per currency; sum(amount_minor) by posting is 0.';

-- ==========================================================================================
-- 1. Refunds of converted charges
-- ==========================================================================================

-- The payment's converted charge (or authorisation): its original currency and rate(s).
CREATE FUNCTION outbox.fx_charge_conversion(p_payment_id text,
    OUT original_currency text, OUT fx_rate_id bigint, OUT fx_via_rate_id bigint)
LANGUAGE sql STABLE AS $$
    SELECT c.original_currency, c.fx_rate_id, c.fx_via_rate_id
    FROM (
        SELECT payment_seq, original_currency, fx_rate_id, fx_via_rate_id
        FROM outbox.payment_intents
        WHERE payment_id = p_payment_id AND action IN ('charge', 'authorize')
          AND fx_rate_id IS NOT NULL
        UNION ALL
        SELECT payment_seq, original_currency, fx_rate_id, fx_via_rate_id
        FROM outbox.payment_intents_archive
        WHERE payment_id = p_payment_id AND action IN ('charge', 'authorize')
          AND fx_rate_id IS NOT NULL
    ) AS c
    ORDER BY c.payment_seq
    LIMIT 1
$$;

-- amount_minor of the payment's currency back into the charge's original currency at the
-- charge's rate(s): a cross rate's legs are taken the other way round.
CREATE FUNCTION outbox.fx_back_at_charge_rate(p_amount bigint, p_currency text,
    p_original text, p_rate_id bigint, p_via_rate_id bigint)
RETURNS bigint
LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN p_via_rate_id IS NULL
                THEN outbox.convert_at_rates_v1(p_amount, p_currency, p_original, p_rate_id)
                ELSE outbox.convert_at_rates_v1(p_amount, p_currency, p_original, p_via_rate_id,
                                                p_rate_id) END
$$;

-- A refund with an amount and no conversion of its own, of a payment whose charge was
-- converted, takes the charge's rate: what the amount is worth at it is recorded beside it.
CREATE FUNCTION outbox.payment_intents_fx_charge_rate() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path TO 'pg_catalog', 'pg_temp'
AS $$
DECLARE
    charge record;
BEGIN
    -- SELECT INTO, not :=, so that no converted charge is a row of NULLs.
    SELECT * INTO charge FROM outbox.fx_charge_conversion(NEW.payment_id);
    IF charge.fx_rate_id IS NOT NULL AND charge.original_currency <> NEW.currency THEN
        NEW.original_currency := charge.original_currency;
        NEW.fx_rate_id := charge.fx_rate_id;
        NEW.fx_via_rate_id := charge.fx_via_rate_id;
        NEW.original_amount_minor := outbox.fx_back_at_charge_rate(
            NEW.amount_minor, NEW.currency, charge.original_currency, charge.fx_rate_id,
            charge.fx_via_rate_id);
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER payment_intents_fx_charge_rate
    BEFORE INSERT ON outbox.payment_intents
    FOR EACH ROW
    WHEN (NEW.action = 'refund' AND NEW.amount_minor IS NOT NULL
          AND NEW.original_amount_minor IS NULL AND NEW.original_currency IS NULL
          AND NEW.fx_rate_id IS NULL AND NEW.fx_via_rate_id IS NULL)
    EXECUTE FUNCTION outbox.payment_intents_fx_charge_rate();

-- The guard of sql/0027, with a refund's direction: the refund's amount is what the
-- customer gets back in the charged currency, original_amount_minor its worth at the rate.
CREATE OR REPLACE FUNCTION outbox.payment_intents_fx_guard() RETURNS trigger
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
    IF NEW.action = 'refund' THEN
        expected := outbox.fx_back_at_charge_rate(NEW.amount_minor, NEW.currency,
                                                  NEW.original_currency, NEW.fx_rate_id,
                                                  NEW.fx_via_rate_id);
        IF expected <> NEW.original_amount_minor THEN
            RAISE EXCEPTION USING
                ERRCODE = 'check_violation',
                SCHEMA = 'outbox', TABLE = 'payment_intents', COLUMN = 'original_amount_minor',
                CONSTRAINT = 'payment_intents_fx_amount_matches_rate',
                MESSAGE = format('payment_intents.original_amount_minor %s is not what rate %s%s '
                                 'gives for the refund of %s minor units of %s: %s minor units of %s',
                                 NEW.original_amount_minor, NEW.fx_rate_id,
                                 coalesce(' (via ' || NEW.fx_via_rate_id || ')', ''),
                                 NEW.amount_minor, NEW.currency, expected, NEW.original_currency),
                HINT = 'Leave the conversion out of a refund: it takes the charge''s rate.';
        END IF;
        RETURN NEW;
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

-- When a refund of a converted charge succeeds, post what the refunded amount is worth at
-- the charge's rate against the rate in force now, in the same transaction as the outcome.
-- No age check: the difference is booked with the newest rate there is (the charge's own
-- at worst, a difference of 0), never refused, so a write-back cannot fail here.
CREATE FUNCTION outbox.payment_intents_fx_refund_difference() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path TO 'pg_catalog', 'pg_temp'
SET jit TO 'off'
AS $$
DECLARE
    r       record;
    charge  record;
    legs    record;
    at_charge bigint;
    at_now    bigint;
    now_rate  bigint;
    now_via   bigint;
BEGIN
    FOR r IN
        SELECT n.id, n.payment_id, n.provider, n.currency, n.amount_applied_minor
        FROM new_rows AS n
        JOIN old_rows AS o ON o.id = n.id
        WHERE n.action = 'refund' AND n.status = 'succeeded'
          AND o.status IS DISTINCT FROM 'succeeded' AND n.amount_applied_minor > 0
        ORDER BY n.id
    LOOP
        SELECT * INTO charge FROM outbox.fx_charge_conversion(r.payment_id);
        CONTINUE WHEN charge.fx_rate_id IS NULL OR charge.original_currency = r.currency;
        at_charge := outbox.fx_back_at_charge_rate(r.amount_applied_minor, r.currency,
                                                   charge.original_currency, charge.fx_rate_id,
                                                   charge.fx_via_rate_id);
        legs := outbox.fx_legs_at(r.currency, charge.original_currency, now());
        IF (legs.leg1).id IS NULL THEN
            -- Nothing in force any more (the charge's rate had a valid_until): no newer
            -- rate to compare with, so no difference.
            at_now := at_charge;
            now_rate := charge.fx_rate_id;
            now_via := charge.fx_via_rate_id;
        ELSE
            at_now := outbox.fx_convert_with(r.amount_applied_minor, r.currency,
                                             charge.original_currency, legs.leg1, legs.leg2);
            now_rate := (legs.leg1).id;
            now_via := (legs.leg2).id;
        END IF;
        INSERT INTO outbox.fx_postings
            (kind, payment_id, intent_id, provider, source_currency, source_amount_minor,
             currency, expected_minor, actual_minor, our_rate_id, our_via_rate_id,
             compared_rate_id, compared_via_rate_id)
        VALUES ('refund_at_charge_rate', r.payment_id, r.id, r.provider, r.currency,
                r.amount_applied_minor, charge.original_currency, at_charge, at_now,
                charge.fx_rate_id, charge.fx_via_rate_id, now_rate, now_via)
        ON CONFLICT (intent_id) WHERE kind = 'refund_at_charge_rate' DO NOTHING;
    END LOOP;
    RETURN NULL;
END;
$$;

CREATE TRIGGER payment_intents_fx_refund_difference
    AFTER UPDATE ON outbox.payment_intents
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION outbox.payment_intents_fx_refund_difference();

-- ==========================================================================================
-- 3. Reconciliation: a settlement at a drifted rate
-- ==========================================================================================

-- Wider, never narrower: the previous release writes none of the new kind. NOT VALID:
-- no scan under ACCESS EXCLUSIVE; sql/0030 validates it.
ALTER TABLE outbox.reconciliation_exceptions
    DROP CONSTRAINT reconciliation_exceptions_kind_valid,
    ADD CONSTRAINT reconciliation_exceptions_kind_valid CHECK (kind IN (
        'missing_internal', 'missing_at_provider', 'amount_mismatch', 'currency_mismatch',
        'status_mismatch', 'unexpected_fee', 'dispute', 'external_change', 'fx_rate_drift'))
        NOT VALID;

-- ==========================================================================================
-- Grants (tests/test_least_privilege.py pins them)
-- ==========================================================================================

REVOKE ALL ON FUNCTION outbox.fx_postings_before_insert(),
    outbox.fx_charge_conversion(text), outbox.fx_back_at_charge_rate(bigint, text, text, bigint, bigint),
    outbox.payment_intents_fx_charge_rate(), outbox.payment_intents_fx_refund_difference()
    FROM PUBLIC;
REVOKE ALL ON outbox.fx_ledger_entries FROM PUBLIC;

-- Reconciliation (`outbox-relay reconcile`, the operator) posts settlement differences;
-- everyone who reads the ledger reads the journal.
GRANT SELECT ON outbox.fx_postings, outbox.fx_ledger_entries TO outbox_operator;
-- The relay's depth sampler sums the journal for the FX difference gauge (fx_difference_totals).
GRANT SELECT ON outbox.fx_postings TO outbox_relay;
GRANT INSERT (kind, payment_id, intent_id, provider, provider_reference, source_currency,
              source_amount_minor, currency, expected_minor, actual_minor, our_rate_id,
              our_via_rate_id, compared_rate_id, compared_via_rate_id, provider_rate)
    ON outbox.fx_postings TO outbox_operator;
