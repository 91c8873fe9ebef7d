-- outbox-relay core schema: the app-facing intents table, payments, currencies.
--
-- Public contract (applications INSERT into outbox.payment_intents and read outcomes):
-- columns payment_id, action, provider, amount_minor, currency, payment_method,
-- idempotency_key, metadata are written by the application; every other column belongs
-- to the relay and is reset by the insert trigger whatever the application sends.

CREATE SCHEMA IF NOT EXISTS outbox;

CREATE TABLE outbox.currencies (
    code          text PRIMARY KEY CONSTRAINT currencies_code_format CHECK (code ~ '^[A-Z]{3}$'),
    numeric_code  smallint,
    exponent      smallint NOT NULL CONSTRAINT currencies_exponent_range CHECK (exponent BETWEEN 0 AND 4),
    name          text NOT NULL
);
COMMENT ON TABLE outbox.currencies IS
    'ISO 4217 codes and minor-unit exponents; rows come from sql/0002_pre_currencies.sql, generated from the iso4217 package.';

-- One row: salts derived idempotency keys so two databases sharing a provider account
-- (staging and a restored copy, say) never send the same key for different intents.
CREATE TABLE outbox.installation (
    singleton        boolean PRIMARY KEY DEFAULT true CONSTRAINT installation_single_row CHECK (singleton),
    installation_id  uuid NOT NULL DEFAULT gen_random_uuid(),
    created_at       timestamptz NOT NULL DEFAULT now()
);
INSERT INTO outbox.installation DEFAULT VALUES ON CONFLICT DO NOTHING;

CREATE TABLE outbox.payments (
    payment_id          text PRIMARY KEY,
    provider            text NOT NULL,
    currency            text NOT NULL REFERENCES outbox.currencies (code),
    state               text NOT NULL DEFAULT 'new'
        CONSTRAINT payments_state_valid CHECK (state IN (
            'new', 'authorized', 'captured', 'partially_refunded', 'refunded', 'voided', 'failed')),
    authorized_minor    bigint NOT NULL DEFAULT 0 CONSTRAINT payments_authorized_not_negative CHECK (authorized_minor >= 0),
    captured_minor      bigint NOT NULL DEFAULT 0,
    refunded_minor      bigint NOT NULL DEFAULT 0,
    provider_reference  text,
    -- Position handed to the next intent of this payment; bumped under this row's lock.
    next_seq            bigint NOT NULL DEFAULT 1,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT payments_captured_within_authorized CHECK (captured_minor BETWEEN 0 AND authorized_minor),
    CONSTRAINT payments_refunded_within_captured CHECK (refunded_minor BETWEEN 0 AND captured_minor)
) WITH (fillfactor = 80);

CREATE SEQUENCE outbox.lease_token_seq AS bigint;

CREATE TABLE outbox.payment_intents (
    id                    bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- written by the application
    payment_id            text NOT NULL
        CONSTRAINT payment_intents_payment_id_nonblank_max_200 CHECK (payment_id ~ '\S' AND length(payment_id) <= 200),
    action                text NOT NULL
        CONSTRAINT payment_intents_action_valid CHECK (action IN ('authorize', 'capture', 'charge', 'void', 'refund')),
    provider              text NOT NULL
        CONSTRAINT payment_intents_provider_lowercase_identifier CHECK (provider ~ '^[a-z][a-z0-9_]{0,62}$'),
    amount_minor          bigint
        CONSTRAINT payment_intents_amount_minor_positive CHECK (amount_minor > 0),
    currency              text NOT NULL,
    payment_method        text
        CONSTRAINT payment_intents_payment_method_token_format CHECK (payment_method ~ '^[A-Za-z0-9_]{3,255}$'),
    idempotency_key       text
        CONSTRAINT payment_intents_idempotency_key_printable_max_255 CHECK (idempotency_key ~ '^[!-~]{1,255}$'),
    metadata              jsonb NOT NULL DEFAULT '{}'::jsonb
        CONSTRAINT payment_intents_metadata_is_object CHECK (jsonb_typeof(metadata) = 'object')
        CONSTRAINT payment_intents_metadata_max_16kb CHECK (pg_column_size(metadata) <= 16384),
    -- written by the relay
    status                text NOT NULL DEFAULT 'pending'
        CONSTRAINT payment_intents_status_valid CHECK (status IN (
            'blocked', 'pending', 'in_flight', 'succeeded', 'failed', 'dead')),
    payment_seq           bigint NOT NULL DEFAULT 0,
    attempts              integer NOT NULL DEFAULT 0,
    available_at          timestamptz NOT NULL DEFAULT now(),
    lease_token           bigint,
    lease_expires_at      timestamptz,
    claimed_by            text,
    amount_applied_minor  bigint,
    provider_reference    text,
    error_code            text,
    error_message         text,
    created_at            timestamptz NOT NULL DEFAULT now(),
    updated_at            timestamptz NOT NULL DEFAULT now(),
    completed_at          timestamptz,
    CONSTRAINT payment_intents_amount_minor_required_for_authorize_charge
        CHECK (action NOT IN ('authorize', 'charge') OR amount_minor IS NOT NULL),
    CONSTRAINT payment_intents_payment_method_required_for_authorize_charge
        CHECK (action NOT IN ('authorize', 'charge') OR payment_method IS NOT NULL),
    CONSTRAINT payment_intents_in_flight_has_lease
        CHECK (status <> 'in_flight' OR (lease_token IS NOT NULL AND lease_expires_at IS NOT NULL))
) WITH (fillfactor = 80);

COMMENT ON COLUMN outbox.payment_intents.status IS
    'blocked: waits for an earlier intent of the same payment (the write-back that ends it promotes this one); '
    'pending: claimable once available_at has passed (a relay claims it); '
    'in_flight: a relay holds the lease (its write-back, or lease expiry, moves it on); '
    'succeeded / failed: terminal; '
    'dead: gave up or invalid, waits for an operator, and blocks later intents of its payment.';

-- A key reused for a second intent would make the provider replay the first result:
-- silent loss of the second effect. Refuse it at INSERT.
CREATE UNIQUE INDEX payment_intents_idempotency_key_unique
    ON outbox.payment_intents (provider, idempotency_key);
-- The claim: a plain SKIP LOCKED scan over eligible rows, O(batch).
CREATE INDEX payment_intents_claimable_idx
    ON outbox.payment_intents (provider, available_at, id) WHERE status = 'pending';
CREATE INDEX payment_intents_lease_expiry_idx
    ON outbox.payment_intents (lease_expires_at) WHERE status = 'in_flight';
-- Unresolved intents of a payment, in order: the insert trigger and promotion read it.
CREATE INDEX payment_intents_unresolved_by_payment_idx
    ON outbox.payment_intents (payment_id, payment_seq)
    WHERE status IN ('blocked', 'pending', 'in_flight', 'dead');
CREATE INDEX payment_intents_payment_idx ON outbox.payment_intents (payment_id, payment_seq);

-- True when the text holds a run of 13 to 19 digits (spaces or dashes allowed between
-- them) that passes the Luhn check: a raw card number, which must never be stored.
CREATE FUNCTION outbox.looks_like_card_number(candidate text) RETURNS boolean
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
DECLARE
    run     text;
    digits  text;
    total   int;
    d       int;
    i       int;
BEGIN
    IF candidate IS NULL THEN
        RETURN false;
    END IF;
    -- Cheap bound for hostile input: no token is this long, and the caller refuses it.
    IF length(candidate) > 1024 THEN
        RETURN false;
    END IF;
    FOR run IN SELECT m[1] FROM regexp_matches(candidate, '([0-9](?:[ -]?[0-9]){12,})', 'g') AS m LOOP
        digits := regexp_replace(run, '[ -]', '', 'g');
        CONTINUE WHEN length(digits) NOT BETWEEN 13 AND 19;
        total := 0;
        FOR i IN 0 .. length(digits) - 1 LOOP
            d := substr(digits, length(digits) - i, 1)::int;
            IF i % 2 = 1 THEN
                d := d * 2;
                IF d > 9 THEN d := d - 9; END IF;
            END IF;
            total := total + d;
        END LOOP;
        IF total % 10 = 0 THEN
            RETURN true;
        END IF;
    END LOOP;
    RETURN false;
END;
$$;

CREATE FUNCTION outbox.payment_intents_before_insert() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    pay       outbox.payments%ROWTYPE;
    install   uuid;
BEGIN
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

    -- Checked first, so no later error can echo a card number back in its DETAIL.
    IF outbox.looks_like_card_number(NEW.payment_method) THEN
        RAISE EXCEPTION USING
            ERRCODE = 'check_violation',
            SCHEMA = 'outbox', TABLE = 'payment_intents', COLUMN = 'payment_method',
            CONSTRAINT = 'payment_intents_payment_method_not_card_number',
            MESSAGE = 'payment_intents.payment_method looks like a raw card number '
                      '(13 to 19 digits passing the Luhn check); it was not stored',
            HINT = 'Tokenise the card with the provider and send its token (pm_...).';
    END IF;

    IF length(NEW.payment_method) > 255 THEN
        RAISE EXCEPTION USING
            ERRCODE = 'check_violation',
            SCHEMA = 'outbox', TABLE = 'payment_intents', COLUMN = 'payment_method',
            CONSTRAINT = 'payment_intents_payment_method_token_format',
            MESSAGE = format('payment_intents.payment_method is %s characters long; a provider token has at most 255',
                             length(NEW.payment_method));
    END IF;

    -- NULLs and malformed values are left to the column constraints, which name them.
    IF NEW.payment_id IS NULL OR NEW.provider IS NULL OR NEW.currency IS NULL OR NEW.action IS NULL THEN
        RETURN NEW;
    END IF;

    NEW.currency := upper(NEW.currency);
    IF NOT EXISTS (SELECT 1 FROM outbox.currencies WHERE code = NEW.currency) THEN
        RAISE EXCEPTION USING
            ERRCODE = 'foreign_key_violation',
            SCHEMA = 'outbox', TABLE = 'payment_intents', COLUMN = 'currency',
            CONSTRAINT = 'payment_intents_currency_known',
            MESSAGE = format('payment_intents.currency %s is not an ISO 4217 code with minor units',
                             CASE WHEN NEW.currency ~ '^[A-Z]{1,8}$' THEN quote_literal(NEW.currency)
                                  ELSE '(value withheld)' END),
            HINT = 'Use a three-letter code listed in outbox.currencies, such as EUR, USD or JPY.';
    END IF;

    -- Lock the payment row: concurrent inserts for one payment queue here, which gives
    -- each intent its position (payment_seq) in commit order.
    INSERT INTO outbox.payments AS p (payment_id, provider, currency)
    VALUES (NEW.payment_id, NEW.provider, NEW.currency)
    ON CONFLICT (payment_id) DO UPDATE SET next_seq = p.next_seq + 1, updated_at = now()
    RETURNING * INTO pay;

    IF pay.currency <> NEW.currency THEN
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
    -- so a dead intent stalls its own payment until an operator resolves it).
    IF EXISTS (
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
    RETURN NEW;
END;
$$;

CREATE TRIGGER payment_intents_before_insert
    BEFORE INSERT ON outbox.payment_intents
    FOR EACH ROW EXECUTE FUNCTION outbox.payment_intents_before_insert();

-- One wake-up per statement, not per row: a NOTIFY per row would serialise the
-- application's commits on the notification queue lock.
CREATE FUNCTION outbox.payment_intents_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('outbox_payment_intents', '');
    RETURN NULL;
END;
$$;

CREATE TRIGGER payment_intents_notify
    AFTER INSERT ON outbox.payment_intents
    FOR EACH STATEMENT EXECUTE FUNCTION outbox.payment_intents_notify();
