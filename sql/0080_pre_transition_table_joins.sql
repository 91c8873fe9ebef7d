-- Statement triggers whose plans stay O(rows) whatever statement size they were planned at.
--
-- PL/pgSQL keeps a statement's plan for the session. A statement trigger's plan is made at
-- its first call, with the transition tables' row counts of that call: a relay connection
-- whose first claim or write-back held one intent plans for one row, and keeps that plan
-- for the batches of 100 that follow. Three of the write path's triggers join OLD TABLE to
-- NEW TABLE on the key; planned for one row, that join is a nested loop that scans the
-- inner transition table once per outer row (transition tables have no index): 100 x 100
-- comparisons per statement. Measured (docs/performance.md, run I, EXPLAIN ANALYZE of
-- statements of 100 intents after the connection's first statements held one):
-- audit_payment_intents_v2 took 2.2 ms on a claim of 100 that it writes nothing for (0.2 ms
-- when planned for 100), and the write-back's three triggers likewise.
--
-- With nested loops off while these functions plan, the two transition tables are hash
-- joined (linear at every size). What they read of real tables is already, or now, a LATERAL
-- probe by a unique key (the chain's tail in audit_log, the payment's row), which can only
-- run as a nested loop, so it is unaffected. Sequential scans are off as well, as sql/0060 and
-- sql/0061 did for the creation trigger and the events trigger: planned while audit_log or
-- payments were small, a probe must not become a scan of a table that grows.
--
-- Nothing these functions write changes: same rows, same order, same hashes.

ALTER FUNCTION outbox.audit_payment_intents_v2() SET enable_nestloop = off;
ALTER FUNCTION outbox.audit_payment_intents_v2() SET enable_seqscan = off;
ALTER FUNCTION outbox.audit_payments_v2() SET enable_nestloop = off;
ALTER FUNCTION outbox.audit_payments_v2() SET enable_seqscan = off;

-- sql/0021's ledger trigger, restated: the payment's row is read by a LATERAL probe (a join
-- with outbox.payments would, without nested loops, hash the whole table), and the two
-- settings above. Otherwise unchanged.
CREATE OR REPLACE FUNCTION outbox.payment_intents_post_ledger_v2() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET jit = off
SET enable_nestloop = off
SET enable_seqscan = off
AS $$
DECLARE
    bad record;
BEGIN
    -- Most statements (claims, retries, promotions) succeed nothing: one cheap probe.
    IF NOT EXISTS (
        SELECT 1 FROM new_rows AS n JOIN old_rows AS o ON o.id = n.id
        WHERE n.status = 'succeeded' AND o.status IS DISTINCT FROM 'succeeded'
    ) THEN
        RETURN NULL;
    END IF;
    SELECT n.id, n.amount_applied_minor AS amount INTO bad
    FROM new_rows AS n JOIN old_rows AS o ON o.id = n.id
    WHERE n.status = 'succeeded' AND o.status IS DISTINCT FROM 'succeeded'
      AND coalesce(n.amount_applied_minor, 0) <= 0
    ORDER BY n.id
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION USING
            ERRCODE = 'check_violation',
            MESSAGE = format('intent %s succeeded without a positive amount_applied_minor (%s); '
                             'nothing can be posted to the ledger', bad.id, bad.amount),
            HINT = 'Set amount_applied_minor to what the provider confirmed in the same UPDATE.';
    END IF;
    WITH posted AS (
        INSERT INTO outbox.ledger_transactions
            (intent_id, payment_id, provider, currency, kind, amount_minor, provider_reference,
             posted_by)
        SELECT n.id, n.payment_id, n.provider, n.currency, n.action, n.amount_applied_minor,
               n.provider_reference, outbox.audit_actor()
        FROM new_rows AS n JOIN old_rows AS o ON o.id = n.id
        WHERE n.status = 'succeeded' AND o.status IS DISTINCT FROM 'succeeded'
        ORDER BY n.id
        RETURNING id, payment_id, provider, currency, kind, amount_minor
    )
    INSERT INTO outbox.ledger_entries (transaction_id, account, currency, amount_minor)
    SELECT t.id, t.provider || ':' || l.account, t.currency, l.amount_minor
    FROM posted AS t
    LEFT JOIN LATERAL (
        -- LIMIT 1 keeps the probe a subquery (payment_id is the key: at most one row).
        SELECT p.authorized_minor FROM outbox.payments AS p
        WHERE p.payment_id = t.payment_id
        LIMIT 1
    ) AS p ON true
    CROSS JOIN LATERAL outbox.ledger_lines(t.kind, t.amount_minor, p.authorized_minor) AS l
    ORDER BY t.id;
    RETURN NULL;
END;
$$;

-- sql/0029's FX refund trigger, restated with an early exit: its loop
-- joins the two transition tables for the statement's succeeded refunds, and that join's
-- plan (made at the first statement that holds one) is no concern of a batch without
-- refunds any more. Nested loops stay allowed here: the loop calls the FX functions, whose
-- own plans are made while this function runs. Otherwise unchanged.
CREATE OR REPLACE FUNCTION outbox.payment_intents_fx_refund_difference() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET jit = off
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
    -- sql/0080: most statements (claims, write-backs of charges, promotions) hold no
    -- succeeded refund; one scan of one transition table says so, before any join of the two.
    IF NOT EXISTS (
        SELECT 1 FROM new_rows AS n
        WHERE n.action = 'refund' AND n.status = 'succeeded' AND n.amount_applied_minor > 0
    ) THEN
        RETURN NULL;
    END IF;
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
