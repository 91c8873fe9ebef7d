-- Disputes (chargebacks) as payment state and ledger postings, from the inbox.
--
-- When a card holder disputes a charge, the provider withdraws the disputed amount from
-- the merchant's balance at once (Stripe: charge.dispute.created, then a balance
-- transaction); a dispute won returns it (charge.dispute.closed, status won), a dispute
-- lost keeps it for good (status lost). So a dispute is money that left the receivable:
--
--   dispute D           Dr disputed D      Cr receivable D   (funds withdrawn)
--   dispute_reversal D  Dr receivable D    Cr disputed D     (the dispute was won)
--
-- A lost dispute posts nothing more: its `dispute` posting is final and the `disputed`
-- account keeps it as the chargeback loss. The receivable rule of `ledger check` becomes
-- captured - refunded - disputed (payments.disputed_minor: withdrawn and not returned).
--
-- Additive only (pre-deploy safe): new columns with defaults, a new ledger kind rule added
-- NOT VALID (sql/0036 validates), versioned functions beside the old ones.

ALTER TABLE outbox.payments
    ADD COLUMN disputed_minor bigint NOT NULL DEFAULT 0,
    ADD COLUMN dispute_status text,
    ADD COLUMN dispute_reference text;
-- NOT VALID: the columns are new (every row holds the default), and a validating scan of
-- payments would hold ACCESS EXCLUSIVE; sql/0036 validates under SHARE UPDATE EXCLUSIVE.
ALTER TABLE outbox.payments
    ADD CONSTRAINT payments_disputed_within_captured
    CHECK (disputed_minor BETWEEN 0 AND captured_minor) NOT VALID;
ALTER TABLE outbox.payments
    ADD CONSTRAINT payments_dispute_status_valid
    CHECK (dispute_status IN ('open', 'won', 'lost')) NOT VALID;
COMMENT ON COLUMN outbox.payments.disputed_minor IS
    'Minor units the provider withdrew for a dispute and has not returned (open or lost).';
COMMENT ON COLUMN outbox.payments.dispute_status IS
    'The payment''s dispute: NULL (none), open, won (funds returned) or lost (final).';

-- inbox_record_dispute: the relay writes a dispute's amount and status.
GRANT UPDATE (disputed_minor, dispute_status, dispute_reference)
    ON outbox.payments TO outbox_relay;

-- The audit trail records a dispute like any other change of the payment's amounts. The
-- function is only called by the payments' update trigger; adding keys changes no caller.
CREATE OR REPLACE FUNCTION outbox.audit_payment_changes(o outbox.payments, n outbox.payments, side integer)
RETURNS jsonb
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN o.state IS DISTINCT FROM n.state
             THEN jsonb_build_object('state', CASE WHEN side = 0 THEN o.state ELSE n.state END)
             ELSE '{}'::jsonb END
        || CASE WHEN o.authorized_minor IS DISTINCT FROM n.authorized_minor
             THEN jsonb_build_object('authorized_minor', CASE WHEN side = 0 THEN o.authorized_minor ELSE n.authorized_minor END)
             ELSE '{}'::jsonb END
        || CASE WHEN o.captured_minor IS DISTINCT FROM n.captured_minor
             THEN jsonb_build_object('captured_minor', CASE WHEN side = 0 THEN o.captured_minor ELSE n.captured_minor END)
             ELSE '{}'::jsonb END
        || CASE WHEN o.refunded_minor IS DISTINCT FROM n.refunded_minor
             THEN jsonb_build_object('refunded_minor', CASE WHEN side = 0 THEN o.refunded_minor ELSE n.refunded_minor END)
             ELSE '{}'::jsonb END
        || CASE WHEN o.provider_reference IS DISTINCT FROM n.provider_reference
             THEN jsonb_build_object('provider_reference', CASE WHEN side = 0 THEN outbox.audit_redact_text(o.provider_reference) ELSE outbox.audit_redact_text(n.provider_reference) END)
             ELSE '{}'::jsonb END
        || CASE WHEN o.provider IS DISTINCT FROM n.provider
             THEN jsonb_build_object('provider', CASE WHEN side = 0 THEN o.provider ELSE n.provider END)
             ELSE '{}'::jsonb END
        || CASE WHEN o.currency IS DISTINCT FROM n.currency
             THEN jsonb_build_object('currency', CASE WHEN side = 0 THEN o.currency ELSE n.currency END)
             ELSE '{}'::jsonb END
        || CASE WHEN o.disputed_minor IS DISTINCT FROM n.disputed_minor
             THEN jsonb_build_object('disputed_minor', CASE WHEN side = 0 THEN o.disputed_minor ELSE n.disputed_minor END)
             ELSE '{}'::jsonb END
        || CASE WHEN o.dispute_status IS DISTINCT FROM n.dispute_status
             THEN jsonb_build_object('dispute_status', CASE WHEN side = 0 THEN o.dispute_status ELSE n.dispute_status END)
             ELSE '{}'::jsonb END
$$;

-- The ledger's kinds, with the two a dispute posts.
ALTER TABLE outbox.ledger_transactions DROP CONSTRAINT ledger_transactions_kind_valid;
ALTER TABLE outbox.ledger_transactions
    ADD CONSTRAINT ledger_transactions_kind_valid CHECK (kind IN (
        'authorize', 'capture', 'charge', 'void', 'refund',
        'dispute', 'dispute_reversal')) NOT VALID;
-- One withdrawal and at most one reversal per dispute, whatever notifications report it
-- (the payment's dispute_status is the first guard; this one is the constraint's).
-- No row has these kinds yet; on a large ledger build it CONCURRENTLY by hand first
-- (docs/developing.md).
CREATE UNIQUE INDEX IF NOT EXISTS ledger_transactions_one_per_dispute
    ON outbox.ledger_transactions (payment_id, provider_reference, kind)
    WHERE kind IN ('dispute', 'dispute_reversal');

-- sql/0005's posting rules, with a dispute's. ledger_lines stays for its callers.
CREATE FUNCTION outbox.ledger_lines_v2(p_kind text, p_amount bigint, p_hold bigint)
RETURNS TABLE (account text, amount_minor bigint)
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT l.account, l.amount_minor FROM outbox.ledger_lines(p_kind, p_amount, p_hold) AS l
    UNION ALL
    SELECT e.account, e.amount
    FROM (VALUES
        (1, 'dispute',          'disputed',    p_amount),
        (2, 'dispute',          'receivable', -p_amount),
        (3, 'dispute_reversal', 'receivable',  p_amount),
        (4, 'dispute_reversal', 'disputed',   -p_amount)
    ) AS e(n, kind, account, amount)
    WHERE e.kind = p_kind AND e.amount IS NOT NULL AND e.amount <> 0
$$;
-- Like every function of the schema (sql/0008): called by the SECURITY DEFINER poster only.
REVOKE ALL ON FUNCTION outbox.ledger_lines_v2(text, bigint, bigint) FROM PUBLIC;

-- Post a change a notification reported: a refund, a capture made outside the relay (a
-- charge we only authorised, captured by another system), a dispute's withdrawal or its
-- reversal.
-- SECURITY DEFINER: the relay has no right on the ledger. v1 stays for relays of the
-- previous release (refunds only).
CREATE FUNCTION outbox.post_notified_change_v2(
    p_inbox_id bigint, p_payment_id text, p_kind text, p_amount bigint, p_reference text
) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    pay outbox.payments%ROWTYPE;
    txn bigint;
BEGIN
    IF p_kind NOT IN ('refund', 'capture', 'dispute', 'dispute_reversal') THEN
        RAISE EXCEPTION USING ERRCODE = 'check_violation',
            MESSAGE = format('a notification posts refund, capture, dispute or '
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
REVOKE ALL ON FUNCTION outbox.post_notified_change_v2(bigint, text, text, bigint, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION outbox.post_notified_change_v2(bigint, text, text, bigint, text)
    TO outbox_relay;
