-- The application's INSERT writes one row: its intent.
--
-- Until now an INSERT into outbox.payment_intents also upserted the payment's row in
-- outbox.payments (the lock that orders a payment's intents, and its next_seq) and wrote
-- two audit rows (the new intent's and, for a new payment, the payment's), each hashed.
-- Four heap rows and a dozen index entries in the application's commit: its INSERT ran at
-- about half the rate of the same table without triggers (benchmarks/insert_cost.py,
-- docs/performance.md). A trigger that only reads (index probes, an advisory lock) costs
-- the application next to nothing; the extra rows were the cost. So:
--
-- * The per-payment lock no longer needs the payment's row to exist. A payment's row is
--   created by the first change of one of its intents (normally the relay's first claim,
--   audited there as the relay's insert). Until then a transaction-level advisory lock on
--   the payment id stands in for the row's lock (outbox.lock_payment). The writers that
--   change intents of a payment (the relay's write-back and orphan sweep, the operators'
--   re-drive and cancel) take both, advisory lock first (outbox.lock_payments). An INSERT
--   takes the row's lock when the row exists, else the advisory lock when another
--   transaction inserted intents of the payment, else none: no other transaction can see
--   the payment, so nothing can promote or order behind its new intents. A bulk INSERT (an
--   import of authorize and capture pairs, a nightly batch of captures) therefore takes
--   advisory locks only for payments another transaction inserted and no relay has claimed
--   yet: advisory locks share the server's lock table (max_locks_per_transaction, about
--   6,400 locks with the defaults), row locks have no count limit.
-- * payment_seq is the payment's highest position so far (live or archived) plus one,
--   read under that lock; a unique index on (payment_id, payment_seq) makes a writer that
--   read a stale position fail instead of sharing it. Two transactions inserting the first
--   intents of one payment at once: the second fails with unique_violation on
--   payment_intents_payment_seq_unique, and a retry orders it behind the first.
--   The payment's provider and currency are checked against its latest intent.
-- * An intent's creation is still in the audit trail, with the same document, the
--   inserting actor and the insert's time, but it is written by the first change of the
--   intent (its claim, promotion or an operator's command), in that transaction, as the
--   first row of its chain. The inserting actor is kept in the new column created_by. An
--   intent no one has touched yet has no chain: `audit verify` accepts that only while the
--   row is exactly as inserted (pending or blocked, never attempted, never updated).
-- * Every check an INSERT needs runs in the one insert trigger (section 2): the input
--   guards, the archived-key and traceparent checks and the wake-up, each with the same
--   rule name and message as before; a new payment's INSERT runs one query. The old
--   trigger's card-number scan of payment_method is gone: sql/0013's rule refuses any run
--   of 13 digits in it first.
--
-- The application's INSERT now runs at 0.83 to 0.87 of the trigger-less table's rate with
-- a Python client (docs/performance.md); it was 0.43 to 0.58. The relay pays part of it:
-- a payment's first claim writes its row and the creation's audit rows.
--
-- Older relays: the one break with the rule that a migration never changes what an earlier
-- release uses. An earlier relay's claim joins the payment's row, so it cannot claim a
-- payment's first intent inserted after this migration. Such an intent waits, pending, for
-- a relay of this release; nothing is lost or sent twice (an earlier relay's write-back
-- locks rows, and an INSERT locks the row whenever one exists). README, "Upgrades".
--
-- Isolation: an application inserting under READ COMMITTED (the default) reads the latest
-- committed intents after the lock is granted. Under REPEATABLE READ or SERIALIZABLE its
-- snapshot may predate an intent of the same payment committed by another transaction:
-- the INSERT then fails (a serialization failure, or unique_violation on
-- payment_intents_payment_seq_unique) and the application retries it, as it retried the
-- serialization failure the payment row's update raised before.

ALTER TABLE outbox.payment_intents ADD COLUMN created_by text;
-- The archive takes rows with SELECT * (relay/queries.sql, archive_terminal_intents).
ALTER TABLE outbox.payment_intents_archive ADD COLUMN created_by text;
COMMENT ON COLUMN outbox.payment_intents.created_by IS
    'Who inserted the intent, as the audit trail names writers (outbox.audit_actor); set by the insert trigger. '
    'The intent''s first audit row, written by its first change, carries it.';

CREATE UNIQUE INDEX payment_intents_payment_seq_unique
    ON outbox.payment_intents (payment_id, payment_seq);
DROP INDEX outbox.payment_intents_payment_idx;

-- 0. The same CHECK rules, cheaper ------------------------------------------------------------
-- A bounded repetition such as {3,255} makes PostgreSQL's regular expression engine build a
-- large automaton on every match: '^[A-Za-z0-9_]{3,255}$' costs about 30 us a row,
-- '^[!-~]{1,255}$' 15 us, every INSERT and every UPDATE that touches the row. A class match
-- and a length test state the same rule for under 1 us. Same names, same rows accepted.
ALTER TABLE outbox.payment_intents
    DROP CONSTRAINT payment_intents_payment_method_token_format,
    ADD CONSTRAINT payment_intents_payment_method_token_format
        CHECK (payment_method ~ '^[A-Za-z0-9_]+$' AND length(payment_method) BETWEEN 3 AND 255) NOT VALID,
    DROP CONSTRAINT payment_intents_idempotency_key_printable_max_255,
    ADD CONSTRAINT payment_intents_idempotency_key_printable_max_255
        CHECK (idempotency_key ~ '^[!-~]+$' AND length(idempotency_key) <= 255) NOT VALID,
    DROP CONSTRAINT payment_intents_provider_lowercase_identifier,
    ADD CONSTRAINT payment_intents_provider_lowercase_identifier
        CHECK (provider ~ '^[a-z][a-z0-9_]*$' AND length(provider) <= 63) NOT VALID;
ALTER TABLE outbox.payment_intents VALIDATE CONSTRAINT payment_intents_payment_method_token_format;
ALTER TABLE outbox.payment_intents VALIDATE CONSTRAINT payment_intents_idempotency_key_printable_max_255;
ALTER TABLE outbox.payment_intents VALIDATE CONSTRAINT payment_intents_provider_lowercase_identifier;
ALTER TABLE outbox.events
    DROP CONSTRAINT events_exchange_name_format,
    ADD CONSTRAINT events_exchange_name_format
        CHECK (exchange ~ '^[A-Za-z0-9_.:-]+$' AND length(exchange) <= 255) NOT VALID,
    DROP CONSTRAINT events_event_type_format,
    ADD CONSTRAINT events_event_type_format
        CHECK (event_type ~ '^[!-~]+$' AND length(event_type) <= 255) NOT VALID;
ALTER TABLE outbox.events VALIDATE CONSTRAINT events_exchange_name_format;
ALTER TABLE outbox.events VALIDATE CONSTRAINT events_event_type_format;

-- 1. The payment lock ----------------------------------------------------------------------

-- 0x4F425852, 'OBXR': the class id of the two-key advisory lock space that holds payment
-- locks, so they never meet an application's one-key advisory locks.
CREATE FUNCTION outbox.lock_payment(payment_id text) RETURNS void
LANGUAGE sql AS $$
    SELECT pg_catalog.pg_advisory_xact_lock(1329747026, pg_catalog.hashtext(payment_id))
$$;

-- Without waiting: false when another transaction holds the payment's lock.
CREATE FUNCTION outbox.try_lock_payment(payment_id text) RETURNS boolean
LANGUAGE sql AS $$
    SELECT pg_catalog.pg_try_advisory_xact_lock(1329747026, pg_catalog.hashtext(payment_id))
$$;

-- The payments a writer of their intents changes: the advisory locks in key order, then the
-- rows that exist in payment_id order. Every such writer takes them this way, so two of them
-- cannot deadlock, and each waits for an INSERT holding either lock.
CREATE FUNCTION outbox.lock_payments(payment_ids text[]) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    k  integer;
BEGIN
    FOR k IN
        SELECT DISTINCT pg_catalog.hashtext(p) FROM pg_catalog.unnest(payment_ids) AS p ORDER BY 1
    LOOP
        PERFORM pg_catalog.pg_advisory_xact_lock(1329747026, k);
    END LOOP;
    PERFORM 1 FROM outbox.payments
    WHERE payment_id = ANY(payment_ids)
    ORDER BY payment_id
    FOR UPDATE;
END;
$$;

-- The triggers and the operators' functions take them as the schema owner; the relay's
-- write-back and orphan sweep call them directly.
REVOKE ALL ON FUNCTION outbox.lock_payment(text), outbox.try_lock_payment(text),
    outbox.lock_payments(text[]) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION outbox.try_lock_payment(text), outbox.lock_payments(text[]) TO outbox_relay;

-- 2. The insert trigger --------------------------------------------------------------------
--
-- One PL/pgSQL call per row does everything an INSERT needs: the input guards of sql/0009,
-- 0011 and 0013, the archived-key and traceparent checks of 0003 and 0006, the wake-up of
-- 0007 and the core rules. As separate triggers they cost the application's INSERT more
-- than their work: PostgreSQL prepares every trigger's WHEN clause afresh for each
-- statement, and the statement-level NOTIFY trigger was one more call. Their refusals are
-- unchanged (same rule names, same messages, same order); for an UPDATE the guards stay
-- triggers.

-- The guards' refusals, for a row (the UPDATE triggers and the insert trigger call them).
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
    IF i.payment_method !~ '^[A-Za-z0-9_]+$' OR length(i.payment_method) NOT BETWEEN 3 AND 255 THEN
        PERFORM outbox.refuse_input('payment_intents', 'payment_method',
            'payment_intents_payment_method_token_format',
            format('is not a provider token (%s characters; a token has 3 to 255, each a letter, '
                   'a digit or _)', length(i.payment_method)),
            'Send the provider''s token for the payment method, such as pm_card_visa.');
    END IF;
END;
$$;

CREATE FUNCTION outbox.payment_intents_refuse_amount() RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION USING
        ERRCODE = 'check_violation',
        SCHEMA = 'outbox', TABLE = 'payment_intents', COLUMN = 'amount_minor',
        CONSTRAINT = 'payment_intents_amount_minor_max_12_digits',
        MESSAGE = 'payment_intents.amount_minor has more than 12 digits; amounts are in minor '
                  'units below 1,000,000,000,000 (the value was not stored)',
        HINT = 'Send the amount in minor units of the currency, e.g. 1999 for EUR 19.99.';
END;
$$;

REVOKE ALL ON FUNCTION outbox.payment_intents_refuse_hostile_input(outbox.payment_intents),
    outbox.payment_intents_refuse_payment_method(outbox.payment_intents),
    outbox.payment_intents_refuse_amount() FROM PUBLIC;

CREATE OR REPLACE FUNCTION outbox.payment_intents_hostile_input() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM outbox.payment_intents_refuse_hostile_input(NEW);
    RETURN NEW;
END;
$$;

CREATE OR REPLACE FUNCTION outbox.payment_intents_payment_method_guard() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM outbox.payment_intents_refuse_payment_method(NEW);
    RETURN NEW;
END;
$$;

CREATE OR REPLACE FUNCTION outbox.payment_intents_amount_bound() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM outbox.payment_intents_refuse_amount();
    RETURN NEW;
END;
$$;

-- The guards stay triggers for an UPDATE, with their WHEN clauses (payment_method's: below).
DROP TRIGGER payment_intents_0_amount_bound ON outbox.payment_intents;
CREATE TRIGGER payment_intents_0_amount_bound
    BEFORE UPDATE OF amount_minor ON outbox.payment_intents
    FOR EACH ROW
    WHEN (NEW.amount_minor >= 1000000000000)
    EXECUTE FUNCTION outbox.payment_intents_amount_bound();

DROP TRIGGER payment_intents_0_hostile_input ON outbox.payment_intents;
CREATE TRIGGER payment_intents_0_hostile_input
    BEFORE UPDATE OF payment_id, action, provider, currency, idempotency_key, metadata
    ON outbox.payment_intents
    FOR EACH ROW
    WHEN (pg_column_size(NEW.metadata) > 16384
          OR length(NEW.payment_id) > 200
          OR concat_ws(E'\x01', NEW.payment_id, NEW.action, NEW.provider, NEW.currency,
                       NEW.idempotency_key, NEW.metadata::text) ~ '[0-9](?:[ -]?[0-9]){12}'
          OR NEW.payment_id ~ '[\x01-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]'
          OR jsonb_path_exists(NEW.metadata, 'strict $.**{33}'))
    EXECUTE FUNCTION outbox.payment_intents_hostile_input();

-- sql/0013 asked '^[A-Za-z0-9_]{3,255}$' of every row. A bounded repetition that large makes
-- PostgreSQL's regular expression engine build a large automaton on every match: about
-- 30 us a row, a tenth of the application's whole INSERT. The same rule as a class match
-- and a length test costs under 1 us.
DROP TRIGGER payment_intents_0_payment_method ON outbox.payment_intents;
CREATE TRIGGER payment_intents_0_payment_method
    BEFORE UPDATE OF payment_method ON outbox.payment_intents
    FOR EACH ROW
    WHEN (NEW.payment_method !~ '^[A-Za-z0-9_]+$'
          OR length(NEW.payment_method) NOT BETWEEN 3 AND 255
          OR translate(NEW.payment_method, '_', '') ~ '[0-9]{13}')
    EXECUTE FUNCTION outbox.payment_intents_payment_method_guard();

DROP TRIGGER payment_intents_a_key_not_archived ON outbox.payment_intents;
DROP TRIGGER payment_intents_b_traceparent_w3c ON outbox.payment_intents;
CREATE TRIGGER payment_intents_b_traceparent_w3c
    BEFORE UPDATE OF metadata ON outbox.payment_intents
    FOR EACH ROW EXECUTE FUNCTION outbox.payment_intents_traceparent_check();

DROP TRIGGER payment_intents_notify ON outbox.payment_intents;

-- force_generic_plan: with NEW's fields as parameters PostgreSQL would otherwise keep
-- re-planning the lookups below for every row (about 50 us a row); their plans are the
-- same index probes whatever the values.
CREATE OR REPLACE FUNCTION outbox.payment_intents_before_insert() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    known_currency  boolean;
    archived_key    boolean;
    wake_relays     boolean;
    last_seq        bigint;
    last_provider   text;
    last_currency   text;
    by_another      boolean;
    archived_only   boolean;
    install         uuid;
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
    NEW.created_by := outbox.audit_actor();

    -- The input guards first, so no later rule can echo a card number in its error.
    IF NEW.amount_minor >= 1000000000000 THEN
        PERFORM outbox.payment_intents_refuse_amount();
    END IF;
    IF pg_column_size(NEW.metadata) > 16384
       OR length(NEW.payment_id) > 200
       OR concat_ws(E'\x01', NEW.payment_id, NEW.action, NEW.provider, NEW.currency,
                    NEW.idempotency_key, NEW.metadata::text) ~ '[0-9](?:[ -]?[0-9]){12}'
       OR NEW.payment_id ~ '[\x01-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]'
       OR jsonb_path_exists(NEW.metadata, 'strict $.**{33}') THEN
        PERFORM outbox.payment_intents_refuse_hostile_input(NEW);
    END IF;
    IF NEW.payment_method !~ '^[A-Za-z0-9_]+$'
       OR length(NEW.payment_method) NOT BETWEEN 3 AND 255
       OR translate(NEW.payment_method, '_', '') ~ '[0-9]{13}' THEN
        PERFORM outbox.payment_intents_refuse_payment_method(NEW);
    END IF;

    NEW.currency := upper(NEW.currency);

    -- One query for what every row needs: a new payment's INSERT runs no other. (A payment
    -- whose intents are all archived has a row: the relay claimed them.)
    SELECT EXISTS (SELECT 1 FROM outbox.currencies WHERE code = NEW.currency),
           NEW.idempotency_key IS NOT NULL AND EXISTS (
               SELECT 1 FROM outbox.payment_intents_archive
               WHERE provider = NEW.provider AND idempotency_key = NEW.idempotency_key),
           coalesce((SELECT wanted FROM outbox.relay_wakeup), true),
           l.payment_seq, l.provider, l.currency, l.xmin <> pg_current_xact_id()::xid,
           l.payment_seq IS NULL AND EXISTS (
               SELECT 1 FROM outbox.payments WHERE payment_id = NEW.payment_id)
    INTO known_currency, archived_key, wake_relays, last_seq, last_provider, last_currency,
         by_another, archived_only
    FROM (SELECT 1) AS one
    LEFT JOIN LATERAL (
        SELECT payment_seq, provider, currency, xmin
        FROM outbox.payment_intents
        WHERE payment_id = NEW.payment_id
        ORDER BY payment_seq DESC
        LIMIT 1
    ) AS l ON true;

    -- A key already used by an archived intent would make the provider replay that result,
    -- and the unique index no longer sees it (only keys the app chose: derived ones never
    -- repeat). Checked as the application gave it.
    IF archived_key THEN
        RAISE EXCEPTION USING
            ERRCODE = 'unique_violation',
            SCHEMA = 'outbox', TABLE = 'payment_intents', COLUMN = 'idempotency_key',
            CONSTRAINT = 'payment_intents_idempotency_key_unique',
            MESSAGE = 'payment_intents.idempotency_key was already used by an archived intent of this provider',
            HINT = 'Use a new idempotency key for a new intent, or omit it to have one derived.';
    END IF;

    -- metadata.traceparent is passed to the provider, bound to logs and copied to events.
    IF NEW.metadata ? 'traceparent' AND jsonb_typeof(NEW.metadata) = 'object' AND NOT (
        jsonb_typeof(NEW.metadata -> 'traceparent') = 'string'
        AND outbox.is_valid_traceparent(NEW.metadata ->> 'traceparent')
    ) THEN
        RAISE EXCEPTION USING
            ERRCODE = 'check_violation',
            SCHEMA = 'outbox', TABLE = 'payment_intents', COLUMN = 'metadata',
            CONSTRAINT = 'payment_intents_traceparent_w3c',
            MESSAGE = 'payment_intents.metadata.traceparent is not a W3C traceparent (value withheld)',
            HINT = 'Use 00-<32 lower-case hex trace id, not all zero>-<16 hex parent id, not all zero>-<2 hex flags>, '
                   'e.g. 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01, or leave traceparent out.';
    END IF;

    -- NULLs and malformed values are left to the column constraints, which name them.
    IF NEW.payment_id IS NULL OR NEW.provider IS NULL OR NEW.currency IS NULL OR NEW.action IS NULL THEN
        RETURN NEW;
    END IF;

    IF NOT known_currency THEN
        RAISE EXCEPTION USING
            ERRCODE = 'foreign_key_violation',
            SCHEMA = 'outbox', TABLE = 'payment_intents', COLUMN = 'currency',
            CONSTRAINT = 'payment_intents_currency_known',
            MESSAGE = format('payment_intents.currency %s is not an ISO 4217 code with minor units',
                             CASE WHEN NEW.currency ~ '^[A-Z]{1,8}$' THEN quote_literal(NEW.currency)
                                  ELSE '(value withheld)' END),
            HINT = 'Use a three-letter code listed in outbox.currencies, such as EUR, USD or JPY.';
    END IF;

    -- Concurrent inserts for one payment queue on its lock until the holder commits; the
    -- statements below then read what it committed, so payment_seq follows commit order.
    -- The row's lock when the relay has created the row, else the advisory lock when
    -- another transaction inserted intents of the payment, else none: no other transaction
    -- can see the payment yet (see the head of this file). (The intents of a payment
    -- without a row were never updated, so their xmin is their inserter's.)
    IF last_seq IS NOT NULL OR archived_only THEN
        PERFORM 1 FROM outbox.payments WHERE payment_id = NEW.payment_id FOR UPDATE;
        IF FOUND THEN
            -- Its intents may all be archived; the archive's positions count too.
            SELECT payment_seq, provider, currency INTO last_seq, last_provider, last_currency
            FROM (SELECT payment_seq, provider, currency
                  FROM outbox.payment_intents WHERE payment_id = NEW.payment_id
                  UNION ALL
                  SELECT payment_seq, provider, currency
                  FROM outbox.payment_intents_archive WHERE payment_id = NEW.payment_id) AS i
            ORDER BY payment_seq DESC
            LIMIT 1;
        ELSIF by_another THEN
            PERFORM outbox.lock_payment(NEW.payment_id);
            SELECT payment_seq, provider, currency INTO last_seq, last_provider, last_currency
            FROM outbox.payment_intents
            WHERE payment_id = NEW.payment_id
            ORDER BY payment_seq DESC
            LIMIT 1;
        END IF;
    END IF;

    IF last_seq IS NULL THEN
        NEW.payment_seq := 1;
    ELSE
        IF last_currency <> NEW.currency THEN
            RAISE EXCEPTION USING
                ERRCODE = 'check_violation',
                SCHEMA = 'outbox', TABLE = 'payment_intents', COLUMN = 'currency',
                CONSTRAINT = 'payment_intents_currency_matches_payment',
                MESSAGE = format('payment_intents.currency %s differs from payment %s''s currency %s',
                                 quote_literal(NEW.currency), quote_literal(NEW.payment_id),
                                 quote_literal(last_currency)),
                HINT = 'Every intent of one payment_id uses the currency of its first intent.';
        END IF;
        IF last_provider <> NEW.provider THEN
            RAISE EXCEPTION USING
                ERRCODE = 'check_violation',
                SCHEMA = 'outbox', TABLE = 'payment_intents', COLUMN = 'provider',
                CONSTRAINT = 'payment_intents_provider_matches_payment',
                MESSAGE = format('payment_intents.provider %s differs from payment %s''s provider %s',
                                 quote_literal(NEW.provider), quote_literal(NEW.payment_id),
                                 quote_literal(last_provider)),
                HINT = 'Every intent of one payment_id goes to the provider of its first intent.';
        END IF;
        NEW.payment_seq := last_seq + 1;
        -- Per-payment order: wait behind any unresolved earlier intent (dead ones included,
        -- so a dead intent stalls its own payment until an operator resolves it).
        IF EXISTS (
            SELECT 1 FROM outbox.payment_intents
            WHERE payment_id = NEW.payment_id AND status IN ('blocked', 'pending', 'in_flight', 'dead')
        ) THEN
            NEW.status := 'blocked';
        END IF;
    END IF;

    IF NEW.idempotency_key IS NULL THEN
        SELECT installation_id INTO install FROM outbox.installation;
        NEW.idempotency_key := 'outbox_' || left(encode(sha256(convert_to(
            install::text || '/' || NEW.payment_id || '/' || NEW.payment_seq::text || '/' || NEW.action,
            'UTF8')), 'hex'), 48);
    END IF;

    -- sql/0007: wake an idle relay. A transaction delivers a repeated notification once.
    IF wake_relays THEN
        PERFORM pg_notify('outbox_payment_intents', '');
    END IF;
    RETURN NEW;
END;
$$;


-- 3. A payment's row is created by the first change of one of its intents ------------------

-- Normally the relay's first claim of the payment. Statement-level, named to fire before the
-- audit and ledger triggers (AFTER triggers run in name order), so both find the row. The
-- claim's own result cannot see it and returns a new payment's defaults instead.
CREATE FUNCTION outbox.payment_intents_payment_rows() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    INSERT INTO outbox.payments (payment_id, provider, currency)
    SELECT DISTINCT ON (n.payment_id) n.payment_id, n.provider, n.currency
    FROM new_rows AS n
    WHERE NOT EXISTS (SELECT 1 FROM outbox.payments AS p WHERE p.payment_id = n.payment_id)
    ORDER BY n.payment_id
    ON CONFLICT (payment_id) DO NOTHING;
    RETURN NULL;
END;
$$;
REVOKE ALL ON FUNCTION outbox.payment_intents_payment_rows() FROM PUBLIC;

CREATE TRIGGER payment_intents_0_payment_row
    AFTER UPDATE ON outbox.payment_intents
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION outbox.payment_intents_payment_rows();

-- Payments are now inserted by the relay's claims, a batch at a time: audit them with one
-- set-based statement per batch again (sql/0005's trigger; 0010 made it per row for the
-- application's single-row INSERTs).
DROP TRIGGER payments_audit_insert ON outbox.payments;
DROP FUNCTION outbox.audit_payment_inserted();
CREATE TRIGGER payments_audit_insert
    AFTER INSERT ON outbox.payments
    REFERENCING NEW TABLE AS inserted_rows
    FOR EACH STATEMENT EXECUTE FUNCTION outbox.audit_payments();

-- 4. The audit trail: an intent's creation is written by its first change ------------------

DROP TRIGGER payment_intents_audit_insert ON outbox.payment_intents;
DROP FUNCTION outbox.audit_payment_intent_inserted();

CREATE OR REPLACE FUNCTION outbox.audit_payment_intents() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off AS $$
BEGIN
    -- Intents changed for the first time: their creation first, as it was inserted (OLD is
    -- the inserted row, since nothing changed it before), by whom and when it was inserted.
    -- The writer holds the rows' locks, so no other writer starts these chains meanwhile.
    WITH created AS MATERIALIZED (
        SELECT nextval('outbox.audit_log_id_seq') AS id, o.created_at AS at,
               coalesce(o.created_by, 'db:unknown') AS actor, o.id::text AS entity_id,
               o.payment_id, outbox.audit_intent_doc(o) AS after
        FROM (SELECT * FROM old_rows ORDER BY id) AS o
        WHERE NOT EXISTS (
            SELECT 1 FROM outbox.audit_log AS a
            WHERE a.entity = 'intent' AND a.entity_id = o.id::text)
    )
    INSERT INTO outbox.audit_log
        (id, at, actor, entity, entity_id, payment_id, operation, reason, before, after,
         chain_seq, prev_hash, hash)
    SELECT id, at, actor, 'intent', entity_id, payment_id, 'insert', NULL, NULL, after, 1, NULL,
           sha256(outbox.audit_canonical(id, at, actor, 'intent', entity_id, payment_id,
                                         'insert', NULL, NULL, after, 1, NULL))
    FROM created;

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
    RETURN NULL;
END;
$$;

-- An intent no change has reached yet has no audit rows: its history is its creation, read
-- from the row itself (the same document its first change will write).
CREATE OR REPLACE FUNCTION outbox.intent_history(intent bigint)
RETURNS TABLE (at timestamptz, actor text, operation text, reason text, before jsonb, after jsonb)
LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF to_regclass('outbox.audit_log') IS NULL THEN
        RAISE EXCEPTION USING
            ERRCODE = 'undefined_table',
            MESSAGE = 'no audit trail: outbox.audit_log does not exist (migration 0005 not applied)',
            HINT = 'Run `outbox-relay migrate`.';
    END IF;
    RETURN QUERY EXECUTE
        'SELECT h.at, h.actor, h.operation, h.reason, h.before, h.after
         FROM (SELECT a.id, a.at, a.actor::text, a.operation::text, a.reason::text, a.before, a.after
               FROM outbox.audit_log AS a
               WHERE a.entity = ''intent'' AND a.entity_id = $1
               UNION ALL
               SELECT 0, i.created_at, coalesce(i.created_by, ''db:unknown''), ''insert'', NULL, NULL,
                      outbox.audit_intent_doc(i)
               FROM outbox.payment_intents AS i
               WHERE i.id = $2
                 AND NOT EXISTS (SELECT 1 FROM outbox.audit_log AS a
                                 WHERE a.entity = ''intent'' AND a.entity_id = $1)) AS h
         ORDER BY h.id'
        USING intent::text, intent;
END;
$$;

-- 5. The operators' re-drive and cancel lock payments as the write-back does --------------
-- (An application's event for `payment:<id>` still locks the payment's row when it exists,
-- sql/0004: a payment without a row has no write-back that could wait for it.)


CREATE OR REPLACE FUNCTION outbox.retry_dead_intents(ids bigint[], operator text, past_key_lifetime boolean DEFAULT false)
 RETURNS TABLE(intent_id bigint, payment_id text, status text, note text)
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
#variable_conflict use_column
DECLARE
    target      record;
    new_status  text;
    moved       boolean := false;
BEGIN
    PERFORM outbox.set_operator_actor(operator);
    -- Payments first, in lock-key order, as the relay's write-back locks them.
    PERFORM outbox.lock_payments(ARRAY(
        SELECT i.payment_id FROM outbox.payment_intents AS i
        WHERE i.id = ANY(ids) AND i.status = 'dead'));
    FOR target IN
        SELECT i.id, i.payment_id, i.payment_seq,
               i.attempts > 0
               AND i.created_at < now() - outbox.idempotency_key_lifetime(i.provider)
               AND NOT EXISTS (
                   SELECT 1 FROM outbox.janitor_checks AS j
                   WHERE j.intent_id = i.id AND j.result = 'no_effect'
                     AND j.dead_at IS NOT DISTINCT FROM i.completed_at) AS key_at_risk
        FROM outbox.payment_intents AS i
        WHERE i.id = ANY(ids) AND i.status = 'dead'
        ORDER BY i.payment_id, i.payment_seq
        FOR UPDATE OF i
    LOOP
        IF target.key_at_risk AND NOT COALESCE(past_key_lifetime, false) THEN
            intent_id := target.id;
            payment_id := target.payment_id;
            status := 'dead';
            note := 'key_past_lifetime';
            RETURN NEXT;
            CONTINUE;
        END IF;
        new_status := CASE WHEN EXISTS (
            SELECT 1 FROM outbox.payment_intents AS e
            WHERE e.payment_id = target.payment_id
              AND e.payment_seq < target.payment_seq
              AND e.status IN ('blocked', 'pending', 'in_flight', 'dead')
        ) THEN 'blocked' ELSE 'pending' END;
        UPDATE outbox.payment_intents AS i
        SET status = new_status,
            attempts = 0,
            available_at = now(),
            lease_token = NULL,
            lease_expires_at = NULL,
            claimed_by = NULL,
            error_code = NULL,
            error_message = NULL,
            completed_at = NULL,
            updated_at = now()
        WHERE i.id = target.id;
        moved := true;
        intent_id := target.id;
        payment_id := target.payment_id;
        status := new_status;
        note := NULL;
        RETURN NEXT;
    END LOOP;
    IF moved THEN
        PERFORM pg_notify('outbox_payment_intents', '');
    END IF;
END;
$function$;

CREATE OR REPLACE FUNCTION outbox.cancel_dead_intents(ids bigint[], operator text, reason text DEFAULT NULL::text)
 RETURNS TABLE(intent_id bigint, payment_id text, status text, promoted_intent_id bigint)
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
#variable_conflict use_column
DECLARE
    actor     text;
    target    record;
    promoted  bigint;
    message   text;
    ended     boolean := false;
BEGIN
    actor := outbox.set_operator_actor(operator);
    IF reason IS NOT NULL AND length(reason) > 300 THEN
        RAISE EXCEPTION USING
            ERRCODE = 'invalid_parameter_value',
            MESSAGE = format('reason is %s characters long; at most 300', length(reason));
    END IF;
    message := 'cancelled by ' || actor || COALESCE(': ' || NULLIF(btrim(reason), ''), '');
    PERFORM outbox.lock_payments(ARRAY(
        SELECT i.payment_id FROM outbox.payment_intents AS i
        WHERE i.id = ANY(ids) AND i.status = 'dead'));
    FOR target IN
        SELECT i.id, i.payment_id
        FROM outbox.payment_intents AS i
        WHERE i.id = ANY(ids) AND i.status = 'dead'
        ORDER BY i.payment_id, i.payment_seq
        FOR UPDATE OF i
    LOOP
        -- The audit trail records why (sql/0005 reads outbox.reason).
        PERFORM set_config('outbox.reason',
                           COALESCE(NULLIF(btrim(reason), ''), 'cancelled by operator'), true);
        UPDATE outbox.payment_intents AS i
        SET status = 'failed',
            lease_token = NULL,
            lease_expires_at = NULL,
            claimed_by = NULL,
            error_code = 'cancelled_by_operator',
            error_message = message,
            completed_at = now(),
            updated_at = now()
        WHERE i.id = target.id;

        promoted := NULL;
        PERFORM set_config('outbox.reason',
                           format('promoted: intent %s before it was cancelled', target.id), true);
        UPDATE outbox.payment_intents AS n
        SET status = 'pending', available_at = now(), updated_at = now()
        WHERE n.id = (
            SELECT b.id FROM outbox.payment_intents AS b
            WHERE b.payment_id = target.payment_id AND b.status = 'blocked'
            ORDER BY b.payment_seq
            LIMIT 1)
        RETURNING n.id INTO promoted;

        -- The result event, shaped as the relay's write-back shapes it (relay/queries.sql,
        -- complete_intents), so consumers learn the intent ended.
        INSERT INTO outbox.events
            (event_id, ordering_key, routing_key, event_type, payload, payment_id, traceparent)
        SELECT e.event_id, 'payment:' || i.payment_id, e.event_type, e.event_type,
               jsonb_build_object(
                   'event_id', e.event_id,
                   'event_type', e.event_type,
                   'occurred_at', now(),
                   'payment_id', i.payment_id,
                   'intent', jsonb_build_object(
                       'id', i.id,
                       'action', i.action,
                       'status', i.status,
                       'provider', i.provider,
                       'currency', i.currency,
                       'amount_minor', i.amount_minor,
                       'amount_applied_minor', i.amount_applied_minor,
                       'provider_reference', i.provider_reference,
                       'idempotency_key', i.idempotency_key,
                       'attempts', i.attempts,
                       'error_code', i.error_code,
                       'error_message', i.error_message,
                       'metadata', i.metadata),
                   'payment', jsonb_build_object(
                       'state', p.state,
                       'authorized_minor', p.authorized_minor,
                       'captured_minor', p.captured_minor,
                       'refunded_minor', p.refunded_minor,
                       'provider_reference', p.provider_reference)),
               i.payment_id,
               CASE WHEN outbox.is_valid_traceparent(i.metadata ->> 'traceparent')
                    THEN i.metadata ->> 'traceparent' END
        FROM outbox.payment_intents AS i
        JOIN outbox.payments AS p ON p.payment_id = i.payment_id
        CROSS JOIN LATERAL (
            SELECT gen_random_uuid() AS event_id, 'payment.' || i.action || '.failed' AS event_type
        ) AS e
        WHERE i.id = target.id;

        intent_id := target.id;
        payment_id := target.payment_id;
        status := 'failed';
        promoted_intent_id := promoted;
        ended := true;
        RETURN NEXT;
    END LOOP;
    PERFORM set_config('outbox.reason', '', true);
    IF ended THEN
        PERFORM pg_notify('outbox_payment_intents', '');
    END IF;
END;
$function$;
