-- The webhook inbox: provider notifications, verified, stored once, applied once (issue 18).
--
-- The outbox's mirror image. `outbox-relay webhooks serve` verifies a notification's
-- signature against the raw body, inserts it here and answers 2xx only after the INSERT
-- committed; a duplicate delivery hits the unique key (provider, event_id) and is
-- acknowledged without a second row. Relays claim rows like intents (SKIP LOCKED, a lease
-- carried by available_at, a fencing token) and apply each in ONE transaction with its
-- effects (payment, ledger, result event, reconciliation exception), marking it applied.
--
-- Who moves a row on:
--   received  waits for a relay; a relay holding it has pushed available_at to its lease's
--             end, so a relay that dies mid-apply leaves it claimable again after the lease;
--   applied   a relay applied it (result says what changed, or why nothing did);
--   ignored   a type the relay does not handle: stored, acknowledged, visible, never an error.
-- Retention (relay/service/retention.py) deletes applied and ignored rows older than
-- RELAY_WEBHOOKS_RETENTION_HOURS, which must exceed the provider's retry window (Stripe 3
-- days, Adyen 30 days) so a late duplicate still meets its key.

CREATE TABLE outbox.webhook_inbox (
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- the receiving endpoint's provider instance (/webhooks/<provider>)
    provider          text NOT NULL
        CONSTRAINT webhook_inbox_provider_lowercase_identifier CHECK (provider ~ '^[a-z][a-z0-9_]{0,62}$'),
    event_id          text NOT NULL
        CONSTRAINT webhook_inbox_event_id_printable_max_255 CHECK (event_id ~ '^[!-~]{1,255}$'),
    event_type        text NOT NULL
        CONSTRAINT webhook_inbox_event_type_printable_max_255 CHECK (event_type ~ '^[!-~]{1,255}$'),
    -- the provider's time of the event (Stripe: event.created), not of the delivery
    event_created_at  timestamptz,
    -- the verified body, card-like strings redacted (trigger below)
    payload           jsonb NOT NULL
        CONSTRAINT webhook_inbox_payload_is_object CHECK (jsonb_typeof(payload) = 'object')
        CONSTRAINT webhook_inbox_payload_max_512kb CHECK (pg_column_size(payload) <= 524288),
    received_at       timestamptz NOT NULL DEFAULT now(),
    status            text NOT NULL DEFAULT 'received'
        CONSTRAINT webhook_inbox_status_valid CHECK (status IN ('received', 'applied', 'ignored')),
    available_at      timestamptz NOT NULL DEFAULT now(),
    attempts          integer NOT NULL DEFAULT 0,
    lease_token       bigint,
    claimed_by        text,
    payment_id        text,
    applied_at        timestamptz,
    -- what applying did, or why it changed nothing
    result            text,
    -- the last apply failure, while the row is retried
    last_error        text,
    CONSTRAINT webhook_inbox_event_once UNIQUE (provider, event_id),
    CONSTRAINT webhook_inbox_finished_has_time CHECK (status = 'received' OR applied_at IS NOT NULL)
) WITH (fillfactor = 80);

COMMENT ON TABLE outbox.webhook_inbox IS
    'Verified provider notifications, one row per (provider, event_id). received: waits for a relay '
    '(available_at is the lease end while one holds it); applied: applied in one transaction with its '
    'effects, result says what changed or why nothing did; ignored: a type the relay does not handle.';

CREATE INDEX webhook_inbox_claimable_idx ON outbox.webhook_inbox (available_at, id) WHERE status = 'received';
CREATE INDEX webhook_inbox_payment_idx ON outbox.webhook_inbox (payment_id, id) WHERE payment_id IS NOT NULL;
CREATE INDEX webhook_inbox_finished_idx ON outbox.webhook_inbox (applied_at) WHERE status <> 'received';

-- Every string (and number, and key) of a JSON document in which the card rule of sql/0017
-- finds a card number is replaced: the verified payload is kept, a card number never is.
-- Only subtrees whose text may hold a card are walked (outbox.may_hold_card_number).
CREATE FUNCTION outbox.jsonb_redact_card_numbers(doc jsonb) RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
DECLARE
    redacted constant jsonb := to_jsonb('[card number redacted]'::text);
    k    text;
    v    jsonb;
    out  jsonb;
BEGIN
    IF doc IS NULL OR NOT outbox.may_hold_card_number(doc::text) THEN
        RETURN doc;
    END IF;
    CASE jsonb_typeof(doc)
    WHEN 'object' THEN
        out := '{}'::jsonb;
        FOR k, v IN SELECT e.key, e.value FROM jsonb_each(doc) AS e LOOP
            IF outbox.contains_card_number(k) THEN
                k := '[card number redacted]' || md5(k);
            END IF;
            out := out || jsonb_build_object(k, outbox.jsonb_redact_card_numbers(v));
        END LOOP;
        RETURN out;
    WHEN 'array' THEN
        SELECT coalesce(jsonb_agg(outbox.jsonb_redact_card_numbers(x.e) ORDER BY x.n), '[]'::jsonb)
        INTO out
        FROM jsonb_array_elements(doc) WITH ORDINALITY AS x(e, n);
        RETURN out;
    WHEN 'string' THEN
        RETURN CASE WHEN outbox.contains_card_number(doc #>> '{}') THEN redacted ELSE doc END;
    WHEN 'number' THEN
        RETURN CASE WHEN outbox.contains_card_number(doc::text) THEN redacted ELSE doc END;
    ELSE
        RETURN doc;
    END CASE;
END;
$$;

COMMENT ON FUNCTION outbox.jsonb_redact_card_numbers(jsonb) IS
    'The document with every key, string or number that outbox.contains_card_number calls a card '
    'replaced by "[card number redacted]".';

CREATE FUNCTION outbox.webhook_inbox_before_insert() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.status := 'received';
    NEW.received_at := now();
    NEW.available_at := now();
    NEW.attempts := 0;
    NEW.lease_token := NULL;
    NEW.claimed_by := NULL;
    NEW.applied_at := NULL;
    NEW.result := NULL;
    NEW.last_error := NULL;
    -- Before any CHECK can echo the row: the payload is stored redacted, the identifiers
    -- (which no provider fills with card numbers) are refused by name.
    NEW.payload := outbox.jsonb_redact_card_numbers(NEW.payload);
    PERFORM outbox.refuse_card_number('webhook_inbox', 'event_id', NEW.event_id,
                                      'A provider event id never holds a card number.');
    PERFORM outbox.refuse_card_number('webhook_inbox', 'event_type', NEW.event_type,
                                      'A provider event type never holds a card number.');
    RETURN NEW;
END;
$$;

CREATE TRIGGER webhook_inbox_before_insert
    BEFORE INSERT ON outbox.webhook_inbox
    FOR EACH ROW EXECUTE FUNCTION outbox.webhook_inbox_before_insert();

-- Wake idle relays when a notification arrives (one NOTIFY per statement).
CREATE FUNCTION outbox.webhook_inbox_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('outbox_webhook_inbox', '');
    RETURN NULL;
END;
$$;

CREATE TRIGGER webhook_inbox_notify
    AFTER INSERT ON outbox.webhook_inbox
    FOR EACH STATEMENT EXECUTE FUNCTION outbox.webhook_inbox_notify();

-- ==========================================================================================
-- Changes we did not make: ledger postings and reconciliation exceptions from the inbox
-- ==========================================================================================

-- A refund made outside the relay (the provider's dashboard, another system) has no intent:
-- its posting names the notification instead. Widening only (pre-deploy safe): postings
-- of intents keep their one-per-intent key.
ALTER TABLE outbox.ledger_transactions ALTER COLUMN intent_id DROP NOT NULL;
ALTER TABLE outbox.ledger_transactions ADD COLUMN inbox_id bigint;
ALTER TABLE outbox.ledger_transactions
    ADD CONSTRAINT ledger_transactions_one_per_notification UNIQUE (inbox_id, kind);
ALTER TABLE outbox.ledger_transactions
    ADD CONSTRAINT ledger_transactions_intent_or_notification
    CHECK (intent_id IS NOT NULL OR inbox_id IS NOT NULL) NOT VALID;

-- Exceptions found by a notification, not by a reconciliation run: no run, the inbox row
-- instead; kinds for what only notifications tell (a dispute, a change we did not make).
ALTER TABLE outbox.reconciliation_exceptions ALTER COLUMN first_run_id DROP NOT NULL;
ALTER TABLE outbox.reconciliation_exceptions ALTER COLUMN last_run_id DROP NOT NULL;
ALTER TABLE outbox.reconciliation_exceptions ADD COLUMN inbox_id bigint;
ALTER TABLE outbox.reconciliation_exceptions DROP CONSTRAINT reconciliation_exceptions_kind_valid;
ALTER TABLE outbox.reconciliation_exceptions
    ADD CONSTRAINT reconciliation_exceptions_kind_valid CHECK (kind IN (
        'missing_internal', 'missing_at_provider', 'amount_mismatch',
        'currency_mismatch', 'status_mismatch', 'unexpected_fee',
        'dispute', 'external_change')) NOT VALID;
ALTER TABLE outbox.reconciliation_exceptions
    ADD CONSTRAINT reconciliation_exceptions_run_or_notification
    CHECK (first_run_id IS NOT NULL OR inbox_id IS NOT NULL) NOT VALID;

-- Post a change a notification reported (kind refund) to the ledger, once per notification,
-- with sql/0005's posting rules. SECURITY DEFINER: the relay has no right on the ledger.
CREATE FUNCTION outbox.post_notified_change_v1(
    p_inbox_id bigint, p_payment_id text, p_kind text, p_amount bigint, p_reference text
) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    pay outbox.payments%ROWTYPE;
    txn bigint;
BEGIN
    IF p_kind <> 'refund' THEN
        RAISE EXCEPTION USING ERRCODE = 'check_violation',
            MESSAGE = format('a notification posts refunds only, not %s', p_kind);
    END IF;
    SELECT * INTO pay FROM outbox.payments WHERE payment_id = p_payment_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'foreign_key_violation',
            MESSAGE = format('payment %s does not exist', quote_literal(p_payment_id));
    END IF;
    INSERT INTO outbox.ledger_transactions
        (inbox_id, payment_id, provider, currency, kind, amount_minor, provider_reference, posted_by)
    VALUES (p_inbox_id, pay.payment_id, pay.provider, pay.currency, p_kind, p_amount, p_reference,
            outbox.audit_actor())
    RETURNING id INTO txn;
    INSERT INTO outbox.ledger_entries (transaction_id, account, currency, amount_minor)
    SELECT txn, pay.provider || ':' || l.account, pay.currency, l.amount_minor
    FROM outbox.ledger_lines(p_kind, p_amount, pay.authorized_minor) AS l;
    RETURN txn;
END;
$$;
REVOKE ALL ON FUNCTION outbox.post_notified_change_v1(bigint, text, text, bigint, text) FROM PUBLIC;

-- Open (or find again) an exception a notification revealed. SECURITY DEFINER: the relay
-- reads and writes no other exception column; operators work it as any other exception.
CREATE FUNCTION outbox.open_notified_exception_v1(
    p_inbox_id bigint, p_provider text, p_kind text, p_match_key text, p_payment_id text,
    p_currency text, p_internal bigint, p_provider_amount bigint, p_detail text,
    p_occurred_at timestamptz
) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    found_id bigint;
BEGIN
    INSERT INTO outbox.reconciliation_exceptions AS x
        (provider, kind, match_key, payment_id, currency, internal_amount_minor,
         provider_amount_minor, delta_minor, detail, occurred_at, inbox_id)
    VALUES (p_provider, p_kind, p_match_key, p_payment_id, p_currency, p_internal,
            p_provider_amount, coalesce(p_provider_amount, 0) - coalesce(p_internal, 0),
            p_detail, p_occurred_at, p_inbox_id)
    ON CONFLICT ON CONSTRAINT reconciliation_exceptions_once DO UPDATE
    SET times_seen = x.times_seen + 1,
        internal_amount_minor = EXCLUDED.internal_amount_minor,
        provider_amount_minor = EXCLUDED.provider_amount_minor,
        delta_minor = EXCLUDED.delta_minor,
        detail = EXCLUDED.detail,
        inbox_id = EXCLUDED.inbox_id,
        status = CASE WHEN x.status = 'cleared' THEN 'open' ELSE x.status END
    RETURNING x.id INTO found_id;
    RETURN found_id;
END;
$$;
REVOKE ALL ON FUNCTION outbox.open_notified_exception_v1(
    bigint, text, text, text, text, text, bigint, bigint, text, timestamptz) FROM PUBLIC;

-- ==========================================================================================
-- Privileges (sql/0008's roles). The receiver runs as an outbox_relay member.
-- ==========================================================================================

-- inbox_insert (the receiver); inbox_claim, inbox_take, inbox_finish, inbox_retry (relays);
-- inbox_retention (the sweeper).
GRANT SELECT, DELETE ON outbox.webhook_inbox TO outbox_relay;
GRANT INSERT (provider, event_id, event_type, event_created_at, payload, payment_id)
    ON outbox.webhook_inbox TO outbox_relay;
GRANT UPDATE (status, available_at, attempts, lease_token, claimed_by, payment_id, applied_at,
              result, last_error)
    ON outbox.webhook_inbox TO outbox_relay;
GRANT EXECUTE ON FUNCTION outbox.post_notified_change_v1(bigint, text, text, bigint, text),
    outbox.open_notified_exception_v1(bigint, text, text, text, text, text, bigint, bigint, text,
                                      timestamptz)
    TO outbox_relay;
-- inbox_ledger_totals: the near-real-time comparison of a notification's amounts with the
-- payment's ledger.
GRANT SELECT ON outbox.ledger_transactions TO outbox_relay;

-- webhooks list / show, intents show: read.
GRANT SELECT ON outbox.webhook_inbox TO outbox_operator;

-- inbox_payment_by_reference: a notification names the payment by the provider's reference.
-- Built by hand CONCURRENTLY on a large payments table first (docs/developing.md).
CREATE INDEX IF NOT EXISTS payments_provider_reference_idx
    ON outbox.payments (provider, provider_reference) WHERE provider_reference IS NOT NULL;
