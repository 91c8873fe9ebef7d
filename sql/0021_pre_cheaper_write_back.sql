-- The relay's write-back path, cheaper per intent (issue 23, goal 2). Same facts in the trail,
-- the ledger and the events; fewer rows and fewer round trips through jsonb per intent.
--
-- 1. No audit row for a claim. A claim (pending -> in_flight, attempts + 1, claimed_by set,
--    nothing else) is mechanics, not a business transition (DESIGN.md, Evidence): the row
--    that ends the claim (an outcome, a retry, a lease hand-back or expiry) records it
--    instead. Its `before` names the state it leaves (in_flight, the relay's instance in
--    claimed_by) and both its sides carry `attempts`, even when the outcome itself did not
--    change them, so the chain folds to the live row again after every claim ends. While a
--    claim is open the live row is one claim ahead of its chain; `audit verify` accepts
--    exactly that difference (status in_flight, attempts one more, claimed_by set) and
--    nothing else. A statement that changes anything else in the same UPDATE as a claim is
--    audited as before.
-- 2. The UPDATE audit triggers of payment_intents and payments write their rows in one
--    INSERT straight from the transition tables. sql/0005 built a jsonb array of every
--    change (jsonb_agg), handed it to audit_write_set, which took it apart again
--    (jsonb_array_elements) and looked up the actor and reason per row. Here the actor and
--    reason are read once per statement. The rows, their hashes (outbox.audit_canonical,
--    unchanged: `audit verify` checks old and new rows alike), their ids (drawn in the
--    order of the entity's key, so the batch's rows are in a deterministic order) and
--    their chain links (the tail of each entity's chain, under the entity's row lock as
--    before) are the same as sql/0005's.
-- 3. The ledger trigger posts from the transition tables directly, instead of to_jsonb of
--    every succeeded row and ledger_post's parse of it. Same rule, message and rows;
--    ledger_post stays for anyone calling it.
-- 4. events_notify is debounced like the intents' wake-up (sql/0007): only while a
--    publisher waits for it. A transaction that notified takes a cluster-wide lock while it
--    commits, so every write-back's commit queued on it. A publisher sets `wanted` before
--    it sleeps and clears it when it claims a full batch; polling stays correct on its own.
--
-- Backward compatibility (_pre_): the previous release's relay writes, reads and verifies
-- the same tables. Its `audit verify` does not know (1) and would report intents in flight
-- while it runs as tail mismatches; upgrade the command with the relay. Its publisher never
-- sets the new flag, whose default (true) keeps every write-back notifying for it.

-- (1) and (2): payment_intents -------------------------------------------------------------

CREATE FUNCTION outbox.audit_payment_intents_v2() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off AS $$
DECLARE
    v_actor  text;
    v_reason text;
BEGIN
    -- A claim-only statement (every claim the relay makes) leaves here without a write.
    IF NOT EXISTS (
        SELECT 1
        FROM old_rows AS o JOIN new_rows AS n ON n.id = o.id
        WHERE NOT outbox.audit_intent_is_claim(o, n)
    ) THEN
        RETURN NULL;
    END IF;
    v_actor := outbox.audit_actor();
    v_reason := nullif(current_setting('outbox.reason', true), '');
    WITH change AS MATERIALIZED (
        SELECT n.id, n.payment_id,
               outbox.audit_intent_changes(o, n, 0) AS before,
               outbox.audit_intent_changes(o, n, 1) AS after,
               o.status = 'in_flight' AND n.status <> 'in_flight' AS ends_claim, o.attempts AS old_attempts,
               n.attempts AS new_attempts
        FROM old_rows AS o
        JOIN new_rows AS n ON n.id = o.id
        WHERE NOT outbox.audit_intent_is_claim(o, n)
    ),
    doc AS MATERIALIZED (
        -- Leaving a claim: attempts on both sides, so the chain has the claim's count.
        SELECT c.id, c.payment_id,
               CASE WHEN c.ends_claim THEN c.before || jsonb_build_object('attempts', c.old_attempts)
                    ELSE c.before END AS before,
               CASE WHEN c.ends_claim THEN c.after || jsonb_build_object('attempts', c.new_attempts)
                    ELSE c.after END AS after
        FROM change AS c
        WHERE c.after <> '{}' OR c.ends_claim
        ORDER BY c.id
    ),
    linked AS MATERIALIZED (
        SELECT nextval('outbox.audit_log_id_seq') AS id, clock_timestamp() AS at,
               d.id::text AS entity_id, d.payment_id, d.before, d.after,
               coalesce(t.chain_seq, 0) + 1 AS chain_seq, t.hash AS prev_hash
        FROM doc AS d
        LEFT JOIN LATERAL (
            SELECT a.chain_seq, a.hash
            FROM outbox.audit_log AS a
            WHERE a.entity = 'intent' AND a.entity_id = d.id::text
            ORDER BY a.chain_seq DESC
            LIMIT 1
        ) AS t ON true
        ORDER BY d.id
    )
    INSERT INTO outbox.audit_log
        (id, at, actor, entity, entity_id, payment_id, operation, reason, before, after,
         chain_seq, prev_hash, hash)
    SELECT l.id, l.at, v_actor, 'intent', l.entity_id, l.payment_id, 'update', v_reason,
           l.before, l.after, l.chain_seq, l.prev_hash,
           sha256(outbox.audit_canonical(l.id, l.at, v_actor, 'intent', l.entity_id,
                                         l.payment_id, 'update', v_reason, l.before, l.after,
                                         l.chain_seq, l.prev_hash))
    FROM linked AS l
    ORDER BY l.id;
    RETURN NULL;
END;
$$;

-- Exactly a claim: pending -> in_flight, one more attempt, the lease and claimed_by set, and
-- no other audited column changed (outbox.audit_intent_changes' list).
CREATE FUNCTION outbox.audit_intent_is_claim(o outbox.payment_intents, n outbox.payment_intents)
RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT o.status = 'pending' AND n.status = 'in_flight' AND n.attempts = o.attempts + 1
       AND (o.payment_id, o.action, o.provider, o.amount_minor, o.currency, o.idempotency_key,
            o.payment_seq, o.amount_applied_minor, o.provider_reference, o.error_code,
            o.error_message)
           IS NOT DISTINCT FROM
           (n.payment_id, n.action, n.provider, n.amount_minor, n.currency, n.idempotency_key,
            n.payment_seq, n.amount_applied_minor, n.provider_reference, n.error_code,
            n.error_message)
$$;

COMMENT ON FUNCTION outbox.audit_intent_is_claim(outbox.payment_intents, outbox.payment_intents) IS
    'True when an UPDATE of an intent is a claim and nothing else: such a change gets no audit row; the row that ends the claim records it (sql/0021).';

DROP TRIGGER payment_intents_audit_update ON outbox.payment_intents;
CREATE TRIGGER payment_intents_audit_update
    AFTER UPDATE ON outbox.payment_intents
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION outbox.audit_payment_intents_v2();

-- (2): payments ------------------------------------------------------------------------------

CREATE FUNCTION outbox.audit_payments_v2() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off AS $$
DECLARE
    v_actor  text := outbox.audit_actor();
    v_reason text := nullif(current_setting('outbox.reason', true), '');
BEGIN
    WITH change AS MATERIALIZED (
        SELECT n.payment_id,
               outbox.audit_payment_changes(o, n, 0) AS before,
               outbox.audit_payment_changes(o, n, 1) AS after
        FROM old_rows AS o
        JOIN new_rows AS n ON n.payment_id = o.payment_id
    ),
    linked AS MATERIALIZED (
        SELECT nextval('outbox.audit_log_id_seq') AS id, clock_timestamp() AS at,
               c.payment_id, c.before, c.after,
               coalesce(t.chain_seq, 0) + 1 AS chain_seq, t.hash AS prev_hash
        FROM (SELECT * FROM change WHERE after <> '{}' ORDER BY payment_id) AS c
        LEFT JOIN LATERAL (
            SELECT a.chain_seq, a.hash
            FROM outbox.audit_log AS a
            WHERE a.entity = 'payment' AND a.entity_id = c.payment_id
            ORDER BY a.chain_seq DESC
            LIMIT 1
        ) AS t ON true
        ORDER BY c.payment_id
    )
    INSERT INTO outbox.audit_log
        (id, at, actor, entity, entity_id, payment_id, operation, reason, before, after,
         chain_seq, prev_hash, hash)
    SELECT l.id, l.at, v_actor, 'payment', l.payment_id, l.payment_id, 'update', v_reason,
           l.before, l.after, l.chain_seq, l.prev_hash,
           sha256(outbox.audit_canonical(l.id, l.at, v_actor, 'payment', l.payment_id,
                                         l.payment_id, 'update', v_reason, l.before, l.after,
                                         l.chain_seq, l.prev_hash))
    FROM linked AS l
    ORDER BY l.id;
    RETURN NULL;
END;
$$;

DROP TRIGGER payments_audit_update ON outbox.payments;
CREATE TRIGGER payments_audit_update
    AFTER UPDATE ON outbox.payments
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION outbox.audit_payments_v2();

-- (3): the ledger ------------------------------------------------------------------------------

CREATE FUNCTION outbox.payment_intents_post_ledger_v2() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off AS $$
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
    LEFT JOIN outbox.payments AS p ON p.payment_id = t.payment_id
    CROSS JOIN LATERAL outbox.ledger_lines(t.kind, t.amount_minor, p.authorized_minor) AS l
    ORDER BY t.id;
    RETURN NULL;
END;
$$;

DROP TRIGGER payment_intents_ledger ON outbox.payment_intents;
CREATE TRIGGER payment_intents_ledger
    AFTER UPDATE ON outbox.payment_intents
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION outbox.payment_intents_post_ledger_v2();

-- (4): debounced events NOTIFY -------------------------------------------------------------------

CREATE TABLE outbox.events_wakeup (
    singleton   boolean PRIMARY KEY DEFAULT true CONSTRAINT events_wakeup_single_row CHECK (singleton),
    wanted      boolean NOT NULL DEFAULT true,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
INSERT INTO outbox.events_wakeup DEFAULT VALUES;

COMMENT ON TABLE outbox.events_wakeup IS
    'wanted: some publisher is idle and waits for a NOTIFY on outbox_events; '
    'publishers set and clear it, the events insert trigger reads it.';

GRANT SELECT, UPDATE (wanted, updated_at) ON outbox.events_wakeup TO outbox_relay;
GRANT SELECT ON outbox.events_wakeup TO outbox_operator;

-- SECURITY DEFINER: an application appending events needs no right on the flag.
CREATE FUNCTION outbox.events_notify_v2() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM inserted)
       AND coalesce((SELECT wanted FROM outbox.events_wakeup), true) THEN
        PERFORM pg_notify('outbox_events', '');
    END IF;
    RETURN NULL;
END;
$$;

DROP TRIGGER events_notify ON outbox.events;
CREATE TRIGGER events_notify
    AFTER INSERT ON outbox.events
    REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION outbox.events_notify_v2();

-- Trigger functions and helpers are nobody's to call (sql/0008: no PUBLIC rights).
REVOKE ALL ON FUNCTION outbox.audit_payment_intents_v2() FROM PUBLIC;
REVOKE ALL ON FUNCTION outbox.audit_intent_is_claim(outbox.payment_intents, outbox.payment_intents) FROM PUBLIC;
REVOKE ALL ON FUNCTION outbox.audit_payments_v2() FROM PUBLIC;
REVOKE ALL ON FUNCTION outbox.payment_intents_post_ledger_v2() FROM PUBLIC;
REVOKE ALL ON FUNCTION outbox.events_notify_v2() FROM PUBLIC;
