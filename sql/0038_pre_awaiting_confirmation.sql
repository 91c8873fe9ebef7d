-- Asynchronous outcomes as a state of their own (issue 19): `awaiting_confirmation`.
--
-- A provider that accepts a request and confirms it later (Adyen's modifications answer
-- `201 received`, an AUTHORISATION `Pending`; a Stripe refund answered `pending`) leaves the
-- intent neither finished nor in flight:
--
--   awaiting_confirmation  the provider accepted the call; no lease, no lock, no retry. The
--                          inbox moves it on when the confirmation arrives (succeeded, or
--                          failed for a CAPTURE_FAILED / REFUND_FAILED / success=false); past
--                          RELAY_CONFIRMATION_DEADLINE_SECONDS a `confirmation_overdue`
--                          exception asks an operator, and a late confirmation still settles
--                          the intent once and resolves that exception.
--
-- The payment's confirmed amounts (authorized/captured/refunded_minor) and the ledger move
-- only on confirmation (the ledger trigger posts on `succeeded`); what was requested and is not
-- confirmed yet is on the payment beside them: `awaiting_action` and `awaiting_minor`.
-- While a payment awaits a confirmation no later intent of it is sent: one that was pending
-- is parked `blocked` by the relay at dispatch (complete_intents keeps it pending when the
-- confirmation committed meanwhile) and promoted by the confirmation's write-back.
--
-- Additive only (pre-deploy safe): a wider status rule (NOT VALID; sql/0039 validates),
-- new columns with defaults, new ledger and exception kinds, versioned functions.

-- 1. The intent's status -------------------------------------------------------------------

ALTER TABLE outbox.payment_intents DROP CONSTRAINT payment_intents_status_valid;
ALTER TABLE outbox.payment_intents
    ADD CONSTRAINT payment_intents_status_valid CHECK (status IN (
        'blocked', 'pending', 'in_flight', 'awaiting_confirmation', 'succeeded', 'failed', 'dead'))
    NOT VALID;

-- The deadline sweep's scan (few rows: only intents waiting for a provider's confirmation).
CREATE INDEX IF NOT EXISTS payment_intents_awaiting_idx
    ON outbox.payment_intents (updated_at, id) WHERE status = 'awaiting_confirmation';

-- 2. Requested, not confirmed: on the payment ---------------------------------------------

ALTER TABLE outbox.payments
    ADD COLUMN awaiting_action text,
    ADD COLUMN awaiting_minor bigint NOT NULL DEFAULT 0;
ALTER TABLE outbox.payments
    ADD CONSTRAINT payments_awaiting_valid
    CHECK ((awaiting_action IS NULL AND awaiting_minor = 0)
           OR (awaiting_action IN ('authorize', 'capture', 'charge', 'void', 'refund')
               AND awaiting_minor >= 0)) NOT VALID;
COMMENT ON COLUMN outbox.payments.awaiting_action IS
    'The action the provider accepted and has not confirmed yet (NULL: none); the confirmed '
    'amounts beside it do not include it.';
COMMENT ON COLUMN outbox.payments.awaiting_minor IS
    'The amount requested by awaiting_action, not confirmed (not in the ledger); 0 when none.';

GRANT UPDATE (awaiting_action, awaiting_minor) ON outbox.payments TO outbox_relay;

-- 3. Ledger: a confirmation withdrawn after it was booked ----------------------------------

-- Adyen may send CAPTURE_FAILED (or REFUND_FAILED) after a CAPTURE (REFUND) it reported as
-- successful: the capture did not happen. Its posting is reversed exactly: the reversal's
-- entries are the capture transaction's entries negated, whatever the hold was then.
ALTER TABLE outbox.ledger_transactions DROP CONSTRAINT ledger_transactions_kind_valid;
ALTER TABLE outbox.ledger_transactions
    ADD CONSTRAINT ledger_transactions_kind_valid CHECK (kind IN (
        'authorize', 'capture', 'charge', 'void', 'refund',
        'dispute', 'dispute_reversal', 'capture_reversal', 'refund_reversal')) NOT VALID;
ALTER TABLE outbox.ledger_transactions ADD COLUMN reverses_transaction_id bigint;
-- One reversal per posting, whatever notifications report it.
CREATE UNIQUE INDEX IF NOT EXISTS ledger_transactions_one_reversal
    ON outbox.ledger_transactions (reverses_transaction_id)
    WHERE reverses_transaction_id IS NOT NULL;

CREATE FUNCTION outbox.post_reversal_v1(p_inbox_id bigint, p_intent_id bigint)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    orig outbox.ledger_transactions%ROWTYPE;
    txn  bigint;
BEGIN
    SELECT * INTO orig FROM outbox.ledger_transactions
    WHERE intent_id = p_intent_id AND kind IN ('capture', 'refund');
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'no_data_found',
            MESSAGE = format('intent %s has no capture or refund posting to reverse', p_intent_id);
    END IF;
    INSERT INTO outbox.ledger_transactions
        (inbox_id, payment_id, provider, currency, kind, amount_minor, provider_reference,
         posted_by, reverses_transaction_id)
    VALUES (p_inbox_id, orig.payment_id, orig.provider, orig.currency, orig.kind || '_reversal',
            orig.amount_minor, orig.provider_reference, outbox.audit_actor(), orig.id)
    RETURNING id INTO txn;
    INSERT INTO outbox.ledger_entries (transaction_id, account, currency, amount_minor)
    SELECT txn, e.account, e.currency, -e.amount_minor
    FROM outbox.ledger_entries AS e
    WHERE e.transaction_id = orig.id
    ORDER BY e.id;
    RETURN txn;
END;
$$;
COMMENT ON FUNCTION outbox.post_reversal_v1(bigint, bigint) IS
    'Reverse the capture or refund posting of an intent whose confirmation the provider '
    'withdrew (CAPTURE_FAILED, REFUND_FAILED): the same entries negated, once.';
REVOKE ALL ON FUNCTION outbox.post_reversal_v1(bigint, bigint) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION outbox.post_reversal_v1(bigint, bigint) TO outbox_relay;

-- A notification may also release an authorisation the provider ended by itself (Adyen's
-- TECHNICAL_CANCEL, EXPIRE): v2's kinds and `void`. v2 stays for relays of the previous release.
CREATE FUNCTION outbox.post_notified_change_v3(
    p_inbox_id bigint, p_payment_id text, p_kind text, p_amount bigint, p_reference text
) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    pay outbox.payments%ROWTYPE;
    txn bigint;
BEGIN
    IF p_kind NOT IN ('refund', 'capture', 'void', 'dispute', 'dispute_reversal') THEN
        RAISE EXCEPTION USING ERRCODE = 'check_violation',
            MESSAGE = format('a notification posts refund, capture, void, dispute or '
                             'dispute_reversal, not %s', p_kind);
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
    FROM outbox.ledger_lines_v2(p_kind, p_amount, pay.authorized_minor) AS l;
    RETURN txn;
END;
$$;
REVOKE ALL ON FUNCTION outbox.post_notified_change_v3(bigint, text, text, bigint, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION outbox.post_notified_change_v3(bigint, text, text, bigint, text)
    TO outbox_relay;

-- 4. The confirmation deadline: an exception for an operator -------------------------------

ALTER TABLE outbox.reconciliation_exceptions
    DROP CONSTRAINT reconciliation_exceptions_kind_valid,
    ADD CONSTRAINT reconciliation_exceptions_kind_valid CHECK (kind IN (
        'missing_internal', 'missing_at_provider', 'amount_mismatch', 'currency_mismatch',
        'status_mismatch', 'unexpected_fee', 'dispute', 'external_change', 'fx_rate_drift',
        'confirmation_overdue'))
        NOT VALID;
ALTER TABLE outbox.reconciliation_exceptions ADD COLUMN intent_id bigint;
-- Found by the deadline sweep: neither a run nor a notification, an intent.
ALTER TABLE outbox.reconciliation_exceptions
    DROP CONSTRAINT reconciliation_exceptions_run_or_notification,
    ADD CONSTRAINT reconciliation_exceptions_run_or_notification
    CHECK (first_run_id IS NOT NULL OR inbox_id IS NOT NULL OR intent_id IS NOT NULL) NOT VALID;

-- Open the exception of one overdue intent (once: match_key 'confirmation:<intent id>').
CREATE FUNCTION outbox.open_overdue_confirmation_v1(p_intent_id bigint, p_detail text)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    i        outbox.payment_intents%ROWTYPE;
    p        outbox.payments%ROWTYPE;
    found_id bigint;
BEGIN
    SELECT * INTO i FROM outbox.payment_intents WHERE id = p_intent_id;
    IF NOT FOUND OR i.status <> 'awaiting_confirmation' THEN
        RETURN NULL;
    END IF;
    SELECT * INTO p FROM outbox.payments WHERE payment_id = i.payment_id;
    INSERT INTO outbox.reconciliation_exceptions AS x
        (provider, kind, match_key, payment_id, currency, internal_amount_minor,
         provider_amount_minor, delta_minor, detail, occurred_at, intent_id)
    VALUES (i.provider, 'confirmation_overdue', 'confirmation:' || i.id, i.payment_id,
            i.currency, p.awaiting_minor, NULL, 0, p_detail, i.updated_at, i.id)
    ON CONFLICT ON CONSTRAINT reconciliation_exceptions_once DO NOTHING
    RETURNING x.id INTO found_id;
    RETURN found_id;
END;
$$;
REVOKE ALL ON FUNCTION outbox.open_overdue_confirmation_v1(bigint, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION outbox.open_overdue_confirmation_v1(bigint, text) TO outbox_relay;

-- A late confirmation settles the intent; its open exception is resolved by the same
-- transaction, naming what settled it. Returns the exception resolved, or NULL.
CREATE FUNCTION outbox.resolve_overdue_confirmation_v1(p_intent_id bigint, p_resolution text)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    found_id bigint;
BEGIN
    UPDATE outbox.reconciliation_exceptions
    SET status = 'resolved', resolution = 'confirmed_late', resolution_reason = p_resolution,
        resolved_by = outbox.audit_actor(), resolved_at = now()
    WHERE kind = 'confirmation_overdue' AND intent_id = p_intent_id
      AND status IN ('open', 'awaiting_approval', 'accepted')
    RETURNING id INTO found_id;
    RETURN found_id;
END;
$$;
REVOKE ALL ON FUNCTION outbox.resolve_overdue_confirmation_v1(bigint, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION outbox.resolve_overdue_confirmation_v1(bigint, text) TO outbox_relay;

-- 5. Adyen's identifiers are not card numbers ----------------------------------------------

-- An Adyen pspReference is 16 characters, often all digits, and about one in ten of those
-- passes the Luhn check: the card rule (sql/0017, sql/0019) would redact it from the stored
-- notification, and the relay could no longer match the notification to its intent. The
-- rule, documented in docs/webhooks.md: in an Adyen notification item (one per stored row,
-- `notificationItems[0].NotificationRequestItem`), the values of `pspReference` and
-- `originalReference` that are exactly 16 characters of [0-9A-Z] (Adyen's reference format)
-- are kept as they are; every other key and value is redacted as before. The event id the
-- receiver derives from them (provider_adapters/adyen_notifications.py) splits the
-- reference with ':' so it holds no 13-digit run and passes outbox.refuse_card_number.
CREATE OR REPLACE FUNCTION outbox.webhook_inbox_before_insert() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    item  jsonb;
    path  text[] := ARRAY['notificationItems', '0', 'NotificationRequestItem'];
    k     text;
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
    item := NEW.payload #> path;
    NEW.payload := outbox.jsonb_redact_card_numbers(NEW.payload);
    IF jsonb_typeof(item) = 'object' AND NEW.payload #> path IS NOT NULL THEN
        FOREACH k IN ARRAY ARRAY['pspReference', 'originalReference'] LOOP
            IF jsonb_typeof(item -> k) = 'string' AND (item ->> k) ~ '^[0-9A-Z]{16}$' THEN
                NEW.payload := jsonb_set(NEW.payload, path || k, item -> k);
            END IF;
        END LOOP;
    END IF;
    PERFORM outbox.refuse_card_number('webhook_inbox', 'event_id', NEW.event_id,
                                      'A provider event id never holds a card number.');
    PERFORM outbox.refuse_card_number('webhook_inbox', 'event_type', NEW.event_type,
                                      'A provider event type never holds a card number.');
    RETURN NEW;
END;
$$;
